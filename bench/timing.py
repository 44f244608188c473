"""Timing and memory of one closure: ``triton.testing.do_bench`` on CUDA, ``torch.utils.benchmark`` on CPU; and
``interleaved``: several closures called in alternation, so that the load of a shared machine hits each alike.

Callers warm up first (compilation, autotuning, caches), so nothing here counts it. The spread is the
inter-quartile range on CPU (``adaptive_autorange`` blocks; ``interleaved``'s calls) and the 20th-80th percentile
range on CUDA.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Timing", "measure", "interleaved", "memory_mib"]

GPU_WARMUP_MS = 25
GPU_REP_MS = 100


@dataclass(frozen=True)
class Timing:
    median_s: float
    spread_s: float


def measure(fn: Callable[[], object], device: torch.device, min_run_time: float) -> Timing:
    """Median and spread of ``fn()``; ``min_run_time`` is the CPU measuring budget in seconds."""
    if device.type == "cuda":
        from triton.testing import do_bench

        med, lo, hi = do_bench(fn, warmup=GPU_WARMUP_MS, rep=GPU_REP_MS, quantiles=[0.5, 0.2, 0.8])
        return Timing(med / 1e3, (hi - lo) / 1e3)
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    # repeat until IQR/median < 10 % (at least 4 blocks), within 5x the budget: one hiccup cannot be the median
    m = timer.adaptive_autorange(threshold=0.1, min_run_time=min_run_time, max_run_time=5 * min_run_time)
    return Timing(m.median, m.iqr)


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, rounds: int) -> dict[str, Timing]:
    """Median and inter-quartile range of one call of each closure, over ``rounds`` rounds that call every closure
    once in turn (each round starting one closure later, so none always follows the same one): wall time of each
    call, the device synchronized around it on CUDA."""
    if rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds}")
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    result = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [ts[0]] * 3
        result[name] = Timing(statistics.median(ts), q[2] - q[0])
    return result


def memory_mib(fn: Callable[[], object], device: torch.device) -> tuple[float | None, float | None, object]:
    """(peak MiB above the starting allocation while ``fn`` runs, MiB still held by its result, result).

    CUDA only (``torch.cuda.max_memory_allocated``); on CPU both are None: there is no allocator counter to
    read, and an estimate would not be a measurement.
    """
    if device.type != "cuda":
        return None, None, fn()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    held = (torch.cuda.memory_allocated(device) - base) / 2**20
    return peak, held, result
