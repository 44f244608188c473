"""Layer options for current MoE models and fine-tuning: the gated shared expert (Qwen2-MoE), expert dropout,
freeze, the sequence balance loss in the layer, PaddedMoE's drop policies; against float64 formulas; bad options
named."""

import pytest
import torch

from blocksparse_moe.layers.losses import sequence_balance_loss
from blocksparse_moe.layers.moe import PaddedMoE, dMoE, freeze
from blocksparse_moe.options import MoEOptions
from blocksparse_moe.strategies.padded import padded_slots


def _layer(cls=dMoE, **kw):
    """A float64 layer (dMoE: the reference strategy; PaddedMoE: its own)."""
    return cls(8, 12, 4, 2, **(dict(impl="reference") if cls is dMoE else {}), **kw).double()


@pytest.mark.parametrize("cls", [dMoE, PaddedMoE])
def test_gated_shared_expert_float64(cls):
    # out = experts(x) + sigmoid(x · w) · shared(x), per token; the gate gets a gradient
    m = _layer(cls, shared_expert_size=6, shared_expert_gate=True)
    plain = _layer(cls, shared_expert_size=6)
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("shared_expert_gate")})
    x = torch.randn(2, 5, 8, dtype=torch.float64)  # 2 sequences of 5 tokens
    flat = x.reshape(-1, 8)
    shared = m.shared_expert(flat)
    without_shared = plain(x)[0].reshape(-1, 8) - shared
    gate = torch.sigmoid(flat @ m.shared_expert_gate.weight.t())  # [T, 1]
    torch.testing.assert_close(m(x)[0].reshape(-1, 8), without_shared + gate * shared)
    m(x)[0].sum().backward()
    assert m.shared_expert_gate.weight.grad.abs().sum() > 0
    assert m.shared_expert_gate.weight.shape == (1, 8)


def test_expert_dropout_only_in_training():
    # eval: exactly the layer without dropout; training: a different, unbiased (mean over draws ≈ eval) output
    m = _layer(expert_dropout=0.5)
    ref = _layer()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(6, 8, dtype=torch.float64)
    torch.testing.assert_close(m.eval()(x)[0], ref.eval()(x)[0], rtol=0, atol=0)
    m.train()
    draws = torch.stack([m(x)[0] for _ in range(400)])
    assert not torch.allclose(draws[0], ref(x)[0])
    torch.testing.assert_close(draws.mean(0), ref(x)[0], atol=0.05, rtol=0.1)
    # p = 0: no change in training either
    assert _layer(expert_dropout=0.0).expert_dropout == 0.0


@pytest.mark.parametrize("impl", ["grouped", "reference"])
def test_expert_dropout_masks_survive_recompute(impl):
    # with recompute_activation the activation (and its dropout) is recomputed in backward: the same masks, so the
    # same output and gradients as without recompute
    results = []
    for recompute in (False, True):
        torch.manual_seed(0)
        m = dMoE(8, 12, 4, 2, impl=impl, expert_dropout=0.3, recompute_activation=recompute)
        x = torch.randn(7, 8, requires_grad=True)  # 7 tokens: odd
        torch.manual_seed(1)
        y = m(x)[0]
        y.sum().backward()
        results.append((y.detach(), x.grad, m.experts.w1.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_sequence_balance_weight_in_aux_loss():
    # aux = load balancing + z-loss + w · sequence_balance_loss over the input's sequences ([B, S, d]); a 2-D input
    # is one sequence
    m = _layer(load_balancing_weight=0.0, sequence_balance_weight=0.3, score="sigmoid")
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    logits, _, idx = m.router(x.reshape(-1, 8))
    expected = 0.3 * sequence_balance_loss(logits.sigmoid(), idx, 4, seq_len=5)
    torch.testing.assert_close(m(x)[1], expected)
    expected_flat = 0.3 * sequence_balance_loss(logits.sigmoid(), idx, 4, seq_len=15)
    torch.testing.assert_close(m(x.reshape(15, 8))[1], expected_flat)
    assert float(m(torch.randn(0, 8, dtype=torch.float64))[1].detach()) == 0.0  # no tokens


def test_freeze_parts():
    model = torch.nn.Sequential(_layer(shared_expert_size=4, shared_expert_gate=True), _layer(cls=PaddedMoE))

    def trainable():
        return {n for n, p in model.named_parameters() if p.requires_grad}

    everything = trainable()
    assert freeze(model, experts=True) is model
    assert trainable() == {n for n in everything if ".experts." not in n}
    freeze(model, router=True, shared=True)  # experts stay frozen (None: unchanged)
    assert trainable() == set()
    freeze(model, experts=False, router=False, shared=False)
    assert trainable() == everything
    freeze(model[0], shared=True)  # the shared expert and its gate
    assert {n for n in everything - trainable()} == {
        "0.shared_expert.up.weight",
        "0.shared_expert.gate.weight",
        "0.shared_expert.down.weight",
        "0.shared_expert_gate.weight",
    }


@pytest.mark.parametrize(
    "build,exc,match",
    [
        (lambda: dMoE(8, 8, 4, shared_expert_gate=True), ValueError, "shared_expert_gate=True needs a shared expert"),
        (lambda: dMoE(8, 8, 4, shared_expert_size=4, shared_expert_gate=1), TypeError, "shared_expert_gate must be"),
        (lambda: dMoE(8, 8, 4, expert_dropout=1.0), ValueError, "expert_dropout must be in"),
        (lambda: PaddedMoE(8, 8, 4, expert_dropout="0.1"), ValueError, "expert_dropout must be a finite"),
        (lambda: freeze(torch.nn.Linear(2, 2), experts=True), ValueError, "layer must be or hold a dMoE"),
        (lambda: freeze([], experts=True), TypeError, "layer must be a torch.nn.Module"),
        (lambda: freeze(dMoE(8, 8, 4), experts="yes"), TypeError, "experts must be a bool"),
        (lambda: dMoE(8, 8, 4, sequence_balance_weight=-1.0), ValueError, "sequence_balance_weight must be a finite"),
    ],
)
def test_bad_layer_options(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


# ---------------------------------------------------------------------------------------------------------------
# capacity drop policies (PaddedMoE)


def test_padded_slots_drop_policies_hand_computed():
    # one expert, capacity 2, 4 tokens with weights 0.1, 0.9, 0.5, 0.7: "position" keeps tokens 0 and 1 (token
    # order), "probs" keeps 1 and 3 (the two heaviest), each in its slot by rank
    idx = torch.zeros(4, 1, dtype=torch.long)
    w = torch.tensor([[0.1], [0.9], [0.5], [0.7]])
    assert padded_slots(idx, 1, 2).flatten().tolist() == [0, 1, 2, 2]
    assert padded_slots(idx, 1, 2, priority=w).flatten().tolist() == [2, 0, 2, 1]
    # ties keep the position order (stable); an invalid id claims nothing under either policy
    idx = torch.tensor([[0], [-1], [0], [0]])
    assert padded_slots(idx, 1, 2, priority=torch.ones(4, 1)).flatten().tolist() == [0, 2, 1, 2]


def _padded_reference(x, idx, w, layer, capacity, groups, policy):
    """float64 loop: per group and expert, the first (position) or heaviest (probs) `capacity` assignments run."""
    T, k = idx.shape
    S = T // groups
    ex = layer.experts
    out = torch.zeros(T, x.shape[1], dtype=torch.float64)
    for g in range(groups):
        for e in range(ex.num_experts):
            cand = [(t, j) for j in range(k) for t in range(g * S, (g + 1) * S) if idx[t, j] == e]  # rank-major
            if policy == "probs":
                cand = sorted(cand, key=lambda tj: -float(w[tj]))  # stable: ties in position order
            for t, j in cand[:capacity]:
                h = torch.nn.functional.silu(x[t] @ ex.w1[e]) * (x[t] @ ex.w3[e])
                out[t] += w[t, j] * (h @ ex.w2[e])
    return out


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("groups", [1, "sequence"])
def test_padded_drop_policy_float64(policy, groups):
    # capacity 2 per expert per group with 2 × 7 tokens and k = 2 of 4: drops for sure
    m = PaddedMoE(8, 12, 4, 2, capacity=2, num_groups=groups, drop_policy=policy).double()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    flat = x.reshape(-1, 8)
    _, w, idx = m.router(flat)
    ref = _padded_reference(flat, idx, w.detach(), m, 2, 1 if groups == 1 else 2, policy)
    torch.testing.assert_close(m(x)[0].reshape(-1, 8).detach(), ref)
    assert m.options.drop_policy == policy


def test_probs_policy_keeps_more_weight():
    # the kept assignments carry at least as much combine weight as under "position"
    x = torch.randn(40, 8)
    kept = {}
    for policy in ("position", "probs"):
        torch.manual_seed(0)
        m = PaddedMoE(8, 12, 4, 2, capacity_factor=0.5, drop_policy=policy)
        _, w, idx = m.router(x)
        slot = padded_slots(idx, 4, 10, priority=w if policy == "probs" else None)
        kept[policy] = float(w[slot < 4 * 10].sum())
    assert kept["probs"] > kept["position"]


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: PaddedMoE(8, 8, 4, drop_policy="random"), "drop_policy must be one of"),
        (lambda: MoEOptions(impl="grouped", drop_policy="probs"), "drop_policy applies to impl='padded'"),
    ],
)
def test_bad_drop_policy(build, match):
    with pytest.raises(ValueError, match=match):
        build()
