"""What the audit builds and how: one ``Job`` per kernel spec, variant and architecture (``collect_jobs``),
built ahead of time without a GPU in a spawn pool (``compile_job``, ``run_audit``), then disassembled per
architecture in batches; the measurements land in a ``BuildResult``. Jobs whose ``triton.compile`` inputs are equal
(``code_key``: several specs of one kernel with the same constexprs, e.g. a blocked layout of 128-row blocks and the
dense one) are built once; each is still judged under its own spec's fields."""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import multiprocessing
import os
import pkgutil
import re
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from .sass import (
    ARCHS,
    CAPABILITIES,
    SassSummary,
    _tool,
    analyze_sass,
    disassemble,
    parse_ptxas_log,
    parse_resource_usage,
    ttgir_buffers,
)

__all__ = [
    "DISASM_CHUNK",
    "KERNELS_PACKAGE",
    "BuildResult",
    "Job",
    "build_variants",
    "code_key",
    "collect_jobs",
    "compile_job",
    "divisibility_attrs",
    "run_audit",
]

KERNELS_PACKAGE = "blocksparse_moe.kernels"

DISASM_CHUNK = 64  # cubins per nvdisasm run: ~0.4 s start + ~10 ms per kernel; much larger inputs run superlinearly


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
    fp8: bool = False  # E4M3 operands (CompileSpec.fp8): the fp8mma check applies
    tcgen05_ok: bool = True
    expect_pipelined: bool = True
    num_stages: int | None = None
    num_warps: int | None = None
    serves: str = ""  # the shapes the launchers pick this config for
    per_flop: bool = False  # the per-FLOP checks apply (to the aligned build)
    persistent: bool = False
    programs_per_sm: int = 2
    operand_bytes: int | None = None  # distinct operand tiles of one main-loop iteration
    min_intensity: float | None = None  # None: exempt
    waivers: tuple[tuple[str, str], ...] = ()  # (check or check@cc, reason): report-only for this build
    registers: int | None = None
    spill_stores: int | None = None  # bytes
    spill_loads: int | None = None  # bytes
    stack: int | None = None  # bytes
    shared: int | None = None  # bytes: dynamic (Triton's allocation) + static
    buffers: tuple[int, ...] | None = None  # leading dims of the TTGIR's multi-buffered shared allocations
    ptxas_codes: tuple[str, ...] = ()  # "Potential Performance Loss" notes of ptxas
    sass: SassSummary | None = None
    seconds: float = 0.0  # compile (worker wall time); 0 for a build that shares another job's code
    cubin: str | None = None
    error: str | None = None
    shares: Job | None = None  # the job whose build (the same triton.compile inputs: code_key) this one reuses

    @property
    def hgmma(self) -> int | None:
        return None if self.sass is None else self.sass.family_count("wgmma")

    @property
    def hmma(self) -> int | None:
        return None if self.sass is None else self.sass.family_count("mma.sync")

    @property
    def tcgen05(self) -> int | None:
        return None if self.sass is None else self.sass.family_count("tcgen05")

    @property
    def ld128(self) -> int | None:
        return None if self.sass is None else self.sass.ld128


# ----------------------------------------------------------------------------------------------- jobs


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


def code_key(spec, job: Job) -> tuple:
    """Everything ``compile_job`` hands ``triton.compile`` for ``job`` of ``spec``: the kernel, its signature,
    constexprs (with their types: ``True`` and ``1`` are other constants to Triton), warps, stages, the variant's
    divisibility attrs and the architecture. Equal keys give the same cubin (the compile is deterministic)."""
    attrs = divisibility_attrs(spec) if job.variant == "aligned" else {}
    return (
        id(spec.kernel),
        tuple(sorted(spec.signature.items())),
        tuple(sorted((k, type(v).__name__, repr(v)) for k, v in spec.constexprs.items())),
        spec.num_warps,
        spec.num_stages,
        tuple(sorted((k, repr(v)) for k, v in attrs.items())),
        job.cc,
    )


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
    unknown = [cc for cc in capabilities if cc not in ARCHS]
    if unknown:
        raise ValueError(f"capabilities must be among {tuple(ARCHS)}, got {unknown}")
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
            archs = [cc for cc in capabilities if getattr(spec, "archs", None) is None or cc in spec.archs]
            for variant in build_variants(spec):
                if variant in variants:
                    jobs.extend(Job(name, index, spec.name, cc, variant) for cc in archs)
    return jobs


def _gpu_specs(mod) -> list:
    """``mod.compile_specs()`` as the GPU path sees it: ``TRITON_INTERPRET`` unset during the call."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        return mod.compile_specs()
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


@functools.cache
def _worker_specs(module: str) -> list:
    """``module``'s specs in a worker (``TRITON_INTERPRET`` unset there: ``_init_worker``), listed once per worker
    process rather than once per build (~0.1 s each for ``kernels.specs``, ~7% of a build's time)."""
    return importlib.import_module(module).compile_specs()


def _init_worker(fp_fusion: str, cache_root: str) -> None:
    """Compile, never interpret; a fresh cache (under ``cache_root``) so ptxas runs (and logs) for every build."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DEFAULT_FP_FUSION"] = fp_fusion
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(dir=cache_root)


# ----------------------------------------------------------------------------------------------- builds


def _safe_name(job: Job) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{job.module.rsplit('.', 1)[-1]}.{job.name}.{job.variant}")


def compile_job(job: Job, out_dir: str, keep_ir: bool = False) -> BuildResult:
    """Build one job (in a worker: see ``_init_worker``), write its cubin and ptxas log, read its resources and
    TTGIR buffers. The SASS is read afterwards, per architecture in batches (``disassemble``)."""
    start = time.perf_counter()
    result = BuildResult(job)
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        spec = _worker_specs(job.module)[job.index]
        _judge_as(result, spec)
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
        cubin = Path(out_dir) / f"sm_{job.cc}" / f"{_safe_name(job)}.cubin"
        cubin.parent.mkdir(parents=True, exist_ok=True)
        cubin.write_bytes(kernel.asm["cubin"])
        cubin.with_suffix(".ptxas.log").write_text(log.getvalue())
        if keep_ir:
            cubin.with_suffix(".ttgir").write_text(kernel.asm["ttgir"])
            cubin.with_suffix(".ptx").write_text(kernel.asm["ptx"])
        result.cubin = str(cubin)
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
        res = parse_resource_usage(usage)
        ptxas = parse_ptxas_log(log.getvalue())
        result.registers = res.get("registers", ptxas.get("registers"))
        result.stack = res.get("stack", ptxas.get("stack"))
        result.spill_stores = ptxas.get("spill_stores")
        result.spill_loads = ptxas.get("spill_loads")
        if result.spill_stores is None:  # no ptxas log: local memory is the spill evidence left
            result.spill_stores = result.spill_loads = res.get("local")
        result.ptxas_codes = ptxas.get("codes", ())
        result.shared = int(getattr(kernel.metadata, "shared", 0) or 0) + res.get("static_shared", 0)
        result.buffers = ttgir_buffers(kernel.asm["ttgir"])
    except Exception as e:  # report the failed build in the table instead of losing the others
        result.error = _error(e)
    result.seconds = time.perf_counter() - start
    return result


def _judge_as(result: BuildResult, spec) -> None:
    """Copy the fields the checks read from ``spec`` (what the build is and serves, its per-FLOP fields and
    waivers) into ``result``."""
    result.is_matmul = spec.is_matmul
    result.fp8 = getattr(spec, "fp8", False)
    result.tcgen05_ok = getattr(spec, "tcgen05_ok", True)
    result.expect_pipelined = getattr(spec, "expect_pipelined", True)
    result.num_stages = spec.num_stages
    result.num_warps = spec.num_warps
    fields = ("serves", "per_flop", "persistent", "programs_per_sm", "operand_bytes", "min_intensity", "waivers")
    for name in fields:
        setattr(result, name, getattr(spec, name, getattr(result, name)))


def _shared_result(built: BuildResult, job: Job, spec) -> BuildResult:
    """The result of ``job`` whose code ``built`` compiled (equal ``code_key``): ``built``'s measurements, judged
    under ``job``'s own spec."""
    result = replace(built, job=job, seconds=0.0, shares=built.job)
    _judge_as(result, spec)
    return result


def _error(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _disassemble_batch(cc: int, cubins: list[str]) -> list[SassSummary] | str:
    """In a worker: disassemble, write each ``.sass`` next to its cubin, analyse; an error message on failure."""
    try:
        texts = disassemble(cc, cubins)
        for path, text in zip(cubins, texts):
            Path(path).with_suffix(".sass").write_text(text)
        return [analyze_sass(t) for t in texts]
    except Exception as e:
        return f"disassembly failed: {_error(e)}"


def run_audit(
    jobs: list[Job],
    out_dir: str | Path,
    processes: int = 2,
    fp_fusion: str | None = None,
    keep_ir: bool = False,
    timings: dict | None = None,
) -> list[BuildResult]:
    """Build ``jobs`` in a spawn pool of ``processes`` workers, each distinct ``code_key`` once (the others reuse
    its build: ``BuildResult.shares``), then disassemble the cubins per architecture in batches of up to
    ``DISASM_CHUNK`` (at least one batch per worker); results in job order. ``timings`` (if given) receives the
    wall seconds of the two phases. The workers' Triton caches are removed afterwards."""
    fp_fusion = fp_fusion or os.environ.get("TRITON_DEFAULT_FP_FUSION", "1")
    ctx = multiprocessing.get_context("spawn")
    processes = max(1, processes)
    specs = {m: _gpu_specs(importlib.import_module(m)) for m in dict.fromkeys(j.module for j in jobs)}
    first: dict[tuple, int] = {}
    builder = [first.setdefault(code_key(specs[j.module][j.index], j), k) for k, j in enumerate(jobs)]
    unique = list(first.values())
    with (
        tempfile.TemporaryDirectory(prefix="bsm-audit-cache-") as cache_root,
        ProcessPoolExecutor(
            processes, mp_context=ctx, initializer=_init_worker, initargs=(fp_fusion, cache_root)
        ) as pool,
    ):
        t0 = time.perf_counter()
        n = len(unique)
        results = list(pool.map(compile_job, [jobs[k] for k in unique], [str(out_dir)] * n, [keep_ir] * n))
        t1 = time.perf_counter()
        batches: list[tuple[int, list[int]]] = []
        for cc in dict.fromkeys(r.job.cc for r in results):
            built = [k for k, r in enumerate(results) if r.job.cc == cc and r.error is None]
            size = min(DISASM_CHUNK, -(-len(built) // processes)) if built else 1
            batches += [(cc, built[s : s + size]) for s in range(0, len(built), size)]
        summaries = pool.map(
            _disassemble_batch, [cc for cc, _ in batches], [[results[k].cubin for k in b] for _, b in batches]
        )
        for (_, batch), summary in zip(batches, summaries):
            for n_, k in enumerate(batch):
                if isinstance(summary, str):
                    results[k].error = summary
                else:
                    results[k].sass = summary[n_]
        if timings is not None:
            timings.update(compile=t1 - t0, disassemble=time.perf_counter() - t1)
    by_job = dict(zip(unique, results))
    return [
        by_job[k] if b == k else _shared_result(by_job[b], j, specs[j.module][j.index])
        for k, (j, b) in enumerate(zip(jobs, builder))
    ]
