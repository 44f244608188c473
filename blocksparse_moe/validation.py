"""The validation toolkit every public entry point uses (routing, functional, layers, router, parallel, ops).

Each check raises with a message naming the argument, what was expected and what was received: ``TypeError`` for a
wrong type or dtype, ``ValueError`` for a wrong value, shape or device. Checks of *data* (expert ids) read the
tensor, so callers gate them with ``config.check_enabled`` (a host sync on GPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .config import FLOAT_DTYPES, INDEX_DTYPES

__all__ = [
    "MAX_INDEX",
    "is_int",
    "positive_int",
    "non_negative_int",
    "boolean",
    "choice",
    "non_negative_number",
    "check_tensor",
    "check_float",
    "check_dtype",
    "check_sizes",
    "check_same_device",
    "check_expert_ids",
    "check_no_grad",
]

MAX_INDEX = 2**31 - 1  # sizes that int32 indices can address


def is_int(value: object) -> bool:
    """A Python int (or a symbolic int under ``torch.compile(dynamic=True)``), not a bool."""
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def positive_int(name: str, value: object) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def non_negative_int(name: str, value: object) -> int:
    if not is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def boolean(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}")
    return value


def choice(name: str, value: object, choices: Sequence[object]) -> object:
    """``value`` is one of ``choices`` (compared with ``==``; a bool never matches an int choice)."""
    if isinstance(value, bool) or not any(type(value) is type(c) and value == c for c in choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def non_negative_number(name: str, value: object) -> float:
    """A finite real number ``>= 0``, symbolic ones under ``torch.compile(dynamic=True)`` included (one chained
    comparison, which NaN and inf fail and which dynamo traces; ``math.isfinite`` breaks its graph)."""
    numeric = isinstance(value, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(value, bool)
    if not numeric or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    return value


def check_tensor(name: str, t: object, dims: str, expected: tuple[int | None, ...]) -> torch.Tensor:
    """Type and shape; ``expected`` holds each dimension's size, ``None`` where any size is accepted; ``dims``
    names the dimensions for the message (e.g. ``"[T, k]"``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(expected) or any(e is not None and s != e for s, e in zip(t.shape, expected)):
        want = ", ".join("*" if e is None else str(e) for e in expected)
        raise ValueError(f"{name} must have shape {dims} = ({want}), got {tuple(t.shape)}")
    return t


def check_dtype(name: str, t: torch.Tensor, dtypes: Sequence[torch.dtype]) -> None:
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have a dtype among {tuple(dtypes)}, got {t.dtype}")


def check_float(name: str, t: torch.Tensor) -> None:
    check_dtype(name, t, FLOAT_DTYPES)


def check_sizes(**sizes: int) -> None:
    """Each named size is addressable with int32 indices."""
    for name, size in sizes.items():
        if size > MAX_INDEX:
            raise ValueError(f"{name} must be at most {MAX_INDEX} (int32 indices), got {size}")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device | None:
    """All non-None tensors on one device; returns it (None when no tensor is given)."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"expected all tensors on one device, got {listing}")
    return next(iter(devices.values()), None)


def check_expert_ids(top_k_index: torch.Tensor, num_experts: int, name: str = "top_k_index") -> None:
    """Raise ``ValueError`` if ``top_k_index`` holds an id outside ``[0, num_experts)``. Reads the data (one host
    sync on GPU): gate it with ``config.check_enabled``."""
    check_dtype(name, top_k_index, INDEX_DTYPES)
    bad = (top_k_index < 0) | (top_k_index >= num_experts)
    if bool(bad.any()):
        raise ValueError(
            f"{name} must hold expert ids in [0, {num_experts}), got {int(bad.sum())} outside that range, "
            f"e.g. {top_k_index[bad][:5].tolist()}"
        )


def check_no_grad(reason: str, **tensors: torch.Tensor | None) -> None:
    """A ``ValueError`` if autograd would record a graph through these tensors (grad mode on and one of them
    requiring grad), for a computation with no backward; ``reason`` says which."""
    if not torch.is_grad_enabled():
        return
    needing = [name for name, t in tensors.items() if t is not None and t.requires_grad]
    if needing:
        raise ValueError(
            f"{reason} has no backward: {', '.join(needing)} must not require grad (run under torch.no_grad() or "
            f"torch.inference_mode(), or detach them), got requires_grad=True"
        )
