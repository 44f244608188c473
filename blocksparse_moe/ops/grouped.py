"""Differentiable grouped GEMM over expert-sorted rows: custom ops ``bsm::grouped_mm`` and ``bsm::grouped_mm_wgrad``
(with fake impls, so they trace under ``torch.compile(fullgraph=True)``) and autograd.

For ``y = grouped_mm(x, w, offsets[, row_assignment, assignment_row])``:

- dx = grouped_mm(dy, wᵀ, offsets) (a view of w, no copy), then, with the fused gather, ``scatter_rows`` of it
  back to the tokens (summing each token's k rows);
- dw = grouped_mm_wgrad(x, dy, offsets[, row_assignment]) in w's layout ``[E, K, N]`` (experts with no rows:
  zeros), the gather fused into its loads.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from ..config import resolve_backend
from . import _checks
from .permute import _scatter_rows

__all__ = ["grouped_mm", "grouped_mm_wgrad", "row_sources"]


def row_sources(row_assignment: Tensor, top_k: int) -> Tensor:
    """``[R]`` int32 token of each sorted row (``row_assignment // k``, -1 where the row has no assignment)."""
    return torch.where(row_assignment >= 0, row_assignment // top_k, -1).to(row_assignment.dtype)


# ----------------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("bsm::grouped_mm", mutates_args=())
def _grouped_mm(
    x: Tensor,
    w: Tensor,
    offsets: Tensor,
    row_assignment: Tensor | None,
    assignment_row: Tensor | None,
    backend: str,
) -> Tensor:
    row_src = None if row_assignment is None else row_sources(row_assignment, assignment_row.shape[1])
    return backends.get(backend).grouped_mm(x, w, offsets, row_src)


@_grouped_mm.register_fake
def _(x, w, offsets, row_assignment, assignment_row, backend):
    return x.new_empty(_checks.grouped_mm_shape(x, w, offsets, row_assignment, assignment_row))


@torch.library.custom_op("bsm::grouped_mm_wgrad", mutates_args=())
def _grouped_mm_wgrad(
    x: Tensor, dy: Tensor, offsets: Tensor, row_assignment: Tensor | None, k: int, backend: str
) -> Tensor:
    row_src = None if row_assignment is None else row_sources(row_assignment, k)
    return backends.get(backend).grouped_mm_wgrad(x, dy, offsets, row_src)


@_grouped_mm_wgrad.register_fake
def _(x, dy, offsets, row_assignment, k, backend):
    return x.new_empty(_checks.grouped_mm_wgrad_shape(x, dy, offsets, row_assignment, k))


# ----------------------------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output) -> None:
    x, w, offsets, row_assignment, assignment_row, ctx.backend = inputs
    ctx.save_for_backward(x, w, offsets, row_assignment, assignment_row)


def _grouped_mm_backward(ctx, grad):
    x, w, offsets, row_assignment, assignment_row = ctx.saved_tensors
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = _grouped_mm(grad, w.transpose(1, 2), offsets, None, None, ctx.backend)
        if row_assignment is not None:
            dx = _scatter_rows(dx, row_assignment, assignment_row, None, ctx.backend)
    if ctx.needs_input_grad[1]:
        k = 1 if assignment_row is None else assignment_row.shape[1]
        dw = _grouped_mm_wgrad(x, grad, offsets, row_assignment, k, ctx.backend)
    # None for offsets, row_assignment, assignment_row (integer index tensors) and backend (a string)
    return dx, dw, None, None, None, None


_grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- functional


def grouped_mm(
    x: Tensor,
    w: Tensor,
    offsets: Tensor,
    row_assignment: Tensor | None = None,
    assignment_row: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """``y[i] = x[src(i)] @ w[e]`` for expert-sorted rows ``offsets[e] ≤ i < offsets[e+1]`` (rows ``≥
    offsets[E]`` zero); ``src(i) = row_assignment[i] // k`` when both maps are given (fused gather, k =
    ``assignment_row.shape[1]``), else ``i``. x ``[T or R, K]``, w ``[E, K, N]`` → ``[R, N]``; differentiable in
    x and w."""
    _checks.grouped_mm_shape(x, w, offsets, row_assignment, assignment_row)
    return _grouped_mm(x, w, offsets, row_assignment, assignment_row, resolve_backend(x.device, backend, x.dtype))


def grouped_mm_wgrad(
    x: Tensor,
    dy: Tensor,
    offsets: Tensor,
    row_assignment: Tensor | None = None,
    k: int = 1,
    backend: str | None = None,
) -> Tensor:
    """``dw[e] = x[src(rows of e)]ᵀ @ dy[rows of e]`` → ``[E, K, N]``: ``grouped_mm``'s weight gradient (not
    differentiable itself)."""
    _checks.grouped_mm_wgrad_shape(x, dy, offsets, row_assignment, k)
    return _grouped_mm_wgrad(x, dy, offsets, row_assignment, k, resolve_backend(x.device, backend, x.dtype))
