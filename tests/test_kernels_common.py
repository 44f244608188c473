"""Host-side helpers the launchers share (kernels/_common.py)."""

import pytest
import torch

from blocksparse_moe.kernels import grouped_gemm
from blocksparse_moe.kernels._common import aligned16, check_same_device, upcast_dots


def test_aligned16_decides_from_pointers_sizes_and_strides():
    x = torch.randn(64, 32, dtype=torch.float16)
    assert aligned16((x,), x.shape, x.stride())  # fresh allocation, sizes and strides multiples of 16
    assert aligned16((x.t(),), x.t().shape, x.t().stride())  # transposed view: unit stride is fine
    assert not aligned16((x,), (64, 33), x.stride())  # odd size
    y = torch.randn(64 * 32 + 1, dtype=torch.float16)[1:].view(64, 32)
    assert not aligned16((y,), y.shape, y.stride())  # a view offset by one element: pointer not 16-byte aligned
    z = torch.randn(64, 40, dtype=torch.float16)[:, :32]
    assert not aligned16((z,), z.shape, z.stride())  # row stride 40


def test_unaligned_fallback_configs_outside_interpreter(monkeypatch):
    # the 16-bit fast config is picked for aligned operands only; odd shapes take a smaller K step
    monkeypatch.setattr(grouped_gemm, "interpreting", lambda: False)
    fast = grouped_gemm.grouped_mm_config(torch.bfloat16, aligned=True)
    slow = grouped_gemm.grouped_mm_config(torch.bfloat16, aligned=False)
    assert slow.block_k < fast.block_k
    assert grouped_gemm.grouped_mm_config(torch.float32, aligned=False).block_k == 32


def test_upcast_only_for_interpreted_bf16(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert upcast_dots(torch.bfloat16) and not upcast_dots(torch.float16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not upcast_dots(torch.bfloat16)


def test_check_same_device_names_each_tensor():
    with pytest.raises(ValueError, match="a on cpu, b on meta"):
        check_same_device(a=torch.zeros(1), b=torch.empty(1, device="meta"))
