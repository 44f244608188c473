"""Prequantized FP8 expert weights of Hugging Face models (``integrations.transformers.quantize_experts_fp8_``): the
quantized model's output == the same model run with ``register(fp8=recipe)`` on its original weights, bit for bit,
on both backends (the Triton kernels under the interpreter, fp32 models); close to the unquantized output (SQNR);
the edges; both weight layouts and the ungated form; the state_dict round trip and dtype casts; every error path."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import poison_empty
from hf_models import CONFIGS

tf = pytest.importorskip("transformers")
from transformers.integrations.moe import use_experts_implementation  # noqa: E402

from bench.harness import sqnr_db  # noqa: E402
from blocksparse_moe import fp8  # noqa: E402
from blocksparse_moe.integrations import transformers as bsm_hf  # noqa: E402

E4M3 = torch.float8_e4m3fn
MODEL_OF = {"blockwise": "mixtral", "mxfp8": "qwen3_moe", "rowwise": "deepseek_v3"}  # each model once
SQNR_FLOOR_DB = 20.0  # E4M3 keeps 3 mantissa bits: ~25-30 dB for one expert MLP of fresh random data


@pytest.fixture(scope="module", autouse=True)
def _registered():
    bsm_hf.register()  # options without fp8: a prequantized module runs its own recipe
    for recipe in fp8.RECIPES:
        bsm_hf.register(f"bsm_fp8_{recipe}", fp8=recipe)  # the in-op FP8 forward of the bf16 / fp32 weights


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16}[t.dtype])


def _model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(CONFIGS[name]()).float().eval()


def _logits(model: torch.nn.Module, implementation: str, ids: torch.Tensor) -> torch.Tensor:
    model.set_experts_implementation(implementation)
    with torch.inference_mode():
        return model(ids).logits


def _experts(model: torch.nn.Module) -> torch.nn.Module:
    return model.model.layers[0].mlp.experts


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_model_bit_exact(recipe, backend, monkeypatch):
    """A whole tiny model (Mixtral, Qwen3-MoE, DeepSeek-V3: one per recipe), prequantized, gives the logits of
    ``register(fp8=recipe)`` on its original weights bit for bit, with the registered options' fp8 None (the module's
    recipe) or the same recipe."""
    monkeypatch.setenv("BSM_BACKEND", backend)
    model = _model(MODEL_OF[recipe])
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))  # 10 tokens: odd expert counts
    want = _logits(model, f"bsm_fp8_{recipe}", ids)
    assert bsm_hf.quantize_experts_fp8_(model, recipe) == 1
    experts = _experts(model)
    assert experts.prequantized == recipe and experts.gate_up_proj.dtype == E4M3
    assert not list(experts.parameters())  # the fp32 expert parameters are gone
    assert torch.equal(_bits(_logits(model, bsm_hf.NAME, ids)), _bits(want))
    if backend == "torch":  # (the interpreter is slow: once is enough there)
        assert torch.equal(_bits(_logits(model, f"bsm_fp8_{recipe}", ids)), _bits(want))
    fp8.weight_cache_clear()


def _mixtral_experts(E: int, k: int, seed: int) -> torch.nn.Module:
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = tf.MixtralConfig(hidden_size=24, intermediate_size=20, num_local_experts=E, num_experts_per_tok=k)
    experts = MixtralExperts(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=g) / 24**0.5)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=g) / 20**0.5)
    return experts


def _eager64(experts: torch.nn.Module, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """transformers' own per-expert loop in float64: the unquantized reference."""
    ref = copy.deepcopy(experts).double()
    ref.config._experts_implementation = "eager"
    with torch.no_grad():
        return ref(x.double(), idx, w.double())


EDGES = {
    # T, E, k, routing of token t, choice j (None: random distinct experts), recipe
    "no-tokens-one-token": (7, 4, 2, lambda t, j: [1, 2][j] if t else [3, 2][j], "blockwise"),  # expert 0: none; 3: one
    "k=E": (5, 3, 3, None, "mxfp8"),  # every token to every expert
    "E=1": (6, 1, 1, None, "rowwise"),  # one expert
    "one-expert": (6, 4, 1, lambda t, j: 2, "mxfp8"),  # all tokens to one expert
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", list(EDGES))
def test_experts_edges(case, backend, monkeypatch):
    """One experts module (Mixtral's layout, d = 24, f = 20) on the edges of ``EDGES`` (each commented there) with
    every buffer poisoned: bit for bit the in-op FP8 forward, and within the SQNR floor of the float64 eager loop."""
    T, E, k, route, recipe = EDGES[case]
    monkeypatch.setenv("BSM_BACKEND", backend)
    experts = _mixtral_experts(E, k, seed=2)
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(T, 24, generator=g), torch.rand(T, k, generator=g)
    if route is None:
        idx = torch.rand(T, E, generator=g).argsort(1)[:, :k]
    else:
        idx = torch.tensor([[route(t, j) for j in range(k)] for t in range(T)])
    reference = _eager64(experts, x, idx, w)
    quantized = copy.deepcopy(experts)
    assert bsm_hf.quantize_experts_fp8_(quantized, recipe) == 1
    poison_empty(monkeypatch)
    with torch.inference_mode():
        want = bsm_hf.experts_forward(experts, x, idx, w, fp8=recipe)
        got = bsm_hf.experts_forward(quantized, x, idx, w)
        empty = bsm_hf.experts_forward(quantized, x[:0], idx[:0], w[:0])  # no token: empty output
    assert not want.isnan().any() and torch.equal(_bits(got), _bits(want))
    assert sqnr_db(got, reference) > SQNR_FLOOR_DB
    assert empty.shape == (0, 24)
    fp8.weight_cache_clear()


@use_experts_implementation(is_transposed=True)
class _TransposedExperts(torch.nn.Module):
    """A standard gated experts module stored ``[E, in, out]`` (``gate_up_proj [E, d, 2F]``)."""

    def __init__(self, config):
        super().__init__()
        E, d, f = config.num_experts, config.hidden_size, config.intermediate_size
        self.num_experts = E
        self.gate_up_proj = torch.nn.Parameter(torch.randn(E, d, 2 * f) / d**0.5)
        self.down_proj = torch.nn.Parameter(torch.randn(E, f, d) / f**0.5)
        self.act_fn = torch.nn.functional.silu

    def forward(self, hidden_states, top_k_index, top_k_weights):
        raise NotImplementedError("run through an ExpertsInterface implementation")


@use_experts_implementation(has_gate=False)
class _UngatedExperts(torch.nn.Module):
    """A standard ungated experts module (``up_proj [E, F, d]`` -> GELU -> ``down_proj [E, d, F]``, no bias)."""

    def __init__(self, config):
        super().__init__()
        E, d, f = config.num_experts, config.hidden_size, config.intermediate_size
        self.num_experts = E
        self.up_proj = torch.nn.Parameter(torch.randn(E, f, d) / d**0.5)
        self.down_proj = torch.nn.Parameter(torch.randn(E, d, f) / f**0.5)
        self.act_fn = torch.nn.functional.gelu

    def forward(self, hidden_states, top_k_index, top_k_weights):
        raise NotImplementedError("run through an ExpertsInterface implementation")


@pytest.mark.parametrize("cls", [_TransposedExperts, _UngatedExperts])
def test_layouts(cls, monkeypatch):
    """The ``[E, in, out]`` layout and the ungated form: E4M3 buffers of the original names and shapes, stored so
    that ``moe_mlp_weights``' views are K-major (no copy in the kernels), bit for bit the in-op forward (blockwise:
    its 128×128 blocks must not straddle the gate and up halves)."""
    monkeypatch.setenv("BSM_BACKEND", "torch")
    config = tf.PretrainedConfig()
    config.num_experts, config.hidden_size, config.intermediate_size = 3, 16, 12
    torch.manual_seed(4)
    experts = cls(config).eval()
    x, idx, w = torch.randn(9, 16), torch.rand(9, 3).argsort(1)[:, :2], torch.rand(9, 2)
    quantized = copy.deepcopy(experts)
    bsm_hf.quantize_experts_fp8_(quantized, "blockwise")
    names = ("gate_up_proj", "down_proj") if experts.has_gate else ("up_proj", "down_proj")
    for n in names:
        assert quantized.get_buffer(n).dtype == E4M3 and quantized.get_buffer(n).shape == getattr(experts, n).shape
    w1, w2, w3, _ = bsm_hf.moe_mlp_weights(quantized)
    assert all(t is None or t.stride(1) == 1 for t in (w1, w2, w3))
    with torch.inference_mode():
        want = bsm_hf.experts_forward(experts, x, idx, w, fp8="blockwise")
        got = bsm_hf.experts_forward(quantized, x, idx, w)
    assert torch.equal(_bits(got), _bits(want))
    fp8.weight_cache_clear()


def test_state_dict_round_trip_and_casts(monkeypatch):
    """The quantized model's state_dict holds 1 byte per expert weight plus the scales; ``torch.save`` / ``torch.load``
    into another (differently initialised) model on which ``quantize_experts_fp8_`` was called gives the same logits
    bit for bit; ``model.to(torch.float16)`` casts the rest and leaves the FP8 buffers as they are (the model then
    runs in fp16); ``.to(device)`` moves them (here: CPU to CPU, the same tensors)."""
    monkeypatch.setenv("BSM_BACKEND", "torch")
    model, ids = _model("mixtral"), torch.randint(0, 64, (2, 5))
    bsm_hf.quantize_experts_fp8_(model, "mxfp8")
    want = _logits(model, bsm_hf.NAME, ids)
    state = model.state_dict()
    prefix = "model.layers.0.mlp.experts."
    experts_keys = {k.removeprefix(prefix) for k in state if k.startswith(prefix)}
    assert experts_keys == {"gate_up_proj", "gate_up_proj_scale", "down_proj", "down_proj_scale"}
    E, d, f = 4, 32, 24
    assert state[prefix + "gate_up_proj"].nbytes + state[prefix + "down_proj"].nbytes == 3 * E * d * f
    assert state[prefix + "gate_up_proj_scale"].shape == (2, E, 1, f)  # gate's then up's: one E8M0 per 32 of d
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = _model("mixtral", seed=1)
    bsm_hf.quantize_experts_fp8_(fresh, "mxfp8")
    fresh.load_state_dict(torch.load(buffer))
    assert _experts(fresh).gate_up_proj.transpose(1, 2).stride(1) == 1  # K-major after the load
    assert torch.equal(_bits(_logits(fresh, bsm_hf.NAME, ids)), _bits(want))
    experts = _experts(fresh)
    before = dict(experts.named_buffers())
    fresh.to(torch.device("cpu"))
    assert all(experts.get_buffer(n) is t for n, t in before.items())
    fresh.to(torch.float16)
    assert experts.gate_up_proj.dtype == E4M3 and experts.down_proj_scale.dtype == torch.uint8
    assert fresh.lm_head.weight.dtype == torch.float16
    assert _logits(fresh, bsm_hf.NAME, ids).isfinite().all()
    fp8.weight_cache_clear()


def test_whole_model_pickles(monkeypatch):
    """``torch.save(model)`` / ``torch.load`` of the whole quantized model (not only its state_dict) and
    ``copy.deepcopy`` give a model of the same classes, recipe and FP8 buffers with the same logits bit for bit
    (regression: the generated experts class had no importable name, so pickling failed)."""
    monkeypatch.setenv("BSM_BACKEND", "torch")
    model, ids = _model("qwen3_moe"), torch.randint(0, 64, (2, 5))
    bsm_hf.quantize_experts_fp8_(model, "rowwise")
    want = _logits(model, bsm_hf.NAME, ids)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copied in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        experts = _experts(copied)
        assert type(experts) is type(_experts(model)) and experts.prequantized == "rowwise"
        assert experts.down_proj.dtype == E4M3 and experts.down_proj is not _experts(model).down_proj
        assert torch.equal(_bits(_logits(copied, bsm_hf.NAME, ids)), _bits(want))
    fp8.weight_cache_clear()


def test_errors():
    """Misuse: an unknown recipe, a second call, a custom-gate module (gpt-oss), a training module requiring grad,
    HF's expert parallelism (each leaving the model unchanged); a forward with another registered fp8 or recording a
    graph; checkpoints of another recipe or of unquantized weights."""
    model = _model("mixtral")
    with pytest.raises(ValueError, match="fp8 must be one of"):
        bsm_hf.quantize_experts_fp8_(model, "e5m2")
    with pytest.raises(ValueError, match="fp8 must be one of .*got None"):
        bsm_hf.quantize_experts_fp8_(model, None)
    with pytest.raises(TypeError, match="fp8 must be None or one of"):
        bsm_hf.quantize_experts_fp8_(model, 8)
    gpt = tf.AutoModelForCausalLM.from_config(CONFIGS["gpt_oss"]())
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.experts' \(GptOssExperts\) is not moe_mlp's standard"):
        bsm_hf.quantize_experts_fp8_(gpt.eval(), "blockwise")
    assert _experts(gpt).gate_up_proj.dtype == torch.float32  # unchanged
    with pytest.raises(ValueError, match="training mode with weights requiring grad"):
        bsm_hf.quantize_experts_fp8_(model.train(), "blockwise")
    model.eval()
    _experts(model)._is_expert_parallel = True
    with pytest.raises(ValueError, match="transformers' expert parallelism"):
        bsm_hf.quantize_experts_fp8_(model, "blockwise")
    _experts(model)._is_expert_parallel = False
    assert isinstance(_experts(model).gate_up_proj, torch.nn.Parameter)  # nothing changed by the refusals

    plain_state = model.state_dict()
    bsm_hf.quantize_experts_fp8_(model, "blockwise")
    with pytest.raises(ValueError, match="already holds prequantized FP8 weights \\(recipe 'blockwise'\\)"):
        bsm_hf.quantize_experts_fp8_(model, "blockwise")
    ids = torch.randint(0, 64, (1, 4))
    with pytest.raises(ValueError, match="the registered fp8 option must be None or 'blockwise', got fp8='rowwise'"):
        _logits(model, "bsm_fp8_rowwise", ids)
    model.set_experts_implementation(bsm_hf.NAME)
    with pytest.raises(ValueError, match="has no backward"):
        model(ids)  # grad mode on: the router's top-k weights require grad
    rowwise = _model("mixtral")
    bsm_hf.quantize_experts_fp8_(rowwise, "mxfp8")
    with pytest.raises(RuntimeError, match="gate_up_proj_scale: the experts hold FP8 weights of recipe 'blockwise'"):
        model.load_state_dict(rowwise.state_dict())  # E8M0 scales into fp32 ones
    with pytest.raises(RuntimeError, match="experts.gate_up_proj: .*the checkpoint has torch.float32"):
        model.load_state_dict(plain_state, strict=False)  # unquantized weights
