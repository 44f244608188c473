"""The PyTorch backend's CPU-eager primitive: ``torch._grouped_mm`` where the probe finds it (torch 2.13 CPU) and the
operands meet its stride rule, else the per-expert ``torch.mm`` loop. The two give the same bits; the layer through
either matches float64, with and without weight gradients (``torch._grouped_mm``'s own CPU backward fails when only
x requires grad: ours never differentiates through it), also with Hugging Face's concatenated ``gate_up_proj`` (w1 and
w3 adjacent in one tensor). And the ``hf_experts`` bench rows compute the same layer."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TOL, routing

import blocksparse_moe as bsm
from blocksparse_moe import backends
from blocksparse_moe.reference import per_token_moe_mlp

TORCH = backends.get("torch")

# widths are multiples of 4 fp32 (16 bytes): torch._grouped_mm takes them
CASES = {
    # name: (T, d, f, E, k, routing kind)
    "empty-experts": (13, 20, 24, 5, 2, "skip"),  # experts without tokens (empty groups)
    "one-token": (1, 8, 12, 1, 1, "uniform"),  # one token, E = 1, k = 1
    "k=E": (9, 16, 32, 3, 3, "uniform"),  # k = E: every token on every expert
    "one-expert": (20, 12, 16, 4, 2, "one-hot"),  # all tokens to one expert
    "invalid": (11, 8, 12, 4, 2, "invalid"),  # unchecked ids -1, E, E+5: rows past offsets[E], written zero
    "empty": (0, 8, 12, 3, 2, "uniform"),  # no tokens
}


@pytest.fixture
def loop(monkeypatch):
    """Make the probe say ``torch._grouped_mm`` is unavailable: the per-expert loop runs."""
    monkeypatch.setattr(TORCH, "grouped_mm_available", lambda device_type: False)


def _inputs(case: str, glu: bool = True):
    T, d, f, E, k, kind = CASES[case]
    x = torch.randn(T, d)
    idx = routing(T, k, E, kind)
    weights = torch.rand(T, k)
    w1 = torch.randn(E, d, f) / math.sqrt(d)
    w2 = torch.randn(E, f, d) / math.sqrt(f)
    w3 = torch.randn(E, d, f) / math.sqrt(d) if glu else None
    return x, idx, weights, w1, w2, w3


def _layer(impl, x, idx, weights, w1, w2, w3, leaves):
    ins = [t.detach().clone().requires_grad_(name in leaves) for name, t in zip("xawvu", (x, weights, w1, w2, w3))
           if t is not None]  # fmt: skip
    xs, ws, w1s, w2s, *w3s = ins
    out = bsm.moe_mlp(xs, idx, ws, w1s, w2s, w3s[0] if w3s else None, activation="silu", impl=impl, check=False,
                      backend="torch", **({"block_size": 16} if impl == "blocksparse" else {}))  # fmt: skip
    wanted = [t for t in ins if t.requires_grad]
    grads = torch.autograd.grad(out, wanted, torch.ones_like(out) * 0.5) if wanted and out.numel() else ()
    return out.detach(), grads


def test_probe_finds_grouped_mm_on_this_cpu():
    assert hasattr(torch, "_grouped_mm")  # torch 2.13 CPU (PLATFORM.md)
    assert TORCH.grouped_mm_available("cpu")
    assert TORCH.host_primitive(torch.device("cpu")) == "torch._grouped_mm"
    from blocksparse_moe import info

    assert dict(info.collect())["torch backend GEMMs, CPU"] == "torch._grouped_mm (probed)"


def test_unavailable_probe_names_the_loop(loop):
    assert TORCH.host_primitive(torch.device("cpu")) == "torch.mm loop"


@pytest.mark.parametrize("case", list(CASES))
def test_primitives_agree_bit_for_bit(case, monkeypatch):
    x, idx, *_ = _inputs(case)
    plan = bsm.routing.plan_routing(idx, CASES[case][3], block_size=1, check=False)
    w = torch.randn(plan.num_experts, x.shape[1], 24)
    dy = torch.randn(plan.num_assignments, 24)
    fast = TORCH.grouped_mm(x, w, plan.offsets, plan.row_assignment // plan.top_k)
    fast_dw = TORCH.grouped_mm_wgrad(x, dy, plan.offsets, plan.row_assignment // plan.top_k)
    monkeypatch.setattr(TORCH, "grouped_mm_available", lambda device_type: False)
    slow = TORCH.grouped_mm(x, w, plan.offsets, plan.row_assignment // plan.top_k)
    slow_dw = TORCH.grouped_mm_wgrad(x, dy, plan.offsets, plan.row_assignment // plan.top_k)
    assert torch.equal(fast, slow) and torch.equal(fast_dw, slow_dw)
    end = int(plan.offsets[-1])
    assert torch.equal(fast[end:], torch.zeros_like(fast[end:]))  # rows past offsets[E] (invalid ids): zero


@pytest.mark.parametrize("leaves", ["xawvu", "x"], ids=["all-grads", "x-only"])
@pytest.mark.parametrize("impl", ["grouped", "blocksparse"])
@pytest.mark.parametrize("case", list(CASES))
def test_layer_matches_float64_and_the_loop(case, impl, leaves, monkeypatch):
    x, idx, weights, w1, w2, w3 = _inputs(case)
    calls = []
    grouped_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or grouped_mm(*a, **kw))
    out, grads = _layer(impl, x, idx, weights, w1, w2, w3, leaves)
    assert calls or not out.numel()  # the fast path ran (every GEMM of the layer: forward and backward)
    # float64 reference (invalid ids contribute zero: their weight masked, the id clamped)
    E = w1.shape[0]
    valid = (idx >= 0) & (idx < E)
    ref_in = [t.double().requires_grad_(name in leaves) for name, t in zip("xawvu", (x, weights, w1, w2, w3))]
    rx, rw, rw1, rw2, rw3 = ref_in
    ref = per_token_moe_mlp(rx, idx.clamp(0, E - 1), rw * valid, rw1, rw2, rw3, "silu")
    torch.testing.assert_close(out.double(), ref.detach(), **TOL[torch.float32])
    if out.numel():
        ref_grads = torch.autograd.grad(ref, [t for t in ref_in if t.requires_grad], torch.ones_like(ref) * 0.5)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g.double(), r, atol=4e-4, rtol=4e-4)
    # the loop gives the same bits (w1 and w3 are separate tensors: the same products, the same sums)
    monkeypatch.setattr(TORCH, "grouped_mm_available", lambda device_type: False)
    out2, grads2 = _layer(impl, x, idx, weights, w1, w2, w3, leaves)
    assert torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(grads, grads2, strict=True))


@pytest.mark.parametrize("case", ["empty-experts", "k=E", "invalid"])
def test_concatenated_gate_up_matches_float64(case):
    # one [E, 2f, d] parameter as Hugging Face stores it (w1 and w3 adjacent views of it)
    x, idx, weights, w1, w2, w3 = _inputs(case)
    E, f = w1.shape[0], w1.shape[2]
    gate_up = torch.cat([w1, w3], dim=2).transpose(1, 2).contiguous().requires_grad_()
    xs = x.clone().requires_grad_()
    a, b = gate_up.transpose(1, 2).split(f, dim=2)
    out = bsm.moe_mlp(xs, idx, weights, a, w2, b, activation="silu", impl="grouped", backend="torch", check=False)
    grads = torch.autograd.grad(out, [xs, gate_up], torch.ones_like(out))
    valid = (idx >= 0) & (idx < E)
    rx, rg = x.double().requires_grad_(), gate_up.detach().double().requires_grad_()
    r1, r3 = rg.transpose(1, 2).split(f, dim=2)
    ref = per_token_moe_mlp(rx, idx.clamp(0, E - 1), weights.double() * valid, r1, w2.double(), r3, "silu")
    torch.testing.assert_close(out.double(), ref.detach(), **TOL[torch.float32])
    for g, r in zip(grads, torch.autograd.grad(ref, [rx, rg], torch.ones_like(ref)), strict=True):
        torch.testing.assert_close(g.double(), r, atol=4e-4, rtol=4e-4)


def test_hf_experts_bench_rows_compute_the_layer():
    pytest.importorskip("transformers")
    from bench.harness import _reference
    from bench.problems import Shape, make_problem
    from bench.strategies import build_cases

    p = make_problem(Shape(16, 16, 24, 4, 2, True, "silu", "uniform"), torch.float32, torch.device("cpu"))
    cases, skipped = build_cases(p, ["hf_experts"], [1.0], 16, 8.0)
    assert [c.name for c in cases] == ["hf:eager", "hf:grouped_mm", "hf:batched_mm", "hf:blocksparse_moe"]
    assert skipped == []
    grad = torch.randn(16, 16)
    ref_out, ref_grads = _reference(p, grad)
    for case in cases:
        out = case.forward()
        torch.testing.assert_close(out.double(), ref_out.double(), atol=1e-4, rtol=1e-4, msg=case.name)
        grads = case.grads_as_reference(torch.autograd.grad(out, case.inputs, grad))
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g.double(), r.double(), atol=1e-4, rtol=1e-4, msg=case.name)
