"""``python -m bench.model.compare``: the model's estimate beside each measured number of a benchmark run.

For every row of the dropless strategies (``blocksparse``, ``grouped``; GLU rows) in the bench output folders
given, the same layer (tokens, widths, experts, k, dtype) is estimated by ``bench.model`` on ``--gpu`` and printed
beside the measured forward + backward time, with their ratio: the day a GPU is lent, this table says where the
model is wrong. Usage (``bench/gpu_check.sh`` runs it)::

    python -m bench.model.compare --gpu h200 DIR [DIR ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import IMPLS, estimate
from .roofline import GPUS, LayerShape

__all__ = ["gpu_of", "compare", "main"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def gpu_of(device_name: str) -> str | None:
    """The model's GPU for a CUDA device name (``"NVIDIA H200"`` → ``"h200"``), None when the model has none."""
    for name in GPUS:
        if name in device_name.lower():
            return name
    return None


def compare(rows: list[dict], gpu: str) -> list[list[str]]:
    """``[tokens, shape, strategy, measured ms, model ms, measured / model]`` per dropless GLU row."""
    table = []
    for r in rows:
        if r.get("strategy") not in IMPLS or not r.get("glu") or r.get("dtype") not in _DTYPES:
            continue
        shape = LayerShape("run", r["tokens"], r["hidden"], r["ffn"], r["experts"], r["top_k"])
        est = estimate(shape, r["strategy"], gpu, dtype=_DTYPES[r["dtype"]])
        measured = r.get("fwd_bwd_ms")
        model = est.seconds * 1e3
        table.append([
            str(r["tokens"]), f"d={r['hidden']} f={r['ffn']} E={r['experts']} k={r['top_k']}", r["strategy"],
            "n/a" if measured is None else f"{measured:.3f}", f"{model:.3f}",
            "n/a" if measured is None else f"{measured / model:.2f}",
        ])  # fmt: skip
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.model.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="bench output folders (results.json)")
    p.add_argument("--gpu", required=True, help=f"one of {tuple(GPUS)}, or a CUDA device name containing one")
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    gpu = gpu_of(args.gpu)
    if gpu is None:
        print(f"bench.model has no GPU for {args.gpu!r} (it knows {tuple(GPUS)}): no estimate", file=sys.stderr)
        return 0
    rows = []
    for folder in args.runs:
        path = folder / "results.json"
        if path.exists():
            rows += json.loads(path.read_text())["rows"]
    head = ["tokens", "shape", "strategy", "measured fwd+bwd ms", f"model ms ({gpu})", "measured / model"]
    table = compare(rows, gpu)
    text = "\n".join(
        ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in table]
    )
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
