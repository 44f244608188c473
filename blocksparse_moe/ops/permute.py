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

from .. import backends
from ..config import resolve_backend
from . import _checks

__all__ = ["gather_rows", "scatter_rows", "weights_grad"]


# ----------------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("bsm::gather_rows", mutates_args=())
def _gather_rows(
    x: Tensor, row_assignment: Tensor, assignment_row: Tensor, weights: Tensor | None, backend: str
) -> Tensor:
    return backends.get(backend).gather_rows(x, row_assignment, assignment_row, weights)


@_gather_rows.register_fake
def _(x, row_assignment, assignment_row, weights, backend):
    return x.new_empty(_checks.gather_rows_shape(x, row_assignment, assignment_row, weights))


@torch.library.custom_op("bsm::scatter_rows", mutates_args=())
def _scatter_rows(
    y: Tensor, row_assignment: Tensor, assignment_row: Tensor, weights: Tensor | None, backend: str
) -> Tensor:
    return backends.get(backend).scatter_rows(y, row_assignment, assignment_row, weights)


@_scatter_rows.register_fake
def _(y, row_assignment, assignment_row, weights, backend):
    return y.new_empty(_checks.scatter_rows_shape(y, row_assignment, assignment_row, weights))


@torch.library.custom_op("bsm::weights_grad", mutates_args=())
def _weights_grad(a: Tensor, b: Tensor, assignment_row: Tensor, dtype: torch.dtype, backend: str) -> Tensor:
    return backends.get(backend).weights_grad(a, b, assignment_row, dtype)


@_weights_grad.register_fake
def _(a, b, assignment_row, dtype, backend):
    return a.new_empty(_checks.weights_grad_shape(a, b, assignment_row, dtype), dtype=dtype)


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


def gather_rows(
    x: Tensor,
    row_assignment: Tensor,
    assignment_row: Tensor,
    weights: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Token rows into sorted order: ``out[i] = weights.flat[a] · x[a // k]``, ``a = row_assignment[i]``, zero
    where ``a = -1``. x ``[T, d]`` → ``[R, d]``; differentiable in x and weights ``[T, k]`` (None means 1)."""
    _checks.gather_rows_shape(x, row_assignment, assignment_row, weights)
    return _gather_rows(x, row_assignment, assignment_row, weights, resolve_backend(x.device, backend, x.dtype))


def scatter_rows(
    y: Tensor,
    row_assignment: Tensor,
    assignment_row: Tensor,
    weights: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Sorted rows back to tokens: ``out[t] = Σ_j weights[t, j] · y[assignment_row[t, j]]`` skipping ``-1``,
    deterministic. y ``[R, d]`` → ``[T, d]``; differentiable in y and weights ``[T, k]`` (None means 1)."""
    _checks.scatter_rows_shape(y, row_assignment, assignment_row, weights)
    return _scatter_rows(y, row_assignment, assignment_row, weights, resolve_backend(y.device, backend, y.dtype))


def weights_grad(
    a: Tensor, b: Tensor, assignment_row: Tensor, dtype: torch.dtype | None = None, backend: str | None = None
) -> Tensor:
    """``dw[t, j] = <a[t], b[assignment_row[t, j]]>`` (0 where the row is -1): a ``[T, d]``, b ``[R, d]`` →
    ``[T, k]`` in ``dtype`` (default a's). The top-k weights' gradient of both ops (not differentiable)."""
    dtype = dtype or a.dtype
    _checks.weights_grad_shape(a, b, assignment_row, dtype)
    return _weights_grad(a, b, assignment_row, dtype, resolve_backend(a.device, backend, a.dtype))
