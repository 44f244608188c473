"""The routing plan's specification: the one table of buffers, the sizes they follow from, the plan and its
block-sparse topology, and their allocation. A leaf: it imports nothing of the routing implementations.

Glossary (T tokens, k choices per token, E experts, B block size, A = T·k assignments, R = max_block_rows):

- assignment ``a`` in ``[0, A)``: the choice ``top_k_index.flatten()[a]``; token ``a // k``, rank ``a % k``.
- ``counts[E+1]``: how many valid assignments each expert received (histogram), then, at ``counts[E]``, the
  assignments whose expert id is outside ``[0, E)``. Read as ``tokens_per_expert[E]`` and ``invalid_count[]``.
  Invalid assignments are excluded from the plan (sorted last, mapped to row ``-1``) and turned into a
  ``ValueError`` when checking is on.
- ``offsets[E+1]``: exclusive scan of ``tokens_per_expert``; expert ``e`` owns sorted rows
  ``offsets[e]:offsets[e+1]``. Rows are in stable order by expert, then by assignment index.
- ``padded_offsets[E+1]``: the same with each expert rounded up to a multiple of ``B``.
- ``row_assignment[A]`` / ``assignment_row[T, k]``: the unpadded sorted layout as the two maps the
  gather/scatter kernels use (``-1`` = no assignment / invalid); mutually inverse on valid assignments.
- ``row_token[A]``: the token of each sorted row (``row_assignment // k``), ``-1`` where the row has no assignment:
  the row a gather reads x from.
- ``padded_row_assignment[R·B]`` / ``padded_row_token[R·B]`` / ``padded_assignment_row[T, k]``: the same for the
  block-padded layout; padding rows hold ``-1``.

``block_size`` has one meaning: the padding granularity of each expert's rows. ``B = 1`` is the unpadded layout
(the padded buffers then equal the unpadded ones); any ``B`` is a valid plan, and a block-sparse ``Topology`` needs
``B`` a power of two.

Every buffer is sized from upper bounds known from shapes, so nothing here synchronizes with the device:
``max_block_rows = min(A, (A + E·(B-1)) // B)`` bounds ``Σ_e ceil(n_e / B)``.

Topology of the block-sparse matrix ``S`` of shape ``[max_block_rows·B, E·nb·B]`` (``nb = ceil(F / B)``
column blocks per expert): it is block-diagonal by expert. Block row ``r`` belongs to the expert ``e`` whose padded
rows contain it (``padded_offsets[e] <= r·B < padded_offsets[e+1]``) and holds the ``nb`` blocks of columns
``e·nb .. e·nb+nb-1``, stored in slots ``r·nb .. r·nb+nb-1`` of the block data ``[nnz_max, B, B]``; block
column ``c = e·nb + j`` holds the blocks ``r·nb + j`` of expert e's block rows. ``nnz_max = max_block_rows·nb``
slots; the used ones, ``nnz = padded_offsets[E] / B · nb``, come first. So ``padded_offsets`` and the sizes are the
whole topology (``RoutingPlan.topology(ffn_size)``): every index follows in closed form, and the kernels compute it
instead of loading it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..validation import positive_int

__all__ = [
    "INDEX_DTYPE",
    "PLAN_BUFFERS",
    "SCRATCH_BUFFERS",
    "PlanSizes",
    "RoutingPlan",
    "Topology",
    "allocate",
    "max_block_rows",
]

INDEX_DTYPE = torch.int32

# The one table of routing buffers (all int32): name -> shape; csrc/routing.h's BSM_ROUTING_BUFFERS is the same
# table (kind `plan`, then `scratch`), in the same order (a test reads both). Plan buffers are shaped from
# (T, k, E, B, R), the scratch of the C++ counting sort from (A, E, num_tiles, num_groups) (see PlanSizes). The
# order of PLAN_BUFFERS is the order of RoutingPlan's tensor fields.
PLAN_BUFFERS: dict[str, Callable[[int, int, int, int, int], tuple[int, ...]]] = {
    "counts": lambda T, k, E, B, R: (E + 1,),
    "offsets": lambda T, k, E, B, R: (E + 1,),
    "padded_offsets": lambda T, k, E, B, R: (E + 1,),
    "row_assignment": lambda T, k, E, B, R: (T * k,),
    "row_token": lambda T, k, E, B, R: (T * k,),
    "assignment_row": lambda T, k, E, B, R: (T, k),
    "padded_row_assignment": lambda T, k, E, B, R: (R * B,),
    "padded_row_token": lambda T, k, E, B, R: (R * B,),
    "padded_assignment_row": lambda T, k, E, B, R: (T, k),
}
SCRATCH_BUFFERS: dict[str, Callable[[int, int, int, int], tuple[int, ...]]] = {
    "keys": lambda A, E, tiles, groups: (A,),  # sort key of each assignment (E when invalid)
    "rank": lambda A, E, tiles, groups: (A,),  # rank among the earlier assignments of its tile with the same key
    "tile_counts": lambda A, E, tiles, groups: (tiles * (E + 1),),  # per tile and key
    "group_counts": lambda A, E, tiles, groups: (groups * (E + 1),),  # per group of tiles and key
}


def max_block_rows(num_assignments: int, num_experts: int, block_size: int) -> int:
    """Upper bound of ``Σ_e ceil(n_e / B)`` over all routings of ``num_assignments`` onto ``num_experts``."""
    return min(num_assignments, (num_assignments + num_experts * (block_size - 1)) // block_size)


@dataclass(frozen=True)
class PlanSizes:
    """The sizes every buffer of one plan follows from (validated by ``routing.plan_routing``)."""

    num_tokens: int  # T
    top_k: int  # k
    num_experts: int  # E
    block_size: int  # B

    @property
    def num_assignments(self) -> int:
        return self.num_tokens * self.top_k

    @property
    def max_block_rows(self) -> int:
        return max_block_rows(self.num_assignments, self.num_experts, self.block_size)

    # The layout of the C++ counting sort (csrc/routing.h, sort_layout): tiles of 256·ceil((E+1)/1024)
    # assignments, groups of ceil(sqrt(num_tiles)) tiles.
    @property
    def tile_size(self) -> int:
        return 256 * -(-(self.num_experts + 1) // 1024)

    @property
    def num_tiles(self) -> int:
        return -(-self.num_assignments // self.tile_size)

    @property
    def tiles_per_group(self) -> int:
        return math.isqrt(self.num_tiles - 1) + 1 if self.num_tiles else 1  # ceil(sqrt(num_tiles)), at least 1

    @property
    def num_groups(self) -> int:
        return -(-self.num_tiles // self.tiles_per_group)

    def scratch_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every scratch buffer of the C++ implementations, by name, in table order."""
        A, E, tiles, groups = self.num_assignments, self.num_experts, self.num_tiles, self.num_groups
        return {name: shape(A, E, tiles, groups) for name, shape in SCRATCH_BUFFERS.items()}

    @staticmethod
    def buffer_names() -> tuple[str, ...]:
        """Every buffer name of the table, in order (what csrc/routing.h's RoutingBuffers holds)."""
        return (*PLAN_BUFFERS, *SCRATCH_BUFFERS)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every buffer the plan fills, by name, in table order."""
        T, k, E, B, R = self.num_tokens, self.top_k, self.num_experts, self.block_size, self.max_block_rows
        return {name: shape(T, k, E, B, R) for name, shape in PLAN_BUFFERS.items()}


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
    """Everything the dropless kernels need to know about one routing. All tensors int32, on one device.

    The tensor fields are the ``PLAN_BUFFERS``, in that order."""

    num_tokens: int
    top_k: int
    num_experts: int
    block_size: int
    counts: torch.Tensor  # [E+1]: tokens per expert, then the invalid count
    offsets: torch.Tensor  # [E+1]
    padded_offsets: torch.Tensor  # [E+1]
    row_assignment: torch.Tensor  # [A]  sorted row -> assignment, -1 for invalid
    row_token: torch.Tensor  # [A]  sorted row -> token (row_assignment // k), -1 for invalid
    assignment_row: torch.Tensor  # [T, k] assignment -> sorted row, -1 for invalid
    padded_row_assignment: torch.Tensor  # [max_block_rows·B] padded row -> assignment, -1 for padding
    padded_row_token: torch.Tensor  # [max_block_rows·B] padded row -> token, -1 for padding
    padded_assignment_row: torch.Tensor  # [T, k] assignment -> padded row, -1 for invalid

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        """``[E]`` valid assignments per expert (a view of ``counts``)."""
        return self.counts[: self.num_experts]

    @property
    def invalid_count(self) -> torch.Tensor:
        """``[]`` assignments with an expert id outside ``[0, E)`` (a view of ``counts``)."""
        return self.counts[self.num_experts]

    @property
    def num_assignments(self) -> int:
        return self.num_tokens * self.top_k

    @property
    def max_block_rows(self) -> int:
        return max_block_rows(self.num_assignments, self.num_experts, self.block_size)

    def topology(self, ffn_size: int) -> Topology:
        """The block-sparse topology of this plan for expert MLPs of width ``ffn_size`` (F): ``ceil(F / B)`` column
        blocks per expert, indexed in closed form from ``padded_offsets`` (nothing is computed, no sync). Needs a
        power-of-two ``block_size`` (the kernels' tiles)."""
        positive_int("ffn_size", ffn_size)
        B = self.block_size
        if B & (B - 1):
            raise ValueError(f"a block-sparse topology needs a power-of-two block_size, got block_size={B}")
        return Topology(B, self.num_experts, ffn_size, self.max_block_rows, self.padded_offsets)

    @classmethod
    def from_buffers(cls, sizes: PlanSizes, buffers: dict[str, torch.Tensor]) -> RoutingPlan:
        """Wrap the buffers one implementation filled (``sizes.shapes()`` by name) in a plan."""
        return cls(
            num_tokens=sizes.num_tokens,
            top_k=sizes.top_k,
            num_experts=sizes.num_experts,
            block_size=sizes.block_size,
            **{name: buffers[name] for name in PLAN_BUFFERS},
        )


ALIGN = 32  # elements (128 bytes): every buffer starts where a vectorized load of it may


def _carve(shapes: dict[str, tuple[int, ...]], device: torch.device) -> dict[str, torch.Tensor]:
    """Uninitialized int32 tensors of ``shapes``, by name: views of one allocation (one allocator call, not one
    per buffer), each starting on an ``ALIGN`` boundary."""
    numels = [math.prod(shape) for shape in shapes.values()]
    starts = [0]
    for n in numels:
        starts.append(starts[-1] + -(-n // ALIGN) * ALIGN)
    block = torch.empty(starts[-1], dtype=INDEX_DTYPE, device=device)
    return {
        name: block[start : start + n].view(shape) for (name, shape), start, n in zip(shapes.items(), starts, numels)
    }


def allocate(sizes: PlanSizes, device: torch.device) -> dict[str, torch.Tensor]:
    """Uninitialized int32 buffers of ``sizes.shapes()`` and ``sizes.scratch_shapes()``, by name, in table order,
    for the C++ implementations. The plan's buffers share one allocation and the scratch another (freed as soon as
    the plan is built)."""
    return {**_carve(sizes.shapes(), device), **_carve(sizes.scratch_shapes(), device)}
