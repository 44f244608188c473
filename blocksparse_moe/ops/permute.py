"""Differentiable gather/scatter between token order and expert-sorted rows: custom ops ``bsm::gather_rows``,
``bsm::scatter_rows`` and ``bsm::weights_grad`` (with fake impls, so they trace under
``torch.compile(fullgraph=True)``) and their autograd.

The two ops are adjoint, so each one's input gradient is the other with the same top-k weights; the gradient of
the weights is a per-assignment dot product (``weights_grad``):

- ``out = gather_rows(x, w)``:  dx = scatter_rows(dout, w),  dw[t, j] = <x[t], dout[assignment_row[t, j]]>
- ``out = scatter_rows(y, w)``: dy = gather_rows(dout, w),   dw[t, j] = <dout[t], y[assignment_row[t, j]]>
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._backend import resolve_backend
from ..kernels import permute as kernels

__all__ = ["gather_rows", "scatter_rows"]


# ----------------------------------------------------------------------------------------------- custom ops


def _define(name: str, data_name: str):
    """Custom op ``bsm::<name>`` and its fake over ``kernels.<name>`` and ``kernels.<name>_shape``, for the two ops
    that share one signature (``data_name`` names the data operand in the schema)."""
    kernel, kernel_shape = getattr(kernels, name), getattr(kernels, f"{name}_shape")
    schema = f"(Tensor {data_name}, Tensor row_assignment, Tensor assignment_row, Tensor? weights, str backend)"

    @torch.library.custom_op(f"bsm::{name}", mutates_args=(), schema=f"{schema} -> Tensor")
    def op(data, row_assignment, assignment_row, weights, backend):
        return kernel(data, row_assignment, assignment_row, weights, backend=backend)

    @op.register_fake
    def _(data, row_assignment, assignment_row, weights, backend):
        return data.new_empty(kernel_shape(data, row_assignment, assignment_row, weights))

    return op


_gather_rows = _define("gather_rows", "x")
_scatter_rows = _define("scatter_rows", "y")


@torch.library.custom_op("bsm::weights_grad", mutates_args=())
def _weights_grad(a: Tensor, b: Tensor, assignment_row: Tensor, dtype: torch.dtype, backend: str) -> Tensor:
    return kernels.weights_grad(a, b, assignment_row, dtype, backend=backend)


@_weights_grad.register_fake
def _(a, b, assignment_row, dtype, backend):
    return a.new_empty(kernels.weights_grad_shape(a, b, assignment_row, dtype), dtype=dtype)


# ----------------------------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output) -> None:
    """Both ops save their data operand, the two index maps and the weights (``None`` when absent)."""
    data, row_assignment, assignment_row, weights, ctx.backend = inputs
    ctx.save_for_backward(data, row_assignment, assignment_row, weights)


def _gather_rows_backward(ctx, grad):
    x, row_assignment, assignment_row, weights = ctx.saved_tensors
    maps = (row_assignment, assignment_row)
    dx = _scatter_rows(grad, *maps, weights, ctx.backend) if ctx.needs_input_grad[0] else None
    dweights = None
    if weights is not None and ctx.needs_input_grad[3]:
        dweights = _weights_grad(x, grad, assignment_row, weights.dtype, ctx.backend)
    # None for row_assignment and assignment_row (integer index maps) and backend (a string)
    return dx, None, None, dweights, None


def _scatter_rows_backward(ctx, grad):
    y, row_assignment, assignment_row, weights = ctx.saved_tensors
    maps = (row_assignment, assignment_row)
    dy = _gather_rows(grad, *maps, weights, ctx.backend) if ctx.needs_input_grad[0] else None
    dweights = None
    if weights is not None and ctx.needs_input_grad[3]:
        dweights = _weights_grad(grad, y, assignment_row, weights.dtype, ctx.backend)
    # None for row_assignment and assignment_row (integer index maps) and backend (a string)
    return dy, None, None, dweights, None


_gather_rows.register_autograd(_gather_rows_backward, setup_context=_setup_context)
_scatter_rows.register_autograd(_scatter_rows_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- functional


def _backend(data: Tensor, name: str, backend: str | None) -> str:
    if not isinstance(data, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(data).__name__}")
    return resolve_backend(data.device, backend)


def gather_rows(
    x: Tensor,
    row_assignment: Tensor,
    assignment_row: Tensor,
    weights: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Token rows into sorted order: ``out[i] = weights.flat[a] · x[a // k]``, ``a = row_assignment[i]``, zero
    where ``a = -1``. x ``[T, d]`` → ``[R, d]``; differentiable in x and weights ``[T, k]`` (None means 1)."""
    return _gather_rows(x, row_assignment, assignment_row, weights, _backend(x, "x", backend))


def scatter_rows(
    y: Tensor,
    row_assignment: Tensor,
    assignment_row: Tensor,
    weights: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Sorted rows back to tokens: ``out[t] = Σ_j weights[t, j] · y[assignment_row[t, j]]`` skipping ``-1``,
    deterministic. y ``[R, d]`` → ``[T, d]``; differentiable in y and weights ``[T, k]`` (None means 1)."""
    return _scatter_rows(y, row_assignment, assignment_row, weights, _backend(y, "y", backend))
