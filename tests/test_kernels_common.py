"""Host-side helpers of the kernels (kernels/_common.py), the launchers' config choice, and the shared checks."""

import contextvars
from dataclasses import replace

import pytest
import torch
import triton
import triton.language as tl

from blocksparse_moe.config import interpreting
from blocksparse_moe.kernels import expert_gemm
from blocksparse_moe.kernels._common import DOTS_IEEE, DOTS_NATIVE, DOTS_UPCAST, aligned16, capability, dot_mode
from blocksparse_moe.ops._checks import check_same_device


def test_aligned16_decides_from_pointers_sizes_and_strides():
    x = torch.randn(64, 32, dtype=torch.float16)
    assert aligned16((x,), x.shape, x.stride())  # fresh allocation, sizes and strides multiples of 16
    assert aligned16((x.t(),), x.t().shape, x.t().stride())  # transposed view: unit stride is fine
    assert not aligned16((x,), (64, 33), x.stride())  # odd size
    y = torch.randn(64 * 32 + 1, dtype=torch.float16)[1:].view(64, 32)
    assert not aligned16((y,), y.shape, y.stride())  # a view offset by one element: pointer not 16-byte aligned
    z = torch.randn(64, 40, dtype=torch.float16)[:, :32]
    assert not aligned16((z,), z.shape, z.stride())  # row stride 40


def test_gpu_configs_outside_interpreter(monkeypatch):
    """The host-side config choice of the GPU path (no device needed): aligned 16-bit operands take K steps of 64,
    unaligned ones 32; the GLU forward halves the N tile (two accumulators), the backward epilogue takes full-width
    tiles processed in column slices of 8 (32 columns unaligned); tiles never straddle a layout block; a gathered
    weight gradient takes 5 stages (its index load gets a pipeline stage of its own)."""
    monkeypatch.setattr(expert_gemm, "interpreting", lambda: False)
    fast = expert_gemm.gemm_config(torch.bfloat16, 128, aligned=True)
    slow = expert_gemm.gemm_config(torch.bfloat16, 128, aligned=False)
    assert (fast.block_k, fast.block_n, fast.num_warps) == (64, 128, 8) and slow.block_k == 32
    assert expert_gemm.gemm_config(torch.float32, 128).block_k == 32
    assert expert_gemm.gemm_config(torch.bfloat16, 128, glu=True, epilogue=1).block_n == 64
    bwd = expert_gemm.gemm_config(torch.bfloat16, 128, glu=True, epilogue=2)
    assert (bwd.block_n, bwd.epi_n) == (128, 8)
    assert expert_gemm.gemm_config(torch.bfloat16, 128, glu=True, epilogue=2, aligned=False).block_n == 32
    assert expert_gemm.gemm_config(torch.bfloat16, 128, epilogue=2, out_block=64).epi_n == 8  # blocked out, B = 64
    assert expert_gemm.gemm_config(torch.bfloat16, 128).epi_n == 128  # one slice: the whole tile
    assert expert_gemm.gemm_config(torch.bfloat16, 64, out_block=64).block_n == 64  # blocked out, B = 64
    assert expert_gemm.gemm_config(torch.bfloat16, 64).num_warps == 4
    assert expert_gemm.wgrad_config(torch.bfloat16, gather=True).num_stages == 5
    assert expert_gemm.wgrad_config(torch.bfloat16).num_stages == 3
    assert expert_gemm.wgrad_config(torch.bfloat16, a_block=64).block_m == 64


@pytest.mark.parametrize("cc", [80, 90, 100, 103, 120, None])
def test_gpu_configs_per_compute_capability(monkeypatch, cc):
    """Warps per architecture (bench.audit's issue ratio): tcgen05 (sm_100 / sm_103) runs the aligned 16-bit
    128-row GEMM tiles on 4 warps, every other architecture on 8; the aligned 16-bit 128x128 weight-gradient tiles
    take 4 warps where the MMA is asynchronous (sm_90, sm_100; None, off CUDA, is sm_90's), 8 on mma.sync
    (sm_80, sm_120). Unaligned and fp32 tiles keep 8 everywhere; tiles and stages never change."""
    monkeypatch.setattr(expert_gemm, "interpreting", lambda: False)
    blackwell, async_mma = cc in (100, 103), cc in (90, 100, 103, None)
    for kw in (dict(), dict(glu=True, epilogue=1), dict(epilogue=2), dict(pair=True), dict(out_block=128)):
        cfg = expert_gemm.gemm_config(torch.bfloat16, 128, capability=cc, **kw)
        assert cfg.num_warps == (4 if blackwell else 8), kw
        sm80 = expert_gemm.gemm_config(torch.bfloat16, 128, capability=80, **kw)
        if blackwell and kw.get("glu"):  # the GLU forward: 128 columns per weight, its epilogue in 32-column slices
            sm80 = replace(sm80, block_n=128, epilogue_n=32, num_stages=2)
        assert replace(cfg, num_warps=8, epilogue_n=sm80.epilogue_n) == sm80
    # sm_100's GLU forward tile only for aligned 16-bit 128-row tiles; unaligned and fp32 ones keep theirs (the
    # 64-row ones take swapped operands there: test_swapped_operands_per_compute_capability)
    for kw in (dict(dtype=torch.bfloat16, block_m=128, aligned=False), dict(dtype=torch.float32, block_m=128)):
        cfg = expert_gemm.gemm_config(**kw, glu=True, epilogue=1, capability=cc)
        assert cfg == expert_gemm.gemm_config(**kw, glu=True, epilogue=1, capability=80), kw
    # the backward epilogue's column slices: 16 on 4 tcgen05 warps (slices of 8 spilled the gelu epilogue there)
    assert expert_gemm.gemm_config(torch.bfloat16, 128, epilogue=2, capability=cc).epi_n == (16 if blackwell else 8)
    assert expert_gemm.gemm_config(torch.bfloat16, 128, aligned=False, capability=cc).num_warps == 8
    assert expert_gemm.gemm_config(torch.float32, 128, capability=cc).num_warps == 8
    assert expert_gemm.gemm_config(torch.bfloat16, 64, capability=cc).num_warps == 4  # small-M tiles: 4 everywhere
    for kw in (dict(gather=True), dict(), dict(b_block=128)):
        assert expert_gemm.wgrad_config(torch.bfloat16, capability=cc, **kw).num_warps == (4 if async_mma else 8)
    assert expert_gemm.wgrad_config(torch.bfloat16, aligned=False, capability=cc).num_warps == 8
    assert expert_gemm.wgrad_config(torch.float32, capability=cc).num_warps == 8
    assert expert_gemm.wgrad_config(torch.bfloat16, b_block=64, capability=cc).num_warps == 8  # 128x64 tiles
    assert capability(torch.empty(1)) is None  # off CUDA the launchers pass None


@pytest.mark.parametrize("cc", [80, 90, 100, 103, 120, None])
def test_swapped_operands_per_compute_capability(monkeypatch, cc):
    """``swap_ab`` (accᵀ = Wᵀ · Aᵀ, the weight's columns as the MMA's M: bench.audit) for the grouped layouts'
    aligned 16-bit tiles under 64 rows on sm_90 (None, off CUDA, is sm_90's) and sm_100 / sm_103, and the 64-row
    ones on sm_100 / sm_103, with twice the columns (the backward epilogue in 16-column slices; sm_100's 64-row tiles
    of one tile per program in 2 stages); never on sm_80 / sm_120 (mma.sync either way), for 128-row tiles, blocked
    layouts, unaligned or fp32 operands, nor when interpreting. FP8: sm_100's 64-row MX tiles of 128 columns only."""
    monkeypatch.setattr(expert_gemm, "interpreting", lambda: False)
    hopper, blackwell = cc in (90, None), cc in (100, 103)
    uses = {"plain": {}, "glu": dict(glu=True, epilogue=1), "backward": dict(epilogue=2), "pair": dict(pair=True)}
    for name, kw in uses.items():
        for block_m in (16, 32, 64, 128):
            cfg = expert_gemm.gemm_config(torch.bfloat16, block_m, capability=cc, **kw)
            swap = (block_m < 64 and (hopper or blackwell)) or (block_m == 64 and blackwell)
            assert cfg.swap_ab == swap, (name, block_m)
            if block_m < 128:  # (sm_100's 128-row tiles differ from sm_80's otherwise: warps, GLU tile)
                sm80 = expert_gemm.gemm_config(torch.bfloat16, block_m, capability=80, **kw)
                one_tile = name in ("glu", "backward") and block_m == 64 and blackwell
                # sm_100's 3-stage 64-row tiles (the persistent ones): 124 KB, 1 CTA and so 1 program per SM
                per_sm = 1 if blackwell and block_m == 64 and not one_tile else 2
                expected = replace(sm80, swap_ab=True, block_n=2 * sm80.block_n, num_stages=2 if one_tile else 3,
                                   epilogue_n=16 if name == "backward" else None, programs_per_sm=per_sm)  # fmt: skip
                assert cfg == (expected if swap else sm80), (name, block_m)
            assert expert_gemm.gemm_config(torch.float16, block_m, capability=cc, **kw).swap_ab == cfg.swap_ab
            bf16 = torch.bfloat16
            others = (dict(dtype=bf16, aligned=False), dict(dtype=torch.float32), dict(dtype=bf16, out_block=64),
                      dict(dtype=bf16, a_block=64))  # fmt: skip
            for other in others:
                assert not expert_gemm.gemm_config(block_m=block_m, capability=cc, **other, **kw).swap_ab
            for mode in (expert_gemm.Fp8Mode.BLOCKWISE, expert_gemm.Fp8Mode.MX, expert_gemm.Fp8Mode.ROWWISE):
                fp8 = expert_gemm.gemm_config(torch.float8_e4m3fn, block_m, capability=cc, fp8=mode, **kw)
                # sm_100's 64-row MX tiles of 128 columns (not the GLU forward's 64): native block-scaled MMAs
                mx_swap = mode == expert_gemm.Fp8Mode.MX and blackwell and block_m == 64 and name != "glu"
                assert fp8.swap_ab == mx_swap, (mode, name, block_m)
    monkeypatch.setattr(expert_gemm, "interpreting", lambda: True)
    assert not expert_gemm.gemm_config(torch.float16, 16, capability=cc).swap_ab


def test_interpreter_configs_slice_the_epilogues():
    # under the interpreter both epilogues run in column slices (EPI_N < BLOCK_N), so that every interpreter test of
    # the forward and backward epilogues runs the sliced code sm_100's GLU forward and the backward take on a GPU
    for epilogue in (1, 2):
        for glu in (False, True):
            cfg = expert_gemm.gemm_config(torch.bfloat16, 16, epilogue=epilogue, glu=glu)
            assert cfg.epi_n < cfg.block_n, (epilogue, glu, cfg)


def test_upcast_only_for_interpreted_bf16(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dot_mode(torch.bfloat16) == DOTS_UPCAST and dot_mode(torch.float16) == DOTS_NATIVE
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert dot_mode(torch.bfloat16) == DOTS_NATIVE


def test_fp32_dots_follow_pytorchs_tf32_setting():
    """fp32 dots run IEEE by default (PyTorch's default for fp32 matmuls; on an H100, Triton's TF32 default made the
    fused MLP's fp32 output 2000x less accurate than PyTorch's), TF32 where PyTorch allows it; 16- and 8-bit dots
    are native either way. The setting is read, never changed. (Only the new API is set here: PyTorch refuses to
    read a precision once the legacy and new APIs were mixed, and ``set_float32_matmul_precision`` also switches
    the CPU's oneDNN matmuls.)"""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    assert dot_mode(torch.float32) == (DOTS_NATIVE if before == "tf32" else DOTS_IEEE)
    try:
        matmul.fp32_precision = "tf32"
        assert dot_mode(torch.float32) == DOTS_NATIVE
        assert dot_mode(torch.float16) == DOTS_NATIVE and dot_mode(torch.float8_e4m3fn) == DOTS_NATIVE
        matmul.fp32_precision = "ieee"
        assert dot_mode(torch.float32) == DOTS_IEEE
    finally:
        matmul.fp32_precision = before
    assert matmul.fp32_precision == before


def test_check_same_device_names_each_tensor():
    with pytest.raises(ValueError, match="a on cpu, b on meta"):
        check_same_device(a=torch.zeros(1), b=torch.empty(1, device="meta"))


@triton.jit
def _to_bf16_kernel(x_ptr, y_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs).to(tl.bfloat16))


@pytest.mark.skipif(not interpreting(), reason="a fact about Triton's CPU interpreter")
def test_interpreter_rounds_bf16_toward_zero():
    """Triton 3.9's interpreter converts fp32 -> bf16 by truncation (the GPU rounds to nearest even). The fused MLP's
    bf16 tests under the interpreter are judged by the TOL table because of it (tests/test_mlp.py); when this test
    fails, Triton rounds correctly and those tests can take the 2x-of-torch rule in bf16 too."""
    x = torch.randn(1024)
    y = torch.full((1024,), float("nan"), dtype=torch.bfloat16)  # poisoned
    _to_bf16_kernel[(1,)](x, y, N=1024)
    truncated = (x.view(torch.int32) >> 16).to(torch.int16)
    assert torch.equal(y.view(torch.int16), truncated)
    assert not torch.equal(y, x.to(torch.bfloat16))  # torch rounds to nearest even: some values differ


def test_scratch_allocator_installs_one_unless_set():
    # device-side tensor descriptors need Triton's launch-time allocator: installed when none is set, a program's
    # own allocator kept (each case in a fresh context: the allocator is a context variable)
    from triton.runtime import _allocation

    from blocksparse_moe.kernels import _common

    def fresh():
        _allocation._allocator.set(_allocation.NullAllocator())
        _common.scratch_allocator()
        return _allocation._allocator.get()

    def own():
        mine = lambda size, alignment, stream: torch.empty(size, dtype=torch.uint8)  # noqa: E731
        triton.set_allocator(mine)
        _common.scratch_allocator()
        return _allocation._allocator.get() is mine

    assert contextvars.copy_context().run(fresh) is _common._torch_scratch
    assert contextvars.copy_context().run(own)


def test_row_tma_takes_dense_aligned_16bit_rows():
    # wgrad_kernel's TMA rows: dense, not gathered, not blocked, 16-bit, 16-byte aligned base and row stride
    from blocksparse_moe.kernels.layouts import Rows

    x = torch.randn(40, 32, dtype=torch.bfloat16)
    assert expert_gemm._row_tma(Rows.dense(x))
    assert not expert_gemm._row_tma(Rows.dense(x, gathered=True))  # gathered rows: cp.async
    assert not expert_gemm._row_tma(Rows.dense(x.float()))  # fp32: tf32 MMAs read K-major tiles only
    assert not expert_gemm._row_tma(Rows.dense(torch.randn(40, 36, dtype=torch.bfloat16)[:, :33]))  # 72-byte rows
    assert not expert_gemm._row_tma(Rows.dense(x.view(-1)[1 : 1 + 39 * 32].view(39, 32)))  # base off by 2 bytes
    assert not expert_gemm._row_tma(Rows.blocked(torch.randn(4, 16, 16, dtype=torch.bfloat16), 2, 32))  # blocked


def test_gather4_takes_gathered_aligned_16bit_rows_on_sm100(monkeypatch):
    # gemm_kernel's TMA row gather: gathered, 16-bit, non-empty, 16-byte aligned base and row stride, unit column
    # stride; only on sm_100 (not sm_90: no gather4; not sm_120), never when interpreting or on meta tensors
    from blocksparse_moe.kernels.layouts import Rows

    gather4, pointers = expert_gemm.WeightLoad.GATHER4, expert_gemm.WeightLoad.POINTERS
    x = torch.randn(40, 32, dtype=torch.bfloat16)
    assert expert_gemm._gather_load(Rows.dense(x, gathered=True)) == pointers  # interpreting: not sm_100
    monkeypatch.setattr(expert_gemm, "_gather4_device", lambda device: True)
    assert expert_gemm._gather_load(Rows.dense(x, gathered=True)) == gather4
    assert expert_gemm._gather_load(Rows.dense(x.half(), gathered=True)) == gather4
    assert expert_gemm._gather_load(Rows.dense(x)) == pointers  # dense rows: not gathered
    assert expert_gemm._gather_load(Rows.dense(x.float(), gathered=True)) == pointers  # fp32
    assert expert_gemm._gather_load(Rows.dense(x[:0], gathered=True)) == pointers  # no token rows
    odd = torch.randn(40, 36, dtype=torch.bfloat16)[:, :33]
    assert expert_gemm._gather_load(Rows.dense(odd, gathered=True)) == pointers  # 72-byte rows
    shifted = x.view(-1)[1 : 1 + 39 * 32].view(39, 32)
    assert expert_gemm._gather_load(Rows.dense(shifted, gathered=True)) == pointers  # base off by 2 bytes
    monkeypatch.setattr(expert_gemm, "TMA_ROWS", False)
    assert expert_gemm._gather_load(Rows.dense(x, gathered=True)) == pointers
    monkeypatch.undo()
    _assert_sm100_only(monkeypatch, expert_gemm._gather4_device)


def _assert_sm100_only(monkeypatch, predicate) -> None:
    """``predicate(device)`` holds on a CUDA device of compute capability 10.0 only: not on sm_90 / sm_120 / sm_80,
    not on meta tensors (bench.model), not when interpreting."""
    assert not predicate(torch.device("cpu"))
    monkeypatch.setattr(expert_gemm, "interpreting", lambda: False)
    capability = {"cc": (10, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["cc"])
    assert predicate(torch.device("cuda", 0)) and not predicate(torch.device("meta"))
    for cc in ((9, 0), (12, 0), (8, 0)):
        capability["cc"] = cc
        assert not predicate(torch.device("cuda", 0))


def test_warp_specialization_only_on_sm100(monkeypatch):
    # gemm_kernel warp-specializes its K loop on sm_100 only (the audit builds WARP_SPEC there)
    _assert_sm100_only(monkeypatch, expert_gemm._warp_specialize)


def test_scale_tma_only_on_sm100(monkeypatch):
    # gemm_kernel's MX weight scales through TMA in tcgen05's chunks (SW_TMA) on sm_100 only (the audit builds it
    # there)
    _assert_sm100_only(monkeypatch, expert_gemm._scale_tma_device)
