"""Run the strategies over a list of shapes and collect one row (a flat dict) per strategy and shape."""

from __future__ import annotations

import gc
import math
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from . import flops
from .hf_experts import BASELINE as HF_BASELINE
from .memory import saved_for_backward
from .problems import Problem, Shape, make_problem
from .strategies import Case, build_cases, loop_moe_mlp
from .timing import interleaved, measure, memory_mib

__all__ = ["run", "Progress"]


class Progress:
    """Progress over shapes on stderr (tqdm when installed, else one plain line per case)."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self._bar = None
        self._done, self._total, self._enabled = 0, total, enabled
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, file=sys.stderr, unit="shape", dynamic_ncols=True)
            except ImportError:
                pass

    def describe(self, label: str) -> None:
        """Say which case runs now."""
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.set_description_str(label)
        else:
            print(f"[shape {self._done + 1}/{self._total}] {label}", file=sys.stderr, flush=True)

    def advance(self) -> None:
        """One shape done."""
        self._done += 1
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _reference(p: Problem, grad: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Output and input gradients of the per-expert loop in float64 (CPU) or float32 (CUDA), same inputs."""
    dt = torch.float64 if p.x.device.type == "cpu" else torch.float32
    leaves = [t.detach().to(dt).requires_grad_() for t in p.inputs]
    x, weights, w1, w2, *w3 = leaves
    out = loop_moe_mlp(p, x, w1, w2, w3[0] if w3 else None, weights)
    return out.detach(), torch.autograd.grad(out, leaves, grad.to(dt))


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if expected.numel() == 0:
        return 0.0
    scale = expected.abs().max().clamp_min(1e-30)
    return float((actual.detach().to(expected.dtype) - expected).abs().max() / scale)


def sqnr_db(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``actual`` against the reference ``expected``, in dB:
    ``10·log10(Σ expected² / Σ (actual - expected)²)`` (inf when they are equal, NaN for an empty or all-zero
    reference)."""
    noise = float((actual.detach().to(expected.dtype) - expected).pow(2).sum())
    signal = float(expected.pow(2).sum())
    if signal == 0.0:
        return math.nan
    return math.inf if noise == 0.0 else 10.0 * math.log10(signal / noise)


def _time_case(
    case: Case,
    device: torch.device,
    grad: torch.Tensor,
    ref: tuple[torch.Tensor, tuple[torch.Tensor, ...]],
    min_run_time: float,
    tokens: int,
) -> tuple[dict[str, Any], Callable[[], object] | None]:
    """Warm up (checking output, gradients and whether backward runs), measure the bytes saved for backward,
    then time fwd, bwd and fwd+bwd. Returns the row and the fwd+bwd step (None when backward does not run)."""
    row: dict[str, Any] = {}
    inputs = case.inputs
    ref_out, ref_grads = ref
    out = case.forward()
    out = case.forward()  # second warm-up: autotuning / caches settle
    if out.shape != grad.shape:  # dense: its own output shape
        grad = torch.randn_like(out)
    if case.comparable:
        row["max_rel_err"] = _rel_err(out, ref_out)
        row["sqnr_db"] = sqnr_db(out, ref_out)
    bwd_error = None
    try:
        grads = torch.autograd.grad(out, inputs, grad, allow_unused=True)
        torch.autograd.grad(case.forward(), inputs, grad, allow_unused=True)
    except (RuntimeError, NotImplementedError) as e:
        bwd_error = str(e).strip().splitlines()[0][:120]
        case.notes.append(f"backward n/a: {bwd_error}")
    else:
        if case.comparable:
            if case.grads_as_reference is not None:
                grads = case.grads_as_reference(grads)
            pairs = [(torch.zeros_like(r) if g is None else g, r) for g, r in zip(grads, ref_grads, strict=True)]
            row["max_rel_err_grad"] = max(_rel_err(g, r) for g, r in pairs)
            # the worst of the input gradients (one whose reference is all zeros has none)
            row["sqnr_db_grad"] = min((v for g, r in pairs if not math.isnan(v := sqnr_db(g, r))), default=math.nan)
        del grads
    del out
    out, saved = saved_for_backward(case.forward, case.parameters)
    del out
    row["saved_bytes_per_token"] = saved.per_token(tokens)
    row["saved_param_bytes"] = saved.parameter_bytes

    t = measure(case.forward, device, min_run_time)
    row["fwd_ms"], row["fwd_spread_ms"] = t.median_s * 1e3, t.spread_s * 1e3
    fwd_peak, fwd_held, out = memory_mib(case.forward, device)
    row["fwd_peak_mib"], row["fwd_act_mib"] = fwd_peak, fwd_held
    if bwd_error is None:
        backward = lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True, allow_unused=True)
        t = measure(backward, device, min_run_time)
        row["bwd_ms"], row["bwd_spread_ms"] = t.median_s * 1e3, t.spread_s * 1e3
        del out
        step = lambda: torch.autograd.grad(case.forward(), inputs, grad, allow_unused=True)
        t = measure(step, device, min_run_time)
        row["fwd_bwd_ms"], row["fwd_bwd_spread_ms"] = t.median_s * 1e3, t.spread_s * 1e3
        row["fwd_bwd_peak_mib"] = memory_mib(step, device)[0]
        return row, step
    return row, None


def _basis(row: dict[str, Any]) -> tuple[str, int]:
    """Time column and FLOP multiplier used for rates and speedups: fwd+bwd when measured, else fwd."""
    return ("fwd_bwd_ms", 3) if row.get("fwd_bwd_ms") is not None else ("fwd_ms", 1)


def _derive(rows: list[dict[str, Any]], capacity_factors: list[float]) -> None:
    """Per-shape columns that need other rows: % of the dense rate, speedup and memory vs padded, speedup vs
    transformers' ``grouped_mm`` experts (on the interleaved times where both rows have them)."""
    dense = next((r for r in rows if r["strategy"] == "dense"), None)
    padded = {r["capacity_factor"]: r for r in rows if r["capacity_factor"] is not None}
    hf = next((r for r in rows if r["strategy"] == HF_BASELINE), None)
    for r in rows:
        col, mult = _basis(r)
        r["basis"] = "fwd+bwd" if mult == 3 else "fwd"
        if hf is not None:
            both = r.get("fwd_bwd_interleaved_ms") is not None and hf.get("fwd_bwd_interleaved_ms") is not None
            key = "fwd_bwd_interleaved_ms" if both else col
            if hf.get(key) is not None:
                r["speedup_vs_hf_grouped_mm"] = hf[key] / r[key]
        r["tflops"] = flops.tflops(mult * r["useful_flops"], r[col] / 1e3)
        r["tflops_fwd"] = flops.tflops(r["useful_flops"], r["fwd_ms"] / 1e3)
        if dense is not None and dense[col] is not None and r["tflops"] is not None:
            r["pct_dense"] = 100.0 * r["tflops"] / flops.tflops(mult * dense["useful_flops"], dense[col] / 1e3)
        for cf in capacity_factors:
            pr = padded.get(cf)
            if pr is None or pr[col] is None:
                continue
            r[f"speedup_vs_padded@{cf:g}"] = pr[col] / r[col]
            if r.get("fwd_act_mib") is not None and pr.get("fwd_act_mib"):
                r[f"fwd_act_vs_padded@{cf:g}"] = r["fwd_act_mib"] / pr["fwd_act_mib"]


def run(
    shapes: Iterable[Shape],
    *,
    dtype: torch.dtype,
    device: torch.device,
    strategies: list[str],
    capacity_factors: list[float],
    block_size: int,
    min_run_time: float,
    reference_max_waste: float = 8.0,
    seed: int = 0,
    progress: Progress | None = None,
    time_budget: float | None = None,
    interleave: int = 0,
    fp8: tuple[str, ...] = (),
) -> tuple[list[dict[str, Any]], list[str]]:
    """Time every strategy on every shape. Returns (rows, notes on skipped strategies).

    ``fp8`` (recipes of ``blocksparse_moe.fp8.RECIPES``): the dropless strategies among ``strategies`` once more per
    recipe (``strategies.build_cases``); every comparable row also gets its SQNR against the float64 reference
    (``sqnr_db``, ``sqnr_db_grad``: the worst input gradient), the measure of FP8's expected error.
    ``time_budget`` (seconds): no case starts after it is spent; the cases left are named in the notes.
    ``interleave`` (rounds, 0: none): after a shape's cases, time one fwd+bwd step of each of them in alternation
    (``timing.interleaved``) into ``fwd_bwd_interleaved_ms``, comparable across the shape's rows on a shared machine.
    """
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    deadline = None if time_budget is None else time.monotonic() + time_budget
    for shape in shapes:
        if deadline is not None and time.monotonic() > deadline:
            notes.append(f"time budget of {time_budget:g} s spent: T={shape.tokens} E={shape.experts} not run")
            continue
        p = make_problem(shape, dtype, device, seed)
        grad = torch.randn(p.x.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
        ref = _reference(p, grad)
        cases, skipped = build_cases(p, strategies, capacity_factors, block_size, reference_max_waste, fp8)
        tag = f"T={shape.tokens} E={shape.experts} k={shape.top_k} d={shape.hidden} f={shape.ffn} {shape.routing}"
        notes.extend(s for s in skipped if s not in notes)
        shape_rows = []
        steps: dict[str, Callable[[], object]] = {}  # fwd+bwd step of each case whose backward runs
        for case in cases:
            if deadline is not None and time.monotonic() > deadline:
                notes.append(f"time budget of {time_budget:g} s spent: {tag} {case.name} not run")
                continue
            if progress is not None:
                progress.describe(f"{tag} {case.name}")
            row: dict[str, Any] = dict(
                tokens=shape.tokens,
                hidden=shape.hidden,
                ffn=shape.ffn,
                experts=shape.experts,
                top_k=shape.top_k,
                glu=shape.glu,
                activation=shape.activation,
                routing=shape.routing,
                dtype=str(dtype).removeprefix("torch."),
                device=device.type,
                strategy=case.name,
                fp8=case.fp8,
                capacity_factor=case.capacity_factor,
                capacity=case.capacity,
                dropped_fraction=case.dropped_fraction,
                useful_flops=case.useful_flops,
                executed_flops=case.executed_flops,
                executed_over_useful=(case.executed_flops / case.useful_flops)
                if case.executed_flops is not None and case.useful_flops
                else None,
                bwd_ms=None,
                fwd_bwd_ms=None,
            )
            try:
                timed, step = _time_case(case, device, grad, ref, min_run_time, shape.tokens)
                row.update(timed)
            except Exception as e:  # one broken strategy must not end the run: report it and go on
                message = f"{case.name}: failed, {type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
                notes.extend([message] if message not in notes else [])
                continue
            row["note"] = "; ".join(case.notes)
            shape_rows.append(row)
            if step is not None:
                steps[case.name] = step
            del case, step
            if device.type == "cuda":  # return this case's memory before the next one's peak is measured
                gc.collect()
                torch.cuda.empty_cache()
        if interleave and steps:
            if progress is not None:
                progress.describe(f"{tag} fwd+bwd of {len(steps)} cases interleaved, {interleave} rounds")
            timings = interleaved(steps, device, interleave)
            for row in shape_rows:
                t = timings.get(row["strategy"])
                if t is not None:
                    row["fwd_bwd_interleaved_ms"] = t.median_s * 1e3
                    row["fwd_bwd_interleaved_spread_ms"] = t.spread_s * 1e3
        del steps
        _derive(shape_rows, capacity_factors)
        rows.extend(shape_rows)
        del p, ref, cases, grad
        if progress is not None:
            progress.advance()
    return rows, notes
