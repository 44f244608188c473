"""Layers: TopKRouter variants, auxiliary losses vs hand-computed values, dMoE / PaddedMoE equivalences,
initialisation, torch.compile, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from blocksparse_moe.layers.losses import load_balancing_loss, router_z_loss
from blocksparse_moe.layers.moe import PaddedMoE, dMoE
from blocksparse_moe.layers.router import TopKRouter

# ---------------------------------------------------------------------------------------------------------------
# losses


def test_load_balancing_loss_hand_computed():
    # k = 1: f = [1, 0], P = [0.55, 0.45] -> 2 · 0.55
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    idx = torch.tensor([[0], [0]])
    torch.testing.assert_close(load_balancing_loss(probs, idx, 2), torch.tensor(1.1))
    # k = 2, E = 3: f = [2, 1, 1] / 4, P = [0.35, 0.4, 0.25] -> 3 · (0.175 + 0.1 + 0.0625)
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]])
    idx = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32)
    torch.testing.assert_close(load_balancing_loss(probs, idx, 3), torch.tensor(3 * 0.3375))
    # perfect balance -> 1
    E = 4
    torch.testing.assert_close(
        load_balancing_loss(torch.full((8, E), 1 / E), torch.arange(8).view(8, 1) % E, E), torch.tensor(1.0)
    )


def test_load_balancing_loss_gradient_and_empty():
    # gradient flows to the probabilities only: d/dP_e = E · f_e / T
    probs = torch.rand(5, 3).softmax(-1).requires_grad_()
    idx = torch.tensor([[0], [0], [1], [0], [2]])
    load_balancing_loss(probs, idx, 3).backward()
    f = torch.tensor([3, 1, 1]) / 5
    torch.testing.assert_close(probs.grad, (3 * f / 5).expand(5, 3))
    # no tokens: 0
    assert float(load_balancing_loss(torch.zeros(0, 3), torch.zeros(0, 2, dtype=torch.long), 3)) == 0.0


def test_router_z_loss_hand_computed():
    # logsumexp([0, 0]) = ln 2, logsumexp([ln 3, 0]) = ln 4 -> (ln²2 + 4 ln²2) / 2
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(2.5 * math.log(2.0) ** 2))
    # bf16 logits: computed in fp32
    assert router_z_loss(logits.bfloat16()).dtype == torch.float32
    assert float(router_z_loss(torch.zeros(0, 4))) == 0.0


def test_losses_bad_input():
    with pytest.raises(ValueError, match="router_probs must be"):
        load_balancing_loss(torch.rand(4, 3), torch.zeros(4, 1, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="top_k_index must be"):
        load_balancing_loss(torch.rand(4, 3), torch.zeros(5, 1, dtype=torch.long), 3)
    with pytest.raises(TypeError, match="int32 or int64"):
        load_balancing_loss(torch.rand(4, 3), torch.zeros(4, 1), 3)
    with pytest.raises(ValueError, match="router_logits must be"):
        router_z_loss(torch.rand(4))


# ---------------------------------------------------------------------------------------------------------------
# router


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
def test_router_top_k(score, normalize):
    r = TopKRouter(12, 5, 2, score=score, normalize=normalize)
    x = torch.randn(9, 12)
    logits, weights, index = r(x)
    expected_logits = x @ r.weight.T
    probs = expected_logits.softmax(-1) if score == "softmax" else expected_logits.sigmoid()
    top, expected_index = probs.topk(2, dim=-1)
    torch.testing.assert_close(logits, expected_logits)
    assert torch.equal(index, expected_index) and index.dtype == torch.int64
    torch.testing.assert_close(weights, top / top.sum(-1, keepdim=True) if normalize else top)
    torch.testing.assert_close(r.scores(logits), probs)


def test_router_fp32_math_under_bf16():
    # Switch selective precision: bf16 input (and bf16 router weight) -> router math in fp32
    r = TopKRouter(16, 4, 2)
    x = torch.randn(8, 16).bfloat16()
    logits, weights, _ = r(x)
    assert logits.dtype == weights.dtype == torch.float32
    torch.testing.assert_close(logits, F.linear(x.float(), r.weight), rtol=0, atol=0)
    r = r.bfloat16()
    logits, weights, _ = r(x)
    assert logits.dtype == weights.dtype == torch.float32
    torch.testing.assert_close(logits, F.linear(x.float(), r.weight.float()), rtol=0, atol=0)


@pytest.mark.parametrize("option", [dict(jitter_eps=0.1), dict(noisy_gating=True)])
def test_router_noise_only_in_training(option):
    # jitter (Switch) and noisy gating (Shazeer) change the logits in training only
    r = TopKRouter(16, 4, 2, **option)
    clean = TopKRouter(16, 4, 2)
    clean.weight.data.copy_(r.weight.data)
    x = torch.randn(32, 16)
    r.eval()
    for a, b in zip(r(x), clean(x)):
        assert torch.equal(a, b)
    r.train()
    logits, _, _ = r(x)
    assert not torch.allclose(logits, clean(x)[0])
    if "jitter_eps" in option:  # multiplicative jitter in [1 - eps, 1 + eps] on the input
        assert (logits - clean(x)[0]).abs().max() <= 0.1 * (x.abs() @ r.weight.abs().T).max()
    else:  # learned noise projection gets gradients
        logits.sum().backward()
        assert r.noise_weight.grad is not None and r.noise_weight.grad.abs().sum() > 0


def test_router_random_second():
    # GShard: second expert kept with probability min(1, 2 p2 / p1) in training, weight 0 otherwise
    r = TopKRouter(8, 4, 2, random_second=True)
    x = torch.randn(4000, 8)
    r.eval()
    logits, w_eval, i_eval = r(x)
    assert (w_eval[:, 1] > 0).all()
    r.train()
    _, w, i = r(x)
    assert torch.equal(i, i_eval) and torch.equal(w[:, 0], w_eval[:, 0])
    kept = w[:, 1] > 0
    assert torch.equal(w[kept, 1], w_eval[kept, 1])
    p = logits.softmax(-1).topk(2, dim=-1).values
    expected_rate = (2 * p[:, 1] / p[:, 0]).clamp(max=1).mean()
    assert abs(kept.float().mean() - expected_rate) < 0.03


def test_router_bad_options():
    with pytest.raises(ValueError, match="score must be one of"):
        TopKRouter(8, 4, 2, score="relu")
    with pytest.raises(ValueError, match="top_k must be <= num_experts"):
        TopKRouter(8, 4, 5)
    with pytest.raises(ValueError, match="random_second needs top_k=2"):
        TopKRouter(8, 4, 1, random_second=True)
    with pytest.raises(ValueError, match="jitter_eps"):
        TopKRouter(8, 4, 2, jitter_eps=1.5)
    with pytest.raises(TypeError, match="router_dtype"):
        TopKRouter(8, 4, 2, router_dtype=torch.int32)
    with pytest.raises(ValueError, match="hidden_size=8"):
        TopKRouter(8, 4, 2)(torch.randn(3, 7))


# ---------------------------------------------------------------------------------------------------------------
# dMoE / PaddedMoE


def _forward_backward(module, x):
    x = x.detach().clone().requires_grad_()
    y, aux = module(x)
    (y.square().sum() + aux).backward()
    return y, aux, x.grad, {n.removeprefix("_orig_mod."): p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("impl", ["auto", "blocksparse", "grouped", "reference"])
def test_dmoe_equals_padded_with_ample_capacity(impl):
    # same weights; capacity_factor = E never drops (k distinct experts per token); odd sizes, [..., d] input
    kw = dict(z_loss_weight=0.1, shared_expert_size=8)
    block = dict(block_size=16) if impl == "blocksparse" else {}
    dmoe = dMoE(13, 19, 4, 2, impl=impl, **block, **kw)
    padded = PaddedMoE(13, 19, 4, 2, capacity_factor=4.0, **kw)
    padded.load_state_dict(dmoe.state_dict())
    x = torch.randn(3, 5, 13)
    y0, aux0, gx0, g0 = _forward_backward(dmoe, x)
    y1, aux1, gx1, g1 = _forward_backward(padded, x)
    assert y0.shape == x.shape
    torch.testing.assert_close(y0, y1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux0, aux1)
    torch.testing.assert_close(gx0, gx1, atol=1e-5, rtol=1e-5)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("glu", [True, False])
def test_one_expert_dmoe_is_dense_mlp(glu):
    # E = 1, k = 1 with renormalised weights (= 1): a dense MLP
    m = dMoE(16, 24, 1, 1, glu=glu, activation="gelu")
    x = torch.randn(7, 16)
    y, _ = m(x)
    h = F.gelu(x @ m.w1[0])
    if glu:
        h = h * (x @ m.w3[0])
    assert_close(y, h @ m.w2[0])


def test_aux_loss_and_shared_expert():
    # aux = weighted sum of both losses; the shared expert's dense output is added
    m = dMoE(16, 20, 4, 2, load_balancing_weight=0.3, z_loss_weight=0.2, shared_expert_size=12, impl="reference")
    x = torch.randn(10, 16)
    y, aux = m(x)
    logits, _, idx = m.router(x)
    expected = 0.3 * load_balancing_loss(logits.softmax(-1), idx, 4) + 0.2 * router_z_loss(logits)
    torch.testing.assert_close(aux, expected)
    shared = m.shared_expert
    m.shared_expert = None
    y_routed, _ = m(x)
    dense = shared.down(F.silu(shared.up(x)) * shared.gate(x))
    torch.testing.assert_close(y, y_routed + dense)


def test_initialisation():
    # per-expert U(-1/sqrt(fan_in), 1/sqrt(fan_in)): fan_in d for w1/w3, f for w2; no w3 without GLU
    d, f = 64, 100
    m = dMoE(d, f, 8, 2)
    for w, fan_in in ((m.w1, d), (m.w3, d), (m.w2, f)):
        bound = 1 / math.sqrt(fan_in)
        assert w.abs().max() <= bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    assert m.w1.shape == (8, d, f) and m.w2.shape == (8, f, d) and m.w3.shape == (8, d, f)
    assert dMoE(d, f, 8, 2, glu=False).w3 is None


def test_dmoe_recompute_activation():
    # recompute_activation gives the same outputs and gradients
    a = dMoE(16, 24, 4, 2, impl="grouped")
    b = dMoE(16, 24, 4, 2, impl="grouped", recompute_activation=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(12, 16)
    for r0, r1 in zip(_forward_backward(a, x)[:3], _forward_backward(b, x)[:3]):
        torch.testing.assert_close(r0, r1)


def test_dmoe_inputs_unmodified_and_empty():
    # input not modified; zero tokens give an empty output and a zero aux loss
    m = dMoE(16, 24, 4, 2, impl="reference")
    x = torch.randn(2, 3, 16)
    before = x.clone()
    m(x)
    assert torch.equal(x, before)
    y, aux = m(torch.randn(0, 16))
    assert y.shape == (0, 16) and float(aux.detach()) == 0.0


@pytest.mark.parametrize("recompute", [False, True])
def test_compile_fullgraph_matches_eager(recompute):
    # torch.compile(fullgraph=True) traces routing, the custom ops and the layer (and the selective activation
    # checkpoint); forward and grads match eager
    m = dMoE(16, 24, 4, 2, z_loss_weight=0.01, recompute_activation=recompute)
    x = torch.randn(12, 16)
    eager = _forward_backward(m, x)
    m.zero_grad()
    compiled = _forward_backward(torch.compile(m, fullgraph=True), x)
    for a, b in zip(eager[:3], compiled[:3]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert eager[3].keys() == compiled[3].keys()
    for name in eager[3]:
        torch.testing.assert_close(eager[3][name], compiled[3][name], atol=1e-5, rtol=1e-5)


def test_layer_bad_input():
    with pytest.raises(ValueError, match="impl must be one of"):
        dMoE(8, 8, 4, impl="dense")
    with pytest.raises(ValueError, match="activation must be one of"):
        dMoE(8, 8, 4, activation="swish")
    with pytest.raises(ValueError, match="ffn_hidden_size"):
        dMoE(8, 0, 4)
    with pytest.raises(ValueError, match="top_k must be <= num_experts"):
        dMoE(8, 8, 2, top_k=3)
    with pytest.raises(ValueError, match="capacity_factor"):
        PaddedMoE(8, 8, 4, capacity_factor=-1.0)
    with pytest.raises(ValueError, match="num_groups"):
        PaddedMoE(8, 8, 4, num_groups=0)
    with pytest.raises(ValueError, match="hidden_size=8"):
        dMoE(8, 8, 4)(torch.randn(3, 7))
    with pytest.raises(ValueError, match="divide"):  # 5 tokens in 2 groups
        PaddedMoE(8, 8, 4, num_groups=2)(torch.randn(5, 8))
