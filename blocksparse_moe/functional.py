"""``moe_mlp``: the expert MLPs of a Mixture-of-Experts layer, given the router's choices, by one of four strategies.

- ``"blocksparse"`` (MegaBlocks, dropless): gather tokens into the block-padded expert-sorted layout, ``sdd``
  with ``w1`` (and ``w3``), ``dsd_act`` with ``w2`` (a named activation, and the GLU product, fused into its
  prologue: the memory-optimised MLP; a callable activation runs on the block data before ``dsd``), scatter back
  with the weights.
- ``"grouped"`` (dropless): unpadded expert-sorted layout; ``grouped_mm`` with the gather fused, activation,
  ``grouped_mm``, scatter back with the weights.
- ``"padded"`` (GShard / NLLB baseline, drops): ``[E, G·C, d]`` capacity buffers and ``torch.bmm``.
- ``"reference"``: a plain PyTorch loop over experts (see ``reference.expert_loop_moe_mlp``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ._backend import check_enabled, resolve_backend
from .backends.triton import grouped_block_m
from .reference import Activation, expert_loop_moe_mlp, get_activation
from .routing import plan_routing

__all__ = ["moe_mlp", "MoEStats", "padded_slots", "IMPLS"]

IMPLS = ("auto", "blocksparse", "grouped", "padded", "reference")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class MoEStats:
    """What one ``moe_mlp`` call did. Tensors stay on the device (reading them syncs; building them does not)."""

    impl: str  # the strategy that ran ("auto" resolved)
    capacity: int | None  # slots per expert per group (padded only)
    dropped: torch.Tensor  # [] int64: assignments over capacity (always 0 for dropless impls)
    executed_flops: int | torch.Tensor  # FLOPs of the expert GEMMs as executed, padding included
    useful_flops: int  # 2·T·k·d·f per GEMM: the FLOPs a perfect dropless kernel executes


def moe_mlp(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None = None,
    *,
    activation: str | Activation = "gelu",
    impl: str = "auto",
    capacity_factor: float | None = None,
    capacity: int | None = None,
    num_groups: int = 1,
    block_size: int | None = None,
    return_stats: bool = False,
    recompute_activation: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, MoEStats]:
    """Mixture-of-Experts MLP: ``out[t] = Σ_j top_k_weights[t, j] · expert_{top_k_index[t, j]}(x[t])``.

    Expert ``e`` is ``act(x @ w1[e]) @ w2[e]``, or with ``w3`` (GLU) ``(act(x @ w1[e]) * (x @ w3[e])) @ w2[e]``.
    Differentiable w.r.t. ``x``, ``w1``, ``w2``, ``w3`` and ``top_k_weights``; inputs are never modified;
    weights may be strided views (e.g. transposes). Duplicate experts in a row each count.

    Args:
        x: ``[T, d]`` float tokens.
        top_k_index: ``[T, k]`` int32/int64 expert ids in ``[0, E)``; checked on CPU (on CUDA with ``BSM_CHECK=1``).
        top_k_weights: ``[T, k]`` float combine weights (fp32 kept by the dropless impls, else cast to ``x.dtype``).
        w1, w3: ``[E, d, f]``; w2: ``[E, f, d]``; same dtype and device as ``x``.
        activation: ``"gelu"``, ``"gelu_tanh"``, ``"relu"``, ``"silu"`` or a callable (elementwise).
        impl: ``"blocksparse"``, ``"grouped"``, ``"padded"``, ``"reference"`` or ``"auto"``: ``"blocksparse"`` on
            CUDA, ``"grouped"`` on CPU (no block padding to compute; ``"padded"``/``"reference"`` either drop or
            compute every expert on every token).
        capacity_factor, capacity, num_groups: ``"padded"`` only. Tokens form ``num_groups`` equal contiguous
            groups; each expert has ``capacity`` slots per group, default ``ceil(capacity_factor · (T / G) · k /
            E)`` with ``capacity_factor`` 1.0. Slots are claimed rank-major, then in token order (every first
            choice of a group before any second choice); an assignment over capacity contributes zero.
        block_size: ``"blocksparse"`` block size (default 128 on CUDA, 64 on CPU); any positive int. Also
            accepted with ``"auto"`` (unused when that resolves to ``"grouped"``).
        return_stats: also return a ``MoEStats``.
        recompute_activation: do not keep the activation output for backward; recompute it from the saved
            pre-activation (MegaBlocks' memory-optimised MLP; the second GEMM is not recomputed). Always the case
            for ``"blocksparse"`` with a named activation (fused into the second GEMM, never stored).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (default: env ``BSM_BACKEND``), forwarded to the
            ``"blocksparse"`` / ``"grouped"`` ops. ``"auto"`` runs the Triton kernels on CUDA and, on CPU, only
            under ``TRITON_INTERPRET=1``; otherwise the PyTorch implementation of the same strategy runs.

    Returns:
        ``[T, d]`` in ``x.dtype`` (empty when ``T = 0``), and the ``MoEStats`` when ``return_stats``.
    """
    T, d, k, E, f = _validate(x, top_k_index, top_k_weights, w1, w2, w3)
    act = get_activation(activation)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    backend = resolve_backend(x.device, backend, x.dtype)
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if block_size is not None and impl not in ("auto", "blocksparse"):
        raise ValueError(f"block_size applies to impl='blocksparse' (or 'auto'), got {block_size=} with {impl=}")
    if impl == "auto":
        impl = "blocksparse" if x.device.type == "cuda" else "grouped"
    capacity = _resolve_capacity(impl, T, k, E, capacity_factor, capacity, num_groups)
    if not isinstance(recompute_activation, bool):
        raise TypeError(f"recompute_activation must be a bool, got {type(recompute_activation).__name__}")
    if check_enabled(x.device) and not torch.compiler.is_compiling():
        _check_ids(top_k_index, E)

    # the scatter kernels combine in fp32 and take fp32 (router) weights as they are; the torch paths use x.dtype
    keep_fp32 = impl in ("blocksparse", "grouped") and top_k_weights.dtype == torch.float32
    weights = top_k_weights if keep_fp32 else top_k_weights.to(x.dtype)
    nmm = 2 if w3 is None else 3
    useful = 2 * T * k * d * f * nmm
    dropped = torch.zeros((), dtype=torch.int64, device=x.device)
    executed: int | torch.Tensor = useful
    if impl == "reference" or (T == 0 and impl in ("blocksparse", "grouped")):
        out = expert_loop_moe_mlp(x, top_k_index, weights, w1, w2, w3, act)
        executed = E * T * 2 * d * f * nmm if impl == "reference" else 0
    elif impl == "padded":
        out, dropped = _padded(x, top_k_index, weights, w1, w2, w3, act, capacity, num_groups, recompute_activation)
        executed = E * capacity * num_groups * 2 * d * f * nmm
    elif impl == "grouped":
        out = _grouped(x, top_k_index, weights, w1, w2, w3, activation, recompute_activation, backend)
    else:
        if block_size is None:
            block_size = 128 if x.device.type == "cuda" else 64
        out, padded_rows = _blocksparse(
            x, top_k_index, weights, w1, w2, w3, activation, block_size, recompute_activation, backend
        )
        executed = padded_rows.to(torch.int64) * (2 * d * f * nmm)
    if return_stats:
        return out, MoEStats(impl, capacity, dropped, executed, useful)
    return out


def padded_slots(top_k_index: torch.Tensor, num_experts: int, capacity: int, num_groups: int = 1) -> torch.Tensor:
    """Slot of each assignment in the ``[G, E, C]`` capacity buffers (flattened), ``G·E·C`` when dropped.

    Within each of the ``G`` contiguous token groups, assignments claim their expert's ``C`` slots rank-major,
    then in token order. Vectorised (cumsum over a one-hot), no host sync. Returns ``[T, k]`` int64.
    """
    T, k = top_k_index.shape
    G, E, C = num_groups, num_experts, capacity
    S = T // G
    e = top_k_index.long().view(G, S, k).transpose(1, 2).reshape(G, k * S)  # rank-major order per group
    onehot = (e.unsqueeze(-1) == torch.arange(E, device=e.device)).long()  # [G, k·S, E], no range check/sync
    position = (onehot.cumsum(1) * onehot).sum(2) - 1  # place in its expert's queue
    group = torch.arange(G, device=e.device).view(G, 1)
    slot = torch.where(position < C, (group * E + e) * C + position, G * E * C)
    return slot.view(G, k, S).transpose(1, 2).reshape(T, k)


def _validate(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None,
) -> tuple[int, int, int, int, int]:
    named = dict(x=x, top_k_index=top_k_index, top_k_weights=top_k_weights, w1=w1, w2=w2)
    if w3 is not None:
        named["w3"] = w3
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(
            f"expected all tensors on one device, got {', '.join(f'{n} on {v}' for n, v in devices.items())}"
        )
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [tokens, hidden], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be one of {_FLOAT_DTYPES}, got {x.dtype}")
    T, d = x.shape
    if top_k_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"top_k_index must be int32 or int64, got {top_k_index.dtype}")
    if top_k_index.dim() != 2 or top_k_index.shape[0] != T or top_k_index.shape[1] < 1:
        raise ValueError(f"top_k_index must be [T={T}, k>=1], got shape {tuple(top_k_index.shape)}")
    k = top_k_index.shape[1]
    if not top_k_weights.is_floating_point():
        raise TypeError(f"top_k_weights must be a float tensor, got {top_k_weights.dtype}")
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(
            f"top_k_weights must have top_k_index's shape {tuple(top_k_index.shape)}, got {tuple(top_k_weights.shape)}"
        )
    if w1.dim() != 3 or w1.shape[1] != d or w1.shape[0] < 1 or w1.shape[2] < 1:
        raise ValueError(f"w1 must be [E, d={d}, f] with E, f >= 1, got shape {tuple(w1.shape)}")
    E, _, f = w1.shape
    if tuple(w2.shape) != (E, f, d):
        raise ValueError(f"w2 must be [E, f, d] = {(E, f, d)}, got shape {tuple(w2.shape)}")
    if w3 is not None and w3.shape != w1.shape:
        raise ValueError(f"w3 must have w1's shape {tuple(w1.shape)}, got {tuple(w3.shape)}")
    for name in ("w1", "w2", "w3"):
        if name in named and named[name].dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {named[name].dtype}")
    return T, d, k, E, f


def _resolve_capacity(
    impl: str, T: int, k: int, E: int, capacity_factor: float | None, capacity: int | None, num_groups: int
) -> int | None:
    if impl != "padded":
        if capacity_factor is not None or capacity is not None or num_groups != 1:
            raise ValueError(
                f"capacity_factor, capacity and num_groups apply to impl='padded' only ({impl!r} drops nothing), "
                f"got {capacity_factor=}, {capacity=}, {num_groups=}"
            )
        return None
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if T % num_groups:
        raise ValueError(f"num_groups must divide the number of tokens, got T={T} and {num_groups=}")
    if capacity is not None:
        if capacity_factor is not None:
            raise ValueError(f"give capacity or capacity_factor, not both; got {capacity=}, {capacity_factor=}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be a non-negative int, got {capacity!r}")
        return capacity
    if capacity_factor is None:
        capacity_factor = 1.0
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) or capacity_factor < 0:
        raise ValueError(f"capacity_factor must be a non-negative number, got {capacity_factor!r}")
    return math.ceil(capacity_factor * (T // num_groups) * k / E)


def _check_ids(top_k_index: torch.Tensor, num_experts: int) -> None:
    bad = (top_k_index < 0) | (top_k_index >= num_experts)
    if bool(bad.any()):
        raise ValueError(
            f"top_k_index must hold expert ids in [0, {num_experts}), got {int(bad.sum())} outside that range, "
            f"e.g. {top_k_index[bad][:5].tolist()}"
        )


def _save_matmul_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing: keep GEMM outputs, recompute everything else (the activation)."""
    if op == torch.ops.aten.bmm.default or op.namespace == "bsm":
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _activate_then(second, act: Activation, h: torch.Tensor, g: torch.Tensor | None, recompute: bool) -> torch.Tensor:
    """``second(act(h) [* g])``; with ``recompute`` the activation output is rebuilt in backward, not saved."""

    def region(h: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        a = act(h)
        return second(a if g is None else a * g)

    if not recompute:
        return region(h, g)
    return checkpoint(
        region,
        h,
        g,
        use_reentrant=False,
        context_fn=partial(create_selective_checkpoint_contexts, _save_matmul_outputs),
    )


def _padded(x, top_k_index, weights, w1, w2, w3, act, capacity, num_groups, recompute):
    T, d = x.shape
    E = w1.shape[0]
    n = num_groups * E * capacity
    slot = padded_slots(top_k_index, E, capacity, num_groups)  # [T, k], n = dropped
    token = torch.arange(slot.numel(), device=x.device) // slot.shape[1]
    # slot -> token (T = empty slot); dropped assignments all land in the discarded entry n
    source = torch.full((n + 1,), T, dtype=torch.int64, device=x.device).scatter_(0, slot.reshape(-1), token)[:n]
    buffers = torch.cat([x, x.new_zeros(1, d)]).index_select(0, source)
    buffers = buffers.view(num_groups, E, capacity, d).transpose(0, 1).reshape(E, num_groups * capacity, d)
    h = torch.bmm(buffers, w1)
    g = None if w3 is None else torch.bmm(buffers, w3)
    y = _activate_then(lambda a: torch.bmm(a, w2), act, h, g, recompute)  # [E, G·C, d]
    y = y.view(E, num_groups, capacity, d).transpose(0, 1).reshape(n, d)
    gathered = torch.cat([y, y.new_zeros(1, d)]).index_select(0, slot.reshape(-1)).view(*slot.shape, d)
    out = (gathered * weights.unsqueeze(-1)).sum(1)
    return out, (slot == n).sum()


def _grouped(x, top_k_index, weights, w1, w2, w3, activation, recompute, backend):
    from .ops.grouped import grouped_mm
    from .ops.mlp import expert_mlp, mlp_routing
    from .ops.permute import scatter_rows

    plan = plan_routing(top_k_index, w1.shape[0], block_size=1, check=False)
    if isinstance(activation, str):  # fused: the activation in the up-projection's epilogue
        block_m = grouped_block_m(plan.num_assignments, plan.num_experts)
        routing = mlp_routing(plan, blocksparse=False, block_m=block_m)
        return expert_mlp(x, weights, w1, w2, w3, routing, activation, backend)
    rows, inv = plan.row_assignment, plan.assignment_row
    h = grouped_mm(x, w1, plan.offsets, rows, inv, backend=backend)
    g = None if w3 is None else grouped_mm(x, w3, plan.offsets, rows, inv, backend=backend)
    y = _activate_then(lambda a: grouped_mm(a, w2, plan.offsets, backend=backend), activation, h, g, recompute)
    return scatter_rows(y, rows, inv, weights, backend=backend)


def _blocksparse(x, top_k_index, weights, w1, w2, w3, activation, block_size, recompute, backend):
    from .ops.blocksparse import dsd, sdd
    from .ops.mlp import expert_mlp, mlp_routing
    from .ops.permute import gather_rows, scatter_rows

    plan = plan_routing(top_k_index, w1.shape[0], block_size=block_size, ffn_size=w1.shape[2], check=False)
    if isinstance(activation, str):  # fused: SDD with the activation in its epilogue, then DSD
        out = expert_mlp(x, weights, w1, w2, w3, mlp_routing(plan, blocksparse=True, block_m=block_size), activation,
                         backend)  # fmt: skip
        return out, plan.padded_offsets[-1]
    topo = plan.topology
    rows, inv = plan.padded_row_assignment, plan.padded_assignment_row
    xs = gather_rows(x, rows, inv, backend=backend)
    h = sdd(xs, w1, topo, backend=backend)
    g = None if w3 is None else sdd(xs, w3, topo, backend=backend)
    y = _activate_then(lambda a: dsd(a, topo, w2, backend=backend), activation, h, g, recompute)
    out = scatter_rows(y, rows, inv, weights, backend=backend)
    return out, plan.padded_offsets[-1]
