"""Decode-shaped MoE layers: a few tokens over many experts (4 rows per expert at T = 64, k = 8, E = 128).

- the M tile the Triton backend picks for the grouped (unpadded) rows, from shapes only: 16-64 rows when experts
  expect few rows (the FP8 MLP's: 64), 128 for large shapes;
- the fused expert MLP at each of those tiles against the float64 per-token loop (interpreter, small shapes, every
  allocation poisoned), with the edges;
- what a captured decode step needs: no host sync and no data-dependent allocation in the forward and the
  backward. On CPU, ``torch.compile(fullgraph=True)`` traces the layer (router, routing, the custom ops' fake
  impls) and fails on any ``.item()`` / ``.tolist()`` / ``nonzero`` / ``bool(tensor)``; the custom ops' real
  implementations run on meta tensors in ``bench.model`` at the decode shape (``tests/test_model.py``), where the
  same calls fail. On a GPU, the decode step is captured in a CUDA graph and replayed (``-m gpu``).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import POISON, Recorded, assert_close_to_reference, routing

from blocksparse_moe import backends
from blocksparse_moe.layers.moe import dMoE
from blocksparse_moe.ops.mlp import expert_mlp, mlp_routing
from blocksparse_moe.reference import per_token_moe_mlp
from blocksparse_moe.routing import plan_routing

TRITON = backends.get("triton")


def test_grouped_m_tile_follows_the_rows_per_expert(monkeypatch):
    monkeypatch.setattr(TRITON, "interpreting", lambda: False)  # the GPU choice (16 whenever interpreting)
    tile = TRITON._grouped_block_m
    assert TRITON.MIN_BLOCK_M == 32  # 16-bit: never 16 rows on a GPU (sm_90 / sm_100 run them swapped, N = 16)
    assert tile(64 * 8, 128) == 32  # decode: 4 rows per expert
    assert tile(16 * 8, 8) == 32  # 16 rows per expert
    assert tile(17 * 8, 8) == 32
    assert tile(32 * 8, 8) == 32
    assert tile(33 * 8, 8) == 64  # 33 to 127 rows: 64-row (wgmma) tiles, as before
    assert tile(127 * 8, 8) == 64
    assert tile(128 * 8, 8) == 128  # large shapes (Mixtral: 4096 rows per expert; fine-grained training: 2048)
    assert tile(32768 * 8, 128) == 128
    assert tile(100, 3) == 64  # odd: ceil(100 / 3) = 34 rows
    assert tile(5, 1) == 32  # E = 1
    assert tile(0, 4) == 32  # no rows
    # FP8 (the FP8 MLP's E4M3 GEMMs): at least 64 rows (E4M3 MMAs need M >= 64: QGMMA / UTCQMMA)
    assert TRITON.FP8_MIN_BLOCK_M == 64
    assert tile(64 * 8, 128, fp8=True) == 64  # decode: 4 rows per expert
    assert tile(32 * 8, 8, fp8=True) == 64
    assert tile(127 * 8, 8, fp8=True) == 64
    assert tile(128 * 8, 8, fp8=True) == 128  # large shapes as without FP8
    assert tile(5, 1, fp8=True) == 64  # E = 1
    assert tile(0, 4, fp8=True) == 64  # no rows


CASES = {
    # name: (T, d, f, E, k, routing kind)
    "decode": (6, 16, 24, 16, 4, "uniform"),  # 24 assignments over 16 experts: 1-2 rows each, empty experts
    "one-token": (1, 8, 12, 8, 8, "uniform"),  # one token, k = E
    "one-expert": (40, 8, 12, 4, 1, "one-hot"),  # all tokens to one expert: several tiles of 16 / 32 rows
    "E=1": (3, 9, 7, 1, 1, "uniform"),  # E = 1; odd d and f
    "invalid": (8, 8, 12, 16, 2, "invalid"),  # ids -1, E, E+5: rows past offsets[E], zeroed by spare tiles
}


@pytest.mark.parametrize("block_m", [16, 32, 64])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_mlp_at_each_small_tile(case, block_m, monkeypatch):
    """The grouped strategy's fused MLP with M tiles of ``block_m`` rows (what ``_grouped_block_m`` picks: 16 when
    interpreting, 32 and 64 for small T on a GPU), forward and every gradient, against float64: at most 2x the torch
    backend's fp32 error."""
    monkeypatch.setattr(TRITON, "_grouped_block_m", lambda rows, num_experts, fp8=False: block_m)
    empty = torch.empty

    def poisoned(*args, **kwargs):  # an element no kernel writes shows up as NaN
        t = empty(*args, **kwargs)
        return t.fill_(POISON) if t.is_floating_point() else t.fill_(-(2**30))

    T, d, f, E, k, kind = CASES[case]
    x = torch.randn(T, d)
    idx = routing(T, k, E, kind)
    weights = torch.rand(T, k)
    w1, w3 = (torch.randn(E, d, f) / math.sqrt(d) for _ in range(2))
    w2 = torch.randn(E, f, d) / math.sqrt(f)
    inputs = [t.clone() for t in (x, idx, weights, w1, w2, w3)]
    cot = torch.randn(T, d)
    plan = plan_routing(idx, E, block_size=1, check=False)
    results = {}
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (x, weights, w1, w2, w3)]
        with monkeypatch.context() as m:
            if backend == "triton":
                m.setattr(torch, "empty", poisoned)
            out = expert_mlp(*leaves, mlp_routing(plan), "silu", backend)
            results[backend] = [out, *torch.autograd.grad(out, leaves, cot)]
    valid = (idx >= 0) & (idx < E)
    ref_leaves = [t.double().requires_grad_() for t in (x, weights, w1, w2, w3)]
    rx, rw, rw1, rw2, rw3 = ref_leaves
    ref = per_token_moe_mlp(rx, idx.clamp(0, E - 1), rw * valid, rw1, rw2, rw3, "silu")
    expected = [ref.detach(), *torch.autograd.grad(ref, ref_leaves, cot.double())]
    for name, got, same, want in zip(["out", "x", "weights", "w1", "w2", "w3"], *results.values(), expected):
        assert_close_to_reference(got, want, same, msg=f"{name}: ")
    for before, after in zip(inputs, (x, idx, weights, w1, w2, w3)):  # inputs never modified
        assert torch.equal(before, after)


@pytest.mark.parametrize("impl", ["grouped", "blocksparse"])
def test_fp8_mlp_decode_tiles(impl, monkeypatch):
    """The FP8 MLP (mxfp8: a quantized in the up-projection's epilogue) at a decode shape (6 tokens, k = 2 of E = 8
    experts: 1-2 rows per expert, empty experts) runs its GEMMs on the backend's GPU choice of M tile, 64 rows
    (``_grouped_block_m(..., fp8=True)``; the interpreter's configs otherwise), forward and backward, also over the
    block-sparse strategy's 16-row blocks: bit for bit the interpreter's 16-row tiles (a row's sums do not depend on
    the tile that holds it)."""
    from blocksparse_moe import functional
    from blocksparse_moe.kernels import expert_gemm

    T, d, f, E, k = 6, 32, 48, 8, 2
    x, weights = torch.randn(T, d), torch.rand(T, k)
    idx = routing(T, k, E, "uniform")
    w1, w3, w2 = torch.randn(E, d, f) / d**0.5, torch.randn(E, d, f) / d**0.5, torch.randn(E, f, d) / f**0.5
    dout = torch.randn(T, d)
    block = {"block_size": 16} if impl == "blocksparse" else {}
    results = {}
    for gpu_tiles in (False, True):
        with monkeypatch.context() as m:
            if gpu_tiles:
                m.setattr(TRITON, "interpreting", lambda: False)  # the backend's GPU tile choice
            kernel = Recorded(expert_gemm.gemm_kernel)
            m.setattr(expert_gemm, "gemm_kernel", kernel)
            leaves = [t.clone().requires_grad_() for t in (x, weights, w1, w2, w3)]
            out = functional.moe_mlp(leaves[0], idx, leaves[1], leaves[2], leaves[3], leaves[4], activation="silu",
                                     impl=impl, backend="triton", fp8="mxfp8", **block)  # fmt: skip
            out.backward(dout)
        results[gpu_tiles] = [out.detach(), *(t.grad for t in leaves)]
        assert {c["BLOCK_M"] for c in kernel.calls} == {64 if gpu_tiles else 16}
    for name, interpreter, gpu in zip(["out", "x", "weights", "w1", "w2", "w3"], results[False], results[True]):
        assert not gpu.isnan().any() and torch.equal(interpreter, gpu), name


def _step(module: torch.nn.Module, x: torch.Tensor, dout: torch.Tensor) -> list[torch.Tensor]:
    """One decode step, forward and backward: the output and the gradients of x and of every parameter."""
    y, aux = module(x)
    return [y, *torch.autograd.grad((y * dout).sum() + aux, [x, *module.parameters()])]


@pytest.mark.parametrize("impl", ["auto", "blocksparse"])
def test_decode_step_traces_fullgraph(impl):
    """A decode-shaped dMoE (T = 6 tokens, k = 4 of E = 16 experts) traces whole under torch.compile(fullgraph=True),
    forward and backward (a host sync or a data-dependent size would break the graph and raise), and matches eager.
    "auto" is the grouped strategy here (CPU), as on a GPU at the decode shape."""
    block = {"block_size": 16} if impl == "blocksparse" else {}
    m = dMoE(16, 24, 16, 4, impl=impl, **block)
    x = torch.randn(6, 16, requires_grad=True)
    dout = torch.randn(6, 16)
    eager = _step(m, x, dout)
    compiled = _step(torch.compile(m, fullgraph=True), x, dout)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["auto", "blocksparse"])
def test_decode_step_captures_in_a_cuda_graph(impl):
    """The decode step (T = 64, k = 8 of E = 128 experts, bf16) is captured in a CUDA graph, forward and backward
    (capture fails on a host sync), and its replay on new inputs equals an eager step."""
    m = dMoE(256, 128, 128, 8, impl=impl).cuda().to(torch.bfloat16)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: JIT compiles, the allocator's pools
        for _ in range(2):
            _step(m, x, dout)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _step(m, x, dout)
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
    graph.replay()
    for a, b in zip(captured, _step(m, x, dout)):
        torch.testing.assert_close(a, b)
