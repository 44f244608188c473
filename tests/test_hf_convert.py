"""Hugging Face conversion both ways: from_hf(block) equals the HF block (outputs, router logits, gradients; float32,
tiny random configs of each family built in code), to_hf writes the weights back, upcycle(mlp) equals the dense
MLP at initialisation; bad input."""

import pytest
import torch

tf = pytest.importorskip("transformers")

from blocksparse_moe.integrations import transformers as bsm_hf  # noqa: E402
from blocksparse_moe.layers.moe import dMoE  # noqa: E402

D = 16
TOL = dict(atol=1e-6, rtol=1e-5)


def _deepseek(**kw):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = tf.DeepseekV3Config(
        hidden_size=D,
        intermediate_size=24,
        moe_intermediate_size=10,
        n_routed_experts=8,
        n_shared_experts=2,  # two shared experts: one dense MLP of width 2 · 10
        routed_scaling_factor=2.5,
        **{"num_experts_per_tok": 3, "n_group": 4, "topk_group": 2, "norm_topk_prob": True, **kw},
    )
    return DeepseekV3MoE(config)


def _mixtral():
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    # k = 2 of 4, top-k always renormalised
    return MixtralSparseMoeBlock(
        tf.MixtralConfig(hidden_size=D, intermediate_size=12, num_local_experts=4, num_experts_per_tok=2)
    )


def _qwen2():
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    # k = 2 of 6, not renormalised, a shared expert of width 14 with its sigmoid gate
    config = tf.Qwen2MoeConfig(
        hidden_size=D,
        moe_intermediate_size=10,
        shared_expert_intermediate_size=14,
        num_experts=6,
        num_experts_per_tok=2,
    )
    return Qwen2MoeSparseMoeBlock(config)


def _qwen3():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    # odd E = 5, renormalised (norm_topk_prob), odd moe width 9
    config = tf.Qwen3MoeConfig(
        hidden_size=D, moe_intermediate_size=9, num_experts=5, num_experts_per_tok=2, norm_topk_prob=True
    )
    return Qwen3MoeSparseMoeBlock(config)


def _olmoe():
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    # k = 3 of 6, not renormalised (OLMoE's default norm_topk_prob=False)
    config = tf.OlmoeConfig(hidden_size=D, intermediate_size=12, num_experts=6, num_experts_per_tok=3)
    return OlmoeSparseMoeBlock(config)


BLOCKS = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2,
    "qwen3_moe": _qwen3,
    "olmoe": _olmoe,
    "deepseek_v3": _deepseek,
    # DeepSeek-V3 without group limits (n_group = 1) and without renormalisation
    "deepseek_v3_one_group": lambda: _deepseek(n_group=1, topk_group=1, norm_topk_prob=False),
    # k = E = 8 in all groups
    "deepseek_v3_k_equals_E": lambda: _deepseek(num_experts_per_tok=8, topk_group=4),
}


def _block(name):
    block = BLOCKS[name]()
    block.experts.config._experts_implementation = "eager"
    with torch.no_grad():  # HF blocks leave their weights uninitialised: random ones, a random correction bias
        for p in block.parameters():
            p.normal_(0, 0.3)
        for b in block.buffers():
            b.normal_(0, 0.1)
    return block.float().eval()


def _forward_backward(fn, x, g):
    x = x.clone().requires_grad_()
    out = fn(x)
    (out * g).sum().backward()
    return out.detach(), x.grad


def _hf_grads(block, layer):
    """The block's parameter gradients in the layer's names and layouts."""
    gu, down = block.experts.gate_up_proj.grad, block.experts.down_proj.grad
    f = gu.shape[1] // 2
    grads = {
        "router.weight": block.gate.weight.grad,
        "experts.w1": gu[:, :f].mT,
        "experts.w3": gu[:, f:].mT,
        "experts.w2": down.mT,
    }
    shared = getattr(block, "shared_experts", getattr(block, "shared_expert", None))
    if getattr(block, "shared_expert_gate", None) is not None:
        grads["shared_expert_gate.weight"] = block.shared_expert_gate.weight.grad
    if shared is not None:
        grads["shared_expert.up.weight"] = shared.gate_proj.weight.grad
        grads["shared_expert.gate.weight"] = shared.up_proj.weight.grad
        grads["shared_expert.down.weight"] = shared.down_proj.weight.grad
    return grads


@pytest.mark.parametrize("name", list(BLOCKS))
def test_from_hf_matches_block(name):
    block = _block(name)
    layer = bsm_hf.from_hf(block).eval()
    assert isinstance(layer, dMoE)
    x, g = torch.randn(2, 7, D), torch.randn(2, 7, D)  # 2 sequences of 7 tokens: odd per-expert counts
    ref, ref_dx = _forward_backward(block, x, g)
    out, dx = _forward_backward(lambda t: layer(t)[0], x, g)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(dx, ref_dx, **TOL)
    flat = x.reshape(-1, D)
    hf_logits, hf_weights, hf_index = block.gate(flat)
    logits, weights, index = layer.router(flat)
    torch.testing.assert_close(logits, hf_logits, **TOL)
    order, hf_order = index.sort(-1), hf_index.sort(-1)
    assert torch.equal(order.values, hf_order.values)
    torch.testing.assert_close(weights.gather(1, order.indices), hf_weights.gather(1, hf_order.indices), **TOL)
    ours = dict(layer.named_parameters())
    for param, grad in _hf_grads(block, layer).items():
        # a parameter's gradient sums over tokens in another order than HF's: its elements round with the absolute
        # error of the largest (cancellation leaves small elements with it), ~1 ulp of max|grad| (up to 30 here)
        tol = dict(atol=TOL["atol"] * max(1.0, grad.abs().max().item()), rtol=TOL["rtol"])
        torch.testing.assert_close(ours[param].grad, grad, **tol, msg=lambda m, p=param: f"{p}: {m}")
    # copies, not views: the layer owns its weights
    with torch.no_grad():
        layer.experts.w1.add_(1.0)
    torch.testing.assert_close(block(x), ref, **TOL)


def test_from_hf_carries_the_deepseek_options():
    block = _block("deepseek_v3")
    layer = bsm_hf.from_hf(block)
    r = layer.router
    assert (r.score, r.normalize, r.num_expert_groups, r.topk_groups, r.scaling_factor) == ("sigmoid", True, 4, 2, 2.5)
    assert torch.equal(r.expert_bias, block.gate.e_score_correction_bias)
    assert layer.shared_expert.up.weight.shape == (20, D)  # n_shared_experts · moe_intermediate_size
    assert layer.load_balancing_weight == 0.0
    # layer options pass through
    assert bsm_hf.from_hf(block, load_balancing_weight=0.1, impl="reference").load_balancing_weight == 0.1


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_to_hf_writes_weights_back(name):
    block = _block(name)
    layer = bsm_hf.from_hf(block)
    with torch.no_grad():  # "training": every parameter and the bias move
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.add_(torch.randn(8) * 0.1)
    assert bsm_hf.to_hf(layer, block) is block
    x = torch.randn(3, 5, D)
    torch.testing.assert_close(block(x), layer.eval()(x)[0], **TOL)
    if name == "deepseek_v3":
        assert torch.equal(block.gate.e_score_correction_bias, layer.router.expert_bias)
    # and back again: the same weights
    again = bsm_hf.from_hf(block)
    for (n, a), b in zip(layer.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n
    if name == "mixtral":  # prequantized FP8 experts have no master weights to write back
        layer.experts.quantize_fp8_("blockwise")
        with pytest.raises(ValueError, match="to_hf writes master weights; layer's experts hold prequantized FP8"):
            bsm_hf.to_hf(layer, block)


def test_switch_to_hf_round_trip():
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    hf = SwitchTransformersSparseMLP(tf.SwitchTransformersConfig(d_model=8, d_ff=12, num_experts=3)).eval()
    layer = bsm_hf.from_hf(hf)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    bsm_hf.to_hf(layer, hf)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(hf(x), layer.eval()(x)[0], atol=1e-5, rtol=1e-5)


def test_conversion_bad_input():
    with pytest.raises(TypeError, match="block must be the sparse MoE block of Mixtral"):
        bsm_hf.from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="block must be a block that from_hf converts"):
        bsm_hf.to_hf(dMoE(8, 8, 4, 2), torch.nn.Linear(2, 2))
    # a layer of another size than the block
    with pytest.raises(ValueError, match="layer and block must have the same sizes"):
        bsm_hf.to_hf(dMoE(D, 12, 3, 2), _block("mixtral"))


# ---------------------------------------------------------------------------------------------------------------
# upcycling


def _llama_mlp(**kw):
    from transformers.models.llama.modeling_llama import LlamaMLP

    mlp = LlamaMLP(tf.LlamaConfig(hidden_size=D, intermediate_size=11, num_attention_heads=2, **kw))
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 0.3)
    return mlp


@pytest.mark.parametrize(
    "num_experts,top_k,options",
    [
        (4, 2, {}),  # k = 2 of 4, softmax
        (4, 1, {}),  # k = 1: renormalised too (weight 1)
        (3, 3, {}),  # k = E
        (1, 1, {}),  # E = 1
        (8, 2, dict(score="sigmoid", expert_bias=True, num_expert_groups=4, topk_groups=2)),  # DeepSeek-style router
    ],
)
def test_upcycle_equals_dense_mlp(num_experts, top_k, options):
    mlp = _llama_mlp()
    layer = bsm_hf.upcycle(mlp, num_experts, top_k, **options)
    x = torch.randn(2, 9, D)
    torch.testing.assert_close(layer(x)[0], mlp(x), **TOL)
    for e in range(num_experts):  # every expert a copy of the dense MLP
        assert torch.equal(layer.experts.w1[e], mlp.gate_proj.weight.t())
        assert torch.equal(layer.experts.w3[e], mlp.up_proj.weight.t())
        assert torch.equal(layer.experts.w2[e], mlp.down_proj.weight.t())
    _, weights, _ = layer.router(x.reshape(-1, D))
    torch.testing.assert_close(weights.sum(-1), torch.ones(18))  # combine weights sum to 1
    assert 0.01 < float(layer.router.weight.detach().std()) < 0.04  # N(0, 0.02²)


def test_upcycle_qwen2_and_mistral_mlps():
    from transformers.models.mistral.modeling_mistral import MistralMLP
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    for cls, config in ((Qwen2MLP, tf.Qwen2Config), (MistralMLP, tf.MistralConfig)):
        mlp = cls(config(hidden_size=D, intermediate_size=7, num_attention_heads=2))
        with torch.no_grad():
            for p in mlp.parameters():
                p.normal_(0, 0.3)
        x = torch.randn(10, D)
        torch.testing.assert_close(bsm_hf.upcycle(mlp, 4, 2)(x)[0], mlp(x), **TOL)


def test_upcycle_bad_input():
    with pytest.raises(TypeError, match="expected a gated MLP with nn.Linear gate_proj"):
        bsm_hf.upcycle(torch.nn.Linear(4, 4), 4, 2)
    with pytest.raises(ValueError, match="expected projections without bias"):
        bsm_hf.upcycle(_llama_mlp(mlp_bias=True), 4, 2)
    with pytest.raises(ValueError, match="upcycle sets normalize itself"):
        bsm_hf.upcycle(_llama_mlp(), 4, 2, normalize=False)
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        bsm_hf.upcycle(_llama_mlp(), 0, 1)
    with pytest.raises(ValueError, match="top_k must be <= num_experts"):
        bsm_hf.upcycle(_llama_mlp(), 2, 3)
