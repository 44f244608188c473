"""The audit's verdicts and tables: the checks a build can fail (``CHECKS``, ``findings``), which of them only
report (``--report-only``), and the Markdown tables ``python -m bench.audit`` prints."""

from __future__ import annotations

from .jobs import BuildResult
from .sass import ARCHS, SassSummary

__all__ = [
    "CHECKS",
    "PTXAS_CODES",
    "SM_LIMITS",
    "FMA_PER_CLOCK",
    "FP8_MMA",
    "ISSUE_LIMIT",
    "PER_FLOP",
    "PER_FLOP_ARCHS",
    "cta_mma_work",
    "ctas_per_sm",
    "findings",
    "format_checks",
    "format_table",
    "issue_ratio",
    "operand_intensity",
    "problems",
    "reported_only",
    "waiver",
    "why_not_enforced",
]

CHECKS = {
    "build": "the build (or its disassembly) failed",
    "spill": "ptxas spill stores / loads (or local memory) > 0",
    "mma": "a matmul spec (is_matmul) without the architecture's MMA: HGMMA on sm_90, UTC*MMA on sm_100 "
    "(unless tcgen05_ok=False: any MMA), HMMA on sm_80 / sm_120",
    "fp8mma": "an FP8 matmul spec (E4M3 operands: CompileSpec.fp8) whose main loop (without one: the function) "
    "lacks the architecture's E4M3 MMA (FP8_MMA): QGMMA on sm_90, UTCQMMA on sm_100 (plain, or block-scaled with "
    "tensor-memory scale operands: tl.dot_scaled's tcgen05.mma kind::mxf8f6f4.block_scale)",
    "c7515": "ptxas info C7515: wgmma.mma_async instructions are serialized",
    "pipeline": "an MMA loop waits to zero every iteration: DEPBAR.LE SB0, 0x0 with LDGSTS in the loop (cp.async), "
    "or WARPGROUP.DEPBAR.LE gsb0, 0x0 with async loads in it (wgmma); or, aligned and num_stages > 1, it has no async "
    "load (LDGSTS / UTMALDG) at all; skipped for expect_pipelined=False",
    "smem": "shared memory above the architecture's per-block limit",
    "issue": "per-FLOP (PER_FLOP_ARCHS): issue ratio = (warps / 4 x real main-loop instructions) / (sum of the loop's "
    "MMA M*N*K over the CTA / the SM's dense FMAs per clock, FMA_PER_CLOCK) above ISSUE_LIMIT; real = every SASS "
    "instruction of the loop body but NOP and never-executed @!PT fillers; M*N*K per issuing unit: HGMMA.MxNxK per "
    "warpgroup, HMMA.168K (m16 n8 kK) per warp, tcgen05 per CTA (M, N from its instruction descriptor, K = 32 bytes)",
    "intensity": "per-FLOP: operand intensity = the main loop's MMA FLOPs (2 M*N*K over the CTA) / the bytes of its "
    "distinct operand tiles (CompileSpec.operand_bytes) below CompileSpec.min_intensity (64; 48 for the backward "
    "epilogue; small-M tiles exempt)",
    "occupancy": "per-FLOP: CTAs per SM (registers rounded up to 8, shared memory + 1 KB, threads, CTA limit) below 2, "
    "unless the kernel is persistent (CompileSpec.persistent); a persistent one's below the programs per SM its "
    "launcher starts (CompileSpec.programs_per_sm)",
}

# The per-FLOP checks: they apply to the aligned builds of the configs the launchers pick at large shapes
# (CompileSpec.per_flop), are enforced on these architectures and reported on the others.
PER_FLOP = ("issue", "intensity", "occupancy")
PER_FLOP_ARCHS = (90, 100)
ISSUE_LIMIT = 0.75
MIN_CTAS = 2

# Dense tensor-core FMAs per SM per clock, by MMA operand kind (sass.MMA_KINDS): the vendor's dense TFLOP/s
# / (2 x SMs x the boost clock of that figure).
FMA_PER_CLOCK = {
    80: {"16": 1024, "tf32": 512, "8": 2048},  # A100 SXM: 312 / 156 / 624 (int8) TFLOP/s, 108 SMs, 1.41 GHz
    90: {"16": 2048, "tf32": 1024, "8": 4096},  # H100 SXM: 989 / 495 / 1979 (fp8), 132 SMs, 1.83 GHz
    100: {"16": 4096, "tf32": 2048, "8": 8192},  # B200: 2250 / 1125 / 4500 (fp8), 148 SMs, 1.86 GHz
    120: {"16": 512, "tf32": 128, "8": 1024},  # RTX 5090: 419 / 105 / 838 (fp8), 170 SMs, 2.41 GHz (fp16 accumulate)
}

# The E4M3 MMA an FP8 main loop must issue (the fp8mma check), by architecture: the SASS mnemonic of wgmma's
# ``.kind::f8f6f4`` E4M3 form on sm_90 (``QGMMA.64xNx32.F32.E4M3.E4M3``) and of tcgen05's ``kind::f8f6f4`` and
# ``kind::mxf8f6f4.block_scale`` forms on sm_100 (both ``UTCQMMA``; the block-scaled one takes two more tensor-memory
# operands, the scale factors: ``UTCQMMA gdesc[..], gdesc[..], tmem[D], tmem[SFA], idesc[..], tmem[SFB]``).
FP8_MMA = {90: "QGMMA", 100: "UTCQMMA"}

# ptxas notes ("(Cxxxx) Potential Performance Loss: ...") that fail a check
PTXAS_CODES = {"C7515": "c7515"}


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
    fp8_mma = FP8_MMA.get(arch.cc)
    if result.fp8 and result.is_matmul and sass is not None and fp8_mma is not None:
        lp = sass.main_loop  # no MMA loop (one K step, unrolled): the function's MMAs
        found = lp.mma_ops if lp is not None else tuple(sass.mma)
        if fp8_mma not in found:
            where = "main loop" if lp is not None else "matmul (no MMA loop)"
            out.append(("fp8mma", f"sm_{arch.cc} FP8 {where} without {fp8_mma}: {', '.join(found) or 'no MMA'}"))
    for code in result.ptxas_codes:
        if code in PTXAS_CODES:
            out.append((PTXAS_CODES[code], f"ptxas {code}: wgmma serialised"))
    if result.expect_pipelined and sass is not None:
        for lp in sass.inner_loops:
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
    if result.per_flop and result.job.variant == "aligned":
        out += _per_flop_findings(result)
    return out


def _per_flop_findings(result: BuildResult) -> list[tuple[str, str]]:
    out = []
    lp = None if result.sass is None else result.sass.main_loop
    if lp is not None:  # no MMA loop (one K step, unrolled): no loop to be issue-bound
        ratio = issue_ratio(result)
        if ratio is None:
            out.append(("issue", "issue ratio unknown: an MMA shape or operand kind of the main loop is unreadable"))
        elif ratio > ISSUE_LIMIT:
            work, rate = cta_mma_work(result), FMA_PER_CLOCK[result.job.cc][lp.mma_kind]
            out.append(
                ("issue", f"issue ratio {ratio:.2f} > {ISSUE_LIMIT}: {result.num_warps} warps x "
                 f"{lp.real_instructions} instructions / 4 per {work} FMA at {rate} / clock")
            )  # fmt: skip
        intensity = operand_intensity(result)
        if result.min_intensity is not None and intensity is not None and intensity < result.min_intensity:
            out.append(
                ("intensity", f"operand intensity {intensity:.1f} FLOP/B < {result.min_intensity:g}: "
                 f"{2 * cta_mma_work(result)} FLOP per {result.operand_bytes} B of operand tiles")
            )  # fmt: skip
    ctas = ctas_per_sm(result)
    if ctas is not None and ctas < MIN_CTAS and not result.persistent:
        out.append(("occupancy", f"{ctas} CTA/SM < {MIN_CTAS} (registers {result.registers}, shared {result.shared} B, "
                                 f"{result.num_warps} warps) and not persistent"))  # fmt: skip
    elif ctas is not None and result.persistent and ctas < result.programs_per_sm:
        out.append(("occupancy", f"{ctas} CTA/SM < the {result.programs_per_sm} persistent programs per SM its "
                                 f"launcher starts (registers {result.registers}, shared {result.shared} B): they "
                                 "run in waves"))  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------- per FLOP

# the MMA instructions' issuing unit (sass.mma_shape) in warps: a warp, a warpgroup, the whole CTA
_ISSUING_WARPS = {"mma.sync": 1, "wgmma": 4, "tcgen05": None}


def cta_mma_work(result: BuildResult) -> int | None:
    """Σ M·N·K of one main-loop iteration over the CTA: each warp issues the loop's mma.sync for itself, each
    warpgroup its wgmma, one thread the CTA's tcgen05 MMA. None when unknown (no loop, unreadable shapes)."""
    lp = None if result.sass is None else result.sass.main_loop
    if lp is None or lp.mma_work is None or not result.num_warps:
        return None
    return sum(
        work * (1 if _ISSUING_WARPS[fam] is None else result.num_warps // _ISSUING_WARPS[fam])
        for fam, work in lp.mma_work.items()
    )


def issue_ratio(result: BuildResult) -> float | None:
    """Clocks the SM's 4 schedulers spend issuing one main-loop iteration (``warps / 4 ×`` its real instructions)
    over the clocks its MMAs take at the architecture's dense rate (``FMA_PER_CLOCK``); above 1 the loop cannot
    keep the tensor cores busy. None when unknown."""
    work = cta_mma_work(result)
    lp = result.sass.main_loop if work else None
    if lp is None or lp.mma_kind is None:
        return None
    return (result.num_warps / 4 * lp.real_instructions) / (work / FMA_PER_CLOCK[result.job.cc][lp.mma_kind])


def operand_intensity(result: BuildResult) -> float | None:
    """MMA FLOPs of one main-loop iteration per byte of its distinct operand tiles (``operand_bytes``); None when
    unknown."""
    work = cta_mma_work(result)
    if not work or not result.operand_bytes:
        return None
    return 2 * work / result.operand_bytes


def reported_only(check: str, cc: int, report_only: frozenset[str] | set[str]) -> bool:
    """Whether ``check`` is report-only on ``sm_<cc>``: ``report_only`` names it (``"spill"``), or names it for
    that architecture (``"spill@120"``)."""
    return check in report_only or f"{check}@{cc}" in report_only


def why_not_enforced(result: BuildResult, check: str, report_only: frozenset[str] | set[str]) -> str | None:
    """Why ``check`` only reports on this build (None: enforced): ``"--report-only"``; a per-FLOP check outside
    ``PER_FLOP_ARCHS``; or the build's spec waives it (``CompileSpec.waivers``: the check, or ``check@cc``, and the
    reason)."""
    cc = result.job.cc
    if reported_only(check, cc, report_only):
        return "--report-only"
    if check in PER_FLOP and cc not in PER_FLOP_ARCHS:
        return f"per-FLOP checks enforced on {', '.join(f'sm_{a}' for a in PER_FLOP_ARCHS)} only"
    return waiver(result, check)


def waiver(result: BuildResult, check: str) -> str | None:
    """The reason the build's spec gives for reporting ``check`` only (``CompileSpec.waivers``), or None."""
    return next((why for name, why in result.waivers if name in (check, f"{check}@{result.job.cc}")), None)


def problems(result: BuildResult, report_only: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Why a build fails the audit (empty when it passes): the messages of its findings that are enforced (outside
    ``report_only``, check names or ``check@cc`` for one architecture; see ``why_not_enforced``)."""
    return [msg for check, msg in findings(result) if why_not_enforced(result, check, report_only) is None]


# ----------------------------------------------------------------------------------------------- occupancy

# Per-SM resources (CUDA programming guide, compute capabilities table): registers, shared memory, threads, CTAs.
SM_LIMITS = {
    80: dict(registers=65536, shared=167936, threads=2048, ctas=32),
    90: dict(registers=65536, shared=233472, threads=2048, ctas=32),
    100: dict(registers=65536, shared=233472, threads=2048, ctas=32),
    120: dict(registers=65536, shared=102400, threads=1536, ctas=24),
}
_CTA_RESERVED_SHARED = 1024  # shared memory the runtime reserves per CTA (sm_80 and newer)


def ctas_per_sm(result: BuildResult) -> int | None:
    """CTAs of this build one SM holds at once: the fewest allowed by registers (per thread, rounded up to 8),
    shared memory (plus the 1 KB the runtime reserves per CTA), threads and the CTA limit; None when unknown.
    The ``occupancy`` check fails a per-FLOP build below 2 unless the kernel is persistent, a persistent one below
    its ``programs_per_sm``."""
    if result.registers is None or result.shared is None or not result.num_warps:
        return None
    limits, threads = SM_LIMITS[result.job.cc], result.num_warps * 32
    registers = -(-max(result.registers, 1) // 8) * 8
    return min(
        limits["registers"] // (registers * threads),
        limits["shared"] // (result.shared + _CTA_RESERVED_SHARED),
        limits["threads"] // threads,
        limits["ctas"],
    )


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


def _compile_cell(r: BuildResult) -> str:
    """The build's compile seconds, or the build it reuses (``BuildResult.shares``: the same compile inputs)."""
    if r.shares is None:
        return f"{r.seconds:.1f}"
    variant = "" if r.shares.variant == r.job.variant else f" {r.shares.variant}"
    return f"= {r.shares.name}{variant}"


def format_table(results: list[BuildResult], report_only: frozenset[str] | set[str] = frozenset()) -> str:
    """Markdown table, one row per kernel configuration and architecture. Findings of ``report_only`` checks are
    listed with a ``(report-only)`` mark."""
    header = (
        "| module | config | variant | sm | serves | regs | spill st/ld B | stack B | smem B | CTA/SM | buffers | MMA "
        "| loop instr/MMA | issue | FLOP/B | loop waits | TMA | LD128 | ptxas | compile s | status |"
    )
    lines = [header, "|" + "---|" * 21]
    for r in results:
        marks = []
        for check, msg in findings(r):
            why = why_not_enforced(r, check, report_only)
            marks.append(msg if why is None else f"{msg} (report-only)" if why == "--report-only" else
                         f"{msg} (report-only: {why})")  # fmt: skip
        per_mma, waits = _loop_cells(r.sass)
        ratio, intensity = issue_ratio(r), operand_intensity(r)
        cells = [
            r.job.module.rsplit(".", 1)[-1],
            r.job.name,
            r.job.variant,
            f"sm_{r.job.cc}",
            r.serves or "-",
            r.registers,
            f"{r.spill_stores}/{r.spill_loads}" if r.spill_stores is not None else None,
            r.stack,
            r.shared,
            ctas_per_sm(r),
            _buffers_cell(r.buffers),
            _mma_cell(r.sass),
            per_mma,
            "-" if ratio is None else f"{ratio:.2f}",
            "-" if intensity is None else f"{intensity:.0f}",
            waits,
            _tma_cell(r.sass),
            r.ld128,
            ", ".join(r.ptxas_codes) or ("-" if r.error is None else None),
            _compile_cell(r),
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
        if check in PER_FLOP:
            relaxed += [f"sm_{cc}" for cc in ARCHS if cc not in PER_FLOP_ARCHS and f"sm_{cc}" not in relaxed]
        waived = sum(1 for r in flagged if waiver(r, check) is not None)
        enforced = (
            "no (report-only)" if check in report_only else f"yes, not on {', '.join(relaxed)}" if relaxed else "yes"
        )
        if waived:
            enforced += f" ({waived} builds waived by their spec)"
        lines.append(f"| {check} | {len(flagged)} | {per_arch or '-'} | {enforced} |")
    return "\n".join(lines)
