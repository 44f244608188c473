"""The compiled kernels on a real GPU (``-m gpu``; every test skips without CUDA): the fused MLP of both dropless
strategies, forward and every gradient, against float64 on the same device, in bf16 / fp16 / fp32 and every FP8
recipe, at sizes that pick the TMA and pointer paths, the small-T and large-T tiles, and the named edges.

The interpreter tests prove the kernels' arithmetic on CPU; these prove what the interpreter cannot see: the
compiled code (wgmma / tcgen05 layouts, TMA descriptors, pipelining) computes the same thing. bf16 / fp16 / fp32
(fp32 IEEE by default, TF32 where PyTorch's setting allows it): as accurate as the torch backend in the same dtype
(``assert_close_to_reference``, factor 2). FP8: the Triton kernels' SQNR against the unquantized float64 MLP within
1.5 dB of the torch backend's emulation of the same recipe (same scales; only the accumulation order and the
quantize kernels differ)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close_to_reference, routing

import blocksparse_moe as bsm
from blocksparse_moe import fp8
from blocksparse_moe.reference import per_token_moe_mlp

pytestmark = pytest.mark.gpu

CASES = {
    # name: (T, d, f, E, k, routing kind)
    "aligned": (1000, 512, 768, 8, 2, "uniform"),  # sizes multiples of 128: TMA weights, several M tiles per expert
    "large-T": (4096, 256, 384, 8, 2, "uniform"),  # the large-T tiles (128 rows) of the launchers
    "unaligned": (301, 136, 200, 6, 2, "skip"),  # odd T, d, f not multiples of 16: pointer loads; empty experts
    "one-token": (1, 64, 96, 1, 1, "uniform"),  # one token, E = 1, k = 1
    "k=E": (77, 128, 160, 4, 4, "uniform"),  # k = E: every token on every expert
    "one-expert": (200, 128, 128, 8, 2, "one-hot"),  # all tokens on one expert, the others empty
    "decode": (64, 256, 128, 128, 8, "uniform"),  # decode: 128 fine-grained experts, most with 0-2 tokens
}
NAMES = ("out", "x", "weights", "w1", "w2", "w3")


def _problem(case: str, dtype: torch.dtype):
    T, d, f, E, k, kind = CASES[case]
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    idx = routing(T, k, E, kind, generator=gen).cuda()
    x = torch.randn(T, d, generator=gen).to("cuda", dtype)
    weights = torch.rand(T, k, generator=gen).cuda()
    w1, w3 = ((torch.randn(E, d, f, generator=gen) / math.sqrt(d)).to("cuda", dtype) for _ in range(2))
    w2 = (torch.randn(E, f, d, generator=gen) / math.sqrt(f)).to("cuda", dtype)
    dout = torch.randn(T, d, generator=gen).to("cuda", dtype)
    return x, idx, weights, w1, w2, w3, dout


def _run(problem, **options):
    """Output and the gradients of x, the combine weights, w1, w2, w3."""
    x, idx, weights, w1, w2, w3, dout = problem
    leaves = [t.detach().clone().requires_grad_() for t in (x, weights, w1, w2, w3)]
    out = bsm.moe_mlp(leaves[0], idx, *leaves[1:4], leaves[4], activation="silu", check=False, **options)
    return (out.detach(), *torch.autograd.grad(out, leaves, dout.to(out.dtype)))


def _reference(problem):
    """float64 output and gradients of the per-token loop (invalid ids contribute zero)."""
    x, idx, weights, w1, w2, w3, dout = problem
    E = w1.shape[0]
    leaves = [t.detach().double().requires_grad_() for t in (x, weights, w1, w2, w3)]
    valid = (idx >= 0) & (idx < E)
    out = per_token_moe_mlp(leaves[0], idx.clamp(0, E - 1), leaves[1] * valid, *leaves[2:4], leaves[4], "silu")
    return (out.detach(), *torch.autograd.grad(out, leaves, dout.double()))


def _sqnr(actual: torch.Tensor, reference: torch.Tensor) -> float:
    noise = (actual.double() - reference).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(reference.pow(2).sum().item() / noise)


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["blocksparse", "grouped"])
def test_fused_mlp_on_gpu(impl, case, dtype):
    """The Triton kernels as accurate as the torch backend in the same dtype, output and every gradient."""
    if dtype != torch.bfloat16 and case not in ("aligned", "unaligned"):
        pytest.skip("fp16 / fp32: the aligned and unaligned paths only (bf16 covers the edges)")
    problem = _problem(case, dtype)
    got = _run(problem, impl=impl, backend="triton")
    same = _run(problem, impl=impl, backend="torch")
    ref = _reference(problem)
    for name, g, s, r in zip(NAMES, got, same, ref):
        assert g.dtype == s.dtype and g.shape == s.shape, name
        assert torch.isfinite(g).all(), f"{name}: not finite (an unwritten element?)"
        assert_close_to_reference(g, r, s, msg=f"{impl} {case} {name}: ")


@pytest.mark.parametrize("case", ["aligned", "decode"])  # the large-T tiles: bf16 above
@pytest.mark.parametrize("recipe", ["blockwise", "mxfp8", "rowwise"])
@pytest.mark.parametrize("impl", ["blocksparse", "grouped"])
def test_fp8_mlp_on_gpu(impl, recipe, case):
    """The FP8 tensor-core kernels (QGMMA on sm_90, UTCQMMA on sm_100) as accurate as the emulation of the same
    recipe, by SQNR against the unquantized float64 MLP, output and every gradient."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("E4M3 tensor cores need sm_89 or newer")
    problem = _problem(case, torch.bfloat16)
    got = _run(problem, impl=impl, backend="triton", fp8=recipe)
    emulated = _run(problem, impl=impl, backend="torch", fp8=recipe)
    ref = _reference(problem)
    for name, g, e, r in zip(NAMES, got, emulated, ref):
        assert torch.isfinite(g).all(), f"{name}: not finite"
        s_got, s_emu = _sqnr(g, r), _sqnr(e, r)
        print(f"{impl} {recipe} {case} {name}: SQNR {s_got:.1f} dB (emulation {s_emu:.1f} dB)")
        assert s_got >= min(s_emu, 40.0) - 1.5, f"{name}: SQNR {s_got:.1f} dB vs the emulation's {s_emu:.1f} dB"


@pytest.mark.parametrize("impl", ["blocksparse", "grouped"])
def test_fp32_follows_pytorchs_tf32_setting_on_gpu(impl):
    """fp32 with TF32 allowed (``torch.backends.cuda.matmul.fp32_precision = "tf32"``): the kernels' TF32 tensor-core
    dots as accurate as PyTorch's TF32 matmuls (the default, IEEE, is ``test_fused_mlp_on_gpu``'s fp32 case)."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        problem = _problem("aligned", torch.float32)
        got = _run(problem, impl=impl, backend="triton")
        same = _run(problem, impl=impl, backend="torch")
    finally:
        matmul.fp32_precision = before
    for name, g, s, r in zip(NAMES, got, same, _reference(problem)):
        assert_close_to_reference(g, r, s, msg=f"{impl} tf32 {name}: ")


@pytest.mark.parametrize("recipe", ["blockwise", "mxfp8", "rowwise"])
@pytest.mark.parametrize("impl", ["blocksparse", "grouped"])
def test_prequantized_fp8_on_gpu(impl, recipe):
    """Prequantized E4M3 weights (``fp8.prequantize``, as a checkpoint holds them) give the in-op FP8 forward of the
    weights they came from bit for bit: the same K-major E4M3 operands and scales reach the same kernels."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("E4M3 tensor cores need sm_89 or newer")
    x, idx, weights, w1, w2, w3, _ = _problem("decode", torch.bfloat16)
    options = dict(activation="silu", impl=impl, backend="triton", fp8=recipe, check=False)
    with torch.inference_mode():
        expected = bsm.moe_mlp(x, idx, weights, w1, w2, w3, **options)
        (q1, s1), (q2, s2), (q3, s3) = (fp8.prequantize(w, recipe) for w in (w1, w2, w3))
        got = bsm.moe_mlp(x, idx, weights, q1, q2, q3, weight_scales=(s1, s2, s3), **options)
    assert torch.isfinite(got).all() and torch.equal(got, expected)
