"""``moe_mlp``: the expert MLPs of a Mixture-of-Experts layer, given the router's choices, by one of four strategies.

- ``"blocksparse"`` (MegaBlocks, dropless): the block-padded expert-sorted layout; SDD with ``w1`` and ``w3`` and
  the activation in its epilogue (the gather fused into its loads), then DSD with ``w2`` (``ops.mlp``); a
  callable activation runs op by op (gather, ``sdd``, the activation on the blocks, ``dsd``).
- ``"grouped"`` (dropless): the unpadded expert-sorted layout; the same fused expert MLP as grouped GEMMs; a
  callable activation runs op by op (``grouped_mm`` with the gather fused, the activation, ``grouped_mm``).
- ``"padded"`` (GShard / NLLB baseline, drops): ``[E, G·C, d]`` capacity buffers and ``torch.bmm``.
- ``"reference"``: a plain PyTorch loop over experts (see ``reference.expert_loop_moe_mlp``).

Structure: ``moe_mlp`` validates, then the two dropless strategies run inside one core, ``_dropless``: plan the
routing, run the strategy (a small function of token rows, plan and combine weights: the experts applied to the
rows of the plan's layout and combined back per token). ``custom_moe_mlp`` (experts whose gate is not an elementwise
activation, or with biases: the Hugging Face integration) runs the same core with the ``_grouped_custom`` strategy.

Combine weights (one policy on every path, expert parallelism included): the top-k weights are used in
``combine_dtype(x.dtype)`` (fp32, or float64 for float64 tokens) and each token's weighted sum is accumulated in that
dtype, then rounded once to ``x.dtype``.

Expert ids outside ``[0, E)``: a ``ValueError`` when checked (``check``, default: on CPU always, on CUDA with
``BSM_CHECK=1``, never under ``torch.compile`` or on the meta device); unchecked, such an assignment contributes
zero and touches no memory out of bounds, whatever the strategy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .activations import Activation, get_activation
from .config import check_enabled, resolve_backend
from .reference import expert_loop_moe_mlp
from .routing import RoutingPlan, plan_routing

__all__ = [
    "moe_mlp",
    "custom_moe_mlp",
    "MoEStats",
    "padded_slots",
    "padded_capacity",
    "combine_dtype",
    "resolve_impl",
    "check_options",
    "check_expert_ids",
    "IMPLS",
]

IMPLS = ("auto", "blocksparse", "grouped", "padded", "reference")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class MoEStats:
    """What one ``moe_mlp`` call did. Tensors stay on the device (reading them syncs; building them does not)."""

    impl: str  # the strategy that ran ("auto" resolved)
    capacity: int | None  # slots per expert per group (padded only)
    dropped: torch.Tensor  # [] int64: valid assignments over capacity (always 0 for dropless impls)
    # FLOPs of the expert GEMMs as executed, padding included: padded, every slot of every expert and group;
    # blocksparse, the block-padded rows times the block-padded width ceil(f / B)·B; reference, every expert on
    # every token; grouped, the useful FLOPs
    executed_flops: int | torch.Tensor
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
    check: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, MoEStats]:
    """Mixture-of-Experts MLP: ``out[t] = Σ_j top_k_weights[t, j] · expert_{top_k_index[t, j]}(x[t])``.

    Expert ``e`` is ``act(x @ w1[e]) @ w2[e]``, or with ``w3`` (GLU) ``(act(x @ w1[e]) * (x @ w3[e])) @ w2[e]``.
    Differentiable w.r.t. ``x``, ``w1``, ``w2``, ``w3`` and ``top_k_weights``; inputs are never modified;
    weights may be strided views (e.g. transposes). Duplicate experts in a row each count.

    Args:
        x: ``[T, d]`` float tokens.
        top_k_index: ``[T, k]`` int32/int64 expert ids in ``[0, E)``.
        top_k_weights: ``[T, k]`` float combine weights, used in ``combine_dtype(x.dtype)`` (fp32 for 16- and
            32-bit tokens) on every strategy.
        w1, w3: ``[E, d, f]``; w2: ``[E, f, d]``; same dtype and device as ``x``.
        activation: ``"gelu"``, ``"gelu_tanh"``, ``"relu"``, ``"silu"`` or a callable (elementwise).
        impl: ``"blocksparse"``, ``"grouped"``, ``"padded"``, ``"reference"`` or ``"auto"``: ``"blocksparse"`` on
            CUDA, ``"grouped"`` elsewhere (no block padding to compute; ``"padded"``/``"reference"`` either drop or
            compute every expert on every token).
        capacity_factor, capacity, num_groups: ``"padded"`` only. Tokens form ``num_groups`` equal contiguous
            groups; each expert has ``capacity`` slots per group, default ``ceil(capacity_factor · (T / G) · k /
            E)`` with ``capacity_factor`` (finite, >= 0) 1.0. Slots are claimed rank-major, then in token order
            (every first choice of a group before any second choice); an assignment over capacity contributes zero.
        block_size: ``"blocksparse"`` block size, one of ``kernels.expert_gemm.BLOCK_SIZES`` (16, 32, 64, 128: the
            Triton kernels' tiles; the torch backend takes the same set); default 128 on CUDA, 64 elsewhere. Also
            accepted with ``"auto"`` (unused when that resolves to ``"grouped"``).
        return_stats: also return a ``MoEStats``.
        recompute_activation: do not keep the activation output for backward; recompute it from the saved
            pre-activation (MegaBlocks' memory-optimised MLP; the second GEMM is not recomputed). Always the case
            for ``"blocksparse"`` with a named activation (fused into the second GEMM, never stored).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (default: env ``BSM_BACKEND``), forwarded to the
            ``"blocksparse"`` / ``"grouped"`` ops. ``"auto"`` runs the Triton kernels on CUDA and, on CPU, only
            under ``TRITON_INTERPRET=1``; otherwise the PyTorch implementation of the same strategy runs.
        check: raise ``ValueError`` on expert ids outside ``[0, E)`` (one host sync on GPU). Default: on CPU
            always, on CUDA with ``BSM_CHECK=1``; never while ``torch.compile`` traces or on the meta device.
            Unchecked, an invalid id contributes zero on every strategy and never touches memory out of bounds.

    Under ``torch.autocast`` the expert GEMMs run in the autocast dtype, as ``nn.Linear`` does: x and the expert
    weights are cast to it (differentiably: fp32 parameters get fp32 gradients); the combine weights are not.

    Returns:
        ``[T, d]`` in ``x.dtype`` (the autocast dtype under autocast; empty when ``T = 0``), and the ``MoEStats``
        when ``return_stats``.
    """
    x, w1, w2, w3 = autocast_operands(x, w1, w2, w3)
    T, d, k, E, f = _validate(x, top_k_index, top_k_weights, w1, w2, w3)
    get_activation(activation)  # validates the name
    check_options(
        impl=impl,
        block_size=block_size,
        recompute_activation=recompute_activation,
        capacity_factor=capacity_factor,
        capacity=capacity,
        num_groups=num_groups,
    )
    impl = resolve_impl(impl, x.device)
    backend = resolve_backend(x.device, backend, x.dtype)
    if impl == "padded":
        capacity = padded_capacity(T, k, E, capacity_factor=capacity_factor, capacity=capacity, num_groups=num_groups)
    if check_enabled(x.device, check):
        check_expert_ids(top_k_index, E)

    weights = top_k_weights.to(combine_dtype(x.dtype))
    nmm = 2 if w3 is None else 3
    useful = 2 * T * k * d * f * nmm
    dropped = torch.zeros((), dtype=torch.int64, device=x.device)
    executed: int | torch.Tensor = useful
    if impl == "reference" or (T == 0 and impl in ("blocksparse", "grouped")):
        out = expert_loop_moe_mlp(x, top_k_index, weights, w1, w2, w3, activation)
        executed = E * T * 2 * d * f * nmm if impl == "reference" else 0
    elif impl == "padded":
        act = get_activation(activation)
        out, dropped = _padded(x, top_k_index, weights, w1, w2, w3, act, capacity, num_groups, recompute_activation)
        executed = E * capacity * num_groups * 2 * d * f * nmm
    elif impl == "grouped":
        strategy = partial(
            _grouped, w1=w1, w2=w2, w3=w3, activation=activation, recompute=recompute_activation, backend=backend
        )
        out, _ = _dropless(x, top_k_index, weights, E, strategy, block_size=1)
    else:
        B = _default_block_size(x.device) if block_size is None else block_size
        strategy = partial(
            _blocksparse, w1=w1, w2=w2, w3=w3, activation=activation, recompute=recompute_activation, backend=backend
        )
        out, plan = _dropless(x, top_k_index, weights, E, strategy, block_size=B, ffn_size=f)
        padded_width = plan.topology.blocks_per_expert * B  # the last column block of an expert is computed whole
        executed = plan.padded_offsets[-1].to(torch.int64) * (2 * d * padded_width * nmm)
    if return_stats:
        return out, MoEStats(impl, capacity, dropped, executed, useful)
    return out


def custom_moe_mlp(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    *,
    activation: Callable[[torch.Tensor], torch.Tensor],
    up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    post: Callable[[torch.Tensor], torch.Tensor] | None = None,
    backend: str | None = None,
    check: bool | None = None,
) -> torch.Tensor:
    """MoE MLP for experts outside ``moe_mlp``'s elementwise form, by the grouped strategy of the same core:
    ``expert_e(x) = post(activation(x @ up[e] + up_bias[e]) @ down[e] + down_bias[e])``.

    ``activation`` maps whole rows ``[R, u]`` to ``[R, h]`` and may change the width: a gate over concatenated or
    interleaved gate/up columns (Hugging Face's ``_apply_gate``, gpt-oss's clamped SwiGLU) or a plain activation
    (``u = h``). ``post`` (optional) maps the ``[R, d]`` expert outputs row by row (a post-expert norm).

    Args:
        x: ``[T, d]`` tokens; top_k_index, top_k_weights: ``[T, k]`` as in ``moe_mlp`` (same combine policy).
        up: ``[E, d, u]``; down: ``[E, h, d]`` (strided views welcome); same dtype and device as ``x``.
        up_bias: ``[E, u]``; down_bias: ``[E, d]`` (optional).
        backend, check: as in ``moe_mlp``.

    Returns ``[T, d]`` in ``x.dtype`` (the autocast dtype under autocast, as in ``moe_mlp``); differentiable in
    ``x``, the weights, the biases and ``top_k_weights``.
    """
    if not callable(activation):
        raise TypeError(f"activation must be a callable mapping rows [R, u] -> [R, h], got {activation!r}")
    if post is not None and not callable(post):
        raise TypeError(f"post must be None or a callable mapping rows [R, d] -> [R, d], got {post!r}")
    x, up, down, up_bias, down_bias = autocast_operands(x, up, down, up_bias, down_bias)
    T, d, k = _validate_routing(x, top_k_index, top_k_weights, up=up, down=down, up_bias=up_bias, down_bias=down_bias)
    if up.dim() != 3 or down.dim() != 3 or up.shape[1] != d or down.shape[2] != d or down.shape[0] != up.shape[0]:
        raise ValueError(
            f"up must be [E, d={d}, u] and down [E, h, d={d}], got {tuple(up.shape)} and {tuple(down.shape)}"
        )
    E, u = up.shape[0], up.shape[2]
    if E < 1 or u < 1 or down.shape[1] < 1:
        raise ValueError(f"up and down need E, u, h >= 1, got {tuple(up.shape)} and {tuple(down.shape)}")
    for name, bias, width in (("up_bias", up_bias, u), ("down_bias", down_bias, d)):
        if bias is not None and tuple(bias.shape) != (E, width):
            raise ValueError(f"{name} must be [E={E}, {width}], got shape {tuple(bias.shape)}")
    backend = resolve_backend(x.device, backend, x.dtype)
    if check_enabled(x.device, check):
        check_expert_ids(top_k_index, E)
    weights = top_k_weights.to(combine_dtype(x.dtype))
    strategy = partial(
        _grouped_custom,
        up=up,
        down=down,
        activation=activation,
        up_bias=up_bias,
        down_bias=down_bias,
        post=post,
        backend=backend,
    )
    out, _ = _dropless(x, top_k_index, weights, E, strategy, block_size=1)
    return out


# ----------------------------------------------------------------------------------------------- options

_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def autocast_operands(x: torch.Tensor, *weights: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``(x, *weights)``, cast to the autocast dtype when ``torch.autocast`` is on for x's device (floating tensors of
    the autocast-eligible dtypes only; float64 and non-tensors unchanged), else as given."""
    if not isinstance(x, torch.Tensor):
        return (x, *weights)
    device = x.device.type
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return (x, *weights)
    dtype = torch.get_autocast_dtype(device)

    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_DTYPES else t

    return (cast(x), *(cast(w) for w in weights))


def resolve_impl(impl: str, device: torch.device) -> str:
    """The strategy ``impl="auto"`` stands for on ``device`` (``"blocksparse"`` on CUDA, else ``"grouped"``)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "blocksparse" if device.type == "cuda" else "grouped"
    return impl


def combine_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the top-k combine weights are used in for tokens of ``dtype``: fp32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def block_sizes() -> tuple[int, ...]:
    """The block sizes ``"blocksparse"`` takes: the Triton kernels' (``kernels.expert_gemm.BLOCK_SIZES``)."""
    from .kernels.expert_gemm import BLOCK_SIZES

    return BLOCK_SIZES


def _default_block_size(device: torch.device) -> int:
    return 128 if device.type == "cuda" else 64


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_options(
    *,
    impl: str = "auto",
    block_size: int | None = None,
    recompute_activation: bool = False,
    capacity_factor: float | None = None,
    capacity: int | None = None,
    num_groups: int = 1,
) -> None:
    """Validate the ``moe_mlp`` options that do not depend on the data (the layers call it at construction).

    ``capacity_factor``, ``capacity`` and a ``num_groups`` other than 1 belong to ``impl="padded"``;
    ``block_size`` to ``"blocksparse"`` (or ``"auto"``)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(recompute_activation, bool):
        raise TypeError(f"recompute_activation must be a bool, got {recompute_activation!r}")
    if block_size is not None:
        if not _is_int(block_size) or block_size not in block_sizes():
            raise ValueError(f"block_size must be one of {block_sizes()} or None, got {block_size!r}")
        if impl not in ("auto", "blocksparse"):
            raise ValueError(f"block_size applies to impl='blocksparse' (or 'auto'), got {block_size=} with {impl=}")
    if impl != "padded":
        if capacity_factor is not None or capacity is not None or num_groups != 1:
            raise ValueError(
                f"capacity_factor, capacity and num_groups apply to impl='padded' only ({impl!r} drops nothing), "
                f"got {capacity_factor=}, {capacity=}, {num_groups=}"
            )
        return
    if not _is_int(num_groups) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if capacity is not None:
        if capacity_factor is not None:
            raise ValueError(f"give capacity or capacity_factor, not both; got {capacity=}, {capacity_factor=}")
        if not _is_int(capacity) or capacity < 0:
            raise ValueError(f"capacity must be a non-negative int, got {capacity!r}")
    elif capacity_factor is not None and (
        isinstance(capacity_factor, bool)
        or not isinstance(capacity_factor, (int, float))
        or not math.isfinite(capacity_factor)
        or capacity_factor < 0
    ):
        raise ValueError(f"capacity_factor must be a finite non-negative number, got {capacity_factor!r}")


def padded_capacity(
    num_tokens: int,
    top_k: int,
    num_experts: int,
    *,
    capacity_factor: float | None = None,
    capacity: int | None = None,
    num_groups: int = 1,
) -> int:
    """Slots per expert per group of ``impl="padded"``: ``capacity``, else ``ceil(capacity_factor · (T / G) · k /
    E)`` (``capacity_factor`` default 1.0); ``num_groups`` must divide ``num_tokens``."""
    check_options(impl="padded", capacity_factor=capacity_factor, capacity=capacity, num_groups=num_groups)
    if num_tokens % num_groups:
        raise ValueError(f"num_groups must divide the number of tokens, got T={num_tokens} and {num_groups=}")
    if capacity is not None:
        return capacity
    factor = 1.0 if capacity_factor is None else capacity_factor
    return math.ceil(factor * (num_tokens // num_groups) * top_k / num_experts)


def padded_slots(top_k_index: torch.Tensor, num_experts: int, capacity: int, num_groups: int = 1) -> torch.Tensor:
    """Slot of each assignment in the ``[G, E, C]`` capacity buffers (flattened), ``G·E·C`` when dropped.

    Within each of the ``G`` contiguous token groups, assignments claim their expert's ``C`` slots rank-major,
    then in token order. An id outside ``[0, E)`` claims no slot (``G·E·C``, as if dropped). Vectorised (cumsum
    over a one-hot), no host sync. Returns ``[T, k]`` int64.
    """
    T, k = top_k_index.shape
    G, E, C = num_groups, num_experts, capacity
    S = T // G
    e = top_k_index.long().view(G, S, k).transpose(1, 2).reshape(G, k * S)  # rank-major order per group
    valid = (e >= 0) & (e < E)
    onehot = (e.unsqueeze(-1) == torch.arange(E, device=e.device)).long()  # [G, k·S, E]; invalid ids: all zero
    position = (onehot.cumsum(1) * onehot).sum(2) - 1  # place in its expert's queue (-1 for an invalid id)
    group = torch.arange(G, device=e.device).view(G, 1)
    slot = torch.where(valid & (position < C), (group * E + e) * C + position, G * E * C)
    return slot.view(G, k, S).transpose(1, 2).reshape(T, k)


# ----------------------------------------------------------------------------------------------- validation


def _validate_routing(
    x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, **weights: torch.Tensor | None
) -> tuple[int, int, int]:
    """Types, devices (of the routing tensors and ``weights``) and shapes of x and the routing; returns T, d, k."""
    named = dict(x=x, top_k_index=top_k_index, top_k_weights=top_k_weights, **weights)
    named = {name: t for name, t in named.items() if t is not None}
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
    if not top_k_weights.is_floating_point():
        raise TypeError(f"top_k_weights must be a float tensor, got {top_k_weights.dtype}")
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(
            f"top_k_weights must have top_k_index's shape {tuple(top_k_index.shape)}, got {tuple(top_k_weights.shape)}"
        )
    for name, t in weights.items():
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    return T, d, top_k_index.shape[1]


def _validate(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None,
) -> tuple[int, int, int, int, int]:
    T, d, k = _validate_routing(x, top_k_index, top_k_weights, w1=w1, w2=w2, w3=w3)
    if w1.dim() != 3 or w1.shape[1] != d or w1.shape[0] < 1 or w1.shape[2] < 1:
        raise ValueError(f"w1 must be [E, d={d}, f] with E, f >= 1, got shape {tuple(w1.shape)}")
    E, _, f = w1.shape
    if tuple(w2.shape) != (E, f, d):
        raise ValueError(f"w2 must be [E, f, d] = {(E, f, d)}, got shape {tuple(w2.shape)}")
    if w3 is not None and w3.shape != w1.shape:
        raise ValueError(f"w3 must have w1's shape {tuple(w1.shape)}, got {tuple(w3.shape)}")
    return T, d, k, E, f


def check_expert_ids(top_k_index: torch.Tensor, num_experts: int) -> None:
    """Raise ``ValueError`` if ``top_k_index`` holds an id outside ``[0, num_experts)`` (reads the data: one host
    sync on GPU; callers gate it with ``config.check_enabled``)."""
    bad = (top_k_index < 0) | (top_k_index >= num_experts)
    if bool(bad.any()):
        raise ValueError(
            f"top_k_index must hold expert ids in [0, {num_experts}), got {int(bad.sum())} outside that range, "
            f"e.g. {top_k_index[bad][:5].tolist()}"
        )


# ----------------------------------------------------------------------------------------------- the dropless core


def _dropless(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    weights: torch.Tensor,
    num_experts: int,
    strategy: Callable[[torch.Tensor, RoutingPlan, torch.Tensor], torch.Tensor],
    *,
    block_size: int,
    ffn_size: int | None = None,
) -> tuple[torch.Tensor, RoutingPlan]:
    """The dropless pipeline every dropless path shares: plan the routing (block size ``block_size``; topology when
    ``ffn_size`` is given), then ``out = strategy(x, plan, weights)``: each token's experts applied to its rows of
    the plan's layout (the unpadded one when ``block_size = 1``, else the block-padded one) and combined,
    ``out[t] = Σ_j weights[t, j] · y[row(t, j)]``. Ids were checked (or deliberately not) by the caller; invalid
    ones have no row and contribute zero."""
    plan = plan_routing(top_k_index, num_experts, block_size=block_size, ffn_size=ffn_size, check=False)
    return strategy(x, plan, weights), plan


def _combine(y: torch.Tensor, plan: RoutingPlan, weights: torch.Tensor, backend: str) -> torch.Tensor:
    """``out[t] = Σ_j weights[t, j] · y[row(t, j)]`` for expert-output rows ``y`` in the plan's layout (unpadded for
    ``block_size = 1``, else block-padded), deterministic."""
    from .ops.permute import scatter_rows

    if plan.block_size == 1:
        return scatter_rows(y, plan.row_assignment, plan.assignment_row, weights, backend=backend)
    return scatter_rows(y, plan.padded_row_assignment, plan.padded_assignment_row, weights, backend=backend)


# The strategies: (token rows x [T, d], plan, combine weights) -> out [T, d]. A named activation runs the fused
# expert MLP (ops.mlp: the activation in the up-projection's epilogue, the top-k weight gradient in the backward
# epilogue, nothing but x, h, g saved); a callable one runs the op-by-op pipeline, then ``_combine``.


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


def _grouped(x, plan, weights, *, w1, w2, w3, activation, recompute, backend):
    """Unpadded sorted rows: the fused expert MLP for a named activation; otherwise fused-gather ``grouped_mm`` with
    w1 (and w3), the activation, ``grouped_mm`` with w2, combine."""
    from .ops.grouped import grouped_mm
    from .ops.mlp import expert_mlp, mlp_routing

    if isinstance(activation, str):
        return expert_mlp(x, weights, w1, w2, w3, mlp_routing(plan), activation, backend)
    rows, inv = plan.row_assignment, plan.assignment_row
    h = grouped_mm(x, w1, plan.offsets, rows, inv, backend=backend)
    g = None if w3 is None else grouped_mm(x, w3, plan.offsets, rows, inv, backend=backend)
    y = _activate_then(lambda a: grouped_mm(a, w2, plan.offsets, backend=backend), activation, h, g, recompute)
    return _combine(y, plan, weights, backend)


def _blocksparse(x, plan, weights, *, w1, w2, w3, activation, recompute, backend):
    """Block-padded sorted rows: the fused expert MLP for a named activation (MegaBlocks' SDD with the GLU pair and
    the activation in its epilogue, then DSD); otherwise gather, ``sdd`` with w1 (and w3), the activation on the
    blocks, ``dsd`` with w2, combine."""
    from .ops.blocksparse import dsd, sdd
    from .ops.mlp import expert_mlp, mlp_routing
    from .ops.permute import gather_rows

    if isinstance(activation, str):
        return expert_mlp(x, weights, w1, w2, w3, mlp_routing(plan), activation, backend)
    topo = plan.topology
    xs = gather_rows(x, plan.padded_row_assignment, plan.padded_assignment_row, backend=backend)
    h = sdd(xs, w1, topo, backend=backend)
    g = None if w3 is None else sdd(xs, w3, topo, backend=backend)
    y = _activate_then(lambda a: dsd(a, topo, w2, backend=backend), activation, h, g, recompute)
    return _combine(y, plan, weights, backend)


def _grouped_custom(x, plan, weights, *, up, down, activation, up_bias, down_bias, post, backend):
    """Unpadded sorted rows: ``post(activation(x @ up[e] + up_bias[e]) @ down[e] + down_bias[e])`` with a row-wise
    ``activation`` (it sees whole rows, which the block layout does not give it), combine."""
    from .ops.grouped import grouped_mm

    if up_bias is not None or down_bias is not None:  # expert of each sorted row (rows past offsets[E]: clamped)
        rows = torch.arange(plan.row_assignment.numel(), device=x.device, dtype=plan.offsets.dtype)
        row_expert = torch.searchsorted(plan.offsets[1:], rows, right=True).clamp(max=up.shape[0] - 1)
    h = grouped_mm(x, up, plan.offsets, plan.row_assignment, plan.assignment_row, backend=backend)
    if up_bias is not None:
        h = h + up_bias[row_expert]
    a = activation(h).to(x.dtype)
    y = grouped_mm(a, down, plan.offsets, backend=backend)
    if down_bias is not None:
        y = y + down_bias[row_expert]
    return _combine(y if post is None else post(y), plan, weights, backend)


# ----------------------------------------------------------------------------------------------- padded


def _padded(x, top_k_index, weights, w1, w2, w3, act, capacity, num_groups, recompute):
    T, d = x.shape
    E = w1.shape[0]
    n = num_groups * E * capacity
    slot = padded_slots(top_k_index, E, capacity, num_groups)  # [T, k], n = dropped or invalid
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
    out = torch.bmm(weights.unsqueeze(1), gathered.to(weights.dtype)).squeeze(1)  # combine in the weights' dtype
    valid = (top_k_index >= 0) & (top_k_index < E)
    return out.to(x.dtype), ((slot == n) & valid).sum()
