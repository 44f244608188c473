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
| wgrads ``awᵀ @ dout``, ``xᵀ @ dh``, ``xᵀ @ dg`` | both along the tokens, in groups of one expert's rows (x: below) |

The weight gradients are FP8 too, with scales along the token dimension (the reduced one: groups of 128 / 32 rows
of one expert, or all its rows for ``"rowwise"``; ``fp8.quantize_rows``). What stays unquantized: the activation
and its derivative, the top-k weights and the weight gradient ``<G, a>`` (fp32 epilogue math), the combine. The
weights are quantized once per step per layout (``fp8.weight``'s cache). Autograd saves (``fp8_cache_x``, the
default) the forward's E4M3 x and its scales (quantized per token along d, for the up-projection) instead of x, then
the top-k weights, h, g (in x's dtype), the weights and the routing; the weight gradients dW1 / dW3 read x
requantized from it (dequantized ``q · s`` in fp32, quantized along the tokens: DeepSeek-V3's 1×128 to 128×1
conversion). Bytes saved per token for x: ``2·d`` (bf16) → ``d`` plus the scales (``4·d/128`` blockwise, ``d/32``
mxfp8, 4 rowwise): 512 → 264 / 264 / 260 at d = 256. The double quantization costs dW1 / dW3 0.6-0.7 dB of SQNR with
fp32 scales (blockwise, rowwise) and nothing with mxfp8's power-of-two scales (README "FP8": measured at d=256,
f=512, T=512, E=8, k=2). Without ``fp8_cache_x`` (where something else keeps x anyway) autograd saves x itself and
dW1 / dW3 quantize it along the tokens (``x_scale`` None in ``mlp_backward``). The padded strategy's and
``custom_moe_mlp``'s FP8 GEMMs are ``strategies.fp8``.
"""

from __future__ import annotations

import torch

from .. import backends
from .. import fp8 as fp8_recipes
from ..activations import act_backward, get_activation
from ..fp8 import REFERENCE, Quantizer
from .common import MlpRouting, combine_dots

__all__ = ["mlp_forward", "mlp_backward"]


def _torch():
    """The PyTorch backend, whose primitives (``_expert_mm``, ``_expert_wgrad``, ``_gathered``, the layouts) run
    the emulation's GEMMs: reached through ``backends.get`` as the ops reach a backend (it dispatches here)."""
    return backends.get("torch")


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
    *,
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
    """``backends.torch.mlp_forward`` with the GEMMs of recipe ``fp8`` (module docstring), and the E4M3 x and its
    scales (per token along d) that backward reads instead of x; ``scales = (s1, s2, s3)``: w1, w2, w3 are
    prequantized E4M3 weights (``fp8.prequantize``), dequantized at each call."""
    rcp, pt = fp8_recipes.recipe(fp8), _torch()
    dtype, acc, act = x.dtype, _acc_dtype(x.dtype), get_activation(activation)
    act_block = rcp.act_block()
    s1, s2, s3 = (None, None, None) if scales is None else scales

    def weight(w: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        return fp8_recipes.weight(w, rcp, 0, quantizer.quantize, scale=s)

    x_fp8 = quantizer.quantize(x, act_block, rcp.scale_dtype)
    xs = pt._gathered(fp8_recipes.dequantize(*x_fp8, act_block).to(acc), routing.row_src)
    h = pt._expert_mm(xs, weight(w1, s1), routing.offsets).to(dtype)
    g = None if w3 is None else pt._expert_mm(xs, weight(w3, s3), routing.offsets)
    g = None if g is None else g.to(dtype)
    a = act(h.to(acc))
    if g is not None:
        a = a * g.to(acc)
    aq = quantizer.blocks(a.to(dtype), act_block, rcp.scale_dtype).to(acc)
    y = pt._expert_mm(aq, weight(w2, s2), routing.offsets).to(dtype)
    out = pt.scatter_rows(y, routing.row_asg, routing.assignment_row, weights)
    return out, pt._layout(h, routing), None if g is None else pt._layout(g, routing), x_fp8


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
    quantizer: Quantizer = REFERENCE,
) -> tuple[torch.Tensor | None, ...]:
    """``backends.torch.mlp_backward`` with the GEMMs of recipe ``fp8`` (module docstring); ``x``, ``x_scale``:
    the forward's E4M3 x and its scales (``mlp_forward``'s last result), or x itself and None (``fp8_cache_x``
    False); the gradients in dout's dtype."""
    need_x, need_weights, need_w1, need_w2, need_w3 = needs
    rcp, pt = fp8_recipes.recipe(fp8), _torch()
    dtype, acc, F, offsets = dout.dtype, _acc_dtype(dout.dtype), w1.shape[2], routing.offsets
    act_block, sd = rcp.act_block(), rcp.scale_dtype

    def rows(t: torch.Tensor) -> torch.Tensor:  # a weight gradient's operand, along the tokens of each expert
        return quantizer.rows(t, offsets, rcp.group, sd).to(acc)

    def transposed(w: torch.Tensor) -> torch.Tensor:  # wᵀ [E, N, K], quantized along N
        return fp8_recipes.weight(w, rcp, 1, quantizer.quantize).transpose(1, 2)

    dq = pt._gathered(quantizer.blocks(dout, act_block, sd).to(acc), routing.row_src)
    G = pt._expert_mm(dq, transposed(w2), offsets)  # dout[token] @ w2ᵀ, unweighted
    hr = pt._rows(h, routing, F).to(acc)
    act = get_activation(activation)(hr)
    asg = routing.row_asg.long()
    flat = torch.cat([weights.to(acc).reshape(-1), weights.new_zeros(1, dtype=acc)])
    wr = flat[torch.where(asg >= 0, asg, flat.shape[0] - 1)][:, None]
    gr = None if g is None else pt._rows(g, routing, F).to(acc)
    a = act if gr is None else act * gr
    dweights = combine_dots((G * a).sum(1)[None], routing.assignment_row, weights.dtype) if need_weights else None
    Gw = G * wr
    dg = None if gr is None else (Gw * act).to(dtype)
    dh = act_backward(Gw if gr is None else Gw * gr, hr, activation).to(dtype)  # Gw's last use (written in place)
    dw2 = None
    if need_w2:
        dw2 = pt._expert_wgrad(rows((a * wr).to(dtype)), rows(pt._gathered(dout, routing.row_src)), offsets).to(dtype)
    need_wgrad = need_w1 or need_w3

    def layouts(t: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """dh or dg for the dx GEMM (along f) and for the weight gradient (along the tokens): one pass for both."""
        if t is None:
            return None, None
        if need_x and need_wgrad:
            return tuple(u.to(acc) for u in quantizer.dual(t, offsets, rcp.group, sd))
        return (quantizer.blocks(t, act_block, sd).to(acc) if need_x else None), (rows(t) if need_wgrad else None)

    (dh_f, dh_t), (dg_f, dg_t) = layouts(dh), layouts(dg)
    dx = None
    if need_x:
        dxs = pt._expert_mm(dh_f, transposed(w1), offsets)
        if dg is not None:
            dxs = dxs + pt._expert_mm(dg_f, transposed(w3), offsets)
        dx = pt.scatter_rows(dxs.to(dtype), routing.row_asg, routing.assignment_row)
    dw1 = dw3 = None
    if need_wgrad:
        x_src = x if x_scale is None else fp8_recipes.dequantize(x, x_scale, act_block)  # the FP8 x: q · s in fp32
        xs = rows(pt._gathered(x_src, routing.row_src))
        dw1 = pt._expert_wgrad(xs, dh_t, offsets).to(dtype)
        dw3 = None if dg is None else pt._expert_wgrad(xs, dg_t, offsets).to(dtype)
    return dx, dweights, dw1, dw2, dw3
