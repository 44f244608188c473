"""Reading what the compiler produced: ptxas's ``-v`` log (registers, spills, the C7515 note),
``cuobjdump --dump-resource-usage``, the TTGIR's pipelined shared buffers, and the SASS (``nvdisasm`` /
``cuobjdump --dump-sass``): MMA families, loops found from their backward ``BRA``, the waits inside them.
Also the architectures the audit targets (``ARCHS``) and where the CUDA binary tools are (``_tool``)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ARCHS",
    "CAPABILITIES",
    "MMA_FAMILIES",
    "MMA_KINDS",
    "Arch",
    "Instr",
    "LoopStats",
    "SassSummary",
    "analyze_sass",
    "disassemble",
    "find_loops",
    "mma_family",
    "mma_shape",
    "parse_ptxas_log",
    "parse_resource_usage",
    "parse_sass",
    "ttgir_buffers",
]


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


# SASS mnemonics (before the first '.') of the MMA families, most specific first.
MMA_FAMILIES = (
    ("tcgen05", re.compile(r"UTC[A-Z]*MMA")),  # UTCHMMA (f16/bf16/tf32), UTCIMMA, UTCQMMA, UTCOMMA
    ("wgmma", re.compile(r"[A-Z]GMMA")),  # HGMMA (f16/bf16/tf32), IGMMA, QGMMA, BGMMA
    ("mma.sync", re.compile(r"[A-Z]MMA")),  # HMMA, IMMA, QMMA, DMMA, ...
)


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
    real_instructions: int = 0  # less NOP and never-executed ``@!PT`` fillers
    mma_work: dict[str, int] | None = None  # MMA family -> sum of M·N·K per issuing unit; None: a shape unknown
    mma_kind: str | None = None  # operand kind of the MMAs (``MMA_KINDS``); None: unknown or mixed
    mma_ops: tuple[str, ...] = ()  # the MMA mnemonics in the loop (``QGMMA``, ``UTCQMMA``, ...), in order of appearance

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
    def inner_loops(self) -> tuple[LoopStats, ...]:
        """The loops holding no other of these loops: K loops. The tile loop of a persistent kernel holds its K loop
        and the pipeline's peeled MMAs, and drains the pipeline once per tile (a wait to zero that is no stall)."""
        ls = self.loops
        return tuple(lp for lp in ls if not any(o is not lp and lp.start <= o.start <= o.end <= lp.end for o in ls))

    @property
    def main_loop(self) -> LoopStats | None:
        """The inner loop with the most MMA instructions (the K loop)."""
        return max(self.inner_loops, key=lambda lp: (lp.mma, lp.instructions), default=None)


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


MMA_KINDS = ("16", "tf32", "8")  # 16-bit (f16 / bf16), tf32, 8-bit (fp8 / int8) operands: the rate classes

_WGMMA_SHAPE = re.compile(r"\.(\d+)x(\d+)x(\d+)\b")  # HGMMA.64x128x16.F32.BF16
_MMA_SYNC_SHAPE = re.compile(r"\.168(\d+)\b")  # HMMA.16816.F32.BF16 (m16 n8 k16), HMMA.1684.F32.TF32
_IDESC = re.compile(r"idesc\[(UR\d+)\]")
_UMOV_IMM = re.compile(r"(UR\d+)\s*,\s*0x([0-9a-f]+)$")


def _operand_kind(op: str) -> str | None:
    """``MMA_KINDS`` entry of an HGMMA / HMMA mnemonic's operand type (``.BF16``, ``.F16``, ``.TF32``, ``.E4M3``);
    an ``HMMA`` with only ``.F32`` (or ``.F16``) reads f16."""
    mods = set(op.split(".")[1:])
    if "TF32" in mods:
        return "tf32"
    if mods & {"E4M3", "E5M2", "S8", "U8"} or op.startswith(("QGMMA", "IGMMA", "IMMA", "QMMA")):
        return "8"
    return "16"


def mma_shape(instrs: list[Instr], k: int) -> tuple[int, int, int, str] | None:
    """``(M, N, K, kind)`` of the MMA instruction ``instrs[k]`` as one issuing unit runs it: a warpgroup for wgmma
    (``HGMMA.64x128x16``), a warp for mma.sync (``HMMA.16816``: m16 n8 k16), the CTA for tcgen05, whose shape is in
    its instruction descriptor (``idesc[URn]``, set by the last ``UMOV URn, imm`` before it: N / 8 in bits 17-22,
    M / 16 in bits 24-28, the A type in bits 7-9 (2: tf32); K is 32 bytes of operand). None when unreadable."""
    ins = instrs[k]
    family = mma_family(ins.op)
    if family == "wgmma":
        m = _WGMMA_SHAPE.search(ins.op)
        return (int(m.group(1)), int(m.group(2)), int(m.group(3)), _operand_kind(ins.op)) if m else None
    if family == "mma.sync":
        m = _MMA_SYNC_SHAPE.search(ins.op)
        return (16, 8, int(m.group(1)), _operand_kind(ins.op)) if m else None
    if family == "tcgen05":
        reg = _IDESC.search(ins.args)
        if reg is None:
            return None
        for prev in reversed(instrs[:k]):
            m = _UMOV_IMM.match(prev.args) if prev.op == "UMOV" else None
            if m and m.group(1) == reg.group(1):
                d = int(m.group(2), 16)
                kind = "8" if ins.base in ("UTCQMMA", "UTCIMMA") else "tf32" if (d >> 7) & 7 == 2 else "16"
                return (((d >> 24) & 0x1F) << 4, ((d >> 17) & 0x3F) << 3, {"16": 16, "tf32": 8, "8": 32}[kind], kind)
        return None
    return None


def _real(ins: Instr) -> bool:
    """An instruction the warp really issues: not a ``NOP``, not a never-executed ``@!PT`` filler."""
    return ins.base != "NOP" and ins.pred != "@!PT"


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
    work: dict[str, int] | None = {}
    kinds = set()
    for k in idx:
        family = mma_family(instrs[k].op)
        if family is None:
            continue
        shape = mma_shape(instrs, k)
        if shape is None or work is None:
            work = None
            continue
        m, n, kk, kind = shape
        work[family] = work.get(family, 0) + m * n * kk
        kinds.add(kind)
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
        real_instructions=sum(1 for i in body if _real(i)),
        mma_work=work,
        mma_kind=next(iter(kinds)) if len(kinds) == 1 else None,
        mma_ops=tuple(dict.fromkeys(i.base for i in body if mma_family(i.op))),
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
