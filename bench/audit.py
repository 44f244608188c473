"""Ahead-of-time compile audit of the Triton kernels: ``python -m bench.audit``.

Every module of ``blocksparse_moe.kernels`` that defines ``compile_specs()`` (a list of
``kernels._common.CompileSpec``) is compiled for sm_80 and sm_90 without a GPU. For each build the audit reads
registers, stack and spill stores/loads (ptxas's log, with a fresh ``TRITON_CACHE_DIR`` so nothing comes from
the cache, and ``cuobjdump --dump-resource-usage``), shared memory (Triton's dynamic allocation + static), and
counts ``HGMMA`` (Hopper wgmma) and ``HMMA`` (mma.sync) instructions in ``cuobjdump --dump-sass``.

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

__all__ = ["Job", "BuildResult", "collect_jobs", "compile_job", "run_audit", "format_table", "problems", "main"]

CAPABILITIES = (80, 90)
KERNELS_PACKAGE = "blocksparse_moe.kernels"


@dataclass(frozen=True)
class Job:
    """One build: spec number ``index`` of ``module.compile_specs()`` for compute capability ``cc``."""

    module: str
    index: int
    name: str
    cc: int


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


def collect_jobs(modules: list[str] | None = None, capabilities: tuple[int, ...] = CAPABILITIES) -> list[Job]:
    """Jobs for ``modules`` (import paths), default: every ``blocksparse_moe.kernels`` module with ``compile_specs``.

    Imports the modules in this process only to count and name the specs; builds happen in workers.
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
        for index, spec in enumerate(mod.compile_specs()):
            jobs.extend(Job(name, index, spec.name, cc) for cc in capabilities)
    return jobs


def _init_worker(fp_fusion: str) -> None:
    """Compile, never interpret; a fresh cache so ptxas runs (and logs) for every build."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DEFAULT_FP_FUSION"] = fp_fusion
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="bsm-audit-cache-")


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


def count_mma(sass: str) -> tuple[int, int]:
    """(HGMMA, HMMA) instruction counts in a SASS dump."""
    hgmma = sum(1 for line in sass.splitlines() if "HGMMA" in line)
    hmma = sum(1 for line in sass.splitlines() if re.search(r"\bHMMA\b", line))
    return hgmma, hmma


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
        src = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # Triton prints the ptxas log (TRITON_DUMP_PTXAS_LOG=1)
            kernel = triton.compile(
                src,
                target=GPUTarget("cuda", job.cc, 32),
                options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages),
            )
        safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{job.module.rsplit('.', 1)[-1]}.{job.name}")
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
    except Exception as e:  # report the failed build in the table instead of losing the others
        result.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    result.seconds = time.perf_counter() - start
    return result


def run_audit(
    jobs: list[Job], out_dir: str | Path, processes: int = 2, fp_fusion: str | None = None
) -> list[BuildResult]:
    """Build ``jobs`` in a spawn pool of ``processes`` workers; results in job order."""
    fp_fusion = fp_fusion or os.environ.get("TRITON_DEFAULT_FP_FUSION", "1")
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=max(1, processes), mp_context=ctx, initializer=_init_worker, initargs=(fp_fusion,)
    ) as pool:
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
    header = "| module | config | sm | regs | spill st/ld B | stack B | smem B | HGMMA | HMMA | compile s | status |"
    lines = [header, "|" + "---|" * 11]
    for r in results:
        status = "; ".join(problems(r)) or "ok"
        cells = [
            r.job.module.rsplit(".", 1)[-1],
            r.job.name,
            f"sm_{r.job.cc}",
            r.registers,
            f"{r.spill_stores}/{r.spill_loads}" if r.spill_stores is not None else None,
            r.stack,
            r.shared,
            r.hgmma,
            r.hmma,
            f"{r.seconds:.1f}",
            status,
        ]
        lines.append("| " + " | ".join("n/a" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.audit", description=__doc__.split("\n\n")[0])
    p.add_argument("--modules", nargs="*", default=None, help=f"import paths (default: all of {KERNELS_PACKAGE})")
    p.add_argument("--arch", type=int, nargs="*", default=list(CAPABILITIES), help="compute capabilities")
    p.add_argument("--jobs", type=int, default=2, help="worker processes")
    p.add_argument("--out", type=Path, default=None, help="cubins and logs (default: a temporary folder)")
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    start = time.perf_counter()
    jobs = collect_jobs(args.modules, tuple(args.arch))
    if not jobs:
        print(f"bench.audit: no module defines compile_specs() in {args.modules or KERNELS_PACKAGE}", file=sys.stderr)
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
