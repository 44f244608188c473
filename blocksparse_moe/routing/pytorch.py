"""The PyTorch implementation of the routing plan (``implementation="torch"``): the CPU path, the reference of the
tests, and the CUDA path when no other implementation is available or while ``torch.compile`` traces. Every buffer
of ``spec.PlanSizes.shapes()``, computed with no host synchronization."""

from __future__ import annotations

import torch

from .spec import INDEX_DTYPE, PlanSizes

__all__ = ["plan_buffers"]


def plan_buffers(top_k_index: torch.Tensor, sizes: PlanSizes) -> dict[str, torch.Tensor]:
    """Every buffer of ``sizes.shapes()``, by name (the specification the C++ implementations match)."""
    T, k = top_k_index.shape
    E, B = sizes.num_experts, sizes.block_size
    A = T * k
    device = top_k_index.device

    flat = top_k_index.reshape(-1).long()
    valid = (flat >= 0) & (flat < E)
    key = torch.where(valid, flat, E)  # invalid ids sort last, into bin E

    counts = torch.zeros(E + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    padded_counts = (counts[:E] + B - 1) // B * B
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    offsets = torch.cat([zero, counts[:E].cumsum(0)])
    padded_offsets = torch.cat([zero, padded_counts.cumsum(0)])

    sorted_key, sorted_assignment = torch.sort(key, stable=True)
    position = torch.arange(A, dtype=torch.int64, device=device)
    sorted_row = torch.empty_like(position).scatter_(0, sorted_assignment, position)  # inverse permutation

    sorted_valid = sorted_key < E
    row_assignment = torch.where(sorted_valid, sorted_assignment, -1)
    row_token = torch.where(sorted_valid, sorted_assignment // k, -1)
    assignment_row = torch.where(valid, sorted_row, -1)

    # Padded layout: sorted row i of expert e lands at padded_offsets[e] + (i - offsets[e]).
    safe_key = sorted_key.clamp(max=E - 1)
    padded_sorted_row = padded_offsets[safe_key] + position - offsets[safe_key]
    padded_sorted_row = torch.where(sorted_valid, padded_sorted_row, -1)
    P = sizes.max_block_rows * B
    # Invalid rows scatter into a dummy slot P (no boolean indexing: that would sync).
    target = torch.where(sorted_valid, padded_sorted_row, P)
    padded_row_assignment = torch.full((P + 1,), -1, dtype=torch.int64, device=device).scatter_(
        0, target, row_assignment
    )
    padded_row_token = torch.full((P + 1,), -1, dtype=torch.int64, device=device).scatter_(0, target, row_token)
    padded_assignment_row = torch.empty_like(position).scatter_(0, sorted_assignment, padded_sorted_row)

    buffers = {
        "counts": counts,
        "offsets": offsets,
        "padded_offsets": padded_offsets,
        "row_assignment": row_assignment,
        "row_token": row_token,
        "assignment_row": assignment_row.view(T, k),
        "padded_row_assignment": padded_row_assignment[:P],
        "padded_row_token": padded_row_token[:P],
        "padded_assignment_row": padded_assignment_row.view(T, k),
    }
    return {name: buffers[name].to(INDEX_DTYPE) for name in sizes.shapes()}
