"""``python -m bench.model.compare``: the model's estimate beside each measured number of a benchmark run.

For every row of the dropless strategies (``blocksparse``, ``grouped``, and their FP8 rows ``<strategy>+fp8:<recipe>``
of ``python -m bench --fp8``) and of the ``torch_grouped_mm`` baseline (GLU rows) in the bench output folders given,
the same layer (tokens, widths, experts, k, dtype, FP8 recipe) is estimated by ``bench.model`` on ``--gpu`` and
printed beside the measured forward + backward time, with their ratio, and the ratios of the forward and of the
backward alone (an FP8 row's estimate is ``n/a`` where the
recording launches no FP8 kernels: ``bench.model``'s "no FP8 kernels launched"); a second
table gives each of our strategies' speedup over the baseline, measured and estimated (the target: >= 1.3x). The
day a GPU is lent, these tables say where the model is wrong. Usage (``bench/gpu_check.sh`` runs it)::

    python -m bench.model.compare --gpu h200 DIR [DIR ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench.strategies import fp8_case_name

from . import BASELINE, IMPLS, OURS, Estimate, estimate
from .roofline import GPUS, LayerShape

__all__ = ["gpu_of", "compare", "speedups", "main"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def gpu_of(device_name: str) -> str | None:
    """The model's GPU for a CUDA device name (``"NVIDIA H200"`` → ``"h200"``), None when the model has none."""
    for name in GPUS:
        if name in device_name.lower():
            return name
    return None


def _impl(r: dict) -> str | None:
    """The strategy of ``bench.model`` that a row measured (an FP8 row's: the strategy it runs with ``fp8``)."""
    if r.get("fp8"):
        return next((i for i in OURS if fp8_case_name(i, r["fp8"]) == r.get("strategy")), None)
    return r.get("strategy")


def _modelled(rows: list[dict]) -> list[dict]:
    """The rows the model estimates: our dropless strategies (with or without FP8) and the baseline (bf16 only, as
    its CUDA kernel), GLU, a dtype it knows."""
    return [
        r
        for r in rows
        if _impl(r) in IMPLS and r.get("glu") and r.get("dtype") in _DTYPES
        and (r["strategy"] != BASELINE or r["dtype"] == "bfloat16")
    ]  # fmt: skip


def _layer(r: dict) -> tuple[LayerShape, str]:
    shape = LayerShape("run", r["tokens"], r["hidden"], r["ffn"], r["experts"], r["top_k"])
    return shape, f"d={r['hidden']} f={r['ffn']} E={r['experts']} k={r['top_k']}"


def _estimate(r: dict, gpu: str) -> Estimate | None:
    """The estimate of the row's layer, None for an FP8 row while no FP8 kernels are launched."""
    try:
        return estimate(_layer(r)[0], _impl(r), gpu, dtype=_DTYPES[r["dtype"]], fp8=r.get("fp8"))
    except RuntimeError:  # bench.model: no FP8 kernels launched
        return None


def _model_ms(r: dict, gpu: str) -> float | None:
    est = _estimate(r, gpu)
    return None if est is None else est.seconds * 1e3


def _ratio(measured: float | None, model_s: float | None) -> str:
    return "n/a" if measured is None or model_s is None else f"{measured / (model_s * 1e3):.2f}"


def compare(rows: list[dict], gpu: str) -> list[list[str]]:
    """``[tokens, shape, strategy, measured ms, model ms, measured / model, forward measured / model, backward
    measured / model]`` per modelled row (the bench times the forward, the backward and both apart)."""
    table = []
    for r in _modelled(rows):
        measured = r.get("fwd_bwd_ms")
        est = _estimate(r, gpu)
        total, fwd, bwd = (None,) * 3 if est is None else (
            est.seconds, est.phase_seconds("forward"), est.phase_seconds("backward"))  # fmt: skip
        table.append([
            str(r["tokens"]), _layer(r)[1], r["strategy"], "n/a" if measured is None else f"{measured:.3f}",
            "n/a" if total is None else f"{total * 1e3:.3f}", _ratio(measured, total), _ratio(r.get("fwd_ms"), fwd),
            _ratio(r.get("bwd_ms"), bwd),
        ])  # fmt: skip
    return table


def speedups(rows: list[dict], gpu: str) -> list[list[str]]:
    """``[tokens, shape, strategy, measured speedup, model speedup]`` over the ``torch_grouped_mm`` baseline of the
    same layer and dtype, for each of our strategies' rows that has one (n/a where a time is missing)."""
    rows = _modelled(rows)
    base = {(r["tokens"], _layer(r)[1], r["dtype"]): r for r in rows if r["strategy"] == BASELINE}
    table = []
    for r in rows:
        b = base.get((r["tokens"], _layer(r)[1], r["dtype"]))
        if _impl(r) not in OURS or b is None:
            continue
        ours, theirs = r.get("fwd_bwd_ms"), b.get("fwd_bwd_ms")
        measured = f"{theirs / ours:.2f}x" if ours and theirs else "n/a"
        model = _model_ms(r, gpu)
        table.append([str(r["tokens"]), _layer(r)[1], r["strategy"], measured,
                      "n/a" if model is None else f"{_model_ms(b, gpu) / model:.2f}x"])  # fmt: skip
    return table


def _markdown(head: list[str], table: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in table]


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
    head = ["tokens", "shape", "strategy", "measured fwd+bwd ms", f"model ms ({gpu})", "measured / model",
            "fwd measured / model", "bwd measured / model"]  # fmt: skip
    vs = ["tokens", "shape", "strategy", "x torch._grouped_mm measured", f"x torch._grouped_mm model ({gpu})"]
    text = "\n".join(_markdown(head, compare(rows, gpu)) + [""] + _markdown(vs, speedups(rows, gpu)))
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
