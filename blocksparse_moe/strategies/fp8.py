"""FP8 GEMMs of the strategies that compose ops rather than run the fused expert MLP: the padded strategy's
``torch.bmm`` (``bmm``) and ``grouped_mm`` (``custom_moe_mlp`` and the grouped strategy's callable-activation path),
each an autograd Function that multiplies operands quantized by an ``fp8`` recipe (``blocksparse_moe.fp8``) in fp32:
the emulation of ``backends.torch_fp8`` for these paths, with the same choice of quantized operands (every GEMM
forward and backward, weight gradients in groups of one expert's rows along the tokens) and the same choice of what
the up-projections keep of x (``MoEOptions.fp8_cache_x``: its E4M3 copy, ``quantize_operand``, or x)."""

from __future__ import annotations

import torch

from .. import backends
from .. import fp8 as fp8_recipes
from ..fp8 import Quantizer
from ..ops import grouped as ops_grouped
from ..ops import permute as ops_permute

__all__ = ["bmm", "grouped_mm", "quantize_operand", "quantizer_for"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def quantizer_for(backend: str) -> Quantizer:
    """The quantizer of ``backend``'s FP8 emulation (``fp8_quantizer()`` of the backend module: the reference on
    the PyTorch backend, the Triton kernels, with their one-time warning, on the Triton one)."""
    return backends.get(backend).fp8_quantizer()


# ----------------------------------------------------------------------------------------------- padded (bmm)


class _Bmm(torch.autograd.Function):
    """``a @ w`` for ``a [E, R, K]``, ``w [E, K, N]`` with FP8 operands (the padded strategy's GEMMs): forward
    ``a`` per row along K, ``w`` along K; backward ``da = dy @ wᵀ`` (dy per row along N, w along N) and ``dw = aᵀ @
    dy`` (both per column in groups of the recipe's rows of each expert: its capacity slots). ``a_q``, ``a_s``: a
    already quantized (``quantize_operand``), kept for backward instead of a; ``dw`` then requantizes it."""

    @staticmethod
    def forward(ctx, a, w, fp8: str, a_q=None, a_s=None) -> torch.Tensor:
        rcp = fp8_recipes.recipe(fp8)
        ctx.save_for_backward(a if a_q is None else None, w, a_q, a_s)
        ctx.fp8, ctx.dtype = fp8, a.dtype
        acc = _acc_dtype(a.dtype)
        aq = _fake_quantized(a, a_q, a_s, rcp, fp8_recipes.fake_quantize).to(acc)
        with torch.autocast(a.device.type, enabled=False):  # the emulation's matmul is fp32
            return torch.bmm(aq, fp8_recipes.weight(w, rcp, 0).to(acc)).to(a.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        a, w, a_q, a_s = ctx.saved_tensors
        rcp = fp8_recipes.recipe(ctx.fp8)
        with torch.autocast(dy.device.type, enabled=False):
            return _bmm_grads(ctx, a, a_q, a_s, w, dy, rcp)


def _fake_quantized(x, x_q, x_s, rcp, fake_quantize) -> torch.Tensor:
    """x per row along K as the forward GEMM multiplies it: ``fake_quantize(x)``, or its given E4M3 values and scales
    dequantized (the same values)."""
    if x_q is None:
        return fake_quantize(x, rcp.act_block(), rcp.scale_dtype)
    return fp8_recipes.dequantize(x_q, x_s, rcp.act_block())


def _bmm_grads(ctx, a, a_q, a_s, w, dy, rcp) -> tuple:
    acc, sd, dtype = _acc_dtype(ctx.dtype), rcp.scale_dtype, ctx.dtype
    da = dw = None
    if ctx.needs_input_grad[0]:
        dq = fp8_recipes.fake_quantize(dy, rcp.act_block(), sd).to(acc)
        da = torch.bmm(dq, fp8_recipes.weight(w, rcp, 1).to(acc).transpose(1, 2)).to(dtype)
    if ctx.needs_input_grad[1]:
        column = (rcp.group, 1)  # groups of rows of one expert, per column
        src = a if a_q is None else fp8_recipes.dequantize(a_q, a_s, rcp.act_block())  # the kept FP8 a: q · s
        aq = fp8_recipes.fake_quantize(src, column, sd).to(acc)
        dw = torch.bmm(aq.transpose(1, 2), fp8_recipes.fake_quantize(dy, column, sd).to(acc)).to(w.dtype)
    return da, dw, None, None, None  # None for fp8, a_q, a_s


def quantize_operand(x: torch.Tensor, fp8: str, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The E4M3 values and scales of a GEMM's row operand ``x`` (per row along its last dimension, recipe ``fp8``),
    by ``backend``'s quantizer (None: the reference, the padded ``bmm``'s): passed to ``bmm`` / ``grouped_mm`` as
    ``x_fp8``, computed once for the GEMMs sharing the operand (the up-projections), and kept for backward instead
    of x (``MoEOptions.fp8_cache_x``)."""
    rcp = fp8_recipes.recipe(fp8)
    quantize = fp8_recipes.quantize if backend is None else quantizer_for(backend).quantize
    return quantize(x.detach(), rcp.act_block(), rcp.scale_dtype)


def bmm(
    a: torch.Tensor, w: torch.Tensor, fp8: str, a_fp8: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """``torch.bmm(a, w)`` with the FP8 GEMMs of recipe ``fp8`` forward and backward (``_Bmm``), in ``a``'s dtype;
    ``a_fp8``: ``quantize_operand(a, fp8)``, kept for backward instead of a."""
    return _Bmm.apply(a, w, fp8, *(a_fp8 or (None, None)))


# ----------------------------------------------------------------------------------------------- grouped GEMM


def _gather(x: torch.Tensor, src: torch.Tensor | None) -> torch.Tensor:
    """``x[src]``, zero rows where ``src`` is -1 (``x`` when None)."""
    if src is None:
        return x
    padded = torch.cat([x, x.new_zeros(1, x.shape[1])])
    return padded[torch.where(src >= 0, src.long(), x.shape[0])]


class _GroupedMm(torch.autograd.Function):
    """``ops.grouped.grouped_mm`` with FP8 operands (``custom_moe_mlp`` and the grouped strategy's op-by-op path):
    forward x per token along K, w along K; backward ``dx = dy @ wᵀ`` (dy per row along N, w along N; then the sum
    of each token's rows) and ``dw = x[src]ᵀ @ dy`` (both in groups of one expert's rows, ``fp8.quantize_rows``).
    The GEMMs run on the PyTorch backend's ops in fp32; the quantization is ``backend``'s. ``x_q``, ``x_s``: x
    already quantized (``quantize_operand``), kept for backward instead of x; ``dw`` then requantizes it."""

    @staticmethod
    def forward(
        ctx, x, w, offsets, row_assignment, assignment_row, backend: str, fp8: str, x_q=None, x_s=None
    ) -> torch.Tensor:
        ctx.save_for_backward(x if x_q is None else None, w, offsets, row_assignment, assignment_row, x_q, x_s)
        ctx.backend, ctx.fp8, ctx.dtype = backend, fp8, x.dtype
        rcp, quantizer, acc = fp8_recipes.recipe(fp8), quantizer_for(backend), _acc_dtype(x.dtype)
        xq = _fake_quantized(x, x_q, x_s, rcp, quantizer.blocks).to(acc)
        wq = fp8_recipes.weight(w, rcp, 0, quantizer.quantize).to(acc)
        return ops_grouped.grouped_mm(xq, wq, offsets, row_assignment, assignment_row, "torch").to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple:
        x, w, offsets, row_assignment, assignment_row, x_q, x_s = ctx.saved_tensors
        rcp, quantizer, acc = fp8_recipes.recipe(ctx.fp8), quantizer_for(ctx.backend), _acc_dtype(ctx.dtype)
        sd = rcp.scale_dtype
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dq = quantizer.blocks(dy, rcp.act_block(), sd).to(acc)
            wt = fp8_recipes.weight(w, rcp, 1, quantizer.quantize).to(acc).transpose(1, 2)
            dx = ops_grouped.grouped_mm(dq, wt, offsets, backend="torch")
            if row_assignment is not None:
                dx = ops_permute.scatter_rows(dx, row_assignment, assignment_row, backend="torch")
            dx = dx.to(ctx.dtype)
        if ctx.needs_input_grad[1]:
            src = None if row_assignment is None else ops_grouped.row_sources(row_assignment, assignment_row.shape[1])
            if x is None:  # the kept FP8 x: q · s in fp32
                x = fp8_recipes.dequantize(x_q, x_s, rcp.act_block())
            xr = quantizer.rows(_gather(x, src), offsets, rcp.group, sd).to(acc)
            dyr = quantizer.rows(dy, offsets, rcp.group, sd).to(acc)
            dw = ops_grouped.grouped_mm_wgrad(xr, dyr, offsets, backend="torch")
            dw = dw.to(w.dtype)
        # None for offsets, row_assignment, assignment_row, backend, fp8, x_q and x_s
        return dx, dw, None, None, None, None, None, None, None


def grouped_mm(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    row_assignment: torch.Tensor | None,
    assignment_row: torch.Tensor | None,
    backend: str,
    fp8: str,
    x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``ops.grouped.grouped_mm`` (same arguments) with the FP8 GEMMs of recipe ``fp8`` forward and backward
    (``_GroupedMm``), in ``x``'s dtype; ``x_fp8``: ``quantize_operand(x, fp8, backend)``, kept for backward instead
    of x."""
    return _GroupedMm.apply(x, w, offsets, row_assignment, assignment_row, backend, fp8, *(x_fp8 or (None, None)))
