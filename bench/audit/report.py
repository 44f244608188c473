"""The audit's verdicts and tables: the checks a build can fail (``CHECKS``, ``findings``), which of them only
report (``--report-only``), and the Markdown tables ``python -m bench.audit`` prints."""

from __future__ import annotations

from .jobs import BuildResult
from .sass import ARCHS, SassSummary

__all__ = [
    "CHECKS",
    "PTXAS_CODES",
    "SM_LIMITS",
    "ctas_per_sm",
    "findings",
    "format_checks",
    "format_table",
    "problems",
    "reported_only",
]

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
    return out


def reported_only(check: str, cc: int, report_only: frozenset[str] | set[str]) -> bool:
    """Whether ``check`` is report-only on ``sm_<cc>``: ``report_only`` names it (``"spill"``), or names it for
    that architecture (``"spill@120"``)."""
    return check in report_only or f"{check}@{cc}" in report_only


def problems(result: BuildResult, report_only: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Why a build fails the audit (empty when it passes): the messages of its findings outside ``report_only``
    (check names, or ``check@cc`` for one architecture)."""
    return [msg for check, msg in findings(result) if not reported_only(check, result.job.cc, report_only)]


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
    Report-only for now (issue 16: failing below 2 unless the kernel is persistent)."""
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


def format_table(results: list[BuildResult], report_only: frozenset[str] | set[str] = frozenset()) -> str:
    """Markdown table, one row per kernel configuration and architecture. Findings of ``report_only`` checks are
    listed with a ``(report-only)`` mark."""
    header = (
        "| module | config | variant | sm | regs | spill st/ld B | stack B | smem B | CTA/SM | buffers | MMA "
        "| loop instr/MMA | loop waits | TMA | LD128 | ptxas | compile s | status |"
    )
    lines = [header, "|" + "---|" * 18]
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
            ctas_per_sm(r),
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
