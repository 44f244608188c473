"""Helpers shared by the Triton kernel modules: interpreter switches, grid limits and the alignment test that picks
a config (the compile-audit specs: ``specs``)."""

from __future__ import annotations

import torch
import triton
from triton.runtime import _allocation

from ..config import interpreting

__all__ = [
    "interpreting",
    "dot_mode",
    "tf32_allowed",
    "DOTS_NATIVE",
    "DOTS_UPCAST",
    "DOTS_IEEE",
    "check_grid_y",
    "aligned16",
    "capability",
    "scratch_allocator",
    "MAX_GRID_Y",
]

MAX_GRID_Y = 65535  # programs along grid axis 1


DOTS_NATIVE, DOTS_UPCAST, DOTS_IEEE = 0, 1, 2  # the kernels' ``DOTS`` constexpr (``dot_mode``)


def dot_mode(dtype: torch.dtype) -> int:
    """How the kernels' ``tl.dot`` treat operands of ``dtype``: their ``DOTS: tl.constexpr``.

    - ``DOTS_IEEE``: fp32 at full precision (FMA, no tensor core), PyTorch's default for fp32 CUDA matmuls;
    - ``DOTS_NATIVE``: the tensor cores' native input type, fp32 as TF32 where PyTorch allows it
      (``torch.backends.cuda.matmul.fp32_precision = "tf32"`` or ``torch.set_float32_matmul_precision("high")``:
      ``tf32_allowed``), and every 16- and 8-bit type;
    - ``DOTS_UPCAST``: bf16 under Triton's interpreter, which multiplies bf16 bit patterns in ``tl.dot`` (triton
      issue 11584): the operands converted to fp32 first. Never on the GPU path.
    """
    if dtype == torch.bfloat16 and interpreting():
        return DOTS_UPCAST
    if dtype == torch.float32 and not tf32_allowed():
        return DOTS_IEEE
    return DOTS_NATIVE


def tf32_allowed() -> bool:
    """PyTorch's setting for fp32 CUDA matmuls: True where they may round operands to TF32 (the setting read, not
    changed; the kernels follow it as cuBLAS does)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # PyTorch < 2.9: the legacy flag only
        return bool(matmul.allow_tf32)
    if precision == "none":  # inherits the generic setting ("none" there too: PyTorch's default, IEEE)
        precision = torch.backends.fp32_precision
    return precision == "tf32"


def check_grid_y(grid: tuple[int, ...], name: str, size: int, block: int = 1) -> tuple[int, ...]:
    """Returns ``grid`` once its axis 1 (``size``, named ``name``, in tiles of ``block``) fits ``MAX_GRID_Y``."""
    if grid[1] > MAX_GRID_Y:
        raise ValueError(f"{name} must be at most {MAX_GRID_Y * block}, got {size}")
    return grid


def aligned16(tensors: tuple[torch.Tensor, ...], sizes: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether the JIT marks every pointer, size and non-unit stride divisible by 16 (the audit's aligned
    variant): decided on the host from ``data_ptr()``, shapes and strides, no device sync."""
    return (
        all(t.data_ptr() % 16 == 0 for t in tensors)
        and all(v % 16 == 0 for v in sizes)
        and all(v == 1 or v % 16 == 0 for v in strides)
    )


def capability(t: torch.Tensor) -> int | None:
    """``major * 10 + minor`` of the CUDA device holding ``t`` (a cached host query, no sync), for the config
    functions; None off CUDA (CPU, the interpreter, ``bench.model``'s meta tensors)."""
    if t.device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(t.device)
    return major * 10 + minor


def _torch_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Triton's launch-time scratch memory from torch's caching allocator, on the current CUDA device (where Triton
    launches; its blocks are 512-byte aligned)."""
    return torch.empty(size, dtype=torch.uint8, device="cuda")


def scratch_allocator() -> None:
    """Kernels that build tensor descriptors on the device need global scratch memory at launch, from Triton's
    allocator (``triton.set_allocator``; none by default: the launch would fail). Installs one on torch's caching
    allocator, unless the program has set its own (kept)."""
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_scratch)
