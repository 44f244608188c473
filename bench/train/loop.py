"""Training, evaluation, routing statistics and checkpoints of one FFN configuration.

Standard parts: ``torch.optim.AdamW`` (decay on matrices only), linear warm-up then cosine decay
(``torch.optim.lr_scheduler``: ``LinearLR`` → ``CosineAnnealingLR`` in a ``SequentialLR``), gradient clipping,
bf16 autocast on GPU, and the MoE layers' own auxiliary loss (load balancing + router z-loss), added to the
cross-entropy. Reported losses are the cross-entropy alone (nats per byte). The ``+deepseek`` configs update their
routers' expert bias from an optimizer step hook (``bsm.update_expert_bias``, rate ``EXPERT_BIAS_RATE``).

Routing statistics come from forward hooks on each layer's ``bsm.TopKRouter`` (its documented output
``(logits, weights, top_k_index)``): the expert load histogram, and for ``PaddedMoE`` the assignments over
capacity, counted with ``moe_mlp``'s rule (``ceil(cf·T·k/E)`` slots per expert; an expert with ``n`` assignments
drops ``max(0, n − C)``). Counts stay on the device; they are read at evaluation points only.

Wall time is training time only (evaluation excluded), read at evaluation points (after a CUDA synchronize).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

import blocksparse_moe as bsm

from .. import flops
from ..memory import saved_for_backward
from .data import VOCAB, Corpus, sample_batch, validation_batches
from .model import ByteLM, FFNSpec, ModelSize, build_model

__all__ = ["TrainSettings", "Trainer", "RoutingStats", "StepProgress", "check_resume", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 1
# 10x DeepSeek-V3's 1e-3 (set for ~10^5 steps): in these few-hundred-step runs 1e-3 moves a bias by at most 0.15 in
# 150 steps, and the cpu preset's max/mean expert load stayed 2.2-3.8 per layer (1.2-1.5 at 1e-2; measured 2026-12-06)
EXPERT_BIAS_RATE = 1e-2


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    eval_every: int
    eval_batches: int
    seed: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    load_balancing_weight: float = 0.01  # Switch Transformer's α
    z_loss_weight: float = 1e-3  # ST-MoE's router z-loss coefficient
    block_size: int | None = None  # blocksparse block size (None: the library's default)
    device: str = "cpu"
    autocast: str | None = None  # "bfloat16": autocast dtype; None: no autocast
    compile: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}")
        for name in ("lr", "grad_clip"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")

    def trajectory(self) -> dict[str, Any]:
        """The settings a checkpoint must share with the run that resumes it (same losses step for step)."""
        keep = set(vars(self)) - {"eval_every", "compile", "device"}
        return {k: v for k, v in asdict(self).items() if k in keep}


class RoutingStats:
    """Per MoE layer: assignments per expert and, for padded layers, assignments over capacity."""

    def __init__(self, model: ByteLM, spec: FFNSpec, device: torch.device) -> None:
        self.spec, self.enabled = spec, True
        self.num_experts, self.top_k = model.size.experts, model.size.top_k
        self.routers = [m for ffn in model.ffns() for m in ffn.modules() if isinstance(m, bsm.TopKRouter)]
        n = len(self.routers)
        self.counts = torch.zeros(n, self.num_experts, dtype=torch.int64, device=device)
        self.dropped = torch.zeros(n, dtype=torch.int64, device=device)
        self._handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def _hook(self, layer: int):
        def hook(module, args, output) -> None:
            if not self.enabled:
                return
            top_k_index = output[2]
            T = top_k_index.shape[0]
            flat = top_k_index.reshape(-1)
            counts = torch.zeros(self.num_experts, dtype=torch.int64, device=flat.device)
            counts.scatter_add_(0, flat, torch.ones_like(flat))
            self.counts[layer] += counts  # tensors only: no Python state for torch.compile to guard on
            if self.spec.kind == "padded":
                cap = flops.capacity(T, self.top_k, self.num_experts, self.spec.capacity_factor)
                self.dropped[layer] += (counts - cap).clamp_min(0).sum()

        return hook

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing is counted inside (evaluation, measurements)."""
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled

    def snapshot(self) -> dict[str, Any]:
        """Host copies (one sync): counts ``[layers][E]``, dropped ``[layers]``, assignments ``[layers]``."""
        counts = self.counts.tolist()
        return {"counts": counts, "dropped": self.dropped.tolist(), "assignments": [sum(c) for c in counts]}

    def state_dict(self) -> dict[str, Any]:
        return self.snapshot()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts.copy_(torch.tensor(state["counts"]))
        self.dropped.copy_(torch.tensor(state["dropped"]))


class StepProgress:
    """A one-line text progress bar on stderr (redrawn in place on a terminal, else a line per update)."""

    def __init__(self, label: str, total: int, enabled: bool = True, stream=None) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start, self._last = time.monotonic(), 0.0

    def update(self, step: int, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < (0.2 if self.tty else 30.0)):
            return
        self._last = now
        done = step / self.total if self.total else 1.0
        bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
        eta = (now - self.start) * (1 - done) / done if done > 0 else float("nan")
        eta_text = f"eta {eta:.0f}s" if math.isfinite(eta) else "eta ?"
        line = f"{self.label:>13} [{bar}] {step}/{self.total} {text} {eta_text}"
        print(
            ("\r" + line.ljust(110)) if self.tty else line, end="" if self.tty else "\n", file=self.stream, flush=True
        )

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=self.stream, flush=True)


def build_optimizer(
    model: torch.nn.Module, spec: FFNSpec, settings: TrainSettings, bias_group=None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (weight decay on matrices only; with the DeepSeek router, the expert-bias update after every step, its
    token counts summed over ``bias_group``) and its schedule (linear warmup, then cosine decay): the single-process
    and the distributed trainer's."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": settings.weight_decay}, {"params": others, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95))
    if spec.router == "deepseek":  # auxiliary-loss-free balancing after every step
        optimizer.register_step_post_hook(lambda *_: bsm.update_expert_bias(model, EXPERT_BIAS_RATE, bias_group))
    sched = torch.optim.lr_scheduler
    decay = sched.CosineAnnealingLR(
        optimizer, T_max=settings.steps - settings.warmup_steps, eta_min=settings.lr * settings.min_lr_ratio
    )
    if not settings.warmup_steps:
        return optimizer, decay
    warmup = sched.LinearLR(optimizer, start_factor=1 / (settings.warmup_steps + 1), total_iters=settings.warmup_steps)
    return optimizer, sched.SequentialLR(optimizer, [warmup, decay], milestones=[settings.warmup_steps])


class Trainer:
    """One configuration's model, optimizer, schedule, data order and history; ``state_dict`` round-trips all."""

    def __init__(self, size: ModelSize, spec: FFNSpec, settings: TrainSettings, corpus: Corpus) -> None:
        self.size, self.spec, self.settings, self.corpus = size, spec, settings, corpus
        self.device = torch.device(settings.device)
        torch.manual_seed(settings.seed)  # the same initial weights for dmoe and padded (see build_model)
        self.model = build_model(
            size,
            spec,
            load_balancing_weight=settings.load_balancing_weight,
            z_loss_weight=settings.z_loss_weight,
            block_size=settings.block_size,
        ).to(self.device)
        self.stats = RoutingStats(self.model, spec, self.device) if spec.is_moe else None
        self.forward = torch.compile(self.model) if settings.compile else self.model
        self.optimizer, self.scheduler = build_optimizer(self.model, spec, settings)
        self.data_rng = torch.Generator().manual_seed(settings.seed + 1)
        self.val = validation_batches(corpus.val, settings.batch_size, size.seq_len, settings.eval_batches)
        self.step = 0
        self.train_time = 0.0  # seconds of training (evaluation excluded)
        self.train_losses: list[float] = []  # per step: cross-entropy
        self.aux_losses: list[float] = []  # per step: the MoE layers' auxiliary loss
        self.evals: list[dict[str, Any]] = []  # per evaluation: step, time_s, val_loss, lr, routing interval stats
        self._pending: list[torch.Tensor] = []

    # ---- one step ----------------------------------------------------------------------------------------------

    def _autocast(self):
        if self.settings.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.settings.autocast))

    def _losses(self, model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast():
            logits, aux = model(x)
        return F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1)), aux

    def train_step(self) -> None:
        x, y = sample_batch(self.corpus.train, self.settings.batch_size, self.size.seq_len, self.data_rng)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        ce, aux = self._losses(self.forward, x, y)
        (ce + aux).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self._pending.append(torch.stack([ce.detach(), aux.detach().float()]))

    def _flush(self) -> None:
        """Move the pending per-step losses to the host (one sync)."""
        if self._pending:
            values = torch.stack(self._pending).tolist()
            self.train_losses.extend(v[0] for v in values)
            self.aux_losses.extend(v[1] for v in values)
            self._pending.clear()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy over the fixed validation batches (eval mode; routing not counted)."""
        self.model.eval()
        with self.stats.paused() if self.stats else contextlib.nullcontext():
            losses = [self._losses(self.forward, x.to(self.device), y.to(self.device))[0] for x, y in self.val]
        self.model.train()
        return float(torch.stack(losses).mean())

    def _record_eval(self) -> None:
        entry: dict[str, Any] = {
            "step": self.step,
            "time_s": self.train_time,
            "tokens": self.step * self.settings.batch_size * self.size.seq_len,
            "val_loss": self.evaluate(),
            "lr": self.scheduler.get_last_lr()[0],
        }
        if self.stats is not None:
            now = self.stats.snapshot()
            before = self.evals[-1]["routing_total"] if self.evals else None
            entry["routing_total"] = now
            if before is not None:  # this interval's drops per layer
                entry["dropped_fraction"] = [
                    (d - d0) / (a - a0) if a > a0 else 0.0
                    for d, d0, a, a0 in zip(
                        now["dropped"], before["dropped"], now["assignments"], before["assignments"]
                    )
                ]
        self.evals.append(entry)

    def run(self, until: int, progress: StepProgress | None = None) -> None:
        """Train up to step ``until`` (≤ steps), evaluating at step 0, every ``eval_every`` steps and at the last
        step of the run. Where ``until`` stops a run early (a checkpoint, ``--stop-after``) nothing is evaluated, so
        a stopped and resumed run records the same evaluations as an uninterrupted one."""
        until = min(until, self.settings.steps)
        if not self.evals:
            self._record_eval()
        start = time.perf_counter()
        while self.step < until:
            self.train_step()
            evaluate = self.step % self.settings.eval_every == 0 or self.step == self.settings.steps
            if evaluate or self.step == until:
                self._sync()
                self.train_time += time.perf_counter() - start
                self._flush()
                if evaluate:
                    self._record_eval()
                    if progress is not None:
                        e = self.evals[-1]
                        tok_s = e["tokens"] / self.train_time if self.train_time else 0.0
                        text = f"loss {self.train_losses[-1]:.3f} val {e['val_loss']:.3f} {tok_s:,.0f} tok/s"
                        progress.update(self.step, text, force=self.step == until)
                start = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- measurements --------------------------------------------------------------------------------------

    def saved_bytes_per_token(self) -> dict[str, Any]:
        """Bytes autograd saves for backward per token: whole model (one training-shaped batch, loss included) and
        one FFN block on its own (input ``[B, S, d]`` fp32, as the norm before it gives). Parameters (and their
        autocast copies) apart. Eager model, training mode, the run's autocast; routing not counted."""
        B, S, d = self.settings.batch_size, self.size.seq_len, self.size.d_model
        g = torch.Generator().manual_seed(self.settings.seed + 2)  # the data order and global RNG stay untouched
        x, y = sample_batch(self.corpus.train, B, S, g)
        x, y = x.to(self.device), y.to(self.device)
        h = torch.randn(B, S, d, generator=g).to(self.device).requires_grad_()
        params = list(self.model.parameters())
        ffn = self.model.ffns()[0]
        with self.stats.paused() if self.stats else contextlib.nullcontext():
            _, model_saved = saved_for_backward(lambda: sum(self._losses(self.model, x, y)), params)
            with self._autocast():
                _, ffn_saved = saved_for_backward(lambda: ffn(h), params)
        return {
            "model": model_saved.per_token(B * S),
            "ffn_layer": ffn_saved.per_token(B * S),
            "ffn_layer_by_dtype": {k: v / (B * S) for k, v in ffn_saved.by_dtype.items()},
            "model_parameter_bytes": model_saved.parameter_bytes,
        }

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        self._flush()
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.spec.name,
            "size": asdict(self.size),
            "settings": self.settings.trajectory(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data_rng": self.data_rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "step": self.step,
            "train_time": self.train_time,
            "train_losses": list(self.train_losses),
            "aux_losses": list(self.aux_losses),
            "evals": list(self.evals),
            "routing": self.stats.state_dict() if self.stats else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``; it must come from the same configuration, model size and trajectory settings."""
        expected = {
            "format": CHECKPOINT_FORMAT,
            "config": self.spec.name,
            "size": asdict(self.size),
            "settings": self.settings.trajectory(),
        }
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(f"checkpoint {key} must be {value!r} to resume this run, got {state.get(key)!r}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.data_rng.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step, self.train_time = state["step"], state["train_time"]
        self.train_losses, self.aux_losses = list(state["train_losses"]), list(state["aux_losses"])
        self.evals = list(state["evals"])
        if self.stats is not None:
            self.stats.load_state_dict(state["routing"])

    def save(self, path) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path) -> None:
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=False))


def check_resume(trainer: Trainer, steps: int = 2) -> dict[str, Any]:
    """Checkpoint round trip: save ``trainer``, load the bytes into a fresh ``Trainer``, take ``steps`` more steps
    with both; the losses must be identical (the second step also checks the optimizer moments and the schedule).
    Advances ``trainer`` by ``steps`` steps beyond its recorded history (its history is returned untouched)."""
    import io

    buffer = io.BytesIO()
    trainer.save(buffer)
    recorded = len(trainer.train_losses)
    for _ in range(steps):
        trainer.train_step()
    trainer._flush()
    expected = trainer.train_losses[recorded:]
    del trainer.train_losses[recorded:], trainer.aux_losses[recorded:]
    fresh = Trainer(trainer.size, trainer.spec, trainer.settings, trainer.corpus)
    buffer.seek(0)
    fresh.load(buffer)
    for _ in range(steps):
        fresh.train_step()
    fresh._flush()
    actual = fresh.train_losses[recorded:]
    diff = max(abs(a - b) for a, b in zip(actual, expected))
    return {"steps": steps, "losses": expected, "resumed_losses": actual, "max_abs_diff": diff, "identical": diff == 0}
