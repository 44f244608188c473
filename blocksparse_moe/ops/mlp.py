"""The fused expert MLP of both dropless strategies: custom ops ``bsm::expert_mlp`` and
``bsm::expert_mlp_backward`` (with fake impls, so they trace under ``torch.compile(fullgraph=True)``) and autograd.

``out[t] = Σ_j weights[t, j] · (act(x[t] @ w1[e]) [· (x[t] @ w3[e])]) @ w2[e]``, ``e = top_k_index[t, j]``, in
the layout of a strategy (``MlpRouting``): the block-sparse one (MegaBlocks: SDD with the GLU pair and the
activation in its epilogue, then DSD, over the block-padded rows) or the grouped one (the same two GEMMs over the
unpadded rows). Forward: the gated up-projection reads each x row tile once for ``w1`` and ``w3`` and writes ``h``,
``g`` and ``a = act(h)·g``; the down-projection is a plain GEMM; the scatter applies the top-k weights.

Autograd saves ``x``, ``h``, ``g`` (bf16 SwiGLU: ``2·(d + 2·k·f)`` bytes per token plus the block padding), the
weights and the int32 routing, nothing else: no gathered copy of x, no activated ``a``, no expert outputs. With an
``fp8`` recipe and ``fp8_cache_x`` (``MoEOptions.fp8_cache_x``: where the op holds x's only reference) it saves the
forward's E4M3 x and its scales (along d: ``d`` bytes plus the scales per token) instead of x: the weight gradients
dW1 / dW3 requantize it along the tokens (``backends.torch_fp8``); without ``fp8_cache_x`` it saves x (where
something else keeps x anyway) and quantizes it along the tokens in backward. The
backward recomputes ``a`` in the epilogue of the GEMM producing ``dout @ w2ᵀ``, which also gives the top-k weight
gradient ``<dout @ w2ᵀ, a>`` (``backends.triton.mlp_backward``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from ..backends.common import MlpRouting
from ..config import resolve_backend
from ..fp8 import E4M3, check_recipe, check_weight_scales, recipe
from ..routing import RoutingPlan
from ..validation import boolean, check_no_grad
from . import _checks

__all__ = ["mlp_routing", "expert_mlp"]


def mlp_routing(plan: RoutingPlan) -> MlpRouting:
    """The row layout of ``plan`` for the fused MLP: block-padded rows when ``plan.block_size > 1`` (the
    block-sparse strategy), else the unpadded ones (the grouped strategy)."""
    if plan.block_size > 1:
        return MlpRouting(
            plan.padded_offsets,
            plan.padded_row_token,
            plan.padded_row_assignment,
            plan.padded_assignment_row,
            plan.block_size,
        )
    return MlpRouting(plan.offsets, plan.row_token, plan.row_assignment, plan.assignment_row, plan.block_size)


# ----------------------------------------------------------------------------------------------- custom ops
# The routing crosses the custom-op boundary as its four tensors and its block size (custom ops take no dataclass);
# each op builds one MlpRouting from them. The FP8 recipe crosses as a str, "" for None; prequantized weights'
# scales as three optional tensors (None: the weights are quantized in the op, or there is no FP8). With FP8 the
# forward also returns the E4M3 x and its scales (empty tensors without), which autograd saves instead of x where
# fp8_cache_x (the last argument, a bool read by setup_context only) says so; the backward then gets them as x and
# x_scale (x_scale None: x is x itself).


@torch.library.custom_op("bsm::expert_mlp", mutates_args=())
def _expert_mlp(
    x: Tensor,
    weights: Tensor,
    w1: Tensor,
    w2: Tensor,
    w3: Tensor | None,
    offsets: Tensor,
    row_src: Tensor,
    row_asg: Tensor,
    assignment_row: Tensor,
    block_size: int,
    activation: str,
    backend: str,
    fp8: str,
    w1_scale: Tensor | None = None,
    w2_scale: Tensor | None = None,
    w3_scale: Tensor | None = None,
    fp8_cache_x: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    routing = MlpRouting(offsets, row_src, row_asg, assignment_row, block_size)
    scales = None if w1_scale is None else (w1_scale, w2_scale, w3_scale)
    out, h, g, x_fp8 = backends.get(backend).mlp_forward(
        x, weights, w1, w2, w3, routing, activation, fp8 or None, scales
    )
    x_q, x_scale = (x.new_empty(0), x.new_empty(0)) if x_fp8 is None else x_fp8
    return out, h, h.new_empty(0) if g is None else g, x_q, x_scale


@_expert_mlp.register_fake
def _(x, weights, w1, w2, w3, offsets, row_src, row_asg, assignment_row, block_size, activation, backend, fp8, *_):
    routing = MlpRouting(offsets, row_src, row_asg, assignment_row, block_size)
    h = x.new_empty(routing.intermediate_shape(w1.shape[2]))
    x_q = x_scale = x.new_empty(0)
    if fp8:
        rcp = recipe(fp8)
        x_q = x.new_empty(x.shape, dtype=E4M3)
        x_scale = x.new_empty(rcp.act_scale_shape(*x.shape), dtype=rcp.scale_dtype)
    return x.new_empty(x.shape), h, x.new_empty(0) if w3 is None else torch.empty_like(h), x_q, x_scale


@torch.library.custom_op("bsm::expert_mlp_backward", mutates_args=())
def _expert_mlp_backward(
    dout: Tensor,
    x: Tensor,
    weights: Tensor,
    w1: Tensor,
    w2: Tensor,
    w3: Tensor | None,
    h: Tensor,
    g: Tensor | None,
    offsets: Tensor,
    row_src: Tensor,
    row_asg: Tensor,
    assignment_row: Tensor,
    block_size: int,
    activation: str,
    backend: str,
    fp8: str,
    needs: list[bool],
    x_scale: Tensor | None = None,
) -> list[Tensor]:
    routing = MlpRouting(offsets, row_src, row_asg, assignment_row, block_size)
    grads = backends.get(backend).mlp_backward(
        dout, x, weights, w1, w2, w3, h, g, routing, activation, tuple(needs), fp8 or None, x_scale
    )
    return [dout.new_empty(0) if t is None else t for t in grads]


@_expert_mlp_backward.register_fake
def _(dout, x, weights, w1, w2, w3, h, g, offsets, row_src, row_asg, assignment_row, block_size, activation, backend,
      fp8, needs, x_scale=None):  # fmt: skip
    like = (dout.new_empty(x.shape), weights, w1, w2, w3)  # dx in dout's dtype (x may be the forward's E4M3 x)
    glu = w3 is not None
    wanted = (needs[0], needs[1], needs[2] or needs[4], needs[3], glu and (needs[2] or needs[4]))
    return [torch.empty_like(t, memory_format=torch.contiguous_format) if n else dout.new_empty(0)
            for t, n in zip(like, wanted)]  # fmt: skip


# ----------------------------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output) -> None:
    x, weights, w1, w2, w3, offsets, row_src, row_asg, assignment_row, *flags, w1_scale, _, _, cache_x = inputs
    if w1_scale is not None:
        raise ValueError("bsm::expert_mlp with prequantized FP8 weights (scales given) has no backward: no input may "
                         "require grad (run under torch.no_grad() or torch.inference_mode())")  # fmt: skip
    ctx.block_size, ctx.activation, ctx.backend, ctx.fp8 = flags
    _, h, g, x_q, x_scale = output
    ctx.glu = w3 is not None
    ctx.mark_non_differentiable(h, g, x_q, x_scale)
    ctx.set_materialize_grads(False)
    # with FP8 and fp8_cache_x, the forward's E4M3 x and its scales instead of x (module docstring)
    x, x_scale = (x_q, x_scale) if ctx.fp8 and cache_x else (x, None)
    saved = (x, x_scale, weights, w1, w2, w3, h, g if ctx.glu else None, offsets, row_src, row_asg, assignment_row)
    ctx.save_for_backward(*saved)


def _backward(ctx, dout, _dh, _dg, _dx_q, _dx_scale):
    x, x_scale, weights, w1, w2, w3, h, g, *routing = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    if dout is None or not any(needs):
        return (None,) * 17
    grads = _expert_mlp_backward(
        dout, x, weights, w1, w2, w3, h, g, *routing, ctx.block_size, ctx.activation, ctx.backend, ctx.fp8, needs,
        x_scale,
    )  # fmt: skip
    dx, dweights, dw1, dw2, dw3 = (t if n else None for t, n in zip(grads, needs))
    # None for the four routing tensors, block_size, activation, backend, fp8, the three weight scales and fp8_cache_x
    return dx, dweights, dw1, dw2, dw3, *(None,) * 12


_expert_mlp.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- functional


def expert_mlp(
    x: Tensor,
    weights: Tensor,
    w1: Tensor,
    w2: Tensor,
    w3: Tensor | None,
    routing: MlpRouting,
    activation: str,
    backend: str | None = None,
    fp8: str | None = None,
    weight_scales: tuple[Tensor, Tensor, Tensor | None] | None = None,
    fp8_cache_x: bool = True,
) -> Tensor:
    """The fused expert MLP (module docstring): x ``[T, d]``, weights ``[T, k]``, w1 / w3 ``[E, d, f]`` (w3 None:
    no GLU), w2 ``[E, f, d]`` (any strides each) → ``[T, d]``, over the rows of ``routing`` (``mlp_routing``).
    ``activation`` is a name of ``activations.NAMES``; ``backend`` as for every op (``config.resolve_backend``);
    ``fp8`` None or a recipe of ``fp8.RECIPES``: every GEMM in FP8 (``backends.triton_fp8``'s E4M3 kernels;
    the PyTorch backend emulates them, ``backends.torch_fp8``).
    ``weight_scales = (s1, s2, s3)``: w1, w2, w3 are prequantized E4M3 weights with these scales (``fp8.prequantize``
    for recipe ``fp8``), read as they are (inference only: nothing may require grad). Without them, differentiable in
    x, weights, w1, w2, w3 (once: no double backward). ``fp8_cache_x``: with ``fp8``, keep the forward's E4M3 x and
    its scales for backward (True) or x itself (False: where something else keeps x anyway), ``MoEOptions``'."""
    check_recipe("fp8", fp8)
    boolean("fp8_cache_x", fp8_cache_x)
    prequantized = check_weight_scales(fp8, weight_scales, w1, w2, w3)
    _checks.expert_mlp_shape(x, weights, w1, w2, w3, routing, activation, prequantized)
    if prequantized:
        check_no_grad("expert_mlp with prequantized FP8 weights", x=x, weights=weights, w1=w1, w2=w2, w3=w3)
    backend = resolve_backend(x.device, backend, x.dtype)
    r = routing
    out, *_ = _expert_mlp(
        x, weights, w1, w2, w3, r.offsets, r.row_src, r.row_asg, r.assignment_row, r.block_size, activation, backend,
        fp8 or "", *(weight_scales or (None, None, None)), fp8_cache_x,
    )  # fmt: skip
    return out
