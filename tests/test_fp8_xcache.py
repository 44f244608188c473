"""The FP8 expert MLP saves the forward's E4M3 x (and its scales) for backward instead of x (issue 17): the saved
tensors, and the gradients of the Triton kernels (interpreted) against the float64 reference of the quantized math
with x requantized from that cache (``test_fp8._reference``) on the edges the PyTorch emulation's tests cover
(``test_fp8.test_mlp_edges``, ``test_mlp_exact_quantized_math``)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from test_fp8 import NAMES, _problem, _reference, _run, sqnr

import blocksparse_moe as bsm
from blocksparse_moe import fp8


def _saved(x, idx, weights, w1, w2, w3, **kw) -> dict[int, torch.Tensor]:
    """The tensors autograd saves during one moe_mlp call, one per storage."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        bsm.moe_mlp(x, idx, weights, w1, w2, w3, activation="silu", **kw)
    return saved


@pytest.mark.parametrize("backend, impl", [("torch", "grouped"), ("triton", "blocksparse")])
@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_saved_fp8_x_instead_of_x(recipe, backend, impl):
    """With fp8 autograd saves the E4M3 x ``[T, d]`` and its scales (``Recipe.act_scale_shape``) and not x: the
    bytes drop by ``2·T·d`` (bf16 x) less the scales; everything else saved is the same as without fp8."""
    T, d = 20, 32
    x, idx, weights, w1, w2, w3, _ = (t.bfloat16() if t.is_floating_point() else t for t in _problem(T, d, 24, 3, 2))
    x.requires_grad_()
    kw = dict(impl=impl, backend=backend, **({"block_size": 16} if impl == "blocksparse" else {}))
    plain = _saved(x, idx, weights, w1, w2, w3, **kw)
    cached = _saved(x, idx, weights, w1, w2, w3, fp8=recipe, **kw)
    x_key = x.untyped_storage().data_ptr()
    assert x_key in plain and x_key not in cached  # the bf16 x is not saved with fp8
    rcp = fp8.recipe(recipe)
    kinds = lambda saved: Counter((str(t.dtype), tuple(t.shape)) for t in saved.values())  # noqa: E731
    want = kinds(plain) - Counter({(str(x.dtype), (T, d)): 1})
    want += Counter({("torch.float8_e4m3fn", (T, d)): 1, (str(rcp.scale_dtype), rcp.act_scale_shape(T, d)): 1})
    assert kinds(cached) == want
    nbytes = lambda saved: sum(t.untyped_storage().nbytes() for t in saved.values())  # noqa: E731
    scale_bytes = T * rcp.act_scale_shape(T, d)[1] * (4 if rcp.scale_dtype == torch.float32 else 1)
    assert nbytes(cached) == nbytes(plain) - 2 * T * d + T * d + scale_bytes


@pytest.mark.parametrize(
    "case, impl, recipe",
    [
        ("k=E", "grouped", "blockwise"),  # every token to every expert
        ("one-hot", "blocksparse", "mxfp8"),  # all tokens to one expert, the block-padded rows
        ("odd", "grouped", "rowwise"),  # odd sizes (d = 37, f = 19, T = 11), an expert with no tokens ("skip")
    ],
)
def test_triton_fp8_xcache_edges(case, impl, recipe):
    """The Triton FP8 MLP (interpreted), whose dW1 / dW3 read x requantized from the saved E4M3 x, equals the
    float64 reference of that quantized math up to fp32 accumulation order (> 60 dB; without the requantization the
    weight gradients are ~27 dB away) on edges beside ``test_fp8``'s (empty expert, one token, E = 1 there)."""
    T, d, f, E, k, kind = {"k=E": (6, 40, 24, 3, 3, "uniform"), "one-hot": (9, 40, 24, 4, 2, "one-hot"),
                           "odd": (11, 37, 19, 4, 2, "skip")}[case]  # fmt: skip
    problem = _problem(T=T, d=d, f=f, E=E, k=k, kind=kind)
    kw = {"block_size": 16} if impl == "blocksparse" else {}
    got = _run(*problem, impl=impl, fp8=recipe, backend="triton", **kw)
    ref = _reference(*problem, recipe)
    for name, a, b in zip(NAMES, got, ref):
        assert sqnr(a, b) > 60, f"{name}: {sqnr(a, b):.1f} dB from the quantized reference"


def test_bench_fp8_xcache_gradients():
    """The measurement behind the choice (``python -m bench.fp8_xcache``): its hand-written float64 backward,
    unquantized, equals the MLP's (moe_mlp, float64); quantized with x from its FP8 copy it is this module's
    reference (``test_fp8._reference``) up to where the latter rounds to fp32 (> 60 dB); an expert with no tokens
    ("skip")."""
    from bench.fp8_xcache import gradients

    x, idx, weights, w1, w2, w3, dout = (t.double() if t.is_floating_point() else t
                                         for t in _problem(T=10, d=40, f=24, E=3, k=2, kind="skip"))  # fmt: skip
    exact = _run(x, idx, weights, w1, w2, w3, dout, impl="grouped", backend="torch")
    got = gradients(x, idx, weights, w1, w2, w3, dout, None, False)
    for name, a in zip(NAMES[1:], exact[1:]):
        torch.testing.assert_close(got[name], a, rtol=1e-10, atol=1e-12, msg=name)
    quantized = gradients(x, idx, weights, w1, w2, w3, dout, "blockwise", True)
    ref = _reference(x, idx, weights, w1, w2, w3, dout, "blockwise")
    for name, b in zip(NAMES[1:], ref[1:]):
        assert sqnr(quantized[name], b) > 60, f"{name}: {sqnr(quantized[name], b):.1f} dB"  # ~140 (x from bf16: ~30)
