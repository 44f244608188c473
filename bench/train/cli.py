"""``python -m bench.train``: train the byte-level LM once per FFN configuration and compare them.

Presets: ``cpu`` (the default on a machine without CUDA; under 10 minutes on 2 cores), ``gpu`` (one H200 in a few
minutes, bf16 autocast, dropless ``blocksparse`` and ``grouped``), ``tiny`` (seconds; the CI smoke test). Every
size, the step count and the configurations can be overridden. Outputs go to ``--out`` (default
``bench/out/train-<timestamp>``): summary.md, results.json, history.csv, layers.csv and three PNGs.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from blocksparse_moe.fp8 import RECIPES as FP8_RECIPES

from ..cli import prepare_out_dir
from ..library import BLOCK_SIZES
from .data import Corpus, load_corpus
from .loop import StepProgress, Trainer, TrainSettings, check_resume
from .model import ROUTERS, FFNSpec, ModelSize

__all__ = ["PRESETS", "Preset", "main", "parse_args", "run_config"]


@dataclass(frozen=True)
class Preset:
    size: ModelSize
    settings: TrainSettings
    configs: tuple[str, ...]
    description: str


PRESETS = {
    "cpu": Preset(
        ModelSize(d_model=128, n_layers=4, n_heads=4, seq_len=128, ffn=128, experts=8, top_k=2),
        TrainSettings(steps=300, batch_size=16, lr=3e-3, warmup_steps=15, eval_every=20, eval_batches=8),
        ("dmoe", "padded@1", "padded@1.25", "dense"),
        "2-core CPU, fp32, PyTorch backends of the library; ~2 min per configuration",
    ),
    "gpu": Preset(
        ModelSize(d_model=512, n_layers=6, n_heads=8, seq_len=512, ffn=512, experts=8, top_k=2),
        TrainSettings(
            steps=400,
            batch_size=16,
            lr=1.5e-3,
            warmup_steps=20,
            eval_every=25,
            eval_batches=16,
            device="cuda",
            autocast="bfloat16",
        ),  # fmt: skip
        ("dmoe:blocksparse", "dmoe:grouped", "padded@1", "padded@1.25", "dense"),
        "one H200, bf16 autocast, Triton kernels; 3.3M tokens (~8 passes over the 420 KB training split)",
    ),
    "tiny": Preset(
        ModelSize(d_model=32, n_layers=2, n_heads=2, seq_len=32, ffn=32, experts=4, top_k=2),
        TrainSettings(steps=12, batch_size=4, lr=1e-2, warmup_steps=2, eval_every=4, eval_batches=2),
        ("dmoe", "padded@2", "dense"),
        "seconds: the smoke test (padded@2 = E/k cannot drop)",
    ),
}


def _configs(text: str) -> list[str]:
    names = [v for v in text.split(",") if v]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of FFN configs, got {text!r}")
    try:
        specs = [FFNSpec.parse(n) for n in names]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    canonical = [s.name for s in specs]
    if len(set(canonical)) != len(canonical):
        raise argparse.ArgumentTypeError(f"expected distinct FFN configs, got {text!r}")
    return canonical


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu with CUDA, else cpu")
    p.add_argument("--configs", type=_configs, default=None,
                   help="FFN configs (comma list): dmoe, dmoe:blocksparse, dmoe:grouped (each optionally "
                        "+deepseek), padded@CF, dense")  # fmt: skip
    p.add_argument("--router", choices=ROUTERS, default="softmax",
                   help="deepseek: also run each dmoe config with DeepSeek-V3's routing (sigmoid, groups, expert bias "
                        "updated every step, shared expert; config NAME+deepseek), next to its softmax + aux-loss "
                        "run")  # fmt: skip
    p.add_argument("--fp8", choices=FP8_RECIPES, default=None,
                   help="also run each MoE config with its expert GEMMs in FP8 by this recipe (config "
                        "NAME+fp8=RECIPE; emulated in this release), next to its run without")  # fmt: skip
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: the preset's")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="float32, or bfloat16 autocast (default: bfloat16 on cuda, float32 on cpu)")  # fmt: skip
    for name, help_text in [
        ("steps", "training steps"),
        ("batch-size", "sequences per step"),
        ("seq-len", "bytes per sequence"),
        ("d-model", "model width d"),
        ("layers", "transformer blocks"),
        ("heads", "attention heads"),
        ("experts", "experts E per MoE layer"),
        ("top-k", "experts per token k"),
        ("ffn", "expert width f (the dense FFN is k·f wide)"),
        ("eval-every", "steps between validation passes"),
        ("eval-batches", "fixed validation batches per pass"),
        ("warmup", "linear warm-up steps"),
    ]:
        p.add_argument(f"--{name}", type=int, default=None, help=help_text)
    p.add_argument("--block-size", type=int, choices=BLOCK_SIZES, default=None,
                   help="blocksparse block size (default: the library's)")  # fmt: skip
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (AdamW, cosine to 10%%)")
    p.add_argument("--load-balancing-weight", type=float, default=None,
                   help="the MoE layers' load-balancing loss coefficient (default 0.01)")  # fmt: skip
    p.add_argument("--seed", type=int, default=None, help="initial weights and data order (the same for every config)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="torch.compile the whole model")
    p.add_argument("--out", type=Path, default=None, help="output folder (default bench/out/train-<timestamp>)")
    p.add_argument("--save-checkpoints", action="store_true", help="write OUT/checkpoints/<config>.pt")
    p.add_argument("--checkpoint-every", type=int, default=None, help="also save every N steps (implies saving)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop each config at this step (saves a checkpoint; continue with --resume)")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue each config from OUT/checkpoints/<config>.pt")
    p.add_argument("--no-resume-check", action="store_true",
                   help="skip the checkpoint round trip (save, reload, 2 more steps: identical losses)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.add_argument("--ep", type=int, default=None,
                   help="expert-parallel size: train dmoe on torchrun's processes (see distributed.py)")  # fmt: skip
    p.add_argument("--dp-shard", type=int, default=None, help="FSDP2 size of the (dp_shard, ep) mesh (with --ep)")
    return p


_SIZE_FLAGS = {"d_model": "d_model", "layers": "n_layers", "heads": "n_heads", "seq_len": "seq_len", "ffn": "ffn",
               "experts": "experts", "top_k": "top_k"}  # fmt: skip
_SETTING_FLAGS = {"steps": "steps", "batch_size": "batch_size", "eval_every": "eval_every",
                  "eval_batches": "eval_batches", "warmup": "warmup_steps", "block_size": "block_size", "lr": "lr",
                  "seed": "seed", "load_balancing_weight": "load_balancing_weight"}  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Arguments resolved against the preset: ``args.size``, ``args.settings``, ``args.specs``, ``args.out``."""
    p = _build_parser()
    args = p.parse_args(argv)
    if args.preset is None:
        args.preset = "gpu" if torch.cuda.is_available() else "cpu"
    preset = PRESETS[args.preset]
    device = args.device or preset.settings.device
    if device == "cuda" and not torch.cuda.is_available():
        p.error(f"--device cuda (preset {args.preset}) requested, but torch sees no CUDA device; try --preset cpu")
    for flag in [*_SIZE_FLAGS, *_SETTING_FLAGS, "checkpoint_every", "stop_after", "threads", "ep", "dp_shard"]:
        value = getattr(args, flag)
        if flag not in ("lr", "seed", "load_balancing_weight") and value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        p.error(f"--lr must be a finite number > 0, got {args.lr}")
    lb = args.load_balancing_weight
    if lb is not None and not (lb >= 0 and math.isfinite(lb)):
        p.error(f"--load-balancing-weight must be a finite number >= 0, got {lb}")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    overrides = {field: getattr(args, flag) for flag, field in _SIZE_FLAGS.items() if getattr(args, flag) is not None}
    settings = {field: getattr(args, flag) for flag, field in _SETTING_FLAGS.items() if getattr(args, flag) is not None}
    try:
        args.size = replace(preset.size, **overrides)
        steps = settings.get("steps", preset.settings.steps)
        if "warmup_steps" not in settings:  # keep the preset's warm-up share when only the step count changes
            settings["warmup_steps"] = min(
                steps - 1, round(preset.settings.warmup_steps * steps / preset.settings.steps)
            )
        args.settings = replace(
            preset.settings,
            **settings,
            device=device,
            autocast=None if dtype == "float32" else dtype,
            compile=args.compile,
        )
    except ValueError as e:
        p.error(str(e))
    args.specs = [FFNSpec.parse(n) for n in (args.configs or preset.configs)]
    if args.router != "softmax":
        if not any(s.kind == "dmoe" for s in args.specs):
            p.error(f"--router {args.router} applies to dmoe configs, and none is selected")
        twins = {
            s.name: replace(s, router=args.router) for s in args.specs if s.kind == "dmoe" and s.router == "softmax"
        }
        args.specs = [t for s in args.specs for t in ([s, twins[s.name]] if s.name in twins else [s])]
        args.specs = list({s.name: s for s in args.specs}.values())  # a twin also listed in --configs: once
    if args.fp8 is not None:
        if not any(s.is_moe for s in args.specs):
            p.error(f"--fp8 {args.fp8} applies to MoE configs, and none is selected")
        twins = {s.name: replace(s, fp8=args.fp8) for s in args.specs if s.is_moe and s.fp8 is None}
        args.specs = [t for s in args.specs for t in ([s, twins[s.name]] if s.name in twins else [s])]
        args.specs = list({s.name: s for s in args.specs}.values())  # a twin also listed in --configs: once
    if args.block_size is not None and not any(s.kind == "dmoe" and s.impl != "grouped" for s in args.specs):
        p.error("--block-size applies to dmoe or dmoe:blocksparse configs, and none is selected")
    if args.checkpoint_every is not None or args.stop_after is not None:
        args.save_checkpoints = True
    args.distributed = args.ep is not None or args.dp_shard is not None
    if args.distributed:
        args.ep, args.dp_shard = args.ep or 1, args.dp_shard or 1
        if args.configs is None:
            args.specs = [FFNSpec.parse("dmoe")]
        if len(args.specs) != 1 or args.specs[0].kind != "dmoe":
            p.error(f"--ep / --dp-shard train one dmoe config, got --configs {','.join(s.name for s in args.specs)}")
        if args.out is None:
            p.error("--ep / --dp-shard need --out (every process writes to the same folder)")
        if args.checkpoint_every is not None or args.compile:
            p.error("--checkpoint-every and --compile are single-process options")
    if args.out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = Path(__file__).resolve().parent.parent / "out" / f"train-{stamp}"
    return args


def _file_name(config: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", config)


def _active_parameters(trainer: Trainer) -> tuple[int, int]:
    """(all parameters, parameters one token uses: everything but the unchosen experts; router included)."""
    size, spec = trainer.size, trainer.spec
    total = sum(p.numel() for p in trainer.model.parameters())
    if not spec.is_moe:
        return total, total
    unused = size.n_layers * (size.experts - size.top_k) * 3 * size.d_model * size.ffn
    return total, total - unused


def run_config(
    size: ModelSize,
    spec: FFNSpec,
    settings: TrainSettings,
    corpus: Corpus,
    *,
    checkpoint: Path | None = None,
    checkpoint_every: int | None = None,
    stop_after: int | None = None,
    resume: bool = False,
    resume_check: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one configuration (resuming from ``checkpoint`` when asked and present) and summarise it."""
    trainer = Trainer(size, spec, settings, corpus)
    resumed_from = None
    if resume and checkpoint is not None and checkpoint.exists():
        trainer.load(checkpoint)
        resumed_from = trainer.step
    elif resume:
        print(f"bench.train: no checkpoint {checkpoint} for {spec.name}: training it from step 0", file=sys.stderr)
    saved = trainer.saved_bytes_per_token()
    target = min(stop_after or settings.steps, settings.steps)
    bar = StepProgress(spec.name, settings.steps, enabled=progress)
    while trainer.step < target or not trainer.evals:
        chunk = (
            target
            if checkpoint_every is None
            else min(target, (trainer.step // checkpoint_every + 1) * checkpoint_every)
        )
        trainer.run(chunk, bar)
        if checkpoint is not None:
            trainer.save(checkpoint)
    bar.close()
    result = _summary(trainer, saved)
    result["resumed_from_step"] = resumed_from
    result["complete"] = trainer.step >= settings.steps
    if resume_check:
        result["resume_check"] = check_resume(trainer)
    return result


def _summary(trainer: Trainer, saved: dict[str, Any]) -> dict[str, Any]:
    trainer._flush()
    evals = trainer.evals
    tokens_per_step = trainer.settings.batch_size * trainer.size.seq_len
    last, best = evals[-1], min(evals, key=lambda e: e["val_loss"])
    steady = None
    if len(evals) >= 3 and last["time_s"] > evals[1]["time_s"]:  # after the first interval (warm-up, compile)
        steady = (last["tokens"] - evals[1]["tokens"]) / (last["time_s"] - evals[1]["time_s"])
    total, active = _active_parameters(trainer)
    layers = []
    if trainer.stats is not None:
        routing = trainer.stats.snapshot()
        for i, (counts, dropped, assigned) in enumerate(
            zip(routing["counts"], routing["dropped"], routing["assignments"])
        ):
            share = [c / assigned if assigned else 0.0 for c in counts]
            layers.append(
                {
                    "layer": i,
                    "dropped_fraction": dropped / assigned if assigned else 0.0,
                    "dropped_fraction_last_interval": last["dropped_fraction"][i]
                    if "dropped_fraction" in last
                    else None,
                    "expert_share": share,
                    "max_over_mean_load": max(share) * len(share) if assigned else None,
                }
            )
    evals_out = [{k: v for k, v in e.items() if k != "routing_total"} for e in evals]
    recent = trainer.train_losses[-trainer.settings.eval_every :]
    return {
        "config": trainer.spec.name,
        "kind": trainer.spec.kind,
        "impl": trainer.spec.impl,
        "capacity_factor": trainer.spec.capacity_factor,
        "params_total": total,
        "params_active": active,
        "steps": trainer.step,
        "tokens": trainer.step * tokens_per_step,
        "train_time_s": trainer.train_time,
        "tokens_per_s": trainer.step * tokens_per_step / trainer.train_time if trainer.train_time else None,
        "tokens_per_s_steady": steady,
        "final_val_loss": last["val_loss"],
        "best_val_loss": best["val_loss"],
        "best_step": best["step"],
        "final_train_loss": sum(recent) / len(recent) if recent else None,
        "saved_bytes_per_token": saved,
        "layers": layers,
        "evals": evals_out,
        "train_loss": trainer.train_losses,
        "aux_loss": trainer.aux_losses,
    }


def main(argv: list[str] | None = None) -> int:
    """Train every configuration, write the outputs; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    problem = prepare_out_dir(args.out)
    if problem is not None:
        _build_parser().error(problem)
    if args.distributed:
        from . import distributed

        return distributed.run(args)
    if args.resume and not (args.out / "checkpoints").is_dir():
        _build_parser().error(f"--resume needs {args.out / 'checkpoints'} (written by --save-checkpoints)")
    from . import outputs

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    corpus = load_corpus()
    ckpt_dir = args.out / "checkpoints"
    if args.save_checkpoints:
        ckpt_dir.mkdir(exist_ok=True)
    s = args.size
    print(
        f"bench.train: preset {args.preset}, {len(args.specs)} config(s) x {args.settings.steps} steps of "
        f"{args.settings.batch_size}x{s.seq_len} bytes on {args.settings.device} "
        f"({args.settings.autocast or 'float32'}); d={s.d_model} L={s.n_layers} E={s.experts} k={s.top_k} f={s.ffn}; "
        f"writing to {args.out}",
        file=sys.stderr,
    )
    load_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    start = time.perf_counter()
    results = []
    for spec in args.specs:
        results.append(
            run_config(
                args.size,
                spec,
                args.settings,
                corpus,
                checkpoint=ckpt_dir / f"{_file_name(spec.name)}.pt" if args.save_checkpoints or args.resume else None,
                checkpoint_every=args.checkpoint_every,
                stop_after=args.stop_after,
                resume=args.resume,
                resume_check=not args.no_resume_check,
                progress=not args.no_progress,
            )
        )
    elapsed = time.perf_counter() - start
    files = outputs.write_all(
        args, corpus, results, argv, {"elapsed_s": round(elapsed, 1), "load_avg_1m_start": load_start}
    )
    print(outputs.results_table(results))
    print(
        f"bench.train: {len(results)} configs in {elapsed:.0f} s; wrote {', '.join(files)} to {args.out}",
        file=sys.stderr,
    )
    return 0
