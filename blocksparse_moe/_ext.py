"""Lazy access to the compiled routing extensions (never imported or queried at package import time).

- ``_routing_cuda``: ``csrc/routing.h`` run as CUDA kernels + CUB (built when nvcc was found at install time).
- ``_routing_host``: the same routing C++ compiled for the host; the tests compare it with the PyTorch path.

Both take raw pointers: this module allocates every output with torch from shape-derived upper bounds, passes
``data_ptr()`` values (plus, on CUDA, a workspace and the current stream) and wraps the buffers in a
``RoutingPlan``. Nothing here synchronizes with the device.
"""

from __future__ import annotations

import importlib
from functools import cache
from types import ModuleType

import torch

from .routing import INDEX_DTYPE, RoutingPlan, _validate, build_topology, max_block_rows

__all__ = ["cuda_available", "cuda_module", "host_module", "plan_routing_cuda", "plan_routing_host"]

_TOPOLOGY_FIELDS = (
    "row_indices",
    "column_indices",
    "row_offsets",
    "row_indices_t",
    "column_indices_t",
    "column_offsets_t",
    "block_offsets_t",
)


@cache
def _load(name: str) -> ModuleType | ImportError:
    try:
        return importlib.import_module(f"blocksparse_moe.{name}")
    except ImportError as exc:  # not built
        return exc


def _module(name: str, how: str) -> ModuleType:
    mod = _load(name)
    if isinstance(mod, ImportError):
        raise ImportError(f"blocksparse_moe.{name} is not built; {how} (pip install -e .): {mod}")
    return mod


def host_module() -> ModuleType:
    """The host build of the routing C++, or raise ImportError saying how to build it."""
    return _module("_routing_host", "reinstall with a C++ compiler and CMake")


def cuda_module() -> ModuleType:
    """The CUDA build of the routing C++, or raise ImportError saying how to build it."""
    return _module("_routing_cuda", "reinstall with nvcc on PATH (BSM_CUDA=1 makes a failed CUDA build an error)")


def cuda_available() -> bool:
    """True when the CUDA routing extension is built (says nothing about a GPU being present)."""
    return not isinstance(_load("_routing_cuda"), ImportError)


def _allocate(
    top_k_index: torch.Tensor, num_experts: int, block_size: int, ffn_size: int | None
) -> tuple[dict[str, torch.Tensor], int]:
    """Uninitialized int32 outputs sized from upper bounds, and nb (0 without topology)."""
    T, k = top_k_index.shape
    A, E = T * k, num_experts
    R = max_block_rows(A, E, block_size)
    nb = 0 if ffn_size is None else -(-ffn_size // block_size)
    sizes = {
        "counts": E + 1,
        "offsets": E + 1,
        "padded_offsets": E + 1,
        "sorted_assignment": A,
        "inverse": A,
        "row_assignment": A,
        "assignment_row": A,
        "padded_row_assignment": R * block_size,
        "padded_assignment_row": A,
    }
    if nb:
        sizes.update({name: R * nb for name in _TOPOLOGY_FIELDS})
        sizes.update(row_offsets=R + 1, column_offsets_t=E * nb + 1)
    out = {name: torch.empty(n, dtype=INDEX_DTYPE, device=top_k_index.device) for name, n in sizes.items()}
    return out, nb


def _plan(
    launch, top_k_index: torch.Tensor, num_experts: int, block_size: int, ffn_size: int | None, **extra
) -> RoutingPlan:
    """Allocate, call ``launch(...)`` (a module's ``plan_routing``) and wrap the buffers in a RoutingPlan."""
    T, k = top_k_index.shape
    idx = top_k_index.contiguous()
    out, nb = _allocate(idx, num_experts, block_size, ffn_size)
    launch(
        top_k_index=idx.data_ptr(),
        index_dtype=str(idx.dtype).removeprefix("torch."),
        num_tokens=T,
        top_k=k,
        num_experts=num_experts,
        block_size=block_size,
        blocks_per_expert=nb,
        max_block_rows=max_block_rows(T * k, num_experts, block_size),
        outputs={name: (t.data_ptr(), t.numel()) for name, t in out.items()},
        **extra,
    )
    topology = None
    if nb:
        R = max_block_rows(T * k, num_experts, block_size)
        topology = build_topology(out["padded_offsets"], block_size, num_experts, ffn_size, R)
    return RoutingPlan(
        num_tokens=T,
        top_k=k,
        num_experts=num_experts,
        block_size=block_size,
        tokens_per_expert=out["counts"][:num_experts],
        invalid_count=out["counts"][num_experts],
        offsets=out["offsets"],
        padded_offsets=out["padded_offsets"],
        sorted_assignment=out["sorted_assignment"],
        inverse=out["inverse"],
        row_assignment=out["row_assignment"],
        assignment_row=out["assignment_row"].view(T, k),
        padded_row_assignment=out["padded_row_assignment"],
        padded_assignment_row=out["padded_assignment_row"].view(T, k),
        topology=topology,
    )


def _check_device(top_k_index: torch.Tensor, device_type: str, name: str) -> None:
    if top_k_index.device.type != device_type:
        raise ValueError(f"{name} needs top_k_index on {device_type}, got a tensor on {top_k_index.device}")


def plan_routing_cuda(
    top_k_index: torch.Tensor, num_experts: int, block_size: int, ffn_size: int | None
) -> RoutingPlan:
    """``routing.plan_routing`` on a CUDA tensor through ``_routing_cuda``, on the current stream (no sync)."""
    _validate(top_k_index, num_experts, block_size, ffn_size)
    _check_device(top_k_index, "cuda", "plan_routing_cuda")
    mod = cuda_module()
    device = top_k_index.device
    with torch.cuda.device(device):
        nbytes = mod.workspace_bytes(top_k_index.numel(), num_experts)
        workspace = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return _plan(
            mod.plan_routing,
            top_k_index,
            num_experts,
            block_size,
            ffn_size,
            workspace=workspace.data_ptr(),
            workspace_bytes=nbytes,
            stream=torch.cuda.current_stream(device).cuda_stream,
        )


def plan_routing_host(
    top_k_index: torch.Tensor, num_experts: int, block_size: int, ffn_size: int | None
) -> RoutingPlan:
    """``routing.plan_routing`` on a CPU tensor through ``_routing_host`` (the C++ logic; used by the tests)."""
    _validate(top_k_index, num_experts, block_size, ffn_size)
    _check_device(top_k_index, "cpu", "plan_routing_host")
    return _plan(host_module().plan_routing, top_k_index, num_experts, block_size, ffn_size)
