"""Differentiable block-sparse matmuls over the expert topology: custom ops ``bsm::sdd``, ``bsm::dsd``,
``bsm::dsd_t``, ``bsm::dds``, ``bsm::dds_t`` and ``bsm::sdd_wgrad`` (with fake impls, so they trace under
``torch.compile(fullgraph=True)``) and their autograd.

Each op takes its two tensor operands, the topology as ``padded_offsets`` plus ``block_size``, ``ffn_size`` and
``max_block_rows`` (``routing.Topology``: the block-diagonal layout needs nothing else), and the backend, which the
functional wrappers below resolve once per call (``config.resolve_backend``) after validating the operands
(``_checks``). Gradients reuse the same ops (MegaBlocks §5.1), on transposed views, never copies, and every weight
gradient comes out in its parameter's layout:

- ``sdd``:   da = dsd(dS, wᵀ),       dw = sdd_wgrad(a, dS)         ``[E, K, F]`` like w
- ``dsd``:   dS = sdd(dy, wᵀ),       dw = dsd_t(S, dy)             ``[E, F, N]`` like w
- ``dsd_t``: dS = sdd(a, dgᵀ),       da = dsd(S, dg)
- ``dds``:   da = dds_t(dc, S),      dS = sdd(aᵀ, dc viewed [E, M, F])
- ``dds_t``: dg = dds(dc, S),        dS = sdd(dcᵀ, g viewed [E, M, F])

``sdd_wgrad(a, S)`` (``out[e] = a[rows of e]ᵀ @ S[rows of e]``) is ``dds`` with its output in the weights' layout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from ..config import resolve_backend
from ..routing import Topology
from . import _checks

__all__ = ["sdd", "dsd", "dsd_t", "dds", "dds_t", "sdd_wgrad"]


def _topology(padded_offsets: Tensor, block_size: int, ffn_size: int, max_block_rows: int) -> Topology:
    return Topology(block_size, padded_offsets.shape[0] - 1, ffn_size, max_block_rows, padded_offsets)


# ----------------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("bsm::sdd", mutates_args=())
def _sdd(
    a: Tensor, w: Tensor, padded_offsets: Tensor, block_size: int, ffn_size: int, max_block_rows: int, backend: str
) -> Tensor:
    return backends.get(backend).sdd(a, w, _topology(padded_offsets, block_size, ffn_size, max_block_rows))


@_sdd.register_fake
def _(a, w, padded_offsets, block_size, ffn_size, max_block_rows, backend):
    return a.new_empty(_checks.sdd_shape(a, w, _topology(padded_offsets, block_size, ffn_size, max_block_rows)))


@torch.library.custom_op("bsm::sdd_wgrad", mutates_args=())
def _sdd_wgrad(
    a: Tensor, data: Tensor, padded_offsets: Tensor, block_size: int, ffn_size: int, max_block_rows: int, backend: str
) -> Tensor:
    return backends.get(backend).sdd_wgrad(a, data, _topology(padded_offsets, block_size, ffn_size, max_block_rows))


@_sdd_wgrad.register_fake
def _(a, data, padded_offsets, block_size, ffn_size, max_block_rows, backend):
    topo = _topology(padded_offsets, block_size, ffn_size, max_block_rows)
    return a.new_empty(_checks.sdd_wgrad_shape(a, data, topo))


@torch.library.custom_op("bsm::dsd", mutates_args=())
def _dsd(
    data: Tensor, w: Tensor, padded_offsets: Tensor, block_size: int, ffn_size: int, max_block_rows: int, backend: str
) -> Tensor:
    return backends.get(backend).dsd(data, _topology(padded_offsets, block_size, ffn_size, max_block_rows), w)


@_dsd.register_fake
def _(data, w, padded_offsets, block_size, ffn_size, max_block_rows, backend):
    return data.new_empty(_checks.dsd_shape(data, _topology(padded_offsets, block_size, ffn_size, max_block_rows), w))


@torch.library.custom_op("bsm::dsd_t", mutates_args=())
def _dsd_t(
    data: Tensor, a: Tensor, padded_offsets: Tensor, block_size: int, ffn_size: int, max_block_rows: int, backend: str
) -> Tensor:
    return backends.get(backend).dsd_t(data, _topology(padded_offsets, block_size, ffn_size, max_block_rows), a)


@_dsd_t.register_fake
def _(data, a, padded_offsets, block_size, ffn_size, max_block_rows, backend):
    topo = _topology(padded_offsets, block_size, ffn_size, max_block_rows)
    return data.new_empty(_checks.dsd_t_shape(data, topo, a))


@torch.library.custom_op("bsm::dds", mutates_args=())
def _dds(
    a: Tensor, data: Tensor, padded_offsets: Tensor, block_size: int, ffn_size: int, max_block_rows: int, backend: str
) -> Tensor:
    return backends.get(backend).dds(a, data, _topology(padded_offsets, block_size, ffn_size, max_block_rows))


@_dds.register_fake
def _(a, data, padded_offsets, block_size, ffn_size, max_block_rows, backend):
    return a.new_empty(_checks.dds_shape(a, data, _topology(padded_offsets, block_size, ffn_size, max_block_rows)))


@torch.library.custom_op("bsm::dds_t", mutates_args=())
def _dds_t(
    g: Tensor, data: Tensor, padded_offsets: Tensor, block_size: int, ffn_size: int, max_block_rows: int, backend: str
) -> Tensor:
    return backends.get(backend).dds_t(g, data, _topology(padded_offsets, block_size, ffn_size, max_block_rows))


@_dds_t.register_fake
def _(g, data, padded_offsets, block_size, ffn_size, max_block_rows, backend):
    return g.new_empty(_checks.dds_t_shape(g, data, _topology(padded_offsets, block_size, ffn_size, max_block_rows)))


# ----------------------------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output) -> None:
    """Every op saves its two tensor operands and ``padded_offsets``; the sizes and the backend ride on ctx."""
    x, y, padded_offsets, ctx.block_size, ctx.ffn_size, ctx.max_block_rows, ctx.backend = inputs
    ctx.save_for_backward(x, y, padded_offsets)


def _meta(ctx) -> tuple:
    """The non-tensor op arguments after the operands, from ``ctx``."""
    return ctx.block_size, ctx.ffn_size, ctx.max_block_rows, ctx.backend


# Each backward returns the gradients of the two operands, then None for padded_offsets, block_size, ffn_size,
# max_block_rows and backend, none of which is differentiable.
_NO_GRAD = (None,) * 5


def _sdd_backward(ctx, grad):
    a, w, offsets = ctx.saved_tensors
    da = _dsd(grad, w.transpose(1, 2), offsets, *_meta(ctx)) if ctx.needs_input_grad[0] else None
    dw = _sdd_wgrad(a, grad, offsets, *_meta(ctx)) if ctx.needs_input_grad[1] else None
    return da, dw, *_NO_GRAD


def _sdd_wgrad_backward(ctx, grad):  # out[e] = a[rows e]ᵀ S[rows e]: da = dsd(S, gradᵀ), dS = sdd(a, grad)
    a, data, offsets = ctx.saved_tensors
    da = _dsd(data, grad.transpose(1, 2), offsets, *_meta(ctx)) if ctx.needs_input_grad[0] else None
    ddata = _sdd(a, grad, offsets, *_meta(ctx)) if ctx.needs_input_grad[1] else None
    return da, ddata, *_NO_GRAD


def _dsd_backward(ctx, grad):
    data, w, offsets = ctx.saved_tensors
    ddata = _sdd(grad, w.transpose(1, 2), offsets, *_meta(ctx)) if ctx.needs_input_grad[0] else None
    dw = _dsd_t(data, grad, offsets, *_meta(ctx)) if ctx.needs_input_grad[1] else None
    return ddata, dw, *_NO_GRAD


def _dsd_t_backward(ctx, grad):
    data, a, offsets = ctx.saved_tensors
    ddata = _sdd(a, grad.transpose(1, 2), offsets, *_meta(ctx)) if ctx.needs_input_grad[0] else None
    da = _dsd(data, grad, offsets, *_meta(ctx)) if ctx.needs_input_grad[1] else None
    return ddata, da, *_NO_GRAD


def _dds_backward(ctx, grad):
    a, data, offsets = ctx.saved_tensors
    da = _dds_t(grad, data, offsets, *_meta(ctx)) if ctx.needs_input_grad[0] else None
    ddata = _sdd(a.t(), grad.transpose(0, 1), offsets, *_meta(ctx)) if ctx.needs_input_grad[1] else None
    return da, ddata, *_NO_GRAD


def _dds_t_backward(ctx, grad):
    g, data, offsets = ctx.saved_tensors
    dg = _dds(grad, data, offsets, *_meta(ctx)) if ctx.needs_input_grad[0] else None
    ddata = _sdd(grad.t(), g.transpose(0, 1), offsets, *_meta(ctx)) if ctx.needs_input_grad[1] else None
    return dg, ddata, *_NO_GRAD


_sdd.register_autograd(_sdd_backward, setup_context=_setup_context)
_sdd_wgrad.register_autograd(_sdd_wgrad_backward, setup_context=_setup_context)
_dsd.register_autograd(_dsd_backward, setup_context=_setup_context)
_dsd_t.register_autograd(_dsd_t_backward, setup_context=_setup_context)
_dds.register_autograd(_dds_backward, setup_context=_setup_context)
_dds_t.register_autograd(_dds_t_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- functional


def _args(topo: Topology, operand: Tensor, backend: str | None) -> tuple:
    """The op arguments after the operands: the topology's and the backend resolved for ``operand``."""
    return (
        topo.padded_offsets,
        topo.block_size,
        topo.ffn_size,
        topo.max_block_rows,
        resolve_backend(operand.device, backend, operand.dtype),
    )


def sdd(a: Tensor, w: Tensor, topo: Topology, backend: str | None = None) -> Tensor:
    """``S = a @ w`` at ``topo``'s blocks: a ``[P, K]``, w ``[E, K, F]`` → data ``[nnz_max, B, B]`` (unused slots
    and the columns past F of each expert's last block are zero)."""
    _checks.sdd_shape(a, w, topo)
    return _sdd(a, w, *_args(topo, a, backend))


def sdd_wgrad(a: Tensor, data: Tensor, topo: Topology, backend: str | None = None) -> Tensor:
    """``out[e] = a[rows of e]ᵀ @ S[rows of e]``: a ``[P, K]``, data ``[nnz_max, B, B]`` → ``[E, K, F]``."""
    _checks.sdd_wgrad_shape(a, data, topo)
    return _sdd_wgrad(a, data, *_args(topo, a, backend))


def dsd(data: Tensor, topo: Topology, w: Tensor, backend: str | None = None) -> Tensor:
    """``y = S @ w``: data ``[nnz_max, B, B]``, w ``[E, F, N]`` → ``[P, N]`` (rows without blocks zero)."""
    _checks.dsd_shape(data, topo, w)
    return _dsd(data, w, *_args(topo, data, backend))


def dsd_t(data: Tensor, topo: Topology, a: Tensor, backend: str | None = None) -> Tensor:
    """``g = Sᵀ @ a``: a ``[P, N]`` → ``[E, F, N]`` (experts without rows give zeros)."""
    _checks.dsd_t_shape(data, topo, a)
    return _dsd_t(data, a, *_args(topo, data, backend))


def dds(a: Tensor, data: Tensor, topo: Topology, backend: str | None = None) -> Tensor:
    """``c = a @ S``: a ``[M, P]`` → ``[M, E, F]``."""
    _checks.dds_shape(a, data, topo)
    return _dds(a, data, *_args(topo, data, backend))


def dds_t(g: Tensor, data: Tensor, topo: Topology, backend: str | None = None) -> Tensor:
    """``c = g @ Sᵀ``: g ``[M, E, F]`` → ``[M, P]``."""
    _checks.dds_t_shape(g, data, topo)
    return _dds_t(g, data, *_args(topo, data, backend))
