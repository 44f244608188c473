"""Expert parallelism over ``torch.distributed``: each rank holds ``E / W`` experts, tokens travel to the ranks
of their experts and back through two all-to-all exchanges with uneven splits.

``expert_parallel(layer, mesh)`` applies it to a ``dMoE`` / ``PaddedMoE`` (or their ``MoEExperts``) the way
torchtitan applies a parallel style: it shards the experts' weights in place (DTensors ``Shard(0)`` on a 1-D
``DeviceMesh``, or plain shards on a process group) and places a class before the experts' own whose forward is
dispatch → local experts → combine (as ``fully_shard`` does); the layer itself stays single-device and knows nothing
of ranks. ``expert_parallel_moe_mlp`` is the same for the functional ``moe_mlp``; ``ep_dispatch`` /
``ep_local_experts`` / ``ep_combine`` are its three stages. This module owns the exchanges and their validation.

Data flow on one rank (``W`` ranks in the group, ``E_l = E / W`` local experts; rank ``s`` owns the global
experts ``[s·E_l, (s+1)·E_l)``, T tokens, k choices per token, A = T·k assignments):

1. route: ``plan_routing`` sorts the assignments by expert id, which also groups them by owner rank, and the
   token rows are gathered into that order (``gather_rows``, ``[A, d]``).
2. counts: ``tokens_per_expert`` viewed ``[W, E_l]`` is exchanged (``all_to_all_single``, async, overlapping
   the gather of step 1); afterwards ``recv_counts[s, e]`` = rows rank ``s`` sends to local expert ``e``. The
   payload exchange needs its split sizes as host ints, so reading the counts is **the one host
   synchronization** of the layer (a device-to-host copy of ``2·W·E_l`` ints).
3. dispatch: all-to-all of the sorted rows → ``tokens [R, d]`` ordered by (source rank, local expert), a
   functional collective in flight until ``tokens`` is first used. Their local expert ids follow from
   ``recv_counts``, so no ids are sent.
4. compute: ``moe_mlp`` on the received rows with the local weight shards, one choice per row, weight 1.
5. return: all-to-all back → the results in the sorted order of step 1.
6. combine: ``out[t] = Σ_j top_k_weights[t, j] · y[assignment_row[t, j]]`` (``scatter_rows``), the weights in
   ``strategies.combine_dtype`` (fp32 for 16/32-bit tokens) as on one device, so outputs match it.

Sync-free mode (``capacity_per_rank = C``): steps 2-5 use buffers sized from shapes: each rank sends ``C`` rows to
every rank (its rows for that rank in sorted order, then zero rows) through functional collectives with equal
splits, the counts travel on the device and give the received rows' local expert ids (``E_l`` for an empty slot,
which ``moe_mlp`` skips), and each sorted row reads its result back from its slot. Nothing is read on the host;
rows past ``C`` for one destination are dropped (they contribute zero) and counted (``dropped``).

Overlap (``num_chunks = n``, ``ep_pipeline``): the tokens split into ``n`` contiguous chunks; steps 1-3 run for
every chunk first (one host synchronization for all of them), then chunk ``i``'s step 4 runs while the later
chunks' rows travel and the earlier chunks' results return (step 5), and step 6 comes last. A layer's shared expert
runs once every dispatch is in flight.

Capacity (``PaddedMoE``): each rank's own tokens get the layer's capacity (``capacity_factor`` over the rank's T,
or ``capacity``), as GShard's per-device groups; the overflow is dropped on the source rank before step 3 (it is
never sent), and the receiving rank runs its rows through capacity buffers large enough for all of them.

Expert ids outside ``[0, E)`` raise ``ValueError`` on CPU (on CUDA with ``BSM_CHECK=1``, as in ``moe_mlp``);
unchecked, they are not sent and contribute zero.

Both exchanges are differentiable (the backward of an all-to-all is the reverse all-to-all), so gradients reach
``x``, ``top_k_weights`` and the local weight shards. Every function here is a collective: all ranks of the
group call it, in the same order, even a rank with no tokens; ``requires_grad`` must agree across ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ..activations import Activation
from ..config import check_enabled
from ..functional import moe_mlp
from ..layers.moe import MoEExperts
from ..ops.permute import gather_rows, scatter_rows
from ..options import MoEOptions, options_from
from ..routing import plan_routing
from ..strategies import combine_dtype, padded_capacity, padded_slots
from ..validation import check_expert_ids, non_negative_int, positive_int

__all__ = [
    "expert_parallel",
    "ExpertParallelDispatch",
    "ep_dispatch",
    "ep_dispatch_chunks",
    "ep_local_experts",
    "ep_combine",
    "ep_pipeline",
    "chunk_bounds",
    "expert_parallel_moe_mlp",
    "shard_experts",
    "gather_experts",
]

EXPERT_KEYS = ("w1", "w2", "w3")  # MoEExperts' expert-indexed parameters (dim 0 = expert)


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallelism needs torch.distributed initialized (init_process_group)")
    return dist.get_world_size(group), dist.get_rank(group)


def _funcol_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    return dist.group.WORLD if group is None else group


# ----------------------------------------------------------------------------------------------- the module style


@dataclass(eq=False)
class _ExpertParallelState:
    """What ``expert_parallel`` attaches to the experts module."""

    group: dist.ProcessGroup | None  # the exchange's process group
    num_experts: int  # E over all ranks
    capacity_per_rank: int | None  # None: exact exchange (one host sync); C: bounded, sync-free
    num_chunks: int  # token chunks pipelined through dispatch -> experts -> combine
    shared_expert: nn.Module | None  # the layer's shared expert: run while the dispatch is in flight
    dropped: torch.Tensor | None = None  # [] assignments of this rank dropped over capacity_per_rank, last forward


def expert_parallel(
    module: nn.Module,
    mesh: DeviceMesh | dist.ProcessGroup | None = None,
    *,
    capacity_per_rank: int | None = None,
    num_chunks: int = 1,
) -> nn.Module:
    """Spread the experts of ``module`` (a ``dMoE``, a ``PaddedMoE``, or their ``MoEExperts``) over ``mesh``: a 1-D
    ``DeviceMesh``, a process group, or ``None`` (the default group); returns ``module``, changed in place.
    Collective-free itself.

    Rank ``r`` of the mesh (or group) owns experts ``[r·E_l, (r+1)·E_l)`` (``E_l = E / W``; ``E`` must be
    divisible by ``W``, else ``ValueError``) and every forward of the experts becomes dispatch → local experts →
    combine (a collective: every rank must call forward, even with no tokens). The weights ``w1``, ``w2``, ``w3``
    become new parameters (build the optimizer afterwards):

    - on a ``DeviceMesh``: DTensors ``Shard(0)`` over it, of the global shape ``[E, ., .]``, so that ``fully_shard``
      (FSDP2) composes on the other dimensions of the same mesh and ``torch.distributed.checkpoint`` saves and
      reshards them (``parallelize_moe`` does both);
    - on a process group: this rank's plain shards ``[E_l, ., .]`` (``shard_experts`` / ``gather_experts`` convert
      single-device checkpoints).

    ``capacity_per_rank``: ``None`` (default) exchanges exactly the rows routed, dropless, with one host
    synchronization per forward (the split sizes); an int ``C`` sizes every exchange buffer from shapes instead (each
    rank sends ``C`` rows to every rank): no host synchronization (CUDA graphs, ``torch.compile(fullgraph=True)``),
    equal to the default within the bound, and past it the rows over ``C`` for one destination rank are dropped
    (GShard's policy: they contribute zero) and counted in ``experts.dropped_assignments`` (a device tensor, this
    rank's drops in the last forward). ``C = T·k`` (this rank's assignments) can never drop.

    ``num_chunks``: split this rank's tokens into that many contiguous chunks and pipeline them: every chunk's
    dispatch is issued first, then chunk ``i``'s experts run while the rows of the later chunks travel and the
    results of the earlier ones return (asynchronous functional collectives; in the exact mode one host
    synchronization for all chunks). Results equal the unchunked layer's; with ``capacity_per_rank`` the bound
    applies to each chunk.

    The router and the shared expert stay replicated (their gradients sum over ranks as in data parallelism). Applied
    to a layer (not to its ``MoEExperts`` alone), the layer's shared expert runs while the dispatch is in flight (the
    layer's own call of it then returns that output). A layer
    built under ``torch.device("meta")`` can be made parallel first, then materialised with ``to_empty`` and loaded.
    """
    experts = module if isinstance(module, MoEExperts) else getattr(module, "experts", None)
    if not isinstance(experts, MoEExperts):
        raise TypeError(f"expert_parallel needs a dMoE, a PaddedMoE or their MoEExperts, got {type(module).__name__}")
    if getattr(experts, "_expert_parallel", None) is not None:
        raise ValueError("expert_parallel was already applied to this module")
    if experts.prequantized is not None:
        raise ValueError(
            f"expert_parallel shards expert parameters; these experts hold prequantized FP8 weights (recipe "
            f"{experts.prequantized!r}, quantize_fp8_), which it does not shard"
        )
    group, mesh = _group_of(mesh)
    if capacity_per_rank is not None:
        non_negative_int("capacity_per_rank", capacity_per_rank)
    positive_int("num_chunks", num_chunks)
    world, rank = _world(group)
    E = experts.num_experts
    if E % world:
        raise ValueError(f"num_experts must be divisible by the expert-parallel group size {world}, got {E}")
    local = E // world
    with torch.no_grad():
        for name in EXPERT_KEYS:
            p = getattr(experts, name)
            if p is not None:
                if mesh is None:
                    shard = p[rank * local : (rank + 1) * local].clone()
                else:  # each rank takes its own chunk of its own copy: no communication
                    shard = distribute_tensor(p, mesh, [Shard(0)], src_data_rank=None)
                setattr(experts, name, nn.Parameter(shard, requires_grad=p.requires_grad))
    shared = getattr(module, "shared_expert", None) if module is not experts else None
    experts._expert_parallel = _ExpertParallelState(
        group=group,
        num_experts=E,
        capacity_per_rank=capacity_per_rank,
        num_chunks=num_chunks,
        shared_expert=shared,
    )
    experts.__class__ = _subclass(type(experts), _ExpertParallelExperts, "ExpertParallel")
    if shared is not None:
        shared._ep_early = None
        shared.__class__ = _subclass(type(shared), _EarlySharedExpert, "Early")
    return module


def _group_of(mesh: DeviceMesh | dist.ProcessGroup | None) -> tuple[dist.ProcessGroup | None, DeviceMesh | None]:
    if isinstance(mesh, DeviceMesh):
        if mesh.ndim != 1:
            raise ValueError(
                f"expert_parallel needs a 1-D DeviceMesh (e.g. mesh['ep']), got {mesh.ndim} dimensions "
                f"{mesh.mesh_dim_names}"
            )
        return mesh.get_group(), mesh
    if mesh is None or isinstance(mesh, dist.ProcessGroup):
        return mesh, None
    raise TypeError(f"mesh must be a 1-D DeviceMesh, a ProcessGroup or None, got {type(mesh).__name__}")


def _local(w: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's expert shard of a weight (a DTensor's local tensor; differentiable)."""
    return w.to_local() if isinstance(w, DTensor) else w


class _ExpertParallelExperts:
    """Placed before the experts' class by ``expert_parallel`` (as ``fully_shard`` does): its ``forward`` is
    dispatch → ``moe_mlp`` over this rank's shards → combine, with the experts' options."""

    def forward(
        self,
        x: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        *,
        activation: str | Activation | None = None,
        **options,
    ) -> torch.Tensor:
        state: _ExpertParallelState = self._expert_parallel
        world, _ = _world(state.group)
        _check_routing(x, top_k_index, state.num_experts, world)
        _check_weights(x, top_k_index, top_k_weights)
        if options.pop("return_stats", False):
            raise ValueError("return_stats is not supported under expert parallelism")
        # a layer's per-call fp8_cache_x is about the x its router keeps; the local experts compute with the received
        # rows, which nothing else keeps: their FP8 copy is the smaller (MoEOptions.fp8_cache_x)
        options.pop("fp8_cache_x", None)
        opts = replace(self.options, **options) if options else self.options
        check = opts.check
        keep = None
        if opts.impl == "padded":  # capacity per rank (GShard): drop the overflow here, before sending
            if opts.drop_policy != "position":
                raise ValueError(
                    f"expert parallelism drops a PaddedMoE's overflow by position only, got drop_policy="
                    f"{opts.drop_policy!r}"
                )
            T, k = top_k_index.shape
            G = opts.num_groups
            C = padded_capacity(
                T, k, state.num_experts, capacity_factor=opts.capacity_factor, capacity=opts.capacity, num_groups=G
            )
            keep = padded_slots(top_k_index, state.num_experts, C, G) < G * state.num_experts * C
        weights = [_local(w) for w in (self.w1, self.w2, self.w3)]
        activation = self.activation if activation is None else activation

        def experts(sent: ExpertParallelDispatch) -> torch.Tensor:
            local = opts
            if opts.impl == "padded":  # buffers for every received row: nothing more is dropped
                local = replace(opts, capacity=sent.local_capacity, capacity_factor=None, num_groups=1)
            return ep_local_experts(sent, *weights, activation=activation, options=local)

        shared = state.shared_expert
        side = None if shared is None else lambda: shared(x)
        out, state.dropped, early = ep_pipeline(
            x,
            top_k_index,
            top_k_weights,
            experts,
            side=side,
            group=state.group,
            num_experts=state.num_experts,
            keep=keep,
            check=check,
            capacity_per_rank=state.capacity_per_rank,
            num_chunks=state.num_chunks,
        )
        if shared is not None:  # the layer's own call of its shared expert on x returns this
            shared._ep_early = (x, early)
        return out

    @property
    def dropped_assignments(self) -> torch.Tensor | None:
        """This rank's assignments dropped over ``capacity_per_rank`` in the last forward (a 0-d int64 device
        tensor, always 0 in the default mode; ``None`` before the first forward)."""
        return self._expert_parallel.dropped


class _EarlySharedExpert:
    """Placed before the shared expert's class by ``expert_parallel`` on a layer: called on the very tensor the
    experts' forward already ran it on (while its dispatch was in flight), it returns that output instead of
    computing it again; on any other input it computes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        early, self._ep_early = self._ep_early, None
        if early is not None and early[0] is x:
            return early[1]
        return super().forward(x)


_CLASSES: dict[tuple[type, type], type] = {}


def _subclass(cls: type, mixin: type, prefix: str) -> type:
    """``cls`` with ``mixin`` placed before it (one class per pair, as ``fully_shard`` does)."""
    if (cls, mixin) not in _CLASSES:
        _CLASSES[cls, mixin] = type(f"{prefix}{cls.__name__}", (mixin, cls), {})
    return _CLASSES[cls, mixin]


# ----------------------------------------------------------------------------------------------- the stages


@dataclass(frozen=True)
class ExpertParallelDispatch:
    """What ``ep_dispatch`` received, and what ``ep_combine`` needs to send the results back."""

    tokens: torch.Tensor  # [R, d] rows for this rank's experts, ordered by (source rank, local expert)
    local_expert: torch.Tensor  # [R] int64 local expert id of each row, in [0, E_l); E_l for an empty slot
    recv_counts: torch.Tensor  # [W, E_l] int32 rows received from rank s for local expert e
    row_assignment: torch.Tensor  # [A] int32 row of the sorted send order -> assignment, -1 if not sent
    assignment_row: torch.Tensor  # [T, k] int32 assignment -> row of the sorted send order, -1 if not sent
    send_splits: list[int]  # rows sent to each rank (bounded mode: capacity_per_rank each)
    recv_splits: list[int]  # rows received from each rank (bounded mode: capacity_per_rank each)
    rows_per_expert: list[int] | None  # rows received for each local expert (over all source ranks); bounded: None
    local_capacity: int  # an upper bound of the rows received for one local expert (exact in the default mode)
    dropped: torch.Tensor  # [] int64 this rank's assignments over capacity_per_rank, not sent (0 in the default mode)
    row_slot: torch.Tensor | None  # bounded mode: [A] slot of each sorted row in the exchange buffer, W·C if none
    group: dist.ProcessGroup | None


def ep_dispatch(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    num_experts: int,
    keep: torch.Tensor | None = None,
    check: bool | None = None,
    capacity_per_rank: int | None = None,
) -> ExpertParallelDispatch:
    """Send each token row to the ranks owning its chosen experts (steps 1-3 of the module docstring).

    ``keep`` (``[T, k]`` bool, optional): only these assignments are sent (the others, e.g. over capacity,
    contribute zero). ``check``: validate the expert ids (default as in ``moe_mlp``). Collective.

    ``capacity_per_rank`` (``None``: exact mode): ``None`` exchanges exactly the rows routed (one host
    synchronization: the split sizes). An int ``C`` is the bounded, sync-free mode: each rank sends ``C`` rows to
    every rank (its rows for that rank's experts in sorted order, then empty slots), so every buffer is sized from
    shapes and nothing is read on the host; rows past ``C`` for one destination are dropped (their assignments
    contribute zero, GShard-style) and counted in ``dropped``; within the bound it equals the exact mode.

    The payload exchange is in flight when this returns: ``tokens`` waits for it at its first use.
    """
    (sent,) = ep_dispatch_chunks(
        x,
        top_k_index,
        group=group,
        num_experts=num_experts,
        keep=keep,
        check=check,
        capacity_per_rank=capacity_per_rank,
        num_chunks=1,
    )
    return sent


def chunk_bounds(num_tokens: int, num_chunks: int) -> list[tuple[int, int]]:
    """``num_chunks`` contiguous token ranges covering ``[0, num_tokens)``, sizes differing by at most one (from
    the shape: no host read)."""
    return [(num_tokens * i // num_chunks, num_tokens * (i + 1) // num_chunks) for i in range(num_chunks)]


def ep_dispatch_chunks(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    num_experts: int,
    keep: torch.Tensor | None = None,
    check: bool | None = None,
    capacity_per_rank: int | None = None,
    num_chunks: int = 1,
) -> list[ExpertParallelDispatch]:
    """``ep_dispatch`` of the token ranges ``chunk_bounds(T, num_chunks)``, one dispatch each, all payload
    exchanges in flight on return (in chunk order): the caller computes chunk ``i`` while the later ones travel.
    The exact mode reads the split sizes of every chunk in one host synchronization; the bounded mode applies
    ``capacity_per_rank`` to each chunk. Collective."""
    world, _ = _world(group)
    _check_routing(x, top_k_index, num_experts, world)
    if capacity_per_rank is not None:
        non_negative_int("capacity_per_rank", capacity_per_rank)
    positive_int("num_chunks", num_chunks)
    if check_enabled(x.device, check):
        check_expert_ids(top_k_index, num_experts)
    if keep is not None:
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != top_k_index.shape:
            raise ValueError(
                f"keep must be a bool tensor of shape {tuple(top_k_index.shape)}, got {getattr(keep, 'dtype', keep)} "
                f"{tuple(getattr(keep, 'shape', ()))}"
            )
        top_k_index = torch.where(keep, top_k_index, num_experts)  # an invalid id: not planned, not sent
    chunks = [(x[a:b], top_k_index[a:b]) for a, b in chunk_bounds(x.shape[0], num_chunks)]
    # sorted by expert = by owner rank
    plans = [plan_routing(idx, num_experts, block_size=1, check=False) for _, idx in chunks]
    if capacity_per_rank is None:
        return _dispatch_exact([x for x, _ in chunks], plans, world, group)
    return [_dispatch_bounded(x, plan, world, group, capacity_per_rank) for (x, _), plan in zip(chunks, plans)]


def _dispatch_exact(xs: list[torch.Tensor], plans: list, world: int, group) -> list[ExpertParallelDispatch]:
    n, E = len(plans), plans[0].num_experts
    local = E // world
    # [W (destination), n, E_l]: each destination's counts of every chunk, exchanged at once
    send_counts = torch.stack([plan.tokens_per_expert for plan in plans]).view(n, world, local).transpose(0, 1)
    send_counts = send_counts.contiguous()
    recv_counts = torch.empty_like(send_counts)  # [W (source), n, E_l]
    work = dist.all_to_all_single(recv_counts, send_counts, group=group, async_op=True)
    sorted_rows = [gather_rows(x, plan.row_assignment, plan.assignment_row) for x, plan in zip(xs, plans)]
    work.wait()  # the gathers ran while the counts travelled
    # the one host sync: split sizes must be host ints
    sends, recvs = torch.stack([send_counts, recv_counts]).transpose(1, 2).tolist()  # [2][n][W][E_l]
    dispatches = []
    for i, (plan, x_sorted) in enumerate(zip(plans, sorted_rows)):
        send_splits, recv_splits = [sum(row) for row in sends[i]], [sum(row) for row in recvs[i]]
        sent = sum(send_splits)  # assignments not kept or with invalid ids are sorted last and not sent
        tokens = funcol.all_to_all_single_autograd(x_sorted[:sent], recv_splits, send_splits, _funcol_group(group))
        chunk_counts = recv_counts[:, i]  # [W, E_l]
        expert_ids = torch.arange(local, device=x_sorted.device).repeat(world)
        local_expert = torch.repeat_interleave(expert_ids, chunk_counts.flatten(), output_size=sum(recv_splits))
        rows_per_expert = [sum(column) for column in zip(*recvs[i])]
        dispatches.append(
            ExpertParallelDispatch(
                tokens=tokens,
                local_expert=local_expert,
                recv_counts=chunk_counts,
                row_assignment=plan.row_assignment,
                assignment_row=plan.assignment_row,
                send_splits=send_splits,
                recv_splits=recv_splits,
                rows_per_expert=rows_per_expert,
                local_capacity=max(rows_per_expert, default=0),
                dropped=torch.zeros((), dtype=torch.int64, device=x_sorted.device),
                row_slot=None,
                group=group,
            )
        )
    return dispatches


def _dispatch_bounded(x: torch.Tensor, plan, world: int, group, capacity: int) -> ExpertParallelDispatch:
    """The sync-free exchange: ``[W·C, d]`` buffers, slot ``s·C + j`` = the ``j``-th row for rank ``s``."""
    C, local, device = capacity, plan.num_experts // world, x.device
    counts = plan.tokens_per_expert.view(world, local).long()  # [W, E_l] sorted rows per (rank, local expert)
    per_rank = counts.sum(1)
    starts = per_rank.cumsum(0) - per_rank  # [W] first sorted row for each rank
    kept_ends = counts.cumsum(1).clamp(max=C)  # [W, E_l] the first C rows per rank are kept
    kept = torch.diff(kept_ends, dim=1, prepend=kept_ends.new_zeros(world, 1))
    recv_counts = funcol.all_to_all_single(kept.flatten(), None, None, _funcol_group(group)).view(world, local)
    # send slot s·C + j holds sorted row starts[s] + j while j < kept rows for s; else a zero row (index A)
    A = plan.row_assignment.shape[0]
    j = torch.arange(C, device=device)
    slot_row = torch.where(j < kept_ends[:, -1:], starts[:, None] + j, A).flatten()  # [W·C]
    # each sorted row's slot: W·C (a zero row) when not sent (over capacity, not kept, invalid id)
    row = torch.arange(A, device=device)
    rank = torch.searchsorted(per_rank.cumsum(0), row, right=True).clamp(max=world - 1)
    position = row - starts[rank]
    sent = (position < kept_ends[rank, -1]) & (row < per_rank.sum())
    row_slot = torch.where(sent, rank * C + position, world * C)
    x_sorted = gather_rows(x, plan.row_assignment, plan.assignment_row)
    send = torch.cat([x_sorted, x_sorted.new_zeros(1, x.shape[1])])[slot_row]
    tokens = funcol.all_to_all_single_autograd(send, [C] * world, [C] * world, _funcol_group(group))
    recv_ends = recv_counts.cumsum(1)  # [W, E_l]: local expert of slot j from rank s = #ends <= j (E_l: empty)
    local_expert = torch.searchsorted(recv_ends, j.expand(world, C).contiguous(), right=True).flatten()
    return ExpertParallelDispatch(
        tokens=tokens,
        local_expert=local_expert,
        recv_counts=recv_counts.int(),
        row_assignment=plan.row_assignment,
        assignment_row=plan.assignment_row,
        send_splits=[C] * world,
        recv_splits=[C] * world,
        rows_per_expert=None,
        local_capacity=world * C,
        dropped=per_rank.sum() - kept_ends[:, -1].sum(),
        row_slot=row_slot,
        group=group,
    )


def ep_local_experts(
    dispatch: ExpertParallelDispatch,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None = None,
    *,
    activation: str | Activation = "gelu",
    options: MoEOptions | None = None,
    **option_keywords,
) -> torch.Tensor:
    """The local experts on the dispatched rows (step 4): ``moe_mlp`` with one choice of weight 1 per row, with
    ``options`` (or ``MoEOptions`` keywords; ids unchecked: right by construction). Local, no communication;
    returns ``[R, d]``."""
    options = replace(options_from(options, **option_keywords), check=False)
    rows = dispatch.tokens.shape[0]
    ones = dispatch.tokens.new_ones(rows, 1)
    local_expert = dispatch.local_expert.view(rows, 1)
    return moe_mlp(
        dispatch.tokens,
        local_expert,
        ones,
        w1,
        w2,
        w3,
        activation=activation,
        options=options,
    )


def ep_combine(y: torch.Tensor, top_k_weights: torch.Tensor, dispatch: ExpertParallelDispatch) -> torch.Tensor:
    """Return the expert outputs ``y [R, d]`` (rows of ``dispatch.tokens``) to their source ranks and sum each
    token's choices weighted by ``top_k_weights [T, k]`` (steps 5-6; the weights in ``combine_dtype(y.dtype)``, as
    ``moe_mlp`` does). Collective; returns ``[T, d]``."""
    if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != dispatch.tokens.shape[0]:
        raise ValueError(
            f"y must be [{dispatch.tokens.shape[0]}, d] (one row per dispatched row), got {getattr(y, 'shape', y)}"
        )
    if top_k_weights.shape != dispatch.assignment_row.shape:
        raise ValueError(
            f"top_k_weights must have shape {tuple(dispatch.assignment_row.shape)}, got {tuple(top_k_weights.shape)}"
        )
    return _weighted_sum(_send_back(y, dispatch), top_k_weights, dispatch)


def _send_back(y: torch.Tensor, dispatch: ExpertParallelDispatch) -> torch.Tensor:
    """Step 5: the reverse exchange, in flight on return (the result waits for it at its first use)."""
    return funcol.all_to_all_single_autograd(
        y, dispatch.send_splits, dispatch.recv_splits, _funcol_group(dispatch.group)
    )


def _weighted_sum(back: torch.Tensor, top_k_weights: torch.Tensor, dispatch: ExpertParallelDispatch) -> torch.Tensor:
    """Step 6: ``back`` (the returned rows) in sorted order, then each token's weighted sum of its choices."""
    if dispatch.row_slot is None:  # exact mode: the rows come back in sorted order; the unsent ones are last
        unsent = dispatch.row_assignment.shape[0] - back.shape[0]
        if unsent:
            back = torch.cat([back, back.new_zeros(unsent, back.shape[1])])
    else:  # bounded mode: each sorted row reads its slot (a zero row when it was not sent)
        back = torch.cat([back, back.new_zeros(1, back.shape[1])])[dispatch.row_slot]
    weights = top_k_weights.to(combine_dtype(back.dtype))
    return scatter_rows(back, dispatch.row_assignment, dispatch.assignment_row, weights)


def ep_pipeline(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    experts: Callable[[ExpertParallelDispatch], torch.Tensor],
    *,
    group: dist.ProcessGroup | None,
    num_experts: int,
    keep: torch.Tensor | None = None,
    check: bool | None = None,
    capacity_per_rank: int | None = None,
    num_chunks: int = 1,
    side: Callable[[], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Dispatch → ``experts`` → combine over ``num_chunks`` token chunks, pipelined: every chunk's dispatch is
    issued first (``ep_dispatch_chunks``), then chunk ``i``'s ``experts(dispatch) -> [R_i, d]`` runs while the rows
    of the later chunks travel and the results of the earlier ones return; the weighted sums come last. ``side``
    (e.g. the shared expert) runs once every dispatch is in flight. Returns ``(out [T, d], dropped [] int64,
    side's result or None)``, ``out`` equal to the unchunked pipeline's. Collective."""
    dispatches = ep_dispatch_chunks(
        x,
        top_k_index,
        group=group,
        num_experts=num_experts,
        keep=keep,
        check=check,
        capacity_per_rank=capacity_per_rank,
        num_chunks=num_chunks,
    )
    early = None if side is None else side()
    returning = [_send_back(experts(sent), sent) for sent in dispatches]
    bounds = chunk_bounds(x.shape[0], num_chunks)
    out = [_weighted_sum(back, top_k_weights[a:b], sent) for back, sent, (a, b) in zip(returning, dispatches, bounds)]
    dropped = torch.stack([sent.dropped for sent in dispatches]).sum()
    return (out[0] if num_chunks == 1 else torch.cat(out)), dropped, early


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
    recompute_activation: bool = False,
    check: bool | None = None,
    capacity_per_rank: int | None = None,
    num_chunks: int = 1,
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
        activation, impl, block_size, recompute_activation, check: as in ``moe_mlp`` for the local experts (a
            dropless ``impl`` or ``"reference"``; for capacity, apply ``expert_parallel`` to a ``PaddedMoE``).
        capacity_per_rank: ``None`` for the exact exchange (one host sync), or the sync-free bound ``C`` (rows
            this rank sends to each rank; the rows over it are dropped): see ``ep_dispatch``.
        num_chunks: token chunks pipelined through dispatch → experts → combine (``ep_pipeline``).

    Returns ``[T, d]``, equal to ``moe_mlp`` with all experts on one device; differentiable in ``x``,
    ``top_k_weights`` and the shards. Collective (all ranks call it); one host sync to read the row counts unless
    ``capacity_per_rank`` is given.
    """
    world, _ = _world(group)
    _check_routing(x, top_k_index, num_experts, world)
    _check_weights(x, top_k_index, top_k_weights)
    _check_shards(x, w1, w2, w3, num_experts // world)
    if impl == "padded":
        raise ValueError(
            "impl='padded' needs per-rank capacity: apply expert_parallel to a PaddedMoE instead, got impl='padded'"
        )
    options = dict(activation=activation, impl=impl, block_size=block_size, recompute_activation=recompute_activation)
    out, _, _ = ep_pipeline(
        x,
        top_k_index,
        top_k_weights,
        lambda sent: ep_local_experts(sent, w1, w2, w3, **options),
        group=group,
        num_experts=num_experts,
        check=check,
        capacity_per_rank=capacity_per_rank,
        num_chunks=num_chunks,
    )
    return out


# ----------------------------------------------------------------------------------------------- validation


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


def _check_weights(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
    if not isinstance(top_k_weights, torch.Tensor) or not top_k_weights.is_floating_point():
        raise TypeError(f"top_k_weights must be a floating-point tensor, got {getattr(top_k_weights, 'dtype', None)}")
    if top_k_weights.device != x.device:
        raise ValueError(f"top_k_weights must be on {x.device} like x, got {top_k_weights.device}")
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(f"top_k_weights must have shape {tuple(top_k_index.shape)}, got {tuple(top_k_weights.shape)}")


def _check_shards(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor | None, local: int) -> None:
    d = x.shape[1]
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


# ----------------------------------------------------------------------------------------------- checkpoints


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
