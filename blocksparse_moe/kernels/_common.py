"""Helpers shared by the Triton kernel modules: interpreter switches and config pinning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton.language as tl

from .._backend import interpreting

__all__ = [
    "interpreting",
    "tl_dtype",
    "upcast_dots",
    "check_same_device",
    "CompileSpec",
    "INTERPRET_CONFIG_ENV",
]

# When interpreting, launchers pin one config (autotune with >1 config needs a GPU driver).
INTERPRET_CONFIG_ENV = "BSM_PIN_CONFIG"


def upcast_dots(dtype: torch.dtype) -> bool:
    """Triton's interpreter multiplies bf16 bit patterns in ``tl.dot`` (triton issue 11584).

    Kernels take an ``UPCAST: tl.constexpr`` that converts dot operands to fp32; it is True only when
    interpreting bf16, never on the GPU path.
    """
    return interpreting() and dtype == torch.bfloat16


_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def tl_dtype(dtype: torch.dtype):
    return _TL[dtype]


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All non-None tensors on one device; returns it. Error names each tensor and its device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"expected all tensors on one device, got {listing}")
    return next(iter(devices.values()))


@dataclass(frozen=True)
class CompileSpec:
    """One kernel configuration the GPU path can pick, for the ahead-of-time compile audit (bench/audit.py).

    ``signature`` maps every non-constexpr argument name to a Triton type string (``"*fp16"``, ``"i32"``,
    ...); ``constexprs`` maps every ``tl.constexpr`` argument to its value.
    """

    name: str  # e.g. "sdd[bf16,B=128,K=64]"
    kernel: Any  # the @triton.jit function
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    is_matmul: bool = True  # sm_90 builds must contain HGMMA
