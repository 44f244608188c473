"""Lazy access to the compiled routing extensions (never imported or queried at package import time).

- ``_routing_cuda``: the steps of ``csrc/routing.h`` as CUDA kernels (built when nvcc was found at install time).
- ``_routing_host``: the same routing C++ compiled for the host; the tests compare it with the PyTorch path.

Both take raw pointers: this module allocates the buffers of ``spec.PlanSizes`` (``spec.allocate``: the plan and the
sort's scratch of ``spec.PLAN_BUFFERS`` / ``SCRATCH_BUFFERS``), passes their ``data_ptr()`` values by name (plus,
on CUDA, the current stream) and returns the plan's buffers; the dispatcher (``routing``) validates the arguments
before and wraps the buffers after. Nothing here synchronizes with the device; this module imports only ``spec``.
"""

from __future__ import annotations

import importlib
from functools import cache
from types import ModuleType

import torch

from . import spec
from .spec import PlanSizes

__all__ = ["cuda_available", "cuda_module", "host_module", "plan_buffers_cuda", "plan_buffers_host"]


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


def _fill(launch, top_k_index: torch.Tensor, sizes: PlanSizes, **extra) -> dict[str, torch.Tensor]:
    """Allocate, call ``launch(...)`` (a module's ``plan_routing``) on the raw pointers, return the plan's buffers
    (the scratch is released when the stream is done with it, by the caching allocator)."""
    idx = top_k_index.contiguous()
    buffers = spec.allocate(sizes, idx.device)
    launch(
        top_k_index=idx.data_ptr(),
        index_dtype=str(idx.dtype).removeprefix("torch."),
        num_tokens=sizes.num_tokens,
        top_k=sizes.top_k,
        num_experts=sizes.num_experts,
        block_size=sizes.block_size,
        max_block_rows=sizes.max_block_rows,
        buffers={name: (t.data_ptr(), t.numel()) for name, t in buffers.items()},
        **extra,
    )
    return {name: buffers[name] for name in sizes.shapes()}


def plan_buffers_cuda(top_k_index: torch.Tensor, sizes: PlanSizes) -> dict[str, torch.Tensor]:
    """The plan's buffers filled by ``_routing_cuda`` from a CUDA tensor, on the current stream (no sync)."""
    mod = cuda_module()
    device = top_k_index.device
    with torch.cuda.device(device):
        return _fill(mod.plan_routing, top_k_index, sizes, stream=torch.cuda.current_stream(device).cuda_stream)


def plan_buffers_host(top_k_index: torch.Tensor, sizes: PlanSizes) -> dict[str, torch.Tensor]:
    """The plan's buffers filled by ``_routing_host`` from a CPU tensor (the C++ logic; used by the tests)."""
    return _fill(host_module().plan_routing, top_k_index, sizes)
