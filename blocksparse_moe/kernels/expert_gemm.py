"""The two matmul kernels behind every expert GEMM: ``_gemm_kernel`` (rows of one expert times that expert's weight,
with fused gather and fused activation epilogues) and ``_wgrad_kernel`` (an expert's weight gradient, a reduction
over its rows). They serve both dropless strategies and every public op:

==========================  =============================================================================
``sdd`` / ``dsd`` / ``dds_t``  ``_gemm_kernel``, block-sparse operand or result in the blocked row layout
``dsd_t`` / ``dds``          ``_wgrad_kernel``, block-sparse operand in the blocked row layout
``grouped_mm`` / ``_wgrad``  the same two kernels with dense row layouts (and the gather fused)
fused MLP (both strategies)  up-projection with the GLU pair and activation in the epilogue; its backward
                             dgrad with ``act'`` / GLU products / top-k weight gradient in the epilogue
==========================  =============================================================================

Design origin: MegaBlocks' SDD/DSD over an expert topology and grouped GEMMs (``torch._grouped_mm``); the gated
up-projection with SwiGLU in the epilogue and dSwiGLU in the dgrad epilogue follow SonicMoE; the program order is
the grouped ordering of Triton's matmul tutorial.

**Row layouts.** The MoE intermediates live in *expert-sorted rows*: rows ``offsets[e] .. offsets[e+1]`` belong to
expert e (``routing.RoutingPlan``: the unpadded offsets for the grouped strategy, the block-padded ones for the
block-sparse strategy). A row-indexed operand is read in one of three ways:

- *gathered*: row p is row ``row_src[p]`` of a token-ordered ``[T, K]`` tensor (-1: a zero row);
- *dense*: a ``[R, K]`` matrix with arbitrary strides;
- *blocked*: the blocks ``[nnz_max, B, B]`` of the block-diagonal topology (``routing.Topology``): block row r holds
  the ``nb`` blocks ``r·nb .. r·nb + nb - 1`` of its expert, so element (p, k) sits in slot ``(p >> LB)·nb +
  (k >> LB)`` at ``((p & (B-1)), (k & (B-1)))``, ``LB = log2 B``.

Dense and blocked layouts are one formula with four strides (row block, row, column block, column) and the
constexpr ``LB``: ``(p >> LB)·s_rb + (p & (B-1))·s_r + (k >> LB)·s_cb + (k & (B-1))·s_c``, where a dense
matrix has ``s_rb = B·s_r`` and ``s_cb = B·s_c``. The row part is computed once per tile (from ``row_src`` when
gathering); in the main loop the column part of a K step ``k0 .. k0 + BLOCK_K`` (``BLOCK_K | B``) is the scalar
``(k0 >> LB)·s_cb + (k0 & (B-1))·s_c`` plus a constant vector: **the main loops hold no index load and no integer
division**, only address increments, loads and MMA (the gathered reduction of ``_wgrad_kernel`` loads ``row_src``
in its loop; the pipeliner gives that index load its own stage, so the data loads stay in flight).

**Weight loads.** Where operands allow (Hopper or newer, 16-byte aligned weights with 16-byte multiple strides, the
fast config), ``gemm_kernel`` reads the weight tiles through TMA with host tensor descriptors (``W_TMA``): over
``[E, K, N]`` as stored, or over the transposed storage for the ``wᵀ`` views of the backward, the tile transposed in
shared memory; K and N past the end come back as zeros. Rows stay pointer loads (gathered: TMA has no row gather on
Hopper), pipelined as asynchronous copies. Otherwise the weights are pointer loads too.

**Program order (L2).** ``_gemm_kernel``: one program per ``BLOCK_M × BLOCK_N`` output tile, grid
``(max_m_tiles · cdiv(N, BLOCK_N),)``, in Triton's *grouped* order: ``GROUP_M`` consecutive M tiles (the same
expert, except at expert boundaries) sweep the N tiles together, so the resident programs share their weight
columns and their A rows in L2 instead of re-reading the weights once per M tile. ``_wgrad_kernel``: grid
``(E · tiles_m · tiles_n,)``, expert-major (the programs of one expert share its rows), grouped order inside.

**Tile schedule** (no host sync): ``tile_offsets [E+1]`` = prefix sum of ``ceil(n_e / BLOCK_M)`` (for blocked
layouts, ``BLOCK_M = B`` and ``tile_offsets = padded_offsets / B``), computed on the device once per routing
plan. M tile m belongs to the expert found by binary search in ``tile_offsets`` (in the prologue); tiles past
``tile_offsets[E]`` write zeros over the rows ``≥ offsets[E]`` (padding rows, invalid assignments).

**Epilogues** of ``_gemm_kernel`` (``EPILOGUE``):

- 0: ``out = acc`` (``PAIR``: ``acc = A @ W + A2 @ W2``, e.g. the dgrad ``[dh | dg] @ [w1 | w3]ᵀ``);
- 1 (forward): ``h = acc`` (and ``GLU``: ``g = acc2``, the gate weight's accumulator over the same A tiles);
  stores ``h`` [, ``g``] and ``a = act(h) [· g]`` (computed from the rounded h, g, as the backward recomputes it);
- 2 (backward): ``acc = G = dout[token] @ w2ᵀ`` at the tile; with ``w`` the row's top-k weight and ``a``
  recomputed from the saved ``h``, ``g``: stores ``dh = w·G·g·act'(h)``, ``dg = w·G·act(h)``, ``aw = w·a`` (for
  ``dW2``) and ``dots[n_tile, p] = Σ_tile G·a`` (the top-k weight gradient ``<dout @ w2ᵀ, a>``, reduced over the
  N tiles afterwards, deterministically).

Limits: fp32 / fp16 / bf16 operands of one dtype, fp32 accumulation, output in the input dtype; blocked layouts
need ``B`` a power of two ``≥ BLOCK_K``; int32 indices with 64-bit address arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..activations import activate, activate_and_grad, kernel_code
from ._common import aligned16, interpreting, upcast_dots

__all__ = [
    "BLOCK_SIZES",
    "GemmConfig",
    "gemm_config",
    "wgrad_config",
    "Rows",
    "Schedule",
    "BackwardEpilogue",
    "TMA_WEIGHTS",
    "gemm",
    "wgrad",
    "gemm_kernel",
    "wgrad_kernel",
]


@triton.jit
def _expert_of_tile(pid_m, tile_offsets_ptr, E, search_steps):
    """Largest e in [0, E) with ``tile_offsets[e] <= pid_m``: the expert whose tiles contain M tile ``pid_m``
    (an empty expert has ``tile_offsets[e] == tile_offsets[e + 1]`` and loses to the next one)."""
    lo = 0
    hi = E
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        go = tl.load(tile_offsets_ptr + mid) <= pid_m
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo


@triton.jit
def _grouped_order(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Triton's grouped program order: ``GROUP_M`` consecutive M tiles sweep the N tiles together."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _row_offsets(p, s_rb, s_r, LB: tl.constexpr):
    """Row part of a row-layout address (int64) for a vector of rows ``p``: ``(p >> LB)·s_rb + (p & (2^LB - 1))·s_r``
    (computed once per tile, outside the main loop)."""
    p64 = p.to(tl.int64)
    return (p64 >> LB) * s_rb + (p64 & ((1 << LB) - 1)) * s_r


@triton.jit
def _row_start(r, s_rb, s_r, LB: tl.constexpr):
    """Row part (int64) of a row-layout address at a scalar row ``r``: ``(r >> LB)·s_rb + (r & (2^LB - 1))·s_r``."""
    r64 = tl.cast(r, tl.int64)
    return (r64 >> LB) * s_rb + (r64 & ((1 << LB) - 1)) * s_r


@triton.jit
def _tile_start(i, s_blk, s, BLOCK: tl.constexpr, LB: tl.constexpr):
    """Offset (int64) of tile ``i`` of ``BLOCK`` consecutive indices along a row-layout dimension with blocks of
    ``2^LB`` (``BLOCK`` divides ``2^LB``, so a tile never straddles a layout block). Written with ``//`` and ``%`` by
    the constexpr tiles per block and products of strides, so that the compiler proves the tile's alignment
    (vector loads, asynchronous copies): shifts and masks would hide it."""
    SUB: tl.constexpr = (1 << LB) // BLOCK
    i64 = tl.cast(i, tl.int64)
    return (i64 // SUB) * s_blk + (i64 % SUB) * (BLOCK * s)


@triton.jit
def _load_w(w_ptr, w_desc, w_off, w_mask, e, k0, n0, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, W_TMA: tl.constexpr):
    """The ``BLOCK_K × BLOCK_N`` weight tile at ``(k0, n0)`` of expert ``e``: pointer loads (``W_TMA`` 0), or TMA
    through a host tensor descriptor over ``[E, K, N]`` (1) or over the transposed storage ``[E, N, K]`` (2; the
    tile is transposed in shared memory, which the MMA reads as is). TMA fills what lies past K or N with zeros."""
    if W_TMA == 1:
        w = w_desc.load([e, k0, n0]).reshape(BLOCK_K, BLOCK_N)
    elif W_TMA == 2:
        w = w_desc.load([e, n0, k0]).reshape(BLOCK_N, BLOCK_K).trans()
    else:
        w = tl.load(w_ptr + w_off, mask=w_mask, other=0.0)
    return w


@triton.jit
def _mainloop(
    acc,
    acc2,
    a_ptr,
    a_rows,
    s_acb,
    s_ac,
    w_ptr,
    w2_ptr,
    w_desc,
    w2_desc,
    e,
    n0,
    s_wk,
    s_wn,
    s_w2k,
    s_w2n,
    offs_n,
    n_ok,
    row_ok,
    k_steps,
    K,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LB_A: tl.constexpr,
    DUAL: tl.constexpr,
    W_TMA: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``acc += A[rows, :K] @ W[:K, cols]`` (and ``acc2 += A @ W2`` when ``DUAL``), ``BLOCK_K`` at a time over
    ``k_steps`` steps. ``a_rows``: the tile's row offsets into A; ``w_ptr`` / ``w2_ptr``: the expert's weights, each
    read with its own strides (``s_wk, s_wn`` / ``s_w2k, s_w2n``), or their descriptors ``w_desc`` / ``w2_desc``
    with ``W_TMA``, at expert ``e``, columns from ``n0``."""
    offs_k = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + a_rows[:, None] + (offs_k.to(tl.int64) * s_ac)[None, :]
    w_tile = offs_k.to(tl.int64)[:, None] * s_wk + offs_n.to(tl.int64)[None, :] * s_wn
    w2_tile = offs_k.to(tl.int64)[:, None] * s_w2k + offs_n.to(tl.int64)[None, :] * s_w2n
    for t in range(0, k_steps):
        k_ok = (t * BLOCK_K + offs_k) < K
        a = tl.load(
            a_tile + _tile_start(t, s_acb, s_ac, BLOCK_K, LB_A), mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        w_off = tl.cast(t, tl.int64) * (BLOCK_K * s_wk) + w_tile
        w_mask = k_ok[:, None] & n_ok[None, :]
        w = _load_w(w_ptr, w_desc, w_off, w_mask, e, t * BLOCK_K, n0, BLOCK_K, BLOCK_N, W_TMA)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc)
        if DUAL:
            w2_off = tl.cast(t, tl.int64) * (BLOCK_K * s_w2k) + w2_tile
            w2 = _load_w(w2_ptr, w2_desc, w2_off, w_mask, e, t * BLOCK_K, n0, BLOCK_K, BLOCK_N, W_TMA)
            if UPCAST:
                w2 = w2.to(tl.float32)
            acc2 = tl.dot(a, w2, acc2)
    return acc, acc2


@triton.jit
def gemm_kernel(
    a_ptr,  # A [T, K] gathered through row_src (GATHER), or [R, K] in a row layout
    w_ptr,  # [E, K, N] any strides
    a2_ptr,  # PAIR: the second A, in A's row layout (unused otherwise)
    w2_ptr,  # GLU: the gate weight; PAIR: the second weight; [E, K, N] any strides (unused otherwise)
    w_desc,  # W_TMA: host tensor descriptor of w ([E, K, N], or [E, N, K] for W_TMA 2); None otherwise
    w2_desc,  # W_TMA and GLU / PAIR: descriptor of w2; None otherwise
    out_ptr,  # [R, N] row layout: the result (EPILOGUE 0), h (1), dh (2)
    out2_ptr,  # GLU: g (1), dg (2)
    out3_ptr,  # a = act(h) [· g] (1), aw = w·a (2)
    h_ptr,  # EPILOGUE 2: the saved h, in out's row layout
    g_ptr,  # EPILOGUE 2, GLU: the saved g
    row_src_ptr,  # [R] int32 token of each row, -1 for none (GATHER)
    row_asg_ptr,  # [R] int32 assignment of each row, -1 for none (EPILOGUE 2: its top-k weight)
    weights_ptr,  # [T·k] top-k weights, flat (EPILOGUE 2)
    dots_ptr,  # [cdiv(N_STORE, BLOCK_N), R] fp32 (EPILOGUE 2): Σ over the tile's columns of G·a
    offsets_ptr,  # [E+1] int32 expert row offsets
    tile_offsets_ptr,  # [E+1] int32 prefix sum of the experts' M tiles
    R,
    N,
    N_STORE,  # columns written: N, or for a blocked out the whole last column block (zeros past N)
    K,
    E,
    search_steps,  # E.bit_length(): enough halvings of [0, E)
    num_m_tiles,  # M tiles in the grid (an upper bound of tile_offsets[E] + the zeroing tiles)
    s_arb,
    s_ar,
    s_acb,
    s_ac,
    s_we,
    s_wk,
    s_wn,
    s_w2e,
    s_w2k,
    s_w2n,
    s_orb,
    s_or,
    s_ocb,
    s_oc,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    LB_A: tl.constexpr,  # log2 of A's layout block (any value for dense / gathered A)
    LB_O: tl.constexpr,  # log2 of out's layout block
    GATHER: tl.constexpr,
    GLU: tl.constexpr,
    PAIR: tl.constexpr,
    EPILOGUE: tl.constexpr,
    ACT: tl.constexpr,  # activations.kernel_code (EPILOGUE 1, 2)
    W_TMA: tl.constexpr,  # 0: pointer loads of w; 1: TMA over [E, K, N]; 2: TMA over the transposed [E, N, K]
    UPCAST: tl.constexpr,
):
    """One ``BLOCK_M × BLOCK_N`` tile of expert e's rows times ``W[e]``; see the module docstring."""
    num_n = tl.cdiv(N_STORE, BLOCK_N)
    pid_m, pid_n = _grouped_order(tl.program_id(0), num_m_tiles, num_n, GROUP_M)
    used_tiles = tl.load(tile_offsets_ptr + E)
    e = _expert_of_tile(pid_m, tile_offsets_ptr, E, search_steps)
    used = pid_m < used_tiles
    start = tl.where(
        used,
        tl.load(offsets_ptr + e) + (pid_m - tl.load(tile_offsets_ptr + e)) * BLOCK_M,
        tl.load(offsets_ptr + E) + (pid_m - used_tiles) * BLOCK_M,
    )
    end = tl.where(used, tl.load(offsets_ptr + e + 1), R)
    k_steps = tl.where(used, tl.cdiv(K, BLOCK_K), 0)  # zeroing tiles skip the main loop
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N

    if GATHER:
        src = tl.load(row_src_ptr + rows, mask=row_ok, other=-1)
        a_ok = row_ok & (src >= 0)
        a_rows = tl.maximum(src, 0).to(tl.int64) * s_ar
    else:
        a_ok = row_ok
        a_rows = _row_offsets(rows, s_arb, s_ar, LB_A)
    w_base = e.to(tl.int64) * s_we
    w2_base = e.to(tl.int64) * s_w2e
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # GLU only; unused (and removed) otherwise
    n0 = pid_n * BLOCK_N
    DUAL: tl.constexpr = GLU and EPILOGUE == 1  # the gate weight's accumulator (the backward reads the saved g)
    acc, acc2 = _mainloop(
        acc, acc2, a_ptr, a_rows, s_acb, s_ac, w_ptr + w_base, w2_ptr + w2_base, w_desc, w2_desc, e, n0, s_wk, s_wn,
        s_w2k, s_w2n, offs_n, n_ok, a_ok, k_steps, K, BLOCK_K, BLOCK_N, LB_A, DUAL, W_TMA, UPCAST,
    )  # fmt: skip
    if PAIR:
        acc, acc2 = _mainloop(
            acc, acc2, a2_ptr, a_rows, s_acb, s_ac, w2_ptr + w2_base, w2_ptr, w2_desc, w2_desc, e, n0, s_w2k, s_w2n,
            s_w2k, s_w2n, offs_n, n_ok, a_ok, k_steps, K, BLOCK_K, BLOCK_N, LB_A, False, W_TMA, UPCAST,
        )  # fmt: skip

    o_cols = _tile_start(pid_n, s_ocb, s_oc, BLOCK_N, LB_O) + tl.arange(0, BLOCK_N).to(tl.int64) * s_oc
    o_off = _row_offsets(rows, s_orb, s_or, LB_O)[:, None] + o_cols[None, :]
    store = row_ok[:, None] & (offs_n < N_STORE)[None, :]
    dtype = out_ptr.dtype.element_ty
    if EPILOGUE == 0:
        tl.store(out_ptr + o_off, acc.to(dtype), mask=store)
    elif EPILOGUE == 1:
        h = acc.to(dtype)
        tl.store(out_ptr + o_off, h, mask=store)
        act = activate(h.to(tl.float32), ACT)
        if GLU:
            g = acc2.to(dtype)
            tl.store(out2_ptr + o_off, g, mask=store)
            act = act * g.to(tl.float32)
        tl.store(out3_ptr + o_off, act.to(dtype), mask=store)
    else:
        valid = row_ok[:, None] & n_ok[None, :]
        h = tl.load(h_ptr + o_off, mask=valid, other=0.0).to(tl.float32)
        asg = tl.load(row_asg_ptr + rows, mask=row_ok, other=-1)
        wr = tl.load(weights_ptr + tl.maximum(asg, 0).to(tl.int64), mask=asg >= 0, other=0.0).to(tl.float32)
        act, dact = activate_and_grad(h, ACT)
        dh = acc * wr[:, None] * dact
        if GLU:
            g = tl.load(g_ptr + o_off, mask=valid, other=0.0).to(tl.float32)
            tl.store(out2_ptr + o_off, (acc * wr[:, None] * act).to(dtype), mask=store)
            dh = dh * g
            act = act * g
        tl.store(out_ptr + o_off, dh.to(dtype), mask=store)
        tl.store(out3_ptr + o_off, (act * wr[:, None]).to(dtype), mask=store)
        dots = tl.sum(tl.where(valid, acc * act, 0.0), axis=1)
        tl.store(dots_ptr + pid_n.to(tl.int64) * R + rows, dots, mask=row_ok)


@triton.jit
def wgrad_kernel(
    a_ptr,  # [rows, M] gathered through row_src (A_GATHER) or a row layout
    b_ptr,  # [rows, N] gathered through row_src (B_GATHER) or a row layout
    b2_ptr,  # DUAL: a second B in b's row layout, its result in out2 (unused otherwise)
    out_ptr,  # [E, M, N] any strides
    out2_ptr,  # DUAL: [E, M, N] with out's strides
    offsets_ptr,  # [E+1] int32 expert row offsets
    row_src_ptr,  # [R] int32 token of each row, -1 for none (A_GATHER or B_GATHER)
    M,
    N,
    s_arb,
    s_ar,
    s_acb,
    s_ac,
    s_brb,
    s_br,
    s_bcb,
    s_bc,
    s_oe,
    s_om,
    s_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    LB_A: tl.constexpr,
    LB_B: tl.constexpr,
    A_GATHER: tl.constexpr,
    B_GATHER: tl.constexpr,
    DUAL: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``out[e] = A[rows of e]ᵀ @ B[rows of e]`` (and ``out2[e]`` with B2), one ``BLOCK_M × BLOCK_N`` tile, reduced
    over expert e's rows ``BLOCK_K`` at a time; experts without rows get zeros. Blocked layouts need expert row
    offsets that are multiples of ``BLOCK_K`` (the block-padded ones are)."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    e = pid // (tiles_m * tiles_n)
    pid_m, pid_n = _grouped_order(pid % (tiles_m * tiles_n), tiles_m, tiles_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_cols = _tile_start(pid_m, s_acb, s_ac, BLOCK_M, LB_A) + tl.arange(0, BLOCK_M).to(tl.int64) * s_ac  # A's columns
    b_cols = _tile_start(pid_n, s_bcb, s_bc, BLOCK_N, LB_B) + tl.arange(0, BLOCK_N).to(tl.int64) * s_bc
    offs_k = tl.arange(0, BLOCK_K)
    k64 = offs_k.to(tl.int64)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + offs_k
        r_ok = rows < end
        if A_GATHER or B_GATHER:
            src = tl.load(row_src_ptr + rows, mask=r_ok, other=-1)
            src_ok = r_ok & (src >= 0)
            src_off = tl.maximum(src, 0).to(tl.int64)
        if A_GATHER:
            a_rows = src_off * s_ar
            a_ok = src_ok
        else:  # r0 starts a BLOCK_K step inside one layout block (expert offsets of blocked layouts are multiples of B)
            a_rows = _row_start(r0, s_arb, s_ar, LB_A) + k64 * s_ar
            a_ok = r_ok
        if B_GATHER:
            b_rows = src_off * s_br
            b_ok = src_ok
        else:
            b_rows = _row_start(r0, s_brb, s_br, LB_B) + k64 * s_br
            b_ok = r_ok
        a = tl.load(a_ptr + a_rows[None, :] + a_cols[:, None], mask=m_ok[:, None] & a_ok[None, :], other=0.0)
        b_off = b_rows[:, None] + b_cols[None, :]
        b = tl.load(b_ptr + b_off, mask=b_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        if DUAL:
            b2 = tl.load(b2_ptr + b_off, mask=b_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                b2 = b2.to(tl.float32)
            acc2 = tl.dot(a, b2, acc2)
    o_off = e.to(tl.int64) * s_oe + offs_m.to(tl.int64)[:, None] * s_om + offs_n.to(tl.int64)[None, :] * s_on
    mask = m_ok[:, None] & n_ok[None, :]
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=mask)
    if DUAL:
        tl.store(out2_ptr + o_off, acc2.to(out2_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class GemmConfig:
    """Output tile ``block_m × block_n``, reduction step ``block_k``, M tiles per group of the grouped order,
    and launch options."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


_HALF = (torch.float16, torch.bfloat16)


def _clamp(cfg: GemmConfig, m: int | None = None, n: int | None = None, k: int | None = None) -> GemmConfig:
    """Tiles along a blocked dimension stay inside one layout block (``m`` / ``n`` / ``k``: that block, or None)."""
    return replace(
        cfg,
        block_m=min(cfg.block_m, m or cfg.block_m),
        block_n=min(cfg.block_n, n or cfg.block_n),
        block_k=min(cfg.block_k, k or cfg.block_k),
    )


def gemm_config(
    dtype: torch.dtype,
    block_m: int,
    *,
    epilogue: int = 0,
    glu: bool = False,
    pair: bool = False,
    aligned: bool = True,
    out_block: int | None = None,
    a_block: int | None = None,
) -> GemmConfig:
    """The ``gemm_kernel`` config for M tiles of ``block_m`` rows (the caller's tile schedule).

    sm_90: ``block_m`` rows on ``block_m / 16`` warps (a warpgroup per 64 rows: wgmma), K step 64 for 16-bit types
    (32 for fp32), 3 stages of 128×64 + 64×128 16-bit tiles (96 KB of shared memory) and at most ~128 registers, so
    two programs fit one SM. The GLU forward keeps two accumulators (``block_n`` 64: one A tile feeds ``w1`` and
    ``w3``); the backward epilogue holds h, g and four results per element (``block_n`` 32: at 64 it takes 247
    registers on sm_90 and spills on sm_80 / sm_120). Unaligned operands (scalar loads staged in registers) take a
    K step of 32 and at most 64 columns, 32 where a tile keeps two accumulators or two pipelines (GLU, the dgrad
    pair) or the backward epilogue: wider ones spill on sm_80, sm_100 or sm_120; fp32 tiles take at most 64 columns
    (16 for the unaligned pair) on 8 warps (sm_120's ptxas spills the transposed-weight and pair fp32 builds
    otherwise). ``out_block`` / ``a_block``: the block size of a blocked out / A (a tile never straddles a block).
    One small config when interpreting. Checked by ``python -m bench.audit``.
    """
    if interpreting():
        cfg = GemmConfig(block_m, 16, 16, 2, 4, 1)
    else:
        block_k = 32 if dtype == torch.float32 or not aligned else 64
        block_n = 32 if epilogue == 2 else 64 if glu else 128
        if not aligned:
            block_n = 32 if (glu or pair or epilogue == 2) else 64
        warps = 8 if block_m >= 128 else 4
        if dtype == torch.float32:  # 4-byte tiles: at most 64 columns, 8 warps (sm_120 / sm_80 spill otherwise)
            block_n, warps = min(block_n, 16 if pair and not aligned else 64), 8
        cfg = GemmConfig(block_m, block_n, block_k, 8, warps, 3)
    return _clamp(cfg, n=out_block, k=a_block)


def wgrad_config(
    dtype: torch.dtype,
    *,
    gather: bool = False,
    dual: bool = False,
    aligned: bool = True,
    a_block: int | None = None,
    b_block: int | None = None,
) -> GemmConfig:
    """The ``wgrad_kernel`` config: 128×128 tiles of ``dw[e]`` on 8 warps (``dual``: two 128×64 accumulators), 64
    rows per step for 16-bit types (32 for fp32 or unaligned operands; unaligned tiles half as wide: scalar loads
    staged in registers spill on sm_80 otherwise). A gathered operand loads its ``row_src`` entries in the loop: 5
    stages give that index load a stage of its own and keep 3 buffers of data in flight (with 3 stages the data loads
    wait to zero every step). ``a_block`` / ``b_block``: the block size of a blocked A / B (A's columns are the
    tile's M, B's its N; the rows step stays inside a block)."""
    if interpreting():
        cfg = GemmConfig(16, 16, 16, 2, 4, 1)
    else:
        block_k = 32 if dtype == torch.float32 or not aligned else 64
        block_n = (64 if dual else 128) // (1 if aligned else 2)
        cfg = GemmConfig(128, block_n, block_k, 8, 8, 5 if gather else 3)
    rows_block = min(a_block or 1 << 30, b_block or 1 << 30)
    cfg = _clamp(cfg, a_block, b_block, rows_block)
    if not interpreting() and cfg.block_m * cfg.block_n <= 64 * 64:
        cfg = replace(cfg, num_warps=4)
    return cfg


# ----------------------------------------------------------------------------------------------- row layouts

DENSE_LOG_BLOCK = 7  # dense layouts are described with blocks of 128 rows / columns: every tile size divides it
# Block sizes of blocked layouts: powers of two from the smallest tile (16, tl.dot's minimum) to the largest (128);
# 64 and 128 are the GPU sizes (a wgmma tile), 16 and 32 keep interpreter tests small.
BLOCK_SIZES = (16, 32, 64, 128)


@dataclass(frozen=True)
class Rows:
    """A row-indexed operand or result: ``tensor`` read as ``[rows, cols]`` in a row layout (module docstring).

    ``strides``: (row block, row, column block, column) in elements; ``log_block``: LB; ``block``: B of a blocked
    layout (None: dense); ``gathered``: row p is row ``row_src[p]`` of the ``[T, cols]`` ``tensor``."""

    tensor: torch.Tensor
    rows: int
    cols: int
    strides: tuple[int, int, int, int]
    log_block: int
    block: int | None = None
    gathered: bool = False

    @classmethod
    def dense(cls, t: torch.Tensor, gathered: bool = False) -> Rows:
        """A ``[rows, cols]`` matrix with any strides (``gathered``: the token rows ``row_src`` points into)."""
        s0, s1 = t.stride()
        b = 1 << DENSE_LOG_BLOCK
        return cls(t, t.shape[0], t.shape[1], (b * s0, s0, b * s1, s1), DENSE_LOG_BLOCK, None, gathered)

    @classmethod
    def blocked(cls, data: torch.Tensor, blocks_per_expert: int, cols: int) -> Rows:
        """Block data ``[max_block_rows·nb, B, B]`` of the block-diagonal topology, read as ``[max_block_rows·B,
        cols]`` (``cols = F``; the columns of the last block past F are padding)."""
        sb, si, sj = data.stride()
        B = data.shape[1]
        rows = data.shape[0] // blocks_per_expert * B if blocks_per_expert else 0
        return cls(data, rows, cols, (blocks_per_expert * sb, si, sb, sj), B.bit_length() - 1, B)

    @property
    def padded_cols(self) -> int:
        """Columns a result in this layout is written over: ``cols``, or all columns of the last block."""
        return self.cols if self.block is None else -(-self.cols // self.block) * self.block


@dataclass(frozen=True)
class Schedule:
    """The M tiles of ``gemm_kernel`` over expert-sorted rows: expert e's rows ``offsets[e] .. offsets[e+1]`` in
    tiles of ``block_m``; ``tile_offsets`` their prefix sum (on the device); ``max_m_tiles`` the grid's bound."""

    offsets: torch.Tensor  # [E+1] int32
    tile_offsets: torch.Tensor  # [E+1] int32
    block_m: int
    max_m_tiles: int

    @classmethod
    def build(cls, offsets: torch.Tensor, rows: int, block_m: int, *, padded: bool = False) -> Schedule:
        """The schedule of ``rows`` expert-sorted rows. ``padded``: every expert's row count is a multiple of
        ``block_m`` (block-padded offsets), so the tiles are ``offsets / block_m`` exactly. No host sync."""
        if padded:
            tile_offsets = offsets // block_m
        else:
            tiles = (offsets[1:] - offsets[:-1] + block_m - 1) // block_m
            tile_offsets = torch.cat([offsets.new_zeros(1), tiles.cumsum(0).to(offsets.dtype)])
        return cls(offsets, tile_offsets, block_m, cls.max_tiles(rows, offsets.shape[0] - 1, block_m, padded))

    @staticmethod
    def max_tiles(rows: int, num_experts: int, block_m: int, padded: bool) -> int:
        """The grid's bound of M tiles: ``rows / block_m`` for block-padded rows; otherwise ``Σ_e ceil(n_e / m) ≤
        cdiv(R, m) + E`` tiles of rows plus those zeroing the rows ``≥ offsets[E]``, each with at least one row."""
        if padded:
            return rows // block_m
        return min(triton.cdiv(rows, block_m) + num_experts, rows)


@dataclass(frozen=True)
class BackwardEpilogue:
    """The extra operands of the backward epilogue (module docstring, ``EPILOGUE`` 2)."""

    h: torch.Tensor  # the saved h, in out's layout
    g: torch.Tensor | None  # the saved g (GLU)
    row_asg: torch.Tensor  # [R] int32 assignment of each row, -1 for none
    weights: torch.Tensor  # [T·k] top-k weights, flat


# ----------------------------------------------------------------------------------------------- launchers

TMA_WEIGHTS = True  # load the weights through TMA where operands allow (tests switch it off to cover the pointers)


def _tma_mode(w: torch.Tensor) -> int:
    """``W_TMA`` for weights ``w [E, K, N]``: 1 (N contiguous) or 2 (K contiguous, a transposed view) when TMA can
    read them — 16-bit weights (tf32 wgmma reads only K-major tiles: an fp32 tile from TMA is waited to zero), on
    Hopper or newer (or the interpreter), a 16-byte aligned base and 16-byte multiples for the other strides (TMA's
    rules) — else 0."""
    if not TMA_WEIGHTS or w.dtype not in _HALF:
        return 0
    if not interpreting() and (w.device.type != "cuda" or torch.cuda.get_device_capability(w.device)[0] < 9):
        return 0
    size = w.element_size()
    mode = 1 if w.stride(2) == 1 else 2 if w.stride(1) == 1 else 0
    other = [w.stride(0), w.stride(1) if mode == 1 else w.stride(2)]
    if mode == 0 or w.data_ptr() % 16 or any(v * size % 16 for v in other):
        return 0
    return mode


def _descriptor(w: torch.Tensor, mode: int, block_k: int, block_n: int) -> TensorDescriptor:
    """Host tensor descriptor of ``w`` for ``W_TMA`` ``mode``: over ``[E, K, N]`` or the storage ``[E, N, K]``."""
    if mode == 1:
        return TensorDescriptor.from_tensor(w, [1, block_k, block_n])
    return TensorDescriptor.from_tensor(w.transpose(1, 2), [1, block_n, block_k])


def gemm(
    a: Rows,
    w: torch.Tensor,
    out: Rows,
    schedule: Schedule,
    *,
    row_src: torch.Tensor | None = None,
    pair: tuple[Rows, torch.Tensor] | None = None,
    gate: torch.Tensor | None = None,
    gate_out: torch.Tensor | None = None,
    act_out: torch.Tensor | None = None,
    activation: str = "identity",
    backward: BackwardEpilogue | None = None,
) -> torch.Tensor | None:
    """Launch ``gemm_kernel``: ``out[rows of e] = a[rows of e] @ w[e]`` (w ``[E, K, N]``, any strides) over
    ``schedule``; rows past ``offsets[E]`` are zeroed. Operands are validated by the caller.

    - ``row_src`` with a gathered ``a``: the token of each row (-1: a zero row);
    - ``pair = (a2, w2)``: ``out = a @ w + a2 @ w2`` (``a2`` in ``a``'s layout; ``w2`` any strides);
    - forward epilogue (``act_out`` given): ``out = h``, ``gate_out = g`` (GLU: ``gate`` is the gate weight),
      ``act_out = act(h) [· g]``;
    - ``backward``: the backward epilogue; ``out = dh``, ``gate_out = dg`` (GLU), ``act_out = aw``; returns the
      fp32 ``dots [N tiles, R]`` (Σ over each tile's columns of ``G·a``; their sum over N tiles is the top-k weight
      gradient of each row).

    Outputs in ``out``'s layout share its strides. Grid: ``(max_m_tiles · cdiv(padded cols, block_n),)``.
    """
    N, K, E = w.shape[2], a.cols, w.shape[0]
    epilogue = 2 if backward is not None else 1 if act_out is not None else 0
    glu = gate is not None or (backward is not None and backward.g is not None)
    dtype = a.tensor.dtype
    a2, w2 = pair if pair is not None else (a, gate if gate is not None else w)
    aligned = aligned16((a.tensor, w, w2, out.tensor), (K, N), (*a.strides, *w.stride(), *w2.stride(), *out.strides))
    cfg = gemm_config(
        dtype, schedule.block_m, epilogue=epilogue, glu=glu, pair=pair is not None, aligned=aligned,
        out_block=out.block, a_block=a.block,
    )  # fmt: skip
    n_store = out.padded_cols
    num_n = triton.cdiv(n_store, cfg.block_n)
    dots = None
    if backward is not None:
        dots = torch.empty(num_n, out.rows, dtype=torch.float32, device=out.tensor.device)
    if schedule.max_m_tiles * num_n == 0:
        return dots
    if a2.strides != a.strides or a2.log_block != a.log_block:
        raise ValueError(f"gemm: the pair's second operand must share the first's row layout, got strides "
                         f"{a2.strides} and {a.strides}")  # fmt: skip
    tma = _tma_mode(w) if aligned else 0
    if tma and _tma_mode(w2) != tma:  # the second weight (GLU gate, pair) must load the same way
        tma = 0
    w_desc = w2_desc = None
    if tma:
        w_desc = _descriptor(w, tma, cfg.block_k, cfg.block_n)
        w2_desc = _descriptor(w2, tma, cfg.block_k, cfg.block_n) if (gate is not None or pair is not None) else None
    bwd = backward or BackwardEpilogue(out.tensor, None, schedule.offsets, out.tensor)
    off = schedule.offsets
    gemm_kernel[(schedule.max_m_tiles * num_n,)](
        a.tensor, w, a2.tensor, w2, w_desc, w2_desc, out.tensor, out.tensor if gate_out is None else gate_out,
        out.tensor if act_out is None else act_out, bwd.h, bwd.h if bwd.g is None else bwd.g,
        off if row_src is None else row_src, bwd.row_asg, bwd.weights, out.tensor if dots is None else dots, off,
        schedule.tile_offsets,
        out.rows, N, n_store, K, E, E.bit_length(), schedule.max_m_tiles,
        *a.strides, *w.stride(), *w2.stride(), *out.strides,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, LB_A=a.log_block,
        LB_O=out.log_block, GATHER=a.gathered, GLU=glu, PAIR=pair is not None, EPILOGUE=epilogue,
        ACT=kernel_code(activation), W_TMA=tma, UPCAST=upcast_dots(dtype), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    return dots


def wgrad(
    a: Rows,
    b: Rows,
    out: torch.Tensor,
    offsets: torch.Tensor,
    *,
    row_src: torch.Tensor | None = None,
    b2: Rows | None = None,
    out2: torch.Tensor | None = None,
) -> None:
    """Launch ``wgrad_kernel``: ``out[e] = a[rows of e]ᵀ @ b[rows of e]`` (out ``[E, M, N]``, any strides; ``b2`` /
    ``out2``: a second product over the same A tiles); ``row_src`` for a gathered ``a`` or ``b``. Blocked layouts
    need block-padded ``offsets``. Operands are validated by the caller. Grid: ``(E · tiles_m · tiles_n,)``."""
    E, M, N = out.shape
    gather = a.gathered or b.gathered
    aligned = aligned16((a.tensor, b.tensor, out), (M, N), (*a.strides, *b.strides, *out.stride()))
    cfg = wgrad_config(
        a.tensor.dtype, gather=gather, dual=b2 is not None, aligned=aligned, a_block=a.block, b_block=b.block
    )
    grid = E * triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    if grid == 0:
        return
    wgrad_kernel[(grid,)](
        a.tensor, b.tensor, b.tensor if b2 is None else b2.tensor, out, out if out2 is None else out2,
        offsets, offsets if row_src is None else row_src,
        M, N, *a.strides, *b.strides, *out.stride(),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, LB_A=a.log_block,
        LB_B=b.log_block, A_GATHER=a.gathered, B_GATHER=b.gathered, DUAL=b2 is not None,
        UPCAST=upcast_dots(a.tensor.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
