"""Layer options for current MoE models and fine-tuning: the gated shared expert (Qwen2-MoE), expert dropout,
freeze; against float64 formulas; bad options named."""

import pytest
import torch

from blocksparse_moe.layers.moe import PaddedMoE, dMoE, freeze


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
    ],
)
def test_bad_layer_options(build, exc, match):
    with pytest.raises(exc, match=match):
        build()
