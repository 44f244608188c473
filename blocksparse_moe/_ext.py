"""Lazy access to the compiled routing extensions (never imported or queried at package import time).

- ``_routing_cuda``: the steps of ``csrc/routing.h`` as CUDA kernels (built when nvcc was found at install time).
- ``_routing_host``: the same routing C++ compiled for the host; the tests compare it with the PyTorch path.

Both take raw pointers: this module allocates the buffers ``routing.plan_routing`` asks for (name → shape, from
``PlanSizes``: the plan and the sort's scratch of ``routing.PLAN_BUFFERS`` / ``SCRATCH_BUFFERS``), passes their
``data_ptr()`` values by name (plus, on CUDA, the current stream) and returns the plan's buffers; ``routing``
validates the arguments before and wraps the buffers after. Nothing here synchronizes with the device, and nothing
here imports ``routing``.
"""

from __future__ import annotations

import importlib
import math
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .routing import PlanSizes

__all__ = ["allocate", "cuda_available", "cuda_module", "host_module", "plan_buffers_cuda", "plan_buffers_host"]


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


ALIGN = 32  # elements (128 bytes): every buffer starts where a vectorized load of it may


def _carve(shapes: dict[str, tuple[int, ...]], device: torch.device) -> dict[str, torch.Tensor]:
    """Uninitialized int32 tensors of ``shapes``, by name: views of one allocation (one allocator call, not one
    per buffer), each starting on an ``ALIGN`` boundary."""
    numels = [math.prod(shape) for shape in shapes.values()]
    starts = [0]
    for n in numels:
        starts.append(starts[-1] + -(-n // ALIGN) * ALIGN)
    block = torch.empty(starts[-1], dtype=torch.int32, device=device)
    return {
        name: block[start : start + n].view(shape) for (name, shape), start, n in zip(shapes.items(), starts, numels)
    }


def allocate(sizes: PlanSizes, device: torch.device) -> dict[str, torch.Tensor]:
    """Uninitialized int32 buffers of ``sizes.shapes()`` and ``sizes.scratch_shapes()``, by name, in table order.
    The plan's buffers share one allocation and the scratch another (freed as soon as the plan is built)."""
    return {**_carve(sizes.shapes(), device), **_carve(sizes.scratch_shapes(), device)}


def _fill(launch, top_k_index: torch.Tensor, sizes: PlanSizes, **extra) -> dict[str, torch.Tensor]:
    """Allocate, call ``launch(...)`` (a module's ``plan_routing``) on the raw pointers, return the plan's buffers
    (the scratch is released when the stream is done with it, by the caching allocator)."""
    idx = top_k_index.contiguous()
    buffers = allocate(sizes, idx.device)
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
