"""The FP8 expert MLP saves the forward's E4M3 x (and its scales) for backward instead of x (issue 17): the saved
tensors, and the gradients of the Triton kernels (interpreted) against the float64 reference of the quantized math
with x requantized from that cache (``test_fp8._reference``) on the edges the PyTorch emulation's tests cover
(``test_fp8.test_mlp_edges``, ``test_mlp_exact_quantized_math``)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from helpers import saved_storages
from test_fp8 import NAMES, _problem, _reference, _run, sqnr

import blocksparse_moe as bsm
from blocksparse_moe import fp8


def _saved(x, idx, weights, w1, w2, w3, **kw) -> dict[int, torch.Tensor]:
    """The tensors autograd saves during one moe_mlp call, one per storage."""
    return saved_storages(lambda: bsm.moe_mlp(x, idx, weights, w1, w2, w3, activation="silu", **kw))


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


# ----------------------------------------------------------------------------------------------- fp8_cache_x=False


def _kinds(saved: dict[int, torch.Tensor]) -> Counter:
    return Counter((str(t.dtype), tuple(t.shape)) for t in saved.values())


@pytest.mark.parametrize("backend, impl", [("torch", "grouped"), ("triton", "blocksparse")])
@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_saved_x_itself_without_fp8_cache_x(recipe, backend, impl):
    """``fp8_cache_x=False``: autograd keeps x's own storage and no E4M3 copy, the same tensors as without fp8
    (True, the default: the E4M3 x and its scales instead, ``test_saved_fp8_x_instead_of_x``)."""
    T, d = 20, 32
    x, idx, weights, w1, w2, w3, _ = (t.bfloat16() if t.is_floating_point() else t for t in _problem(T, d, 24, 3, 2))
    x.requires_grad_()
    kw = dict(impl=impl, backend=backend, **({"block_size": 16} if impl == "blocksparse" else {}))
    plain = _saved(x, idx, weights, w1, w2, w3, **kw)
    options = bsm.MoEOptions(fp8=recipe, fp8_cache_x=False, **kw)
    kept = _saved(x, idx, weights, w1, w2, w3, options=options)
    assert x.untyped_storage().data_ptr() in kept
    assert _kinds(kept) == _kinds(plain) and not any(t.dtype == torch.float8_e4m3fn for t in kept.values())


def _modes(problem, **kw):
    """moe_mlp's results with the FP8 x kept (True) and with x kept (False)."""
    return {cache: _run(*problem, options=bsm.MoEOptions(fp8_cache_x=cache, **kw)) for cache in (True, False)}


@pytest.mark.parametrize(
    "case, impl, backend, recipe",
    [
        ("skip", "grouped", "torch", "blockwise"),  # an expert with no tokens; 130 rows in expert 0 (two row groups)
        ("skip", "blocksparse", "torch", "rowwise"),  # the block-padded rows
        ("k=E", "grouped", "torch", "mxfp8"),  # every token to every expert
        ("odd", "grouped", "triton", "blockwise"),  # odd sizes (d = 37, f = 19, T = 11) and an empty expert, kernels
        ("one-hot", "blocksparse", "triton", "mxfp8"),  # all tokens to one expert, blocks, kernels
        ("E=1", "grouped", "triton", "rowwise"),  # one expert, one token, kernels
    ],
)
def test_fp8_cache_x_false_quantizes_x_itself(case, impl, backend, recipe):
    """``fp8_cache_x=False`` is the quantized math with x's weight-gradient operand quantized from x itself: its dW1 /
    dW3 equal that float64 reference (``test_fp8._reference(..., cached=False)``) up to fp32 accumulation order
    (> 60 dB: 131-133 measured at "skip") and not the FP8-x one (27.5-27.8 dB from it there, blockwise and rowwise;
    mxfp8's power-of-two scales requantize the FP8 x losslessly: the two references agree); everything else is the
    default mode's bit for bit (the same forward, dx, dweights, dW2)."""
    T, d, f, E, k, kind = {"skip": (130, 40, 24, 4, 2, "skip"), "k=E": (6, 40, 24, 3, 3, "uniform"),
                           "odd": (11, 37, 19, 4, 2, "skip"), "one-hot": (9, 40, 24, 4, 2, "one-hot"),
                           "E=1": (1, 40, 24, 1, 1, "uniform")}[case]  # fmt: skip
    problem = _problem(T=T, d=d, f=f, E=E, k=k, kind=kind)
    if case == "skip":
        problem[1][:, 0] = 0  # expert 0: 130 rows
    kw = dict(impl=impl, backend=backend, fp8=recipe, **({"block_size": 16} if impl == "blocksparse" else {}))
    got = _modes(problem, **kw)
    exact, cached = _reference(*problem, recipe, cached=False), _reference(*problem, recipe)
    for i, name in enumerate(NAMES):
        if name in ("dw1", "dw3"):
            assert sqnr(got[False][i], exact[i]) > 60, f"{name}: {sqnr(got[False][i], exact[i]):.1f} dB"
            assert sqnr(got[True][i], cached[i]) > 60, f"{name} (FP8 x): {sqnr(got[True][i], cached[i]):.1f} dB"
            if recipe != "mxfp8":  # mxfp8's power-of-two scales requantize the FP8 x (nearly) losslessly
                assert sqnr(got[False][i], cached[i]) < 45, f"{name}: the modes are told apart"
        else:
            assert torch.equal(got[False][i], got[True][i]), name


def test_fp8_cache_x_option_validated():
    """The field takes None or a bool, and only with an fp8 recipe; ``expert_mlp`` checks its own argument."""
    assert bsm.MoEOptions().fp8_cache_x is None
    with pytest.raises(TypeError, match="fp8_cache_x must be a bool"):
        bsm.MoEOptions(fp8="blockwise", fp8_cache_x=1)
    with pytest.raises(ValueError, match="fp8_cache_x applies with an fp8 recipe, got fp8_cache_x=False and fp8=None"):
        bsm.MoEOptions(fp8_cache_x=False)
    from blocksparse_moe.ops.mlp import expert_mlp, mlp_routing
    from blocksparse_moe.routing import plan_routing

    x, idx, weights, w1, w2, w3, _ = _problem(T=4, d=8, f=8, E=2, k=1)
    routing = mlp_routing(plan_routing(idx, 2, block_size=1))
    with pytest.raises(TypeError, match="fp8_cache_x must be a bool"):
        expert_mlp(x, weights, w1, w2, w3, routing, "silu", "torch", "blockwise", None, "no")


# ----------------------------------------------------------------------------------------------- the layers


def _layer_bytes(layer, x) -> int:
    """Activation bytes autograd keeps for one layer forward (``bench.memory``: each storage once, parameters apart)."""
    from bench.memory import saved_for_backward

    return saved_for_backward(lambda: layer(x), list(layer.parameters()))[1].activation_bytes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dmoe_experts_keep_the_routers_x(dtype):
    """A ``dMoE`` with fp8 lets its experts keep x itself where its router keeps that x (``fp8_cache_x`` None): the
    layer saves what it saves without fp8, ``d`` plus the scales' bytes per token less than with the FP8 x forced
    (``fp8_cache_x=True``). Measured (``bench.memory.saved_for_backward``, CPU, T=512 d=256 f=512 E=8 k=2, grouped,
    PyTorch backend, blockwise): bf16 5544 B/token before the router kept x itself, 5032 after, 4768 with the
    experts keeping x (fp8=None: 5792 -> 4768); fp32 9640 -> 9376 (fp8=None: 9376). With jitter in training the
    router keeps its jittered copy and the experts keep the FP8 x."""
    T, d, f, E, k = 24, 32, 24, 4, 2
    x = torch.randn(T, d, dtype=dtype, requires_grad=True)
    opts = dict(impl="grouped", backend="torch")
    torch.manual_seed(0)
    plain = bsm.dMoE(d, f, E, k, options=bsm.MoEOptions(**opts)).to(dtype)
    layers = {}
    for cache in (None, True):
        layers[cache] = bsm.dMoE(d, f, E, k, options=bsm.MoEOptions(fp8="blockwise", fp8_cache_x=cache, **opts))
        layers[cache].load_state_dict(plain.state_dict())
        layers[cache].to(dtype)
    scale_bytes = 4 * fp8.recipe("blockwise").act_scale_shape(T, d)[1]
    assert _layer_bytes(layers[None], x) == _layer_bytes(plain, x)
    assert _layer_bytes(layers[True], x) == _layer_bytes(plain, x) + T * d + T * scale_bytes
    # with jitter (training) the router keeps its jittered fp32 copy, not x: the experts keep the FP8 x instead of x
    jittered = bsm.dMoE(d, f, E, k, options=bsm.MoEOptions(fp8="blockwise", **opts), jitter_eps=0.1).to(dtype)
    jittered_plain = bsm.dMoE(d, f, E, k, options=bsm.MoEOptions(**opts), jitter_eps=0.1).to(dtype)
    fp8_x = T * d + T * scale_bytes
    assert _layer_bytes(jittered, x) == _layer_bytes(jittered_plain, x) - T * d * x.element_size() + fp8_x


def test_dmoe_fp8_compile_fullgraph():
    """The layer's per-call choice traces under ``torch.compile(fullgraph=True)``: an fp32 ``dMoE`` with fp8 (the
    experts keep x) equals eager, forward and backward."""
    layer = bsm.dMoE(
        16, 24, 4, 2, options=bsm.MoEOptions(fp8="blockwise", impl="grouped", backend="torch", check=False)
    )
    x = torch.randn(12, 16)
    results = []
    for fn in (layer, torch.compile(layer, fullgraph=True, backend="aot_eager")):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out, aux = fn(xi)
        (out.sum() + aux).backward()
        results.append((out.detach(), xi.grad, *(p.grad for p in layer.parameters())))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cache_x", [None, True])
@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])  # moe_mlp; custom_moe_mlp (a custom gate, biases)
def test_hf_experts_keep_the_gates_x(name, cache_x):
    """Registered with fp8, a Hugging Face model's experts keep ``hidden_states`` itself, which the model's gate
    linear keeps anyway (``fp8_cache_x`` None), no E4M3 copy; ``fp8_cache_x=True`` keeps the E4M3 copy."""
    tf = pytest.importorskip("transformers")
    from hf_models import CONFIGS

    from blocksparse_moe.integrations import transformers as bsm_hf

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[name]()).float()
    bsm_hf.register("bsm_fp8_cache_x", options=bsm.MoEOptions(fp8="blockwise", fp8_cache_x=cache_x))
    model.set_experts_implementation("bsm_fp8_cache_x")
    ids = torch.randint(0, 64, (2, 7))
    saved = saved_storages(lambda: model(ids))
    e4m3 = [t for t in saved.values() if t.dtype == torch.float8_e4m3fn]
    assert [tuple(t.shape) for t in e4m3] == ([] if cache_x is None else [(14, 32)])


def _check_expert_parallel_keeps_fp8_x(rank: int, world: int) -> None:
    import torch.distributed as dist

    from blocksparse_moe.parallel import expert_parallel

    layer = expert_parallel(bsm.dMoE(16, 24, 2, 2, options=bsm.MoEOptions(fp8="blockwise", impl="grouped")), None)
    x = torch.randn(10, 16, requires_grad=True)
    e4m3 = []  # the collectives' saved tensors have no storage to key by: the E4M3 ones listed by shape

    def pack(t):
        if t.dtype == torch.float8_e4m3fn:
            e4m3.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    assert e4m3 == [(20, 16)] and dist.get_world_size() == world  # the received rows (T·k at one rank), as E4M3


def test_expert_parallel_experts_keep_their_fp8_x():
    """Under ``expert_parallel`` the experts compute with the received rows, which nothing else keeps: the layer's
    per-call ``fp8_cache_x=False`` (its router keeps x) does not reach them, they keep the rows' FP8 copy."""
    from multiprocess import spawn

    spawn(1, _check_expert_parallel_keeps_fp8_x)


def test_bench_fp8_xcache_memory():
    """``python -m bench.fp8_xcache --memory``'s measurement: a bf16 ``dMoE`` with fp8 keeps what it keeps without
    (its experts keep the router's x), ``d`` plus the blockwise scales' bytes per token less than with the FP8 x
    forced; its router keeps x in bf16 (``2·d`` B/token plus the scores)."""
    from bench.fp8_xcache import saved_bytes

    T, d, f, E, k = 16, 32, 24, 4, 2
    plain, router = saved_bytes(T, d, f, E, k, torch.bfloat16, None, None)
    assert saved_bytes(T, d, f, E, k, torch.bfloat16, "blockwise", None) == (plain, router)
    assert saved_bytes(T, d, f, E, k, torch.bfloat16, "blockwise", True) == (plain + d + 4, router)
    assert router == 2 * d + 4 * E + 8 * k + 4 * k + 4


# ----------------------------------------------------------------------------------------------- op-composing paths


@pytest.mark.parametrize(
    "path",
    [
        "padded",  # the capacity buffers' E4M3 copy, one for both up-projections
        "callable",  # the grouped strategy op by op (a callable activation): x's E4M3 copy, shared by w1 and w3
        "custom",  # custom_moe_mlp (one concatenated up-projection)
    ],
)
def test_op_composing_paths_follow_fp8_cache_x(path):
    """The padded strategy and the op-by-op paths keep, with ``fp8_cache_x`` None / True, one E4M3 copy of their
    up-projections' operand (``[rows, d]`` E4M3 plus scales) and not that operand; with False the operand and no
    E4M3 copy. Only dW1 / dW3 (dW13) differ between the modes: the rest bit for bit. Failed before: both kept the
    operand in its own dtype (the padded buffers, x)."""
    T, d, f, E, k = 12, 32, 24, 3, 2
    x, idx, weights, w1, w2, w3, dout = (
        t.bfloat16() if t.is_floating_point() else t for t in _problem(T=T, d=d, f=f, E=E, k=k)
    )
    silu = torch.nn.functional.silu

    def call(cache, x, weights, w1, w2, w3):
        mode = dict(backend="torch", fp8="blockwise", fp8_cache_x=cache)
        if path == "custom":
            return bsm.custom_moe_mlp(
                x, idx, weights, torch.cat([w1, w3], 2), w2,
                activation=lambda h: silu(h[:, :f]) * h[:, f:], **mode,
            )  # fmt: skip
        impl = dict(impl="padded", capacity_factor=2.0) if path == "padded" else dict(impl="grouped")
        act = silu if path == "callable" else "silu"
        return bsm.moe_mlp(x, idx, weights, w1, w2, w3, activation=act, options=bsm.MoEOptions(**impl, **mode))

    results = {}
    for cache in (None, False):
        leaves = [t.clone().requires_grad_() for t in (x, weights, w1, w2, w3)]
        results[cache] = []

        def forward(cache=cache, leaves=leaves):
            results[cache].append(call(cache, *leaves))

        saved = saved_storages(forward)
        e4m3 = [tuple(t.shape) for t in saved.values() if t.dtype == torch.float8_e4m3fn]
        operand = [t for t in saved.values() if t.dtype == torch.bfloat16 and t.shape[-1] == d and t.dim() > 1]
        rows = E * 2 * T * k // E if path == "padded" else T
        if cache is None:
            assert e4m3 == [(E, rows // E, d) if path == "padded" else (rows, d)], e4m3
            assert x.untyped_storage().data_ptr() not in saved
        else:
            assert e4m3 == [] and len(operand) >= 1
        results[cache][0].backward(dout)
        results[cache] += [t.grad for t in leaves]
    for i, name in enumerate(("out", "dx", "dweights", "dw1", "dw2", "dw3")):
        same = torch.equal(results[None][i], results[False][i])
        assert same != (name in ("dw1", "dw3")), name


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_fp8_gemms_weight_gradient_from_the_kept_copy(recipe):
    """``strategies.fp8``'s GEMMs given x's E4M3 copy (``quantize_operand``): the same forward and input gradient,
    and the weight gradient of the same GEMM run on the dequantized copy as its x, bit for bit (the weight gradient
    requantizes ``q · s`` along the rows). Expert row counts 0 (an empty expert), 1, 130 (two row groups)."""
    from blocksparse_moe.strategies import fp8 as gemms

    counts = torch.tensor([0, 1, 130])
    offsets = torch.cat([torch.zeros(1), counts.cumsum(0)]).int()
    x, w, dy = torch.randn(131, 40), torch.randn(3, 40, 24), torch.randn(131, 24)
    xd = fp8.dequantize(*gemms.quantize_operand(x, recipe, "torch"), fp8.recipe(recipe).act_block())
    runs = []
    for inp, kept in ((x, True), (x, False), (xd, False)):
        xi, wi = inp.clone().requires_grad_(), w.clone().requires_grad_()
        x_fp8 = gemms.quantize_operand(xi, recipe, "torch") if kept else None
        y = gemms.grouped_mm(xi, wi, offsets, None, None, "torch", recipe, x_fp8)
        y.backward(dy)
        runs.append((y, xi.grad, wi.grad))
    # the two sources tell apart (not with mxfp8, whose power-of-two scales requantize the copy nearly losslessly)
    apart = recipe != "mxfp8"
    (y, dx, dw), (y0, dx0, dw0), (_, _, dw_deq) = runs
    assert torch.equal(y, y0) and torch.equal(dx, dx0) and torch.equal(dw, dw_deq)
    assert not (apart and torch.equal(dw, dw0))
    a, wb, dyb = torch.randn(3, 130, 40), torch.randn(3, 40, 24), torch.randn(3, 130, 24)  # the padded bmm
    ad = fp8.dequantize(*gemms.quantize_operand(a, recipe), fp8.recipe(recipe).act_block())
    runs = []
    for inp, kept in ((a, True), (a, False), (ad, False)):
        ai, wi = inp.clone().requires_grad_(), wb.clone().requires_grad_()
        y = gemms.bmm(ai, wi, recipe, gemms.quantize_operand(ai, recipe) if kept else None)
        y.backward(dyb)
        runs.append((y, ai.grad, wi.grad))
    (y, da, dw), (y0, da0, dw0), (_, _, dw_deq) = runs
    assert torch.equal(y, y0) and torch.equal(da, da0) and torch.equal(dw, dw_deq)
    assert not (apart and torch.equal(dw, dw0))


def test_padded_layer_keeps_its_buffers_fp8_copy():
    """A ``PaddedMoE`` with fp8 keeps the E4M3 copy of its capacity buffers although its router keeps x: the
    buffers are a copy of x that nothing else keeps (``strategies.common.up_operand_is``). Failed before (the layer
    chose False from its router alone, keeping the bf16 buffers)."""
    T, d, E = 12, 32, 3
    layer = bsm.PaddedMoE(d, 24, E, 2, capacity_factor=2.0, fp8="blockwise").to(torch.bfloat16)
    x = torch.randn(T, d, dtype=torch.bfloat16, requires_grad=True)
    saved = saved_storages(lambda: layer(x))
    buffers = (E, 2 * T * 2 // E, d)  # capacity ceil(2 · T · k / E) per expert
    assert [tuple(t.shape) for t in saved.values() if t.dtype == torch.float8_e4m3fn] == [buffers]
    assert not any(t.dtype == torch.bfloat16 and tuple(t.shape) == buffers for t in saved.values())
