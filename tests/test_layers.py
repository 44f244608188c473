"""Layers: TopKRouter variants, auxiliary losses vs hand-computed values, dMoE / PaddedMoE equivalences,
initialisation, torch.compile, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from blocksparse_moe.functional import moe_mlp
from blocksparse_moe.layers.losses import load_balancing_loss, router_z_loss
from blocksparse_moe.layers.moe import MoEExperts, PaddedMoE, dMoE
from blocksparse_moe.layers.router import TopKRouter
from blocksparse_moe.options import MoEOptions

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


def test_router_dtype_wins_over_autocast():
    # CPU bf16 autocast around the router: its math still runs in router_dtype (fp32), so the logits are the fp32
    # ones bit for bit and no token changes expert (under autocast, F.linear alone would compute in bf16)
    r = TopKRouter(64, 8, 2)
    x = torch.randn(256, 64)
    logits, weights, index = r(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a_logits, a_weights, a_index = r(x)
        assert torch.is_autocast_enabled("cpu")  # the router switched autocast off only inside itself
    assert a_logits.dtype == a_weights.dtype == torch.float32
    assert torch.equal(a_logits, logits) and torch.equal(a_weights, weights) and torch.equal(a_index, index)
    # router_dtype float64 under autocast too
    r64 = TopKRouter(64, 8, 2, router_dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert r64(x)[0].dtype == torch.float64


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_normalize_default_depends_on_k(top_k):
    # k = 1: no renormalisation by default (p/p = 1 would cut the router off from the task loss); k > 1: Mixtral's
    assert TopKRouter(8, 4, top_k).normalize == (top_k > 1)
    assert TopKRouter(8, 4, top_k, normalize=True).normalize is True


def test_top1_dmoe_router_gets_task_gradient():
    # Switch: top-1 output = p · expert(x), so the task loss reaches the router (no auxiliary loss here)
    m = dMoE(16, 24, 4, top_k=1, load_balancing_weight=0.0)
    x = torch.randn(12, 16)
    y, aux = m(x)
    (y * torch.randn_like(y)).sum().backward()
    assert float(aux) == 0.0
    assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0
    _, weights, index = m.router(x)  # the weight is the router probability itself
    torch.testing.assert_close(weights, m.router.scores(m.router(x)[0]).gather(1, index))


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
    ex = m.experts
    h = F.gelu(x @ ex.w1[0])
    if glu:
        h = h * (x @ ex.w3[0])
    assert_close(y, h @ ex.w2[0])


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
    ex = dMoE(d, f, 8, 2).experts
    for w, fan_in in ((ex.w1, d), (ex.w3, d), (ex.w2, f)):
        bound = 1 / math.sqrt(fan_in)
        assert w.abs().max() <= bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    assert ex.w1.shape == (8, d, f) and ex.w2.shape == (8, f, d) and ex.w3.shape == (8, d, f)
    assert dMoE(d, f, 8, 2, glu=False).experts.w3 is None


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


@pytest.mark.parametrize("num_groups", [1, "sequence"])
def test_padded_compile_dynamic_matches_eager(num_groups):
    # defect 4: PaddedMoE(capacity_factor=...) under torch.compile(dynamic=True) (symbolic sizes, and a symbolic
    # number of sequence groups) matches eager, for two input shapes through one compiled module
    torch.manual_seed(0)
    m = PaddedMoE(12, 16, 4, 2, capacity_factor=0.75, num_groups=num_groups, z_loss_weight=0.01)
    compiled = torch.compile(m, dynamic=True, fullgraph=True)
    for shape in ((2, 6, 12), (3, 5, 12)):
        x = torch.randn(*shape)
        for a, b in zip(compiled(x), m(x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "build,exc,match",
    [
        (lambda: dMoE(8, 8, 4, impl="dense"), ValueError, "impl must be one of"),
        (lambda: dMoE(8, 8, 4, activation="swish"), ValueError, "activation must be one of"),
        (lambda: dMoE(8, 0, 4), ValueError, "ffn_hidden_size"),
        (lambda: dMoE(8, 8, 2, top_k=3), ValueError, "top_k must be <= num_experts"),
        (lambda: PaddedMoE(8, 8, 4, capacity_factor=-1.0), ValueError, "capacity_factor"),
        (lambda: PaddedMoE(8, 8, 4, num_groups=0), ValueError, "num_groups"),
        # defect 7: inf / NaN capacity factors fail at construction, not at forward
        (lambda: PaddedMoE(8, 8, 4, capacity_factor=float("inf")), ValueError, "finite non-negative"),
        (lambda: PaddedMoE(8, 8, 4, capacity_factor=float("nan")), ValueError, "finite non-negative"),
        (lambda: PaddedMoE(8, 8, 4, capacity=-1), ValueError, "capacity must be"),
        # defect 14: dMoE validates its moe_mlp options and loss weights at construction
        (lambda: dMoE(8, 8, 4, block_size=0), ValueError, "block_size must be one of"),
        (lambda: dMoE(8, 8, 4, block_size=256), ValueError, "block_size must be one of"),  # defect 8
        (lambda: dMoE(8, 8, 4, impl="grouped", block_size=16), ValueError, "block_size applies"),
        (lambda: dMoE(8, 8, 4, recompute_activation="yes"), TypeError, "recompute_activation must be a bool"),
        (lambda: dMoE(8, 8, 4, load_balancing_weight=float("nan")), ValueError, "load_balancing_weight"),
        (lambda: dMoE(8, 8, 4, z_loss_weight=float("inf")), ValueError, "z_loss_weight"),
        (lambda: dMoE(8, 8, 4, load_balancing_weight=-0.1), ValueError, "load_balancing_weight"),
        # defect 2: expert parallelism is a wrapper now; the old layer option says where it went
        (lambda: PaddedMoE(8, 8, 4, expert_parallel_group=object()), TypeError, r"parallel\.expert_parallel"),
        (lambda: dMoE(8, 8, 4, expert_parallel_group=object()), TypeError, r"parallel\.expert_parallel"),
        (lambda: dMoE(8, 8, 4)(torch.randn(3, 7)), ValueError, "hidden_size=8"),
        (lambda: PaddedMoE(8, 8, 4, num_groups=2)(torch.randn(5, 8)), ValueError, "divide"),  # 5 tokens, 2 groups
        # a list as the input names the argument (was an AttributeError: 'list' object has no attribute 'dim')
        (lambda: dMoE(8, 8, 4)([[0.5] * 8]), TypeError, r"x must be a torch.Tensor \[\.\.\., hidden_size=8\]"),
        (lambda: PaddedMoE(8, 8, 4)([[0.5] * 8]), TypeError, "x must be a torch.Tensor"),
        # a list where a size goes names the argument
        (lambda: dMoE([8], 8, 4), ValueError, r"hidden_size must be a positive int, got \[8\]"),
        (lambda: dMoE(8, 8, [4]), ValueError, r"num_experts must be a positive int, got \[4\]"),
        (lambda: PaddedMoE(8, [8], 4), ValueError, r"ffn_hidden_size must be a positive int, got \[8\]"),
        (lambda: dMoE(8, 8, 4, glu="yes"), TypeError, "glu must be a bool"),
        # the options: one MoEOptions, or the keywords, not both; PaddedMoE's must be padded
        (lambda: dMoE(8, 8, 4, options=MoEOptions(), impl="grouped"), ValueError, "not both"),
        (lambda: PaddedMoE(8, 8, 4, options=MoEOptions(impl="padded"), capacity=3), ValueError, "not both"),
        (lambda: PaddedMoE(8, 8, 4, options=MoEOptions(impl="grouped")), ValueError, "impl='padded'"),
        (lambda: dMoE(8, 8, 4, options={"impl": "grouped"}), TypeError, "options must be a MoEOptions"),
    ],
)
def test_layer_bad_input(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


@pytest.mark.parametrize("shape", [(0, 5, 12), (2, 0, 12), (0, 12), (0, 0, 12)])
def test_padded_sequence_groups_empty_input(shape):
    # per-sequence capacity with no tokens (no sequences, or empty sequences): an empty output and a zero aux loss
    m = PaddedMoE(12, 16, 4, num_groups="sequence", z_loss_weight=0.1)
    y, aux = m(torch.randn(*shape))
    assert y.shape == shape and float(aux) == 0.0


def test_padded_sequence_groups_match_per_sequence_runs():
    # num_groups="sequence" with [B, S, d] input: each sequence alone through a one-group PaddedMoE gives the same
    m = PaddedMoE(12, 16, 4, capacity_factor=0.5, num_groups="sequence")
    x = torch.randn(3, 7, 12)
    y, _ = m(x)
    for b in range(3):
        torch.testing.assert_close(y[b], m(x[b])[0])


def test_experts_submodule_and_state_dict():
    # one expert module, the same parameter names in both layers (checkpoints move between them)
    m, p = dMoE(8, 12, 4, shared_expert_size=6), PaddedMoE(8, 12, 4, shared_expert_size=6)
    assert isinstance(m.experts, MoEExperts) and m.experts.num_experts == 4
    assert set(m.state_dict()) == set(p.state_dict()) >= {"router.weight", "experts.w1", "experts.w2", "experts.w3"}
    assert m.experts.options.impl == "auto" and p.experts.options.impl == "padded" and m.options is m.experts.options
    # the experts module alone is moe_mlp over its weights
    x, idx, w = torch.randn(5, 8), torch.randint(0, 4, (5, 2)), torch.rand(5, 2)
    ex = m.experts
    torch.testing.assert_close(ex(x, idx, w), moe_mlp(x, idx, w, ex.w1, ex.w2, ex.w3, activation="silu"))


def test_meta_device_init_and_shape_inference():
    # torch.device("meta") construction allocates nothing; a meta forward infers shapes (the id check skips meta);
    # to_empty + load_state_dict then gives the real layer
    real = dMoE(12, 16, 4, shared_expert_size=8, z_loss_weight=0.1)
    with torch.device("meta"):
        m = dMoE(12, 16, 4, shared_expert_size=8, z_loss_weight=0.1)
        y, aux = m(torch.randn(2, 5, 12))
    assert m.experts.w1.is_meta and y.is_meta and y.shape == (2, 5, 12) and aux.shape == ()
    with torch.device("meta"):
        p = PaddedMoE(12, 16, 4, num_groups="sequence")
        assert p(torch.randn(2, 5, 12))[0].shape == (2, 5, 12)
    m.to_empty(device="cpu")
    m.load_state_dict(real.state_dict())
    x = torch.randn(2, 5, 12)
    for a, b in zip(m(x), real(x)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("layer", ["dmoe", "padded"])
def test_layers_follow_cpu_autocast(layer):
    # under autocast the experts run in bf16 like an nn.Linear (x and the expert weights cast in moe_mlp), the
    # router stays fp32, the aux loss is fp32, and gradients reach the fp32 expert weights
    torch.manual_seed(0)
    cls = dMoE if layer == "dmoe" else PaddedMoE
    moe = cls(16, 24, 4, 2, **({"impl": "grouped"} if layer == "dmoe" else {"capacity_factor": 4.0}))
    x = torch.randn(2, 5, 16)
    y32, _ = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, aux = moe(x)
    assert y16.dtype == torch.bfloat16 and aux.dtype == torch.float32
    torch.testing.assert_close(y16.float(), y32, atol=5e-2, rtol=5e-2)
    y16.float().sum().backward()
    for w in (moe.experts.w1, moe.experts.w2, moe.experts.w3):
        assert w.grad.dtype == torch.float32 and w.grad.abs().sum() > 0


@pytest.mark.parametrize("impl", ["blocksparse", "grouped"])
def test_float64_layers_run_and_gradcheck(impl):
    # float64 (gradient checks) runs on the torch backends, also under the interpreter (the kernels take fp32 /
    # fp16 / bf16): dMoE(...).double() works, and moe_mlp passes torch.autograd.gradcheck in every input
    torch.manual_seed(0)
    opts = {"block_size": 16} if impl == "blocksparse" else {}
    moe = dMoE(4, 6, 3, 2, impl=impl, **opts).double()
    y, aux = moe(torch.randn(2, 3, 4, dtype=torch.float64))
    assert y.dtype == torch.float64 and torch.isfinite(y).all()
    idx = torch.tensor([[0, 2], [2, 1], [1, 0], [0, 0], [2, 0]])  # expert 0 chosen twice by one token
    inputs = [torch.randn(5, 4, dtype=torch.float64), torch.rand(5, 2, dtype=torch.float64)]
    inputs += [torch.randn(3, *s, dtype=torch.float64) for s in ((4, 6), (6, 4), (4, 6))]
    inputs = [t.requires_grad_() for t in inputs]

    def mlp(x, w, w1, w2, w3):
        return moe_mlp(x, idx, w, w1, w2, w3, activation="gelu", impl=impl, **opts)

    assert torch.autograd.gradcheck(mlp, inputs)
