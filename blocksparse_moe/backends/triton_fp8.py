"""The fused expert MLP with FP8 tensor-core GEMMs on the Triton backend (``fp8`` recipes): every GEMM of the
forward and the backward reads E4M3 operands with their recipe's scales (``kernels.expert_gemm``'s ``FP8`` main
loops, ``Fp8Mode``) and accumulates in fp32; the quantization runs on the device (``kernels.quantize``).

The math is ``backends.torch_fp8``'s (its docstring's table says which operand is quantized along which dimension),
up to the fp32 accumulation order. Where each operand is quantized:

| operand | quantized | layout the GEMM reads |
|---|---|---|
| x | once per call, per token along d (``quantize``; saved for backward instead of x (*)) | gathered via ``row_src`` |
| w1, w3, w2 | once per optimizer step per layout (``fp8.quantized_weight``: E4M3, scales) | ``[E, K, N]`` or ``wᵀ`` |
| a = act(h)·g | per row along f: in the up-projection's epilogue (mxfp8), else after it (below) | dense rows |
| dout | once per backward, per token along d (dgrad), along each expert's rows (dW2) | gathered; K-major rows |
| dh, dg | one pass for both (``quantize_dual``): along f (dx), along each expert's rows (dW1, dW3) | dense; K-major |
| x (weight gradients) | the saved E4M3 x (above), requantized along expert rows (*) | K-major expert rows |
| aw (weight gradients) | along the rows of each expert (``quantize_rows``) | K-major expert rows |

(*) With ``fp8_cache_x`` (``MoEOptions``), the default. Without it (where something else keeps x anyway) autograd
saves x itself, and the weight gradients quantize it along the expert rows (via ``row_src``).

**a in the up-projection's epilogue** (``EPILOGUE_QUANT``: ``gemm(..., act_scales=)``). With ``mxfp8`` the GLU
up-projection writes a as E4M3 plus its E8M0 scales directly (``QUANT_A``: a rounded to x's dtype, then
``kernels.quantize``'s arithmetic on each 1×32 group of the tile, bit for bit ``Q.quantize`` of the a it would write
otherwise); a is never written in x's dtype and no pass reads it back. Every FP8 GLU tile holds whole groups (64
columns, 32 unaligned, 32 interpreted; the launcher asserts it), so every mxfp8 shape takes it: partial last groups
(f not a multiple of 32) are masked like the separate pass's. The other recipes keep the separate pass
(``Q.quantize(a, act_block)``, a in x's dtype first):

- ``blockwise`` (1×128 groups along f): a tile holds whole groups only at 128 a-columns, and the 128-wide blockwise
  GLU tile spills with or without the quantized epilogue (triton 3.9.0, 2026-12-06, ``bench.audit`` of
  ``gemm_fp8[blockwise,up,glu,M=128,N=128,K=128,tma]``, aligned: ``_fp8_config`` with 128 columns, the epilogue
  generalised to 128-column fp32-scale groups for the check: sm_90 255 registers, 284 B spill stores, 176 B stack;
  sm_100 255, 276 B; sm_120 255, 828 B; the same tile without the quantized epilogue spills 268 / 212 / 788 B; M=64
  on 4 warps 288 / 296 / 720 B): two 128×128 fp32 accumulators plus the promotion's step result; today's 64-column
  tile (180 registers on sm_90, no spill) holds half a group;
- ``rowwise`` (one scale per row, the amax over all of f): a tile sees 64 of the row's f columns, so its epilogue
  cannot know the scale.

The weight gradients' operands (x, aw = w·a, dout rows, dh, dg) are quantized in expert order (x and dout read
through ``row_src`` by the quantize pass itself, ``quantize_rows(..., row_src=)``: no gathered copy; x as its saved
E4M3 bytes and scales, which ``quantize_rows(..., dequantize=)`` reads as ``q · s`` in fp32, no fp32 copy, or as x
itself), along the tokens, and stored column-major
(``transposed``: the reduced dimension, the rows, contiguous) over 16-aligned expert offsets, so that
``wgrad_kernel`` reads their K-major tiles through TMA (``row_align``; sm_90's E4M3 wgmma reads K-major tiles only
and copies MN-major ones through registers every K step). The block-sparse strategy's block-padded rows are aligned
as they are; for the grouped strategy's unpadded rows the quantize kernels write each expert's rows from
``fp8.padded_offsets(offsets, 16)`` on (16-row segments, zero rows after each expert's own, in a buffer of ``R +
15·E`` rows rounded up to 16: a bound from shapes), in the same pass (``kernels.quantize.row_groups(...,
align=16)``); the row groups, and so the scales, are the unpadded rows' (16 divides every recipe's group). The row
groups are computed once per backward (``RowGroups``) for every quantization of the weight gradients' operands and
their ``WgradScales``. The weights are cached K-major (``k_major``). The intermediates are dense ``[R, F]`` rows
here: for the block-sparse strategy (blocked intermediates) the saved h and g are converted to and from its blocks
(``backends.torch._to_blocks`` / ``_block_rows``: a copy each way, the FP8 path's cost on that strategy). Any sizes
run in FP8: partial K groups take the elements present (as if zero-padded), the tiles mask the rest.
"""

from __future__ import annotations

import functools

import torch

from .. import fp8 as fp8_recipes
from ..kernels import expert_gemm as gemm_kernels
from ..kernels import permute as permute_kernels
from ..kernels import quantize as quantize_kernels
from ..kernels.expert_gemm import EPILOGUE_QUANT, FP8_RECIPES, BackwardEpilogue, GemmScales, WgradScales
from ..kernels.layouts import Rows, Schedule
from .common import MlpRouting, combine_dots
from .torch import _block_rows, _to_blocks

__all__ = ["MODES", "mlp_forward", "mlp_backward"]

MODES = {r.name: mode for mode, r in FP8_RECIPES.items()}  # recipe name -> the kernels' Fp8Mode
# the row alignment of the weight gradients' E4M3 operands: expert offsets multiples of 16 rows let wgrad_kernel read
# their K-major tiles through TMA (each K step 16-byte aligned along the column-major storage: expert_gemm._row_tma)
WGRAD_ROW_ALIGN = 16


def _new(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def _to_saved(t: torch.Tensor | None, routing: MlpRouting) -> torch.Tensor | None:
    """Dense rows ``[R, F]`` in the strategy's intermediate layout (the block-sparse strategy's blocks)."""
    if t is None or not routing.blocked:
        return t
    return _to_blocks(t, routing.block_size)


def _from_saved(t: torch.Tensor | None, routing: MlpRouting, cols: int) -> torch.Tensor | None:
    """The saved h or g as dense rows ``[R, F]`` in its dtype."""
    if t is None or not routing.blocked:
        return t
    return _block_rows(t, routing.block_size, cols).contiguous()


def mlp_forward(
    x: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None,
    routing: MlpRouting,
    activation: str,
    fp8: str,
    schedule: Schedule,
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
    """``backends.triton.mlp_forward`` with the FP8 GEMMs of recipe ``fp8`` over the Triton backend's tile
    ``schedule`` (module docstring), and the E4M3 x and its scales (per token along d), which backward reads instead
    of x. ``scales = (s1, s2, s3)``: w1, w2, w3 are prequantized E4M3 weights
    (``fp8.prequantize``: stored K-major, read as they are; one not stored K-major is copied so at each call, E·K·N
    bytes)."""
    rcp, mode, Q = fp8_recipes.recipe(fp8), MODES[fp8], quantize_kernels
    sd, act_block, F = rcp.scale_dtype, rcp.act_block(), w1.shape[2]
    s1, s2, s3 = (None, None, None) if scales is None else scales

    def operand(w: torch.Tensor, s: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return fp8_recipes.quantized_weight(w, rcp, 0, Q.quantize, k_major=True, scale=s)

    xq, xs = Q.quantize(x, act_block, sd)
    w1q, w1s = operand(w1, s1)
    w3q, w3s = (None, None) if w3 is None else operand(w3, s3)
    R = routing.rows
    h = _new((R, F), x)
    g = None if w3 is None else _new((R, F), x)
    fused = mode in EPILOGUE_QUANT  # a quantized in the up-projection's epilogue (module docstring)
    if fused:
        a, a_s = _new((R, F), x, fp8_recipes.E4M3), _new(rcp.act_scale_shape(R, F), x, sd)
    else:
        a, a_s = _new((R, F), x), None
    gemm_kernels.gemm(
        Rows.dense(xq, gathered=True), w1q, Rows.dense(h), schedule, row_src=routing.row_src, gate=w3q, gate_out=g,
        act_out=a, act_scales=a_s, activation=activation, scales=GemmScales(mode, xs, w1s, w3s),
    )  # fmt: skip
    aq, a_s = (a, a_s) if fused else Q.quantize(a, act_block, sd)
    w2q, w2s = operand(w2, s2)
    y = _new((R, w2.shape[2]), x)
    gemm_kernels.gemm(Rows.dense(aq), w2q, Rows.dense(y), schedule, scales=GemmScales(mode, a_s, w2s))
    out = _new(tuple(x.shape), x)
    permute_kernels.scatter(y, routing.assignment_row, weights, out)
    return out, _to_saved(h, routing), _to_saved(g, routing), (xq, xs)


def mlp_backward(
    dout: torch.Tensor,
    x: torch.Tensor,
    x_scale: torch.Tensor | None,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None,
    h: torch.Tensor,
    g: torch.Tensor | None,
    routing: MlpRouting,
    activation: str,
    needs: tuple[bool, bool, bool, bool, bool],
    fp8: str,
    schedule: Schedule,
) -> tuple[torch.Tensor | None, ...]:
    """``backends.triton.mlp_backward`` with the FP8 GEMMs of recipe ``fp8`` (module docstring): the dgrad with its
    fused epilogue, dW2, the dx pair and dW1 / dW3, each reading E4M3 operands. ``x``, ``x_scale``: the forward's
    E4M3 x and its scales (``mlp_forward``'s last result), or x itself and None (``fp8_cache_x`` False); the
    gradients in dout's dtype."""
    need_x, need_weights, need_w1, need_w2, need_w3 = needs
    rcp, mode, Q = fp8_recipes.recipe(fp8), MODES[fp8], quantize_kernels
    sd, act_block, F = rcp.scale_dtype, rcp.act_block(), w1.shape[2]
    # the weight gradients' operands: K-major (column-major storage) over 16-aligned expert offsets, read through TMA
    # (sm_90's E4M3 wgmma reads K-major tiles only); the block-padded rows of the block-sparse strategy are aligned
    # as they are, the grouped strategy's are quantized into 16-row-padded expert segments (module docstring)
    blocked = routing.blocked  # expert offsets multiples of B (16 to 128: layouts.BLOCK_SIZES)
    rows = Q.row_groups(routing.offsets, routing.rows, rcp.group, 1 if blocked else WGRAD_ROW_ALIGN)
    align = routing.block_size if blocked else WGRAD_ROW_ALIGN
    scales_of = functools.partial(WgradScales, mode, group_offsets=rows.group_offsets)

    def wgrad(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, **kw) -> None:
        gemm_kernels.wgrad(Rows.dense(a), Rows.dense(b), out, rows.offsets, row_align=align, **kw)

    def transposed(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # wᵀ [E, N, K] quantized along N
        q, s = fp8_recipes.quantized_weight(w, rcp, 1, Q.quantize, k_major=True)
        return q.transpose(1, 2), s.transpose(1, 2)

    hr, gr = _from_saved(h, routing, F), _from_saved(g, routing, F)
    dq, ds = Q.quantize(dout, act_block, sd)
    w2tq, w2ts = transposed(w2)
    R = routing.rows
    dh = _new((R, F), hr)
    dg = None if gr is None else _new((R, F), hr)
    aw = _new((R, F), hr)
    dots = gemm_kernels.gemm(
        Rows.dense(dq, gathered=True), w2tq, Rows.dense(dh), schedule, row_src=routing.row_src, gate_out=dg,
        act_out=aw, activation=activation, backward=BackwardEpilogue(hr, gr, routing.row_asg, weights.reshape(-1)),
        scales=GemmScales(mode, ds, w2ts),
    )  # fmt: skip
    dweights = combine_dots(dots, routing.assignment_row, weights.dtype) if need_weights else None
    dw2 = None
    if need_w2:
        awq, aws = Q.quantize_rows(aw, rows, sd, transposed=True)
        doq, dos = Q.quantize_rows(dout, rows, sd, transposed=True, row_src=routing.row_src)  # read through row_src
        dw2 = _new(tuple(w2.shape), w2)
        wgrad(awq, doq, dw2, scales=scales_of(a=aws, b=dos))
    need_wgrad = need_w1 or need_w3

    def layouts(t: torch.Tensor | None) -> tuple[tuple | None, tuple | None]:
        """dh or dg quantized for the dx GEMM (along f) and for the weight gradient (along the rows): one pass."""
        if t is None:
            return None, None
        if need_x and need_wgrad:
            return Q.quantize_dual(t, rows, sd, transposed=True)
        along_f = Q.quantize(t, act_block, sd) if need_x else None
        return along_f, (Q.quantize_rows(t, rows, sd, transposed=True) if need_wgrad else None)

    (dh_f, dh_t), (dg_f, dg_t) = layouts(dh), layouts(dg)
    dx = None
    if need_x:
        w1tq, w1ts = transposed(w1)
        pair, w3ts = None, None
        if dg is not None:
            w3tq, w3ts = transposed(w3)
            pair = (Rows.dense(dg_f[0]), w3tq)
        dxs = _new((R, x.shape[1]), dout)
        scales = GemmScales(mode, dh_f[1], w1ts, w3ts, None if dg_f is None else dg_f[1])
        gemm_kernels.gemm(Rows.dense(dh_f[0]), w1tq, Rows.dense(dxs), schedule, pair=pair, scales=scales)
        dx = _new(tuple(x.shape), dout)
        permute_kernels.scatter(dxs, routing.assignment_row, None, dx)
    dw1 = dw3 = None
    if need_wgrad:
        # x along the expert rows, read through row_src by the quantize kernel itself (no gathered copy): x, or the
        # forward's E4M3 x read as q · s in fp32 and requantized (quantize_rows' dequantize)
        dequantize = None if x_scale is None else (x_scale, rcp.group)
        xq, xs = Q.quantize_rows(x, rows, sd, transposed=True, dequantize=dequantize, row_src=routing.row_src)
        dw1 = _new(tuple(w1.shape), w1)
        dw3 = None if dg is None else _new(tuple(w3.shape), w3)
        scales = scales_of(a=xs, b=dh_t[1], b2=None if dg_t is None else dg_t[1])
        wgrad(xq, dh_t[0], dw1, b2=None if dg_t is None else Rows.dense(dg_t[0]), out2=dw3, scales=scales)
    return dx, dweights, dw1, dw2, dw3
