"""The benchmark suite (bench/): FLOP accounting, routing generators, strategy cases, harness rows and the CLI."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import cli, flops, report, timing
from bench.harness import _derive, run, sqnr_db
from bench.memory import saved_for_backward
from bench.problems import Shape, make_problem, make_routing, parse_routing
from bench.strategies import build_cases, fp8_case_name, grouped_mm_moe_mlp, loop_moe_mlp, prequant_case_name
from blocksparse_moe import moe_mlp
from blocksparse_moe.reference import per_token_moe_mlp

ROOT = Path(__file__).resolve().parent.parent


# ---- FLOP accounting -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("glu, mult", [(True, 3), (False, 2)])
def test_useful_flops(glu, mult):
    # odd sizes: T=7 tokens, k=3, d=5, f=11
    assert flops.useful_flops(7 * 3, 5, 11, glu) == 7 * 3 * 2 * 5 * 11 * mult
    # empty input: no work
    assert flops.useful_flops(0, 5, 11, glu) == 0


def test_backward_is_twice_forward():
    fwd = flops.useful_flops(6, 4, 8, True)
    assert flops.backward_flops(fwd) == 2 * fwd and flops.fwd_bwd_flops(fwd) == 3 * fwd


@pytest.mark.parametrize("glu, mult", [(True, 3), (False, 2)])
def test_padded_executed_flops(glu, mult):
    # E=4 experts, C=5 slots, 3 groups: every slot is computed, filled or not
    assert flops.padded_executed_flops(4, 5, 3, 16, 24, glu) == 4 * 5 * 3 * 2 * 16 * 24 * mult


def test_blocksparse_executed_flops_rounds_each_expert_to_blocks():
    d, f, B = 16, 32, 8
    # experts: no tokens (0 blocks), one token (1 block), exactly B, B+1 (2 blocks), 13 (odd)
    counts = [0, 1, 8, 9, 13]
    rows = 0 + 8 + 8 + 16 + 16
    assert flops.blocksparse_executed_flops(counts, B, d, f, glu=True) == rows * 2 * d * f * 3
    # all tokens to one expert (E=1 edge): only that expert's tail block is padded
    assert flops.blocksparse_executed_flops([20], B, d, f, glu=False) == 24 * 2 * d * f * 2


def test_blocksparse_executed_flops_pads_ffn_to_whole_blocks():
    # f = 20 is not a multiple of B = 8: sparse blocks cover ceil(20/8)·8 = 24 columns
    assert flops.blocksparse_executed_flops([8], 8, 4, 20, glu=False) == 8 * 2 * 4 * 24 * 2
    assert flops.blocksparse_executed_flops([8], 8, 4, 20, glu=False, pad_ffn=False) == 8 * 2 * 4 * 20 * 2


def test_capacity_matches_moe_mlp_rule():
    # ceil(cf · (T/G) · k / E)
    assert flops.capacity(100, 2, 8, 1.0) == 25
    assert flops.capacity(100, 2, 8, 1.25) == math.ceil(1.25 * 100 * 2 / 8)
    assert flops.capacity(12, 1, 5, 1.0, num_groups=3) == 1  # ceil(4/5)
    assert flops.capacity(9, 1, 3, 2.0) == 6


def test_dropped_assignments():
    # all tokens to one expert: everything beyond the capacity drops
    assert flops.dropped_assignments([[10, 0, 0, 0]], 3) == 7
    # per group, over experts; an expert with no tokens drops nothing
    assert flops.dropped_assignments([[4, 0, 2], [1, 5, 0]], 3) == 1 + 2


@pytest.mark.parametrize(
    "call",
    [
        lambda: flops.useful_flops(4, 0, 8, True),
        lambda: flops.useful_flops(-1, 4, 8, True),
        lambda: flops.blocksparse_executed_flops([1], 0, 4, 8, True),
        lambda: flops.capacity(10, 2, 4, 1.0, num_groups=3),
        lambda: flops.capacity(10, 2, 4, -1.0),
    ],
)
def test_flops_reject_bad_arguments(call):
    with pytest.raises(ValueError, match="got"):
        call()


def test_tflops():
    assert flops.tflops(3e12, 1.5) == pytest.approx(2.0)
    assert flops.tflops(1.0, None) is None and flops.tflops(1.0, 0.0) is None


# ---- routing and problems --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["uniform", "zipf:1.2", "one-hot"])
@pytest.mark.parametrize("E, k", [(5, 5), (7, 3), (1, 1)])  # k = E, odd sizes, E = 1
def test_routing_distinct_experts_in_range(spec, E, k):
    idx = make_routing(spec, 37, E, k, torch.Generator().manual_seed(0))
    assert idx.shape == (37, k) and idx.dtype == torch.int32
    assert int(idx.min()) >= 0 and int(idx.max()) < E
    assert all(len(set(row)) == k for row in idx.tolist())


def test_routing_one_hot_and_zipf_skew():
    g = torch.Generator().manual_seed(0)
    # one-hot with k=1: all tokens sent to one expert
    assert torch.bincount(make_routing("one-hot", 50, 4, 1, g).long().flatten(), minlength=4).tolist() == [50, 0, 0, 0]
    counts = torch.bincount(make_routing("zipf:2", 4000, 8, 1, g).long().flatten(), minlength=8)
    assert counts[0] > counts[1] > counts[3] and counts[0] > 2000  # 1/1^2 / Σ 1/e^2 ≈ 0.65


@pytest.mark.parametrize("spec", ["zipf", "zipf:0", "zipf:x", "normal", ""])
def test_routing_spec_errors(spec):
    with pytest.raises(ValueError, match="routing must be"):
        parse_routing(spec)


def test_routing_rejects_top_k_above_experts():
    with pytest.raises(ValueError, match=r"top_k must be in \[1, experts=3\], got 4"):
        make_routing("uniform", 4, 3, 4, torch.Generator())


def _problem(tokens=13, experts=4, top_k=2, glu=True, routing="uniform") -> object:
    return make_problem(Shape(tokens, 16, 24, experts, top_k, glu, "silu", routing), torch.float32, torch.device("cpu"))


def test_problem_inputs_fresh_random_and_histogram():
    p = _problem()
    assert p.tokens_per_expert == torch.bincount(p.top_k_index.long().flatten(), minlength=4).tolist()
    assert sum(p.tokens_per_expert) == 13 * 2
    for t in p.inputs:
        assert t.requires_grad and t.is_leaf and t.std() > 0
    assert torch.allclose(p.top_k_weights.sum(1), torch.ones(13))


# ---- baselines match the float64 per-token reference ----------------------------------------------------------


@pytest.mark.parametrize(
    "tokens, experts, top_k, glu, routing",
    [
        (13, 4, 2, True, "uniform"),  # odd T, GLU
        (9, 3, 3, False, "uniform"),  # k = E
        (11, 6, 1, True, "one-hot"),  # all tokens to one expert; experts with no tokens
        (5, 1, 1, False, "uniform"),  # E = 1
    ],
)
def test_baselines_match_reference(tokens, experts, top_k, glu, routing):
    p = _problem(tokens, experts, top_k, glu, routing)
    ref = per_token_moe_mlp(p.x, p.top_k_index, p.top_k_weights, p.w1, p.w2, p.w3, "silu")
    out = loop_moe_mlp(p, p.x, p.w1, p.w2, p.w3, p.top_k_weights)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    out = grouped_mm_moe_mlp(p, p.w1, p.w2, p.w3)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_baselines_empty_input():
    # empty input returns empty output
    p = _problem(tokens=0)
    assert loop_moe_mlp(p, p.x, p.w1, p.w2, p.w3, p.top_k_weights).shape == (0, 16)


# ---- cases and harness -----------------------------------------------------------------------------------------


def test_padded_cases_account_drops_and_slots():
    # one-hot: all 12 assignments (k=1) to expert 0 of 4
    p = _problem(tokens=12, experts=4, top_k=1, routing="one-hot")
    cases, skipped = build_cases(p, ["padded"], [1.0, 2.0], 8, 8.0)
    assert [c.name for c in cases] == ["padded@1", "padded@2"]
    c1, c2 = cases
    assert (c1.capacity, c2.capacity) == (3, 6)
    assert c1.dropped_fraction == pytest.approx(9 / 12) and c2.dropped_fraction == pytest.approx(6 / 12)
    assert c1.useful_flops == flops.useful_flops(3, 16, 24, True)  # only kept assignments are useful
    assert c1.executed_flops == flops.padded_executed_flops(4, 3, 1, 16, 24, True)
    assert not c1.comparable and not c1.notes  # moe_mlp's own drop count agrees
    assert skipped == []


def test_cases_skip_with_reasons_and_reject_unknown():
    p = _problem(experts=4, top_k=1)
    cases, skipped = build_cases(p, ["reference", "megablocks", "dense"], [1.0], 8, reference_max_waste=2.0)
    assert [c.name for c in cases] == ["dense"]
    assert any("reference" in s and "4x" in s for s in skipped) and any("megablocks" in s for s in skipped)
    with pytest.raises(ValueError, match=r"unknown strategies \['nope'\]"):
        build_cases(p, ["nope"], [1.0], 8, 8.0)


def test_harness_rows():
    # T=8 tokens, k=2 of E=4 experts, d=16, f=24 (GLU): padded@1 has capacity ceil(8·2/4) = 4 slots per expert
    shapes = [Shape(8, 16, 24, 4, 2, True, "silu", "uniform")]
    rows, notes = run(
        shapes,
        dtype=torch.float32,
        device=torch.device("cpu"),
        strategies=["padded", "loop", "torch_grouped_mm", "dense"],
        capacity_factors=[1.0, 2.0],
        block_size=8,
        min_run_time=0.001,
    )
    assert notes == []
    by_name = {r["strategy"]: r for r in rows}
    assert list(by_name) == ["padded@1", "padded@2", "loop", "torch_grouped_mm", "dense"]
    counts = make_problem(shapes[0], torch.float32, torch.device("cpu")).tokens_per_expert  # the run's routing
    dropped = sum(max(0, c - 4) for c in counts)
    assert dropped > 0  # this seed overloads an expert: padded@1 must drop, padded@2 (8 slots) cannot
    assert by_name["padded@1"]["dropped_fraction"] == pytest.approx(dropped / 16)
    assert by_name["padded@2"]["dropped_fraction"] == 0.0
    # executed / useful: every slot computed (E·C), only kept assignments useful
    assert by_name["padded@1"]["executed_over_useful"] == pytest.approx(4 * 4 / (16 - dropped))
    assert by_name["padded@2"]["executed_over_useful"] == pytest.approx(4 * 8 / 16)
    expert_weight_bytes = 3 * 4 * 16 * 24 * 4  # w1, w2, w3 in fp32: saved by every strategy, reported apart
    for r in rows:
        assert r["fwd_ms"] > 0 and r["fwd_act_mib"] is None  # CPU: no memory counter, reported as n/a
        assert r["bwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
        if r["strategy"] != "dense":
            assert r["saved_param_bytes"] == expert_weight_bytes
        if r["strategy"] in ("loop", "torch_grouped_mm", "padded@2"):  # nothing dropped: must match the reference
            assert r["max_rel_err"] < 1e-5 and r["max_rel_err_grad"] < 1e-5
    assert "max_rel_err" not in by_name["padded@1"]  # drops: not comparable with the dropless reference
    # dense keeps its input a [T·k, d] and the GEMM output [T·k, 2f] (sliced for the second GEMM), fp32, per token
    assert by_name["dense"]["saved_bytes_per_token"] == (16 * 16 + 16 * 48) * 4 / 8
    assert by_name["dense"]["saved_param_bytes"] == (16 * 48 + 24 * 16) * 4
    # padded@2 keeps its 2x capacity buffers: more than the dropless loop's per-assignment rows
    assert by_name["padded@2"]["saved_bytes_per_token"] > by_name["loop"]["saved_bytes_per_token"]
    # a spent time budget runs nothing and says so
    rows, notes = run(
        shapes[:1],
        dtype=torch.float32,
        device=torch.device("cpu"),
        strategies=["dense"],
        capacity_factors=[1.0],
        block_size=8,
        min_run_time=0.001,
        time_budget=-1.0,
    )
    assert rows == [] and "time budget" in notes[0]


def test_fp8_cases_follow_their_strategy(monkeypatch):
    # each recipe once more per dropless strategy, right after the strategy's row, each followed by its row on
    # prequantized weights; padded and dense get none
    monkeypatch.setenv("BSM_BACKEND", "torch")
    p = _problem()
    cases, _ = build_cases(p, ["padded", "blocksparse", "grouped", "dense"], [1.0], 16, 8.0, ("blockwise", "rowwise"))
    assert [c.name for c in cases] == [
        "padded@1", "blocksparse", "blocksparse+fp8:blockwise", "blocksparse+fp8:blockwise:prequant",
        "blocksparse+fp8:rowwise", "blocksparse+fp8:rowwise:prequant", "grouped", "grouped+fp8:blockwise",
        "grouped+fp8:blockwise:prequant", "grouped+fp8:rowwise", "grouped+fp8:rowwise:prequant", "dense",
    ]  # fmt: skip
    by_name = {c.name: c for c in cases}
    assert by_name["grouped+fp8:rowwise"].fp8 == "rowwise" and by_name["grouped"].fp8 is None
    assert by_name[prequant_case_name("grouped", "rowwise")].fp8 == "rowwise"
    # the same FLOP accounting as the strategy's own row (block padding included)
    assert by_name["blocksparse+fp8:blockwise"].executed_flops == by_name["blocksparse"].executed_flops
    assert by_name["blocksparse+fp8:blockwise:prequant"].executed_flops == by_name["blocksparse"].executed_flops
    # the prequantized forward is the in-op FP8 forward bit for bit, recording no graph; its weights are E4M3
    for name in ("blocksparse", "grouped"):
        prequant, in_op = by_name[prequant_case_name(name, "blockwise")], by_name[fp8_case_name(name, "blockwise")]
        out = prequant.forward()
        assert not out.requires_grad and torch.equal(out, in_op.forward().detach()), name
        assert {t.dtype for t in prequant.parameters} == {torch.float8_e4m3fn, torch.float32}
    with pytest.raises(ValueError, match="fp8 must be one of"):
        build_cases(p, ["grouped"], [1.0], 8, 8.0, ("fp4",))
    # hf_experts: transformers' experts module prequantized (quantize_experts_fp8_), served by ours: the same output
    # as the strategy's prequantized row, bit for bit
    pytest.importorskip("transformers")
    cases, _ = build_cases(p, ["grouped", "hf_experts"], [1.0], 16, 8.0, ("mxfp8",))
    by_name = {c.name: c for c in cases}
    hf = by_name[prequant_case_name("hf:blocksparse_moe", "mxfp8")]
    out = hf.forward()
    assert hf.fp8 == "mxfp8" and not out.requires_grad and "forward only" in hf.notes[0]
    assert torch.equal(out, by_name[prequant_case_name("grouped", "mxfp8")].forward())


def test_sqnr_db():
    expected = torch.tensor([3.0, 4.0], dtype=torch.float64)
    # signal 3² + 4² = 25, noise 0.05² = 0.0025: 10·log10(1e4) = 40 dB
    assert sqnr_db(torch.tensor([3.0, 4.05]), expected) == pytest.approx(40.0, abs=1e-4)
    assert sqnr_db(expected.clone(), expected) == math.inf  # no noise
    assert math.isnan(sqnr_db(torch.ones(2), torch.zeros(2, dtype=torch.float64)))  # no signal: undefined
    assert math.isnan(sqnr_db(torch.ones(0), torch.ones(0, dtype=torch.float64)))  # empty input


@pytest.mark.parametrize("recipe", ["blockwise", "mxfp8", "rowwise"])
def test_harness_fp8_rows(recipe, monkeypatch):
    # T=8 odd-sized layer (d=16, f=24: K not a multiple of the 32 / 128 groups), k=2 of E=4, GLU; the harness's
    # rows on the PyTorch backend (the Triton FP8 kernels' math: tests/test_fp8.py; interpreted timing loops are slow)
    monkeypatch.setenv("BSM_BACKEND", "torch")
    shape = Shape(8, 16, 24, 4, 2, True, "silu", "uniform")
    rows, notes = run([shape], dtype=torch.float32, device=torch.device("cpu"), strategies=["grouped"],
                      capacity_factors=[1.0], block_size=8, min_run_time=0.001, fp8=(recipe,))  # fmt: skip
    assert notes == []
    plain, fp8, prequant = rows
    assert (plain["strategy"], plain["fp8"]) == ("grouped", None)
    assert (fp8["strategy"], fp8["fp8"]) == (fp8_case_name("grouped", recipe), recipe)
    assert (prequant["strategy"], prequant["fp8"]) == (prequant_case_name("grouped", recipe), recipe)
    for r in (plain, fp8):  # the columns of every training row: times, bytes saved for backward, errors
        assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["saved_bytes_per_token"] > 0
    # the prequantized row: forward only (inference: nothing saved for a backward), the in-op forward's output
    assert prequant["fwd_ms"] > 0 and prequant["bwd_ms"] is None and prequant["fwd_bwd_ms"] is None
    assert prequant["saved_bytes_per_token"] == 0 and prequant["basis"] == "fwd" and "forward only" in prequant["note"]
    assert prequant["sqnr_db"] == fp8["sqnr_db"] and prequant["max_rel_err"] == fp8["max_rel_err"]
    # the SQNR is that of moe_mlp(fp8=recipe) against the float64 per-token reference of the same inputs
    p = make_problem(shape, torch.float32, torch.device("cpu"))
    ref = per_token_moe_mlp(*(t.detach().double() for t in (p.x, p.top_k_index, p.top_k_weights)),
                            *(t.detach().double() for t in (p.w1, p.w2, p.w3)), "silu")  # fmt: skip
    with torch.no_grad():
        out = moe_mlp(p.x, p.top_k_index, p.top_k_weights, p.w1, p.w2, p.w3, activation="silu", impl="grouped",
                      fp8=recipe)  # fmt: skip
    assert fp8["sqnr_db"] == pytest.approx(sqnr_db(out, ref))
    # FP8's expected error: E4M3 keeps 3 mantissa bits (~20-30 dB); fp32 is exact to ~7 digits (> 100 dB)
    assert 15 < fp8["sqnr_db"] < 40 and 15 < fp8["sqnr_db_grad"] < 40
    assert plain["sqnr_db"] > 100 and plain["sqnr_db_grad"] > 100
    assert fp8["max_rel_err"] > 1e-3 > plain["max_rel_err"]
    table = report.markdown(rows, [1.0])
    assert "| SQNR dB (out / grads) |" in table and f"| grouped+fp8:{recipe} |" in table
    assert f"| grouped+fp8:{recipe}:prequant |" in table
    assert "SQNR" not in report.markdown(rows[:1], [1.0])  # no FP8 row: the table as before


def test_derive_rates_and_speedups_from_other_rows():
    # hand-made rows: rates, % of dense and speedups come from the right rows and the right time basis
    def row(name, useful, fwd_bwd_ms, fwd_ms, cf=None, act=None):
        return dict(strategy=name, useful_flops=useful, fwd_bwd_ms=fwd_bwd_ms, fwd_ms=fwd_ms, capacity_factor=cf,
                    fwd_act_mib=act)  # fmt: skip

    rows = [
        row("dense", 100e9, 1.0, 0.4),
        row("padded@1", 90e9, 2.0, 0.25, cf=1.0, act=6.0),
        row("grouped", 100e9, 4.0, 1.5, act=3.0),
        row("fwd-only", 100e9, None, 0.5),  # backward n/a: forward basis
    ]
    _derive(rows, [1.0])
    dense, padded, grouped, fwd_only = rows
    assert dense["tflops"] == pytest.approx(3 * 100e9 / 1e-3 / 1e12) and dense["basis"] == "fwd+bwd"
    assert grouped["pct_dense"] == pytest.approx(25.0)  # same FLOPs in 4x the time
    assert padded["pct_dense"] == pytest.approx(100 * (90 / 2.0) / (100 / 1.0))  # kept FLOPs only
    assert grouped["speedup_vs_padded@1"] == pytest.approx(2.0 / 4.0)
    assert grouped["fwd_act_vs_padded@1"] == pytest.approx(0.5)
    assert fwd_only["basis"] == "fwd" and fwd_only["tflops"] == pytest.approx(100e9 / 0.5e-3 / 1e12)
    assert fwd_only["pct_dense"] == pytest.approx(80.0)  # vs dense forward: 0.4 ms / 0.5 ms
    assert fwd_only["speedup_vs_padded@1"] == pytest.approx(0.25 / 0.5)


def test_interleaved_alternates_the_closures_and_takes_medians(monkeypatch):
    calls = []
    readings = iter([0.0, 1.0, 1.0, 3.0, 3.0, 6.0, 6.0, 8.0, 8.0, 12.0, 12.0, 13.0])  # perf_counter, start/end pairs
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(readings))

    def fn(name):
        return lambda: calls.append(name)

    result = timing.interleaved({"a": fn("a"), "b": fn("b")}, torch.device("cpu"), 3)
    assert calls == ["a", "b", "b", "a", "a", "b"]  # every round calls each once, starting one later each round
    # a took 1, 2, 4 s and b 2, 3, 1 s: medians 2 and 2, inter-quartile ranges 3 - 1.5 and 2.5 - 1.5
    assert result["a"] == timing.Timing(2.0, 1.5) and result["b"] == timing.Timing(2.0, 1.0)
    with pytest.raises(ValueError, match="rounds must be a positive integer, got 0"):
        timing.interleaved({"a": fn("a")}, torch.device("cpu"), 0)


def test_harness_interleaves_the_cases_of_a_shape(monkeypatch):
    monkeypatch.setenv("BSM_BACKEND", "torch")  # the harness under test, not the kernels (interpreted: ~60 s more)
    shape = Shape(8, 16, 24, 4, 2, True, "silu", "uniform")
    common = dict(dtype=torch.float32, device=torch.device("cpu"), capacity_factors=[1.0], block_size=8,
                  min_run_time=0.001)  # fmt: skip
    rows, _ = run([shape], strategies=["torch_grouped_mm", "dense"], interleave=3, **common)
    assert all(r["fwd_bwd_interleaved_ms"] > 0 and r["fwd_bwd_interleaved_spread_ms"] >= 0 for r in rows)
    rows, _ = run([shape], strategies=["dense"], **common)  # off by default
    assert "fwd_bwd_interleaved_ms" not in rows[0]
    pytest.importorskip("transformers")
    rows, _ = run([shape], strategies=["hf_experts"], interleave=2, **common)
    by_name = {r["strategy"]: r for r in rows}
    assert by_name["hf:grouped_mm"]["speedup_vs_hf_grouped_mm"] == 1.0
    ours = by_name["hf:blocksparse_moe"]
    assert ours["speedup_vs_hf_grouped_mm"] == pytest.approx(
        by_name["hf:grouped_mm"]["fwd_bwd_interleaved_ms"] / ours["fwd_bwd_interleaved_ms"]
    )
    table = report.markdown(rows, [1.0])
    assert "| fwd+bwd interleaved ms | x vs hf:grouped_mm |" in table and "| hf:blocksparse_moe |" in table


def test_derive_speedup_vs_hf_grouped_mm():
    # interleaved times where both rows have them, else the row's basis (fwd+bwd, or fwd without backward)
    def row(name, fwd_bwd_ms, fwd_ms, interleaved=None):
        return dict(strategy=name, useful_flops=1e9, fwd_bwd_ms=fwd_bwd_ms, fwd_ms=fwd_ms, capacity_factor=None,
                    fwd_bwd_interleaved_ms=interleaved)  # fmt: skip

    rows = [row("hf:grouped_mm", 3.0, 1.0, 6.0), row("ours", 2.0, 0.5, 4.0), row("late", 1.5, 0.5)]
    rows.append(row("fwd", None, 2.0))
    _derive(rows, [])
    hf, ours, late, fwd = rows
    assert hf["speedup_vs_hf_grouped_mm"] == 1.0 and ours["speedup_vs_hf_grouped_mm"] == pytest.approx(1.5)
    assert late["speedup_vs_hf_grouped_mm"] == pytest.approx(2.0)  # not interleaved: fwd+bwd vs fwd+bwd
    assert fwd["speedup_vs_hf_grouped_mm"] == pytest.approx(0.5)  # no backward: forward vs forward
    rows = [row("ours", 2.0, 0.5, 4.0)]
    _derive(rows, [])
    assert "speedup_vs_hf_grouped_mm" not in rows[0]  # no transformers row: no column


# ---- bytes saved for backward -----------------------------------------------------------------------------------


def test_saved_for_backward_counts_each_storage_once_and_parameters_apart():
    # a graph whose saved tensors are known: x [4, 3] fp32 (48 B), weight w [5, 3] (60 B, a parameter)
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(5, 3))
    index = torch.tensor([2, 0])  # int64, 16 B

    def graph():
        s = (x @ w.t()).sigmoid()  # mm saves x and the view w.t() (w's storage); sigmoid saves its output (80 B)
        p = x[:2] * x[2:]  # mul saves two views of x's storage: nothing new
        return s.index_select(0, index).sum() + p.sum()  # index_select saves the index; sum saves nothing

    out, saved = saved_for_backward(graph, parameters=[w])
    assert saved.activation_bytes == 48 + 80 + 16 and saved.storages == 3
    assert saved.parameter_bytes == 60
    assert saved.by_dtype == {"float32": 48 + 80, "int64": 16}
    assert saved.per_token(4) == (48 + 80 + 16) / 4 and saved.per_token(0) is None
    # without the parameter list, w counts as an activation
    assert saved_for_backward(graph)[1].activation_bytes == 48 + 80 + 16 + 60
    # the graph still differentiates as without the hooks
    grads = torch.autograd.grad(out, [x, w])
    expected = torch.autograd.grad(graph(), [x, w])
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    # nothing requires grad: nothing saved
    with torch.no_grad():
        assert saved_for_backward(graph, parameters=[w])[1] == type(saved)(0, 0, 0, {})


def test_saved_for_backward_puts_autocast_copies_of_parameters_apart():
    # under bf16 autocast mm saves bf16 copies: x's (4·3·2 = 24 B) is an activation, w's (5·3·2 = 30 B, through
    # ToCopy and a transpose) a parameter copy; the fp32 sigmoid output (4·5·4 = 80 B) an activation
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(5, 3))

    def graph():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = x @ w.t()
        return y.float().sigmoid().sum()

    _, saved = saved_for_backward(graph, parameters=[w])
    assert saved.by_dtype == {"bfloat16": 24, "float32": 80} and saved.parameter_bytes == 30
    # a tensor made from a parameter and an activation is an activation
    _, saved = saved_for_backward(lambda: ((w * x.sum()) ** 2).sum(), parameters=[w])
    assert saved.activation_bytes == 5 * 3 * 4 + 4 and saved.parameter_bytes == 60


# ---- CLI -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--top-k", "5", "--experts", "4"], "--top-k must be <= --experts"),
        (["--routing", "zipf:-1"], "routing must be"),
        (["--impls", "padded,nope"], "expected a comma-separated subset"),
        (["--tokens", "0"], "expected positive integers"),
        (["--capacity-factors", "1,x"], "expected comma-separated numbers"),
        (["--min-run-time", "0"], "--min-run-time must be a finite number of seconds > 0"),
        (["--min-run-time", "nan"], "--min-run-time must be a finite number of seconds > 0"),
        (["--time-budget", "-1"], "--time-budget must be a finite number of seconds > 0"),
        (["--time-budget", "nan"], "--time-budget must be a finite number of seconds > 0"),
        (["--reference-max-waste", "-1"], "--reference-max-waste must be >= 1"),
        (["--interleave", "-1"], "--interleave must be a number of rounds >= 0 (0: off), got -1"),
        (["--reference-max-waste", "nan"], "--reference-max-waste must be >= 1"),
        (["--capacity-factors", "1,inf"], "expected positive finite numbers"),  # would overflow the capacity
        # block sizes the kernels do not take (ran everything but blocksparse and exited 0): odd, too small, too big
        (["--block-size", "48"], "--block-size: invalid choice: 48 (choose from 16, 32, 64, 128)"),
        (["--block-size", "3"], "--block-size: invalid choice: 3"),
        (["--block-size", "256"], "--block-size: invalid choice: 256"),
        # FP8 recipes: an unknown name, none, and no dropless strategy to add rows to
        (["--fp8", "blockwise,fp4"], "--fp8: expected a comma-separated subset of blockwise,mxfp8,rowwise, got"),
        (["--fp8", ","], "--fp8: expected a comma-separated subset of blockwise,mxfp8,rowwise, got ','"),
        (["--fp8", "rowwise", "--impls", "padded,dense"], "--fp8 adds rows to blocksparse or grouped: --impls must"),
    ],
)
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_rejects_cpu_block_sizes_on_cuda(capsys, monkeypatch):
    # 16 and 32 run on CPU (the interpreter tests' sizes); the Triton backend refuses them on a GPU, where the bench
    # would have run every strategy but blocksparse
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--device", "cuda", "--block-size", "32"])
    assert e.value.code == 2 and "--block-size 32 is a CPU size: on cuda choose from 64, 128" in capsys.readouterr().err
    assert cli.parse_args(["--device", "cuda", "--block-size", "64"]).block_size == 64
    assert cli.parse_args(["--device", "cpu", "--block-size", "32"]).block_size == 32


def test_cli_presets_and_overrides():
    args = cli.parse_args(["--preset", "fine", "--tokens", "32,64", "--hidden", "48", "--device", "cpu"])
    shapes = cli.shapes_from_args(args)
    assert [(s.tokens, s.hidden, s.ffn, s.experts, s.top_k, s.glu) for s in shapes] == [
        (32, 48, 768, 128, 8, True),
        (64, 48, 768, 128, 8, True),
    ]
    assert args.dtype == "float32" and args.block_size == 64 and args.fp8 == []
    assert cli.parse_args(["--fp8", "mxfp8,blockwise,mxfp8"]).fp8 == ["mxfp8", "blockwise"]  # each recipe once
    assert {"quick", "mixtral", "fine", "switch"} <= set(cli.PRESETS)
    m = cli.PRESETS["mixtral"]
    assert (m.hidden, m.ffn, m.experts, m.top_k, m.glu) == (4096, 14336, 8, 2, True)


def test_cli_ep_delegates(monkeypatch, capsys):
    seen = []
    fake = type(sys)("bench.ep")
    fake.main = seen.append
    monkeypatch.setitem(sys.modules, "bench.ep", fake)
    assert cli.main(["--ep", "2", "--tokens", "8"]) == 0
    assert seen == [["--world", "2", "--tokens", "8"]]
    assert cli.main(["--ep"]) == 2 and "needs a WORLD_SIZE" in capsys.readouterr().err


@pytest.mark.parametrize("world", ["-1", "0", "two", "--tokens"])
def test_cli_ep_rejects_bad_world_size(world, monkeypatch, capsys):
    # the error names the world size (not the expert count), and bench.ep is never started
    fake = type(sys)("bench.ep")
    fake.main = lambda argv: pytest.fail(f"bench.ep started with {argv}")
    monkeypatch.setitem(sys.modules, "bench.ep", fake)
    assert cli.main(["--ep", world, "--tokens", "8"]) == 2
    assert f"--ep WORLD_SIZE must be a positive integer, got {world!r}" in capsys.readouterr().err


def test_ep_parse_args_names_the_bad_argument(capsys):
    from bench import ep

    for argv, message in [
        (["--world", "-1"], "--world must be a positive integer, got -1"),
        (["--world", "3", "--experts", "8"], "--experts must be divisible by --world, got 8 and 3"),
        (["--tokens", "0"], "--tokens must be a positive integer, got 0"),
        (["--impl", "nope"], "--impl: invalid choice: 'nope'"),  # was a traceback in every rank
        (["--impl", "padded"], "--impl: invalid choice: 'padded'"),  # capacity is per rank: expert_parallel's job
        (["--skew", "nan"], "--skew must be a finite number, got nan"),  # was accepted
        (["--skew=-inf"], "--skew must be a finite number, got -inf"),
    ]:
        with pytest.raises(SystemExit) as e:
            ep.parse_args(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_ep_bad_impl_exits_2_without_starting_ranks(monkeypatch, capsys):
    from bench import ep

    monkeypatch.setattr(ep.mp, "get_context", lambda *a: pytest.fail("ranks started with a bad --impl"))
    with pytest.raises(SystemExit) as e:
        cli.main(["--ep", "2", "--impl", "nope"])
    assert e.value.code == 2 and "--impl: invalid choice: 'nope'" in capsys.readouterr().err


def _unusable_out(kind: str, tmp_path: Path) -> str:
    if kind == "file":
        (tmp_path / "a-file").write_text("x")
        return str(tmp_path / "a-file")
    if kind == "under a file":
        (tmp_path / "a-file").write_text("x")
        return str(tmp_path / "a-file" / "sub")
    if not Path(kind).parent.is_dir():
        pytest.skip(f"{Path(kind).parent} does not exist here")
    return kind  # /sys: mkdir refused even as root; /proc: an existing folder where files cannot be created


@pytest.mark.parametrize(
    "kind, message",
    [
        ("file", "which is an existing file"),
        ("under a file", "creating it failed"),
        ("/sys/bsm-bench-out", "creating it failed"),
        ("/proc", "writing a file in it failed"),
    ],
)
def test_cli_rejects_unusable_out_before_running(kind, message, tmp_path, capsys, monkeypatch):
    out = _unusable_out(kind, tmp_path)
    monkeypatch.setattr(cli, "run", lambda *a, **k: pytest.fail("the benchmark ran with an unusable --out"))
    with pytest.raises(SystemExit) as e:
        cli.main(["--tokens", "8", "--experts", "2", "--top-k", "1", "--impls", "dense", "--out", out])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--out must be" in err and message in err and "Traceback" not in err


def test_cli_smoke(tmp_path):
    """A tiny custom config end to end in a fresh process without the interpreter (as users run it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "bench", "--tokens", "16", "--experts", "4", "--top-k", "2", "--hidden", "32",
           "--ffn", "32", "--min-run-time", "0.01", "--impls", "blocksparse,grouped,padded,torch_grouped_mm,dense",
           "--capacity-factors", "1.0,2.0", "--fp8", "rowwise", "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| strategy | fwd ms |" in proc.stdout and "| padded@1 |" in proc.stdout and "| dense |" in proc.stdout
    with open(tmp_path / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {"padded@1", "padded@2", "torch_grouped_mm", "dense"} <= {r["strategy"] for r in rows}
    fp8 = {r["strategy"]: r for r in rows if r["fp8"] and not r["strategy"].endswith(":prequant")}
    assert sorted(fp8) == ["blocksparse+fp8:rowwise", "grouped+fp8:rowwise"]
    assert all(15 < float(r["sqnr_db"]) < 40 and float(r["fwd_bwd_ms"]) > 0 for r in fp8.values())
    prequant = {r["strategy"]: r for r in rows if r["strategy"].endswith(":prequant")}  # forward only
    assert sorted(prequant) == ["blocksparse+fp8:rowwise:prequant", "grouped+fp8:rowwise:prequant"]
    assert all(15 < float(r["sqnr_db"]) < 40 and float(r["fwd_ms"]) > 0 for r in prequant.values())
    assert "| SQNR dB (out / grads) |" in proc.stdout and "FP8 rows" in proc.stdout
    columns = {"fwd_ms", "bwd_ms", "fwd_bwd_ms", "useful_flops", "executed_flops", "pct_dense"}
    assert columns | {"saved_bytes_per_token", "saved_param_bytes"} <= set(rows[0])
    assert all(float(r["saved_bytes_per_token"]) > 0 for r in rows if r["strategy"] not in prequant)
    assert all(float(r["saved_bytes_per_token"]) == 0 for r in prequant.values())
    assert "| saved B/token |" in proc.stdout and "saved_tensors_hooks" in proc.stdout
    data = json.loads((tmp_path / "results.json").read_text())
    meta = data["metadata"]
    for key in ("date_utc", "cpu", "torch", "triton", "git_commit", "command", "backend"):
        assert key in meta
    assert meta["backend"] == "torch"  # the CLI does not set TRITON_INTERPRET
    for png in ("time_vs_tokens.png", "pct_dense.png", "drops_vs_capacity_factor.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_profile_lists_each_case_kernels(tmp_path, capsys, monkeypatch):
    """``python -m bench.profile`` (CPU: top-level operators): one table per case, the fused MLP's op and the
    baseline's ``_grouped_mm`` named, shares summing to 100%; bad options are clear errors."""
    from bench import profile

    # CPU profiles list top-level operators (``bsm::expert_mlp`` whichever backend runs it): the PyTorch backend, as
    # the command runs without the interpreter (its 4 steps of the grouped MLP in the interpreter took 13 of 20 s)
    monkeypatch.setenv("BSM_BACKEND", "torch")
    out = tmp_path / "prof"
    argv = ["--preset", "quick", "--device", "cpu", "--tokens", "24", "--hidden", "16", "--ffn", "24", "--steps", "1",
            "--impls", "grouped,torch_grouped_mm", "--top", "50", "--out", str(out)]  # fmt: skip
    assert profile.main(argv) == 0
    text = (out / "profile.md").read_text()
    assert "### grouped:" in text and "### torch_grouped_mm:" in text and "`bsm::expert_mlp`" in text
    cases = json.loads((out / "profile.json").read_text())["cases"]
    assert set(cases) == {"grouped", "torch_grouped_mm"}
    assert any(r["kernel"] == "aten::_grouped_mm" for r in cases["torch_grouped_mm"])
    rows = cases["grouped"]
    shares = [float(line.split("|")[4].strip().rstrip("%")) for line in text.split("### torch")[0].splitlines()
              if line.startswith("| `")]  # fmt: skip
    assert len(shares) == len(rows) and abs(sum(shares) - 100) < 0.5
    for bad, message in ((["--impls", "nope"], "unknown strategies"), (["--fp8", "fp4"], "unknown recipes"),
                         (["--steps", "0"], "--steps must be >= 1")):  # fmt: skip
        with pytest.raises(SystemExit):
            profile.parse_args(bad)
        assert message in capsys.readouterr().err
