"""Expert parallelism over ``torch.distributed``: each rank holds ``E / W`` experts, tokens travel to the ranks
of their experts and back through two ``all_to_all_single`` exchanges with uneven splits (dropless).

Data flow on one rank (``W`` ranks in the group, ``E_l = E / W`` local experts; rank ``s`` owns the global
experts ``[s·E_l, (s+1)·E_l)``, T tokens, k choices per token, A = T·k assignments):

1. route: ``plan_routing`` sorts the assignments by expert id, which also groups them by owner rank, and the
   token rows are gathered into that order (``gather_rows``, ``[A, d]``).
2. counts: ``tokens_per_expert`` viewed ``[W, E_l]`` is exchanged (``all_to_all_single``, async, overlapping
   the gather of step 1); afterwards ``recv_counts[s, e]`` = rows rank ``s`` sends to local expert ``e``. The
   payload exchange needs its split sizes as host ints, so reading the counts is **the one host
   synchronization** of the layer (a device-to-host copy of ``2·W`` ints).
3. dispatch: ``all_to_all_single`` of the sorted rows → ``tokens [R, d]`` ordered by (source rank, local
   expert). Their local expert ids follow from ``recv_counts``, so no ids are sent.
4. compute: ``moe_mlp`` on the received rows with the local weight shards, one choice per row, weight 1.
5. return: ``all_to_all_single`` back → the results in the sorted order of step 1.
6. combine: ``out[t] = Σ_j top_k_weights[t, j] · y[assignment_row[t, j]]`` (``scatter_rows``).

Expert ids outside ``[0, E)`` raise ``ValueError`` on CPU (on CUDA with ``BSM_CHECK=1``, as in ``plan_routing``);
unchecked, they are not sent and contribute zero.

Both exchanges are differentiable (the backward of an all-to-all is the reverse all-to-all), so gradients reach
``x``, ``top_k_weights`` and the local weight shards. Every function here is a collective: all ranks of the
group call it, in the same order, even a rank with no tokens; ``requires_grad`` must agree across ranks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..functional import moe_mlp
from ..ops.permute import gather_rows, scatter_rows
from ..reference import Activation
from ..routing import plan_routing

__all__ = [
    "ExpertParallelDispatch",
    "ep_dispatch",
    "ep_local_experts",
    "ep_combine",
    "expert_parallel_moe_mlp",
    "shard_experts",
    "gather_experts",
]

EXPERT_KEYS = ("w1", "w2", "w3")  # dMoE's expert-indexed parameters (dim 0 = expert)


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallelism needs torch.distributed initialized (init_process_group)")
    return dist.get_world_size(group), dist.get_rank(group)


def _all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` along dim 0 with uneven splits; the gradient takes the reverse route."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits = (output_splits, input_splits)
        ctx.group = group
        return _all_to_all(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return (
            _all_to_all(grad, input_splits, output_splits, ctx.group),
            None,  # output_splits
            None,  # input_splits
            None,  # group
        )


@dataclass(frozen=True)
class ExpertParallelDispatch:
    """What ``ep_dispatch`` received, and what ``ep_combine`` needs to send the results back."""

    tokens: torch.Tensor  # [R, d] rows for this rank's experts, ordered by (source rank, local expert)
    local_expert: torch.Tensor  # [R] int64 local expert id of each row, in [0, E_l)
    recv_counts: torch.Tensor  # [W, E_l] int32 rows received from rank s for local expert e
    row_assignment: torch.Tensor  # [A] int32 row of the sorted send order -> assignment, -1 if invalid
    assignment_row: torch.Tensor  # [T, k] int32 assignment -> row of the sorted send order, -1 if invalid
    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank
    group: dist.ProcessGroup | None


def ep_dispatch(
    x: torch.Tensor, top_k_index: torch.Tensor, *, group: dist.ProcessGroup | None, num_experts: int
) -> ExpertParallelDispatch:
    """Send each token row to the ranks owning its chosen experts (steps 1-3 of the module docstring).

    Collective. One host synchronization: reading the exchanged per-rank row counts.
    """
    world, _ = _world(group)
    _check_routing(x, top_k_index, num_experts, world)
    local = num_experts // world
    plan = plan_routing(top_k_index, num_experts, block_size=1)  # sorted by expert = grouped by owner rank
    send_counts = plan.tokens_per_expert
    recv_counts = torch.empty_like(send_counts)
    work = dist.all_to_all_single(recv_counts, send_counts, group=group, async_op=True)
    x_sorted = gather_rows(x, plan.row_assignment, plan.assignment_row)  # runs while the counts travel
    work.wait()
    recv_counts = recv_counts.view(world, local)
    per_rank = torch.stack([send_counts.view(world, local).sum(1), recv_counts.sum(1)])
    send_splits, recv_splits = per_rank.tolist()  # the one host sync: split sizes must be host ints
    sent = sum(send_splits)  # invalid assignments (unchecked on GPU) are sorted last and not sent
    tokens = _AllToAll.apply(x_sorted[:sent], recv_splits, send_splits, group)
    expert_ids = torch.arange(local, device=x.device).repeat(world)
    local_expert = torch.repeat_interleave(expert_ids, recv_counts.flatten(), output_size=tokens.shape[0])
    return ExpertParallelDispatch(
        tokens=tokens,
        local_expert=local_expert,
        recv_counts=recv_counts,
        row_assignment=plan.row_assignment,
        assignment_row=plan.assignment_row,
        send_splits=send_splits,
        recv_splits=recv_splits,
        group=group,
    )


def ep_local_experts(
    dispatch: ExpertParallelDispatch,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None = None,
    *,
    activation: str | Activation = "gelu",
    impl: str = "auto",
    block_size: int | None = None,
) -> torch.Tensor:
    """The local experts on the dispatched rows (step 4): ``moe_mlp`` with one choice of weight 1 per row.
    Local, no communication; returns ``[R, d]``."""
    rows = dispatch.tokens.shape[0]
    ones = dispatch.tokens.new_ones(rows, 1)
    local_expert = dispatch.local_expert.view(rows, 1)
    return moe_mlp(
        dispatch.tokens, local_expert, ones, w1, w2, w3, activation=activation, impl=impl, block_size=block_size
    )


def ep_combine(y: torch.Tensor, top_k_weights: torch.Tensor, dispatch: ExpertParallelDispatch) -> torch.Tensor:
    """Return the expert outputs ``y [R, d]`` (rows of ``dispatch.tokens``) to their source ranks and sum each
    token's choices weighted by ``top_k_weights [T, k]`` (steps 5-6). Collective; returns ``[T, d]``."""
    if y.dim() != 2 or y.shape[0] != dispatch.tokens.shape[0]:
        raise ValueError(
            f"y must be [{dispatch.tokens.shape[0]}, d] (one row per dispatched row), got {tuple(y.shape)}"
        )
    if top_k_weights.shape != dispatch.assignment_row.shape:
        raise ValueError(
            f"top_k_weights must have shape {tuple(dispatch.assignment_row.shape)}, got {tuple(top_k_weights.shape)}"
        )
    back = _AllToAll.apply(y, dispatch.send_splits, dispatch.recv_splits, dispatch.group)
    unsent = dispatch.row_assignment.shape[0] - back.shape[0]  # invalid assignments (unchecked on GPU), sorted last
    if unsent:
        back = torch.cat([back, back.new_zeros(unsent, back.shape[1])])
    return scatter_rows(back, dispatch.row_assignment, dispatch.assignment_row, top_k_weights.to(back.dtype))


def expert_parallel_moe_mlp(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None = None,
    *,
    group: dist.ProcessGroup | None,
    num_experts: int,
    activation: str | Activation = "gelu",
    impl: str = "auto",
    block_size: int | None = None,
) -> torch.Tensor:
    """``moe_mlp`` with the experts spread over the ranks of ``group`` (``None``: the default group).

    Args:
        x: ``[T, d]`` this rank's tokens (``T`` may differ between ranks, and be 0).
        top_k_index: ``[T, k]`` global expert ids in ``[0, num_experts)``.
        top_k_weights: ``[T, k]`` combine weights.
        w1, w2, w3: this rank's shards ``[E_l, d, f]``, ``[E_l, f, d]``, ``[E_l, d, f]`` (GLU, optional),
            ``E_l = num_experts / W``; rank ``r`` holds the global experts ``[r·E_l, (r+1)·E_l)``.
        group: the expert-parallel process group.
        num_experts: E, over all ranks; divisible by the group size.
        activation, impl, block_size: passed to ``moe_mlp`` for the local experts.

    Returns ``[T, d]``, equal to ``moe_mlp`` with all experts on one device; differentiable in ``x``,
    ``top_k_weights`` and the shards. Collective (all ranks call it); one host sync to read the row counts.
    """
    world, _ = _world(group)
    _check_routing(x, top_k_index, num_experts, world)
    _check_shards(x, top_k_index, top_k_weights, w1, w2, w3, num_experts // world)
    sent = ep_dispatch(x, top_k_index, group=group, num_experts=num_experts)
    y = ep_local_experts(sent, w1, w2, w3, activation=activation, impl=impl, block_size=block_size)
    return ep_combine(y, top_k_weights, sent)


def _check_routing(x: torch.Tensor, top_k_index: torch.Tensor, num_experts: int, world: int) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(top_k_index, torch.Tensor):
        raise TypeError(
            f"x and top_k_index must be torch.Tensors, got {type(x).__name__} and {type(top_k_index).__name__}"
        )
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [tokens, d], got shape {tuple(x.shape)}")
    if top_k_index.dim() != 2 or top_k_index.shape[0] != x.shape[0]:
        raise ValueError(f"top_k_index must be [{x.shape[0]}, k], got shape {tuple(top_k_index.shape)}")
    if top_k_index.device != x.device:
        raise ValueError(f"top_k_index must be on {x.device} like x, got {top_k_index.device}")
    if not isinstance(num_experts, int) or num_experts < 1 or num_experts % world:
        raise ValueError(
            f"num_experts must be a positive int divisible by the expert-parallel group size {world}, "
            f"got {num_experts!r}"
        )


def _check_shards(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None,
    local: int,
) -> None:
    d = x.shape[1]
    if not isinstance(top_k_weights, torch.Tensor) or not top_k_weights.is_floating_point():
        raise TypeError(f"top_k_weights must be a floating-point tensor, got {getattr(top_k_weights, 'dtype', None)}")
    if top_k_weights.device != x.device:
        raise ValueError(f"top_k_weights must be on {x.device} like x, got {top_k_weights.device}")
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(f"top_k_weights must have shape {tuple(top_k_index.shape)}, got {tuple(top_k_weights.shape)}")
    for name, w in (("w1", w1), ("w2", w2), ("w3", w3)):
        if w is None and name == "w3":
            continue
        if not isinstance(w, torch.Tensor) or w.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor [E_l, ., .], got {getattr(w, 'shape', type(w).__name__)}")
        if w.dtype != x.dtype or w.device != x.device:
            raise TypeError(f"{name} must be {x.dtype} on {x.device} like x, got {w.dtype} on {w.device}")
    f = w1.shape[2]
    expected = {"w1": (local, d, f), "w2": (local, f, d), "w3": (local, d, f)}
    for name, w in (("w1", w1), ("w2", w2), ("w3", w3)):
        if w is not None and tuple(w.shape) != expected[name]:
            raise ValueError(
                f"{name} must be this rank's shard {expected[name]} (num_experts / group size = {local} experts), "
                f"got {tuple(w.shape)}"
            )


def _state(state_dict_or_module: Mapping[str, torch.Tensor] | nn.Module) -> Mapping[str, torch.Tensor]:
    if isinstance(state_dict_or_module, nn.Module):
        return state_dict_or_module.state_dict()
    if isinstance(state_dict_or_module, Mapping):
        return state_dict_or_module
    raise TypeError(f"expected a state dict or an nn.Module, got {type(state_dict_or_module).__name__}")


def _is_expert(name: str, expert_keys: Sequence[str]) -> bool:
    return name.rsplit(".", 1)[-1] in expert_keys


def shard_experts(
    state_dict_or_module: Mapping[str, torch.Tensor] | nn.Module,
    group: dist.ProcessGroup | None = None,
    *,
    expert_keys: Sequence[str] = EXPERT_KEYS,
) -> dict[str, torch.Tensor]:
    """This rank's slice of a full (single-device) state dict: entries named ``expert_keys`` (last name
    component, dim 0 = expert) keep experts ``[r·E_l, (r+1)·E_l)`` as copies; everything else (router) is
    replicated as is. Local, no communication; load the result into the expert-parallel module."""
    world, rank = _world(group)
    shard = {}
    for name, t in _state(state_dict_or_module).items():
        if _is_expert(name, expert_keys):
            if t.dim() == 0 or t.shape[0] % world:
                raise ValueError(
                    f"{name}: expert dimension (dim 0) must be divisible by the group size {world}, "
                    f"got shape {tuple(t.shape)}"
                )
            local = t.shape[0] // world
            t = t.detach()[rank * local : (rank + 1) * local].clone()
        shard[name] = t
    return shard


def gather_experts(
    state_dict_or_module: Mapping[str, torch.Tensor] | nn.Module,
    group: dist.ProcessGroup | None = None,
    *,
    expert_keys: Sequence[str] = EXPERT_KEYS,
) -> dict[str, torch.Tensor]:
    """The full state dict from each rank's shard (inverse of ``shard_experts``), on every rank.

    Collective: one ``all_gather`` per expert entry, in the dict's order, which must match across ranks."""
    world, _ = _world(group)
    full = {}
    for name, t in _state(state_dict_or_module).items():
        if _is_expert(name, expert_keys):
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.detach().contiguous(), group=group)
            t = torch.cat(parts)
        full[name] = t
    return full
