"""``python -m bench.model.calibrate``: fit the model's calibrated constants to a measured GPU run.

The bench times the forward and the backward apart; each constant of ``roofline.CALIBRATION`` moves a separate set of
those times, so each is fitted alone (least squares of log(measured / model), a golden-section search):

1. ``main_loop_factor``: the forward times of our strategies (their GEMMs' main loops; nothing else in the forward
   depends on a fitted constant);
2. ``backward_efficiency``: the backward times of our strategies, with 1. in place;
3. ``library_efficiency`` and ``atomics_per_s``: the ``torch_grouped_mm`` baseline's forward and backward times (its
   ``torch._grouped_mm`` calls and its eager ``index_add``), by alternating searches.

The dense rate is measured, not fitted: the run's ``dense`` rows (cuBLAS GEMMs of the layer's FLOPs) are printed
beside the GPU's ``dense_tflops``. FP8 rows are left out (not calibrated). Usage::

    python -m bench.model.calibrate --gpu "NVIDIA H100 80GB HBM3" DIR [DIR ...]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from . import BASELINE, OURS, estimate
from .compare import _layer, gpu_of
from .roofline import GPUS, Gpu

__all__ = ["FITTED", "fitted_rows", "fit", "main"]

FITTED = ("main_loop_factor", "backward_efficiency", "library_efficiency", "atomics_per_s")
_PHASES = (("forward", "fwd_ms"), ("backward", "bwd_ms"))


def fitted_rows(rows: list[dict]) -> list[dict]:
    """The rows a fit reads: bf16 GLU rows of our strategies and the baseline, without FP8, both directions timed."""
    return [
        r for r in rows
        if r.get("strategy") in (*OURS, BASELINE) and not r.get("fp8") and r.get("glu")
        and r.get("dtype") == "bfloat16" and r.get("fwd_ms") and r.get("bwd_ms")
    ]  # fmt: skip


def _error(gpu: Gpu, rows: list[dict], phases: tuple[str, ...]) -> float:
    """Σ log(measured / model)² over ``rows`` and ``phases``."""
    total = 0.0
    for r in rows:
        est = estimate(_layer(r)[0], r["strategy"], gpu)
        for phase, key in _PHASES:
            if phase in phases:
                total += math.log(r[key] / (est.phase_seconds(phase) * 1e3)) ** 2
    return total


def _search(f: Callable[[float], float], lo: float, hi: float, steps: int = 40) -> float:
    """The minimum of a unimodal ``f`` on ``[lo, hi]`` (golden section)."""
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    for _ in range(steps):
        c, d = b - g * (b - a), a + g * (b - a)
        if f(c) < f(d):
            b = d
        else:
            a = c
    return (a + b) / 2


def _fit_one(gpu: Gpu, field: str, rows: list[dict], phases: tuple[str, ...], lo: float, hi: float,
             log_scale: bool = False) -> Gpu:  # fmt: skip
    """``gpu`` with ``field`` at its best value in ``[lo, hi]`` (``log_scale``: ``[10**lo, 10**hi]``)."""

    def value(v: float) -> float:
        return 10**v if log_scale else v

    best = _search(lambda v: _error(replace(gpu, **{field: value(v)}), rows, phases), lo, hi)
    return replace(gpu, **{field: value(best)})


def fit(rows: list[dict], gpu: Gpu) -> Gpu:
    """``gpu`` with the ``FITTED`` constants fitted to the bench ``rows`` measured on it (``fitted_rows`` of them).
    A constant whose rows the run lacks is a ValueError."""
    rows = fitted_rows(rows)
    ours = [r for r in rows if r["strategy"] in OURS]
    base = [r for r in rows if r["strategy"] == BASELINE]
    if not ours or not base:
        raise ValueError(f"a fit needs bf16 rows of {OURS} and of {BASELINE!r} with fwd_ms and bwd_ms; got "
                         f"{len(ours)} and {len(base)}")  # fmt: skip
    gpu = _fit_one(gpu, "main_loop_factor", ours, ("forward",), 0.2, 1.5)
    gpu = _fit_one(gpu, "backward_efficiency", ours, ("backward",), 0.2, 1.5)
    both = ("forward", "backward")
    for _ in range(4):  # the library's GEMMs and the atomics share the baseline's times: alternate
        gpu = _fit_one(gpu, "library_efficiency", base, both, 0.2, 1.5)
        gpu = _fit_one(gpu, "atomics_per_s", base, both, 9.0, 12.0, log_scale=True)
    return gpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.model.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="bench output folders (results.json)")
    p.add_argument("--gpu", required=True, help=f"one of {tuple(GPUS)}, or a CUDA device name containing one")
    args = p.parse_args(argv)
    name = gpu_of(args.gpu)
    if name is None:  # as bench.model.compare: nothing to fit, not a failure of the run
        print(f"bench.model has no GPU for {args.gpu!r} (it knows {tuple(GPUS)}): nothing to fit", file=sys.stderr)
        return 0
    paths = [folder / "results.json" for folder in args.runs]  # a folder without one: its bench step failed
    rows = [row for path in paths if path.exists() for row in json.loads(path.read_text())["rows"]]
    gpu = GPUS[name]
    try:
        fitted = fit(rows, gpu)
    except ValueError as exc:
        p.error(str(exc))
    lines = [f"| constant | bench.model ({name}) | fitted |", "|---|---|---|"]
    lines += [f"| {c} | {getattr(gpu, c):.3g} | {getattr(fitted, c):.3g} |" for c in FITTED]
    for r in rows:  # the measured dense rate: the bench's dense rows (cuBLAS), not fitted
        if r.get("strategy") == "dense" and r.get("glu") and r.get("fwd_bwd_ms"):
            shape, label = _layer(r)
            rate = shape.useful_flops() / (r["fwd_bwd_ms"] * 1e-3) / 1e12
            lines.append(f"| dense_tflops (measured: dense row, T={r['tokens']} {label}) | {gpu.dense_tflops:.0f} | "
                         f"{rate:.0f} |")  # fmt: skip
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
