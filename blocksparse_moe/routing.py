"""Routing plan: sort token→expert assignments by expert and build the block-sparse topology.

This module is the specification of the routing metadata, its PyTorch implementation (the CPU path and
the reference), and the dispatcher that uses the compiled CUDA extension on CUDA tensors when it is built
(``csrc/``; the same C++ is also built for the host and compared with this file in the tests).

Glossary (T tokens, k choices per token, E experts, B block size, A = T·k assignments):

- assignment ``a`` in ``[0, A)``: the choice ``top_k_index.flatten()[a]``; token ``a // k``, rank ``a % k``.
- ``tokens_per_expert[E]``: how many valid assignments each expert received (histogram).
- ``invalid_count[]``: assignments whose expert id is outside ``[0, E)``; they are excluded from the plan
  (sorted last, mapped to row ``-1``) and turned into a ``ValueError`` when checking is on.
- ``offsets[E+1]``: exclusive scan of ``tokens_per_expert``; expert ``e`` owns sorted rows
  ``offsets[e]:offsets[e+1]``.
- ``padded_offsets[E+1]``: the same with each expert rounded up to a multiple of ``B``.
- ``sorted_assignment[A]``: stable sort of the assignments by expert id (invalid ids last).
- ``inverse[A]``: ``inverse[sorted_assignment[i]] = i``.
- ``row_assignment[A]`` / ``assignment_row[T, k]``: the unpadded sorted layout as the two maps the
  gather/scatter kernels use (``-1`` = no assignment / invalid).
- ``padded_row_assignment[max_padded_rows]`` / ``padded_assignment_row[T, k]``: the same for the block-padded
  layout; padding rows hold ``-1``.

Every buffer is sized from upper bounds known from shapes, so nothing here synchronizes with the device:
``max_block_rows = min(A, (A + E·(B-1)) // B)`` bounds ``Σ_e ceil(n_e / B)``.

Topology of the block-sparse matrix ``S`` of shape ``[max_block_rows·B, E·nb·B]`` (``nb = ceil(F / B)``
column blocks per expert): it is block-diagonal by expert. Block row ``r`` belongs to the expert ``e`` whose padded
rows contain it (``padded_offsets[e] <= r·B < padded_offsets[e+1]``) and holds the ``nb`` blocks of columns
``e·nb .. e·nb+nb-1``, stored in slots ``r·nb .. r·nb+nb-1`` of the block data ``[nnz_max, B, B]``; block
column ``c = e·nb + j`` holds the blocks ``r·nb + j`` of expert e's block rows. ``nnz_max = max_block_rows·nb``
slots; the used ones, ``nnz = padded_offsets[E] / B · nb``, come first. So ``padded_offsets`` and the sizes are the
whole topology: every index follows in closed form, and the kernels compute it instead of loading it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._backend import check_enabled

__all__ = ["RoutingPlan", "Topology", "plan_routing", "build_topology", "max_block_rows"]

INDEX_DTYPE = torch.int32


def max_block_rows(num_assignments: int, num_experts: int, block_size: int) -> int:
    """Upper bound of ``Σ_e ceil(n_e / B)`` over all routings of ``num_assignments`` onto ``num_experts``."""
    return min(num_assignments, (num_assignments + num_experts * (block_size - 1)) // block_size)


@dataclass(frozen=True)
class Topology:
    """Block-sparse topology of ``S [max_block_rows·B, E·nb·B]`` for expert MLPs of width ``ffn_size``: the
    block-diagonal layout of the module docstring, given by ``padded_offsets``."""

    block_size: int
    num_experts: int
    ffn_size: int  # F: real columns per expert; the last column block of an expert may be partial
    max_block_rows: int
    padded_offsets: torch.Tensor  # [E+1] int32, multiples of block_size

    @property
    def blocks_per_expert(self) -> int:
        """nb = ceil(F / B)."""
        return -(-self.ffn_size // self.block_size)

    @property
    def nnz_max(self) -> int:
        return self.max_block_rows * self.blocks_per_expert

    @property
    def num_rows(self) -> int:
        """Rows of the (upper-bound) sparse matrix: ``max_block_rows · B``."""
        return self.max_block_rows * self.block_size

    @property
    def nnz(self) -> torch.Tensor:
        """Number of used blocks, a device scalar (no sync)."""
        return self.padded_offsets[-1] // self.block_size * self.blocks_per_expert


@dataclass(frozen=True)
class RoutingPlan:
    """Everything the dropless kernels need to know about one routing. All tensors int32, on one device."""

    num_tokens: int
    top_k: int
    num_experts: int
    block_size: int
    tokens_per_expert: torch.Tensor  # [E]
    invalid_count: torch.Tensor  # [] assignments with an expert id outside [0, E)
    offsets: torch.Tensor  # [E+1]
    padded_offsets: torch.Tensor  # [E+1]
    sorted_assignment: torch.Tensor  # [A]
    inverse: torch.Tensor  # [A]
    row_assignment: torch.Tensor  # [A]  sorted row -> assignment, -1 for invalid
    assignment_row: torch.Tensor  # [T, k] assignment -> sorted row, -1 for invalid
    padded_row_assignment: torch.Tensor  # [max_block_rows·B] padded row -> assignment, -1 for padding
    padded_assignment_row: torch.Tensor  # [T, k] assignment -> padded row, -1 for invalid
    topology: Topology | None = None

    @property
    def num_assignments(self) -> int:
        return self.num_tokens * self.top_k

    @property
    def max_block_rows(self) -> int:
        return max_block_rows(self.num_assignments, self.num_experts, self.block_size)

    @property
    def max_padded_rows(self) -> int:
        return self.max_block_rows * self.block_size


def _validate(top_k_index: torch.Tensor, num_experts: int, block_size: int, ffn_size: int | None) -> None:
    if not isinstance(top_k_index, torch.Tensor):
        raise TypeError(f"top_k_index must be a torch.Tensor, got {type(top_k_index).__name__}")
    if top_k_index.dim() != 2:
        raise ValueError(f"top_k_index must be 2-D [tokens, top_k], got shape {tuple(top_k_index.shape)}")
    if top_k_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"top_k_index must be int32 or int64, got {top_k_index.dtype}")
    if top_k_index.shape[1] < 1:
        raise ValueError(f"top_k_index must have top_k >= 1 columns, got shape {tuple(top_k_index.shape)}")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if ffn_size is not None and (not isinstance(ffn_size, int) or ffn_size < 1):
        raise ValueError(f"ffn_size must be a positive int or None, got {ffn_size!r}")
    if top_k_index.numel() >= 2**31 - 1:
        raise ValueError(f"at most 2**31 - 2 assignments are supported (int32 indices), got {top_k_index.numel()}")


def plan_routing(
    top_k_index: torch.Tensor,
    num_experts: int,
    block_size: int = 128,
    ffn_size: int | None = None,
    *,
    check: bool | None = None,
    use_extension: bool | None = None,
) -> RoutingPlan:
    """Build the routing plan (and, when ``ffn_size`` is given, the block-sparse topology).

    Args:
        top_k_index: ``[T, k]`` int32/int64 expert ids; never modified.
        num_experts: E.
        block_size: B, the block-padding granularity (and the sparse block size).
        ffn_size: F, the expert width; builds ``plan.topology`` with ``ceil(F / B)`` blocks per expert.
        check: raise ``ValueError`` on expert ids outside ``[0, E)``. Default: always on CPU; on CUDA only
            with ``BSM_CHECK=1`` (it costs one host sync); never while ``torch.compile`` traces (a data-dependent
            raise would break the graph). Unchecked invalid ids are excluded from the plan.
        use_extension: on CUDA, use the compiled routing extension (default: when it is built).
    """
    _validate(top_k_index, num_experts, block_size, ffn_size)
    device = top_k_index.device
    if device.type == "cuda" and use_extension is not False:
        from . import _ext

        if _ext.cuda_available() or use_extension:
            plan = _ext.plan_routing_cuda(top_k_index, num_experts, block_size, ffn_size)
        else:
            plan = _plan_routing_torch(top_k_index, num_experts, block_size, ffn_size)
    else:
        plan = _plan_routing_torch(top_k_index, num_experts, block_size, ffn_size)
    if check_enabled(device, check) and not torch.compiler.is_compiling():
        raise_on_invalid(plan, top_k_index)
    return plan


def raise_on_invalid(plan: RoutingPlan, top_k_index: torch.Tensor) -> None:
    """Turn the device-side invalid counter into a ``ValueError`` (one host sync on GPU)."""
    invalid = int(plan.invalid_count)
    if invalid:
        flat = top_k_index.reshape(-1)
        bad = flat[(flat < 0) | (flat >= plan.num_experts)][:5].tolist()
        raise ValueError(
            f"top_k_index must hold expert ids in [0, {plan.num_experts}), got {invalid} assignment(s) "
            f"outside that range, e.g. {bad}"
        )


def _plan_routing_torch(
    top_k_index: torch.Tensor, num_experts: int, block_size: int, ffn_size: int | None
) -> RoutingPlan:
    T, k = top_k_index.shape
    E, B = num_experts, block_size
    A = T * k
    device = top_k_index.device
    i32 = INDEX_DTYPE

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
    inverse = torch.empty_like(position).scatter_(0, sorted_assignment, position)

    sorted_valid = sorted_key < E
    row_assignment = torch.where(sorted_valid, sorted_assignment, -1)
    assignment_row = torch.where(valid, inverse, -1)

    # Padded layout: sorted row i of expert e lands at padded_offsets[e] + (i - offsets[e]).
    safe_key = sorted_key.clamp(max=E - 1)
    padded_sorted_row = padded_offsets[safe_key] + position - offsets[safe_key]
    padded_sorted_row = torch.where(sorted_valid, padded_sorted_row, -1)
    R = max_block_rows(A, E, B)
    P = R * B
    # Invalid rows scatter into a dummy slot P (no boolean indexing: that would sync).
    padded_row_assignment = torch.full((P + 1,), -1, dtype=torch.int64, device=device)
    padded_row_assignment.scatter_(0, torch.where(sorted_valid, padded_sorted_row, P), row_assignment)
    padded_row_assignment = padded_row_assignment[:P]
    padded_assignment_row = torch.empty_like(position).scatter_(0, sorted_assignment, padded_sorted_row)

    topology = None
    if ffn_size is not None:
        topology = build_topology(padded_offsets.to(i32), B, E, ffn_size, R)

    return RoutingPlan(
        num_tokens=T,
        top_k=k,
        num_experts=E,
        block_size=B,
        tokens_per_expert=counts[:E].to(i32),
        invalid_count=counts[E].to(i32),
        offsets=offsets.to(i32),
        padded_offsets=padded_offsets.to(i32),
        sorted_assignment=sorted_assignment.to(i32),
        inverse=inverse.to(i32),
        row_assignment=row_assignment.to(i32),
        assignment_row=assignment_row.to(i32).view(T, k),
        padded_row_assignment=padded_row_assignment.to(i32),
        padded_assignment_row=padded_assignment_row.to(i32).view(T, k),
        topology=topology,
    )


def build_topology(
    padded_offsets: torch.Tensor, block_size: int, num_experts: int, ffn_size: int, max_rows: int
) -> Topology:
    """The topology of ``padded_offsets[E+1]`` (device tensor): nothing to compute, no sync."""
    return Topology(block_size, num_experts, ffn_size, max_rows, padded_offsets.to(INDEX_DTYPE))
