"""Routing plan: sort token→expert assignments by expert; the block-sparse topology follows from its offsets.

This module is the specification of the routing metadata, its PyTorch implementation (the CPU path and
the reference), and the dispatcher that picks one of three implementations for CUDA tensors:

- ``"ext"``: the compiled extension ``_routing_cuda`` (``csrc/``, built when nvcc was found at install time);
- ``"cupy"``: the same ``csrc/routing.h`` compiled at first use with NVRTC through cupy (``_jit``), when no
  extension is built and cupy is installed (``pip install "blocksparse_moe[cupy]"``);
- ``"torch"``: ``plan_buffers_torch`` below.

``auto`` tries them in that order; ``BSM_ROUTING=ext|cupy|torch`` (or ``plan_routing(..., backend=)``) forces one
and raises when it is unavailable. CPU tensors always use the PyTorch routing (the C++ is also built for the host
and compared with it in the tests). ``python -m blocksparse_moe.info`` prints the choice and why.

The buffers of a plan are listed once, in ``PLAN_BUFFERS`` (the plan's outputs) and ``SCRATCH_BUFFERS`` (the
C++ counting sort's scratch), name → shape; ``RoutingPlan``'s tensor fields, the C++ (``csrc/routing.h``'s
``RoutingBuffers``) and the backends (``_ext`` and ``_jit``, which fill raw buffers by these names) all follow that
table. The topology has no buffers of its own (see the end of this docstring).

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
- ``padded_row_assignment[R·B]`` / ``padded_assignment_row[T, k]``: the same for the block-padded
  layout; padding rows hold ``-1``.

Every buffer is sized from upper bounds known from shapes, so nothing here synchronizes with the device:
``max_block_rows = min(A, (A + E·(B-1)) // B)`` bounds ``Σ_e ceil(n_e / B)``.

Topology of the block-sparse matrix ``S`` of shape ``[max_block_rows·B, E·nb·B]`` (``nb = ceil(F / B)``
column blocks per expert): it is block-diagonal by expert. Block row ``r`` belongs to the expert ``e`` whose padded
rows contain it (``padded_offsets[e] <= r·B < padded_offsets[e+1]``) and holds the ``nb`` blocks of columns
``e·nb .. e·nb+nb-1``, stored in slots ``r·nb .. r·nb+nb-1`` of the block data ``[nnz_max, B, B]``; block
column ``c = e·nb + j`` holds the blocks ``r·nb + j`` of expert e's block rows. ``nnz_max = max_block_rows·nb``
slots; the used ones, ``nnz = padded_offsets[E] / B · nb``, come first. So ``padded_offsets`` and the sizes are the
whole topology (``Topology``): every index follows in closed form, and the kernels compute it instead of loading
it; no backend computes anything else for it.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

from .config import check_enabled

__all__ = [
    "PLAN_BUFFERS",
    "ROUTING_BACKENDS",
    "SCRATCH_BUFFERS",
    "PlanSizes",
    "RoutingPlan",
    "Topology",
    "plan_routing",
    "build_topology",
    "max_block_rows",
    "routing_backend",
]

INDEX_DTYPE = torch.int32

# The one table of routing buffers (all int32): name -> shape. Plan buffers are shaped from (T, k, E, B, R), the
# scratch of the C++ counting sort from (A, E, num_tiles, num_groups) (see PlanSizes). The order is the order of
# RoutingPlan's tensor fields and of csrc/routing.h's RoutingBuffers (the tests check both).
PLAN_BUFFERS: dict[str, Callable[[int, int, int, int, int], tuple[int, ...]]] = {
    "counts": lambda T, k, E, B, R: (E + 1,),
    "offsets": lambda T, k, E, B, R: (E + 1,),
    "padded_offsets": lambda T, k, E, B, R: (E + 1,),
    "row_assignment": lambda T, k, E, B, R: (T * k,),
    "assignment_row": lambda T, k, E, B, R: (T, k),
    "padded_row_assignment": lambda T, k, E, B, R: (R * B,),
    "padded_assignment_row": lambda T, k, E, B, R: (T, k),
}
SCRATCH_BUFFERS: dict[str, Callable[[int, int, int, int], tuple[int, ...]]] = {
    "keys": lambda A, E, tiles, groups: (A,),  # sort key of each assignment (E when invalid)
    "rank": lambda A, E, tiles, groups: (A,),  # rank among the earlier assignments of its tile with the same key
    "tile_counts": lambda A, E, tiles, groups: (tiles * (E + 1),),  # per tile and key
    "group_counts": lambda A, E, tiles, groups: (groups * (E + 1),),  # per group of tiles and key
}
ROUTING_BACKENDS = ("auto", "ext", "cupy", "torch")


def max_block_rows(num_assignments: int, num_experts: int, block_size: int) -> int:
    """Upper bound of ``Σ_e ceil(n_e / B)`` over all routings of ``num_assignments`` onto ``num_experts``."""
    return min(num_assignments, (num_assignments + num_experts * (block_size - 1)) // block_size)


@dataclass(frozen=True)
class PlanSizes:
    """The sizes every buffer of one plan follows from (validated by ``plan_routing``)."""

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
        """Shape of every scratch buffer of the C++ backends, by name, in table order."""
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
    assignment_row: torch.Tensor  # [T, k] assignment -> sorted row, -1 for invalid
    padded_row_assignment: torch.Tensor  # [max_block_rows·B] padded row -> assignment, -1 for padding
    padded_assignment_row: torch.Tensor  # [T, k] assignment -> padded row, -1 for invalid
    topology: Topology | None = None

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

    @property
    def max_padded_rows(self) -> int:
        return self.max_block_rows * self.block_size

    @classmethod
    def from_buffers(cls, sizes: PlanSizes, buffers: dict[str, torch.Tensor], ffn_size: int | None) -> RoutingPlan:
        """Wrap the buffers one backend filled (``sizes.shapes()`` by name) in a plan."""
        topology = None
        if ffn_size is not None:
            topology = build_topology(
                buffers["padded_offsets"], sizes.block_size, sizes.num_experts, ffn_size, sizes.max_block_rows
            )
        return cls(
            num_tokens=sizes.num_tokens,
            top_k=sizes.top_k,
            num_experts=sizes.num_experts,
            block_size=sizes.block_size,
            **{name: buffers[name] for name in PLAN_BUFFERS},
            topology=topology,
        )


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


def plan_sizes(top_k_index: torch.Tensor, num_experts: int, block_size: int, ffn_size: int | None) -> PlanSizes:
    """The sizes of the plan of ``top_k_index`` (validated)."""
    _validate(top_k_index, num_experts, block_size, ffn_size)
    T, k = top_k_index.shape
    return PlanSizes(T, k, num_experts, block_size)


def plan_routing(
    top_k_index: torch.Tensor,
    num_experts: int,
    block_size: int = 128,
    ffn_size: int | None = None,
    *,
    check: bool | None = None,
    backend: str | None = None,
) -> RoutingPlan:
    """Build the routing plan (and, when ``ffn_size`` is given, its block-sparse topology: ``padded_offsets``).

    Args:
        top_k_index: ``[T, k]`` int32/int64 expert ids; never modified.
        num_experts: E.
        block_size: B, the block-padding granularity (and the sparse block size).
        ffn_size: F, the expert width; sets ``plan.topology`` (``ceil(F / B)`` column blocks per expert, indexed
            in closed form from ``padded_offsets``: nothing more is computed).
        check: raise ``ValueError`` on expert ids outside ``[0, E)``. Default: always on CPU; on CUDA only
            with ``BSM_CHECK=1`` (it costs one host sync); never while ``torch.compile`` traces (a data-dependent
            raise would break the graph). Unchecked invalid ids are excluded from the plan.
        backend: the implementation for CUDA tensors, one of ``ROUTING_BACKENDS`` (default: env ``BSM_ROUTING``,
            else ``"auto"``); see ``routing_backend``. All give the same plan, element for element.
    """
    sizes = plan_sizes(top_k_index, num_experts, block_size, ffn_size)
    device = top_k_index.device
    choice, _ = routing_backend(device, backend)
    if choice == "ext":
        from . import _ext

        buffers = _ext.plan_buffers_cuda(top_k_index, sizes)
    elif choice == "cupy":
        from . import _jit

        buffers = _jit.plan_buffers(top_k_index, sizes)
    else:
        buffers = plan_buffers_torch(top_k_index, sizes)
    plan = RoutingPlan.from_buffers(sizes, buffers, ffn_size)
    if check_enabled(device, check):
        raise_on_invalid(plan, top_k_index)
    return plan


def routing_backend(device: torch.device, backend: str | None = None) -> tuple[str, str]:
    """The routing implementation for tensors on ``device``, and why: ``("ext" | "cupy" | "torch", reason)``.

    ``backend=None`` reads ``BSM_ROUTING`` (default ``"auto"``). CPU (and meta) tensors always use ``"torch"``
    (an explicit ``backend="ext"`` or ``"cupy"`` for them is an error). On CUDA, ``auto`` picks the compiled
    extension, else the cupy JIT, else PyTorch (and PyTorch while ``torch.compile`` traces); a forced backend
    that is unavailable raises. A cupy JIT that is installed but fails (NVRTC missing, compile error, ...) gives
    one warning and the PyTorch routing.
    """
    requested = backend if backend is not None else os.environ.get("BSM_ROUTING", "auto")
    source = f"backend={requested!r}" if backend is not None else f"BSM_ROUTING={requested}"
    if requested not in ROUTING_BACKENDS:
        raise ValueError(f"routing backend must be one of {ROUTING_BACKENDS}, got {source}")
    device = torch.device(device)
    if device.type != "cuda":
        if backend is not None and requested in ("ext", "cupy"):
            raise ValueError(f"the {requested!r} routing backend needs a CUDA tensor, got a tensor on {device}")
        return "torch", f"{device.type} tensors always use the PyTorch routing"
    if requested == "torch":
        return "torch", f"forced by {source}"
    if requested == "ext":
        from . import _ext

        _ext.cuda_module()  # raises ImportError saying how to build it
        return "ext", f"forced by {source}"
    if requested == "cupy":
        from . import _jit

        try:
            return "cupy", f"forced by {source}; {_jit.prepare(device)}"
        except _jit.JitUnavailable as exc:
            raise RuntimeError(f"{source} but the cupy JIT routing is unavailable: {exc}") from exc
    if torch.compiler.is_compiling():
        return "torch", "torch.compile is tracing: the PyTorch routing traces into the graph"
    return _auto_cuda_backend(device.index if device.index is not None else torch.cuda.current_device())


@cache
def _auto_cuda_backend(device_index: int) -> tuple[str, str]:
    """The automatic choice on one CUDA device, made once per process (so a failure warns once)."""
    from . import _ext, _jit

    if _ext.cuda_available():
        return "ext", "the compiled extension blocksparse_moe._routing_cuda is built"
    try:
        return "cupy", f"no compiled extension; {_jit.prepare(torch.device('cuda', device_index))}"
    except _jit.JitUnavailable as exc:
        reason = f"no compiled extension and no cupy JIT ({exc})"
        if not exc.quiet:
            warnings.warn(
                f"blocksparse_moe: the cupy JIT routing is unavailable, using the PyTorch routing: {exc}",
                RuntimeWarning,
                stacklevel=4,
            )
        return "torch", reason


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


def plan_buffers_torch(top_k_index: torch.Tensor, sizes: PlanSizes) -> dict[str, torch.Tensor]:
    """The PyTorch implementation (the specification): every buffer of ``sizes.shapes()``, by name."""
    T, k = top_k_index.shape
    E, B = sizes.num_experts, sizes.block_size
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
    sorted_row = torch.empty_like(position).scatter_(0, sorted_assignment, position)  # inverse permutation

    sorted_valid = sorted_key < E
    row_assignment = torch.where(sorted_valid, sorted_assignment, -1)
    assignment_row = torch.where(valid, sorted_row, -1)

    # Padded layout: sorted row i of expert e lands at padded_offsets[e] + (i - offsets[e]).
    safe_key = sorted_key.clamp(max=E - 1)
    padded_sorted_row = padded_offsets[safe_key] + position - offsets[safe_key]
    padded_sorted_row = torch.where(sorted_valid, padded_sorted_row, -1)
    R = sizes.max_block_rows
    P = R * B
    # Invalid rows scatter into a dummy slot P (no boolean indexing: that would sync).
    padded_row_assignment = torch.full((P + 1,), -1, dtype=torch.int64, device=device)
    padded_row_assignment.scatter_(0, torch.where(sorted_valid, padded_sorted_row, P), row_assignment)
    padded_row_assignment = padded_row_assignment[:P]
    padded_assignment_row = torch.empty_like(position).scatter_(0, sorted_assignment, padded_sorted_row)

    buffers = {
        "counts": counts.to(i32),
        "offsets": offsets.to(i32),
        "padded_offsets": padded_offsets.to(i32),
        "row_assignment": row_assignment.to(i32),
        "assignment_row": assignment_row.to(i32).view(T, k),
        "padded_row_assignment": padded_row_assignment.to(i32),
        "padded_assignment_row": padded_assignment_row.to(i32).view(T, k),
    }
    return buffers


def _plan_routing_torch(
    top_k_index: torch.Tensor, num_experts: int, block_size: int, ffn_size: int | None
) -> RoutingPlan:
    """``plan_routing`` through the PyTorch implementation, whatever the device (the reference of the tests)."""
    sizes = plan_sizes(top_k_index, num_experts, block_size, ffn_size)
    return RoutingPlan.from_buffers(sizes, plan_buffers_torch(top_k_index, sizes), ffn_size)


def build_topology(
    padded_offsets: torch.Tensor, block_size: int, num_experts: int, ffn_size: int, max_rows: int
) -> Topology:
    """The topology of ``padded_offsets[E+1]`` (device tensor): nothing to compute, no sync."""
    return Topology(block_size, num_experts, ffn_size, max_rows, padded_offsets.to(INDEX_DTYPE))
