"""``python -m bench.audit``: the ahead-of-time compile audit (see the package docstring)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from . import __doc__ as _package_doc
from .jobs import KERNELS_PACKAGE, collect_jobs, run_audit
from .report import CHECKS, findings, format_checks, format_table, problems
from .sass import ARCHS

__all__ = ["main"]


def _report_only(text: str) -> frozenset[str]:
    """``--report-only``: comma-separated check names, each optionally ``@cc`` (``pipeline,c7515,spill@120``)."""
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    valid = set(CHECKS) | {f"{c}@{cc}" for c in CHECKS for cc in ARCHS}
    unknown = sorted(names - valid)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"checks must be among {', '.join(CHECKS)}, each optionally @ one of {', '.join(map(str, ARCHS))}; "
            f"got {', '.join(unknown)}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.audit", description=_package_doc.split("\n\n")[0])
    p.add_argument("--modules", nargs="*", default=None, help=f"import paths (default: all of {KERNELS_PACKAGE})")
    p.add_argument(
        "--arch", type=int, nargs="*", choices=tuple(ARCHS), default=list(ARCHS), help="compute capabilities"
    )
    p.add_argument("--only", default=None, help="build only the specs whose 'module.config' contains this string")
    p.add_argument(
        "--variants", nargs="*", choices=("unaligned", "aligned"), default=["unaligned", "aligned"], help="variants"
    )
    p.add_argument(
        "--report-only",
        type=_report_only,
        default=frozenset(),
        metavar="CHECK[,CHECK...]",
        help=f"report these checks without failing on them: {', '.join(CHECKS)}; CHECK@CC for one architecture",
    )
    p.add_argument("--jobs", type=int, default=2, help="worker processes")
    p.add_argument("--out", type=Path, default=None, help="cubins, ptxas logs, SASS (default: a temporary folder)")
    p.add_argument("--keep-ir", action="store_true", help="also write each build's TTGIR and PTX to --out")
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    start = time.perf_counter()
    jobs = collect_jobs(args.modules, tuple(args.arch), args.only, tuple(args.variants))
    if not jobs:
        where = args.modules or KERNELS_PACKAGE
        print(f"bench.audit: no compile_specs() build in {where} matches --only/--variants", file=sys.stderr)
        return 1
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="bsm-audit-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"bench.audit: {len(jobs)} builds with {args.jobs} processes; cubins in {out_dir}", file=sys.stderr)
    timings: dict = {}
    results = run_audit(jobs, out_dir, args.jobs, keep_ir=args.keep_ir, timings=timings)
    failed = [r for r in results if problems(r, args.report_only)]
    reported = [r for r in results if findings(r) and not problems(r, args.report_only)]
    print(format_table(results, args.report_only))
    print()
    print(format_checks(results, args.report_only))
    shared = sum(1 for r in results if r.shares is not None)
    print(
        f"\n{len(results)} builds, {len(failed)} failing, {len(reported)} with report-only findings, "
        f"{time.perf_counter() - start:.0f} s ({len(results) - shared} compiled, {shared} the same code as another "
        f"build; compile {timings['compile']:.0f} s, disassembly {timings['disassemble']:.0f} s; "
        f"TRITON_DEFAULT_FP_FUSION={os.environ['TRITON_DEFAULT_FP_FUSION']})"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
