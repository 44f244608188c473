"""bench.model, the whole-layer roofline: it runs for every shape × strategy (ours and the ``torch._grouped_mm``
baseline) on CPU in seconds, its launch list is the launchers' (GEMM launches forward and backward), its FLOP totals
equal the analytic count, its cost functions count tiles as the kernels (and the library's kernel) do, and the
comparison with a measured run reads the bench's results.

The model records the GPU launch list, so it runs with the interpreter off: in a subprocess (the tests' process
has ``TRITON_INTERPRET=1``, under which ``record`` refuses to run)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.model import BASELINE, IMPLS, OURS, estimate
from bench.model.compare import gpu_of
from bench.model.record import ROUTING_STEPS, Launch, TensorInfo, record
from bench.model.roofline import GPUS, SHAPES, balanced_rows, launch_cost

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def estimates(tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "all.json"
    start = time.perf_counter()
    proc = _run("bench.model", "--shape", "all", "--impl", "all", "--gpu", "h200", "--json", str(out))
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text()), proc.stdout, seconds


def _analytic_flops(T: int, d: int, f: int, k: int) -> int:
    """Forward: x@w1, x@w3, a@w2 over T·k rows; backward: each GEMM's input and weight gradients (2x forward)."""
    forward = 3 * (2 * T * k * d * f)
    return forward + 2 * forward


def test_every_shape_and_strategy_runs_in_seconds(estimates):
    results, stdout, seconds = estimates
    assert IMPLS == ("blocksparse", "grouped", "torch_grouped_mm")
    assert {(r["shape"], r["impl"]) for r in results} == {(s, i) for s in SHAPES for i in IMPLS}
    assert seconds < 120  # nine recordings + one import on two shared cores (about 10 s when quiet)
    closing = [line for line in stdout.splitlines() if line.endswith("(estimate)")]
    assert len(closing) == 9
    pattern = r"^(mixtral|fine|decode) (blocksparse|grouped|torch_grouped_mm) h200: [\d.]+ ms, \d+ TFLOP/s, [\d.]+%"
    pattern += r" of dense"
    pattern += r" \(estimate\)$"
    assert all(re.match(pattern, line) for line in closing), closing


def test_launch_list_is_the_launchers(estimates):
    results, _, _ = estimates
    for r in results:
        if r["impl"] == BASELINE:
            # torchtitan's layer: w1, w3, w2 forward; each one's input and weight gradient backward
            phases = [la["phase"] for la in r["launches"] if la["kernel"] == "aten::_grouped_mm"]
            assert phases == ["forward"] * 3 + ["backward"] * 6 and len(r["launches"]) == 9
            assert r["speedup_vs_baseline"] is None
            continue
        # the routing first, at the front door: the extension's steps (its PyTorch implementation's ops, which
        # build the plan on meta tensors, listed apart and not costed)
        steps = [f"routing::{step}" for step in ROUTING_STEPS]
        assert [la["kernel"] for la in r["launches"][:6]] == steps and r["routing_torch_ops"]
        assert all(la["phase"] == "forward" and la["op"] is None for la in r["launches"][:6])
        kernels = [(la["phase"], la["kernel"]) for la in r["launches"][6:]]
        forward = [k for p, k in kernels if p == "forward"]
        backward = [k for p, k in kernels if p == "backward"]
        # forward: the gated up-projection and the down-projection, then the weighted scatter
        assert sorted(forward) == ["gemm_kernel", "gemm_kernel", "scatter_kernel"], r["impl"]
        # backward: dgrad of w2 with the epilogue, the dx pair, dW2, dW1 + dW3 (dual), the dx scatter
        assert sorted(backward) == ["gemm_kernel", "gemm_kernel", "scatter_kernel", "wgrad_kernel", "wgrad_kernel"]
        assert all(la["op"] is not None for la in r["launches"][6:])  # every kernel runs inside the custom ops
        assert "aten::floor_divide" in r["eager_ops"], "the tile schedule's eager ops are counted"
        assert r["forward_seconds"] < r["seconds"]


def test_flop_totals_equal_the_analytic_count(estimates):
    results, _, _ = estimates
    for r in results:
        s = SHAPES[r["shape"]]
        analytic = _analytic_flops(s.tokens, s.hidden, s.ffn, s.top_k)
        assert r["useful_flops"] == analytic == r["analytic_flops"]
        assert r["executed_flops"] >= r["useful_flops"]
        assert r["dense_pct"] == pytest.approx(100 * analytic / r["seconds"] / 1e12 / GPUS["h200"].dense_tflops)
    by = {(r["shape"], r["impl"]): r for r in results}
    # Mixtral, balanced: 4096 rows per expert, a multiple of every tile: nothing wasted
    assert by["mixtral", "blocksparse"]["executed_flops"] == by["mixtral", "blocksparse"]["useful_flops"]
    # decode: 4 rows per expert padded to a 128-row block (32x the work); grouped: 16-row tiles for the GEMMs (4x;
    # 16x with the 64-row tiles before), the weight gradients' 64-row reduction steps (16x): 8x in all
    assert by["decode", "blocksparse"]["executed_flops"] == 32 * by["decode", "blocksparse"]["useful_flops"]
    assert by["decode", "grouped"]["executed_flops"] == 8 * by["decode", "grouped"]["useful_flops"]
    # what impl="auto"'s rule rests on: at decode the grouped layout is the faster (the block padding dominates)
    assert by["decode", "grouped"]["seconds"] < by["decode", "blocksparse"]["seconds"]


def test_speedup_over_the_baseline(estimates):
    # each of our strategies' summary gives its speedup over the torch._grouped_mm baseline of the same layer
    results, stdout, _ = estimates
    by = {(r["shape"], r["impl"]): r for r in results}
    for shape in SHAPES:
        for impl in OURS:
            r = by[shape, impl]
            assert r["speedup_vs_baseline"] == pytest.approx(by[shape, BASELINE]["seconds"] / r["seconds"])
    assert stdout.count("vs the torch._grouped_mm baseline") == len(SHAPES) * len(OURS)


def test_auto_rule_agrees_with_the_model(estimates):
    # impl="auto" (options.resolve_impl) picks what the model says: grouped at decode (the block padding dominates),
    # blocksparse at the reference shapes, where the two tie within 2% (the MegaBlocks layout stays the default)
    results, stdout, _ = estimates
    by = {(r["shape"], r["impl"]): r for r in results}
    for shape in SHAPES:
        sparse, grouped = by[shape, "blocksparse"]["seconds"], by[shape, "grouped"]["seconds"]
        auto = by[shape, "blocksparse"]["auto_impl"]
        if shape == "decode":
            assert auto == "grouped" and grouped < 0.95 * sparse
        else:
            assert auto == "blocksparse" and abs(sparse - grouped) < 0.02 * grouped
    assert "impl='auto' on CUDA picks grouped here" in stdout


def _gemm(R: int, N: int, K: int, m_tiles: int, n_tiles: int, block_m: int = 64, **flags) -> Launch:
    args = dict(
        BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=32, R=R, N=N, N_STORE=N, K=K, num_m_tiles=m_tiles, GLU=False,
        EPILOGUE=0, PAIR=False, GATHER=False, num_warps=4, num_stages=3,
        a_ptr=TensorInfo((R, K), (K, 1), torch.bfloat16),
    )  # fmt: skip
    args.update(flags)
    return Launch("gemm_kernel", (m_tiles * n_tiles,), args, "forward", "bsm::expert_mlp")


def test_gemm_cost_counts_tiles_like_the_kernel():
    # two experts with 100 and 28 rows in 64-row tiles: 2 + 1 tiles with work; R = 256 rows, grid bound 6 M tiles:
    # rows 128..191 and 192..255 are written with zeros by 2 tiles, the sixth tile has no rows at all
    launch = _gemm(R=256, N=128, K=96, m_tiles=6, n_tiles=2)
    c = launch_cost(launch, GPUS["h200"], [100, 28], [100, 28])
    assert (c.work_ctas, c.zero_ctas, c.idle_ctas) == (3 * 2, 2 * 2, 1 * 2)
    assert c.executed_flops == 3 * 2 * (2 * 64 * 64 * 96)  # K = 96: three 32-steps, no K padding
    assert c.useful_flops == 128 * 2 * 128 * 96
    # the GLU forward: two accumulators over the same A tiles (twice the FLOPs, one A read)
    glu = launch_cost(_gemm(R=256, N=128, K=96, m_tiles=6, n_tiles=2, GLU=True, EPILOGUE=1), GPUS["h200"],
                      [100, 28], [100, 28])  # fmt: skip
    assert glu.executed_flops == 2 * c.executed_flops
    # L2 operand bytes per K step: A and W tiles of 64x32 (4 KB each, bf16); the GLU's two weight tiles share one A
    # tile; the dgrad pair runs two K loops of an A and a W tile each (regression: its second weight tile, w3ᵀ, was
    # not counted, so a 128x128 pair tile came out at 85 FLOP per L2 byte where it reads 64)
    step = 64 * 32 * 2
    assert c.l2_bytes == 3 * 2 * 3 * 2 * step
    assert glu.l2_bytes == 3 * 2 * 3 * 3 * step
    pair = launch_cost(_gemm(R=256, N=128, K=96, m_tiles=6, n_tiles=2, PAIR=True), GPUS["h200"], [100, 28], [100, 28])
    assert pair.executed_flops == 2 * c.executed_flops and pair.l2_bytes == 2 * c.l2_bytes
    # an expert with no rows takes no tile; a grid too small for the routing is an error (not silently costed)
    assert launch_cost(launch, GPUS["h200"], [0, 128], [0, 128]).work_ctas == 2 * 2
    with pytest.raises(ValueError, match="M tiles"):
        launch_cost(_gemm(R=256, N=128, K=96, m_tiles=2, n_tiles=2), GPUS["h200"], [100, 28], [100, 28])
    with pytest.raises(ValueError, match="no cost function"):
        launch_cost(Launch("mystery_kernel", (1,), {}, "forward", None), GPUS["h200"], [1], [1])


# sm_90 builds of the backward epilogue the launchers pick for aligned bf16 (python -m bench.audit --only
# 'gemm[down_bwd' --arch 90, 2026-12-06): (BLOCK_M, BLOCK_N, warps, EPI_N, ptxas registers, CTAs per SM)
AUDIT_BACKWARD = [
    (128, 128, 8, 8, 128, 2),  # the full-width tile in 16 slices of 8 columns (128 registers: two CTAs per SM)
    (64, 128, 4, 8, 128, 3),  # 64-row tiles: three by shared memory
    (64, 64, 4, 8, 79, 4),  # B = 64 blocks: four
]


def test_register_estimate_follows_the_epilogue_slices():
    # regression: the estimate counted five live values per accumulator element, whatever the slice width, so the
    # full-width backward tile came out at 255 registers and one CTA per SM where ptxas gives 128 and two
    h200 = GPUS["h200"]
    for block_m, block_n, warps, epi_n, _registers, ctas in AUDIT_BACKWARD:
        launch = _gemm(R=1024, N=512, K=256, m_tiles=1024 // block_m, n_tiles=512 // block_n, block_m=block_m,
                       BLOCK_N=block_n, BLOCK_K=64, EPI_N=epi_n, EPILOGUE=2, GLU=True, GATHER=True,
                       num_warps=warps)  # fmt: skip
        assert launch_cost(launch, h200, [1024], [1024]).ctas_per_sm == ctas, (block_m, block_n)
    # one slice as wide as the tile keeps h, g, act and act' of every column live: one CTA (ptxas spills it)
    whole = _gemm(R=1024, N=512, K=256, m_tiles=8, n_tiles=4, block_m=128, BLOCK_N=128, BLOCK_K=64, EPI_N=128,
                  EPILOGUE=2, GLU=True, GATHER=True, num_warps=8)  # fmt: skip
    assert launch_cost(whole, h200, [1024], [1024]).ctas_per_sm == 1


def _wgrad(gather: bool, stages: int) -> Launch:
    E, M, N = 2, 256, 256
    args = dict(
        BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, M=M, N=N, DUAL=False, A_GATHER=gather, B_GATHER=False, num_warps=4,
        num_stages=stages, a_ptr=TensorInfo((512, M), (M, 1), torch.bfloat16),
        out_ptr=TensorInfo((E, M, N), (M * N, N, 1), torch.bfloat16),
    )  # fmt: skip
    return Launch("wgrad_kernel", (E * 4,), args, "backward", "bsm::expert_mlp_backward")


def test_wgrad_shared_memory_counts_the_buffers_triton_allocates():
    # regression: the estimate took all 5 stages of the gathered weight gradient as data buffers (160 KB: one CTA per
    # SM) where the compiled sm_90 build allocates 3 (bench.audit: 99,840 B, two CTAs per SM); the index load of the
    # gathered operand takes the other stages
    h200 = GPUS["h200"]
    assert launch_cost(_wgrad(gather=True, stages=5), h200, [256, 256], [256, 256]).ctas_per_sm == 2
    assert launch_cost(_wgrad(gather=False, stages=3), h200, [256, 256], [256, 256]).ctas_per_sm == 2
    assert launch_cost(_wgrad(gather=False, stages=5), h200, [256, 256], [256, 256]).ctas_per_sm == 1


def _grouped_mm(a_shape: tuple[int, ...], b_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Launch:
    def info(shape):
        return TensorInfo(shape, (1,) * len(shape), torch.bfloat16)

    args = {"mat_a": info(a_shape), "mat_b": info(b_shape), "out": info(out_shape)}
    return Launch("aten::_grouped_mm", (), args, "forward", None)


def test_grouped_mm_cost_counts_the_library_tiles():
    h200, b200 = GPUS["h200"], GPUS["b200"]
    # rows x a weight per group, 2 groups of 300 and 0 rows (an average of 150 > 128, N = 512 > 128): 128x256x64
    # tiles, ceil(300 / 128) = 3 M tiles x 2 N tiles, K = 96 in two 64-steps; the empty group takes no tile
    c = launch_cost(_grouped_mm((300, 96), (2, 96, 512), (300, 512)), h200, [300, 0], [300, 0])
    assert (c.tile, c.work_ctas, c.ctas_per_sm) == ("128x256x64", 3 * 2, 1)
    assert c.executed_flops == 6 * 2 * (2 * 128 * 256 * 64) and c.useful_flops == 2 * 300 * 512 * 96
    # the B tile is multicast to the 2 CTAs of a cluster: half its L2 reads
    assert c.l2_bytes == 6 * 2 * (128 * 64 + 64 * 256 // 2) * 2
    assert c.hbm_bytes == (300 * 96 + 96 * 512 + 300 * 512) * 2  # the used group's weight only
    # small groups (an average of 4 rows, decode) take 64x128x128 tiles; so does sm_100 whatever the shape
    small = launch_cost(_grouped_mm((512, 256), (128, 256, 256), (512, 256)), h200, [4] * 128, [4] * 128)
    assert (small.tile, small.work_ctas) == ("64x128x128", 128 * 2)
    assert launch_cost(_grouped_mm((300, 96), (2, 96, 512), (300, 512)), b200, [300, 0], [300, 0]).tile == "64x128x128"
    # the weight gradient [K, R] @ [R, N] -> [E, K, N]: K x N tiles per group with rows, reducing over its rows
    w = launch_cost(_grouped_mm((256, 300), (300, 512), (2, 256, 512)), h200, [200, 100], [200, 100])
    assert w.work_ctas == 2 * (2 * 2) and w.executed_flops == 4 * 2 * 128 * 256 * 64 * (4 + 2)
    assert w.useful_flops == 2 * 256 * 512 * 300
    with pytest.raises(ValueError, match="groups of 290 rows"):
        launch_cost(_grouped_mm((300, 96), (2, 96, 512), (300, 512)), h200, [290, 0], [290, 0])


def test_routing_steps_cost_their_bytes_and_a_launch():
    # each step of the routing extension: its share of the plan's bytes at 0.85 x HBM, plus the 3 us launch
    step = Launch("routing::Keys", (), {"bytes": 3_655_000}, "forward", None)
    c = launch_cost(step, GPUS["h200"], [1], [1])
    assert c.executed_flops == 0 and c.seconds == pytest.approx(3_655_000 / (4.3e12 * 0.85) + 3e-6)


def test_balanced_rows_and_gpu_names():
    assert balanced_rows(10, 4) == [3, 3, 2, 2]  # odd split: the first A % E experts get one more
    assert sum(balanced_rows(32768 * 8, 128)) == 32768 * 8
    assert gpu_of("NVIDIA-H200") == "h200" and gpu_of("NVIDIA B200") == "b200" and gpu_of("Tesla-V100") is None


def test_record_refuses_the_interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1"  # conftest: the launchers would pick interpreter configs
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        record(lambda x: x, {"x": torch.empty(2, 2, device="meta")})


def test_compare_puts_the_estimate_beside_measured_rows(tmp_path):
    row = {"tokens": 256, "hidden": 128, "ffn": 64, "experts": 4, "top_k": 2, "glu": True, "dtype": "bfloat16"}
    rows = [
        {**row, "strategy": "blocksparse", "fwd_bwd_ms": 0.5},
        {**row, "strategy": "grouped", "fwd_bwd_ms": None},  # a strategy that did not run: n/a, still estimated
        {**row, "strategy": "padded", "fwd_bwd_ms": 0.4},  # not a dropless strategy: no estimate
        {**row, "strategy": "torch_grouped_mm", "fwd_bwd_ms": 0.8},  # the baseline: estimated, and the speedups
        {**row, "strategy": "torch_grouped_mm", "dtype": "float32", "fwd_bwd_ms": 9.0},  # bf16 only: not estimated
    ]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps({"rows": rows}))
    proc = _run("bench.model.compare", "--gpu", "NVIDIA-H200", str(tmp_path / "run"), "--out", str(tmp_path / "m.md"))
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "m.md").read_text()
    estimates, vs = text.split("\n\n")
    lines = [line for line in estimates.splitlines() if line.startswith("| 256 ")]
    assert [line.split(" | ")[2] for line in lines] == ["blocksparse", "grouped", "torch_grouped_mm"]
    measured, model, ratio = lines[0].split(" | ")[3:6]
    assert float(measured) == 0.5 and float(ratio.rstrip(" |")) == pytest.approx(0.5 / float(model), rel=0.02)
    assert lines[1].split(" | ")[3] == "n/a"
    base_model = float(lines[2].split(" | ")[4])
    speedups = [line.split(" | ") for line in vs.splitlines() if line.startswith("| 256 ")]
    assert [(s[2], s[3]) for s in speedups] == [("blocksparse", "1.60x"), ("grouped", "n/a")]
    assert float(speedups[0][4].rstrip("x |")) == pytest.approx(base_model / float(model), rel=0.02)


def test_baseline_is_bf16_only():
    # torch._grouped_mm's CUDA kernel (and its meta function) takes bf16 only: an fp32 estimate is a clear error
    with pytest.raises(ValueError, match="bfloat16 only"):
        estimate("decode", BASELINE, "h200", dtype=torch.float32)


def test_cli_rejects_unknown_names():
    proc = _run("bench.model", "--shape", "mixtral,huge")
    assert proc.returncode == 2 and "--shape must be among" in proc.stderr
