"""Ahead-of-time compile audit of the Triton kernels: ``python -m bench.audit``.

Every module of ``blocksparse_moe.kernels`` that defines ``compile_specs()`` (a list of
``kernels._common.CompileSpec``) is compiled without a GPU for sm_80, sm_90, sm_100 and sm_120 (``ARCHS``), in each
variant the spec lists: ``unaligned`` (no divisibility hints: odd shapes) and ``aligned`` (every pointer and the
spec's ``aligned`` integers marked ``tt.divisibility`` 16, as the JIT specialises realistic shapes: vector loads,
pipelined K loop); the aligned variant is skipped when it has nothing to mark.

Per build the audit reads registers, stack and spill bytes and ptxas's performance notes (its ``-v`` log, with a
fresh ``TRITON_CACHE_DIR`` so nothing comes from the cache, and ``cuobjdump --dump-resource-usage``), shared memory
(Triton's dynamic allocation + static), the shared-memory buffers of the pipelined loads (the TTGIR's
``ttg.local_alloc``), and, from the SASS: the MMA instructions, 128-bit global loads, TMA, and the main loop (the
innermost loop around the MMA instructions, found from its backward ``BRA``): instructions per MMA and the waits
inside it. The SASS of all builds of one architecture is disassembled in a few ``nvdisasm`` runs over the
concatenated text sections (``cuobjdump -xtext``): nvdisasm costs ~0.4 s per call whatever the input size.

Checks (``CHECKS``; docs/audit.md has the exact patterns): ``build``, ``spill``, ``mma`` (a matmul without the
architecture's tensor-core MMA: HGMMA on sm_90, tcgen05 on sm_100, HMMA on sm_80 / sm_120), ``c7515`` (ptxas
serialised the wgmma), ``pipeline`` (the main loop waits its cp.async copies or wgmma to zero every iteration),
``smem`` (over the architecture's per-block limit). Exit status 1 when a check outside ``--report-only`` fails.
Builds run in a spawn process pool (``--jobs``, default 2) with ``TRITON_INTERPRET`` unset and
``TRITON_DEFAULT_FP_FUSION`` set explicitly (default 1).
"""

from __future__ import annotations

import argparse
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
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ARCHS",
    "CHECKS",
    "Arch",
    "Job",
    "Instr",
    "LoopStats",
    "SassSummary",
    "BuildResult",
    "build_variants",
    "divisibility_attrs",
    "collect_jobs",
    "compile_job",
    "disassemble",
    "parse_ptxas_log",
    "parse_resource_usage",
    "parse_sass",
    "mma_family",
    "find_loops",
    "analyze_sass",
    "ttgir_buffers",
    "run_audit",
    "findings",
    "reported_only",
    "problems",
    "format_table",
    "format_checks",
    "main",
]

KERNELS_PACKAGE = "blocksparse_moe.kernels"


@dataclass(frozen=True)
class Arch:
    """A compile target: ``cc`` (compute capability), ``raw`` (nvdisasm's ``-b`` name of its raw binaries),
    ``mma`` (the MMA family a matmul tile must use: ``MMA_FAMILIES``), ``smem_limit`` (shared memory one block may
    use, bytes: the opt-in maximum of the CUDA programming guide's table)."""

    cc: int
    raw: str
    mma: str
    smem_limit: int


ARCHS = {
    80: Arch(80, "SM80", "mma.sync", 166912),  # A100: 163 KB per block
    90: Arch(90, "SM90a", "wgmma", 232448),  # H100 / H200: 227 KB
    100: Arch(100, "SM100a", "tcgen05", 232448),  # B200: 227 KB
    120: Arch(120, "SM120a", "mma.sync", 101376),  # RTX 50 / RTX PRO Blackwell: 99 KB
}
CAPABILITIES = tuple(ARCHS)

CHECKS = {
    "build": "the build (or its disassembly) failed",
    "spill": "ptxas spill stores / loads (or local memory) > 0",
    "mma": "a matmul spec (is_matmul) without the architecture's MMA: HGMMA on sm_90, UTC*MMA on sm_100 "
    "(unless tcgen05_ok=False: any MMA), HMMA on sm_80 / sm_120",
    "c7515": "ptxas info C7515: wgmma.mma_async instructions are serialized",
    "pipeline": "an MMA loop waits to zero every iteration: DEPBAR.LE SB0, 0x0 with LDGSTS in the loop (cp.async), "
    "or WARPGROUP.DEPBAR.LE gsb0, 0x0 with async loads in it (wgmma); or, aligned and num_stages > 1, it has no async "
    "load (LDGSTS / UTMALDG) at all; skipped for expect_pipelined=False",
    "smem": "shared memory above the architecture's per-block limit",
}

# SASS mnemonics (before the first '.') of the MMA families, most specific first.
MMA_FAMILIES = (
    ("tcgen05", re.compile(r"UTC[A-Z]*MMA")),  # UTCHMMA (f16/bf16/tf32), UTCIMMA, UTCQMMA, UTCOMMA
    ("wgmma", re.compile(r"[A-Z]GMMA")),  # HGMMA (f16/bf16/tf32), IGMMA, QGMMA, BGMMA
    ("mma.sync", re.compile(r"[A-Z]MMA")),  # HMMA, IMMA, QMMA, DMMA, ...
)
# ptxas notes ("(Cxxxx) Potential Performance Loss: ...") that fail a check
PTXAS_CODES = {"C7515": "c7515"}
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


@dataclass(frozen=True)
class Instr:
    """One SASS instruction: ``addr`` (bytes from the function start), predicate (``"@!P0"`` or ``""``), mnemonic
    with its modifiers (``"HGMMA.64x128x16.F32.BF16"``), operands, and the branch target of a ``BRA``."""

    addr: int
    pred: str
    op: str
    args: str
    target: int | None = None

    @property
    def base(self) -> str:
        return self.op.split(".", 1)[0]


@dataclass(frozen=True)
class LoopStats:
    """A loop of the SASS (``start``: the backward branch's target, ``end``: the branch) that holds MMA
    instructions. ``cp_async_waits`` / ``wgmma_waits``: the counts of its ``DEPBAR.LE SB0, n`` (TMA store waits
    left out) and ``WARPGROUP.DEPBAR.LE gsb0, n``; ``serialised``: wgmma instructions whose next wgmma event is a
    wait to zero."""

    start: int
    end: int
    instructions: int
    mma: int
    ldgsts: int = 0
    tma_loads: int = 0
    mbarrier_waits: int = 0
    cp_async_waits: tuple[int, ...] = ()
    wgmma_waits: tuple[int, ...] = ()
    serialised: int = 0

    @property
    def per_mma(self) -> float:
        return self.instructions / self.mma

    @property
    def asynchronous(self) -> bool:
        """Its operands come in through async copies (cp.async ``LDGSTS`` or TMA ``UTMALDG``)."""
        return self.ldgsts > 0 or self.tma_loads > 0

    @property
    def cp_async_wait_zero(self) -> bool:
        """cp.async copies issued in the loop and waited to zero in it (``DEPBAR.LE SB0, 0x0``)."""
        return self.ldgsts > 0 and 0 in self.cp_async_waits

    @property
    def wgmma_wait_zero(self) -> bool:
        """Async operand loads, yet the wgmma waited to zero in the loop (``WARPGROUP.DEPBAR.LE gsb0, 0x0``). A loop
        of synchronous loads (``LDG`` -> ``STS``: unaligned builds) must wait so before overwriting its one buffer."""
        return self.asynchronous and 0 in self.wgmma_waits


@dataclass(frozen=True)
class SassSummary:
    """What the audit reads from a build's SASS: MMA mnemonics and counts, 128-bit global loads, TMA loads /
    stores, and the loops around MMA instructions (innermost per MMA)."""

    mma: dict[str, int] = field(default_factory=dict)
    ld128: int = 0
    tma_loads: int = 0
    tma_stores: int = 0
    loops: tuple[LoopStats, ...] = ()

    def family_count(self, family: str) -> int:
        return sum(n for op, n in self.mma.items() if mma_family(op) == family)

    @property
    def main_loop(self) -> LoopStats | None:
        """The loop with the most MMA instructions (the K loop)."""
        return max(self.loops, key=lambda lp: (lp.mma, lp.instructions), default=None)


@dataclass
class BuildResult:
    job: Job
    is_matmul: bool = True
    tcgen05_ok: bool = True
    expect_pipelined: bool = True
    num_stages: int | None = None
    registers: int | None = None
    spill_stores: int | None = None  # bytes
    spill_loads: int | None = None  # bytes
    stack: int | None = None  # bytes
    shared: int | None = None  # bytes: dynamic (Triton's allocation) + static
    buffers: tuple[int, ...] | None = None  # leading dims of the TTGIR's multi-buffered shared allocations
    ptxas_codes: tuple[str, ...] = ()  # "Potential Performance Loss" notes of ptxas
    sass: SassSummary | None = None
    seconds: float = 0.0  # compile (worker wall time)
    cubin: str | None = None
    error: str | None = None

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


def _init_worker(fp_fusion: str, cache_root: str) -> None:
    """Compile, never interpret; a fresh cache (under ``cache_root``) so ptxas runs (and logs) for every build."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DEFAULT_FP_FUSION"] = fp_fusion
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(dir=cache_root)


# ----------------------------------------------------------------------------------------------- parsers

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_CODE = re.compile(r"\((C\d{4})\) Potential Performance Loss")
_RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def parse_ptxas_log(log: str) -> dict:
    """Registers, stack and spill bytes from ptxas ``-v`` output (the largest value over the functions), and the
    codes of its "Potential Performance Loss" notes (``codes``, e.g. ``("C7515",)``; empty when none)."""
    out: dict = {}
    regs = [int(v) for v in _PTXAS_REGS.findall(log)]
    if regs:
        out["registers"] = max(regs)
    spills = [tuple(int(v) for v in m) for m in _PTXAS_SPILLS.findall(log)]
    if spills:
        out["stack"] = max(s[0] for s in spills)
        out["spill_stores"] = max(s[1] for s in spills)
        out["spill_loads"] = max(s[2] for s in spills)
    codes = tuple(dict.fromkeys(_PTXAS_CODE.findall(log)))
    if codes:
        out["codes"] = codes
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


# ``/*0a30*/   @!P0 BRA 0x12a0 ;`` (cuobjdump, nvdisasm); the encoding comment after ';' is not read
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P(?:T|\d+)\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
_HEX = re.compile(r"0x([0-9a-f]+)")
_CODE_ADDRESS_OPS = ("BRA", "BSSY", "CALL", "JMP", "RET")  # operands holding a code address (rebased with the code)
_LD128 = re.compile(r"LDG(?:STS)?(?:\.[A-Z0-9_]+)*\.128\b")  # LDG.E.128.CONSTANT, LDGSTS.E.BYPASS.128
_WAIT = re.compile(r"(SB\d|gsb\d)\s*,\s*0x([0-9a-f]+)")
_TMA_STORE_WAIT_WINDOW = 4  # a DEPBAR.LE SB0 this close after UTMACMDFLUSH waits for a TMA store, not cp.async


def parse_sass(text: str, base: int = 0) -> list[Instr]:
    """Instructions of a SASS listing (``cuobjdump --dump-sass`` or ``nvdisasm``), addresses and branch targets
    less ``base``. The target of ``BRA`` is its last hexadecimal operand (``BRA.U UP0, 0x190``)."""
    out = []
    for m in _SASS_LINE.finditer(text):
        addr, pred, op, args = int(m.group(1), 16) - base, (m.group(2) or "").strip(), m.group(3), m.group(4).strip()
        target = None
        if op.split(".", 1)[0] == "BRA":
            hexes = _HEX.findall(args)
            target = int(hexes[-1], 16) - base if hexes else None
        out.append(Instr(addr, pred, op, args, target))
    return out


def mma_family(op: str) -> str | None:
    """``"tcgen05"``, ``"wgmma"``, ``"mma.sync"`` or None for a SASS mnemonic (``"HGMMA.64x128x16.F32.BF16"``)."""
    mnemonic = op.split(".", 1)[0]
    return next((fam for fam, pat in MMA_FAMILIES if pat.fullmatch(mnemonic)), None)


def find_loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    """``(start, end)`` of each loop: a ``BRA`` to an address at or before its own (the back edge), located before
    the function's last ``EXIT``. Branches after it are out-of-line stubs (mbarrier retry loops jumping back into
    the body, the final ``BRA`` to itself), not loops."""
    last_exit = max((i.addr for i in instrs if i.base == "EXIT"), default=None)
    return [
        (i.target, i.addr)
        for i in instrs
        if i.target is not None and i.target < i.addr and (last_exit is None or i.addr < last_exit)
    ]


def _wait(ins: Instr) -> tuple[str, int] | None:
    """``("SB0", n)`` for ``DEPBAR.LE SB0, n``, ``("gsb0", n)`` for ``WARPGROUP.DEPBAR.LE gsb0, n``."""
    if ins.op not in ("DEPBAR.LE", "WARPGROUP.DEPBAR.LE"):
        return None
    m = _WAIT.match(ins.args)
    return (m.group(1), int(m.group(2), 16)) if m else None


def _loop_stats(instrs: list[Instr], start: int, end: int) -> LoopStats:
    idx = [k for k, i in enumerate(instrs) if start <= i.addr <= end]
    body = [instrs[k] for k in idx]
    cp_waits, wg_waits = [], []
    for k in idx:
        w = _wait(instrs[k])
        if w is None:
            continue
        if w[0] == "SB0":
            recent = instrs[max(0, k - _TMA_STORE_WAIT_WINDOW) : k]
            if not any(i.base == "UTMACMDFLUSH" for i in recent):
                cp_waits.append(w[1])
        elif w[0] == "gsb0":
            wg_waits.append(w[1])
    serialised = 0
    for n, ins in enumerate(body):
        if mma_family(ins.op) != "wgmma":
            continue
        nxt = next((j for j in body[n + 1 :] if mma_family(j.op) == "wgmma" or j.op == "WARPGROUP.DEPBAR.LE"), None)
        if nxt is not None and nxt.op == "WARPGROUP.DEPBAR.LE" and _wait(nxt) == ("gsb0", 0):
            serialised += 1
    return LoopStats(
        start=start,
        end=end,
        instructions=len(body),
        mma=sum(1 for i in body if mma_family(i.op)),
        ldgsts=sum(1 for i in body if i.base == "LDGSTS"),
        tma_loads=sum(1 for i in body if i.base == "UTMALDG"),
        mbarrier_waits=sum(1 for i in body if i.op.startswith("SYNCS.PHASECHK")),
        cp_async_waits=tuple(cp_waits),
        wgmma_waits=tuple(wg_waits),
        serialised=serialised,
    )


def analyze_sass(text: str, base: int = 0) -> SassSummary:
    """MMA counts, 128-bit global loads, TMA, and the loops around MMA instructions (for each MMA instruction
    the innermost loop holding it) of one function's SASS."""
    instrs = parse_sass(text, base)
    mma: dict[str, int] = {}
    for i in instrs:
        if mma_family(i.op):
            mma[i.base] = mma.get(i.base, 0) + 1
    loops = find_loops(instrs)
    inner = set()
    for i in instrs:
        if mma_family(i.op):
            around = [lp for lp in loops if lp[0] <= i.addr <= lp[1]]
            if around:
                inner.add(min(around, key=lambda lp: lp[1] - lp[0]))
    return SassSummary(
        mma=mma,
        ld128=sum(1 for i in instrs if _LD128.match(i.op)),
        tma_loads=sum(1 for i in instrs if i.base == "UTMALDG"),
        tma_stores=sum(1 for i in instrs if i.base == "UTMASTG"),
        loops=tuple(_loop_stats(instrs, s, e) for s, e in sorted(inner)),
    )


# ``%0 = ttg.local_alloc : () -> !ttg.memdesc<3x128x64xbf16, #shared, #smem, mutable>`` (no initial value)
_LOCAL_ALLOC = re.compile(
    r"ttg\.local_alloc(?:\s*\{[^}]*\})?\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+(?:x\d+)+)x([A-Za-z]\w*)"
)


def ttgir_buffers(ttgir: str) -> tuple[int, ...]:
    """Leading dimensions (= buffers) of the multi-buffered shared allocations of a TTGIR: the ``ttg.local_alloc``
    with no initial value and rank >= 3 (a 2-D tile per buffer), mbarrier arrays (``i64``) left out. Sorted,
    distinct; empty when the loads are not staged through shared memory that way."""
    dims = {
        int(shape.split("x")[0])
        for shape, elem in _LOCAL_ALLOC.findall(ttgir)
        if elem != "i64" and shape.count("x") >= 2
    }
    return tuple(sorted(dims))


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

        spec = importlib.import_module(job.module).compile_specs()[job.index]
        result.is_matmul = spec.is_matmul
        result.tcgen05_ok = getattr(spec, "tcgen05_ok", True)
        result.expect_pipelined = getattr(spec, "expect_pipelined", True)
        result.num_stages = spec.num_stages
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


def _error(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _text_sections(cubin: str, tmp: Path) -> bytes:
    """The code of a cubin's functions (``cuobjdump -xtext all``: raw instruction encodings), concatenated."""
    where = Path(tempfile.mkdtemp(dir=tmp))
    subprocess.run(
        [_tool("cuobjdump"), "-xtext", "all", os.path.abspath(cubin)], cwd=where, capture_output=True, check=True
    )
    parts = sorted(where.iterdir())
    if not parts:
        raise ValueError(f"cuobjdump -xtext found no code in {cubin}")
    return b"".join(p.read_bytes() for p in parts)


def _normalised(instrs: list[Instr], start: int, end: int) -> str:
    """SASS text of the instructions in ``[start, end)`` of a concatenated listing, addresses rebased to 0."""
    lines = []
    for i in instrs:
        if start <= i.addr < end:
            args = i.args
            if i.base in _CODE_ADDRESS_OPS:
                args = _HEX.sub(lambda m: f"0x{int(m.group(1), 16) - start:x}", args)
            lines.append(f"        /*{i.addr - start:04x}*/ {i.pred + ' ' if i.pred else ''}{i.op} {args} ;")
    return "\n".join(lines) + "\n"


def disassemble(cc: int, cubins: list[str]) -> list[str]:
    """SASS of each cubin (all built for ``cc``) from ONE ``nvdisasm -b`` run over their concatenated code, split
    and rebased to each function's start (the text equals ``cuobjdump --dump-sass``'s, without the encodings).
    Falls back to one ``cuobjdump --dump-sass`` per cubin (~0.4 s each) if that fails or the raw listing does not
    cover every instruction."""
    try:
        with tempfile.TemporaryDirectory(prefix="bsm-disasm-") as tmp:
            blob, spans = bytearray(), []
            for path in cubins:
                code = _text_sections(path, Path(tmp))
                spans.append((len(blob), len(blob) + len(code)))
                blob += code
            raw = Path(tmp) / "code.bin"
            raw.write_bytes(bytes(blob))
            listing = subprocess.run(
                [_tool("nvdisasm"), "-b", ARCHS[cc].raw, str(raw)], capture_output=True, text=True, check=True
            ).stdout
        instrs = parse_sass(listing)
        if len(blob) % 16 == 0 and len(instrs) == len(blob) // 16:  # 128-bit instructions on sm_80 and later
            return [_normalised(instrs, a, b) for a, b in spans]
    except (OSError, ValueError, subprocess.CalledProcessError):
        pass
    return [_cuobjdump_sass(path) for path in cubins]


def _cuobjdump_sass(cubin: str) -> str:
    return subprocess.run([_tool("cuobjdump"), "--dump-sass", cubin], capture_output=True, text=True, check=True).stdout


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
    """Build ``jobs`` in a spawn pool of ``processes`` workers, then disassemble the cubins per architecture in
    batches of up to ``DISASM_CHUNK`` (at least one batch per worker); results in job order. ``timings`` (if
    given) receives the wall seconds of the two phases. The workers' Triton caches are removed afterwards."""
    fp_fusion = fp_fusion or os.environ.get("TRITON_DEFAULT_FP_FUSION", "1")
    ctx = multiprocessing.get_context("spawn")
    processes = max(1, processes)
    with (
        tempfile.TemporaryDirectory(prefix="bsm-audit-cache-") as cache_root,
        ProcessPoolExecutor(
            processes, mp_context=ctx, initializer=_init_worker, initargs=(fp_fusion, cache_root)
        ) as pool,
    ):
        t0 = time.perf_counter()
        n = len(jobs)
        results = list(pool.map(compile_job, jobs, [str(out_dir)] * n, [keep_ir] * n))
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
    return results


# ----------------------------------------------------------------------------------------------- checks


def findings(result: BuildResult) -> list[tuple[str, str]]:
    """``(check, message)`` for every check the build fails (``CHECKS``); empty when it passes them all."""
    if result.error:
        return [("build", f"build failed: {result.error}")]
    arch, sass, out = ARCHS[result.job.cc], result.sass, []
    if (result.spill_stores or 0) > 0 or (result.spill_loads or 0) > 0:
        out.append(("spill", f"spills {result.spill_stores} B stores / {result.spill_loads} B loads"))
    if result.is_matmul and sass is not None:
        want = arch.mma if (arch.mma != "tcgen05" or result.tcgen05_ok) else None
        if want is not None and not sass.family_count(want):
            name = {"wgmma": "wgmma (HGMMA)", "tcgen05": "tcgen05 MMA (UTC*MMA)", "mma.sync": "mma.sync (HMMA)"}
            out.append(("mma", f"sm_{arch.cc} matmul without {name[want]}"))
        elif want is None and not sass.mma:
            out.append(("mma", f"sm_{arch.cc} matmul without MMA"))
    for code in result.ptxas_codes:
        if code in PTXAS_CODES:
            out.append((PTXAS_CODES[code], f"ptxas {code}: wgmma serialised"))
    if result.expect_pipelined and sass is not None:
        for lp in sass.loops:
            where = f"MMA loop {lp.start:#x}-{lp.end:#x}"
            if lp.cp_async_wait_zero:
                out.append(("pipeline", f"{where} waits cp.async to zero (DEPBAR.LE SB0, 0x0) every iteration"))
            if lp.wgmma_wait_zero:
                out.append(
                    ("pipeline", f"{where} waits wgmma to zero (gsb0, 0x0) after {lp.serialised} of {lp.mma} MMA")
                )
            if not lp.asynchronous and result.job.variant == "aligned" and (result.num_stages or 1) > 1:
                out.append(("pipeline", f"{where} has no async load (LDGSTS / UTMALDG): not pipelined"))
    if result.shared is not None and result.shared > arch.smem_limit:
        out.append(("smem", f"shared memory {result.shared} B > sm_{arch.cc} limit {arch.smem_limit} B"))
    return out


def reported_only(check: str, cc: int, report_only: frozenset[str] | set[str]) -> bool:
    """Whether ``check`` is report-only on ``sm_<cc>``: ``report_only`` names it (``"spill"``), or names it for
    that architecture (``"spill@120"``)."""
    return check in report_only or f"{check}@{cc}" in report_only


def problems(result: BuildResult, report_only: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Why a build fails the audit (empty when it passes): the messages of its findings outside ``report_only``
    (check names, or ``check@cc`` for one architecture)."""
    return [msg for check, msg in findings(result) if not reported_only(check, result.job.cc, report_only)]


# ----------------------------------------------------------------------------------------------- report


def _buffers_cell(buffers: tuple[int, ...] | None) -> str | None:
    """``"3"``, or ``"1-2"`` when the allocations differ; ``"-"`` for none."""
    if buffers is None:
        return None
    return "-".join(str(b) for b in dict.fromkeys((buffers[0], buffers[-1]))) if buffers else "-"


def _mma_cell(s: SassSummary | None) -> str | None:
    if s is None:
        return None
    return ", ".join(f"{op} {n}" for op, n in s.mma.items()) or "-"


def _loop_cells(s: SassSummary | None) -> tuple[str | None, str | None]:
    """(instructions per MMA, waits) of the main loop: ``"SB0 2, gsb0 1, mbar"`` (the smallest count of each)."""
    if s is None:
        return None, None
    lp = s.main_loop
    if lp is None:
        return "-", "-"
    waits = []
    if lp.cp_async_waits:
        waits.append(f"SB0 {min(lp.cp_async_waits)}")
    if lp.wgmma_waits:
        waits.append(f"gsb0 {min(lp.wgmma_waits)}")
    if lp.mbarrier_waits:
        waits.append("mbar")
    return f"{lp.per_mma:.0f}", ", ".join(waits) or "-"


def _tma_cell(s: SassSummary | None) -> str | None:
    if s is None:
        return None
    return "+".join(k for k, n in (("ld", s.tma_loads), ("st", s.tma_stores)) if n) or "-"


def format_table(results: list[BuildResult], report_only: frozenset[str] | set[str] = frozenset()) -> str:
    """Markdown table, one row per kernel configuration and architecture. Findings of ``report_only`` checks are
    listed with a ``(report-only)`` mark."""
    header = (
        "| module | config | variant | sm | regs | spill st/ld B | stack B | smem B | buffers | MMA | loop instr/MMA "
        "| loop waits | TMA | LD128 | ptxas | compile s | status |"
    )
    lines = [header, "|" + "---|" * 17]
    for r in results:
        marks = [
            f"{msg} (report-only)" if reported_only(check, r.job.cc, report_only) else msg for check, msg in findings(r)
        ]
        per_mma, waits = _loop_cells(r.sass)
        cells = [
            r.job.module.rsplit(".", 1)[-1],
            r.job.name,
            r.job.variant,
            f"sm_{r.job.cc}",
            r.registers,
            f"{r.spill_stores}/{r.spill_loads}" if r.spill_stores is not None else None,
            r.stack,
            r.shared,
            _buffers_cell(r.buffers),
            _mma_cell(r.sass),
            per_mma,
            waits,
            _tma_cell(r.sass),
            r.ld128,
            ", ".join(r.ptxas_codes) or ("-" if r.error is None else None),
            f"{r.seconds:.1f}",
            "; ".join(marks) or "ok",
        ]
        lines.append("| " + " | ".join("n/a" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


def format_checks(results: list[BuildResult], report_only: frozenset[str] | set[str] = frozenset()) -> str:
    """Markdown table: per check, the builds it flags (and how many per architecture) and whether it is enforced."""
    lines = ["| check | builds flagged | per arch | enforced |", "|---|---|---|---|"]
    for check in CHECKS:
        flagged = [r for r in results if any(c == check for c, _ in findings(r))]
        per_arch = ", ".join(f"sm_{cc} {n}" for cc in ARCHS if (n := sum(1 for r in flagged if r.job.cc == cc)))
        relaxed = [f"sm_{cc}" for cc in ARCHS if f"{check}@{cc}" in report_only]
        enforced = (
            "no (report-only)" if check in report_only else f"yes, not on {', '.join(relaxed)}" if relaxed else "yes"
        )
        lines.append(f"| {check} | {len(flagged)} | {per_arch or '-'} | {enforced} |")
    return "\n".join(lines)


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
    p = argparse.ArgumentParser(prog="python -m bench.audit", description=__doc__.split("\n\n")[0])
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
    print(
        f"\n{len(results)} builds, {len(failed)} failing, {len(reported)} with report-only findings, "
        f"{time.perf_counter() - start:.0f} s (compile {timings['compile']:.0f} s, disassembly "
        f"{timings['disassemble']:.0f} s; TRITON_DEFAULT_FP_FUSION={os.environ['TRITON_DEFAULT_FP_FUSION']})"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
