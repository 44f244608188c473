"""``torchrun --nproc-per-node 2 -m bench.train --ep 2``: the command's own path (``cli.main`` in 2 processes with
torchrun's environment), a DCP checkpoint at ep=2 resumed at dp_shard=2 (the experts sharded by FSDP2 instead of
placed by expert parallelism), every step's loss against the single-process trainer's (same seed, same global
batch), load-balancing loss included: parallelize_moe counts its expert fractions over every rank's tokens, as one
process does over the global batch. Both sides run the PyTorch backend (``BSM_BACKEND=torch``): they differ only in
the parallelism (the single process on the Triton interpreter took 48 of this test's 77 s; the kernels meet the
PyTorch backend in their own tests). The 2 × 2 mesh and its checkpoints reloaded at other layouts:
tests/test_fsdp_ep.py (2 processes here, not 4: the command's path is the same, at half the CI time)."""

from __future__ import annotations

import csv
import os
from dataclasses import replace

import torch.multiprocessing as mp
from multiprocess import free_port

from bench.train import cli
from bench.train.data import load_corpus
from bench.train.loop import Trainer
from bench.train.model import FFNSpec

WORLD = 2
COMMON = ["--preset", "tiny", "--steps", "4", "--no-progress", "--no-resume-check"]


def _torchrun_worker(rank: int, port: int, argv: list[str]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    os.environ["BSM_BACKEND"] = "torch"
    assert cli.main(argv) == 0


def _torchrun(argv: list[str]) -> None:
    mp.spawn(_torchrun_worker, args=(free_port(), argv), nprocs=WORLD, join=True)


def test_parallel_training_matches_one_process_and_resumes_at_another_layout(tmp_path, monkeypatch):
    out = str(tmp_path)
    _torchrun([*COMMON, "--ep", "2", "--stop-after", "2", "--out", out])
    assert (tmp_path / "dcp" / "trainer.pt").is_file()
    _torchrun([*COMMON, "--dp-shard", "2", "--resume", "--out", out])
    with open(tmp_path / "losses.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["layout"]) for r in rows] == [("1", "1x2"), ("2", "1x2"), ("3", "2x1"), ("4", "2x1")]

    preset = cli.PRESETS["tiny"]
    settings = replace(preset.settings, steps=4, warmup_steps=1)
    assert settings.load_balancing_weight > 0  # the balance loss is on
    assert cli.parse_args(COMMON).settings == settings  # the same trajectory as the parallel runs
    monkeypatch.setenv("BSM_BACKEND", "torch")  # the workers' backend (_torchrun_worker)
    single = Trainer(preset.size, FFNSpec.parse("dmoe"), settings, load_corpus())
    for _ in range(4):
        single.train_step()
    single._flush()
    diffs = [abs(float(r["ce"]) - want) for r, want in zip(rows, single.train_losses)]
    assert max(diffs) < 1e-5, diffs
