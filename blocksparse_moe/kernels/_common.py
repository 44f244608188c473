"""Helpers shared by the Triton kernel modules: interpreter switches, grid limits, the alignment test that picks a
config, and the compile-audit signatures (``CompileSpec``, read by ``bench/audit.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import interpreting

__all__ = [
    "interpreting",
    "upcast_dots",
    "check_grid_y",
    "aligned16",
    "triton_type",
    "kernel_signature",
    "CompileSpec",
    "MAX_GRID_Y",
]

MAX_GRID_Y = 65535  # programs along grid axis 1


def upcast_dots(dtype: torch.dtype) -> bool:
    """Triton's interpreter multiplies bf16 bit patterns in ``tl.dot`` (triton issue 11584).

    Kernels take an ``UPCAST: tl.constexpr`` that converts dot operands to fp32; it is True only when
    interpreting bf16, never on the GPU path.
    """
    return interpreting() and dtype == torch.bfloat16


def check_grid_y(grid: tuple[int, ...], name: str, size: int, block: int = 1) -> tuple[int, ...]:
    """Returns ``grid`` once its axis 1 (``size``, named ``name``, in tiles of ``block``) fits ``MAX_GRID_Y``."""
    if grid[1] > MAX_GRID_Y:
        raise ValueError(f"{name} must be at most {MAX_GRID_Y * block}, got {size}")
    return grid


_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32"}


def triton_type(dtype: torch.dtype) -> str:
    """Triton's name of ``dtype`` (``"bf16"``, ``"i32"``, ...), as in signatures and spec names."""
    return _TRITON_TYPES[dtype]


def kernel_signature(
    kernel, constexprs: dict[str, Any], dtype: torch.dtype, pointer_dtypes: dict[str, torch.dtype]
) -> dict[str, str]:
    """``CompileSpec.signature`` of ``kernel``: ``constexpr`` for the arguments in ``constexprs``; pointers
    (``*_ptr``) typed by ``pointer_dtypes`` where listed, else by ``dtype``; other arguments ``i32``."""
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = f"*{triton_type(pointer_dtypes.get(arg, dtype))}"
        else:
            signature[arg] = "i32"
    return signature


@dataclass(frozen=True)
class CompileSpec:
    """One kernel configuration the GPU path can pick, for the ahead-of-time compile audit (bench/audit.py).

    ``signature`` maps every non-constexpr argument name to a Triton type string (``"*fp16"``, ``"i32"``,
    ...); ``constexprs`` maps every ``tl.constexpr`` argument to its value.

    The JIT specialises pointers and integers that are multiples of 16 (``tt.divisibility`` 16): vector loads,
    a pipelined K loop. The audit builds each spec in the ``variants`` it lists: ``"unaligned"`` (no
    divisibility, as odd shapes run) and ``"aligned"`` (every pointer and the integer arguments named in
    ``aligned`` divisible by 16, as realistic shapes run). A config the launcher picks only for aligned
    (unaligned) operands lists only that variant.

    ``is_matmul`` marks a tensor-core matmul tile (M tile >= 64 rows, as wgmma and tcgen05 need): its builds must
    use the architecture's MMA (HGMMA on sm_90, tcgen05 ``UTC*MMA`` on sm_100 unless ``tcgen05_ok`` is False,
    HMMA on sm_80 / sm_120). ``expect_pipelined``: the main (MMA) loop must keep its loads in flight, never waiting
    its cp.async copies or wgmma to zero inside the loop. See docs/audit.md.
    """

    name: str  # e.g. "sdd[bf16,B=128,K=64]"
    kernel: Any  # the @triton.jit function
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    is_matmul: bool = True  # a tensor-core tile: HGMMA on sm_90, tcgen05 on sm_100, HMMA on sm_80 / sm_120
    aligned: tuple[str, ...] = ()  # integer arguments (sizes, strides) that realistic shapes make multiples of 16
    variants: tuple[str, ...] = ("unaligned", "aligned")
    tcgen05_ok: bool = True  # with is_matmul: sm_100 builds must use tcgen05 MMA (Triton 3.9: every M tile >= 64)
    expect_pipelined: bool = True  # the MMA loop must not wait its async loads / wgmma to zero each iteration
    archs: tuple[int, ...] | None = None  # the compute capabilities the launcher picks this config for (None: all)

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in ("unaligned", "aligned")]
        if unknown or not self.variants:
            raise ValueError(f"{self.name}: variants must be 'unaligned' and/or 'aligned', got {self.variants}")
        not_int = [a for a in self.aligned if not self.signature.get(a, "").startswith(("i", "u"))]
        if not_int:
            raise ValueError(f"{self.name}: aligned must name integer arguments of the signature, got {not_int}")


def aligned16(tensors: tuple[torch.Tensor, ...], sizes: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether the JIT marks every pointer, size and non-unit stride divisible by 16 (the audit's aligned
    variant): decided on the host from ``data_ptr()``, shapes and strides, no device sync."""
    return (
        all(t.data_ptr() % 16 == 0 for t in tensors)
        and all(v % 16 == 0 for v in sizes)
        and all(v == 1 or v % 16 == 0 for v in strides)
    )
