"""Benchmark output: a markdown table, CSV and JSON (rows + machine/software metadata)."""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["metadata", "markdown", "write_csv", "write_json"]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def metadata(device: torch.device, argv: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Machine and software facts that numbers must carry (hardware, versions, commit, date, command)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from blocksparse_moe.config import resolve_backend

    meta: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench", *argv]),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": triton_version,
        "platform": platform.platform(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "git_commit": _git_commit(),
        "backend": resolve_backend(device),
        "timer": "triton.testing.do_bench, median, spread = p80 - p20"
        if device.type == "cuda"
        else "torch.utils.benchmark.Timer.adaptive_autorange, median, spread = IQR",
        "flops": "useful = T·k·2·d·f·(3 GLU | 2), kept assignments only for padded; backward = 2x forward; "
        "TFLOP/s and % dense on fwd+bwd when backward runs, else forward",
        "saved": "saved B/token: bytes autograd keeps for backward per token, measured with "
        "torch.autograd.graph.saved_tensors_hooks on the real graph, each storage once, the expert weights "
        "excluded (saved_param_bytes lists them), the inputs x and top-k weights included (bench/memory.py)",
    }
    meta.update(extra or {})
    return meta


def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None or v == "":
        return "n/a"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _time(row: dict[str, Any], key: str) -> str:
    if row.get(key) is None:
        return "n/a"
    return f"{row[key]:.3g} ± {row[key.replace('_ms', '_spread_ms')]:.2g}"


def markdown(rows: list[dict[str, Any]], capacity_factors: list[float]) -> str:
    """One table per shape: times (median ± spread, ms), rates, padding waste, memory (saved for backward per
    token, activation MiB on CUDA), drops, speedups, errors (and their SQNR when FP8 rows are present)."""
    out: list[str] = []
    shapes: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        key = (r["tokens"], r["hidden"], r["ffn"], r["experts"], r["top_k"], r["glu"], r["routing"], r["dtype"])
        shapes.setdefault(key, []).append(r)
    speed_cols = [f"speedup_vs_padded@{cf:g}" for cf in capacity_factors]
    header = [
        "strategy",
        "fwd ms",
        "bwd ms",
        "fwd+bwd ms",
        "TFLOP/s",
        "% dense",
        "exec/useful",
        "saved B/token",
        "fwd act MiB",
        "dropped",
        *[f"x vs padded@{cf:g}" for cf in capacity_factors],
        "max rel err (out / grads)",
    ]
    # where measured: the interleaved fwd+bwd times (--interleave) and the speedup vs transformers' grouped_mm
    extra = [(key, name) for key, name in (("fwd_bwd_interleaved_ms", "fwd+bwd interleaved ms"),
                                           ("speedup_vs_hf_grouped_mm", "x vs hf:grouped_mm"))
             if any(r.get(key) is not None for r in rows)]  # fmt: skip
    header += [name for _, name in extra]
    # FP8 rows (--fp8): their expected error as the SQNR against the float64 reference, beside every row's
    sqnr = any(r.get("fp8") for r in rows)
    header += ["SQNR dB (out / grads)"] if sqnr else []
    for (T, d, f, E, k, glu, routing, dtype), group in shapes.items():
        out.append(
            f"\n### T={T} d={d} f={f} E={E} k={k} {'GLU' if glu else 'MLP'} routing={routing} {dtype} "
            f"({group[0]['device']})\n"
        )
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        for r in group:
            cells = [
                r["strategy"],
                _time(r, "fwd_ms"),
                _time(r, "bwd_ms"),
                _time(r, "fwd_bwd_ms"),
                _fmt(r.get("tflops")) + ("" if r.get("basis") == "fwd+bwd" else " (fwd)"),
                _fmt(r.get("pct_dense"), ".1f"),
                _fmt(r.get("executed_over_useful"), ".2f"),
                _fmt(r.get("saved_bytes_per_token"), ".0f"),
                _fmt(r.get("fwd_act_mib"), ".1f"),
                _fmt(r.get("dropped_fraction"), ".1%"),
                *[_fmt(r.get(c), ".2f") for c in speed_cols],
                f"{_fmt(r.get('max_rel_err'), '.1e')} / {_fmt(r.get('max_rel_err_grad'), '.1e')}",
                *[_time(r, key) if key.endswith("_ms") else _fmt(r.get(key), ".2f") for key, _ in extra],
                *([f"{_fmt(r.get('sqnr_db'), '.1f')} / {_fmt(r.get('sqnr_db_grad'), '.1f')}"] if sqnr else []),
            ]
            out.append("| " + " | ".join(cells) + " |")
        notes = [f"- {r['strategy']}: {r['note']}" for r in group if r.get("note")]
        out.extend(["", *notes] if notes else [])
    return "\n".join(out).lstrip("\n") + "\n"


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns: list[str] = []
    for r in rows:
        columns.extend(c for c in r if c not in columns)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({c: "" if r.get(c) is None else r[c] for c in columns})


def write_json(rows: list[dict[str, Any]], notes: list[str], meta: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps({"metadata": meta, "notes": notes, "rows": rows}, indent=1) + "\n")
