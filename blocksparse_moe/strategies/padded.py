"""The padded strategy (GShard / NLLB capacity baseline, drops): ``[E, G·C, d]`` capacity buffers and ``torch.bmm``.

Tokens form ``G`` equal contiguous groups; each expert has ``C`` slots per group (``padded_capacity``). Within a
group, assignments claim their expert's slots rank-major, then in token order (every first choice of a group before
any second choice: ``padded_slots``), or, with a ``priority`` (``drop_policy="probs"``: the combine weights), the
highest priority first; an assignment over capacity contributes zero. ``parallel`` applies the same
capacity and drop order per rank before sending.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from ..activations import Activation
from ..validation import non_negative_int, non_negative_number, positive_int
from . import fp8 as fp8_gemms
from .common import activate_then

__all__ = ["padded", "padded_capacity", "padded_slots"]


def padded_capacity(
    num_tokens: int,
    top_k: int,
    num_experts: int,
    *,
    capacity_factor: float | None = None,
    capacity: int | None = None,
    num_groups: int = 1,
) -> int:
    """Slots per expert per group: ``capacity``, else ``ceil(capacity_factor · (T / G) · k / E)``
    (``capacity_factor`` default 1.0); ``num_groups`` must divide ``num_tokens``."""
    positive_int("num_groups", num_groups)
    if capacity is not None and capacity_factor is not None:
        raise ValueError(f"give capacity or capacity_factor, not both; got {capacity=}, {capacity_factor=}")
    if num_tokens % num_groups:
        raise ValueError(f"num_groups must divide the number of tokens, got T={num_tokens} and {num_groups=}")
    if capacity is not None:
        return non_negative_int("capacity", capacity)
    factor = 1.0 if capacity_factor is None else non_negative_number("capacity_factor", capacity_factor)
    return math.ceil(factor * (num_tokens // num_groups) * top_k / num_experts)


def padded_slots(
    top_k_index: torch.Tensor,
    num_experts: int,
    capacity: int,
    num_groups: int = 1,
    priority: torch.Tensor | None = None,
) -> torch.Tensor:
    """Slot of each assignment in the ``[G, E, C]`` capacity buffers (flattened), ``G·E·C`` when dropped.

    Within each of the ``G`` contiguous token groups, assignments claim their expert's ``C`` slots rank-major,
    then in token order; with ``priority [T, k]`` (``drop_policy="probs"``: the combine weights) the highest
    priority first, ties in that order (a stable sort). An id outside ``[0, E)`` claims no slot (``G·E·C``, as if
    dropped). Vectorised (cumsum over a one-hot), no host sync. Returns ``[T, k]`` int64.
    """
    T, k = top_k_index.shape
    G, E, C = num_groups, num_experts, capacity
    S = T // G
    e = top_k_index.long().view(G, S, k).transpose(1, 2).reshape(G, k * S)  # rank-major order per group
    order = None
    if priority is not None:  # claim order: by descending priority within each group
        p = priority.detach().view(G, S, k).transpose(1, 2).reshape(G, k * S)
        order = p.argsort(dim=1, descending=True, stable=True)
        e = e.gather(1, order)
    valid = (e >= 0) & (e < E)
    onehot = (e.unsqueeze(-1) == torch.arange(E, device=e.device)).long()  # [G, k·S, E]; invalid ids: all zero
    position = (onehot.cumsum(1) * onehot).sum(2) - 1  # place in its expert's queue (-1 for an invalid id)
    group = torch.arange(G, device=e.device).view(G, 1)
    slot = torch.where(valid & (position < C), (group * E + e) * C + position, G * E * C)
    if order is not None:  # back to rank-major order
        slot = torch.empty_like(slot).scatter_(1, order, slot)
    return slot.view(G, k, S).transpose(1, 2).reshape(T, k)


def padded(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None,
    *,
    activation: Activation,
    capacity: int,
    num_groups: int,
    recompute: bool,
    drop_policy: str = "position",
    fp8: str | None = None,
    fp8_cache_x: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts on ``capacity`` slots per expert per group; returns ``(out [T, d] in x.dtype, dropped [] int64)``
    (valid assignments over capacity; which ones: ``drop_policy``, see ``MoEOptions``). The combine runs in
    ``weights``' dtype (fp32 at least), autocast or not. With an ``fp8`` recipe the three bmm run its FP8 GEMMs,
    emulated (``strategies.fp8.bmm``), the up-projections keeping the E4M3 copy of the capacity buffers for backward
    (``fp8_cache_x``; a new tensor, which nothing else keeps: False keeps the buffers themselves)."""
    T, d = x.shape
    E = w1.shape[0]
    n = num_groups * E * capacity
    priority = weights if drop_policy == "probs" else None
    slot = padded_slots(top_k_index, E, capacity, num_groups, priority)  # [T, k], n = dropped or invalid
    token = torch.arange(slot.numel(), device=x.device) // slot.shape[1]
    # slot -> token (T = empty slot); dropped assignments all land in the discarded entry n
    source = torch.full((n + 1,), T, dtype=torch.int64, device=x.device).scatter_(0, slot.reshape(-1), token)[:n]
    buffers = torch.cat([x, x.new_zeros(1, d)]).index_select(0, source)
    buffers = buffers.view(num_groups, E, capacity, d).transpose(0, 1).reshape(E, num_groups * capacity, d)
    bmm = torch.bmm if fp8 is None else partial(fp8_gemms.bmm, fp8=fp8)
    # with fp8_cache_x, one E4M3 copy of the buffers for both up-projections, kept for backward instead of them
    up = bmm if fp8 is None or not fp8_cache_x else partial(bmm, a_fp8=fp8_gemms.quantize_operand(buffers, fp8))
    h = up(buffers, w1)
    g = None if w3 is None else up(buffers, w3)
    y = activate_then(lambda a: bmm(a, w2), activation, h, g, recompute)  # [E, G·C, d]
    y = y.view(E, num_groups, capacity, d).transpose(0, 1).reshape(n, d)
    gathered = torch.cat([y, y.new_zeros(1, d)]).index_select(0, slot.reshape(-1)).view(*slot.shape, d)
    # combine in the weights' dtype, elementwise: autocast would run a bmm in its 16-bit dtype
    out = (weights.unsqueeze(-1) * gathered.to(weights.dtype)).sum(1)
    valid = (top_k_index >= 0) & (top_k_index < E)
    return out.to(x.dtype), ((slot == n) & valid).sum()
