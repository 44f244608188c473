"""``python -m bench.train`` smoke tests: tiny sizes, a few steps, the library's PyTorch backends on CPU."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

import blocksparse_moe as bsm
from bench.train import cli
from bench.train.data import load_corpus, sample_batch, validation_batches
from bench.train.loop import RoutingStats, Trainer
from bench.train.model import FFNSpec, ModelSize, build_model


@pytest.fixture(autouse=True)
def _torch_backend_one_thread(monkeypatch):
    # the example runs as users run it on CPU (PyTorch backends, not the Triton interpreter); one thread keeps the
    # tiny runs fast on a shared 2-core machine
    monkeypatch.setenv("BSM_BACKEND", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    assert cli.main(["--preset", "tiny", "--out", str(out), "--no-progress", *extra]) == 0
    return out, {r["config"]: r for r in json.loads((out / "results.json").read_text())["results"]}


def test_train_smoke_outputs_learning_and_dropless_equals_undropped_padded(tmp_path):
    # the tiny preset: dmoe, padded@2 (capacity factor E/k = 2: every expert has a slot for every token) and dense
    out, results = _run(tmp_path, "run")
    for name in ("summary.md", "results.json", "history.csv", "layers.csv"):
        assert (out / name).stat().st_size > 0
    for png in ("loss_vs_step.png", "loss_vs_time.png", "expert_load.png", "dropped_vs_step.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    summary = (out / "summary.md").read_text()
    assert "| dmoe |" in summary and "| padded@2 |" in summary and "| dense |" in summary
    assert list(results) == ["dmoe", "padded@2", "dense"]
    for r in results.values():
        val = [e["val_loss"] for e in r["evals"]]
        assert [e["step"] for e in r["evals"]] == [0, 4, 8, 12]
        assert abs(val[0] - math.log(256)) < 0.3  # starts near uniform over bytes
        assert val[-1] < val[0] - 1.0  # and learns (byte frequencies at least)
        assert sum(r["train_loss"][-4:]) < sum(r["train_loss"][:4]) - 2.0
        assert r["tokens_per_s"] > 0 and r["saved_bytes_per_token"]["model"] > 0
        assert r["resume_check"]["identical"], r["resume_check"]
        for layer in r["layers"]:
            assert sum(layer["expert_share"]) == pytest.approx(1.0)
    dmoe, padded = results["dmoe"], results["padded@2"]
    assert all(x["dropped_fraction"] == 0.0 for x in padded["layers"])
    # nothing dropped: the same function, the same initial weights and batches, so the same curves
    torch.testing.assert_close(padded["train_loss"], dmoe["train_loss"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        [e["val_loss"] for e in padded["evals"]], [e["val_loss"] for e in dmoe["evals"]], atol=1e-5, rtol=1e-5
    )
    assert [x["expert_share"] for x in padded["layers"]] == [x["expert_share"] for x in dmoe["layers"]]
    # padded keeps its capacity buffers (2x the assignments here) for backward: more bytes per token than dropless
    assert padded["saved_bytes_per_token"]["ffn_layer"] > dmoe["saved_bytes_per_token"]["ffn_layer"]


def _history(out) -> list[dict[str, str]]:
    """history.csv without its wall-clock column."""
    with open(out / "history.csv") as fh:
        return [{k: v for k, v in row.items() if k != "time_s"} for row in csv.DictReader(fh)]


def test_resumed_run_matches_uninterrupted(tmp_path):
    # padded@1 drops: the routing statistics must survive the checkpoint too
    args = ["--configs", "padded@1", "--no-resume-check"]
    full_out, full = _run(tmp_path, "full", *args)
    out, part = _run(tmp_path, "split", *args, "--stop-after", "6")
    assert part["padded@1"]["steps"] == 6 and not part["padded@1"]["complete"]
    assert (out / "checkpoints" / "padded_1.pt").exists()
    _, resumed = _run(tmp_path, "split", *args, "--resume")
    a, b = full["padded@1"], resumed["padded@1"]
    assert b["resumed_from_step"] == 6 and b["complete"] and b["steps"] == 12
    assert b["train_loss"] == a["train_loss"]  # bit for bit
    # the same evaluations: none at the stop (step 6), so the history and the best step are the same
    assert [(e["step"], e["val_loss"]) for e in b["evals"]] == [(e["step"], e["val_loss"]) for e in a["evals"]]
    assert [e["step"] for e in a["evals"]] == [0, 4, 8, 12]
    assert (b["best_val_loss"], b["best_step"]) == (a["best_val_loss"], a["best_step"])
    assert [x["dropped_fraction"] for x in b["layers"]] == [x["dropped_fraction"] for x in a["layers"]]
    assert any(x["dropped_fraction"] > 0 for x in a["layers"])
    assert _history(out) == _history(full_out)
    # checkpoints every 5 steps (5 and 10 are not evaluation steps): the same history as without checkpoints
    every_out, every = _run(tmp_path, "every", *args, "--checkpoint-every", "5")
    assert [e["step"] for e in every["padded@1"]["evals"]] == [0, 4, 8, 12]
    assert _history(every_out) == _history(full_out)


def test_padded_drop_count_matches_moe_mlp():
    # capacity factor 0.5: drops for sure; the stats hook must count what moe_mlp's own MoEStats reports
    size = ModelSize(d_model=16, n_layers=2, n_heads=2, seq_len=8, ffn=8, experts=4, top_k=2)
    spec = FFNSpec.parse("padded@0.5")
    torch.manual_seed(0)
    model = build_model(size, spec)
    stats = RoutingStats(model, spec, torch.device("cpu"))
    seen = []
    for ffn in model.ffns():
        router = next(m for m in ffn.modules() if isinstance(m, bsm.TopKRouter))
        router.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    model(torch.randint(0, 256, (3, 7)))  # 21 tokens: odd
    expected = []
    for (x, (_, weights, index)), ffn in zip(seen, model.ffns()):
        ex = ffn.experts
        _, info = bsm.moe_mlp(x, index, weights, ex.w1, ex.w2, ex.w3, activation="silu", impl="padded",
                              capacity_factor=0.5, return_stats=True)  # fmt: skip
        expected.append(int(info.dropped))
    snap = stats.snapshot()
    assert snap["dropped"] == expected and min(expected) > 0
    assert snap["assignments"] == [21 * 2, 21 * 2]
    assert [sum(c) for c in snap["counts"]] == [42, 42]


def test_data_split_is_fixed_and_batches_shift_by_one():
    a, b = load_corpus(), load_corpus()
    assert torch.equal(a.val, b.val) and len(a.val) == pytest.approx(0.1 * (len(a.train) + len(a.val)), abs=1)
    x, y = sample_batch(a.train, 3, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (3, 16) and torch.equal(x[:, 1:], y[:, :-1])
    v1, v2 = validation_batches(a.val, 2, 16, 3), validation_batches(a.val, 2, 16, 3)
    assert len(v1) == 3 and all(torch.equal(p[0], q[0]) for p, q in zip(v1, v2))


@pytest.mark.parametrize(
    "text, name",
    [
        ("dmoe", "dmoe"),
        ("dmoe:blocksparse", "dmoe:blocksparse"),
        ("dmoe:grouped+deepseek", "dmoe:grouped+deepseek"),
        ("padded@1.0", "padded@1"),
        ("dense", "dense"),
    ],
)
def test_ffn_spec_names(text, name):
    assert FFNSpec.parse(text).name == name


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--configs", "padded@0"], "an FFN config must be"),
        (["--configs", "dmoe:loop"], "an FFN config must be"),
        (["--configs", "padded@1+deepseek"], "an FFN config must be"),
        (["--configs", "dmoe,dmoe:auto"], "distinct FFN configs"),
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--heads", "3"], "d_model must be divisible by n_heads"),
        (["--top-k", "5"], "top_k must be <= experts"),
        (["--lr", "nan"], "--lr must be a finite number > 0"),
        (["--configs", "dense", "--block-size", "32"], "--block-size applies to dmoe"),
        (["--block-size", "48"], "--block-size: invalid choice: 48 (choose from 16, 32, 64, 128)"),  # was a traceback
        (["--block-size", "256"], "--block-size: invalid choice: 256"),
    ],
)
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--preset", "tiny", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_rejects_unusable_out_and_missing_checkpoints(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for argv, message in [
        (["--out", str(tmp_path / "file")], "which is an existing file"),
        (["--out", str(tmp_path / "empty"), "--resume"], "--resume needs"),
    ]:
        with pytest.raises(SystemExit) as e:
            cli.main(["--preset", "tiny", "--no-progress", *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_router_deepseek_runs_next_to_softmax(tmp_path):
    # --router deepseek adds dmoe+deepseek beside dmoe (softmax + aux loss): it trains, its expert bias moves after
    # every optimizer step (auxiliary-loss-free balancing, no aux loss), the load plot holds both, resume is exact
    assert [s.name for s in cli.parse_args(["--preset", "tiny", "--router", "deepseek"]).specs] == [
        "dmoe",
        "dmoe+deepseek",
        "padded@2",
        "dense",
    ]
    with pytest.raises(SystemExit):
        cli.parse_args(["--preset", "tiny", "--router", "deepseek", "--configs", "dense"])
    out, results = _run(tmp_path, "run", "--configs", "dmoe", "--router", "deepseek")
    assert list(results) == ["dmoe", "dmoe+deepseek"]
    assert (out / "expert_load.png").read_bytes()[:4] == b"\x89PNG"
    deepseek = results["dmoe+deepseek"]
    assert deepseek["resume_check"]["identical"], deepseek["resume_check"]
    assert all(a == 0.0 for a in deepseek["aux_loss"])
    assert deepseek["evals"][-1]["val_loss"] < deepseek["evals"][0]["val_loss"] - 1.0
    preset = cli.PRESETS["tiny"]
    trainer = Trainer(preset.size, FFNSpec.parse("dmoe+deepseek"), preset.settings, load_corpus())
    routers = [ffn.router for ffn in trainer.model.ffns()]
    assert all((r.score, r.num_expert_groups, r.topk_groups) == ("sigmoid", 2, 1) for r in routers)
    assert all(ffn.shared_expert is not None for ffn in trainer.model.ffns())
    trainer.train_step()
    for r in routers:  # one step: the bias moved by ±rate (mean 0) and the counts were reset by the hook
        assert r.expert_bias.abs().max() > 0 and abs(float(r.expert_bias.sum())) < 1e-6
        assert int(r.tokens_per_expert.sum()) == 0
