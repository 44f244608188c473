"""The expert activations, in one place: names, PyTorch functions and their backward, and the Triton code the fused
kernels apply in their epilogues.

Every named activation has

- a PyTorch function (``ACTIVATIONS[name]``), what the reference and the PyTorch backends run;
- its backward in PyTorch (``act_backward``: ``grad · act'(h)`` in one pass, PyTorch's own fused op), what the
  PyTorch backend of the fused backward runs;
- a kernel code (``kernel_code(name)``) selecting the same function and derivative in the Triton helpers
  ``activate`` / ``activate_and_grad`` below, which the fused expert-GEMM kernels inline.

``"identity"`` is the bilinear expert (``x @ w1`` times the gate, no nonlinearity). ``tests/test_activations.py``
checks that every name agrees across the three implementations (values and derivatives).

Adding an activation means adding it to ``_SPECS``, and a branch to each of the two Triton helpers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = ["Activation", "ACTIVATIONS", "NAMES", "get_activation", "kernel_code", "act_backward", "check_name"]

Activation = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _Spec:
    code: int  # the constexpr the Triton helpers switch on
    fn: Activation
    backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (grad, h) -> grad · fn'(h), into grad


_aten = torch.ops.aten
_SPECS: dict[str, _Spec] = {
    "identity": _Spec(0, lambda h: h, lambda grad, h: grad),
    "gelu": _Spec(1, F.gelu, lambda grad, h: _aten.gelu_backward.grad_input(grad, h, grad_input=grad)),
    "gelu_tanh": _Spec(
        2,
        partial(F.gelu, approximate="tanh"),
        lambda grad, h: _aten.gelu_backward.grad_input(grad, h, approximate="tanh", grad_input=grad),
    ),
    "relu": _Spec(3, F.relu, lambda grad, h: _aten.threshold_backward.grad_input(grad, h, 0, grad_input=grad)),
    "silu": _Spec(4, F.silu, lambda grad, h: _aten.silu_backward.grad_input(grad, h, grad_input=grad)),
}

NAMES: tuple[str, ...] = tuple(_SPECS)
ACTIVATIONS: dict[str, Activation] = {name: spec.fn for name, spec in _SPECS.items()}


def check_name(name: object) -> str:
    """``name`` when it names an activation, else ``ValueError`` listing the names."""
    if not isinstance(name, str) or name not in _SPECS:
        raise ValueError(f"activation must be one of {list(NAMES)}, got {name!r}")
    return name


def get_activation(activation: str | Activation) -> Activation:
    """The PyTorch function of a named activation, or ``activation`` itself when it is callable."""
    if callable(activation):
        return activation
    if not isinstance(activation, str) or activation not in _SPECS:
        raise ValueError(f"activation must be one of {list(NAMES)} or a callable, got {activation!r}")
    return _SPECS[activation].fn


def kernel_code(name: str) -> int:
    """The ``ACT`` constexpr of the Triton helpers for a named activation."""
    return _SPECS[check_name(name)].code


def act_backward(grad: torch.Tensor, h: torch.Tensor, name: str) -> torch.Tensor:
    """``grad · act'(h)`` of a named activation in one pass over the elements (PyTorch's own backward of the
    activation, e.g. ``aten.silu_backward``), written into ``grad`` (a buffer the caller owns) and returned. ``h``
    has ``grad``'s shape and dtype (the caller's accumulation dtype: fp32, or float64)."""
    return _SPECS[check_name(name)].backward(grad, h)


# ----------------------------------------------------------------------------------------------- Triton


@triton.jit
def activate(h, ACT: tl.constexpr):
    """``act(h)`` of fp32 ``h`` for the kernel code ``ACT`` (``kernel_code``)."""
    if ACT == 1:
        h = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 2:  # 0.5·h·(1 + tanh(u)) = h·σ(2u), u = √(2/π)·(h + 0.044715·h³)
        h = h * tl.sigmoid(1.5957691216057308 * (h + 0.044715 * h * h * h))
    elif ACT == 3:
        h = tl.maximum(h, 0.0)
    elif ACT == 4:
        h = h * tl.sigmoid(h)
    return h


@triton.jit
def activate_and_grad(h, ACT: tl.constexpr):
    """``(act(h), act'(h))`` of fp32 ``h`` for the kernel code ``ACT``."""
    if ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        a = h * cdf
        da = cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327
    elif ACT == 2:
        s = tl.sigmoid(1.5957691216057308 * (h + 0.044715 * h * h * h))  # (1 + tanh(u)) / 2
        a = h * s
        t = 2.0 * s - 1.0
        da = s + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * h * h)
    elif ACT == 3:
        a = tl.maximum(h, 0.0)
        da = tl.where(h > 0.0, 1.0, 0.0)
    elif ACT == 4:
        s = tl.sigmoid(h)
        a = h * s
        da = s * (1.0 + h * (1.0 - s))
    else:
        a = h
        da = tl.full(h.shape, 1.0, tl.float32)
    return a, da
