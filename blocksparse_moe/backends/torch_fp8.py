"""The fused expert MLP with FP8 GEMMs, emulated in PyTorch: cast, scale, matmul in fp32 (``fp8`` recipes).

Both backends run it for ``fp8 != None`` (``backends.torch.mlp_forward`` / ``mlp_backward`` dispatch here; the
Triton backend too until its FP8 tensor-core kernels exist, quantizing with ``kernels.quantize``). Every GEMM
multiplies operands rounded to E4M3 with their recipe's scales applied (``fp8.fake_quantize``: ``q · s`` in fp32),
which is the FP8 GEMM's math up to the fp32 accumulation order:

| GEMM | operands, each quantized along the reduced dimension |
|---|---|
| up: ``h = x @ w1``, ``g = x @ w3`` | x per token (1×group along d), w1 / w3 weights along d |
| down: ``y = a @ w2`` | ``a = act(h)·g`` per row along f (rounded to x's dtype first, as the kernels store it) |
| dgrad: ``G = dout @ w2ᵀ`` | dout per token along d, w2 along d (its columns) |
| dx: ``dh @ w1ᵀ + dg @ w3ᵀ`` | dh, dg per row along f, w1 / w3 along f (their columns) |
| wgrads ``awᵀ @ dout``, ``xᵀ @ dh``, ``xᵀ @ dg`` | both operands along the tokens, in groups of one expert's rows |

The weight gradients are FP8 too, with scales along the token dimension (the reduced one: groups of 128 / 32 rows
of one expert, or all its rows for ``"rowwise"``; ``fp8.quantize_rows``). What stays unquantized: the activation
and its derivative, the top-k weights and the weight gradient ``<G, a>`` (fp32 epilogue math), the combine. The
weights are quantized once per step per layout (``fp8.weight``'s cache). Autograd saves what it saves without FP8:
x, the top-k weights, h, g (in x's dtype), the weights and the routing.
"""

from __future__ import annotations

import torch

from .. import fp8 as fp8_recipes
from ..activations import act_and_grad, get_activation
from ..fp8 import REFERENCE, Quantizer
from ..ops import grouped as ops_grouped
from ..ops import permute as ops_permute
from .common import MlpRouting, combine_dots
from .torch import _expert_mm, _expert_wgrad, _gathered, _layout, _rows, scatter_rows

__all__ = ["mlp_forward", "mlp_backward", "bmm", "grouped_mm", "quantizer_for"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def mlp_forward(
    x: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None,
    routing: MlpRouting,
    activation: str,
    fp8: str,
    quantizer: Quantizer = REFERENCE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``backends.torch.mlp_forward`` with the GEMMs of recipe ``fp8`` (module docstring)."""
    rcp = fp8_recipes.recipe(fp8)
    dtype, acc, act = x.dtype, _acc_dtype(x.dtype), get_activation(activation)
    act_block = rcp.act_block()
    xs = _gathered(quantizer.blocks(x, act_block, rcp.scale_dtype).to(acc), routing.row_src)
    h = _expert_mm(xs, fp8_recipes.weight(w1, rcp, 0, quantizer.blocks), routing.offsets).to(dtype)
    g = None if w3 is None else _expert_mm(xs, fp8_recipes.weight(w3, rcp, 0, quantizer.blocks), routing.offsets)
    g = None if g is None else g.to(dtype)
    a = act(h.to(acc))
    if g is not None:
        a = a * g.to(acc)
    aq = quantizer.blocks(a.to(dtype), act_block, rcp.scale_dtype).to(acc)
    y = _expert_mm(aq, fp8_recipes.weight(w2, rcp, 0, quantizer.blocks), routing.offsets).to(dtype)
    out = scatter_rows(y, routing.row_asg, routing.assignment_row, weights)
    return out, _layout(h, routing), None if g is None else _layout(g, routing)


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
    fp8: str,
    quantizer: Quantizer = REFERENCE,
) -> tuple[torch.Tensor | None, ...]:
    """``backends.torch.mlp_backward`` with the GEMMs of recipe ``fp8`` (module docstring)."""
    need_x, need_weights, need_w1, need_w2, need_w3 = needs
    rcp = fp8_recipes.recipe(fp8)
    dtype, acc, F, offsets = x.dtype, _acc_dtype(x.dtype), w1.shape[2], routing.offsets
    act_block, sd = rcp.act_block(), rcp.scale_dtype

    def rows(t: torch.Tensor) -> torch.Tensor:  # a weight gradient's operand, along the tokens of each expert
        return quantizer.rows(t, offsets, rcp.group, sd).to(acc)

    def transposed(w: torch.Tensor) -> torch.Tensor:  # wᵀ [E, N, K], quantized along N
        return fp8_recipes.weight(w, rcp, 1, quantizer.blocks).transpose(1, 2)

    dq = _gathered(quantizer.blocks(dout, act_block, sd).to(acc), routing.row_src)
    G = _expert_mm(dq, transposed(w2), offsets)  # dout[token] @ w2ᵀ, unweighted
    hr = _rows(h, routing, F).to(acc)
    act, dact = act_and_grad(hr, activation)
    act, dact = act.to(acc), dact.to(acc)
    asg = routing.row_asg.long()
    flat = torch.cat([weights.to(acc).reshape(-1), weights.new_zeros(1, dtype=acc)])
    wr = flat[torch.where(asg >= 0, asg, flat.shape[0] - 1)][:, None]
    gr = None if g is None else _rows(g, routing, F).to(acc)
    a = act if gr is None else act * gr
    dweights = combine_dots((G * a).sum(1)[None], routing.assignment_row, weights.dtype) if need_weights else None
    Gw = G * wr
    dh = (Gw * dact if gr is None else Gw * dact * gr).to(dtype)
    dg = None if gr is None else (Gw * act).to(dtype)
    dw2 = None
    if need_w2:
        dw2 = _expert_wgrad(rows((a * wr).to(dtype)), rows(_gathered(dout, routing.row_src)), offsets).to(dtype)
    dx = None
    if need_x:
        dxs = _expert_mm(quantizer.blocks(dh, act_block, sd).to(acc), transposed(w1), offsets)
        if dg is not None:
            dxs = dxs + _expert_mm(quantizer.blocks(dg, act_block, sd).to(acc), transposed(w3), offsets)
        dx = scatter_rows(dxs.to(dtype), routing.row_asg, routing.assignment_row)
    dw1 = dw3 = None
    if need_w1 or need_w3:
        xs = rows(_gathered(x, routing.row_src))
        dw1 = _expert_wgrad(xs, rows(dh), offsets).to(dtype)
        dw3 = None if dg is None else _expert_wgrad(xs, rows(dg), offsets).to(dtype)
    return dx, dweights, dw1, dw2, dw3


# ----------------------------------------------------------------------------------------------- padded (bmm)


class _Bmm(torch.autograd.Function):
    """``a @ w`` for ``a [E, R, K]``, ``w [E, K, N]`` with FP8 operands (the padded strategy's GEMMs): forward
    ``a`` per row along K, ``w`` along K; backward ``da = dy @ wᵀ`` (dy per row along N, w along N) and ``dw = aᵀ @
    dy`` (both per column in groups of the recipe's rows of each expert: its capacity slots)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, w: torch.Tensor, fp8: str) -> torch.Tensor:
        rcp = fp8_recipes.recipe(fp8)
        ctx.save_for_backward(a, w)
        ctx.fp8 = fp8
        acc = _acc_dtype(a.dtype)
        aq = fp8_recipes.fake_quantize(a, rcp.act_block(), rcp.scale_dtype).to(acc)
        with torch.autocast(a.device.type, enabled=False):  # the emulation's matmul is fp32
            return torch.bmm(aq, fp8_recipes.weight(w, rcp, 0).to(acc)).to(a.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        a, w = ctx.saved_tensors
        rcp = fp8_recipes.recipe(ctx.fp8)
        with torch.autocast(a.device.type, enabled=False):
            return _bmm_grads(ctx, a, w, dy, rcp)


def _bmm_grads(ctx, a: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, rcp) -> tuple:
    acc, sd = _acc_dtype(a.dtype), rcp.scale_dtype
    da = dw = None
    if ctx.needs_input_grad[0]:
        dq = fp8_recipes.fake_quantize(dy, rcp.act_block(), sd).to(acc)
        da = torch.bmm(dq, fp8_recipes.weight(w, rcp, 1).to(acc).transpose(1, 2)).to(a.dtype)
    if ctx.needs_input_grad[1]:
        column = (rcp.group, 1)  # groups of rows of one expert, per column
        aq = fp8_recipes.fake_quantize(a, column, sd).to(acc)
        dw = torch.bmm(aq.transpose(1, 2), fp8_recipes.fake_quantize(dy, column, sd).to(acc)).to(w.dtype)
    return da, dw, None  # None for fp8


def bmm(a: torch.Tensor, w: torch.Tensor, fp8: str) -> torch.Tensor:
    """``torch.bmm(a, w)`` with the FP8 GEMMs of recipe ``fp8`` forward and backward (``_Bmm``), in ``a``'s dtype."""
    return _Bmm.apply(a, w, fp8)


# ----------------------------------------------------------------------------------------------- grouped GEMM


def quantizer_for(backend: str) -> Quantizer:
    """The quantizer of ``backend``'s FP8 emulation: the reference (torch), or the Triton kernels (triton, with the
    backend's one-time warning)."""
    if backend == "triton":
        from . import triton as triton_backend  # imports this module

        return triton_backend._fp8_emulation()
    return REFERENCE


class _GroupedMm(torch.autograd.Function):
    """``ops.grouped.grouped_mm`` with FP8 operands (``custom_moe_mlp`` and the grouped strategy's op-by-op path):
    forward x per token along K, w along K; backward ``dx = dy @ wᵀ`` (dy per row along N, w along N; then the sum
    of each token's rows) and ``dw = x[src]ᵀ @ dy`` (both in groups of one expert's rows, ``fp8.quantize_rows``).
    The GEMMs run on the PyTorch backend's ops in fp32; the quantization is ``backend``'s."""

    @staticmethod
    def forward(ctx, x, w, offsets, row_assignment, assignment_row, backend: str, fp8: str) -> torch.Tensor:
        ctx.save_for_backward(x, w, offsets, row_assignment, assignment_row)
        ctx.backend, ctx.fp8 = backend, fp8
        rcp, quantizer, acc = fp8_recipes.recipe(fp8), quantizer_for(backend), _acc_dtype(x.dtype)
        xq = quantizer.blocks(x, rcp.act_block(), rcp.scale_dtype).to(acc)
        wq = fp8_recipes.weight(w, rcp, 0, quantizer.blocks).to(acc)
        return ops_grouped.grouped_mm(xq, wq, offsets, row_assignment, assignment_row, "torch").to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple:
        x, w, offsets, row_assignment, assignment_row = ctx.saved_tensors
        rcp, quantizer, acc = fp8_recipes.recipe(ctx.fp8), quantizer_for(ctx.backend), _acc_dtype(x.dtype)
        sd = rcp.scale_dtype
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dq = quantizer.blocks(dy, rcp.act_block(), sd).to(acc)
            wt = fp8_recipes.weight(w, rcp, 1, quantizer.blocks).to(acc).transpose(1, 2)
            dx = ops_grouped.grouped_mm(dq, wt, offsets, backend="torch")
            if row_assignment is not None:
                dx = ops_permute.scatter_rows(dx, row_assignment, assignment_row, backend="torch")
            dx = dx.to(x.dtype)
        if ctx.needs_input_grad[1]:
            src = None if row_assignment is None else ops_grouped.row_sources(row_assignment, assignment_row.shape[1])
            xr = quantizer.rows(_gathered(x, src), offsets, rcp.group, sd).to(acc)
            dyr = quantizer.rows(dy, offsets, rcp.group, sd).to(acc)
            dw = ops_grouped.grouped_mm_wgrad(xr, dyr, offsets, backend="torch")
            dw = dw.to(w.dtype)
        # None for offsets, row_assignment, assignment_row, backend and fp8
        return dx, dw, None, None, None, None, None


def grouped_mm(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    row_assignment: torch.Tensor | None,
    assignment_row: torch.Tensor | None,
    backend: str,
    fp8: str,
) -> torch.Tensor:
    """``ops.grouped.grouped_mm`` (same arguments) with the FP8 GEMMs of recipe ``fp8`` forward and backward
    (``_GroupedMm``), in ``x``'s dtype."""
    return _GroupedMm.apply(x, w, offsets, row_assignment, assignment_row, backend, fp8)
