"""Differentiable block-sparse matmuls: custom ops ``bsm::sdd``, ``bsm::dsd``, ``bsm::dsd_t``, ``bsm::dds``,
``bsm::dds_t`` (with fake impls, so they trace under ``torch.compile(fullgraph=True)``) and their autograd.

Each op takes its dense/sparse operands, the topology as its seven int32 tensors (``Topology.tensors()`` order)
plus ``block_size``, ``num_experts``, ``ffn_size``, and the resolved backend (``"triton"`` or ``"torch"``).
Gradients reuse the same five ops (MegaBlocks §5.1), on transposed views, never copies:

- ``sdd``:   da = dsd(dS, wᵀ),           dw = dsd_t(dS, a)ᵀ
- ``dsd``:   dS = sdd(dy, wᵀ),           dw = dsd_t(S, dy)
- ``dsd_t``: dS = sdd(a, dgᵀ),           da = dsd(S, dg)
- ``dds``:   da = dds_t(dc, S),          dS = sdd(aᵀ, dc viewed [E, M, F])
- ``dds_t``: dg = dds(dc, S),            dS = sdd(dcᵀ, g viewed [E, M, F])

``bsm::dsd_act`` (``y = (act(h) [* g]) @ w``, the memory-optimised MLP's second GEMM) applies the activation in
the kernel's prologue and saves only ``h``, ``g`` and ``w``: dw = ``bsm::dsd_t_act`` (the Sᵀ kernel with the same
prologue), da = sdd(dy, wᵀ), then dh = da · g · act'(h) and dg = da · act(h) elementwise in fp32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._backend import resolve_backend
from ..kernels import blocksparse as kernels
from ..routing import Topology

__all__ = ["sdd", "dsd", "dsd_t", "dds", "dds_t", "dsd_act"]


def _topology(topo: list[Tensor], block_size: int, num_experts: int, ffn_size: int) -> Topology:
    """Rebuild the ``Topology`` from the op arguments (sizes follow from the tensors' static shapes)."""
    return Topology(block_size, num_experts, ffn_size, -(-ffn_size // block_size), topo[2].shape[0] - 1, *topo)


def _args(topo: Topology, operand: Tensor, backend: str | None) -> tuple:
    """The op arguments that describe the topology and the backend."""
    if not isinstance(topo, Topology):
        raise TypeError(f"topo must be a blocksparse_moe.routing.Topology, got {type(topo).__name__}")
    if not isinstance(operand, Tensor):
        raise TypeError(f"operands must be torch.Tensor, got {type(operand).__name__}")
    backend = resolve_backend(operand.device, backend)
    return list(topo.tensors()), topo.block_size, topo.num_experts, topo.ffn_size, backend


# ----------------------------------------------------------------------------------------------- custom ops


def _define(name: str, operands: tuple[str, str], topo_first: bool):
    """Custom op ``bsm::<name>`` and its fake over ``kernels.<name>`` and ``kernels.<name>_shape``. The op takes
    the two tensor operands (named ``operands`` in its schema), then the topology arguments and the backend; the
    kernel takes ``(x, topo, y)`` when ``topo_first``, else ``(x, y, topo)``."""
    kernel, kernel_shape = getattr(kernels, name), getattr(kernels, f"{name}_shape")
    x_name, y_name = operands
    schema = (
        f"(Tensor {x_name}, Tensor {y_name}, Tensor[] topo, SymInt block_size, SymInt num_experts, SymInt ffn_size, "
        "str backend) -> Tensor"
    )

    def kernel_args(x: Tensor, y: Tensor, topo: list[Tensor], *sizes: int) -> tuple:
        t = _topology(topo, *sizes)
        return (x, t, y) if topo_first else (x, y, t)

    @torch.library.custom_op(f"bsm::{name}", mutates_args=(), schema=schema)
    def op(x, y, topo, block_size, num_experts, ffn_size, backend):
        return kernel(*kernel_args(x, y, topo, block_size, num_experts, ffn_size), backend=backend)

    @op.register_fake
    def _(x, y, topo, block_size, num_experts, ffn_size, backend):
        return x.new_empty(kernel_shape(*kernel_args(x, y, topo, block_size, num_experts, ffn_size)))

    return op


_sdd = _define("sdd", ("a", "w"), topo_first=False)
_dsd = _define("dsd", ("data", "w"), topo_first=True)
_dsd_t = _define("dsd_t", ("data", "a"), topo_first=True)
_dds = _define("dds", ("a", "data"), topo_first=False)
_dds_t = _define("dds_t", ("g", "data"), topo_first=False)


def _define_act(name: str, operand: str):
    """Custom op ``bsm::<name>`` over ``kernels.<name>``: ``(h, g | None, <operand>, topology..., activation,
    backend)``."""
    kernel, kernel_shape = getattr(kernels, name), getattr(kernels, f"{name}_shape")
    schema = (
        f"(Tensor h, Tensor? g, Tensor {operand}, Tensor[] topo, SymInt block_size, SymInt num_experts, "
        "SymInt ffn_size, str activation, str backend) -> Tensor"
    )

    @torch.library.custom_op(f"bsm::{name}", mutates_args=(), schema=schema)
    def op(h, g, x, topo, block_size, num_experts, ffn_size, activation, backend):
        t = _topology(topo, block_size, num_experts, ffn_size)
        return kernel(h, g, t, x, activation, backend=backend)

    @op.register_fake
    def _(h, g, x, topo, block_size, num_experts, ffn_size, activation, backend):
        return h.new_empty(kernel_shape(h, g, _topology(topo, block_size, num_experts, ffn_size), x, activation))

    return op


_dsd_act = _define_act("dsd_act", "w")
_dsd_t_act = _define_act("dsd_t_act", "a")


# ----------------------------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output) -> None:
    """Every op saves its two tensor operands and the topology; the ints and backend ride on ctx."""
    x, y, topo, *ctx.meta = inputs
    ctx.save_for_backward(x, y, *topo)


# Each backward returns: grads of the two operands, then None for each of the seven topology index tensors, for
# block_size, num_experts, ffn_size and backend, none of which is differentiable.
_NO_GRAD = ([None] * 7, None, None, None, None)


def _sdd_backward(ctx, grad):
    a, w, *topo = ctx.saved_tensors
    da = _dsd(grad, w.transpose(1, 2), topo, *ctx.meta) if ctx.needs_input_grad[0] else None
    dw = _dsd_t(grad, a, topo, *ctx.meta).transpose(1, 2) if ctx.needs_input_grad[1] else None
    return da, dw, *_NO_GRAD


def _dsd_backward(ctx, grad):
    data, w, *topo = ctx.saved_tensors
    ddata = _sdd(grad, w.transpose(1, 2), topo, *ctx.meta) if ctx.needs_input_grad[0] else None
    dw = _dsd_t(data, grad, topo, *ctx.meta) if ctx.needs_input_grad[1] else None
    return ddata, dw, *_NO_GRAD


def _dsd_t_backward(ctx, grad):
    data, a, *topo = ctx.saved_tensors
    ddata = _sdd(a, grad.transpose(1, 2), topo, *ctx.meta) if ctx.needs_input_grad[0] else None
    da = _dsd(data, grad, topo, *ctx.meta) if ctx.needs_input_grad[1] else None
    return ddata, da, *_NO_GRAD


def _dds_backward(ctx, grad):
    a, data, *topo = ctx.saved_tensors
    da = _dds_t(grad, data, topo, *ctx.meta) if ctx.needs_input_grad[0] else None
    ddata = _sdd(a.t(), grad.transpose(0, 1), topo, *ctx.meta) if ctx.needs_input_grad[1] else None
    return da, ddata, *_NO_GRAD


def _dds_t_backward(ctx, grad):
    g, data, *topo = ctx.saved_tensors
    dg = _dds(grad, data, topo, *ctx.meta) if ctx.needs_input_grad[0] else None
    ddata = _sdd(grad.t(), g.transpose(0, 1), topo, *ctx.meta) if ctx.needs_input_grad[1] else None
    return dg, ddata, *_NO_GRAD


def _act_grad(h: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """``act(h)`` and ``act'(h)`` in fp32."""
    h = h.float()
    if activation == "none":
        return h, torch.ones_like(h)
    if activation == "relu":
        return h.clamp(min=0), (h > 0).float()
    if activation == "silu":
        s = torch.sigmoid(h)
        return h * s, s * (1 + h * (1 - s))
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(h * math.sqrt(0.5)))
        return h * cdf, cdf + h * torch.exp(-0.5 * h * h) / math.sqrt(2 * math.pi)
    c = math.sqrt(2 / math.pi)  # gelu_tanh: 0.5·h·(1 + tanh(u)), u = c·(h + 0.044715·h³)
    t = torch.tanh(c * (h + 0.044715 * h**3))
    return 0.5 * h * (1 + t), 0.5 * (1 + t) + 0.5 * h * (1 - t * t) * c * (1 + 3 * 0.044715 * h * h)


def _setup_act_context(ctx, inputs, output) -> None:
    h, g, w, topo, *meta = inputs
    ctx.glu = g is not None
    ctx.activation = meta[3]
    ctx.meta = (*meta[:3], meta[4])
    ctx.save_for_backward(h, g, w, *topo)


def _dsd_act_backward(ctx, grad):
    h, g, w, *topo = ctx.saved_tensors
    activation, (block_size, num_experts, ffn_size, backend) = ctx.activation, ctx.meta
    dw = None
    if ctx.needs_input_grad[2]:
        dw = _dsd_t_act(h, g, grad, topo, block_size, num_experts, ffn_size, activation, backend)
    dh = dg = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        da = _sdd(grad, w.transpose(1, 2), topo, *ctx.meta).float()
        a, da_dh = _act_grad(h, activation)
        if ctx.needs_input_grad[0]:
            dh = (da * da_dh if g is None else da * g.float() * da_dh).to(h.dtype)
        if ctx.needs_input_grad[1]:
            dg = (da * a).to(g.dtype)
    return dh, dg, dw, *_NO_GRAD, None


for _op, _backward in (
    (_sdd, _sdd_backward),
    (_dsd, _dsd_backward),
    (_dsd_t, _dsd_t_backward),
    (_dds, _dds_backward),
    (_dds_t, _dds_t_backward),
):
    _op.register_autograd(_backward, setup_context=_setup_context)
_dsd_act.register_autograd(_dsd_act_backward, setup_context=_setup_act_context)


# ----------------------------------------------------------------------------------------------- functional


def sdd(a: Tensor, w: Tensor, topo: Topology, backend: str | None = None) -> Tensor:
    """``S = a @ w`` at ``topo``'s blocks: a ``[P, K]``, w ``[E, K, F]`` → data ``[nnz_max, B, B]``."""
    return _sdd(a, w, *_args(topo, a, backend))


def dsd(data: Tensor, topo: Topology, w: Tensor, backend: str | None = None) -> Tensor:
    """``y = S @ w``: data ``[nnz_max, B, B]``, w ``[E, F, N]`` → ``[P, N]``."""
    return _dsd(data, w, *_args(topo, data, backend))


def dsd_t(data: Tensor, topo: Topology, a: Tensor, backend: str | None = None) -> Tensor:
    """``g = Sᵀ @ a``: a ``[P, N]`` → ``[E, F, N]``."""
    return _dsd_t(data, a, *_args(topo, data, backend))


def dsd_act(
    h: Tensor, g: Tensor | None, topo: Topology, w: Tensor, activation: str, backend: str | None = None
) -> Tensor:
    """``y = (act(h) [* g]) @ w``: h (and GLU gate g) ``[nnz_max, B, B]``, w ``[E, F, N]`` → ``[P, N]``; the
    activation (``"gelu"``, ``"gelu_tanh"``, ``"relu"``, ``"silu"`` or ``"none"``) is fused into the kernel, and
    backward keeps only ``h``, ``g`` and ``w``. Gradients at the elements of h / g the op ignores are unspecified."""
    if activation not in kernels.ACT_CODES:
        raise ValueError(f"activation must be one of {sorted(kernels.ACT_CODES)}, got {activation!r}")
    topo_tensors, block_size, num_experts, ffn_size, backend = _args(topo, h, backend)
    return _dsd_act(h, g, w, topo_tensors, block_size, num_experts, ffn_size, activation, backend)


def dds(a: Tensor, data: Tensor, topo: Topology, backend: str | None = None) -> Tensor:
    """``c = a @ S``: a ``[M, P]`` → ``[M, E, F]``."""
    return _dds(a, data, *_args(topo, data, backend))


def dds_t(g: Tensor, data: Tensor, topo: Topology, backend: str | None = None) -> Tensor:
    """``c = g @ Sᵀ``: g ``[M, E, F]`` → ``[M, P]``."""
    return _dds_t(g, data, *_args(topo, data, backend))
