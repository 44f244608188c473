"""The compile audit (the ``bench.audit`` package) on tiny kernels defined here: this module is itself the kernel
module the audit imports (``compile_specs()`` below), so nothing depends on the library's kernels existing. The
SASS / ptxas / TTGIR parsers are tested on handcrafted snippets; the checks on real builds for every architecture,
with a positive control (a well-pipelined matmul), a negative one (the dsd_act pattern: an index load and an
activation in the K loop) and a TMA loop."""

from __future__ import annotations

import itertools
import os
import subprocess
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import triton
import triton.language as tl

from bench.audit import __main__ as audit_main
from bench.audit import jobs as audit_jobs
from bench.audit import report as audit_report
from bench.audit import sass as audit_sass
from blocksparse_moe.kernels._common import DOTS_IEEE
from blocksparse_moe.kernels.specs import CompileSpec

ARCHS = tuple(audit_sass.ARCHS)  # 80, 90, 100, 120


@triton.jit
def _tiny_mm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # a [M, K], b [K, N], c [M, N], all row-major
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None].to(tl.int64) * K + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K))
        b = tl.load(b_ptr + kk[:, None].to(tl.int64) * N + rn[None, :], mask=(kk[:, None] < K) & (rn[None, :] < N))
        acc += tl.dot(a, b)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pipelined_mm_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bk, stride_cm, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr
):
    # a [M, K], b [K, N], c [M, N], unit column strides; the positive control: nothing in the K loop but pointer
    # increments, masked loads and the dot
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :]
    b_ptrs = b_ptr + rk[:, None].to(tl.int64) * stride_bk + rn[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        a = tl.load(a_ptrs, mask=rk[None, :] < K - k * BK, other=0.0)
        b = tl.load(b_ptrs, mask=rk[:, None] < K - k * BK, other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BK
        b_ptrs += BK * stride_bk
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _serialised_mm_kernel(
    a_ptr, g_ptr, b_ptr, c_ptr, steps_ptr, M, N, stride_am, stride_bk, stride_cm, S,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    # a, g [M, *], b [*, N], c [M, N], steps [S] (K-block of each step); the negative control, dsd_act's pattern:
    # the step's address comes from a load in the loop, and silu(a) * g is computed on the dot operand
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for s in range(0, S):
        kk = tl.load(steps_ptr + s) * BK + rk
        a = tl.load(a_ptr + rm[:, None].to(tl.int64) * stride_am + kk[None, :]).to(tl.float32)
        g = tl.load(g_ptr + rm[:, None].to(tl.int64) * stride_am + kk[None, :]).to(tl.float32)
        b = tl.load(b_ptr + kk[:, None].to(tl.int64) * stride_bk + rn[None, :])
        acc = tl.dot((a * tl.sigmoid(a) * g).to(b.dtype), b, acc)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tma_mm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # a [M, K], b [K, N], c [M, N], row-major, through tensor descriptors (TMA on sm_90 / sm_100)
    a_d = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    b_d = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[N, 1], block_shape=[BK, BN])
    c_d = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        acc = tl.dot(a_d.load([tl.program_id(0) * BM, k * BK]), b_d.load([k * BK, tl.program_id(1) * BN]), acc)
    c_d.store([tl.program_id(0) * BM, tl.program_id(1) * BN], acc.to(c_ptr.dtype.element_ty))


@triton.jit
def _tiny_copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    # x [n] -> y [n]
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


MM_SIG = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32"}
STRIDED_SIG = {**MM_SIG, "stride_am": "i32", "stride_bk": "i32", "stride_cm": "i32"}
SERIAL_SIG = {"a_ptr": "*bf16", "g_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "steps_ptr": "*i32",
              "M": "i32", "N": "i32", "stride_am": "i32", "stride_bk": "i32", "stride_cm": "i32",
              "S": "i32"}  # fmt: skip
COPY_SIG = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"}
BIG = dict(BM=128, BN=128, BK=64)  # the positive controls' tile: 128x128x64 bf16, 8 warps, 3 stages
SERIAL = dict(BM=128, BN=128, BK=32)  # the negative control's: dsd_act's 16-bit B = 128 tile (C7515 at K = 32)


_SEEN_INTERPRET: list[str | None] = []  # TRITON_INTERPRET at each compile_specs() call


def compile_specs() -> list[CompileSpec]:
    _SEEN_INTERPRET.append(os.environ.get("TRITON_INTERPRET"))
    mm = dict(BM=64, BN=64, BK=32)
    strides = ("stride_am", "stride_bk", "stride_cm")
    return [
        # N and K are the row strides: aligned builds vectorise the loads and pipeline the K loop
        CompileSpec("mm[bf16,64x64x32]", _tiny_mm_kernel, MM_SIG, mm, num_warps=4, aligned=("N", "K")),
        # 512 fp32 over 128 threads: 4 per thread, one 128-bit load when x and n allow it
        CompileSpec("copy[fp32]", _tiny_copy_kernel, COPY_SIG, dict(BLOCK=512), is_matmul=False, aligned=("n",)),
        # a "matmul" without tl.dot: the audit must flag it on every architecture; no aligned ints (pointers only)
        CompileSpec("copy-flagged[fp32]", _tiny_copy_kernel, COPY_SIG, dict(BLOCK=512), is_matmul=True),
        # a config a launcher picks only for aligned operands
        CompileSpec("copy-aligned-only[fp32]", _tiny_copy_kernel, COPY_SIG, dict(BLOCK=512), is_matmul=False,
                    aligned=("n",), variants=("aligned",)),
        # the controls (aligned: the pipelined build the GPU runs for realistic shapes)
        CompileSpec("pipelined[bf16,128x128x64]", _pipelined_mm_kernel, STRIDED_SIG, BIG, num_warps=8,
                    aligned=("N", "K", *strides), variants=("aligned",)),
        CompileSpec("serialised[bf16,128x128x32]", _serialised_mm_kernel, SERIAL_SIG, SERIAL, num_warps=8,
                    aligned=("N", *strides), variants=("aligned",)),
        CompileSpec("tma[bf16,128x128x64]", _tma_mm_kernel, MM_SIG, BIG, num_warps=8, aligned=("N", "K"),
                    variants=("aligned",)),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    jobs = audit_jobs.collect_jobs([__name__])
    out = tmp_path_factory.mktemp("audit")
    return {(r.job.name, r.job.variant, r.job.cc): r for r in audit_jobs.run_audit(jobs, out, processes=2)}


def _checks(r: audit_jobs.BuildResult) -> set[str]:
    return {check for check, _ in audit_report.findings(r)}


# ----------------------------------------------------------------------------------------------- SASS snippets
# Shapes of real listings (cuobjdump --dump-sass of Triton 3.9 builds), cut to the instructions the parsers read.

PROLOGUE = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;                              /* 0x00000a00ff017b82 */
        /*0010*/                   LDGSTS.E.BYPASS.128 [R47], desc[UR14][R26.64], P4 ;
        /*0020*/                   LDGDEPBAR ;
"""
EPILOGUE = """
        /*00c0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*00d0*/                   DEPBAR.LE SB0, 0x0 ;
        /*00e0*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*00f0*/                   EXIT ;
        /*0100*/                   BRA 0x100;
"""

# sm_90, cp.async + wgmma, pipelined: the loop waits for all but 1 copy group and all but 1 wgmma group; the
# waits to zero come after the loop (the drain)
GOOD_LOOP = (
    PROLOGUE
    + """
        /*0030*/                   DEPBAR.LE SB0, 0x1 ;                                /* 0x000080400000791a */
        /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0050*/                   WARPGROUP.ARRIVE ;
        /*0060*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspB, R24 ;
        /*0070*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspB, R24, gsb0 ;
        /*0080*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0090*/                   LDGSTS.E.BYPASS.128 [R115], desc[UR14][R96.64], P1 ;
        /*00a0*/                   LDGDEPBAR ;
        /*00b0*/               @P6 BRA 0x30 ;                                          /* 0xfffffff800186947 */
"""
    + EPILOGUE
)

# the same loop waiting for every copy each iteration (the index load of the step sits in the loop)
WAIT_ZERO_LOOP = GOOD_LOOP.replace("DEPBAR.LE SB0, 0x1 ;", "DEPBAR.LE SB0, 0x0 ;")

# wgmma serialised (ptxas C7515): each HGMMA commits its own group and is waited to zero at once
SERIALISED_LOOP = (
    PROLOGUE
    + """
        /*0030*/                   DEPBAR.LE SB0, 0x1 ;
        /*0040*/                   HGMMA.64x128x16.F32.BF16 R24, R88, gdesc[UR16].tnspB, R24, gsb0 ;
        /*0050*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0060*/                   MUFU.EX2 R3, R3 ;
        /*0070*/                   HGMMA.64x128x16.F32.BF16 R24, R88, gdesc[UR16].tnspB, R24, gsb0 ;
        /*0080*/                   FMUL R3, R3, R4 ;
        /*0090*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*00a0*/                   LDGSTS.E.BYPASS.128 [R21+0x4000], desc[UR32][R6.64], P2 ;
        /*00b0*/               @P2 BRA 0x30 ;
"""
    + EPILOGUE
)

# sm_90 TMA + mbarrier, persistent: the descriptor set-up waits SB0 to zero after UTMACMDFLUSH (before the loop);
# the data wait is an mbarrier phase check whose retry stub lies after EXIT and jumps back into the loop; the
# epilogue's TMA store (in the loop: the K steps are unrolled) waits SB0 to zero after UTMACMDFLUSH.
TMA_LOOP = """
        /*0000*/                   UTMACMDFLUSH ;
        /*0010*/               @P1 BRA 0x30 ;
        /*0020*/                   DEPBAR.LE SB0, 0x0 ;
        /*0030*/                   @UP2 UTMALDG.2D [UR8], [UR22] ;
        /*0040*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR16+0x18000], R5 ;
        /*0050*/              @!P0 BRA 0x120 ;
        /*0060*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR24].tnspB, R24, gsb0 ;
        /*0070*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0080*/                   @UP2 UTMALDG.2D [UR12], [UR22] ;
        /*0090*/                   @UP1 UTMASTG.2D [UR4], [UR10] ;
        /*00a0*/                   UTMACMDFLUSH ;
        /*00b0*/                   DEPBAR.LE SB0, 0x0 ;
        /*00c0*/               @P0 BRA 0x40 ;
        /*00d0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*00e0*/                   EXIT ;
        /*0120*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR16+0x18000], R5 ;
        /*0130*/              @!P0 BRA 0x120 ;
        /*0140*/                   BRA 0x60 ;
        /*0150*/                   BRA 0x150;
"""

# sm_100 persistent kernel: the tile loop (0x10-0xc0) holds the pipelined K loop (0x30-0x70), the pipeline's peeled
# MMAs (more than the K loop holds) and its drain, a wait to zero once per tile
PERSISTENT_LOOP = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDGSTS.E.BYPASS.128 [R21], desc[UR32][R6.64], P2 ;
        /*0020*/                   UTCHMMA gdesc[UR4], gdesc[UR14], tmem[UR9], tmem[UR34], idesc[UR35], !UPT ;
        /*0030*/                   LDGSTS.E.BYPASS.128 [R21+0x4000], desc[UR32][R6.64], P2 ;
        /*0040*/                   DEPBAR.LE SB0, 0x1 ;
        /*0050*/                   UTCHMMA gdesc[UR4], gdesc[UR14], tmem[UR9], tmem[UR34], idesc[UR35], UPT ;
        /*0060*/                   NOP ;
        /*0070*/               @P2 BRA 0x30 ;
        /*0080*/                   UTCHMMA gdesc[UR4], gdesc[UR14], tmem[UR9], tmem[UR34], idesc[UR35], UPT ;
        /*0090*/                   UTCHMMA gdesc[UR24], gdesc[UR26], tmem[UR9], tmem[UR34], idesc[UR35], UPT ;
        /*00a0*/                   DEPBAR.LE SB0, 0x0 ;
        /*00b0*/                   STG.E desc[UR4][R2.64], R0 ;
        /*00c0*/               @P3 BRA 0x10 ;
        /*00d0*/                   EXIT ;
"""

# sm_100: tcgen05 MMAs, no loop (one K step); the tensor-memory allocation retry loop has no MMA
NO_LOOP = """
        /*0000*/                   UTCATOMSWS.FIND_AND_SET.ALIGN UP0, UR4, UR7 ;
        /*0010*/                   BRA.U !UP0, 0x0 ;
        /*0020*/                   LDGSTS.E.BYPASS.128 [R47], desc[UR14][R26.64], P4 ;
        /*0030*/                   DEPBAR.LE SB0, 0x0 ;
        /*0040*/                   UTCHMMA gdesc[UR4], gdesc[UR14], tmem[UR9], tmem[UR34], idesc[UR35], !UPT ;
        /*0050*/                   UTCHMMA gdesc[UR24], gdesc[UR26], tmem[UR9], tmem[UR34], idesc[UR35], UPT ;
        /*0060*/                   UTCBAR [UR10], URZ ;
        /*0070*/                   EXIT ;
"""


def test_parse_sass_reads_instructions_and_branch_targets():
    instrs = audit_sass.parse_sass(GOOD_LOOP)
    assert len(instrs) == 3 + 9 + 5  # the encoding comments are not instructions
    bra = next(i for i in instrs if i.addr == 0xB0)
    assert (bra.pred, bra.op, bra.args, bra.target, bra.base) == ("@P6", "BRA", "0x30", 0x30, "BRA")
    hgmma = next(i for i in instrs if i.addr == 0x70)
    assert hgmma.op == "HGMMA.64x128x16.F32.BF16" and hgmma.args.endswith("gsb0") and hgmma.target is None
    # uniform-predicate branch: the target is the last hexadecimal operand; base shifts addresses and targets
    (u,) = audit_sass.parse_sass("        /*0190*/   BRA.U !UP0, 0x130 ;", base=0x100)
    assert (u.addr, u.pred, u.op, u.target) == (0x90, "", "BRA.U", 0x30)


def test_mma_families():
    assert audit_sass.mma_family("HGMMA.64x128x16.F32.BF16") == "wgmma"
    assert audit_sass.mma_family("QGMMA.64x64x32.F32.E4M3.E4M3") == "wgmma"
    assert audit_sass.mma_family("UTCHMMA") == "tcgen05" and audit_sass.mma_family("UTCQMMA.2CTA") == "tcgen05"
    assert (
        audit_sass.mma_family("HMMA.16816.F32.BF16") == "mma.sync"
        and audit_sass.mma_family("IMMA.16832.S8.S8") == "mma.sync"
    )
    # tcgen05 bookkeeping, wgmma fences and integer multiply-adds are not MMAs
    for op in ("UTCBAR", "UTCATOMSWS.AND", "WARPGROUP.ARRIVE", "IMAD.WIDE", "LDGSTS.E.BYPASS.128"):
        assert audit_sass.mma_family(op) is None, op


def test_good_loop_passes():
    s = audit_sass.analyze_sass(GOOD_LOOP)
    assert s.mma == {"HGMMA": 2} and s.ld128 == 2 and (s.tma_loads, s.tma_stores) == (0, 0)
    (lp,) = s.loops
    assert (lp.start, lp.end, lp.instructions, lp.mma, lp.ldgsts) == (0x30, 0xB0, 9, 2, 1)
    assert lp.per_mma == 4.5 and lp.cp_async_waits == (1,) and lp.wgmma_waits == (1,) and lp.serialised == 0
    assert not lp.cp_async_wait_zero and not lp.wgmma_wait_zero and s.main_loop is lp
    assert audit_report.findings(_synthetic(90, s)) == []


def test_wait_to_zero_loop_is_flagged():
    s = audit_sass.analyze_sass(WAIT_ZERO_LOOP)
    (lp,) = s.loops
    assert lp.cp_async_waits == (0,) and lp.cp_async_wait_zero and not lp.wgmma_wait_zero
    assert audit_report.findings(_synthetic(90, s)) == [
        ("pipeline", "MMA loop 0x30-0xb0 waits cp.async to zero (DEPBAR.LE SB0, 0x0) every iteration")
    ]
    # a spec that does not expect a pipelined loop is not flagged
    assert audit_report.findings(_synthetic(90, s, expect_pipelined=False)) == []


def test_serialised_wgmma_is_flagged():
    s = audit_sass.analyze_sass(SERIALISED_LOOP)
    (lp,) = s.loops
    assert lp.wgmma_waits == (0, 0) and lp.serialised == 2 and lp.wgmma_wait_zero and not lp.cp_async_wait_zero
    assert lp.per_mma == 4.5
    assert audit_report.findings(_synthetic(90, s)) == [
        ("pipeline", "MMA loop 0x30-0xb0 waits wgmma to zero (gsb0, 0x0) after 2 of 2 MMA")
    ]
    # a loop of synchronous loads (LDG -> STS, the unaligned builds) must wait so: reported, not flagged
    sync = audit_sass.analyze_sass(SERIALISED_LOOP.replace("LDGSTS.E.BYPASS.128 [R21+0x4000]", "STS.128 [R21+0x4000]"))
    assert sync.loops[0].wgmma_waits == (0, 0) and not sync.loops[0].asynchronous
    assert audit_report.findings(_synthetic(90, sync, variant="unaligned")) == []
    # ... but an aligned build (num_stages > 1) whose MMA loop has no async load at all is not pipelined
    assert audit_report.findings(_synthetic(90, sync)) == [
        ("pipeline", "MMA loop 0x30-0xb0 has no async load (LDGSTS / UTMALDG): not pipelined")
    ]


def test_tma_loop_passes():
    s = audit_sass.analyze_sass(TMA_LOOP)
    assert (s.tma_loads, s.tma_stores) == (2, 1)
    # the stub after EXIT (retry, then BRA back into the body) and the final BRA to itself are no loops
    assert audit_sass.find_loops(audit_sass.parse_sass(TMA_LOOP)) == [(0x40, 0xC0)]
    (lp,) = s.loops
    assert lp.tma_loads == 1 and lp.mbarrier_waits == 1 and lp.asynchronous
    assert lp.cp_async_waits == () and lp.wgmma_waits == (1,)  # the SB0 wait after UTMACMDFLUSH is the TMA store's
    assert audit_report.findings(_synthetic(90, s)) == []


def test_persistent_tile_loop_is_not_the_main_loop():
    # the K loop inside a persistent kernel's tile loop is the main loop; the tile loop's drain (a wait to zero once
    # per tile) is no pipeline failure (both were taken for the K loop's before)
    s = audit_sass.analyze_sass(PERSISTENT_LOOP)
    assert [(lp.start, lp.end, lp.mma) for lp in s.loops] == [(0x10, 0xC0, 4), (0x30, 0x70, 1)]
    assert [(lp.start, lp.end) for lp in s.inner_loops] == [(0x30, 0x70)]
    assert (s.main_loop.start, s.main_loop.cp_async_waits) == (0x30, (1,))
    assert audit_report.findings(_synthetic(100, s)) == []


def test_no_loop_passes():
    s = audit_sass.analyze_sass(NO_LOOP)
    assert s.mma == {"UTCHMMA": 2} and s.family_count("tcgen05") == 2 and s.family_count("wgmma") == 0
    assert audit_sass.find_loops(audit_sass.parse_sass(NO_LOOP)) == [(0x0, 0x10)]  # the allocation retry: no MMA in it
    assert s.loops == () and s.main_loop is None
    assert audit_report.findings(_synthetic(100, s)) == []


def test_mma_check_per_architecture():
    hmma = audit_sass.SassSummary(mma={"HMMA": 8})
    assert audit_report.findings(_synthetic(80, hmma)) == [] and audit_report.findings(_synthetic(120, hmma)) == []
    assert audit_report.findings(_synthetic(90, hmma)) == [("mma", "sm_90 matmul without wgmma (HGMMA)")]
    assert audit_report.findings(_synthetic(100, hmma)) == [("mma", "sm_100 matmul without tcgen05 MMA (UTC*MMA)")]
    # a tile the compiler keeps on mma.sync on sm_100 (tcgen05_ok=False) needs some MMA only
    assert audit_report.findings(_synthetic(100, hmma, tcgen05_ok=False)) == []
    none = audit_sass.SassSummary()
    assert audit_report.findings(_synthetic(100, none, tcgen05_ok=False)) == [("mma", "sm_100 matmul without MMA")]
    assert audit_report.findings(_synthetic(80, none)) == [("mma", "sm_80 matmul without mma.sync (HMMA)")]
    assert audit_report.findings(_synthetic(80, none, is_matmul=False)) == []


def test_fp8_main_loop_needs_the_e4m3_mma():
    # an FP8 spec (E4M3 operands) whose main loop runs QGMMA on sm_90 passes
    qgmma = ["QGMMA.64x128x32.F32.E4M3.E4M3 R88, gdesc[UR16], R88"] * 4
    ok = _synthetic(90, audit_sass.analyze_sass(_mma_loop(qgmma, 40)), fp8=True)
    assert ok.sass.main_loop.mma_ops == ("QGMMA",) and audit_report.findings(ok) == []
    # MX emulated on Hopper: bf16 HGMMA (the E4M3 tiles converted in registers) is flagged, and waivable per arch
    emulated = _synthetic(90, audit_sass.analyze_sass(_mma_loop(HGMMA_128, 40)), fp8=True)
    assert audit_report.findings(emulated) == [("fp8mma", "sm_90 FP8 main loop without QGMMA: HGMMA")]
    emulated.waivers = (("fp8mma@90", "Hopper has no block-scaled MMA"),)
    assert audit_report.problems(emulated) == []
    # the same loop in a 16-bit spec: not an FP8 build
    assert audit_report.findings(_synthetic(90, emulated.sass)) == []
    # sm_100: UTCQMMA, plain (E4M3 tl.dot) or block-scaled (tl.dot_scaled: tensor-memory scale factors), passes;
    # UTCHMMA (the operands converted to 16 bits) does not
    plain = "UTCQMMA gdesc[UR6], gdesc[UR12], tmem[UR22], tmem[UR40], idesc[UR41], UPT"
    scaled = "UTCQMMA gdesc[UR18], gdesc[UR20], tmem[UR12], tmem[UR8], idesc[UR9], tmem[UR16], UPT"
    for mma in (plain, scaled):
        assert audit_report.findings(_synthetic(100, audit_sass.analyze_sass(_mma_loop([mma] * 4, 40)), fp8=True)) == []
    utch = "UTCHMMA gdesc[UR8], gdesc[UR24], tmem[UR14], tmem[UR36], idesc[UR37], UPT"
    assert audit_report.findings(_synthetic(100, audit_sass.analyze_sass(_mma_loop([utch] * 4, 40)), fp8=True)) == [
        ("fp8mma", "sm_100 FP8 main loop without UTCQMMA: UTCHMMA")
    ]
    # no MMA loop (one K step): the function's MMAs; sm_80 / sm_120 have no such requirement (their mma.sync QMMA)
    assert audit_report.findings(_synthetic(100, audit_sass.analyze_sass(NO_LOOP), fp8=True)) == [
        ("fp8mma", "sm_100 FP8 matmul (no MMA loop) without UTCQMMA: UTCHMMA")
    ]
    assert audit_report.findings(_synthetic(120, audit_sass.SassSummary(mma={"QMMA": 8}), fp8=True)) == []


def test_smem_limit_and_report_only():
    s = audit_sass.SassSummary(mma={"HMMA": 8})
    # 131 KB fits sm_80 / sm_90 / sm_100, not sm_120 (99 KB per block)
    big = {
        cc: _synthetic(cc, s if cc != 90 else audit_sass.SassSummary(mma={"HGMMA": 4}), shared=132096) for cc in ARCHS
    }
    big[100].sass = audit_sass.SassSummary(mma={"UTCHMMA": 4})
    assert [cc for cc in ARCHS if audit_report.findings(big[cc])] == [120]
    assert audit_report.findings(big[120]) == [("smem", "shared memory 132096 B > sm_120 limit 101376 B")]
    assert audit_report.problems(big[120], {"smem"}) == [] and audit_report.problems(big[120]) == [
        audit_report.findings(big[120])[0][1]
    ]


def _synthetic(cc, sass, variant="aligned", shared=1024, **flags) -> audit_jobs.BuildResult:
    r = audit_jobs.BuildResult(audit_jobs.Job("m", 0, "k", cc, variant), registers=64, spill_stores=0, spill_loads=0)
    r.sass, r.shared, r.num_stages = sass, shared, 3
    for k, v in flags.items():
        setattr(r, k, v)
    return r


def test_ctas_per_sm_from_registers_shared_memory_and_threads():
    s = audit_sass.SassSummary(mma={"HGMMA": 4})
    # 8 warps, 128 registers (65536 / (128 * 256) = 2), 96 KB shared (2 on sm_90 / sm_100: 228 KB per SM)
    r = _synthetic(90, s, shared=98304, num_warps=8, registers=128)
    assert audit_report.ctas_per_sm(r) == 2
    r.registers = 138  # rounded up to 144: 65536 / (144 * 256) = 1.8 -> one CTA (the backward epilogue's case)
    assert audit_report.ctas_per_sm(r) == 1
    # shared memory decides: 5 stages of 128x64 + 64x128 bf16 tiles (160 KB + the 1 KB reserve) -> one CTA
    assert audit_report.ctas_per_sm(_synthetic(90, s, shared=163840, num_warps=8, registers=96)) == 1
    # sm_120: 100 KB per SM; 4 warps of 64 registers: 1536 threads allow 12, 48 KB each allow 2
    assert audit_report.ctas_per_sm(_synthetic(120, s, shared=49152, num_warps=4, registers=64)) == 2
    # threads decide: 2 warps, 32 registers, no shared memory -> 2048 / 64 = 32 (the CTA limit too)
    assert audit_report.ctas_per_sm(_synthetic(80, s, shared=0, num_warps=2, registers=32)) == 32
    assert audit_report.ctas_per_sm(_synthetic(90, s)) is None  # num_warps unknown: no guess
    table = audit_report.format_table([_synthetic(90, s, shared=98304, num_warps=8, registers=128)])
    assert "| CTA/SM |" in table.splitlines()[0] and "| 98304 | 2 |" in table


# ----------------------------------------------------------------------------------------------- per FLOP


def _mma_loop(mma: list[str], others: int, fillers: int = 0, before: str = "") -> str:
    """SASS of a K loop holding the MMA lines ``mma``, ``others`` real instructions beside them (loads, address
    arithmetic, waits, the back edge) and ``fillers`` NOP / ``@!PT`` lines, after ``before`` (set-up lines)."""
    lines = [ln for ln in before.splitlines() if ln.strip()]
    lines += ["LDGSTS.E.BYPASS.128 [R23], desc[UR22][R16.64], P5", "DEPBAR.LE SB0, 0x1", *mma]
    lines += ["IADD3 R26, P4, PT, R26, 0x1, RZ"] * (others - 3)
    lines += ["NOP", "@!PT LDS RZ, [RZ]"] * (fillers // 2)
    start = 16 * len([ln for ln in before.splitlines() if ln.strip()])
    body = [f"        /*{16 * k:04x}*/ {ln} ;" for k, ln in enumerate(lines)]
    end = 16 * len(lines)
    body += [f"        /*{end:04x}*/ @P4 BRA 0x{start:x} ;", f"        /*{end + 16:04x}*/ EXIT ;"]
    return "\n".join(body) + "\n"


def _per_flop(cc, sass_text, num_warps=8, **fields) -> audit_jobs.BuildResult:
    r = _synthetic(cc, audit_sass.analyze_sass(sass_text), num_warps=num_warps, registers=128, shared=98304)
    r.per_flop, r.operand_bytes, r.min_intensity = True, 32768, 64.0
    for k, v in fields.items():
        setattr(r, k, v)
    return r


def _flop_checks(r) -> list[str]:
    return [check for check, _ in audit_report.findings(r) if check in audit_report.PER_FLOP]


HGMMA_128 = ["HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspB, R24"] * 3 + [
    "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0"
]
UMOV_IDESC = "UMOV UR37, 0x8210490"  # tcgen05 kind::f16 instruction descriptor: bf16, M = 128, N = 128


def test_mma_shapes_from_sass():
    instrs = audit_sass.parse_sass(
        "/*0000*/ HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], R24 ;\n/*0010*/ HMMA.16816.F32.BF16 R4, R8, R12, R4 ;\n"
        "/*0020*/ HMMA.1684.F32.TF32 R4, R8, R12, R4 ;\n/*0030*/ QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR4], R24 ;\n"
        f"/*0040*/ {UMOV_IDESC} ;\n"
        "/*0050*/ UTCHMMA gdesc[UR8], gdesc[UR24], tmem[UR14], tmem[UR36], idesc[UR37], UPT ;\n"
        "/*0060*/ UMOV UR11, 0x4200910 ;\n"
        "/*0070*/ UTCHMMA gdesc[UR8], gdesc[UR24], tmem[UR14], tmem[UR6], idesc[UR11] ;\n"
        "/*0080*/ UTCHMMA gdesc[UR8], gdesc[UR24], tmem[UR14], tmem[UR6], idesc[UR12] ;\n"
    )
    shapes = [audit_sass.mma_shape(instrs, k) for k in range(len(instrs))]
    assert shapes == [
        (64, 32, 16, "16"),  # wgmma: per warpgroup, the shape in the mnemonic
        (16, 8, 16, "16"),  # mma.sync m16 n8 k16, per warp
        (16, 8, 4, "tf32"),
        (64, 128, 32, "8"),  # fp8 wgmma
        None,  # the UMOV
        (128, 128, 16, "16"),  # tcgen05: M and N from the instruction descriptor, K = 32 bytes of bf16
        None,
        (64, 128, 8, "tf32"),  # A type 2 in bits 7-9: tf32, K = 8
        None,  # no UMOV sets UR12: unknown
    ]


def test_issue_ratio_against_the_fma_rate():
    # sm_90, 8 warps, 4 HGMMA.64x128x16 per warpgroup (128x128x64 per CTA: 512 clocks at 2048 FMA / clock) in a
    # 120-instruction loop: 8 / 4 x 120 = 240 issue clocks -> 0.47; NOPs and @!PT fillers are not issued work
    good = _per_flop(90, _mma_loop(HGMMA_128, 116, fillers=40))
    lp = good.sass.main_loop
    assert (lp.instructions, lp.real_instructions, lp.mma_work, lp.mma_kind) == (160, 120, {"wgmma": 524288}, "16")
    assert audit_report.cta_mma_work(good) == 128 * 128 * 64 and audit_report.issue_ratio(good) == pytest.approx(
        240 / 512
    )
    assert _flop_checks(good) == []
    # the old backward epilogue's 128x32 tiles: HGMMA.64x32x16, a quarter of the work in as many instructions
    narrow = _per_flop(90, _mma_loop([m.replace("64x128x16", "64x32x16") for m in HGMMA_128], 116), operand_bytes=20480,
                       min_intensity=48.0)  # fmt: skip
    assert audit_report.issue_ratio(narrow) == pytest.approx(240 / 128)
    assert audit_report.findings(narrow)[0] == (
        "issue",
        "issue ratio 1.88 > 0.75: 8 warps x 120 instructions / 4 per 262144 FMA at 2048 / clock",
    )
    # sm_100: one tcgen05 MMA per K step of 16 for the CTA; the same loop is issue-bound at twice the rate
    tc = ["UTCHMMA gdesc[UR8], gdesc[UR24], tmem[UR14], tmem[UR36], idesc[UR37], UPT"] * 4
    blackwell = _per_flop(100, _mma_loop(tc, 140, before=f"/*0000*/ {UMOV_IDESC} ;"))
    assert audit_report.cta_mma_work(blackwell) == 128 * 128 * 64
    assert audit_report.issue_ratio(blackwell) == pytest.approx(2 * 144 / 256) and _flop_checks(blackwell) == ["issue"]
    assert _flop_checks(_per_flop(100, _mma_loop(tc, 140, before=f"/*0000*/ {UMOV_IDESC} ;"), num_warps=4)) == []
    # an unreadable MMA shape is flagged, not passed
    unknown = _per_flop(100, _mma_loop(tc, 60))
    assert audit_report.issue_ratio(unknown) is None and _flop_checks(unknown) == ["issue"]
    # sm_80: HMMA per warp, 1024 FMA / clock: 8 warps x 64 HMMA.16816 = 128x128x64 in 1024 clocks
    hmma = _per_flop(80, _mma_loop(["HMMA.16816.F32.BF16 R4, R8, R12, R4"] * 64, 200))
    assert audit_report.issue_ratio(hmma) == pytest.approx(2 * 264 / 1024)


def test_operand_intensity_floor_and_exemptions():
    # 128x128x64 bf16: 2 MiFLOP over (128x64 + 64x128) x 2 B = 64 FLOP/B: passes the floor of 64
    r = _per_flop(90, _mma_loop(HGMMA_128, 116))
    assert audit_report.operand_intensity(r) == 64 and _flop_checks(r) == []
    # the same work over twice the bytes (a 128x64 GLU tile reading two weights per A tile, written wrong): 32
    r.operand_bytes = 65536
    assert audit_report.findings(r) == [
        ("intensity", "operand intensity 32.0 FLOP/B < 64: 2097152 FLOP per 65536 B of operand tiles")
    ]
    r.min_intensity = None  # a small-M (decode) tile: exempt from intensity only
    assert _flop_checks(r) == []
    r.min_intensity, r.operand_bytes = 48.0, 40960  # the backward epilogue's floor: 51.2 passes
    assert _flop_checks(r) == []


def test_occupancy_check_and_persistent_kernels():
    # 138 registers x 256 threads: one CTA per SM (the old backward epilogue)
    r = _per_flop(90, _mma_loop(HGMMA_128, 116), registers=138)
    assert audit_report.ctas_per_sm(r) == 1 and audit_report.findings(r) == [
        ("occupancy", "1 CTA/SM < 2 (registers 138, shared 98304 B, 8 warps) and not persistent")
    ]
    r.persistent, r.programs_per_sm = True, 1  # a persistent tile loop keeps one CTA busy per SM ...
    assert _flop_checks(r) == []
    # ... if its launcher starts no more programs per SM than the build holds: 2 of a 1-CTA/SM build run in waves
    r.programs_per_sm = 2
    assert audit_report.findings(r) == [
        (
            "occupancy",
            "1 CTA/SM < the 2 persistent programs per SM its launcher starts (registers 138, shared 98304 "
            "B): they run in waves",
        )  # fmt: skip
    ]
    # 5 stages of 128x64 + 64x128 bf16 tiles: 160 KB of shared memory, one CTA on sm_90
    assert _flop_checks(_per_flop(90, _mma_loop(HGMMA_128, 116), shared=163840)) == ["occupancy"]


def test_per_flop_scope_enforcement_and_waivers():
    bad = _mma_loop([m.replace("64x128x16", "64x32x16") for m in HGMMA_128], 116)
    # only the aligned build of a per_flop spec is checked (unaligned fallbacks and other kernels are not)
    assert _flop_checks(_per_flop(90, bad, per_flop=False)) == []
    assert _flop_checks(_per_flop(90, bad, job=audit_jobs.Job("m", 0, "k", 90, "unaligned"))) == []
    # enforced on sm_90 and sm_100; reported on sm_80 / sm_120
    r = _per_flop(90, bad, operand_bytes=8192)  # intensity 64: only the issue ratio fails
    assert _flop_checks(r) == ["issue"] and audit_report.why_not_enforced(r, "issue", frozenset()) is None
    on80 = _per_flop(80, _mma_loop(["HMMA.16816.F32.BF16 R4, R8, R12, R4"] * 64, 200), registers=255)
    assert _flop_checks(on80) == ["occupancy"] and audit_report.problems(on80) == []
    assert "per-FLOP checks enforced on sm_90, sm_100 only" in audit_report.format_table([on80])
    # a spec's waiver: that check, that build, with its reason in the table
    r.waivers = (("issue", "needs a persistent kernel"),)
    assert audit_report.problems(r) == [] and audit_report.waiver(r, "issue") == "needs a persistent kernel"
    assert "(report-only: needs a persistent kernel)" in audit_report.format_table([r])
    r.waivers = (("issue@100", "sm_100 only"),)
    assert audit_report.problems(r)  # a waiver for another architecture does not apply
    checks = audit_report.format_checks([r, on80])
    assert "| issue | 1 | sm_90 1 | yes, not on sm_80, sm_120 |" in checks
    assert "| occupancy | 1 | sm_80 1 | yes, not on sm_80, sm_120 |" in checks


def test_launcher_specs_say_what_they_serve():
    from blocksparse_moe.kernels import expert_gemm, specs

    all_specs = audit_jobs._gpu_specs(specs)  # the GPU configs (the tests interpret)
    gemm = {s.name: s for s in all_specs if s.kernel is expert_gemm.gemm_kernel}
    wgrad = [s for s in all_specs if s.kernel is expert_gemm.wgrad_kernel]
    assert all(s.serves for s in all_specs)
    # the per-FLOP checks reach every config with an aligned build, each with its operand tiles
    for s in [*gemm.values(), *wgrad]:
        ieee = s.name.endswith(",ieee]")  # fp32 at IEEE precision: FFMA loops, no MMA and no per-FLOP checks
        assert s.per_flop == ("aligned" in s.variants and not ieee) and s.operand_bytes, s.name
        assert ieee == (s.constexprs["DOTS"] == DOTS_IEEE) and not (ieee and s.is_matmul), s.name
    large = gemm["gemm[grouped_mm,bf16,M=128,N=128,K=64,w=8,tma]"]
    assert large.serves == "grouped, large T, aligned" and large.min_intensity == 64 and large.waivers == ()
    assert large.operand_bytes == (128 * 64 + 64 * 128) * 2 and (large.archs, large.num_warps) == ((90, 120), 8)
    # the config functions pick per architecture: sm_100 runs the same tile on 4 warps (tcgen05), warp-specialized
    # and persistent
    blackwell = gemm["gemm[grouped_mm,bf16,M=128,N=128,K=64,w=4,tma,ws]"]
    assert (blackwell.archs, blackwell.num_warps, blackwell.persistent) == ((100,), 4, True)
    assert not large.persistent
    # sm_100's GLU forward: 128x128 tiles of two accumulators, the epilogue in 32-column slices, 2 stages, one tile
    # per program and no waiver (its issue ratio passes); one A tile and two weight tiles per K step
    glu = gemm["gemm[up,glu,silu,bf16,M=128,N=128,K=64,w=4,tma,gather4]"]
    assert glu.operand_bytes == (128 * 64 + 2 * 64 * 128) * 2 and glu.waivers == () and not glu.persistent
    assert (glu.constexprs["EPI_N"], glu.num_stages, glu.num_warps) == (32, 2, 4)
    assert gemm["gemm[up,glu,silu,bf16,M=128,N=64,K=64,w=8,tma]"].archs == (90, 120)  # the others' 128x64 tiles
    # sm_100's MX (a quantized in the epilogue) and rowwise GLU forward: 128x128 tiles too (MX: the weights' scales
    # by TMA; rowwise: K steps of 64), no sm_100 waiver (those of MX on sm_90 apply to no build of these configs);
    # blockwise keeps 128x64 tiles there, waived
    for name, tma_scales in (("mxfp8,up,glu,aq,M=128,N=128,K=128,w=4,tma,gather4,sw_tma", True),
                             ("rowwise,up,glu,M=128,N=128,K=64,w=4,tma", False)):  # fmt: skip
        wide = gemm[f"gemm_fp8[{name}]"]
        assert (wide.archs, wide.constexprs["EPI_N"], wide.constexprs["SW_TMA"]) == ((100,), 32, tma_scales), name
        assert not [w for w, _ in wide.waivers if "@" not in w or w.endswith("@100")] and not wide.persistent, name
    assert "issue@100" in [w for w, _ in gemm["gemm_fp8[blockwise,up,glu,M=128,N=64,K=128,tma]"].waivers]
    # rowwise's 128-row builds scale their accumulators column slice by column slice: 2 CTAs per SM on sm_90, and
    # sm_100 runs the backward epilogue and the pair on 4 warps (128 columns); none waived on sm_90 / sm_100
    for name in ("down,M=128,N=128,K=128,w=8,tma", "down_bwd,glu,M=128,N=128,K=128,w=8,tma",
                 "down_bwd,glu,M=128,N=128,K=128,w=4,tma,gather4", "dgrad_pair,M=128,N=128,K=128,w=4,tma"):  # fmt: skip
        rowwise = gemm[f"gemm_fp8[rowwise,{name}]"]
        assert not [w for w, _ in rowwise.waivers if w.endswith(("@90", "@100"))], name
    assert gemm["gemm_fp8[rowwise,down,M=128,N=128,K=128,w=8,tma]"].constexprs["EPI_N"] == 16
    # FP8 dense rows (the down GEMM's a, the pair's dh / dg) through TMA, an M tile per box (the pair: one descriptor
    # per A), outside sm_100's warp-specialized loop but for blockwise's and the swapped MX tiles; sm_90's rowwise
    # pair at 128 x 64 with 256-deep K steps in 2 stages (its two accumulators: 2 CTAs per SM), no waiver
    pair90 = gemm["gemm_fp8[rowwise,dgrad_pair,M=128,N=64,K=256,w=8,tma]"]
    assert pair90.archs == (90,) and pair90.waivers == () and pair90.num_stages == 2
    assert (pair90.constexprs["A_TMA"], pair90.signature["a_desc"], pair90.signature["a2_desc"]) == (
        expert_gemm.WeightLoad.TMA, "tensordesc<fp8e4nv[128,256]>", "tensordesc<fp8e4nv[128,256]>")  # fmt: skip
    for name, ws in (("rowwise,down,M=128,N=128,K=128,w=4,tma", False),
                     ("rowwise,down,M=64,N=128,K=256,w=4,tma", False),
                     ("mxfp8,down,M=128,N=128,K=128,w=4,tma,s_tma", False),
                     ("blockwise,down,M=128,N=128,K=128,w=4,tma,ws", True),
                     ("mxfp8,down,M=64,N=128,K=128,swap,tma,ws", True)):  # fmt: skip
        down = gemm[f"gemm_fp8[{name}]"]
        assert (down.archs, down.constexprs["WARP_SPEC"]) == ((100,), ws), name
        assert down.constexprs["A_TMA"] == (expert_gemm.WeightLoad.POINTERS if ws else expert_gemm.WeightLoad.TMA)
        assert down.signature["a2_desc"] == "constexpr" and (down.signature["a_desc"] == "constexpr") == ws, name
    # gathered rows: cp.async but on sm_100 outside the warp-specialized loop at K steps of 128 or more (TMA's row
    # gather); sm_100's rowwise up-projection leaves that loop for it, MX's keeps it
    for name, archs, g4 in (("rowwise,up,M=128,N=128,K=128,w=8,tma", (90,), False),
                            ("rowwise,up,M=128,N=128,K=128,w=4,tma,gather4", (100,), True),
                            ("rowwise,up,M=64,N=128,K=256,w=4,tma,gather4", (100,), True),
                            ("rowwise,down_bwd,glu,M=64,N=128,K=256,w=4,tma,gather4", (100,), True),
                            ("blockwise,down_bwd,glu,M=128,N=128,K=128,w=8,tma", (90,), False),
                            ("blockwise,down_bwd,glu,M=128,N=128,K=128,w=8,tma,gather4", (100,), True),
                            ("mxfp8,up,aq,M=128,N=128,K=128,w=4,tma,ws,sw_tma", (100,), False),
                            ("rowwise,up,glu,M=128,N=128,K=64,w=4,tma", (100,), False)):  # fmt: skip
        spec = gemm[f"gemm_fp8[{name}]"]
        rows = f"tensordesc<fp8e4nv[1,{spec.constexprs['BLOCK_K']}]>"  # one row of a K step per box
        assert spec.archs == archs and spec.signature["a_desc"] == (rows if g4 else "constexpr"), name
        assert spec.constexprs["A_TMA"] == (expert_gemm.WeightLoad.GATHER4 if g4 else expert_gemm.WeightLoad.POINTERS)
    # sm_100's builds that do not warp-specialize gather their x rows through TMA (gather4), the others by cp.async
    assert (glu.archs, glu.constexprs["A_TMA"], glu.signature["a_desc"]) == (
        (100,), expert_gemm.WeightLoad.GATHER4, "tensordesc<bf16[1,64]>")  # fmt: skip
    for s in gemm.values():  # (E4M3 rows: K steps of 128 or more)
        rows = s.signature["a_ptr"] in ("*bf16", "*fp16") or (s.fp8 and s.constexprs["BLOCK_K"] >= 128)
        aligned = s.variants == ("aligned",)
        gather4 = s.constexprs["GATHER"] and rows and aligned and not s.constexprs["WARP_SPEC"]
        assert (s.constexprs["A_TMA"] == expert_gemm.WeightLoad.GATHER4) == (gather4 and s.archs == (100,)), s.name
        assert not gather4 or s.archs == (100,) or 100 not in (s.archs or (100,)), s.name  # sm_100 always gathers4
    assert gemm["gemm[down_bwd,glu,silu,bf16,M=128,N=128,K=64,w=8,tma]"].min_intensity == 48
    pair = gemm["gemm[dgrad_pair,bf16,M=128,N=128,K=64,w=8,tma]"]  # two K loops, one A and one weight tile each
    assert pair.operand_bytes == (128 * 64 + 64 * 128) * 2
    dw = {s.name: s for s in wgrad}["wgrad[w13,bf16,M=128,N=128,K=64,w=4,tma]"]  # dh, dg dense: TMA
    assert (dw.archs, dw.num_warps, dw.operand_bytes) == ((90, 100), 4, (64 * 128 + 64 * 128) * 2)
    # the FP8 weight gradients: E4M3 operands (the fp8mma check), one byte per operand element, on the E4M3-MMA
    # architectures only; their waivers name measured reasons (MX on sm_90: emulated)
    fp8 = {s.name: s for s in wgrad if s.constexprs["FP8"]}
    assert fp8 and all(s.fp8 and s.archs and 80 not in s.archs for s in fp8.values())
    # E4M3 operands exactly in the FP8 builds of the two GEMM kernels (gemm_fp8[...] and the FP8 wgrad specs)
    assert all(s.fp8 == bool(s.constexprs.get("FP8", 0)) for s in all_specs)
    assert any(s.fp8 and s.kernel is expert_gemm.gemm_kernel for s in all_specs)
    mx = fp8["wgrad[fp8,w13,mxfp8,M=128,N=128,K=128,w=4,tma]"]
    assert mx.archs == (100,) and mx.operand_bytes == 128 * (128 + 128) and mx.waivers[0][0] == "fp8mma@90"
    mx90 = fp8["wgrad[fp8,w13,mxfp8,M=128,N=64,K=128,w=4,tma]"]
    assert mx90.archs == (90,) and [w for w, _ in mx90.waivers] == ["fp8mma@90", "pipeline@90", "issue@90"]
    assert [w for w, _ in fp8["wgrad[fp8,w2,mxfp8,M=128,N=64,K=32]"].waivers] == ["fp8mma@90"]  # unaligned
    # K-major operands (TMA over the transposed storage): rowwise passes every gate, no waiver; rows as stored do not
    k_major = fp8["wgrad[fp8,w2,rowwise,M=128,N=128,K=128,w=4,kmajor,tma]"]
    assert k_major.constexprs["A_TMA"] == expert_gemm.WeightLoad.TMA_T and k_major.waivers == ()
    assert k_major.constexprs["s_ar"] == 1 and "s_ac" in k_major.aligned
    rows = fp8["wgrad[fp8,w2,rowwise,M=128,N=128,K=128,w=4,tma]"]
    assert [w for w, _ in rows.waivers] == ["pipeline@90", "issue@90"]
    small = gemm["gemm[grouped_mm,bf16,M=64,N=128,K=64,tma]"]
    assert small.serves == "grouped, small T / decode, aligned" and small.min_intensity is None
    fallback = next(s for s in gemm.values() if s.variants == ("unaligned",))
    assert fallback.serves.endswith("unaligned fallback") and not fallback.per_flop


def test_quantize_specs_mark_the_group_sizes_the_jit_marks():
    """The aligned quantize builds are what the GPU's JIT compiles for realistic sizes: it marks every integer argument
    that is a multiple of 16, the group sizes the programs start their columns / rows at included (128 or 32, or a
    whole row of d). Without GC / G marked the column offsets had no known alignment and the aligned builds of the
    column-group quantizations were their unaligned twins instruction for instruction (no 128-bit load)."""
    from blocksparse_moe.kernels import quantize, specs

    built = [s for s in audit_jobs._gpu_specs(specs) if s.kernel in (quantize.quantize_kernel,
                                                                     quantize.quantize_dual_kernel)]  # fmt: skip
    assert built
    for s in built:
        if s.kernel is quantize.quantize_dual_kernel:
            assert {"C", "s_tr", "G"} <= set(s.aligned), s.name
            continue
        c = s.constexprs
        want = {"C", "s_tb", "s_tr"} | ({"GC"} if c["REDUCE_COLS"] else set()) | ({"SG"} if c["SRC_SCALE"] else set())
        if not c["ROW_BOUNDS"]:  # (bounds: the row groups come from memory, q's layout may be transposed)
            want |= {"s_qr", "GR"} if c["REDUCE_ROWS"] else {"s_qr"}
        assert set(s.aligned) == want, s.name


def test_fp8_waivers_carry_their_own_kernels_reasons():
    """Each FP8 build waives with the reason measured on its own kernel's SASS: for the same recipe and check,
    ``gemm_kernel``'s builds and ``wgrad_kernel``'s give different reasons (two module-level names for both once
    made every gemm_fp8 build report the weight gradient's)."""
    from blocksparse_moe.kernels import specs

    all_specs = audit_jobs._gpu_specs(specs)

    def reasons(prefix: str, check: str) -> set[str]:
        return {reason for s in all_specs if s.name.startswith(prefix) for c, reason in s.waivers if c == check}

    for recipe, check in (("blockwise", "pipeline@90"), ("mxfp8", "fp8mma@90")):
        gemm, wgrad = reasons(f"gemm_fp8[{recipe},", check), reasons(f"wgrad[fp8,w2,{recipe},", check)
        assert gemm and wgrad and gemm.isdisjoint(wgrad), (recipe, check)


def test_fp8_specs_hold_every_tile_the_fp8_mlp_launches(monkeypatch):
    """Every config ``gemm_config`` picks for the FP8 MLP's GEMMs (each recipe, launch, architecture with E4M3 MMAs
    and alignment), at every M tile ``backends.triton._grouped_block_m(..., fp8=True)`` returns on a GPU, is an FP8
    build of the audit, or its twin's (``specs._FP8_TWINS``: the same tile, loop and MMA): a tile or a launch added
    without its builds fails here (the FP8 MLP once ran 16- and 32-row tiles no build covered, and its up-projection
    without GLU)."""
    from blocksparse_moe.backends import triton as triton_backend
    from blocksparse_moe.kernels import expert_gemm, specs

    Epilogue = expert_gemm.Epilogue
    built = [s for s in audit_jobs._gpu_specs(specs) if s.kernel is expert_gemm.gemm_kernel and s.fp8]
    monkeypatch.setattr(triton_backend, "interpreting", lambda: False)  # the GPU choices
    monkeypatch.setattr(expert_gemm, "interpreting", lambda: False)
    block_ms = {triton_backend._grouped_block_m(rows_per_expert * E + extra, E, fp8=True)
                for E in (1, 7, 128) for rows_per_expert in range(300) for extra in (0, 1)}  # fmt: skip
    assert block_ms == {64, 128}
    # the FP8 MLP's gemm launches (backends.triton_fp8): (EPILOGUE, GLU, PAIR, GATHER); "down" is the dgrad without
    # GLU too (dh @ w1ᵀ)
    launches = {
        "up,glu": (Epilogue.FORWARD, True, False, True),
        "up": (Epilogue.FORWARD, False, False, True),  # moe_mlp(..., glu=False)
        "down": (Epilogue.PLAIN, False, False, False),
        "down_bwd,glu": (Epilogue.BACKWARD, True, False, True),
        "down_bwd": (Epilogue.BACKWARD, False, False, True),  # its backward without GLU
        "dgrad_pair": (Epilogue.PLAIN, False, True, False),
    }
    assert set(specs._FP8_TWINS.values()) <= set(specs._FP8_USES) <= set(launches)
    e4m3, checked = torch.float8_e4m3fn, 0
    for mode in (expert_gemm.Fp8Mode.BLOCKWISE, expert_gemm.Fp8Mode.MX, expert_gemm.Fp8Mode.ROWWISE):
        for use, (epilogue, glu, pair, gather) in launches.items():
            for block_m, cc, aligned in itertools.product(sorted(block_ms), (90, 100, 120), (True, False)):
                cfg = expert_gemm.gemm_config(e4m3, block_m, epilogue=epilogue, glu=glu, pair=pair, aligned=aligned,
                                              capability=cc, fp8=mode, dense_rows=not gather)  # fmt: skip
                variant = "aligned" if aligned else "unaligned"
                twin = specs._FP8_TWINS.get((use, variant))
                flags = launches[twin or use]
                tile = (cfg.block_m, cfg.block_n, cfg.block_k, cfg.swap_ab, cfg.num_warps, cfg.num_stages)
                tile += () if twin else (cfg.epi_n,)  # (a twin without GLU may slice its epilogue otherwise)
                found = [
                    s for s in built
                    if s.constexprs["FP8"] == mode and cc in s.archs and variant in s.variants
                    and tuple(s.constexprs[k] for k in ("EPILOGUE", "GLU", "PAIR", "GATHER")) == flags
                    and tuple(s.constexprs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SWAP_AB"))
                    + (s.num_warps, s.num_stages) + (() if twin else (s.constexprs["EPI_N"],)) == tile
                ]  # fmt: skip
                assert found, (mode.name, use, block_m, cc, variant, cfg)
                checked += 1
    assert checked == 3 * len(launches) * 2 * 3 * 2


def test_16bit_specs_hold_every_tile_and_block_the_gpu_launchers_pick(monkeypatch):
    """Every config ``gemm_config`` / ``wgrad_config`` picks for 16-bit operands (bf16, fp16) on sm_80 / 90 / 100 /
    120, aligned or not, at every grouped M tile ``backends.triton._grouped_block_m`` returns on a GPU and every
    block size its ``_block_size`` accepts there, is a 16-bit build of the audit: fp16 where specs.py builds it
    (``_dtype_archs``, the main uses), else its bf16 twin (``gemm_config`` gives both the same tile). A tile or block
    size the GPU path picks without its builds fails here (16-row grouped tiles and blocks of 16 / 32 once ran
    unbuilt)."""
    from blocksparse_moe.backends import triton as triton_backend
    from blocksparse_moe.kernels import expert_gemm, specs

    monkeypatch.setattr(triton_backend, "interpreting", lambda: False)  # the GPU choices
    monkeypatch.setattr(expert_gemm, "interpreting", lambda: False)
    block_ms = {triton_backend._grouped_block_m(rows_per_expert * E + extra, E)
                for E in (1, 7, 128) for rows_per_expert in range(300) for extra in (0, 1)}  # fmt: skip
    assert block_ms == {32, 64, 128}

    def accepted(B):
        try:
            return triton_backend._block_size(B) == B
        except ValueError:
            return False

    blocks = {B for B in range(1, 257) if accepted(B)}
    assert blocks == {64, 128}
    half = (torch.bfloat16, torch.float16)
    built = [s for s in audit_jobs._gpu_specs(specs) if s.kernel in (expert_gemm.gemm_kernel, expert_gemm.wgrad_kernel)]

    def find(kernel, prefix, cc, variant, constexprs, warps_stages):
        return [
            s for s in built
            if s.kernel is kernel and s.name.startswith(prefix) and (s.archs is None or cc in s.archs)
            and variant in s.variants and (s.num_warps, s.num_stages) == warps_stages
            and all(s.constexprs[k] == v for k, v in constexprs.items())
        ]  # fmt: skip

    checked = 0
    for dtype, cc, aligned in itertools.product(half, audit_sass.ARCHS, (True, False)):
        variant = "aligned" if aligned else "unaligned"
        for use in specs._GEMM_USES:
            fp16_built = dtype == torch.float16 and use.tag in specs._MAIN_USES and cc in specs._dtype_archs(dtype)
            twin = dtype if fp16_built else torch.bfloat16
            for m in sorted(blocks if use.blocked else block_ms):
                B = m if use.blocked else None
                kw = dict(epilogue=use.epilogue, glu=use.glu, pair=use.pair, aligned=aligned, capability=cc,
                          out_block=B if use.out_blocked else None, a_block=B if use.a_blocked else None)  # fmt: skip
                cfg = expert_gemm.gemm_config(dtype, m, **kw)
                assert cfg == expert_gemm.gemm_config(twin, m, **kw)  # the twin's tile
                lb = (B or 0).bit_length() - 1 if use.blocked else specs.DENSE_LOG_BLOCK
                act = ",silu" if use.epilogue else ""
                constexprs = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EPI_N=cfg.epi_n,
                                  SWAP_AB=cfg.swap_ab, EPILOGUE=int(use.epilogue), GLU=use.glu, PAIR=use.pair,
                                  GATHER=use.gather, LB_A=lb if use.a_blocked else specs.DENSE_LOG_BLOCK,
                                  LB_O=lb if use.out_blocked else specs.DENSE_LOG_BLOCK)  # fmt: skip
                prefix = f"gemm[{use.tag}{act},{specs.triton_type(twin)},"
                found = find(expert_gemm.gemm_kernel, prefix, cc, variant, constexprs, (cfg.num_warps, cfg.num_stages))
                assert found, (use.tag, dtype, m, cc, variant, cfg)
                checked += 1
        for use in specs._WGRAD_USES:
            fp16_built = dtype == torch.float16 and use.tag in specs._MAIN_WGRAD and cc in specs._dtype_archs(dtype)
            twin = dtype if fp16_built else torch.bfloat16
            for B in sorted(blocks) if use.blocked else (None,):
                kw = dict(gather=use.a_gather or use.b_gather, aligned=aligned, capability=cc,
                          a_block=B if use.a_blocked else None, b_block=B if use.b_blocked else None)  # fmt: skip
                cfg = expert_gemm.wgrad_config(dtype, **kw)
                assert cfg == expert_gemm.wgrad_config(twin, **kw)
                lb = (B or 0).bit_length() - 1 if use.blocked else specs.DENSE_LOG_BLOCK
                constexprs = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, DUAL=use.dual,
                                  A_GATHER=use.a_gather, B_GATHER=use.b_gather,
                                  LB_A=lb if use.a_blocked else specs.DENSE_LOG_BLOCK,
                                  LB_B=lb if use.b_blocked else specs.DENSE_LOG_BLOCK)  # fmt: skip
                prefix = f"wgrad[{use.tag},{specs.triton_type(twin)},"
                found = find(expert_gemm.wgrad_kernel, prefix, cc, variant, constexprs, (cfg.num_warps, cfg.num_stages))
                assert found, (use.tag, dtype, B, cc, variant, cfg)
                checked += 1
    uses = sum(2 if u.blocked else 3 for u in specs._GEMM_USES) + sum(2 if u.blocked else 1 for u in specs._WGRAD_USES)
    assert checked == 2 * len(audit_sass.ARCHS) * 2 * uses


def test_parsers_read_ptxas_log_resources_and_buffers():
    # spills: a register-heavy build as ptxas reports it
    log = (
        "ptxas info    : Used 255 registers, used 1 barriers, 584 bytes cmem[0]\n"
        "ptxas info    : Function properties for k\n"
        "    48 bytes stack frame, 40 bytes spill stores, 36 bytes spill loads\n"
    )
    assert audit_sass.parse_ptxas_log(log) == dict(registers=255, stack=48, spill_stores=40, spill_loads=36)
    # C7515 as ptxas 13 prints it (an info line)
    c7515 = (
        "ptxas-blackwell info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized "
        "due to non wgmma instructions defining accumulator registers of a wgmma between start and end of the "
        "pipeline stage in the function '_dsd_kernel' in line 957\n"
        "ptxas-blackwell info    : Used 121 registers, used 1 barriers\n"
    )
    assert audit_sass.parse_ptxas_log(c7515) == dict(registers=121, codes=("C7515",))
    r = _synthetic(90, audit_sass.SassSummary(mma={"HGMMA": 2}))
    r.ptxas_codes = ("C7515",)
    assert audit_report.findings(r) == [("c7515", "ptxas C7515: wgmma serialised")]
    usage = " Function k:\n  REG:128 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:584 TEXTURE:0"
    assert audit_sass.parse_resource_usage(usage) == dict(registers=128, stack=0, static_shared=1024, local=0)
    sass = (
        "/*0000*/ LDGSTS.E.BYPASS.128 [R23], desc[UR16][R18.64], P5 ;\n"
        "/*0010*/ @!P0 LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;\n"
        "/*0020*/ LDG.E.64 R6, desc[UR4][R2.64] ;\n/*0030*/ LDGDEPBAR ;\n/*0040*/ STG.E.128 desc[UR4][R2.64], R4 ;\n"
    )
    assert audit_sass.analyze_sass(sass).ld128 == 2
    r = audit_jobs.BuildResult(audit_jobs.Job("m", 0, "k", 90), registers=255, spill_stores=40, spill_loads=36)
    r.sass = audit_sass.SassSummary(mma={"HGMMA": 3})
    assert audit_report.problems(r) == ["spills 40 B stores / 36 B loads"]
    # empty logs (no ptxas output captured): nothing invented
    assert audit_sass.parse_ptxas_log("") == {} and audit_sass.parse_resource_usage("") == {}
    # TTGIR: 3 buffers per operand; mbarriers (i64), staged values (an initial tensor) and scalars are not buffers
    ttgir = """
    %0 = ttg.local_alloc : () -> !ttg.memdesc<3x128x64xbf16, #shared, #smem, mutable>
    %1 = ttg.local_alloc : () -> !ttg.memdesc<3x64x128xbf16, #shared1, #smem, mutable>
    %2 = ttg.local_alloc : () -> !ttg.memdesc<3x1xi64, #shared2, #smem, mutable>
    %3 = ttg.local_alloc %acc : (tensor<128x128xbf16, #mma>) -> !ttg.memdesc<128x128xbf16, #shared3, #smem>
    %4 = ttg.local_alloc : () -> !ttg.memdesc<1x1xi32, #shared4, #smem, mutable>
    """
    assert audit_sass.ttgir_buffers(ttgir) == (3,)
    # dsd_act today: the activated operand single-buffered, the weights double-buffered
    dsd = "ttg.local_alloc : () -> !ttg.memdesc<1x128x32xbf16, #s>\nttg.local_alloc : () -> !ttg.memdesc<2x32x128xbf16>"
    assert audit_sass.ttgir_buffers(dsd) == (1, 2) and audit_sass.ttgir_buffers("") == ()


# ----------------------------------------------------------------------------------------------- jobs


def test_collect_jobs_covers_every_spec_variant_and_arch():
    jobs = audit_jobs.collect_jobs([__name__])
    both = ("unaligned", "aligned")
    specs = compile_specs()
    expected = [(s.name, v, cc) for s in specs[:3] for v in both for cc in ARCHS]
    expected += [(s.name, "aligned", cc) for s in specs[3:] for cc in ARCHS]
    assert [(j.name, j.variant, j.cc) for j in jobs] == expected
    # filters: a substring of "module.config", and variants
    only = audit_jobs.collect_jobs([__name__], (90,), only="test_audit.copy[", variants=("aligned",))
    assert [(j.name, j.variant, j.cc) for j in only] == [("copy[fp32]", "aligned", 90)]
    with pytest.raises(ValueError, match=r"capabilities must be among \(80, 90, 100, 120\), got \[89\]"):
        audit_jobs.collect_jobs([__name__], (89,))


def test_collect_jobs_lists_the_gpu_configs_while_interpreting(monkeypatch):
    # the specs are listed as the workers (which never interpret) list them; the caller's environment is kept
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _SEEN_INTERPRET.clear()
    audit_jobs.collect_jobs([__name__])
    assert _SEEN_INTERPRET == [None] and os.environ["TRITON_INTERPRET"] == "1"


def test_divisibility_attrs_mark_pointers_and_aligned_ints():
    spec = compile_specs()[0]
    idx = {a: (_tiny_mm_kernel.arg_names.index(a),) for a in ("a_ptr", "b_ptr", "c_ptr", "N", "K")}
    assert audit_jobs.divisibility_attrs(spec) == {i: [["tt.divisibility", 16]] for i in idx.values()}
    # edge: nothing to mark (no pointer, no aligned int): the aligned build would repeat the unaligned one
    bare = CompileSpec("bare", SimpleNamespace(arg_names=["n", "BLOCK"]), {"n": "i32"}, dict(BLOCK=16))
    assert audit_jobs.divisibility_attrs(bare) == {} and audit_jobs.build_variants(bare) == ("unaligned",)
    assert audit_jobs.build_variants(compile_specs()[3]) == ("aligned",)
    # the new fields default to the strict checks
    assert (bare.tcgen05_ok, bare.expect_pipelined) == (True, True)


def test_compile_spec_rejects_bad_fields():
    with pytest.raises(ValueError, match="variants"):
        CompileSpec("x", _tiny_copy_kernel, COPY_SIG, dict(BLOCK=512), variants=("odd",))
    with pytest.raises(ValueError, match="variants"):
        CompileSpec("x", _tiny_copy_kernel, COPY_SIG, dict(BLOCK=512), variants=())
    with pytest.raises(ValueError, match=r"integer arguments.*x_ptr"):
        CompileSpec("x", _tiny_copy_kernel, COPY_SIG, dict(BLOCK=512), aligned=("x_ptr",))
    with pytest.raises(ValueError, match=r"integer arguments.*BLOCK"):
        CompileSpec("x", _tiny_copy_kernel, COPY_SIG, dict(BLOCK=512), aligned=("BLOCK",))


# ----------------------------------------------------------------------------------------------- real builds


@pytest.mark.parametrize("variant", ["unaligned", "aligned"])
def test_matmul_uses_tensor_cores(results, variant):
    # one small real build per architecture, each with its own MMA
    expected = {80: {"HMMA"}, 90: {"HGMMA"}, 100: {"UTCHMMA"}, 120: {"HMMA"}}
    for cc in ARCHS:
        r = results["mm[bf16,64x64x32]", variant, cc]
        assert r.error is None, r.error
        assert r.registers and r.registers > 0
        assert r.shared is not None and r.shared > 0  # tiles staged in shared memory
        assert set(r.sass.mma) == expected[cc], (cc, r.sass.mma)
        assert r.sass.main_loop is not None and r.sass.main_loop.mma > 0
        if (cc, variant) == (120, "aligned"):
            # ptxas 13 for sm_120 keeps this build at 80 registers and spills 3 values live across the K loop
            assert audit_report.findings(r) == [("spill", "spills 12 B stores / 12 B loads")]
            assert audit_report.problems(r, {"spill@120"}) == [] and r.stack > 0
            continue
        assert (r.spill_stores, r.spill_loads, r.stack) == (0, 0, 0)
        assert audit_report.problems(r) == [], (cc, audit_report.findings(r))


def test_equal_compile_inputs_build_once_each_judged_by_its_spec(results):
    # copy-flagged[fp32] unaligned and copy-aligned-only[fp32] aligned hand triton.compile what copy[fp32] does in
    # those variants (the kernel, signature, constexprs, options, attrs): one build each, every job judged under its
    # own spec (is_matmul flags the first, not copy[fp32])
    for cc in ARCHS:
        for twin, variant in (("copy-flagged[fp32]", "unaligned"), ("copy-aligned-only[fp32]", "aligned")):
            built, shared = results["copy[fp32]", variant, cc], results[twin, variant, cc]
            assert built.shares is None and built.seconds > 0
            assert shared.shares == built.job and shared.seconds == 0 and shared.cubin == built.cubin
            assert (shared.registers, shared.sass) == (built.registers, built.sass)
        copy, flagged = results["copy[fp32]", "unaligned", cc], results["copy-flagged[fp32]", "unaligned", cc]
        assert audit_report.problems(copy) == [] and audit_report.problems(flagged)
        # edge: other divisibility attrs (copy-flagged marks its pointers only, not n) are another build
        assert results["copy-flagged[fp32]", "aligned", cc].shares is None
    # the table names the build a row reuses in its compile column
    table = audit_report.format_table([results["copy-flagged[fp32]", "unaligned", 90]])
    assert "| = copy[fp32] | sm_90 matmul without wgmma (HGMMA) |" in table


def test_code_key_tells_constexpr_types_and_architectures_apart():
    spec, job = compile_specs()[1], audit_jobs.Job(__name__, 1, "copy[fp32]", 90)
    key = audit_jobs.code_key(spec, job)
    assert audit_jobs.code_key(replace(spec, name="other", is_matmul=True, serves="x"), job) == key
    # edges: True and 1 are other constants to Triton; another architecture, variant or warp count is another build
    assert audit_jobs.code_key(replace(spec, constexprs=dict(BLOCK=512.0)), job) != key
    assert audit_jobs.code_key(replace(spec, constexprs=dict(BLOCK=True)), job) != audit_jobs.code_key(
        replace(spec, constexprs=dict(BLOCK=1)), job
    )
    assert audit_jobs.code_key(spec, replace(job, cc=100)) != key
    assert audit_jobs.code_key(spec, replace(job, variant="aligned")) != key
    assert audit_jobs.code_key(replace(spec, num_warps=8), job) != key


@pytest.mark.parametrize("cc", ARCHS)
def test_aligned_variant_is_the_specialised_build(results, cc):
    # the aligned build vectorises (128-bit loads / cp.async) and pipelines the K loop (more shared memory)
    un, al = results["mm[bf16,64x64x32]", "unaligned", cc], results["mm[bf16,64x64x32]", "aligned", cc]
    assert un.ld128 == 0 and al.ld128 > 0
    assert al.shared > un.shared
    assert not un.sass.main_loop.asynchronous and al.sass.main_loop.ldgsts > 0
    assert un.buffers == () and al.buffers and al.buffers[-1] >= 2
    copy_un, copy_al = results["copy[fp32]", "unaligned", cc], results["copy[fp32]", "aligned", cc]
    assert copy_un.ld128 == 0 and copy_al.ld128 > 0
    # pointers alone (n not known to be a multiple of 16) do not allow full-width vectors
    assert results["copy-flagged[fp32]", "aligned", cc].ld128 == 0
    assert results["copy-aligned-only[fp32]", "aligned", cc].ld128 > 0


def test_non_matmul_passes_without_mma(results):
    for variant in ("unaligned", "aligned"):
        for cc in ARCHS:
            r = results["copy[fp32]", variant, cc]
            assert r.error is None and r.sass.mma == {} and r.sass.loops == ()
            assert audit_report.problems(r) == []


def test_matmul_without_mma_is_flagged_on_every_arch(results):
    names = {80: "mma.sync (HMMA)", 90: "wgmma (HGMMA)", 100: "tcgen05 MMA (UTC*MMA)", 120: "mma.sync (HMMA)"}
    for variant in ("unaligned", "aligned"):
        for cc in ARCHS:
            r = results["copy-flagged[fp32]", variant, cc]
            assert audit_report.problems(r) == [f"sm_{cc} matmul without {names[cc]}"]


@pytest.mark.parametrize("cc", ARCHS)
def test_positive_control_passes_every_check(results, cc):
    # plain pointer loads, 3 stages, 128x128x64 bf16, 8 warps: cp.async waits and wgmma waits stay above zero
    r = results["pipelined[bf16,128x128x64]", "aligned", cc]
    assert r.error is None and audit_report.findings(r) == [], audit_report.findings(r)
    lp = r.sass.main_loop
    assert lp.ldgsts > 0 and lp.cp_async_waits and min(lp.cp_async_waits) > 0
    assert r.ptxas_codes == () and (r.sass.tma_loads, r.sass.tma_stores) == (0, 0)
    if cc == 90:
        assert set(r.sass.mma) == {"HGMMA"} and min(lp.wgmma_waits) > 0 and r.buffers == (3,)
    if cc == 100:
        assert set(r.sass.mma) == {"UTCHMMA"} and r.buffers == (3,)


@pytest.mark.parametrize("cc", ARCHS)
def test_negative_control_is_flagged(results, cc):
    # dsd_act's pattern: the copies are waited to zero every step; on sm_90 the wgmma is serialised (C7515)
    r = results["serialised[bf16,128x128x32]", "aligned", cc]
    assert r.error is None
    lp = r.sass.main_loop
    assert lp.cp_async_wait_zero and 1 in r.buffers
    assert _checks(r) == ({"c7515", "pipeline"} if cc == 90 else {"pipeline"}), audit_report.findings(r)
    if cc == 90:
        assert r.ptxas_codes == ("C7515",) and lp.wgmma_wait_zero and lp.serialised == lp.mma
        assert audit_report.problems(r, {"c7515", "pipeline"}) == []


@pytest.mark.parametrize("cc", [90, 100])
def test_tma_loop_is_not_flagged(results, cc):
    # tensor descriptors: TMA loads in the loop, mbarrier waits, no cp.async; the descriptor set-up and the TMA
    # store wait SB0 to zero outside the loop
    r = results["tma[bf16,128x128x64]", "aligned", cc]
    assert r.error is None and audit_report.findings(r) == [], audit_report.findings(r)
    lp = r.sass.main_loop
    assert lp.tma_loads > 0 and lp.mbarrier_waits > 0 and lp.ldgsts == 0 and lp.cp_async_waits == ()
    assert r.sass.tma_stores > 0 and r.buffers == (3,)


def test_batched_disassembly_matches_cuobjdump(results, monkeypatch):
    # one nvdisasm run over many functions' code, split and rebased == cuobjdump of each cubin (one per arch)
    for cc in ARCHS:
        r = results["tma[bf16,128x128x64]", "aligned", cc]
        ours = audit_sass.parse_sass(Path(r.cubin).with_suffix(".sass").read_text())
        theirs = subprocess.run(
            [audit_sass._tool("cuobjdump"), "--dump-sass", r.cubin], capture_output=True, text=True, check=True
        ).stdout
        assert ours == audit_sass.parse_sass(theirs) and len(ours) > 100
    # nvdisasm refusing the raw code (here: an unknown architecture name): one cuobjdump per cubin instead
    monkeypatch.setitem(audit_sass.ARCHS, 120, audit_sass.Arch(120, "SM00", "mma.sync", 101376))
    assert audit_sass.parse_sass(audit_sass.disassemble(120, [r.cubin])[0]) == audit_sass.parse_sass(theirs)


def test_tables_list_every_build_and_check(results):
    table = audit_report.format_table(list(results.values()), {"pipeline"})
    assert table.count("\n") == 1 + len(results)
    assert "sm_90 matmul without wgmma (HGMMA)" in table and "| ok |" in table
    assert "| mm[bf16,64x64x32] | aligned | sm_90 |" in table and "| copy[fp32] | unaligned | sm_80 |" in table
    assert "every iteration (report-only)" in table and "| C7515 |" in table
    checks = audit_report.format_checks(list(results.values()), {"pipeline"})
    assert checks.count("\n") == 1 + len(audit_report.CHECKS)
    assert "| pipeline | 4 | sm_80 1, sm_90 1, sm_100 1, sm_120 1 | no (report-only) |" in checks
    assert "| c7515 | 1 | sm_90 1 | yes |" in checks and "| smem | 0 | - | yes |" in checks
    assert "| spill | 1 | sm_120 1 | yes, not on sm_120 |" in audit_report.format_checks(
        list(results.values()), {"spill@120"}
    )


def test_failed_build_is_reported():
    r = audit_jobs.compile_job(audit_jobs.Job(__name__, 99, "missing", 90), "/nonexistent")
    assert r.error and r.error.startswith("IndexError") and audit_report.problems(r) == [f"build failed: {r.error}"]
    # a variant the spec does not list (the launcher never runs it) is an error, not a silent build
    r = audit_jobs.compile_job(audit_jobs.Job(__name__, 3, "copy-aligned-only[fp32]", 90, "unaligned"), "/nonexistent")
    assert r.error and "variant 'unaligned' not in" in r.error


def test_main_exit_status_and_report_only(capsys, tmp_path):
    base = ["--modules", __name__, "--arch", "90", "--jobs", "1", "--out", str(tmp_path)]
    # the flagged spec makes the audit fail (unaligned only: the aligned-only specs drop out)
    assert audit_main.main([*base, "--variants", "unaligned"]) == 1
    out = capsys.readouterr().out
    assert "sm_90 matmul without wgmma (HGMMA)" in out and "3 builds, 1 failing" in out
    # --only leaves the flagged spec out: exit 0
    assert audit_main.main([*base, "--only", "copy["]) == 0
    assert "2 builds, 0 failing" in capsys.readouterr().out
    # the negative control fails on c7515 and pipeline; reported, not failed, with --report-only
    assert audit_main.main([*base, "--only", "serialised"]) == 1
    assert audit_main.main([*base, "--only", "serialised", "--report-only", "pipeline,c7515"]) == 0
    out = capsys.readouterr().out
    assert (
        "1 builds, 0 failing, 1 with report-only findings" in out
        and "| c7515 | 1 | sm_90 1 | no (report-only) |" in out
    )
    # edges: nothing matches the filter; an unknown check name
    assert audit_main.main(["--modules", __name__, "--only", "no-such-kernel"]) == 1
    with pytest.raises(SystemExit):
        audit_main.main([*base, "--report-only", "pipeline,nope,spill@89"])
    err = capsys.readouterr().err
    assert (
        "checks must be among build, spill, mma, fp8mma, c7515, pipeline, smem, issue, intensity, occupancy, each "
        "optionally @ one of 80, 90, 100, " in err
    )
    assert "got nope, spill@89" in err
