"""FP8 (E4M3) quantization of GEMM operands: one scale per group of elements, computed on the device (amax per
group), bit for bit the reference of ``blocksparse_moe.fp8`` (its docstring states the arithmetic: IEEE division,
clamp to ±448, round to nearest even, fp32 or E8M0 scales, NaN propagation).

Glossary (a batch of B matrices ``[R, C]``: B = E for expert weights, 1 for rows):

- group ``(GR, GC)``: the elements sharing a scale: ``(1, G)`` along the columns (activations, the reduced
  dimension K), ``(G, 1)`` along the rows (a weight gradient's operands, reduced over the tokens), ``(G, G)``
  blocks (``"blockwise"`` weights); G may be the whole dimension (``"rowwise"``).
- ``bounds [nR + 1]`` int64 (optional): the row range of each row group (``fp8.row_groups``: groups of one
  expert's rows), instead of ``GR`` rows each (``RowGroups``, built once per backward by ``row_groups``).
- ``q_bounds [nR + 1]`` int64 (optional, ``Q_BOUNDS``): the row range of each row group in q when q's expert
  segments are padded to 16 rows (``fp8.pad_rows``: the grouped strategy's weight-gradient operands, K-major
  through TMA): group g's rows go to q's rows ``q_bounds[g]`` on, zeros after them up to ``q_bounds[g + 1]``,
  written by the same program in the same pass.
- ``scale [B, nR, nC]``: fp32 ``amax / 448``, or uint8 E8M0 biased exponents.
- ``src_scale [R, nSC]`` (optional, ``SRC_SCALE``): the input is itself E4M3 with these scales along its columns
  (groups of ``SG`` columns: the forward's x, saved for backward), read as ``q · s`` in fp32 (``fp8.dequantize``)
  and quantized again (``quantize_rows(..., dequantize=)``: x's weight-gradient layout).
- ``row_src [R]`` int32 (optional, ``ROW_SRC``): row r of the input is t's row ``row_src[r]`` (-1: a zero row), read
  through it (and its scales' row too): token rows gathered into expert order in the quantize pass itself
  (``quantize_rows(..., row_src=)``: x's weight-gradient layout, without a gathered copy).

Kernels and grids (sized from shapes):

- ``quantize_kernel``, one program per row group (or ``TR`` rows) × column group (or ``TC`` columns) × matrix:
  ``(nR or cdiv(R, TR), nC or cdiv(C, TC), B)``. Each program reads its groups twice (the maxima, then the
  quantization), ``TR × TC`` elements at a time, so a group may be as long as a dimension.
- ``quantize_dual_kernel``: a weight-gradient operand that also feeds a GEMM reducing over its columns (dh, dg) in
  both layouts at once, groups of ``G`` columns per row and of one expert's rows (at most ``G``) per column; one
  program per row group × ``G`` columns, ``(nR, cdiv(C, G))``, two reads of each element in all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import fp8 as fp8_reference
from ..validation import check_dtype, check_tensor, positive_int
from ._common import check_grid_y

__all__ = [
    "quantize_config",
    "quantize",
    "RowGroups",
    "row_groups",
    "quantize_rows",
    "quantize_dual",
    "fake_quantize",
    "fake_quantize_rows",
    "fake_quantize_dual",
    "QUANTIZER",
    "quantize_kernel",
    "quantize_dual_kernel",
    "e4m3_bits",
    "e4m3_to_fp32",
    "e8m0_value",
    "bf16_to_fp32",
    "load_fp32",
    "scale_and_divisor",
    "quantized_bits",
    "quantize_row_groups",
]

_MAX_TILE = 128
_TILE = 2048  # elements per step (GPU and interpreter alike: the interpreter's cost is per step)


def quantize_config(group: tuple[int, int], dequantize: bool = False) -> tuple[int, int, int]:
    """``(TR, TC, num_warps)`` for groups ``(GR, GC)``: ``TR × TC`` elements per step (2048: 16 fp32 per thread of 4
    warps, no spills; the interpreter runs the GPU's tiles: the tests' odd sizes cross them, and its cost is per
    step, not per element), the tile spanning a group along its reduced dimension up to 128 (columns first), the
    rest across. ``dequantize`` (an E4M3 input read with its scales, ``SRC_SCALE``): 8 warps, 8 elements per thread
    (4 warps spill 4-8 B on sm_90 / sm_100 with E8M0 scales: the per-element scale pointers)."""
    GR, GC = group
    warps = 8 if dequantize else 4
    if GC > 1:
        TC = min(_MAX_TILE, triton.next_power_of_2(GC))
        across = _TILE // TC
        return (across if GR == 1 else min(triton.next_power_of_2(GR), across)), TC, warps
    TR = min(_MAX_TILE, triton.next_power_of_2(GR))
    return TR, _TILE // TR, warps


@triton.jit
def e4m3_bits(x):
    """The E4M3 (fn) bits of fp32 ``x`` (|x| ≤ 448 or NaN) rounded to nearest even, as uint8: integer math, the same
    on the GPU and in the interpreter (whose ``.to(tl.float8e4nv)`` rounds some values wrongly in Triton 3.9)."""
    bits = x.to(tl.int32, bitcast=True)
    sign = ((bits >> 24) & 0x80).to(tl.int32)
    mag = bits & 0x7FFFFFFF
    # normal E4M3 (|x| >= 2^-6): round the 23-bit mantissa to 3 bits, half to even, then rebias 127 -> 7
    rounded = (mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20
    normal = rounded - ((127 - 7) << 3)
    # subnormal E4M3 (|x| < 2^-6): multiples of 2^-9, rounded half to even by the fp32 addition of 2^23
    y = tl.abs(x) * 512.0
    sub = ((y + 8388608.0) - 8388608.0).to(tl.int32)
    out = tl.where(mag < 0x3C800000, sub, normal)  # 0x3C800000: 2^-6
    out = tl.where(x != x, 0x7F, out)
    return (out | sign).to(tl.uint8)


@triton.jit
def bf16_to_fp32(bits):
    """fp32 values of bf16 elements given as their int16 ``bits``, widened by a shift: exact for every bf16,
    denormals included (Triton 3.9's interpreter converts bf16 denormals wrongly)."""
    return (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_to_fp32(bits):
    """fp32 values of E4M3 (fn) elements given as their uint8 ``bits``: exact (normals rebiased, subnormals ``m ·
    2^-9``, -0 kept), NaN for 0x7F / 0xFF; integer math, as ``e4m3_bits``."""
    b = bits.to(tl.int32)
    sign = (b & 0x80) << 24
    e = (b >> 3) & 0xF
    m = b & 0x7
    normal = (sign | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125  # m · 2^-9
    sub = tl.where(sign != 0, -sub, sub)  # -0 kept
    v = tl.where(e == 0, sub, normal)
    return tl.where((b & 0x7F) == 0x7F, float("nan"), v)


@triton.jit
def e8m0_value(biased):
    """The fp32 value of E8M0 biased exponents (int32): ``2^(b - 127)``, ``2^-127`` for 0, NaN for 255."""
    bits = tl.where(biased == 0, 1 << 22, tl.where(biased == 255, 0x7FC00000, biased << 23))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def load_fp32(ptrs, mask, BF16_BITS: tl.constexpr):
    """fp32 values of the input elements at ``ptrs``: bf16 read as its 16 bits (``bf16_to_fp32``), other dtypes
    cast."""
    if BF16_BITS:
        return bf16_to_fp32(tl.load(ptrs, mask=mask, other=0))
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def scale_and_divisor(amax, E8M0: tl.constexpr):
    """The stored scale of groups with maxima ``amax`` (fp32 ``amax / 448``, or the E8M0 biased exponent as uint8)
    and the fp32 value the group is divided by (``fp8`` module docstring)."""
    r = tl.div_rn(amax, 448.0)
    if E8M0:  # one return at the end: an early one does not compile when the caller is inside a loop
        bits = r.to(tl.int32, bitcast=True)
        exponent = (bits >> 23) & 0xFF
        biased = tl.where(exponent == 255, 255, tl.minimum(exponent + ((bits & 0x7FFFFF) != 0).to(tl.int32), 254))
        scale = biased.to(tl.uint8)
        divisor = e8m0_value(biased)
    else:
        scale = r
        divisor = tl.where(r == 0, 1.0, r)
    return scale, divisor


@triton.jit
def quantized_bits(v, divisor):
    """E4M3 bits of ``e4m3(clamp(v / divisor, -448, 448))`` (IEEE division, NaN kept)."""
    q = tl.div_rn(v, divisor + tl.zeros_like(v))
    return e4m3_bits(tl.where(q > 448.0, 448.0, tl.where(q < -448.0, -448.0, q)))


@triton.jit
def quantize_row_groups(v, E8M0: tl.constexpr):
    """Each row of fp32 ``v [M, G]`` one group (absent elements given as 0): ``(E4M3 bits [M, G], scale [M, 1])``,
    the amax NaN where the row holds a NaN (``tl.max`` drops NaN: the flags are reduced beside the maxima). Used by
    ``quantize_dual_kernel`` and by ``expert_gemm``'s forward epilogue (``a`` quantized in the up-projection)."""
    a = tl.abs(v)
    nan = tl.max((a != a).to(tl.int32), axis=1, keep_dims=True)
    amax = tl.where(nan > 0, float("nan"), tl.max(a, axis=1, keep_dims=True))
    scale, divisor = scale_and_divisor(amax, E8M0)
    return quantized_bits(v, divisor), scale


@triton.jit
def _output_rows(q_bounds_ptr, pid_r, lo_r, hi_r, Q_BOUNDS: tl.constexpr):
    """The rows program ``pid_r`` writes its quantized rows ``[lo_r, hi_r)`` to: ``q_bounds[pid_r : pid_r + 2]``
    with ``Q_BOUNDS`` (a padded output layout: the group's rows first, zero rows up to its end), the same rows
    otherwise."""
    if Q_BOUNDS:
        lo_q = tl.load(q_bounds_ptr + pid_r).to(tl.int32)
        hi_q = tl.load(q_bounds_ptr + pid_r + 1).to(tl.int32)
    else:
        lo_q = lo_r
        hi_q = hi_r
    return lo_q, hi_q


@triton.jit
def _load_input(
    t_ptr, src_s_ptr, row_src_ptr, rows, row_mask, cols, s_tr, s_tc, s_sr, SG, mask, BF16_BITS: tl.constexpr,
    SRC_SCALE: tl.constexpr, ROW_SRC: tl.constexpr,
):  # fmt: skip
    """fp32 values of the input at ``(rows, cols)``: ``load_fp32``, or (``SRC_SCALE`` 1: fp32 scales, 2: E8M0) E4M3
    bits times their scales of ``SG`` columns each, ``q · s`` in fp32 (``fp8.dequantize``); absent elements 0.
    ``ROW_SRC``: row r is t's row ``row_src[r]`` (``row_mask``: the rows that exist; -1: a zero row)."""
    if ROW_SRC:
        rows = tl.load(row_src_ptr + rows, mask=row_mask, other=-1)
        mask = mask & (rows >= 0)[:, None]
    ptrs = t_ptr + rows[:, None] * s_tr + cols[None, :] * s_tc
    if SRC_SCALE:  # one return at the end (scale_and_divisor)
        s_ptrs = src_s_ptr + rows[:, None] * s_sr + (cols // SG)[None, :]
        if SRC_SCALE == 2:
            s = e8m0_value(tl.load(s_ptrs, mask=mask, other=0).to(tl.int32))
        else:
            s = tl.load(s_ptrs, mask=mask, other=0.0)
        v = e4m3_to_fp32(tl.load(ptrs, mask=mask, other=0)) * s
    else:
        v = load_fp32(ptrs, mask, BF16_BITS)
    return v


@triton.jit
def quantize_kernel(
    t_ptr,  # [B, R, C] input (fp32 / fp16, or bf16 as int16 bits: BF16_BITS), strides (s_tb, s_tr, s_tc)
    q_ptr,  # [B, R, C] E4M3 output (its uint8 bits), matrices R·C apart, strides (s_qr, s_qc) inside
    s_ptr,  # [B, nR, nC] scales (fp32, or uint8 E8M0), contiguous
    bounds_ptr,  # [nR + 1] int64 row bounds of the row groups (ROW_BOUNDS), else unused
    q_bounds_ptr,  # [nR + 1] int64 q's row bounds of the row groups (Q_BOUNDS: padded rows), else unused
    src_s_ptr,  # [R, nSC] scales of an E4M3 input along its columns, row stride s_sr (SRC_SCALE), else unused
    row_src_ptr,  # [R] int32 t's row of each row, -1 for a zero row (ROW_SRC), else unused
    R,
    C,
    nR,
    nC,
    GR,
    GC,
    SG,  # (SRC_SCALE) columns per input scale
    s_tb,
    s_tr,
    s_tc,
    s_qr,
    s_qc,
    s_sr,
    REDUCE_ROWS: tl.constexpr,  # GR > 1 (or ROW_BOUNDS): a scale covers several rows
    REDUCE_COLS: tl.constexpr,  # GC > 1: a scale covers several columns
    ROW_BOUNDS: tl.constexpr,
    Q_BOUNDS: tl.constexpr,  # (ROW_BOUNDS, B = 1) q's rows of group g: q_bounds[g] ..., its rows then zeros
    E8M0: tl.constexpr,
    BF16_BITS: tl.constexpr,
    SRC_SCALE: tl.constexpr,  # 0; 1 / 2: t is E4M3 (uint8 bits, B = 1) with fp32 / E8M0 scales src_s: t · s quantized
    ROW_SRC: tl.constexpr,  # (B = 1) row r of the input is t's row row_src[r] (src_s's too)
    TR: tl.constexpr,
    TC: tl.constexpr,
):
    """Quantize the groups of one program (module docstring); a scale group must reduce rows or columns or both.
    ``Q_BOUNDS``: group g's rows are written to q's rows ``q_bounds[g]`` on, the rows after them up to
    ``q_bounds[g + 1]`` zero (the padded layout: expert segments of a multiple of 16 rows)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    if REDUCE_ROWS:
        if ROW_BOUNDS:
            lo_r = tl.load(bounds_ptr + pid_r).to(tl.int32)
            hi_r = tl.load(bounds_ptr + pid_r + 1).to(tl.int32)
        else:
            lo_r = pid_r * GR
            hi_r = tl.minimum(lo_r + GR, R)
    else:
        lo_r = pid_r * TR
        hi_r = tl.minimum(lo_r + TR, R)
    lo_q, hi_q = _output_rows(q_bounds_ptr, pid_r, lo_r, hi_r, Q_BOUNDS)
    if REDUCE_COLS:
        lo_c = pid_c * GC
        hi_c = tl.minimum(lo_c + GC, C)
    else:
        lo_c = pid_c * TC
        hi_c = tl.minimum(lo_c + TC, C)
    t_ptr += b * s_tb
    q_ptr += b * R * C
    ar = tl.arange(0, TR)
    ac = tl.arange(0, TC)

    # pass 1: |t| maxima and NaN flags, elementwise over the tiles, then over the reduced dimensions
    m = tl.zeros((TR, TC), dtype=tl.float32)
    for r0 in range(lo_r, hi_r, TR):
        rows = r0 + ar
        for c0 in range(lo_c, hi_c, TC):
            cols = c0 + ac
            mask = (rows < hi_r)[:, None] & (cols < hi_c)[None, :]
            v = _load_input(
                t_ptr, src_s_ptr, row_src_ptr, rows, rows < hi_r, cols, s_tr, s_tc, s_sr, SG, mask, BF16_BITS,
                SRC_SCALE, ROW_SRC,
            )  # fmt: skip
            m = tl.maximum(m, tl.abs(v), propagate_nan=tl.PropagateNan.ALL)
    nan = (m != m).to(tl.int32)  # tl.max drops NaN: the flags are reduced beside the maxima
    if REDUCE_ROWS:
        m = tl.max(m, axis=0, keep_dims=True)
        nan = tl.max(nan, axis=0, keep_dims=True)
    if REDUCE_COLS:
        m = tl.max(m, axis=1, keep_dims=True)
        nan = tl.max(nan, axis=1, keep_dims=True)
    amax = tl.where(nan > 0, float("nan"), m)

    scale, divisor = scale_and_divisor(amax, E8M0)
    if REDUCE_ROWS:
        s_rows = pid_r + tl.zeros((1, 1), dtype=tl.int32)
        s_rmask = s_rows < nR
    else:
        s_rows = (lo_r + ar)[:, None]
        s_rmask = s_rows < hi_r
    if REDUCE_COLS:
        s_cols = pid_c + tl.zeros((1, 1), dtype=tl.int32)
        s_cmask = s_cols < nC
    else:
        s_cols = (lo_c + ac)[None, :]
        s_cmask = s_cols < hi_c
    tl.store(s_ptr + b * nR * nC + s_rows * nC + s_cols, scale, mask=s_rmask & s_cmask)

    # pass 2: q = e4m3(clamp(t / divisor, -448, 448)), NaN kept (Q_BOUNDS: over q's rows, zeros past the group's)
    for q0 in range(lo_q, hi_q, TR):
        q_rows = q0 + ar
        rows = q_rows + (lo_r - lo_q) if Q_BOUNDS else q_rows
        for c0 in range(lo_c, hi_c, TC):
            cols = c0 + ac
            mask = (rows < hi_r)[:, None] & (cols < hi_c)[None, :]
            v = _load_input(
                t_ptr, src_s_ptr, row_src_ptr, rows, rows < hi_r, cols, s_tr, s_tc, s_sr, SG, mask, BF16_BITS,
                SRC_SCALE, ROW_SRC,
            )  # fmt: skip
            bits = quantized_bits(v, divisor)
            if Q_BOUNDS:  # padding rows: zeros, whatever the scale (never 0 / NaN)
                bits = tl.where(mask, bits, 0)
                mask = (q_rows < hi_q)[:, None] & (cols < hi_c)[None, :]
            tl.store(q_ptr + q_rows[:, None] * s_qr + cols[None, :] * s_qc, bits, mask=mask)


@triton.jit
def quantize_dual_kernel(
    t_ptr,  # [R, C] expert-sorted rows (fp32 / fp16, or bf16 as int16 bits: BF16_BITS), strides (s_tr, s_tc)
    qr_ptr,  # [R, C] E4M3 bits, groups of G along the columns (a GEMM reducing over C), contiguous
    sr_ptr,  # [R, nC] their scales
    qc_ptr,  # [R, C] E4M3 bits, groups of one expert's rows per column (a weight gradient reducing over R), strides
    # (s_qcr, s_qcc): row-major, or transposed (s_qcr = 1: the column-major storage a K-major MMA operand wants)
    sc_ptr,  # [nR, C] their scales
    bounds_ptr,  # [nR + 1] int64 row bounds of the row groups (at most G rows each)
    q_bounds_ptr,  # [nR + 1] int64 qc's row bounds of the row groups (Q_BOUNDS: padded rows), else unused
    R,
    C,
    nC,
    G,
    s_tr,
    s_tc,
    s_qcr,
    s_qcc,
    Q_BOUNDS: tl.constexpr,  # qc's rows of group g: q_bounds[g] ..., its rows then zeros (as quantize_kernel's)
    E8M0: tl.constexpr,
    BF16_BITS: tl.constexpr,
    TR: tl.constexpr,  # rows per step
    TG: tl.constexpr,  # next power of two >= G: the columns of the program
):
    """Both layouts of a weight-gradient operand in one read of each element per pass: program (row group, G
    columns). Pass 1 walks the group's rows in steps of TR: each row's G columns are one row-layout group (scale and
    values written at once), and the column maxima accumulate; pass 2 writes the column layout."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    lo_r = tl.load(bounds_ptr + pid_r).to(tl.int32)
    hi_r = tl.load(bounds_ptr + pid_r + 1).to(tl.int32)
    cols = pid_c * G + tl.arange(0, TG)
    cmask = (cols < C) & (tl.arange(0, TG) < G)
    ar = tl.arange(0, TR)
    m = tl.zeros((TR, TG), dtype=tl.float32)
    for r0 in range(lo_r, hi_r, TR):
        rows = r0 + ar
        mask = (rows < hi_r)[:, None] & cmask[None, :]
        v = load_fp32(t_ptr + rows[:, None] * s_tr + cols[None, :] * s_tc, mask, BF16_BITS)
        m = tl.maximum(m, tl.abs(v), propagate_nan=tl.PropagateNan.ALL)
        bits, scale = quantize_row_groups(v, E8M0)
        tl.store(sr_ptr + rows[:, None] * nC + pid_c, scale, mask=(rows < hi_r)[:, None])
        tl.store(qr_ptr + rows[:, None] * C + cols[None, :], bits, mask=mask)
    col_nan = tl.max((m != m).to(tl.int32), axis=0, keep_dims=True)
    col_amax = tl.where(col_nan > 0, float("nan"), tl.max(m, axis=0, keep_dims=True))
    scale, divisor = scale_and_divisor(col_amax, E8M0)
    tl.store(sc_ptr + pid_r * C + cols[None, :], scale, mask=cmask[None, :])
    lo_q, hi_q = _output_rows(q_bounds_ptr, pid_r, lo_r, hi_r, Q_BOUNDS)
    for q0 in range(lo_q, hi_q, TR):
        q_rows = q0 + ar
        rows = q_rows + (lo_r - lo_q) if Q_BOUNDS else q_rows
        mask = (rows < hi_r)[:, None] & cmask[None, :]
        v = load_fp32(t_ptr + rows[:, None] * s_tr + cols[None, :] * s_tc, mask, BF16_BITS)
        bits = quantized_bits(v, divisor)
        if Q_BOUNDS:  # padding rows: zeros, whatever the scale
            bits = tl.where(mask, bits, 0)
            mask = (q_rows < hi_q)[:, None] & cmask[None, :]
        tl.store(qc_ptr + q_rows[:, None] * s_qcr + cols[None, :] * s_qcc, bits, mask=mask)


# ----------------------------------------------------------------------------------------------- launchers


def new(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every tensor the launchers return is allocated here, uninitialised (the tests poison it instead)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(
    t: torch.Tensor,
    group: tuple[int, int],
    scale_dtype: torch.dtype,
    rows: RowGroups | None,
    transposed: bool = False,
    source: tuple[torch.Tensor, int] | None = None,
    row_src: torch.Tensor | None = None,
):
    """``t [R, C]`` or ``[B, R, C]`` → ``(q, scale)``; ``rows``: the row groups (``GR`` unused; B = 1), q over its
    ``rows.rows`` rows (padded when ``rows.align > 1``); ``transposed``: q stored column-major (``_q_out``);
    ``source = (src_scale, SG)``: t ``[R, C]`` is E4M3 with these scales of ``SG`` columns each (``SRC_SCALE``);
    ``row_src [R]``: the input's rows are t's rows ``row_src`` (-1: zero), t ``[T, C]`` (``ROW_SRC``)."""
    batched = t.dim() == 3
    t3 = t if batched else t.unsqueeze(0)
    B, R, C = t3.shape
    if row_src is not None:
        R = row_src.shape[0]
    GR, GC = group
    nR = rows.bounds.shape[0] - 1 if rows is not None else -(-R // GR)
    nC = -(-C // GC)
    padded = rows is not None and rows.align > 1
    q = _q_out((B, rows.rows if padded else R, C), t.device, transposed)
    scale = new((B, nR, nC), scale_dtype, t.device)
    reduce_rows, reduce_cols = rows is not None or GR > 1, GC > 1
    if not (reduce_rows or reduce_cols):
        raise ValueError(f"a quantization group must span more than one element, got {group}")
    TR, TC, num_warps = quantize_config((R if rows is not None else GR, GC), source is not None)
    bf16 = t.dtype == torch.bfloat16
    if B and R and C:
        grid = (nR if reduce_rows else triton.cdiv(R, TR), nC if reduce_cols else triton.cdiv(C, TC), B)
        check_grid_y(grid, "the number of column groups", C, GC if reduce_cols else TC)
        bounds = t3 if rows is None else rows.source_bounds
        src_scale, SG = (scale, 1) if source is None else source  # a placeholder pointer without a source scale
        src = 0 if source is None else 1 if src_scale.dtype == torch.float32 else 2
        data = t3.view(torch.uint8) if src else t3.view(torch.int16) if bf16 else t3
        quantize_kernel[grid](
            data, q.view(torch.uint8), scale, bounds, rows.bounds if padded else bounds, src_scale,
            bounds if row_src is None else row_src, R, C, nR, nC, GR, GC, SG, *t3.stride(), *q.stride()[1:],
            src_scale.stride(-2), REDUCE_ROWS=reduce_rows, REDUCE_COLS=reduce_cols, ROW_BOUNDS=rows is not None,
            Q_BOUNDS=padded, E8M0=scale_dtype == torch.uint8, BF16_BITS=bf16, SRC_SCALE=src,
            ROW_SRC=row_src is not None, TR=TR, TC=TC, num_warps=num_warps,
        )  # fmt: skip
    else:
        _empty(q, scale, padded)
    if not batched:
        return q[0], scale[0]
    return q, scale


def _empty(q: torch.Tensor, scale: torch.Tensor, padded: bool) -> None:
    """The outputs of an input with no element: scales of amax 0; q's rows, all padding when ``padded``, zero."""
    if scale.numel():
        scale.zero_()
    if padded and q.numel():
        q.view(torch.uint8).zero_()


def _q_out(shape: tuple[int, ...], device: torch.device, transposed: bool) -> torch.Tensor:
    """The E4M3 output ``[..., R, C]``: row-major, or (``transposed``) the transposed view of a contiguous ``[...,
    C, R]``, column-major: the storage an FP8 MMA reading it as a K-major operand wants when the GEMM reduces over R
    (a weight gradient's operands; sm_90's E4M3 wgmma reads K-major tiles only)."""
    if not transposed:
        return new(shape, fp8_reference.E4M3, device)
    return new((*shape[:-2], shape[-1], shape[-2]), fp8_reference.E4M3, device).transpose(-1, -2)


def _whole(block: tuple[int | None, int | None], R: int, C: int) -> tuple[int, int]:
    return (max(R, 1) if block[0] is None else block[0]), (max(C, 1) if block[1] is None else block[1])


def quantize(
    t: torch.Tensor, block: tuple[int | None, int | None], scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fp8.quantize`` on the kernel: ``t [R, C]`` or ``[B, R, C]`` → ``(q E4M3, scale [.., ceil(R / br),
    ceil(C / bc)])``."""
    return _launch(t, _whole(block, *t.shape[-2:]), scale_dtype, None)


@dataclass(frozen=True)
class RowGroups:
    """The row groups of a weight gradient's operands (``fp8.row_groups``: groups of ``group`` rows of one expert,
    None: all its rows), found on the device (no host sync) once per backward and shared by its ``quantize_rows`` /
    ``quantize_dual`` calls and ``wgrad``'s scales (``row_groups`` builds it). The quantized rows (q) are the input's
    ``[R, C]`` expert-sorted rows (``align`` 1), or the same rows with each expert's segment padded to a multiple of
    ``align`` rows (zero rows after its own: ``fp8.pad_rows``), so that a K-major E4M3 operand's expert offsets are
    16-aligned (``wgrad(..., row_align=16)``: its TMA path). The groups are the same either way (``align`` divides
    the group): the scales too."""

    group: int | None  # rows per group (None: one group per expert)
    align: int  # q's expert segments padded to multiples of it (1: q's rows are the input's)
    input_rows: int  # R, the rows of the inputs these groups quantize
    offsets: torch.Tensor  # [E + 1] expert offsets of q's rows (``fp8.padded_offsets`` for align > 1), offsets' dtype
    rows: int  # q's rows: the input's R, or the bound ``fp8.padded_rows(R, E, align)``
    ids: torch.Tensor  # [rows] int64 group of each of q's rows (``fp8.row_groups`` over q's rows)
    bounds: torch.Tensor  # [n + 2] int64 q's row bounds of the groups (the last group: the rows past offsets[E])
    source_bounds: torch.Tensor  # [n + 2] int64 the input's row bounds of the groups (align 1: bounds)
    group_offsets: torch.Tensor  # [E + 1] int32 first group of each expert (``fp8.group_offsets``: WgradScales')


def row_groups(offsets: torch.Tensor, rows: int, group: int | None, align: int = 1) -> RowGroups:
    """The ``RowGroups`` of ``rows`` expert-sorted rows with expert ``offsets`` ``[E + 1]`` in groups of ``group``
    rows, q's rows padded to multiples of ``align`` (a divisor of ``group``; 1: not padded). Padded, each group's
    input rows start where its q rows start less the padding before it; the last group (the rows past
    ``offsets[E]``) follows the padded experts, zeros after it up to the bound."""
    positive_int("row_groups: align", align)
    if group is not None and group % align:
        raise ValueError(f"row_groups: align must divide the group, got align {align} and group {group}")
    q_offsets = offsets if align == 1 else fp8_reference.padded_offsets(offsets, align)
    q_rows = rows if align == 1 else fp8_reference.padded_rows(rows, offsets.shape[0] - 1, align)
    ids, n = fp8_reference.row_groups(q_offsets, q_rows, group)
    bounds = torch.searchsorted(ids, torch.arange(n + 2, device=offsets.device))
    source = bounds
    if align > 1:
        off, q_off = offsets.long(), q_offsets.long()
        e = torch.searchsorted(q_off, bounds[:-1], right=True) - 1  # the expert of each group's first q row (E: none)
        source = torch.cat([bounds[:-1] - (q_off[e] - off[e]), bounds.new_full((1,), rows)])
    first = fp8_reference.group_offsets(q_offsets, group).to(torch.int32)
    return RowGroups(group, align, rows, q_offsets, q_rows, ids, bounds, source, first)


def _check_rows(op: str, t: torch.Tensor, rows: RowGroups, row_src: torch.Tensor | None = None) -> None:
    if not isinstance(rows, RowGroups):
        raise TypeError(f"{op}: rows must be a RowGroups (row_groups), got {type(rows).__name__}")
    if row_src is not None:
        check_tensor(f"{op}: row_src", row_src, "[R]", (rows.input_rows,))
        check_dtype(f"{op}: row_src", row_src, (torch.int32,))
        if t.dim() != 2:
            raise ValueError(f"{op}: t must have shape [T, C] (the rows row_src reads), got {tuple(t.shape)}")
        return
    if t.dim() != 2 or t.shape[0] != rows.input_rows:
        raise ValueError(f"{op}: t must have shape [R, C] with R = rows.input_rows = {rows.input_rows} (the rows the "
                         f"groups were built for), got {tuple(t.shape)}")  # fmt: skip


def quantize_rows(
    t: torch.Tensor,
    rows: RowGroups,
    scale_dtype: torch.dtype = torch.float32,
    transposed: bool = False,
    dequantize: tuple[torch.Tensor, int | None] | None = None,
    row_src: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fp8.quantize_rows`` on the kernel: expert-sorted rows ``t [R, C]`` → ``(q [rows.rows, C], scale [n + 1,
    C])``, one scale per column and row group (``rows``, a ``RowGroups`` of these R rows; ``rows.ids`` maps q's rows
    to their scale rows); padded (``rows.align > 1``): ``fp8.quantize_rows`` of ``fp8.pad_rows(t)``, its padding
    rows zero. ``transposed``: q column-major (``_q_out``), for a weight gradient's K-major reads.
    ``dequantize = (t_scale, group)``: t is E4M3 with scales ``t_scale [R, ceil(C / group)]`` (fp32 or E8M0, group
    None: one per row) along its columns, and the rows quantized are ``fp8.dequantize(t, t_scale, (1, group))``,
    read in the same pass (no fp32 copy). ``row_src [R]`` (int32): the rows quantized are t's rows ``row_src``
    (``t [T, C]``; -1: a zero row), read through it in the same pass (and the rows of ``t_scale``): bit for bit the
    quantization of the gathered rows, without them."""
    _check_rows("quantize_rows", t, rows, row_src)
    if dequantize is None:
        return _launch(t, (1, 1), scale_dtype, rows, transposed, row_src=row_src)
    t_scale, group = dequantize
    check_dtype("quantize_rows: t (with dequantize)", t, (fp8_reference.E4M3,))
    check_dtype("quantize_rows: dequantize's scale", t_scale, (torch.float32, torch.uint8))
    C = t.shape[1]
    want = (t.shape[0], 1 if group is None else -(-C // positive_int("quantize_rows: dequantize's group", group)))
    if tuple(t_scale.shape) != want:
        raise ValueError(f"quantize_rows: dequantize's scale must have shape {want} (one per row and group of "
                         f"{group} columns of t {tuple(t.shape)}), got {tuple(t_scale.shape)}")  # fmt: skip
    source = (t_scale, max(C, 1) if group is None else group)
    return _launch(t, (1, 1), scale_dtype, rows, transposed, source, row_src)


def quantize_dual(
    t: torch.Tensor, rows: RowGroups, scale_dtype: torch.dtype = torch.float32, transposed: bool = False
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Expert-sorted rows ``t [R, C]`` in both layouts a weight-gradient operand needs: ``quantize(t, (1, G))`` (for
    the GEMM reducing over C; G = ``rows.group``) and ``quantize_rows(t, rows)`` (for the weight gradient; padded
    and ``transposed`` as there), from one kernel that reads each element once per pass (``quantize_dual_kernel``).
    A group of None (``"rowwise"``: whole dimensions, which one program cannot hold) runs the two launchers
    instead."""
    _check_rows("quantize_dual", t, rows)
    group = rows.group
    if group is None:
        return quantize(t, (1, None), scale_dtype), quantize_rows(t, rows, scale_dtype, transposed)
    R, C = t.shape
    n = rows.bounds.shape[0] - 2
    nC = -(-C // group)
    padded = rows.align > 1
    q_rows, s_rows = new((R, C), fp8_reference.E4M3, t.device), new((R, nC), scale_dtype, t.device)
    q_cols, s_cols = _q_out((rows.rows, C), t.device, transposed), new((n + 1, C), scale_dtype, t.device)
    TG = triton.next_power_of_2(group)
    TR = max(1, _TILE // TG)
    bf16 = t.dtype == torch.bfloat16
    if R and C:
        grid = check_grid_y((n + 1, nC), "the number of column groups", C, group)
        quantize_dual_kernel[grid](
            t.view(torch.int16) if bf16 else t, q_rows.view(torch.uint8), s_rows, q_cols.view(torch.uint8), s_cols,
            rows.source_bounds, rows.bounds, R, C, nC, group, *t.stride(), *q_cols.stride(), Q_BOUNDS=padded,
            E8M0=scale_dtype == torch.uint8, BF16_BITS=bf16, TR=TR, TG=TG, num_warps=4,
        )  # fmt: skip
    else:
        _empty(q_cols, s_cols, padded)
    return (q_rows, s_rows), (q_cols, s_cols)


def fake_quantize(
    t: torch.Tensor, block: tuple[int | None, int | None], scale_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``fp8.fake_quantize`` with the kernel's quantization."""
    return fp8_reference.dequantize(*quantize(t, block, scale_dtype), block)


def fake_quantize_rows(
    t: torch.Tensor, offsets: torch.Tensor, group: int | None, scale_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``fp8.fake_quantize_rows`` with the kernel's quantization."""
    rows = row_groups(offsets, t.shape[0], group)
    q, scale = quantize_rows(t, rows, scale_dtype)
    return q.float() * fp8_reference.scale_value(scale)[rows.ids]


def fake_quantize_dual(
    t: torch.Tensor, offsets: torch.Tensor, group: int | None, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fp8.fake_quantize_dual`` with the kernel's quantization (``quantize_dual``)."""
    rows = row_groups(offsets, t.shape[0], group)
    (q_rows, s_rows), (q_cols, s_cols) = quantize_dual(t, rows, scale_dtype)
    along_columns = fp8_reference.dequantize(q_rows, s_rows, (1, group))
    return along_columns, q_cols.float() * fp8_reference.scale_value(s_cols)[rows.ids]


QUANTIZER = fp8_reference.Quantizer(quantize, fake_quantize, fake_quantize_rows, fake_quantize_dual)
