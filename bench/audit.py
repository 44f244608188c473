"""Ahead-of-time compile audit of the Triton kernels: ``python -m bench.audit``.

Every module of ``blocksparse_moe.kernels`` that defines ``compile_specs()`` (a list of
``kernels._common.CompileSpec``) is compiled for sm_80 and sm_90 without a GPU, in each variant the spec lists:
``unaligned`` (no divisibility hints: odd shapes) and ``aligned`` (every pointer and the spec's ``aligned``
integers marked ``tt.divisibility`` 16, as the JIT specialises realistic shapes: vector loads, pipelined K loop);
the aligned variant is skipped when it has nothing to mark. For each build the audit reads registers, stack and
spill stores/loads (ptxas's log, with a fresh ``TRITON_CACHE_DIR`` so nothing comes from the cache, and
``cuobjdump --dump-resource-usage``), shared memory (Triton's dynamic allocation + static), and counts ``HGMMA``
(Hopper wgmma), ``HMMA`` (mma.sync) and 128-bit global loads (``LDG``/``LDGSTS`` ``.128``) in
``cuobjdump --dump-sass``.

Exit status 1 when a build spills, fails, or an sm_90 matmul (``spec.is_matmul``) has no HGMMA.
Builds run in a spawn process pool (``--jobs``, default 2) with ``TRITON_INTERPRET`` unset and
``TRITON_DEFAULT_FP_FUSION`` set explicitly (default 1).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import io
import multiprocessing
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Job",
    "BuildResult",
    "build_variants",
    "divisibility_attrs",
    "collect_jobs",
    "compile_job",
    "run_audit",
    "format_table",
    "problems",
    "main",
]

CAPABILITIES = (80, 90)
KERNELS_PACKAGE = "blocksparse_moe.kernels"


@dataclass(frozen=True)
class Job:
    """One build: spec number ``index`` of ``module.compile_specs()`` for compute capability ``cc``, in
    ``variant`` ``"unaligned"`` or ``"aligned"``."""

    module: str
    index: int
    name: str
    cc: int
    variant: str = "unaligned"


@dataclass
class BuildResult:
    job: Job
    is_matmul: bool = True
    registers: int | None = None
    spill_stores: int | None = None  # bytes
    spill_loads: int | None = None  # bytes
    stack: int | None = None  # bytes
    shared: int | None = None  # bytes: dynamic (Triton's allocation) + static
    hgmma: int | None = None
    hmma: int | None = None
    ld128: int | None = None  # 128-bit global loads (LDG / LDGSTS .128)
    seconds: float = 0.0
    cubin: str | None = None
    error: str | None = None


def _tool(name: str) -> str:
    """``cuobjdump`` / ``nvdisasm``: the copy in the Triton wheel, else PATH, else /usr/local/cuda/bin."""
    import triton.backends.nvidia as nvidia

    bundled = Path(nvidia.__file__).parent / "bin" / name
    if bundled.exists():
        return str(bundled)
    found = shutil.which(name) or shutil.which(name, path="/usr/local/cuda/bin")
    if found is None:
        raise FileNotFoundError(f"{name} not found in the Triton wheel, on PATH or in /usr/local/cuda/bin")
    return found


def build_variants(spec) -> tuple[str, ...]:
    """The variants of ``spec`` worth building: its ``variants``, less ``aligned`` when nothing would be marked
    divisible (no pointer argument, no ``aligned`` name) and the unaligned build is listed anyway."""
    if "unaligned" in spec.variants and not divisibility_attrs(spec):
        return ("unaligned",)
    return tuple(spec.variants)


def divisibility_attrs(spec) -> dict[tuple[int], list[list]]:
    """``ASTSource`` attrs of the aligned variant: ``tt.divisibility`` 16 on every pointer argument and on the
    integer arguments named in ``spec.aligned`` (what the JIT does for 16-byte aligned data and sizes/strides
    that are multiples of 16)."""
    names = spec.kernel.arg_names
    marked = [a for a, t in spec.signature.items() if t.startswith("*")] + list(spec.aligned)
    return {(names.index(a),): [["tt.divisibility", 16]] for a in marked}


def collect_jobs(
    modules: list[str] | None = None,
    capabilities: tuple[int, ...] = CAPABILITIES,
    only: str | None = None,
    variants: tuple[str, ...] = ("unaligned", "aligned"),
) -> list[Job]:
    """Jobs for ``modules`` (import paths), default: every ``blocksparse_moe.kernels`` module with ``compile_specs``;
    ``only``: keep the specs whose ``module.name`` (short module name) contains this string; ``variants``: keep
    these variants.

    Imports the modules in this process only to count and name the specs (with ``TRITON_INTERPRET`` unset, as in
    the workers: launchers list their interpreter config otherwise); builds happen in workers.
    """
    if modules is None:
        pkg = importlib.import_module(KERNELS_PACKAGE)
        modules = [
            f"{KERNELS_PACKAGE}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")
        ]
    jobs = []
    for name in modules:
        mod = importlib.import_module(name)
        if not hasattr(mod, "compile_specs"):
            continue
        for index, spec in enumerate(_gpu_specs(mod)):
            if only is not None and only not in f"{name.rsplit('.', 1)[-1]}.{spec.name}":
                continue
            for variant in build_variants(spec):
                if variant in variants:
                    jobs.extend(Job(name, index, spec.name, cc, variant) for cc in capabilities)
    return jobs


def _gpu_specs(mod) -> list:
    """``mod.compile_specs()`` as the GPU path sees it: ``TRITON_INTERPRET`` unset during the call."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        return mod.compile_specs()
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def _init_worker(fp_fusion: str, cache_root: str) -> None:
    """Compile, never interpret; a fresh cache (under ``cache_root``) so ptxas runs (and logs) for every build."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DEFAULT_FP_FUSION"] = fp_fusion
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(dir=cache_root)


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def parse_ptxas_log(log: str) -> dict[str, int]:
    """Registers, stack and spill bytes from ptxas ``-v`` output (the largest value over the functions)."""
    out: dict[str, int] = {}
    regs = [int(v) for v in _PTXAS_REGS.findall(log)]
    if regs:
        out["registers"] = max(regs)
    spills = [tuple(int(v) for v in m) for m in _PTXAS_SPILLS.findall(log)]
    if spills:
        out["stack"] = max(s[0] for s in spills)
        out["spill_stores"] = max(s[1] for s in spills)
        out["spill_loads"] = max(s[2] for s in spills)
    return out


def parse_resource_usage(text: str) -> dict[str, int]:
    """``cuobjdump --dump-resource-usage``: registers, stack, static shared and local bytes (max over functions)."""
    rows = [tuple(int(v) for v in m) for m in _RESOURCE.findall(text)]
    if not rows:
        return {}
    return {
        "registers": max(r[0] for r in rows),
        "stack": max(r[1] for r in rows),
        "static_shared": max(r[2] for r in rows),
        "local": max(r[3] for r in rows),
    }


_LD128 = re.compile(r"\bLDG(STS)?(\.[A-Z0-9_]+)*\.128\b")


def count_mma(sass: str) -> tuple[int, int]:
    """(HGMMA, HMMA) instruction counts in a SASS dump."""
    hgmma = sum(1 for line in sass.splitlines() if "HGMMA" in line)
    hmma = sum(1 for line in sass.splitlines() if re.search(r"\bHMMA\b", line))
    return hgmma, hmma


def count_ld128(sass: str) -> int:
    """128-bit global loads (``LDG.E.128``, ``LDGSTS.E.BYPASS.128``, ...) in a SASS dump."""
    return sum(1 for line in sass.splitlines() if _LD128.search(line))


def compile_job(job: Job, out_dir: str) -> BuildResult:
    """Build one job (in a worker: see ``_init_worker``), write its cubin and read its resources."""
    start = time.perf_counter()
    result = BuildResult(job)
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        spec = importlib.import_module(job.module).compile_specs()[job.index]
        result.is_matmul = spec.is_matmul
        if job.variant not in spec.variants:
            raise ValueError(f"variant {job.variant!r} not in the spec's {spec.variants}")
        attrs = divisibility_attrs(spec) if job.variant == "aligned" else {}
        src = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # Triton prints the ptxas log (TRITON_DUMP_PTXAS_LOG=1)
            kernel = triton.compile(
                src,
                target=GPUTarget("cuda", job.cc, 32),
                options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages),
            )
        safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{job.module.rsplit('.', 1)[-1]}.{job.name}.{job.variant}")
        cubin = Path(out_dir) / f"sm_{job.cc}" / f"{safe}.cubin"
        cubin.parent.mkdir(parents=True, exist_ok=True)
        cubin.write_bytes(kernel.asm["cubin"])
        cubin.with_suffix(".ptxas.log").write_text(log.getvalue())
        result.cubin = str(cubin)
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [_tool("cuobjdump"), "--dump-sass", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
        cubin.with_suffix(".sass").write_text(sass)
        res = parse_resource_usage(usage)
        ptxas = parse_ptxas_log(log.getvalue())
        result.registers = res.get("registers", ptxas.get("registers"))
        result.stack = res.get("stack", ptxas.get("stack"))
        result.spill_stores = ptxas.get("spill_stores")
        result.spill_loads = ptxas.get("spill_loads")
        if result.spill_stores is None:  # no ptxas log: local memory is the spill evidence left
            result.spill_stores = result.spill_loads = res.get("local")
        result.shared = int(getattr(kernel.metadata, "shared", 0) or 0) + res.get("static_shared", 0)
        result.hgmma, result.hmma = count_mma(sass)
        result.ld128 = count_ld128(sass)
    except Exception as e:  # report the failed build in the table instead of losing the others
        result.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    result.seconds = time.perf_counter() - start
    return result


def run_audit(
    jobs: list[Job], out_dir: str | Path, processes: int = 2, fp_fusion: str | None = None
) -> list[BuildResult]:
    """Build ``jobs`` in a spawn pool of ``processes`` workers; results in job order. The workers' Triton caches
    are removed afterwards."""
    fp_fusion = fp_fusion or os.environ.get("TRITON_DEFAULT_FP_FUSION", "1")
    ctx = multiprocessing.get_context("spawn")
    with (
        tempfile.TemporaryDirectory(prefix="bsm-audit-cache-") as cache_root,
        concurrent.futures.ProcessPoolExecutor(
            max_workers=max(1, processes), mp_context=ctx, initializer=_init_worker, initargs=(fp_fusion, cache_root)
        ) as pool,
    ):
        return list(pool.map(compile_job, jobs, [str(out_dir)] * len(jobs)))


def problems(result: BuildResult) -> list[str]:
    """Why a build fails the audit (empty when it passes)."""
    if result.error:
        return [f"build failed: {result.error}"]
    out = []
    if (result.spill_stores or 0) > 0 or (result.spill_loads or 0) > 0:
        out.append(f"spills {result.spill_stores} B stores / {result.spill_loads} B loads")
    if result.job.cc >= 90 and result.is_matmul and not result.hgmma:
        out.append("sm_90 matmul without HGMMA")
    return out


def format_table(results: list[BuildResult]) -> str:
    """Markdown table, one row per kernel configuration and architecture."""
    header = (
        "| module | config | variant | sm | regs | spill st/ld B | stack B | smem B | HGMMA | HMMA | LD128 "
        "| compile s | status |"
    )
    lines = [header, "|" + "---|" * 13]
    for r in results:
        status = "; ".join(problems(r)) or "ok"
        cells = [
            r.job.module.rsplit(".", 1)[-1],
            r.job.name,
            r.job.variant,
            f"sm_{r.job.cc}",
            r.registers,
            f"{r.spill_stores}/{r.spill_loads}" if r.spill_stores is not None else None,
            r.stack,
            r.shared,
            r.hgmma,
            r.hmma,
            r.ld128,
            f"{r.seconds:.1f}",
            status,
        ]
        lines.append("| " + " | ".join("n/a" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.audit", description=__doc__.split("\n\n")[0])
    p.add_argument("--modules", nargs="*", default=None, help=f"import paths (default: all of {KERNELS_PACKAGE})")
    p.add_argument("--arch", type=int, nargs="*", default=list(CAPABILITIES), help="compute capabilities")
    p.add_argument("--only", default=None, help="build only the specs whose 'module.config' contains this string")
    p.add_argument(
        "--variants", nargs="*", choices=("unaligned", "aligned"), default=["unaligned", "aligned"], help="variants"
    )
    p.add_argument("--jobs", type=int, default=2, help="worker processes")
    p.add_argument("--out", type=Path, default=None, help="cubins and logs (default: a temporary folder)")
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
    results = run_audit(jobs, out_dir, args.jobs)
    failed = [r for r in results if problems(r)]
    print(format_table(results))
    print(
        f"\n{len(results)} builds, {len(failed)} failing, {time.perf_counter() - start:.0f} s "
        f"(TRITON_DEFAULT_FP_FUSION={os.environ['TRITON_DEFAULT_FP_FUSION']})"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
