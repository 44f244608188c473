"""Prequantized FP8 expert weights (inference): ``fp8.prequantize``, ``moe_mlp(..., weight_scales=)`` on both
backends and both dropless strategies bit for bit against the in-op FP8 forward of the same master weights,
``MoEExperts.quantize_fp8_`` and its state_dict round trip, every error path, the edges."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import poison_empty, routing

import blocksparse_moe as bsm
from blocksparse_moe import fp8
from blocksparse_moe.layers.moe import PaddedMoE, dMoE
from blocksparse_moe.ops.mlp import expert_mlp, mlp_routing
from blocksparse_moe.parallel import expert_parallel
from blocksparse_moe.routing import plan_routing

RECIPES = fp8.RECIPES
E4M3 = torch.float8_e4m3fn


def _weights(E: int, d: int, f: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(E, d, f, generator=g) / d**0.5
    w2 = torch.randn(E, f, d, generator=g) / f**0.5
    w3 = torch.randn(E, d, f, generator=g) / d**0.5
    return w1, w2, w3


def _problem(T: int, d: int, f: int, E: int, k: int, kind: str = "uniform", seed: int = 0):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, d, generator=g)
    return x, routing(T, k, E, kind, g), torch.rand(T, k, generator=g), *_weights(E, d, f, seed)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({E4M3: torch.uint8, torch.float32: torch.int32, torch.bfloat16: torch.int16}[t.dtype])


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the backends and the kernels allocate starts as NaN (``helpers.poison_empty``)."""
    poison_empty(monkeypatch)


# ----------------------------------------------------------------------------------------------- prequantize


@pytest.mark.parametrize("recipe", RECIPES)
def test_prequantize_is_the_in_op_quantization(recipe):
    """``prequantize`` = ``quantized_weight(w, recipe, 0, k_major=True)`` bit for bit (values and scales), stored
    K-major, scales of ``Recipe.weight_scale_shape``; the input is not modified and nothing records a graph. Odd
    sizes: K = 137 (a partial 128 and 32 group), N = 33."""
    w = torch.randn(2, 137, 33).requires_grad_()
    before = w.detach().clone()
    q, s = fp8.prequantize(w, recipe)
    rcp = fp8.recipe(recipe)
    want_q, want_s = fp8.quantized_weight(w.detach(), rcp, 0, k_major=True)
    assert q.dtype == E4M3 and q.shape == w.shape and q.stride(1) == 1
    assert torch.equal(_bits(q), _bits(want_q)) and torch.equal(s, want_s)
    assert s.dtype == rcp.scale_dtype and tuple(s.shape) == rcp.weight_scale_shape((2, 137, 33))
    assert not q.requires_grad and not s.requires_grad and torch.equal(w.detach(), before)
    fp8.weight_cache_clear()


def test_prequantize_errors():
    """Bad input to ``prequantize``: a clear error naming the argument."""
    with pytest.raises(ValueError, match=r"w must have shape \[E, K, N\]"):
        fp8.prequantize(torch.randn(4, 8), "blockwise")
    with pytest.raises(TypeError, match="w must have a dtype"):
        fp8.prequantize(torch.ones(1, 4, 8, dtype=torch.int32), "blockwise")
    with pytest.raises(ValueError, match="fp8 must be one of"):
        fp8.prequantize(torch.randn(1, 4, 8), "e5m2")


# ----------------------------------------------------------------------------------------------- functional


def _in_op_and_prequantized(problem, recipe, **kw):
    """``moe_mlp``'s in-op FP8 forward of the master weights and its forward of the same weights prequantized."""
    x, idx, weights, w1, w2, w3 = problem
    kw = dict(activation="silu", fp8=recipe, **kw)
    with torch.inference_mode():
        want = bsm.moe_mlp(x, idx, weights, w1, w2, w3, **kw)
        (q1, s1), (q2, s2), (q3, s3) = (fp8.prequantize(w, recipe) for w in (w1, w2, w3))
        got = bsm.moe_mlp(x, idx, weights, q1, q2, q3, weight_scales=(s1, s2, s3), **kw)
    return want, got


CASES = {
    "odd": (13, 37, 21, 4, 2, "skip"),  # odd d, f and T; the odd experts get no tokens
    "groups": (9, 136, 40, 3, 2, "uniform"),  # d crosses a 128 group (a partial K group), f a 32 group
    "E=1": (5, 24, 16, 1, 1, "uniform"),  # one expert
    "k=E": (6, 24, 16, 3, 3, "uniform"),  # every token to every expert
    "one-hot": (7, 24, 16, 4, 2, "one-hot"),  # all tokens to one expert (duplicate choices)
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("impl", ["grouped", "blocksparse"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_prequantized_forward_bit_exact(poisoned, recipe, impl, backend):
    """The forward of prequantized weights == the in-op FP8 forward of the master weights they came from, bit for
    bit (the same E4M3 values and scales), with every allocated buffer poisoned, on odd sizes and an expert with no
    tokens."""
    extra = {"block_size": 16} if impl == "blocksparse" else {}
    want, got = _in_op_and_prequantized(_problem(*CASES["odd"]), recipe, impl=impl, backend=backend, **extra)
    assert not want.isnan().any()
    assert torch.equal(_bits(got), _bits(want))
    fp8.weight_cache_clear()


@pytest.mark.parametrize("case", ["groups", "E=1", "k=E", "one-hot"])
def test_prequantized_forward_edges(poisoned, case):
    """The edges of ``CASES`` (each commented there), bit for bit, on the Triton backend (the kernels read the
    prequantized operands) with the grouped strategy, and on the torch backend with the block-sparse one."""
    problem = _problem(*CASES[case])
    for kw in (dict(impl="grouped", backend="triton"), dict(impl="blocksparse", backend="torch", block_size=16)):
        want, got = _in_op_and_prequantized(problem, "mxfp8" if case == "groups" else "blockwise", **kw)
        assert not want.isnan().any() and torch.equal(_bits(got), _bits(want)), kw
    fp8.weight_cache_clear()


def test_prequantized_row_major_weights_and_bf16_tokens():
    """E4M3 weights not stored K-major (a row-major copy) give the same bits on the Triton backend (copied K-major
    at the call); bf16 tokens run as with the in-op path; no GLU (w3 and s3 None)."""
    x, idx, weights, w1, w2, _ = _problem(8, 40, 24, 3, 2)
    x, w1, w2 = x.bfloat16(), w1.bfloat16(), w2.bfloat16()  # bf16 master weights
    (q1, s1), (q2, s2) = fp8.prequantize(w1, "rowwise"), fp8.prequantize(w2, "rowwise")
    kw = dict(activation="gelu", fp8="rowwise", impl="grouped", backend="triton")
    with torch.inference_mode():
        want = bsm.moe_mlp(x, idx, weights, w1, w2, **kw)
        got = bsm.moe_mlp(x, idx, weights, q1.contiguous(), q2.contiguous(), weight_scales=(s1, s2, None), **kw)
    assert got.dtype == torch.bfloat16 and torch.equal(_bits(got), _bits(want))
    fp8.weight_cache_clear()


def test_prequantized_empty_input():
    """No tokens: an empty output, no kernel."""
    x, idx, weights, w1, w2, w3 = _problem(0, 24, 16, 3, 2)
    (q1, s1), (q2, s2), (q3, s3) = (fp8.prequantize(w, "blockwise") for w in (w1, w2, w3))
    with torch.inference_mode():
        out = bsm.moe_mlp(x, idx, weights, q1, q2, q3, activation="silu", fp8="blockwise", weight_scales=(s1, s2, s3))
    assert out.shape == (0, 24) and out.dtype == torch.float32


def test_prequantized_errors():
    """Every misuse of ``weight_scales``: a clear error naming the argument, what was expected and what came."""
    x, idx, weights, w1, w2, w3 = _problem(6, 40, 24, 3, 2)
    (q1, s1), (q2, s2), (q3, s3) = (fp8.prequantize(w, "blockwise") for w in (w1, w2, w3))
    (m1, ms1), (m2, ms2), (m3, ms3) = (fp8.prequantize(w, "mxfp8") for w in (w1, w2, w3))
    (r1, rs1), (r2, rs2), (r3, rs3) = (fp8.prequantize(w, "rowwise") for w in (w1, w2, w3))

    def run(*ws, **kw):
        kw = {"activation": "silu", "fp8": "blockwise", "impl": "grouped", **kw}
        return bsm.moe_mlp(x, idx, weights, *ws, **kw)

    with pytest.raises(TypeError, match="w1, w2, w3 are float8_e4m3fn.*weight_scales"):
        run(q1, q2, q3)  # E4M3 weights without scales
    with pytest.raises(TypeError, match="w1, w2, w3 are float8_e4m3fn.*weight_scales"):
        run(q1, q2, q3, fp8=None)  # E4M3 weights without fp8 and scales
    with pytest.raises(ValueError, match="weight_scales need fp8"):
        run(q1, q2, q3, fp8=None, weight_scales=(s1, s2, s3))  # scales without fp8
    with pytest.raises(TypeError, match="w1 must be float8_e4m3fn with weight_scales.*got torch.float32"):
        run(w1, w2, w3, weight_scales=(s1, s2, s3))  # scales with unquantized weights
    with pytest.raises(TypeError, match=r"weight_scales\[0\] \(w1's scales\) must be torch.float32 for recipe "):
        run(m1, m2, m3, weight_scales=(ms1, ms2, ms3))  # mxfp8 weights and scales, fp8='blockwise'
    with pytest.raises(ValueError, match=r"weight_scales\[0\].*must have shape \(3, 1, 1\).*got \(3, 1, 24\)"):
        run(r1, r2, r3, weight_scales=(rs1, rs2, rs3))  # rowwise scales (same dtype), fp8='blockwise'
    with pytest.raises(TypeError, match=r"weight_scales must be a tuple \(s1, s2, s3\)"):
        run(q1, q2, q3, weight_scales=(s1, s2))
    with pytest.raises(TypeError, match=r"weight_scales\[2\] \(w3's scales\) must be a torch.Tensor, got NoneType"):
        run(q1, q2, q3, weight_scales=(s1, s2, None))
    with pytest.raises(ValueError, match=r"weight_scales\[2\] \(w3's scales\) must be None without w3"):
        run(q1, q2, weight_scales=(s1, s2, s3))
    with pytest.raises(ValueError, match="no backward: top_k_weights must not require grad"):
        bsm.moe_mlp(
            x, idx, weights.clone().requires_grad_(), q1, q2, q3, activation="silu", fp8="blockwise",
            weight_scales=(s1, s2, s3),
        )  # fmt: skip
    with pytest.raises(ValueError, match="fused expert MLP.*impl='padded'"):
        run(q1, q2, q3, weight_scales=(s1, s2, s3), impl="padded")
    with pytest.raises(ValueError, match="fused expert MLP.*activation=<function silu"):
        run(q1, q2, q3, weight_scales=(s1, s2, s3), activation=torch.nn.functional.silu)
    with pytest.raises(ValueError, match="must be on w1's device"):
        run(q1, q2, q3, weight_scales=(s1.to("meta"), s2, s3))


def test_compile_fullgraph():
    """The prequantized path traces under ``torch.compile(fullgraph=True)`` (the custom op's fake impl with the scale
    arguments) and gives the eager bits."""
    x, idx, weights, w1, w2, w3 = _problem(10, 40, 24, 3, 2)
    (q1, s1), (q2, s2), (q3, s3) = (fp8.prequantize(w, "blockwise") for w in (w1, w2, w3))

    def run(x, q1, q2, q3, s1, s2, s3):
        return bsm.moe_mlp(
            x, idx, weights, q1, q2, q3, activation="silu", fp8="blockwise", impl="grouped", backend="torch",
            check=False, weight_scales=(s1, s2, s3),
        )  # fmt: skip

    with torch.no_grad():
        want = run(x, q1, q2, q3, s1, s2, s3)
        got = torch.compile(run, fullgraph=True)(x, q1, q2, q3, s1, s2, s3)
    assert torch.equal(got, want)


def test_expert_mlp_op_checks():
    """``ops.mlp.expert_mlp`` (a public entry point) validates the scales and refuses a gradient; the custom op
    called directly with an input requiring grad refuses to record a graph (it has no backward)."""
    x, idx, weights, w1, w2, w3 = _problem(6, 40, 24, 3, 2)
    (q1, s1), (q2, s2), (q3, s3) = (fp8.prequantize(w, "mxfp8") for w in (w1, w2, w3))
    r = mlp_routing(plan_routing(idx, 3, block_size=1))
    with torch.inference_mode():
        want = expert_mlp(x, weights, w1, w2, w3, r, "silu", "torch", "mxfp8")
        got = expert_mlp(x, weights, q1, q2, q3, r, "silu", "torch", "mxfp8", (s1, s2, s3))
    assert torch.equal(got, want)
    with pytest.raises(TypeError, match=r"weight_scales\[1\] \(w2's scales\) must be torch.uint8"):
        expert_mlp(x, weights, q1, q2, q3, r, "silu", "torch", "mxfp8", (s1, s2.float(), s3))
    with pytest.raises(ValueError, match="no backward: weights must not require grad"):
        expert_mlp(x, weights.requires_grad_(), q1, q2, q3, r, "silu", "torch", "mxfp8", (s1, s2, s3))
    with pytest.raises(ValueError, match="prequantized FP8 weights.*has no backward"):
        torch.ops.bsm.expert_mlp(
            x, weights, q1, q2, q3, r.offsets, r.row_src, r.row_asg, r.assignment_row, 1, "silu", "torch", "mxfp8",
            s1, s2, s3,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------- the module


def _layer(recipe: str, seed: int, **kw) -> dMoE:
    torch.manual_seed(seed)
    return dMoE(40, 24, 4, 2, fp8=recipe, **kw).eval()


@pytest.mark.parametrize(
    "recipe, impl, backend",
    [("blockwise", "grouped", "torch"), ("mxfp8", "blocksparse", "torch"), ("rowwise", "grouped", "triton")],
)
def test_module_state_dict_round_trip(recipe, impl, backend, monkeypatch):
    """``quantize_fp8_``: the layer's output is the in-op FP8 output bit for bit; the experts hold 1 byte per weight
    plus their scales under stable names; ``torch.save`` / ``torch.load`` into a fresh (differently initialised)
    layer gives the same output; a dtype cast of the model leaves the FP8 buffers as they are."""
    monkeypatch.setenv("BSM_BACKEND", backend)
    kw = {"impl": impl, **({"block_size": 16} if impl == "blocksparse" else {})}
    layer = _layer(recipe, 0, **kw)
    x = torch.randn(3, 5, 40)
    with torch.inference_mode():
        want = layer(x)[0]
    assert layer.experts.quantize_fp8_() is layer.experts and layer.experts.prequantized == recipe
    with torch.inference_mode():
        got = layer(x)[0]
    assert torch.equal(got, want)
    state = layer.state_dict()
    names = ("w1", "w2", "w3")
    assert {k for k in state if k.startswith("experts.")} == {f"experts.{n}{s}" for n in names for s in ("", "_scale")}
    assert not list(layer.experts.parameters())
    weights_bytes = sum(state[f"experts.{n}"].nbytes for n in names)
    scale_bytes = sum(state[f"experts.{n}_scale"].nbytes for n in names)
    assert weights_bytes == 3 * 4 * 40 * 24  # one byte per weight
    assert scale_bytes <= {"blockwise": 4 * 3 * 4, "mxfp8": 3 * 4 * 2 * 40, "rowwise": 4 * 3 * 4 * 40}[recipe]

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = _layer(recipe, 1, **kw)
    fresh.experts.quantize_fp8_(recipe)
    fresh.load_state_dict(torch.load(buffer))
    assert fresh.experts.w1.stride(1) == 1  # K-major after the load: the kernels read it without a copy
    with torch.inference_mode():
        assert torch.equal(fresh(x)[0], want)
    fresh.to(torch.float64)  # a dtype cast of the model: the FP8 buffers keep the recipe's dtypes
    for n in names:
        assert fresh.experts.get_buffer(n).dtype == E4M3
        assert fresh.experts.get_buffer(f"{n}_scale").dtype == fp8.recipe(recipe).scale_dtype
    fp8.weight_cache_clear()


def test_module_errors():
    """The module's misuses: a recipe other than the layer's fp8 option, none at all, a capacity strategy, twice,
    a forward with another fp8, re-initialising, a gradient, checkpoints of another recipe or of prequantized
    weights into an unquantized layer, expert parallelism (not supported)."""
    layer = _layer("blockwise", 0, impl="grouped")
    with pytest.raises(ValueError, match="fp8 must be the experts' fp8 option 'blockwise', got 'mxfp8'"):
        layer.experts.quantize_fp8_("mxfp8")
    with pytest.raises(ValueError, match="quantize_fp8_ needs a recipe"):
        _layer(None, 0).experts.quantize_fp8_()
    with pytest.raises(ValueError, match="impl 'auto', 'grouped' or 'blocksparse', got impl='padded'"):
        PaddedMoE(40, 24, 4, 2).experts.quantize_fp8_("blockwise")
    plain = _layer(None, 0, impl="grouped")
    plain.experts.quantize_fp8_("rowwise")  # a layer without fp8 takes the recipe
    assert plain.options.fp8 == "rowwise"
    layer.experts.quantize_fp8_()
    with pytest.raises(ValueError, match="already prequantized"):
        layer.experts.quantize_fp8_()
    x = torch.randn(4, 40)
    with torch.inference_mode(), pytest.raises(ValueError, match="the fp8 option must be 'blockwise', got fp8='mxfp8'"):
        layer.experts(x, torch.zeros(4, 2, dtype=torch.long), torch.rand(4, 2), fp8="mxfp8")
    with pytest.raises(ValueError, match="not parameters to initialise"):
        layer.reset_parameters()
    with pytest.raises(ValueError, match="has no backward: top_k_weights must not require grad"):
        layer(x)  # grad mode on, the router's weights require grad
    with pytest.raises(RuntimeError, match="size mismatch for experts.w1_scale"):
        layer.load_state_dict(plain.state_dict())  # rowwise scales: the same dtype, another shape (torch's check)
    mx = _layer("mxfp8", 0, impl="grouped")
    mx.experts.quantize_fp8_()
    with pytest.raises(RuntimeError, match="the checkpoint has torch.uint8"):
        layer.load_state_dict(mx.state_dict())
    with pytest.raises(RuntimeError, match="call quantize_fp8_"):
        _layer("blockwise", 0, impl="grouped").load_state_dict(layer.state_dict())
    unquantized = _layer("blockwise", 1, impl="grouped").state_dict()
    with pytest.raises(RuntimeError, match="experts.w1: the experts hold FP8 weights.*has torch.float32"):
        layer.load_state_dict(unquantized, strict=False)
    with pytest.raises(ValueError, match="expert_parallel shards expert parameters; these experts hold prequantized"):
        expert_parallel(layer, None)  # checked before any process group is looked up
