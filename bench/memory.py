"""Bytes autograd keeps for backward, measured on the real graph (CPU or GPU) with ``saved_tensors_hooks``.

While ``fn()`` runs, every tensor an autograd node saves passes through the pack hook of
``torch.autograd.graph.saved_tensors_hooks``: what built-in ops keep (inputs, outputs, indices) and what custom
``autograd.Function`` s and ``torch.library`` ops save with ``ctx.save_for_backward``. Each tensor is charged by the
**storage** behind it, and each storage once (views of one buffer share it; what stays alive is the whole
storage). Storages of the tensors passed as ``parameters``, and of tensors made from one parameter alone by a
chain of single-input ops (autocast's bf16 copy of a weight, its transpose), are **not** counted as activations
but reported separately (``parameter_bytes``): they do not grow with the tokens. Inputs of ``fn`` that are not
listed (e.g. the layer input ``x``) count, as they would in the target ``2·(d + 2·k·f)`` bytes per token.

Not seen by the hooks (so not counted): tensors a custom Function stashes on ``ctx`` as attributes, and what a
non-reentrant ``torch.utils.checkpoint`` region keeps for its recomputation (it installs its own hooks inside
the region, which take precedence). Everything saved while ``fn`` runs is counted, also by a sub-graph whose
output ``fn`` drops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["SavedBytes", "saved_for_backward"]


@dataclass(frozen=True)
class SavedBytes:
    """What autograd saved for backward during one call."""

    activation_bytes: int  # distinct storages saved, parameters excluded
    parameter_bytes: int  # distinct parameter storages saved (exist anyway; not in activation_bytes)
    storages: int  # number of distinct non-parameter storages
    by_dtype: dict[str, int] = field(default_factory=dict)  # activation_bytes split by storage dtype

    def per_token(self, tokens: int) -> float | None:
        """``activation_bytes / tokens`` (None for no tokens)."""
        return self.activation_bytes / tokens if tokens > 0 else None


def _key(t: torch.Tensor) -> tuple[str, int, int]:
    storage = t.untyped_storage()
    return (str(t.device), storage.data_ptr(), storage.nbytes())


_MAX_CHAIN = 8  # single-input autograd nodes followed back to a parameter (cast, transpose, view, ...)


def _from_parameter(t: torch.Tensor, param_keys: set[tuple[str, int, int]]) -> bool:
    """Whether ``t`` is a parameter, or was made from exactly one parameter by single-input ops."""
    if _key(t) in param_keys:
        return True
    node = t.grad_fn
    for _ in range(_MAX_CHAIN):
        if node is None:
            return False
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None:
            return _key(variable) in param_keys
        inputs = [n for n, _ in node.next_functions if n is not None]
        if len(inputs) != 1:
            return False
        node = inputs[0]
    return False


def saved_for_backward(fn: Callable[[], Any], parameters: Iterable[torch.Tensor] = ()) -> tuple[Any, SavedBytes]:
    """Run ``fn()`` and measure what autograd saved for its backward; returns ``(fn's result, SavedBytes)``.

    ``parameters``: the weights; their storages, and those of single-input copies of them (casts, views), are
    reported in ``parameter_bytes`` instead of ``activation_bytes``. The saved tensors stay reachable from the
    result's graph exactly as without the hooks.
    """
    param_keys = {_key(p) for p in parameters}
    seen: dict[tuple[str, int, int], tuple[torch.Tensor, bool]] = {}  # holding each storage keeps its address

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _key(t)
        if key not in seen:
            seen[key] = (t, _from_parameter(t, param_keys))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    activation = parameter = storages = 0
    by_dtype: dict[str, int] = {}
    for key, (t, is_parameter) in seen.items():
        nbytes = key[2]
        if is_parameter:
            parameter += nbytes
            continue
        activation += nbytes
        storages += 1
        name = str(t.dtype).removeprefix("torch.")
        by_dtype[name] = by_dtype.get(name, 0) + nbytes
    return result, SavedBytes(activation, parameter, storages, by_dtype)
