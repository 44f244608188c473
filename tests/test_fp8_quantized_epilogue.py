"""``a`` quantized in the FP8 up-projection's epilogue (``expert_gemm.gemm(..., act_scales=)``, ``QUANT_A``; issue 17,
interpreter): the E4M3 bits and the scales the fused epilogue writes equal, bit for bit, ``kernels.quantize.quantize``
of the ``a`` the same GEMM writes unfused (in x's dtype), and h, g are unchanged; the FP8 MLP forward of the Triton
backend takes the fused path for mxfp8 (no quantize pass of ``a``) and the separate pass for blockwise and rowwise,
with identical results. Outputs are poisoned (E4M3 NaN 0x7F, E8M0 NaN 255, NaN); the edges are named where tested."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import Recorded, poison_, routing

from blocksparse_moe import functional
from blocksparse_moe.backends import triton_fp8
from blocksparse_moe.kernels import expert_gemm
from blocksparse_moe.kernels import quantize as Q
from blocksparse_moe.kernels.expert_gemm import EPILOGUE_QUANT, BackwardEpilogue, Fp8Mode, GemmScales
from blocksparse_moe.kernels.layouts import Rows, Schedule
from blocksparse_moe.routing import plan_routing

MX = Fp8Mode.MX
BLOCK_M = 16
E4M3 = torch.float8_e4m3fn


def _up_projection(T, k, E, d, f, kind, *, glu=True, dtype=torch.bfloat16, activation="silu", edit=None):
    """A gathered MX up-projection ``x[token] @ (w1, w3)`` run twice on poisoned outputs: unfused (``a`` in
    ``dtype``, then ``quantize``) and fused (``act_scales``). ``edit(x, w1, w3)`` shapes the inputs in place before
    they are quantized. Returns ``(unfused (h, g, aq, scale), fused (h, g, aq, scale))`` with aq as its bits."""
    plan = plan_routing(routing(T, k, E, kind), E, block_size=1, check=False)
    R, rcp = plan.num_assignments, MX.recipe()
    x, w1, w3 = torch.randn(T, d), torch.randn(E, d, f) / d**0.5, torch.randn(E, d, f) / d**0.5
    if edit is not None:
        edit(x, w1, w3)
    xq, xs = Q.quantize(x, rcp.act_block(), rcp.scale_dtype)
    w1q, w1s = Q.quantize(w1, rcp.weight_block(0), rcp.scale_dtype)
    w3q, w3s = Q.quantize(w3, rcp.weight_block(0), rcp.scale_dtype) if glu else (None, None)
    inputs = [t.clone() for t in (xq.view(torch.uint8), xs, w1q.view(torch.uint8), w1s)]
    schedule = Schedule.build(plan.offsets, R, BLOCK_M)

    def run(act_out, act_scales):
        h, g = poison_(torch.empty(R, f, dtype=dtype)), poison_(torch.empty(R, f, dtype=dtype)) if glu else None
        expert_gemm.gemm(
            Rows.dense(xq, gathered=True), w1q, Rows.dense(h), schedule, row_src=plan.row_token, gate=w3q, gate_out=g,
            act_out=act_out, act_scales=act_scales, activation=activation, scales=GemmScales(MX, xs, w1s, w3s),
        )  # fmt: skip
        return h, g

    a = poison_(torch.empty(R, f, dtype=dtype))
    h, g = run(a, None)
    aq, scale = Q.quantize(a, rcp.act_block(), rcp.scale_dtype)
    fused_aq = torch.full((R, f), 0x7F, dtype=torch.uint8).view(E4M3)  # E4M3 NaN
    fused_scale = torch.full((R, -(-f // rcp.group)), 255, dtype=torch.uint8)  # E8M0 NaN
    fused_h, fused_g = run(fused_aq, fused_scale)
    # inputs are never modified
    for before, after in zip(inputs, (xq.view(torch.uint8), xs, w1q.view(torch.uint8), w1s)):
        assert torch.equal(before, after)
    return (h, g, aq.view(torch.uint8), scale), (fused_h, fused_g, fused_aq.view(torch.uint8), fused_scale)


def _assert_bit_equal(unfused, fused) -> None:
    for name, u, v in zip(("h", "g", "aq", "scale"), unfused, fused):
        if u is None:
            assert v is None
            continue
        assert u.shape == v.shape, name
        same = u.view(torch.uint8) if u.dtype != torch.uint8 else u
        other = v.view(torch.uint8) if v.dtype != torch.uint8 else v
        assert torch.equal(same, other), f"{name}: {(same != other).sum().item()} elements differ"
    assert not (fused[3] == 255).any(), "a scale left unwritten (poison) or NaN"


CASES = {
    # name: (T, k, E, d, f, routing)
    "empty-experts,partial-group": (13, 2, 4, 64, 80, "skip"),  # experts 1, 3 get no rows; f = 80: a 16-column group
    "one-row,E=1": (1, 1, 1, 40, 96, "uniform"),  # one row, E = 1; f = 96: three whole groups; d = 40 unaligned
    "one-expert": (20, 2, 3, 32, 40, "one-hot"),  # all rows to one expert (several M tiles); f = 40: a partial group
    "k=E": (5, 3, 3, 48, 64, "uniform"),  # k = E: every token on every expert
}


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_a_is_the_separate_pass(case):
    _assert_bit_equal(*_up_projection(*CASES[case]))


@pytest.mark.parametrize(
    "glu, dtype, activation",
    [
        (False, torch.bfloat16, "gelu"),  # no gate: a = act(h)
        (True, torch.float16, "silu"),  # fp16 a, widened by a cast
        (True, torch.float32, "relu"),  # fp32 a: no rounding before the quantization
    ],
)
def test_quantized_a_dtypes_and_activations(glu, dtype, activation):
    # f = 72: two whole groups and an 8-column one
    _assert_bit_equal(*_up_projection(9, 2, 3, 32, 72, "uniform", glu=glu, dtype=dtype, activation=activation))


def test_quantized_a_zero_group_and_outlier():
    def edit(x, w1, w3):
        w3[:, :, 32:64] = 0  # g = 0 in columns 32..63: a's second group all zero (E8M0 scale 0, never NaN / inf)
        # expert 1, column 5: huge h and g where x > 0 (token 1: silu passes it), an outlier the group's other
        # elements round under
        x[1] = x[1].abs()
        w1[1, :, 5] = w1[1, :, 5].abs() * 300
        w3[1, :, 5] *= 300
        x[3] = 0  # token 3: its rows all zero (every group's amax 0)

    unfused, fused = _up_projection(8, 2, 2, 32, 72, "uniform", edit=edit)
    _assert_bit_equal(unfused, fused)
    _, _, aq, scale = fused
    # the zero group: scale 2^-127 (bits 0), q = ±0 (act(h)·0 keeps act(h)'s sign)
    assert (scale[:, 1] == 0).all() and (aq[:, 32:64].view(E4M3).float() == 0).all()
    assert torch.isfinite(aq.view(E4M3).float()).all()
    assert (scale == 0).all(1).sum() == 2  # token 3's two rows: every group zero
    # k = E = 2: rows 0..7 are expert 0's, 8..15 expert 1's, whose first group holds the outlier in token 1's row
    # (h, g ~300x: a ~2^16x): a scale 2^8 and more above expert 0's
    assert scale[8:, 0].max() >= scale[:8, 0].max() + 8


def test_quantized_a_group_nan():
    # a NaN in x makes its token's a NaN: the groups' scales NaN (E8M0 255) and every element NaN, as the separate
    # pass gives (fp8.py's documented propagation)
    def edit(x, w1, w3):
        x[2, 7] = float("nan")

    (h, g, aq, scale), (fh, fg, faq, fscale) = _up_projection(6, 1, 2, 32, 40, "uniform", edit=edit)
    assert torch.equal(aq, faq) and torch.equal(scale, fscale)
    assert (fscale == 255).any()


def _small():
    """A valid MX up-projection launch's arguments (4 tokens, k = 1, E = 2, d = 64, f = 32) and act_out, act_scales."""
    plan = plan_routing(routing(4, 1, 2, "uniform"), 2, block_size=1, check=False)
    rcp = MX.recipe()
    xq, xs = Q.quantize(torch.randn(4, 64), rcp.act_block(), rcp.scale_dtype)
    wq, ws = Q.quantize(torch.randn(2, 64, 32), rcp.weight_block(0), rcp.scale_dtype)
    args = dict(
        a=Rows.dense(xq, gathered=True), w=wq, out=Rows.dense(torch.empty(4, 32)),
        schedule=Schedule.build(plan.offsets, 4, BLOCK_M), row_src=plan.row_token, scales=GemmScales(MX, xs, ws),
        act_out=torch.empty(4, 32, dtype=E4M3), act_scales=torch.empty(4, 1, dtype=torch.uint8),
    )  # fmt: skip
    return args, plan


def _launch(args, **changes):
    args = {**args, **changes}
    expert_gemm.gemm(args.pop("a"), args.pop("w"), args.pop("out"), args.pop("schedule"), **args)


def test_quantized_a_errors(monkeypatch):
    args, plan = _small()
    _launch(args)  # valid
    rcp_bw = Fp8Mode.BLOCKWISE.recipe()
    with pytest.raises(TypeError, match=r"an E4M3 act_out \(a quantized in the forward epilogue\) needs act_scales"):
        _launch(args, act_scales=None)
    with pytest.raises(ValueError, match="act_scales applies to the forward epilogue .* got act_out None"):
        _launch(args, act_out=None)
    backward = BackwardEpilogue(torch.zeros(4, 32), None, plan.row_assignment, torch.ones(4))
    with pytest.raises(ValueError, match="act_scales applies to the forward epilogue .* backward given"):
        _launch(args, backward=backward)
    xq, xs = Q.quantize(torch.randn(4, 64), rcp_bw.act_block(), rcp_bw.scale_dtype)
    wq, ws = Q.quantize(torch.randn(2, 64, 32), rcp_bw.weight_block(0), rcp_bw.scale_dtype)
    with pytest.raises(ValueError, match="needs an FP8 GEMM of recipe mxfp8, got blockwise"):
        _launch(args, a=Rows.dense(xq, gathered=True), w=wq, scales=GemmScales(Fp8Mode.BLOCKWISE, xs, ws),
                act_scales=torch.empty(4, 1))  # fmt: skip
    with pytest.raises(TypeError, match=r"gemm: act_out \(quantized a\) must have a dtype among"):
        _launch(args, act_out=torch.empty(4, 32))
    with pytest.raises(ValueError, match=r"gemm: act_out \(quantized a\) must have shape \[R, N\] = \(4, 32\)"):
        _launch(args, act_out=torch.empty(4, 64, dtype=E4M3))
    with pytest.raises(ValueError, match=r"act_out \(quantized a\) must share out's strides \(32, 1\), got \(1, 4\)"):
        _launch(args, act_out=torch.empty(32, 4, dtype=E4M3).t())
    with pytest.raises(ValueError, match=r"act_scales \(mxfp8\) must have shape \[R, cdiv\(N, group\)\] = \(4, 1\)"):
        _launch(args, act_scales=torch.empty(4, 2, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"act_scales \(mxfp8\) must have a dtype among \(torch.uint8,\)"):
        _launch(args, act_scales=torch.empty(4, 1))
    blocked = Rows.blocked(torch.empty(2, 16, 16), 2, 32)
    with pytest.raises(ValueError, match="needs a dense out, got a blocked layout"):
        _launch(args, out=blocked)
    # the configs' invariant (a tile of whole groups), asserted by the launcher: a config of 16 columns
    config = expert_gemm.gemm_config
    monkeypatch.setattr(expert_gemm, "gemm_config", lambda *a, **kw: replace(config(*a, **kw), block_n=16))
    with pytest.raises(AssertionError, match="tiles of whole 32-column groups, got a config of 16 columns"):
        _launch(args)


def test_gpu_glu_tiles_hold_whole_groups(monkeypatch):
    # the FP8 GLU forward's GPU tiles (every architecture, aligned or not, 64- and 128-row tiles) hold whole MX
    # groups, so the fused epilogue always applies to mxfp8
    monkeypatch.setattr(expert_gemm, "interpreting", lambda: False)
    for cc in (90, 100, 120):
        for aligned in (True, False):
            for block_m in (16, 32, 64, 128):
                cfg = expert_gemm.gemm_config(E4M3, block_m, epilogue=1, glu=True, aligned=aligned, capability=cc,
                                              fp8=MX)  # fmt: skip
                assert cfg.block_n % MX.recipe().group == 0, (cc, aligned, block_m, cfg)


def _mlp(recipe: str):
    torch.manual_seed(3)
    T, d, f, E, k = 10, 32, 40, 3, 2
    x = torch.randn(T, d)
    idx = routing(T, k, E, "skip")
    weights = torch.rand(T, k)
    w1, w3 = torch.randn(E, d, f) / d**0.5, torch.randn(E, d, f) / d**0.5
    w2 = torch.randn(E, f, d) / f**0.5
    return functional.moe_mlp(x, idx, weights, w1, w2, w3, activation="silu", impl="grouped", backend="triton",
                              fp8=recipe)  # fmt: skip


@pytest.mark.parametrize("recipe", ["mxfp8", "blockwise", "rowwise"])
def test_mlp_forward_quantizes_a_where_it_can(recipe, monkeypatch):
    # mxfp8: the up-projection writes a as E4M3 + scales (QUANT_A) and no quantize pass reads a; blockwise / rowwise:
    # a in x's dtype, quantized by its own pass. The fused forward gives the unfused one's output bit for bit.
    gemm_calls, quantize_calls = Recorded(expert_gemm.gemm_kernel), Recorded(Q.quantize_kernel)
    monkeypatch.setattr(expert_gemm, "gemm_kernel", gemm_calls)
    monkeypatch.setattr(Q, "quantize_kernel", quantize_calls)
    with torch.no_grad():
        out = _mlp(recipe)
    fused = triton_fp8.MODES[recipe] in EPILOGUE_QUANT
    assert fused == (recipe == "mxfp8")
    up = [c for c in gemm_calls.calls if c["EPILOGUE"] == expert_gemm.Epilogue.FORWARD]
    assert [c["QUANT_A"] for c in up] == [int(triton_fp8.MODES[recipe]) if fused else 0]
    assert len(quantize_calls.calls) == (4 if fused else 5)  # x, w1, w3, w2 [, a]
    monkeypatch.setattr(triton_fp8, "EPILOGUE_QUANT", ())  # every recipe on the separate pass
    with torch.no_grad():
        unfused = _mlp(recipe)
    assert torch.equal(out, unfused)
