"""FLOP accounting for one MoE MLP layer (independent of the library's own stats).

Per assignment (one token routed to one expert) the expert MLP does ``2·d·f`` FLOPs per matmul: two matmuls
(``w1``, ``w2``), or three with a GLU (``w1``, ``w3``, ``w2``). Backward is counted as twice the forward (input and
weight gradients), so forward+backward is three times the forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "matmuls_per_mlp",
    "useful_flops",
    "padded_executed_flops",
    "blocksparse_executed_flops",
    "backward_flops",
    "fwd_bwd_flops",
    "capacity",
    "dropped_assignments",
    "tflops",
]


def matmuls_per_mlp(glu: bool) -> int:
    """Matmuls in one expert MLP: 3 with a GLU (``w1``, ``w3``, ``w2``), else 2."""
    return 3 if glu else 2


def _check_dims(d: int, f: int) -> None:
    if d < 1 or f < 1:
        raise ValueError(f"d and f must be positive, got d={d}, f={f}")


def useful_flops(assignments: int, d: int, f: int, glu: bool) -> int:
    """Forward FLOPs of the work the layer must do: ``assignments·2·d·f·(3|2)`` (``assignments = T·k``)."""
    _check_dims(d, f)
    if assignments < 0:
        raise ValueError(f"assignments must be >= 0, got {assignments}")
    return assignments * 2 * d * f * matmuls_per_mlp(glu)


def padded_executed_flops(num_experts: int, cap: int, num_groups: int, d: int, f: int, glu: bool) -> int:
    """Forward FLOPs a capacity-padded layer executes: ``E·C·groups·2·d·f·(3|2)`` (every slot, filled or not)."""
    return useful_flops(num_experts * cap * num_groups, d, f, glu)


def blocksparse_executed_flops(
    tokens_per_expert: Sequence[int], block_size: int, d: int, f: int, glu: bool, pad_ffn: bool = True
) -> int:
    """Forward FLOPs of the block-sparse path: ``Σ_e ceil(n_e/B)·B·2·d·f'·(3|2)``.

    ``f' = ceil(f/B)·B`` when ``pad_ffn`` (the sparse blocks cover whole ``B×B`` tiles), else ``f``.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    rows = sum(math.ceil(n / block_size) * block_size for n in tokens_per_expert)
    f_exec = math.ceil(f / block_size) * block_size if pad_ffn else f
    return useful_flops(rows, d, f_exec, glu)


def backward_flops(forward: int) -> int:
    """Backward = 2× forward (gradient w.r.t. the inputs and w.r.t. the weights)."""
    return 2 * forward


def fwd_bwd_flops(forward: int) -> int:
    """Forward + backward = 3× forward."""
    return forward + backward_flops(forward)


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float, num_groups: int = 1) -> int:
    """Slots per expert per group of a padded layer: ``ceil(cf · (T/groups) · k / E)`` (``moe_mlp``'s rule)."""
    if num_groups < 1 or num_tokens % num_groups:
        raise ValueError(f"num_groups must be >= 1 and divide the {num_tokens} tokens, got {num_groups}")
    if capacity_factor < 0:
        raise ValueError(f"capacity_factor must be >= 0, got {capacity_factor}")
    return math.ceil(capacity_factor * (num_tokens // num_groups) * top_k / num_experts)


def dropped_assignments(counts_per_group: Sequence[Sequence[int]], cap: int) -> int:
    """Assignments beyond ``cap`` per expert, summed over groups (``counts_per_group[g][e]``)."""
    return sum(max(0, n - cap) for group in counts_per_group for n in group)


def tflops(flops: float, seconds: float | None) -> float | None:
    """TFLOP/s, or None when the time is unknown or not positive."""
    if seconds is None or not seconds > 0:
        return None
    return flops / seconds / 1e12
