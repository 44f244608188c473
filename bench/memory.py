"""Bytes autograd keeps for backward, measured on the real graph (CPU or GPU) with ``saved_tensors_hooks``.

While ``fn()`` runs, every tensor an autograd node saves passes through the pack hook of
``torch.autograd.graph.saved_tensors_hooks``: what built-in ops keep (inputs, outputs, indices) and what custom
``autograd.Function`` s and ``torch.library`` ops save with ``ctx.save_for_backward``. Each tensor is charged by the
**storage** behind it, and each storage once (views of one buffer share it; what stays alive is the whole
storage). Storages of the tensors passed as ``parameters`` are **not** counted as activations but reported
separately (``parameter_bytes``): they exist whether or not a backward is pending. Inputs of ``fn`` that are not
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


def saved_for_backward(fn: Callable[[], Any], parameters: Iterable[torch.Tensor] = ()) -> tuple[Any, SavedBytes]:
    """Run ``fn()`` and measure what autograd saved for its backward; returns ``(fn's result, SavedBytes)``.

    ``parameters``: tensors whose storages are reported in ``parameter_bytes`` instead of ``activation_bytes``
    (model weights; casts of them, e.g. autocast's bf16 copies, are new storages and count as activations).
    The saved tensors stay reachable from the result's graph exactly as without the hooks.
    """
    param_keys = {_key(p) for p in parameters}
    seen: dict[tuple[str, int, int], torch.Tensor] = {}  # holding each storage keeps its address unique

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.setdefault(_key(t), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    activation = parameter = storages = 0
    by_dtype: dict[str, int] = {}
    for key, t in seen.items():
        nbytes = key[2]
        if key in param_keys:
            parameter += nbytes
            continue
        activation += nbytes
        storages += 1
        name = str(t.dtype).removeprefix("torch.")
        by_dtype[name] = by_dtype.get(name, 0) + nbytes
    return result, SavedBytes(activation, parameter, storages, by_dtype)
