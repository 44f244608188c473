"""FP8 GEMMs of the strategies that compose ops rather than run the fused expert MLP: the padded strategy's
``torch.bmm`` (``bmm``) and ``grouped_mm`` (``custom_moe_mlp`` and the grouped strategy's callable-activation path),
each an autograd Function that multiplies operands quantized by an ``fp8`` recipe (``blocksparse_moe.fp8``) in fp32:
the emulation of ``backends.torch_fp8`` for these paths, with the same choice of quantized operands (every GEMM
forward and backward, weight gradients in groups of one expert's rows along the tokens)."""

from __future__ import annotations

import torch

from .. import backends
from .. import fp8 as fp8_recipes
from ..fp8 import Quantizer
from ..ops import grouped as ops_grouped
from ..ops import permute as ops_permute

__all__ = ["bmm", "grouped_mm", "quantizer_for"]


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
    The GEMMs run on the PyTorch backend's ops in fp32; the quantization is ``backend``'s."""

    @staticmethod
    def forward(ctx, x, w, offsets, row_assignment, assignment_row, backend: str, fp8: str) -> torch.Tensor:
        ctx.save_for_backward(x, w, offsets, row_assignment, assignment_row)
        ctx.backend, ctx.fp8 = backend, fp8
        rcp, quantizer, acc = fp8_recipes.recipe(fp8), quantizer_for(backend), _acc_dtype(x.dtype)
        xq = quantizer.blocks(x, rcp.act_block(), rcp.scale_dtype).to(acc)
        wq = fp8_recipes.weight(w, rcp, 0, quantizer.quantize).to(acc)
        return ops_grouped.grouped_mm(xq, wq, offsets, row_assignment, assignment_row, "torch").to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple:
        x, w, offsets, row_assignment, assignment_row = ctx.saved_tensors
        rcp, quantizer, acc = fp8_recipes.recipe(ctx.fp8), quantizer_for(ctx.backend), _acc_dtype(x.dtype)
        sd = rcp.scale_dtype
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dq = quantizer.blocks(dy, rcp.act_block(), sd).to(acc)
            wt = fp8_recipes.weight(w, rcp, 1, quantizer.quantize).to(acc).transpose(1, 2)
            dx = ops_grouped.grouped_mm(dq, wt, offsets, backend="torch")
            if row_assignment is not None:
                dx = ops_permute.scatter_rows(dx, row_assignment, assignment_row, backend="torch")
            dx = dx.to(x.dtype)
        if ctx.needs_input_grad[1]:
            src = None if row_assignment is None else ops_grouped.row_sources(row_assignment, assignment_row.shape[1])
            xr = quantizer.rows(_gather(x, src), offsets, rcp.group, sd).to(acc)
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
