"""Multi-process training of the byte-level LM with ``bsm.parallelize_moe`` (expert parallelism × FSDP2), DCP
checkpoints that resume at another layout.

    torchrun --nproc-per-node 4 -m bench.train --ep 2 --dp-shard 2 --steps 20 --stop-after 10 --out OUT
    torchrun --nproc-per-node 4 -m bench.train --ep 4 --dp-shard 1 --steps 20 --resume --out OUT

gloo on CPU, NCCL on GPUs (one per process). The model, the initial weights (``--seed``), the optimizer (AdamW,
decay on matrices), the schedule, the gradient clipping and the data order are the single-process trainer's
(``loop.Trainer``): every rank draws the same global batch of ``--batch-size`` sequences and trains on its
``1 / W`` share, so each step sees the single-process batch and the gradients are those of its mean loss, the
load-balancing loss included (``parallelize_moe`` counts its expert fractions over every rank's tokens).

Checkpoints: ``OUT/dcp`` (``parallel.save_checkpoint``: weights and AdamW state, resharded on load) and
``OUT/dcp/trainer.pt`` (step, schedule, data order, losses). ``OUT/losses.csv`` holds one row per step: the
global mean cross-entropy and auxiliary loss, and the layout that ran it.
"""

from __future__ import annotations

import csv
import datetime
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from blocksparse_moe.parallel import load_checkpoint, parallelize_moe, save_checkpoint
from blocksparse_moe.parallel.parallelize import MESH_DIMS

from .data import VOCAB, Corpus, sample_batch
from .loop import TrainSettings, build_optimizer
from .model import FFNSpec, ModelSize, build_model

__all__ = ["DistributedTrainer", "run"]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class DistributedTrainer:
    """The single-process trainer's step on a ``(dp_shard, ep)`` mesh of the initialised default group."""

    def __init__(
        self, size: ModelSize, spec: FFNSpec, settings: TrainSettings, corpus: Corpus, dp_shard: int, ep: int
    ) -> None:
        world, self.rank = dist.get_world_size(), dist.get_rank()
        if dp_shard * ep != world:
            raise ValueError(f"--dp-shard × --ep must be the number of processes {world}, got {dp_shard} × {ep}")
        if settings.batch_size % world:
            raise ValueError(f"--batch-size must be divisible by the {world} processes, got {settings.batch_size}")
        if size.experts % ep:
            raise ValueError(f"--experts must be divisible by --ep, got {size.experts} and {ep}")
        if spec.kind != "dmoe":
            raise ValueError(f"the distributed example trains dmoe configs, got {spec.name!r}")
        self.size, self.spec, self.settings, self.corpus = size, spec, settings, corpus
        self.layout = (dp_shard, ep)
        self.world = world
        self.device = torch.device(settings.device)
        mesh = init_device_mesh(self.device.type, self.layout, mesh_dim_names=MESH_DIMS)
        torch.manual_seed(settings.seed)  # the single-process trainer's initial weights
        model = build_model(
            size,
            spec,
            load_balancing_weight=settings.load_balancing_weight,
            z_loss_weight=settings.z_loss_weight,
            block_size=settings.block_size,
        ).to(self.device)
        self.model = parallelize_moe(model, mesh)
        # the single-process trainer's; the expert-bias counts (DeepSeek router) summed over every rank
        self.optimizer, self.scheduler = build_optimizer(self.model, spec, settings, dist.group.WORLD)
        self.data_rng = torch.Generator().manual_seed(settings.seed + 1)
        self.step = 0
        self.history: list[dict[str, Any]] = []  # per step: step, ce, aux, layout

    def _clip_grad_norm(self) -> None:
        """``torch.nn.utils.clip_grad_norm_``'s rule over every gradient (DTensors on two meshes: their norms are
        reduced one by one)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norms = torch.stack([_full(g.norm()) for g in grads])
        total = torch.linalg.vector_norm(norms)
        coef = torch.clamp(self.settings.grad_clip / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(float(coef))

    def train_step(self) -> None:
        x, y = sample_batch(self.corpus.train, self.settings.batch_size, self.size.seq_len, self.data_rng)
        share = self.settings.batch_size // self.world
        mine = slice(self.rank * share, (self.rank + 1) * share)
        x, y = x[mine].to(self.device), y[mine].to(self.device)
        logits, aux = self.model(x)
        ce = F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))
        (ce + aux).backward()
        self._clip_grad_norm()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        losses = torch.stack([ce.detach(), aux.detach().float()])
        dist.all_reduce(losses)
        ce_mean, aux_mean = (losses / self.world).tolist()
        layout = "x".join(map(str, self.layout))
        self.history.append({"step": self.step, "ce": ce_mean, "aux": aux_mean, "layout": layout})

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        """DCP shards of the weights and AdamW state, and (rank 0) the trainer's own state."""
        save_checkpoint(folder, self.model, self.optimizer)
        if self.rank == 0:
            torch.save(
                {
                    "size": asdict(self.size),
                    "config": self.spec.name,
                    "settings": self.settings.trajectory(),
                    "step": self.step,
                    "scheduler": self.scheduler.state_dict(),
                    "data_rng": self.data_rng.get_state(),
                    "history": self.history,
                },
                folder / "trainer.pt",
            )
        dist.barrier()

    def load(self, folder: Path) -> None:
        """Resume from ``save``'s folder, whatever the layout that wrote it (same model, config and trajectory)."""
        state = torch.load(folder / "trainer.pt", weights_only=False)
        expected = {"size": asdict(self.size), "config": self.spec.name, "settings": self.settings.trajectory()}
        for key, value in expected.items():
            if state[key] != value:
                raise ValueError(f"checkpoint {key} must be {value!r} to resume this run, got {state[key]!r}")
        load_checkpoint(folder, self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.data_rng.set_state(state["data_rng"])
        self.step, self.history = state["step"], list(state["history"])


def run(args) -> int:
    """The ``--ep`` / ``--dp-shard`` path of ``python -m bench.train`` (under torchrun, or any launcher that sets
    the ``torch.distributed`` environment); returns the exit code."""
    from .data import load_corpus

    backend = "nccl" if args.settings.device == "cuda" else "gloo"
    if args.settings.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        (spec,) = args.specs
        trainer = DistributedTrainer(args.size, spec, args.settings, load_corpus(), args.dp_shard, args.ep)
        folder = args.out / "dcp"
        if args.resume:
            trainer.load(folder)
        target = min(args.stop_after or args.settings.steps, args.settings.steps)
        while trainer.step < target:
            trainer.train_step()
            if trainer.rank == 0 and not args.no_progress:
                last = trainer.history[-1]
                print(f"step {last['step']}: loss {last['ce']:.6f} aux {last['aux']:.6f}", file=sys.stderr)
        if args.save_checkpoints:
            folder.mkdir(parents=True, exist_ok=True)
            trainer.save(folder)
        if trainer.rank == 0:
            with open(args.out / "losses.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["step", "ce", "aux", "layout"])
                writer.writeheader()
                writer.writerows(trainer.history)
            print(f"bench.train: {trainer.step} steps at dp_shard × ep = {args.dp_shard} × {args.ep}; wrote {args.out}")
        return 0
    finally:
        dist.destroy_process_group()
