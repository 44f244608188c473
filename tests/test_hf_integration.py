"""Hugging Face transformers integration: our experts implementation == "eager" on tiny random MoE models."""

import copy

import pytest
import torch

tf = pytest.importorskip("transformers")
from transformers.integrations.moe import use_experts_implementation  # noqa: E402

from blocksparse_moe.integrations import transformers as bsm_hf  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64)

CONFIGS = {
    # gated, concatenated gate/up, [E, 2F, d] weights, softmax top-2 renormalised
    "mixtral": lambda: tf.MixtralConfig(
        **TINY, intermediate_size=24, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2
    ),
    # odd expert count (E = 5) and a moe width (20) that is not a multiple of anything useful
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(
        **TINY,
        intermediate_size=24,
        moe_intermediate_size=20,
        num_key_value_heads=1,
        num_experts=5,
        num_experts_per_tok=2,
        head_dim=16,
    ),
    # k = 3 of 6 experts, un-normalised top-k weights
    "olmoe": lambda: tf.OlmoeConfig(
        **TINY, intermediate_size=24, num_key_value_heads=2, num_experts=6, num_experts_per_tok=3
    ),
    # transposed [E, d, 2F] weights, interleaved gate/up, biases, custom clamped _apply_gate
    "gpt_oss": lambda: tf.GptOssConfig(
        **TINY,
        intermediate_size=24,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        head_dim=16,
        layer_types=["full_attention"],
    ),
}


@pytest.fixture(scope="module", autouse=True)
def _registered():
    bsm_hf.register()


def _run(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    (logits.float() * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_matches_eager(name):
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[name]()).float()
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
    assert bsm_hf.NAME in ALL_EXPERTS_FUNCTIONS


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
