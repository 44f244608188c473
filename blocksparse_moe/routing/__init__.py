"""Routing plan: sort token→expert assignments by expert; the block-sparse topology follows from its offsets.

The package, leaf first (each module imports only those above it; a test checks the import graph is acyclic):

- ``spec``: the specification — the one table of buffers (``PLAN_BUFFERS``, ``SCRATCH_BUFFERS``, the same table as
  ``csrc/routing.h``'s ``BSM_ROUTING_BUFFERS``), ``PlanSizes``, ``RoutingPlan``, ``Topology`` and ``allocate``;
  read its docstring for the meaning of every buffer.
- one module per routing implementation, each filling the buffers of ``spec.PlanSizes`` by name:
  ``pytorch`` (``"torch"``: the CPU path and the reference), ``ext`` (``"ext"``: the compiled extension
  ``_routing_cuda``, built when nvcc was found at install time; also the host build ``_routing_host`` the tests
  compare), ``jit`` (``"cupy"``: the same ``csrc/routing.h`` compiled at first use with NVRTC through cupy, when no
  extension is built and cupy is installed: ``pip install "blocksparse_moe[cupy]"``).
- this module, the dispatcher: ``plan_routing`` validates, picks the implementation (``routing_implementation``),
  fills the buffers and wraps them in a ``RoutingPlan``.

``auto`` tries ext, cupy, torch in that order on CUDA; ``BSM_ROUTING=ext|cupy|torch`` (or
``plan_routing(..., implementation=)``) forces one and raises when it is unavailable. CPU tensors always use the
PyTorch routing. ``python -m blocksparse_moe.info`` prints the choice
and why.
"""

from __future__ import annotations

import warnings
from functools import cache

import torch

from ..config import INDEX_DTYPES, check_enabled, switch
from ..validation import MAX_INDEX, check_dtype, check_expert_ids, check_tensor, positive_int
from . import ext, jit, pytorch
from .spec import INDEX_DTYPE, PLAN_BUFFERS, SCRATCH_BUFFERS, PlanSizes, RoutingPlan, Topology, max_block_rows

__all__ = [
    "INDEX_DTYPE",
    "PLAN_BUFFERS",
    "ROUTING_IMPLEMENTATIONS",
    "SCRATCH_BUFFERS",
    "PlanSizes",
    "RoutingPlan",
    "Topology",
    "max_block_rows",
    "plan_routing",
    "plan_sizes",
    "routing_implementation",
]

ROUTING_IMPLEMENTATIONS = ("auto", "ext", "cupy", "torch")


def plan_sizes(top_k_index: torch.Tensor, num_experts: int, block_size: int) -> PlanSizes:
    """The sizes of the plan of ``top_k_index``, validated (errors name the argument)."""
    check_tensor("top_k_index", top_k_index, "[T, k]", (None, None))
    check_dtype("top_k_index", top_k_index, INDEX_DTYPES)
    if top_k_index.shape[1] < 1:
        raise ValueError(f"top_k_index must have top_k >= 1 columns, got shape {tuple(top_k_index.shape)}")
    positive_int("num_experts", num_experts)
    positive_int("block_size", block_size)
    T, k = top_k_index.shape
    if T * k > MAX_INDEX - 1:  # A + 1 must fit int32 (the first invalid row is offsets[E] <= A)
        raise ValueError(f"top_k_index must have at most 2**31 - 2 elements (int32 indices), got {T * k}")
    return PlanSizes(T, k, num_experts, block_size)


def plan_routing(
    top_k_index: torch.Tensor,
    num_experts: int,
    block_size: int = 128,
    *,
    check: bool | None = None,
    implementation: str | None = None,
) -> RoutingPlan:
    """Build the routing plan of ``top_k_index`` (its block-sparse topology is ``plan.topology(ffn_size)``).

    Args:
        top_k_index: ``[T, k]`` int32/int64 expert ids; never modified.
        num_experts: E.
        block_size: B, the padding granularity of each expert's rows (and the sparse block size of the topology);
            ``1``: unpadded rows.
        check: raise ``ValueError`` on expert ids outside ``[0, E)``. Default: always on CPU; on CUDA only
            with ``BSM_CHECK=1`` (it costs one host sync); never while ``torch.compile`` traces (a data-dependent
            raise would break the graph). Unchecked invalid ids are excluded from the plan.
        implementation: the routing implementation, one of ``ROUTING_IMPLEMENTATIONS`` (default: env
            ``BSM_ROUTING``, else ``"auto"``); see ``routing_implementation``. All give the same plan, element for
            element; ``"torch"`` runs on any device (the reference of the tests).
    """
    sizes = plan_sizes(top_k_index, num_experts, block_size)
    device = top_k_index.device
    choice, _ = routing_implementation(device, implementation)
    if choice == "ext":
        buffers = ext.plan_buffers_cuda(top_k_index, sizes)
    elif choice == "cupy":
        buffers = jit.plan_buffers(top_k_index, sizes)
    else:
        buffers = pytorch.plan_buffers(top_k_index, sizes)
    if check_enabled(device, check):
        check_expert_ids(top_k_index, num_experts)
    return RoutingPlan.from_buffers(sizes, buffers)


def routing_implementation(device: torch.device, implementation: str | None = None) -> tuple[str, str]:
    """The routing implementation for tensors on ``device``, and why: ``("ext" | "cupy" | "torch", reason)``.

    ``implementation=None`` reads the switch ``BSM_ROUTING`` (default ``"auto"``). CPU (and meta) tensors always use
    ``"torch"`` (an explicit ``"ext"`` or ``"cupy"`` for them is an error). On CUDA, ``auto`` picks the compiled
    extension, else the cupy JIT, else PyTorch (and PyTorch while ``torch.compile`` traces); a forced implementation
    that is unavailable raises. A cupy JIT that is installed but fails (NVRTC missing, compile error, ...) gives one
    warning and the PyTorch routing.
    """
    if implementation is None:
        requested, source = switch("BSM_ROUTING"), "BSM_ROUTING"
    elif implementation in ROUTING_IMPLEMENTATIONS:
        requested, source = implementation, "implementation"
    else:
        raise ValueError(f"implementation must be one of {ROUTING_IMPLEMENTATIONS} or None, got {implementation!r}")
    forced = f"forced by {source}={requested!r}"
    device = torch.device(device)
    if device.type != "cuda":
        if implementation in ("ext", "cupy"):  # named in the call (the switch is for CUDA tensors only)
            raise ValueError(f"the {requested!r} routing implementation ({source}) needs a CUDA tensor, got {device}")
        return "torch", f"{device.type} tensors always use the PyTorch routing"
    if requested == "torch":
        return "torch", forced
    if requested == "ext":
        ext.cuda_module()  # raises ImportError saying how to build it
        return "ext", forced
    if requested == "cupy":
        try:
            return "cupy", f"{forced}; {jit.prepare(device)}"
        except jit.JitUnavailable as exc:
            raise RuntimeError(f"{source}={requested!r} but the cupy JIT routing is unavailable: {exc}") from exc
    if torch.compiler.is_compiling():
        return "torch", "torch.compile is tracing: the PyTorch routing traces into the graph"
    return _auto_cuda(device.index if device.index is not None else torch.cuda.current_device())


@cache
def _auto_cuda(device_index: int) -> tuple[str, str]:
    """The automatic choice on one CUDA device, made once per process (so a failure warns once)."""
    if ext.cuda_available():
        return "ext", "the compiled extension blocksparse_moe._routing_cuda is built"
    try:
        return "cupy", f"no compiled extension; {jit.prepare(torch.device('cuda', device_index))}"
    except jit.JitUnavailable as exc:
        reason = f"no compiled extension and no cupy JIT ({exc})"
        if not exc.quiet:
            warnings.warn(
                f"blocksparse_moe: the cupy JIT routing is unavailable, using the PyTorch routing: {exc}",
                RuntimeWarning,
                stacklevel=4,
            )
        return "torch", reason
