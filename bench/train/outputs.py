"""Files of a ``python -m bench.train`` run: summary.md, results.json, history.csv, layers.csv and PNG plots."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import torch

from .. import report
from .data import Corpus

__all__ = ["write_all", "results_table", "loss_at_time"]


def loss_at_time(evals: list[dict[str, Any]], t: float) -> float | None:
    """Validation loss at training time ``t`` (linear between evaluations; None beyond the run)."""
    points = [(e["time_s"], e["val_loss"]) for e in evals]
    for (t0, l0), (t1, l1) in zip(points, points[1:]):
        if t0 <= t <= t1:
            return l0 if t1 == t0 else l0 + (l1 - l0) * (t - t0) / (t1 - t0)
    return None


def _f(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def results_table(results: list[dict[str, Any]]) -> str:
    """One row per configuration: losses, speed, memory, drops, load, checkpoint check."""
    t_equal = min(r["train_time_s"] for r in results)
    header = [
        "config",
        "params (active)",
        "final val loss",
        "best val loss (step)",
        f"val loss at {t_equal:.3g} s",
        "train s",
        "tokens/s",
        "saved B/token: model",
        "saved B/token: one FFN",
        "dropped per layer: all steps",
        "dropped: last interval",
        "max/mean expert load per layer",
        "resume check",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        saved = r["saved_bytes_per_token"]
        layers = r["layers"]
        dropped = (
            " / ".join(f"{x['dropped_fraction']:.1%}" for x in layers) if r["kind"] == "padded" else "0 (dropless)"
        )
        last = " / ".join(_f(x["dropped_fraction_last_interval"], ".1%") for x in layers) or "n/a"
        if r["kind"] != "padded":
            last = dropped = "n/a" if r["kind"] == "dense" else "0 (dropless)"
        load = " / ".join(_f(x["max_over_mean_load"], ".2f") for x in layers) or "n/a"
        check = r.get("resume_check")
        check_text = (
            "n/a" if check is None else ("identical" if check["identical"] else f"Δ {check['max_abs_diff']:.1e}")
        )
        cells = [
            r["config"],
            f"{r['params_total'] / 1e6:.2f}M ({r['params_active'] / 1e6:.2f}M)",
            f"{r['final_val_loss']:.4f}",
            f"{r['best_val_loss']:.4f} ({r['best_step']})",
            _f(loss_at_time(r["evals"], t_equal), ".4f"),
            f"{r['train_time_s']:.1f}",
            _f(r["tokens_per_s_steady"] or r["tokens_per_s"], ",.0f"),
            _f(saved["model"], ",.0f"),
            _f(saved["ffn_layer"], ",.0f"),
            dropped,
            last,
            load,
            check_text,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _val_table(results: list[dict[str, Any]]) -> str:
    steps = sorted({e["step"] for r in results for e in r["evals"]})
    by = {r["config"]: {e["step"]: e["val_loss"] for e in r["evals"]} for r in results}
    lines = ["| step | " + " | ".join(by) + " |", "|---|" + "---|" * len(by)]
    for s in steps:
        lines.append(f"| {s} | " + " | ".join(_f(by[c].get(s), ".4f") for c in by) + " |")
    return "\n".join(lines) + "\n"


def _markdown(args: argparse.Namespace, corpus: Corpus, results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    s, st = args.size, args.settings
    tokens = st.steps * st.batch_size * s.seq_len
    where = meta["gpu"] or meta["cpu"]
    text = [
        f"## Training: byte-level LM, preset {args.preset}, on {where} ({st.device}, {st.autocast or 'float32'})\n",
        f"{meta['date_utc']}, torch {meta['torch']}, triton {meta['triton']}, commit {meta['git_commit']}, "
        f"library backend {meta['backend']}, {meta['torch_threads']} torch threads, {meta['elapsed_s']} s in all; "
        f"1-minute load average {meta.get('load_avg_1m_start')} at the start, {meta['load_avg_1m']} at the end.",
        f"Command: `{meta['command']}`\n",
        f"Model: {s.n_layers} blocks, d={s.d_model}, {s.n_heads} heads, {s.seq_len}-byte context, vocabulary 256 "
        f"bytes; MoE FFNs: E={s.experts} SwiGLU experts of width f={s.ffn}, top-{s.top_k}, load-balancing "
        f"{st.load_balancing_weight:g} and router z-loss {st.z_loss_weight:g}; dense FFN: SwiGLU of width "
        f"k·f={s.top_k * s.ffn} (the same active FFN parameters). Data: {corpus.source}, {len(corpus.train)} bytes "
        f"train / {len(corpus.val)} validation (fixed split). {st.steps} steps of {st.batch_size}x{s.seq_len} bytes "
        f"= {tokens:,} tokens ({tokens / len(corpus.train):.2f} passes over the training split); AdamW lr "
        f"{st.lr:g}, {st.warmup_steps} warm-up steps, cosine to {st.min_lr_ratio:g}x; seed {st.seed} (same weights "
        f"and batches for every config; dmoe and padded start identical).\n",
        results_table(results),
        "- Losses: cross-entropy in nats per byte on "
        f"{st.eval_batches}x{st.batch_size} fixed validation windows (eval mode: padded layers drop there too).",
        "- val loss at N s: each config's validation loss (interpolated between evaluations) after the training "
        "time of the config that finished first: the comparison per second of wall time.",
        "- tokens/s: after the first evaluation interval (warm-up excluded), training time only.",
        "- saved B/token: bytes autograd keeps for backward per token (`torch.autograd.graph.saved_tensors_hooks`, "
        "each storage once, parameters and their autocast copies excluded; `bench/memory.py`); 'one FFN' is one "
        "block's FFN on a `[B, S, d]` fp32 input (its input included).",
        "- dropped: assignments over capacity per layer, over all training steps and over the last evaluation "
        "interval (`dropped_vs_step.png` shows the whole course); load: the busiest expert's share of assignments "
        "over all steps, over the mean share (1.00 = balanced).",
        "- resume check: checkpoint saved at the end, reloaded into a fresh model, 2 more steps on both: losses "
        "compared bit for bit.\n",
        "### Validation loss per evaluation\n",
        _val_table(results),
        "Plots: `loss_vs_step.png`, `loss_vs_time.png`, `expert_load.png`, `dropped_vs_step.png` (padded only).\n",
    ]
    return "\n".join(text)


def _write_csvs(out: Path, results: list[dict[str, Any]]) -> None:
    with open(out / "history.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["config", "step", "train_loss", "aux_loss", "val_loss", "time_s", "lr"])
        for r in results:
            evals = {e["step"]: e for e in r["evals"]}
            for step in range(0, len(r["train_loss"]) + 1):
                e = evals.get(step)
                train = r["train_loss"][step - 1] if step else ""
                aux = r["aux_loss"][step - 1] if step else ""
                if e is None and not step:
                    continue
                w.writerow([r["config"], step, train, aux, e["val_loss"] if e else "", e["time_s"] if e else "",
                            e["lr"] if e else ""])  # fmt: skip
    with open(out / "layers.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        experts = max((len(x["expert_share"]) for r in results for x in r["layers"]), default=0)
        w.writerow(
            ["config", "layer", "dropped_fraction", "max_over_mean_load", *[f"share_{e}" for e in range(experts)]]
        )
        for r in results:
            for x in r["layers"]:
                w.writerow(
                    [r["config"], x["layer"], x["dropped_fraction"], x["max_over_mean_load"], *x["expert_share"]]
                )


def _plots(out: Path, results: list[dict[str, Any]], title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for x_key, x_label, file in [
        ("step", "step", "loss_vs_step.png"),
        ("time_s", "training time (s)", "loss_vs_time.png"),
    ]:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for i, r in enumerate(results):
            color = f"C{i}"
            ax.plot([e[x_key] for e in r["evals"]], [e["val_loss"] for e in r["evals"]], marker="o", ms=3,
                    color=color, label=f"{r['config']} (val)")  # fmt: skip
            if x_key == "step" and r["train_loss"]:
                ax.plot(range(1, len(r["train_loss"]) + 1), r["train_loss"], color=color, alpha=0.25, lw=0.8)
        finals = [e["val_loss"] for r in results for e in r["evals"][1:]]
        if finals:  # zoom on the learning curve, not the first steps' ln(256)
            lo, hi = min(finals), max(finals)
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-3), lo + 1.15 * (hi - lo + 1e-3))
        ax.set(
            xlabel=x_label,
            ylabel="loss (nats/byte)",
            title="validation loss" + (" (faint: train)" if x_key == "step" else ""),
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.suptitle(title, fontsize=8)
        fig.tight_layout()
        fig.savefig(out / file, dpi=110)
        plt.close(fig)
        names.append(file)

    padded = [r for r in results if r["kind"] == "padded"]
    if padded:
        fig, ax = plt.subplots(figsize=(7.5, 4.0))
        for i, r in enumerate(results):
            if r["kind"] != "padded":
                continue
            pts = [(e["step"], 100 * sum(e["dropped_fraction"]) / len(e["dropped_fraction"])) for e in r["evals"]
                   if e.get("dropped_fraction")]  # fmt: skip
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=f"C{i}", label=r["config"])
        ax.set(xlabel="step", ylabel="dropped assignments (%), mean over layers",
               title="tokens dropped per evaluation interval (training batches)")  # fmt: skip
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.suptitle(title, fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "dropped_vs_step.png", dpi=110)
        plt.close(fig)
        names.append("dropped_vs_step.png")

    moe = [r for r in results if r["layers"]]
    if moe:
        fig, axes = plt.subplots(1, len(moe), figsize=(4.2 * len(moe), 3.8), squeeze=False, sharey=True)
        for ax, r in zip(axes[0], moe):
            layers = r["layers"]
            E = len(layers[0]["expert_share"])
            width = 0.8 / len(layers)
            for j, x in enumerate(layers):
                pos = [e - 0.4 + (j + 0.5) * width for e in range(E)]
                label = f"layer {j}" + (f" ({x['dropped_fraction']:.1%} dropped)" if r["kind"] == "padded" else "")
                ax.bar(pos, [100 * v for v in x["expert_share"]], width=width, label=label)
            ax.axhline(100 / E, color="k", lw=0.8, ls="--")
            ax.set(xlabel="expert", title=r["config"], xticks=range(E))
            ax.legend(fontsize=6)
        axes[0][0].set_ylabel("share of assignments (%)")
        fig.suptitle(f"expert load over training (dashed: balanced) | {title}", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "expert_load.png", dpi=110)
        plt.close(fig)
        names.append("expert_load.png")
    return names


def write_all(
    args: argparse.Namespace,
    corpus: Corpus,
    results: list[dict[str, Any]],
    argv: list[str],
    extra: dict[str, Any],
) -> list[str]:
    """Write every output file into ``args.out``; returns their names. ``extra``: metadata of the run (elapsed_s)."""
    out: Path = args.out
    meta = report.metadata(torch.device(args.settings.device), argv, extra)
    for key in ("timer", "flops", "saved"):  # the kernel bench's notes
        meta.pop(key, None)
    meta["command"] = " ".join(["python -m bench.train", *argv])
    (out / "summary.md").write_text(_markdown(args, corpus, results, meta))
    settings = {
        "preset": args.preset,
        "size": vars(args.size),
        "settings": vars(args.settings),
        "configs": [s.name for s in args.specs],
        "corpus": {"source": corpus.source, "train_bytes": len(corpus.train), "val_bytes": len(corpus.val)},
    }
    (out / "results.json").write_text(json.dumps({"metadata": meta, **settings, "results": results}, indent=1) + "\n")
    _write_csvs(out, results)
    where = meta["gpu"] or meta["cpu"]
    title = f"{args.preset}: {where} | torch {meta['torch']} | {meta['date_utc']}"
    return ["summary.md", "results.json", "history.csv", "layers.csv", *_plots(out, results, title)]
