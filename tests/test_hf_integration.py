"""Hugging Face transformers integration: our experts implementation == "eager" on tiny random MoE models, and
each experts module takes the path (moe_mlp strategy or custom_moe_mlp) the integration claims."""

import copy

import pytest
import torch
from hf_models import CONFIGS as HF_CONFIGS
from hf_models import TINY
from torch.utils._python_dispatch import TorchDispatchMode

tf = pytest.importorskip("transformers")
from transformers.integrations.moe import use_experts_implementation  # noqa: E402

from blocksparse_moe.integrations import transformers as bsm_hf  # noqa: E402
from blocksparse_moe.options import MoEOptions  # noqa: E402

CONFIGS = {name: HF_CONFIGS[name] for name in ("mixtral", "qwen3_moe", "olmoe", "gpt_oss")}


@pytest.fixture(scope="module", autouse=True)
def _registered():
    bsm_hf.register()


def _run(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    (logits.float() * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _model(name):
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(CONFIGS[name]()).float()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_matches_eager(name):
    model = _model(name)
    with torch.no_grad():  # random, non-trivial expert biases (gpt-oss initialises them to zero)
        for n, p in model.named_parameters():
            if "experts" in n and "bias" in n:
                p.normal_(0, 0.1)
    ids = torch.randint(0, 64, (2, 7))  # 14 tokens: odd per-expert counts
    model.set_experts_implementation("eager")
    ref_logits, ref_grads = _run(model, ids)
    model.set_experts_implementation(bsm_hf.NAME)
    logits, grads = _run(model, ids)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-4, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


@use_experts_implementation(has_gate=False, has_bias=True)
class _UngatedExperts(torch.nn.Module):
    """A non-gated experts module (up -> act -> down) with biases, as some HF models have."""

    def __init__(self, config):
        super().__init__()
        E, d, f = config.num_experts, config.hidden_size, config.intermediate_size
        self.num_experts = E
        self.up_proj = torch.nn.Parameter(torch.randn(E, f, d) * 0.3)
        self.up_proj_bias = torch.nn.Parameter(torch.randn(E, f) * 0.1)
        self.down_proj = torch.nn.Parameter(torch.randn(E, d, f) * 0.3)
        self.down_proj_bias = torch.nn.Parameter(torch.randn(E, d) * 0.1)
        self.act_fn = torch.nn.functional.gelu

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for j in range(top_k_index.shape[1]):
                e = int(top_k_index[t, j])
                h = self.act_fn(self.up_proj[e] @ hidden_states[t] + self.up_proj_bias[e])
                out[t] += top_k_weights[t, j] * (self.down_proj[e] @ h + self.down_proj_bias[e])
        return out


def test_ungated_experts_with_bias_match_eager():
    # has_gate=False path: up_proj + act_fn; expert 3 of 4 receives no tokens
    config = tf.PretrainedConfig()
    config.num_experts, config.hidden_size, config.intermediate_size = 4, 12, 9
    experts = _UngatedExperts(config)
    x = torch.randn(10, 12)
    idx = torch.randint(0, 3, (10, 2))
    w = torch.rand(10, 2)
    config._experts_implementation = "eager"
    ref = experts(x, idx, w)
    other = copy.deepcopy(experts)
    other.config._experts_implementation = bsm_hf.NAME
    out = other(x, idx, w)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    ref.sum().backward()
    out.sum().backward()
    for (n, p), (_, q) in zip(experts.named_parameters(), other.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_register_is_idempotent_and_listed():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    bsm_hf.register()
    bsm_hf.register()
    assert ALL_EXPERTS_FUNCTIONS.get_interface(bsm_hf.NAME, None) is bsm_hf.experts_forward


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(impl="bogus"), ValueError, "impl must be one of"),  # accepted until the first forward before
        (dict(block_size=48), ValueError, r"block_size must be one of \(16, 32, 64, 128\)"),  # same
        (dict(impl="grouped", block_size=16), ValueError, "block_size applies"),
        (dict(options=MoEOptions(), impl="padded"), ValueError, "not both"),
        (dict(options="grouped"), TypeError, "options must be a MoEOptions"),
    ],
)
def test_register_validates_options_at_register_time(kwargs, exc, match):
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    with pytest.raises(exc, match=match):
        bsm_hf.register("bsm_bad_options_test", **kwargs)
    assert "bsm_bad_options_test" not in ALL_EXPERTS_FUNCTIONS


def test_register_with_options_runs_them():
    # register(options=...) hands the whole MoEOptions to every forward of the registered name
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    options = MoEOptions(impl="reference")
    bsm_hf.register("bsm_options_test", options=options)
    fn = ALL_EXPERTS_FUNCTIONS.get_interface("bsm_options_test", None)
    assert fn.keywords == {"options": options}


class _CountOps(TorchDispatchMode):
    """Counts the ops that run (forward and backward), by name; records the layout (block_size) of each fused
    expert-MLP call."""

    def __init__(self):
        super().__init__()
        self.calls = {}
        self.block_sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func)] = self.calls.get(str(func), 0) + 1
        if str(func) == "bsm.expert_mlp.default":
            self.block_sizes.append(args[9])  # bsm::expert_mlp's block_size (1: unpadded rows)
        return func(*args, **(kwargs or {}))


def _experts(name):
    """The first layer's experts module of a tiny model, with routing inputs for it (odd counts, 13 tokens)."""
    experts = _model(name).model.layers[0].mlp.experts
    T, k = 13, 2
    x = torch.randn(T, TINY["hidden_size"])
    idx = torch.rand(T, experts.num_experts).argsort(1)[:, :k]
    return experts, x, idx, torch.rand(T, k)


def _eager(experts, x, idx, w):
    experts.config._experts_implementation = "eager"
    return experts(x, idx, w)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "olmoe"])
def test_standard_gate_runs_moe_mlp_strategies(name):
    # a standard gate (default act(gate) * up, no bias, SiLU) is moe_mlp over views of the module's weights: the
    # fused expert MLP of the grouped strategy on CPU (unpadded rows: block_size 1), of the block-sparse one (blocked
    # rows: block_size 16) when asked
    experts, x, idx, w = _experts(name)
    w1, w2, w3, activation = bsm_hf.moe_mlp_weights(experts)
    assert activation == "silu" and w1.untyped_storage().data_ptr() == experts.gate_up_proj.untyped_storage().data_ptr()
    ref = _eager(experts, x, idx, w)
    for impl, block_size, asked in (("auto", 1, None), ("blocksparse", 16, 16)):
        with _CountOps() as ops:
            out = bsm_hf.experts_forward(experts, x, idx, w, impl=impl, block_size=asked)
        assert {n: c for n, c in ops.calls.items() if n.startswith("bsm.")} == {"bsm.expert_mlp.default": 1}, impl
        assert ops.block_sizes == [block_size], impl
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_custom_gate_runs_custom_moe_mlp():
    # gpt-oss: interleaved gate/up, clamped SwiGLU (_apply_gate overridden) and biases: not a moe_mlp form; the
    # grouped strategy with the module's own gate (2 grouped GEMMs forward: fused gate_up, down), no block-sparse op
    experts, x, idx, w = _experts("gpt_oss")
    with torch.no_grad():
        for n, p in experts.named_parameters():
            if "bias" in n:
                p.normal_(0, 0.1)
    assert bsm_hf.moe_mlp_weights(experts) is None
    ref = _eager(experts, x, idx, w)
    with _CountOps() as ops:
        out = bsm_hf.experts_forward(experts, x, idx, w, impl="blocksparse", block_size=16)
    assert ops.calls.get("bsm.grouped_mm.default") == 2
    assert not any("sdd" in n or "dsd" in n for n in ops.calls)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_model_blocksparse_strategy_matches_eager():
    # a whole Mixtral through the block-sparse strategy (registered under its own name), forward and backward
    model = _model("mixtral")
    ids = torch.randint(0, 64, (2, 7))
    model.set_experts_implementation("eager")
    ref_logits, ref_grads = _run(model, ids)
    bsm_hf.register("bsm_blocksparse_test", impl="blocksparse", block_size=16)
    model.set_experts_implementation("bsm_blocksparse_test")
    logits, grads = _run(model, ids)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-4, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_activation_names():
    # HF / torch activations map to moe_mlp's names; anything else (gelu_new: a different formula) is not standard
    from transformers.activations import ACT2FN

    names = {k: bsm_hf._activation_name(ACT2FN[k]) for k in ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu")}
    assert names == {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
    assert bsm_hf._activation_name(ACT2FN["gelu_new"]) is None
    assert bsm_hf._activation_name(torch.nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert bsm_hf._activation_name(torch.tanh) is None


@pytest.mark.parametrize("capacity", [2, 64])  # tight capacity (drops, per sequence) and ample capacity
def test_switch_transformers_from_hf_matches(capacity):
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    config = tf.SwitchTransformersConfig(d_model=16, d_ff=22, num_experts=4, expert_capacity=capacity)
    hf = SwitchTransformersSparseMLP(config).eval()
    x = torch.randn(3, 9, 16)  # 3 sequences of 9 tokens: capacity applies per sequence
    ref = hf(x)
    moe = bsm_hf.from_hf(hf).eval()
    out, _ = moe(x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    if capacity == 2:  # some tokens really were dropped (their output is exactly zero)
        assert (ref.abs().sum(-1) == 0).any()


def test_from_hf_rejects_other_modules():
    with pytest.raises(TypeError, match="SwitchTransformersSparseMLP"):
        bsm_hf.from_hf(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_expert_parallel_sentinels_contribute_zero(name):
    # under HF's own expert parallelism, ids >= E mark assignments owned by other ranks: unchecked, zero output,
    # on the standard (moe_mlp) and the custom path alike
    experts, x, idx, w = _experts(name)
    sentinel = idx.clone()
    sentinel[::3, 1] = experts.num_experts
    valid = sentinel < experts.num_experts
    ref = _eager(experts, x, torch.where(valid, sentinel, 0), w * valid)
    experts._is_expert_parallel = True
    torch.testing.assert_close(bsm_hf.experts_forward(experts, x, sentinel, w), ref, atol=1e-5, rtol=1e-5)
