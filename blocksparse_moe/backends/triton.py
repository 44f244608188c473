"""The Triton backend: every op contract (``ops/``) on the two expert-GEMM kernels and the permute kernels.

Each function maps its operands onto the kernels' row layouts (``kernels.layouts.Rows``: dense, blocked or
gathered) and launches; operands are validated by the op layer (``ops._checks``) before they get here. ``out``
(optional, for tests that poison it) receives the result.

The block-sparse ops read the block-diagonal topology from ``padded_offsets`` alone: ``sdd`` / ``dsd`` / ``dds_t``
are ``gemm`` launches whose M tiles are the block rows, ``dsd_t`` / ``dds`` are ``wgrad`` launches reducing over
each expert's block rows, on strided views where an operand is transposed (never a copy).
"""

from __future__ import annotations

import warnings
from functools import cache

import torch

from ..fp8 import Quantizer
from ..kernels import expert_gemm as gemm_kernels
from ..kernels import permute as permute_kernels
from ..kernels import quantize as quantize_kernels
from ..kernels._common import interpreting
from ..kernels.expert_gemm import BackwardEpilogue
from ..kernels.layouts import Rows, Schedule
from ..routing import Topology
from . import triton_fp8
from .common import OPS, MlpRouting, combine_dots

__all__ = ["new", "fp8_quantizer", *OPS]


def new(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every tensor this backend returns or hands a kernel to write is allocated here, uninitialised (the tests
    fill it with NaN instead, so that an element a kernel fails to write shows up)."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def _empty(out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor, dtype=None) -> torch.Tensor:
    return new(shape, like, dtype) if out is None else out


# 16-bit grouped M tiles on a GPU are at least 32 rows (bench.audit builds those). sm_90 and sm_100 compute tiles
# under 64 rows swapped (the tile's rows as the MMA's N): 16 rows ran HGMMA.64x16 / tcgen05 N = 16 at 1.09-1.30
# (sm_90) and 1.72-2.53 (sm_100) issue clocks per MMA clock, 32 rows 0.55-0.66 and 0.89-1.28. sm_80 and sm_120 run
# both on mma.sync, where a 16-row tile is the 32-row one's loop over half the rows (on sm_90 / sm_100's mma.sync,
# before the swap: 1.69-3.69 against 1.01-1.95). Decode GEMMs are bound by streaming the weights: 32 rows do 32 FLOP
# per 16-bit weight byte, far under every GPU's dense MMA rate per HBM byte (A100 ~150, H200 ~200, B200 ~280,
# RTX 5090 ~230), so the rows a 32-row tile leaves empty cost no time.
MIN_BLOCK_M = 32
# FP8 grouped M tiles are at least 64 rows: E4M3 MMAs (sm_90's QGMMA, sm_100's UTCQMMA) need M >= 64; Triton runs
# smaller M tiles on mma.sync, which on sm_90 / sm_100 upcasts E4M3 to fp16 (HMMA, no E4M3 MMA: bench.audit)
FP8_MIN_BLOCK_M = 64


def _grouped_block_m(rows: int, num_experts: int, fp8: bool = False) -> int:
    """M tile of the grouped GEMMs (and of the fused MLP's unpadded rows), chosen on the host from shapes only (no
    sync): 128 rows when experts expect that many (``rows / E``); else the smallest of the kernels' tiles of at least
    ``MIN_BLOCK_M`` = 32 rows (``BLOCK_SIZES``: 32, 64) that holds the ``ceil(rows / E)`` rows an expert expects, 64
    from 33 to 127. The 32-row tiles serve shapes where an expert gets a few rows (decode: 4 at T = 64, k = 8,
    E = 128): the weights' HBM reads bound those GEMMs, where a 64-row tile would execute twice the MMA work (sm_90 and
    sm_100 run them swapped, ``expert_gemm.gemm_config``: the rows as the MMA's N; a 16-row tile there issues more
    than it computes: ``MIN_BLOCK_M``). 16 when interpreting (the interpreter tests' small tiles). Every tile this
    returns on a GPU is built by ``bench.audit`` (tests/test_audit.py checks it).

    ``fp8`` (the FP8 MLP's E4M3 GEMMs): at least ``FP8_MIN_BLOCK_M`` = 64 rows. Under 64 rows Triton 3.9 compiles
    the E4M3 dot to fp16 mma.sync on sm_90 and sm_100 (the operands upcast in registers: ``bench.audit``, 32-row
    tiles, 2026-12-06: HMMA, 1.10-1.45 issue clocks per MMA clock on sm_90, 2.03-4.54 on sm_100); 64-row tiles run
    QGMMA / UTCQMMA (MX on sm_90: emulated either way). Decode stays bound by streaming the weights: a 64-row tile
    does 2 · 64 FLOP per E4M3 weight byte, under the E4M3 MMA rate per byte of HBM (H200: 1979 TFLOP/s over 4.3 TB/s,
    ~460; B200: 4500 over 8, ~560)."""
    if interpreting():
        return 16
    if rows >= 128 * num_experts:
        return 128
    expected = max(min(-(-rows // num_experts), 64), FP8_MIN_BLOCK_M if fp8 else MIN_BLOCK_M)
    return next(m for m in gemm_kernels.BLOCK_SIZES if m >= expected)


def _block_size(B: int) -> int:
    """The block size of a blocked layout, one the kernels take: ``GPU_BLOCK_SIZES`` (64, 128) on a GPU, the
    configs ``bench.audit`` builds (a block bounds the tiles: 16- or 32-row blocks would run mma.sync tiles on every
    GPU); ``BLOCK_SIZES`` (16 to 128) when interpreting, for small tests."""
    if interpreting():
        if B not in gemm_kernels.BLOCK_SIZES:
            raise ValueError(f"the triton backend needs block_size in {gemm_kernels.BLOCK_SIZES}, got {B}")
    elif B not in gemm_kernels.GPU_BLOCK_SIZES:
        raise ValueError(
            f"the triton backend needs block_size in {gemm_kernels.GPU_BLOCK_SIZES} on a GPU, got {B} (16 and 32 are "
            "for Triton interpreter tests: no tensor-core tile fits them; the torch backend takes them)"
        )
    return B


def _block_schedule(topo: Topology) -> Schedule:
    """Block rows as the M tiles: expert e's rows ``padded_offsets[e] .. padded_offsets[e+1]``."""
    return Schedule.build(topo.padded_offsets, topo.num_rows, _block_size(topo.block_size), padded=True)


def _blocks(data: torch.Tensor, topo: Topology) -> Rows:
    _block_size(topo.block_size)
    return Rows.blocked(data, topo.blocks_per_expert, topo.ffn_size)


def _rows(t: torch.Tensor, gathered: bool = False) -> Rows:
    """A dense row operand with unit column stride: the loads the kernels pipeline (wgmma takes a transposed A
    only through registers, which serialises the loop), so a transposed view is copied first."""
    return Rows.dense(t if t.stride(1) == 1 else t.contiguous(), gathered)


# ----------------------------------------------------------------------------------------------- block-sparse


def sdd(a: torch.Tensor, w: torch.Tensor, topo: Topology, out: torch.Tensor | None = None) -> torch.Tensor:
    """``S = a @ w`` at the blocks of ``topo``: a ``[P, K]``, w ``[E, K, F]`` → data ``[nnz_max, B, B]``."""
    B = topo.block_size
    out = _empty(out, (topo.nnz_max, B, B), a)
    gemm_kernels.gemm(_rows(a), w, _blocks(out, topo), _block_schedule(topo))
    return out


def sdd_wgrad(a: torch.Tensor, data: torch.Tensor, topo: Topology, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[e] = a[rows of e]ᵀ @ S[rows of e]``: a ``[P, K]`` → ``[E, K, F]`` (sdd's weight gradient)."""
    out = _empty(out, (topo.num_experts, a.shape[1], topo.ffn_size), a)
    gemm_kernels.wgrad(_rows(a), _blocks(data, topo), out, topo.padded_offsets)
    return out


def dsd(data: torch.Tensor, topo: Topology, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``y = S @ w``: w ``[E, F, N]`` → ``[P, N]``."""
    out = _empty(out, (topo.num_rows, w.shape[2]), data)
    gemm_kernels.gemm(_blocks(data, topo), w, Rows.dense(out), _block_schedule(topo))
    return out


def dsd_t(data: torch.Tensor, topo: Topology, a: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``g = Sᵀ @ a``: a ``[P, N]`` → ``[E, F, N]``."""
    out = _empty(out, (topo.num_experts, topo.ffn_size, a.shape[1]), data)
    gemm_kernels.wgrad(_blocks(data, topo), _rows(a), out, topo.padded_offsets)
    return out


def dds(a: torch.Tensor, data: torch.Tensor, topo: Topology, out: torch.Tensor | None = None) -> torch.Tensor:
    """``c = a @ S``: a ``[M, P]`` → ``[M, E, F]``, as ``(Sᵀ @ aᵀ)ᵀ`` (aᵀ copied to rows, the result's view)."""
    out = _empty(out, (a.shape[0], topo.num_experts, topo.ffn_size), data)
    gemm_kernels.wgrad(_blocks(data, topo), _rows(a.t()), out.permute(1, 2, 0), topo.padded_offsets)
    return out


def dds_t(g: torch.Tensor, data: torch.Tensor, topo: Topology, out: torch.Tensor | None = None) -> torch.Tensor:
    """``c = g @ Sᵀ``: g ``[M, E, F]`` → ``[M, P]``, as ``(S @ gᵀ)ᵀ`` (gᵀ a view; the result transposed once)."""
    rows = dsd(data, topo, g.permute(1, 2, 0))
    return rows.t().contiguous() if out is None else out.copy_(rows.t())


# ----------------------------------------------------------------------------------------------- grouped


def grouped_mm(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    row_src: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[i] = x[src(i)] @ w[e]`` for rows ``offsets[e] ≤ i < offsets[e+1]`` (``src = row_src`` when gathering,
    else ``i``); rows ``≥ offsets[E]`` zero. → ``[R, N]``."""
    rows = x.shape[0] if row_src is None else row_src.shape[0]
    out = _empty(out, (rows, w.shape[2]), x)
    schedule = Schedule.build(offsets, rows, _grouped_block_m(rows, w.shape[0]))
    gemm_kernels.gemm(_rows(x, gathered=row_src is not None), w, Rows.dense(out), schedule, row_src=row_src)
    return out


def grouped_mm_wgrad(
    x: torch.Tensor,
    dy: torch.Tensor,
    offsets: torch.Tensor,
    row_src: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dw[e] = x[src(rows of e)]ᵀ @ dy[rows of e]`` → ``[E, K, N]`` (zeros for experts without rows)."""
    out = _empty(out, (offsets.shape[0] - 1, x.shape[1], dy.shape[1]), x)
    gemm_kernels.wgrad(_rows(x, gathered=row_src is not None), _rows(dy), out, offsets, row_src=row_src)
    return out


# ----------------------------------------------------------------------------------------------- permute


def gather_rows(x, row_assignment, assignment_row, weights=None, out=None) -> torch.Tensor:
    """``out[i] = weights.flat[a] · x[a // k]``, ``a = row_assignment[i]`` (zero where -1) → ``[R, d]``."""
    out = _empty(out, (row_assignment.shape[0], x.shape[1]), x)
    permute_kernels.gather(x, row_assignment, assignment_row.shape[1], weights, out)
    return out


def scatter_rows(y, row_assignment, assignment_row, weights=None, out=None) -> torch.Tensor:
    """``out[t] = Σ_j weights[t, j] · y[assignment_row[t, j]]`` (skipping -1, j in order) → ``[T, d]``."""
    out = _empty(out, (assignment_row.shape[0], y.shape[1]), y)
    permute_kernels.scatter(y, assignment_row, weights, out)
    return out


def weights_grad(a, b, assignment_row, dtype=None, out=None) -> torch.Tensor:
    """``dw[t, j] = <a[t], b[assignment_row[t, j]]>`` (0 where -1) → ``[T, k]`` in ``dtype``."""
    out = _empty(out, tuple(assignment_row.shape), a, dtype)
    permute_kernels.weights_grad(a, b, assignment_row, out)
    return out


# ----------------------------------------------------------------------------------------------- fused MLP


def _layout(routing: MlpRouting, t: torch.Tensor, cols: int) -> Rows:
    if routing.blocked:
        return Rows.blocked(t, -(-cols // routing.block_size), cols)
    return Rows.dense(t)


def _schedule(routing: MlpRouting, fp8: bool = False) -> Schedule:
    """The tile schedule of the fused MLP's rows, this backend's choice: M tiles of ``block_size`` rows over the
    block-padded rows (a tile per block row), of ``_grouped_block_m`` rows over the unpadded ones (``fp8``: the FP8
    MLP's tiles; its GEMMs read dense rows, so blocks under ``FP8_MIN_BLOCK_M`` rows take those tiles over the
    block-padded rows, several blocks each). Built on the device (no host sync) once per forward and once per
    backward (an ``[E+1]`` prefix sum)."""
    if routing.blocked and not (fp8 and routing.block_size < FP8_MIN_BLOCK_M):
        return Schedule.build(routing.offsets, routing.rows, _block_size(routing.block_size), padded=True)
    return Schedule.build(routing.offsets, routing.rows, _grouped_block_m(routing.rows, routing.num_experts, fp8=fp8))


@cache
def fp8_quantizer() -> Quantizer:
    """The quantizer of the FP8 paths that compose ops rather than run the fused MLP (``custom_moe_mlp``, the
    padded strategy, a callable activation: ``strategies.fp8``): they emulate the FP8 GEMMs in fp32 with the Triton
    quantize kernels (``kernels.quantize``), and say so once. The fused MLP runs FP8 tensor-core GEMMs
    (``triton_fp8``)."""
    warnings.warn(
        "blocksparse_moe: fp8 outside the fused expert MLP (custom_moe_mlp, the padded strategy, a callable "
        "activation) runs the PyTorch emulation of the FP8 GEMMs (Triton quantize kernels, fp32 matmuls)",
        stacklevel=3,
    )
    return quantize_kernels.QUANTIZER


def mlp_forward(
    x: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None,
    routing: MlpRouting,
    activation: str,
    fp8: str | None = None,
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """``out [T, d]``, the ``h``, ``g`` backward needs (``MlpRouting.intermediate_shape``) and None: the gated
    up-projection (gather fused, activation in the epilogue), the down-projection, the weighted scatter. With an
    ``fp8`` recipe: its FP8 GEMMs (``triton_fp8``; ``scales``: w1, w2, w3 are prequantized E4M3 with these
    scales), the last result the E4M3 x and its scales, which backward reads instead of x (``fp8_cache_x``)."""
    if fp8:
        return triton_fp8.mlp_forward(
            x, weights, w1, w2, w3, routing, activation, fp8, _schedule(routing, fp8=True), scales
        )
    F = w1.shape[2]
    shape = routing.intermediate_shape(F)
    h = new(shape, x)
    g = None if w3 is None else new(shape, x)
    a = new(shape, x)
    schedule = _schedule(routing)
    gemm_kernels.gemm(
        _rows(x, gathered=True), w1, _layout(routing, h, F), schedule, row_src=routing.row_src, gate=w3, gate_out=g,
        act_out=a, activation=activation,
    )  # fmt: skip
    y = new((routing.rows, w2.shape[2]), x)
    gemm_kernels.gemm(_layout(routing, a, F), w2, Rows.dense(y), schedule)
    out = new(tuple(x.shape), x)
    permute_kernels.scatter(y, routing.assignment_row, weights, out)
    return out, h, g, None


def mlp_backward(
    dout: torch.Tensor,
    x: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None,
    h: torch.Tensor,
    g: torch.Tensor | None,
    routing: MlpRouting,
    activation: str,
    needs: tuple[bool, bool, bool, bool, bool],
    fp8: str | None = None,
    x_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``mlp_forward`` for ``(x, weights, w1, w2, w3)`` where ``needs`` says so, else None (with an
    ``fp8`` recipe: its FP8 GEMMs, ``triton_fp8``; with ``x_scale``, x is the forward's E4M3 x and ``x_scale`` its
    scales, without, x itself).

    1. ``G = dout[token] @ w2ᵀ`` at each row, the epilogue giving ``dh``, ``dg``, ``aw = weight·a`` and the
       per-row ``<G, a>`` (the top-k weight gradient);
    2. ``dw2[e] = aw[rows of e]ᵀ @ dout[token]`` (gather fused);
    3. ``dx = scatter(dh @ w1ᵀ + dg @ w3ᵀ)`` (one GEMM for the pair);
    4. ``dw1[e], dw3[e] = x[token]ᵀ @ dh, dg`` (gather fused, one pass over the x tiles).
    """
    if fp8:
        return triton_fp8.mlp_backward(
            dout, x, x_scale, weights, w1, w2, w3, h, g, routing, activation, needs, fp8, _schedule(routing, fp8=True)
        )
    need_x, need_weights, need_w1, need_w2, need_w3 = needs
    F = w1.shape[2]
    schedule = _schedule(routing)
    douts = _rows(dout, gathered=True)  # the token rows of dout, read through row_src in the loads
    dh = new(tuple(h.shape), h)
    dg = None if g is None else new(tuple(h.shape), h)
    aw = new(tuple(h.shape), h)
    dots = gemm_kernels.gemm(
        douts, w2.transpose(1, 2), _layout(routing, dh, F), schedule,
        row_src=routing.row_src, gate_out=dg, act_out=aw, activation=activation,
        backward=BackwardEpilogue(h, g, routing.row_asg, weights.reshape(-1)),
    )  # fmt: skip
    dweights = combine_dots(dots, routing.assignment_row, weights.dtype) if need_weights else None
    dw2 = None
    if need_w2:
        dw2 = new(tuple(w2.shape), w2)
        gemm_kernels.wgrad(_layout(routing, aw, F), douts, dw2, routing.offsets, row_src=routing.row_src)
    dx = None
    if need_x:
        dxs = new((routing.rows, x.shape[1]), x)
        pair = None if g is None else (_layout(routing, dg, F), w3.transpose(1, 2))
        gemm_kernels.gemm(_layout(routing, dh, F), w1.transpose(1, 2), Rows.dense(dxs), schedule, pair=pair)
        dx = new(tuple(x.shape), x)
        permute_kernels.scatter(dxs, routing.assignment_row, None, dx)
    dw1 = dw3 = None
    if need_w1 or need_w3:
        dw1 = new(tuple(w1.shape), w1)
        dw3 = None if g is None else new(tuple(w3.shape), w3)
        gemm_kernels.wgrad(
            _rows(x, gathered=True), _layout(routing, dh, F), dw1, routing.offsets, row_src=routing.row_src,
            b2=None if dg is None else _layout(routing, dg, F), out2=dw3,
        )  # fmt: skip
    return dx, dweights, dw1, dw2, dw3
