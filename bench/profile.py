"""``python -m bench.profile``: where one forward + backward spends its device time, kernel by kernel.

``python -m bench`` times whole steps; this says which launches make them up (``torch.profiler``: CUDA kernels on a
GPU, operators on CPU), so that a measured step can be set beside ``bench.model``'s per-launch estimate and the
slowest kernel is named, not guessed. One preset shape, the strategies of ``--impls`` (the same cases as
``python -m bench``, FP8 rows with ``--fp8``); each case is warmed up three times, then ``--steps`` fwd+bwd steps are
profiled. The table lists, per case, every kernel (name shortened to 60 characters; Triton kernels by their
function name) with its calls per step, its time per step and its share of the step's device time. Usage::

    python -m bench.profile --preset mixtral --device cuda --tokens 16384 --impls grouped,torch_grouped_mm --out DIR

``bench/gpu_check.sh`` runs it at the reference shapes. Timings under a profiler carry its overhead: the shares are
what this is for, ``python -m bench`` gives the times.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from blocksparse_moe.fp8 import RECIPES

from .cli import PRESETS
from .problems import DTYPES, Shape, make_problem
from .strategies import STRATEGIES, Case, build_cases

__all__ = ["kernel_table", "profile_case", "main"]

NAME_WIDTH = 60


def _short(name: str) -> str:
    return name if len(name) <= NAME_WIDTH else name[: NAME_WIDTH - 3] + "..."


def profile_case(case: Case, device: torch.device, steps: int) -> list[dict]:
    """Per kernel (CUDA) or operator (CPU) of ``steps`` fwd+bwd steps of ``case``: name, calls and microseconds per
    step, biggest first."""
    grad = None

    def step() -> None:
        nonlocal grad
        out = case.forward()
        if grad is None:
            grad = torch.randn_like(out)
        torch.autograd.grad(out, case.inputs, grad, allow_unused=True)

    for _ in range(3):  # warm-up: JIT compiles, caches, the allocator's pools (CPU: the third step is the first fast)
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    calls: dict[str, int] = defaultdict(int)
    micros: dict[str, float] = defaultdict(float)
    for event in prof.events():
        on_device = event.device_type == torch.autograd.DeviceType.CUDA
        if on_device != cuda or (not cuda and event.cpu_parent is not None):  # CPU: top-level operators only
            continue
        calls[event.name] += 1
        micros[event.name] += event.device_time if cuda else event.cpu_time_total
    rows = [{"kernel": k, "calls": calls[k] / steps, "us": micros[k] / steps} for k in micros]
    return sorted(rows, key=lambda r: -r["us"])


def kernel_table(case_name: str, rows: list[dict], top: int, cuda: bool = True) -> list[str]:
    """Markdown lines: the case's step time and its ``top`` kernels (CPU: operators) with their shares."""
    total = sum(r["us"] for r in rows)
    what = ("device time", "kernels") if cuda else ("CPU time", "top-level operators")
    lines = [f"### {case_name}: {total / 1e3:.3f} ms of {what[0]} per fwd+bwd step ({len(rows)} {what[1]})", ""]
    lines += ["| kernel | calls / step | ms / step | share |", "|---|---|---|---|"]
    for r in rows[:top]:
        share = r["us"] / total if total else 0.0
        lines.append(f"| `{_short(r['kernel'])}` | {r['calls']:g} | {r['us'] / 1e3:.3f} | {share:.1%} |")
    if len(rows) > top:
        rest = sum(r["us"] for r in rows[top:])
        lines.append(f"| {len(rows) - top} others | | {rest / 1e3:.3f} | {rest / total:.1%} |")
    return [*lines, ""]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="layer shape")
    p.add_argument("--tokens", type=int, help="tokens (default: the preset's largest)")
    p.add_argument("--hidden", type=int, help="override the preset's d")
    p.add_argument("--ffn", type=int, help="override the preset's f")
    p.add_argument("--impls", default="blocksparse,grouped,torch_grouped_mm", help="comma-separated strategies")
    p.add_argument("--fp8", default="", help=f"comma-separated FP8 recipes among {', '.join(RECIPES)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--block-size", type=int, default=128, help="the blocksparse strategy's block size")
    p.add_argument("--steps", type=int, default=3, help="profiled fwd+bwd steps per case")
    p.add_argument("--top", type=int, default=12, help="kernels listed per case")
    p.add_argument("--out", type=Path, help="write profile.md and profile.json there")
    args = p.parse_args(argv)
    args.impls = [s for s in args.impls.split(",") if s]
    unknown = sorted(set(args.impls) - set(STRATEGIES))
    if unknown:
        p.error(f"--impls: unknown strategies {unknown}; expected some of {sorted(STRATEGIES)}")
    args.fp8 = tuple(r for r in args.fp8.split(",") if r)
    if set(args.fp8) - set(RECIPES):
        p.error(f"--fp8: unknown recipes {sorted(set(args.fp8) - set(RECIPES))}; expected some of {list(RECIPES)}")
    for name in ("steps", "top", "tokens", "hidden", "ffn"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    pre = PRESETS[args.preset]
    shape = Shape(tokens=args.tokens or max(pre.tokens), hidden=args.hidden or pre.hidden, ffn=args.ffn or pre.ffn,
                  experts=pre.experts, top_k=pre.top_k, glu=pre.glu, activation=pre.activation,
                  routing="uniform")  # fmt: skip
    problem = make_problem(shape, dtype, device)
    cases, skipped = build_cases(problem, args.impls, [], args.block_size, float("inf"), fp8=args.fp8)
    title = (f"T={shape.tokens} d={shape.hidden} f={shape.ffn} E={shape.experts} k={shape.top_k} "
             f"{'GLU ' if shape.glu else ''}{str(dtype).removeprefix('torch.')} on "
             f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")  # fmt: skip
    lines = [f"## Kernel profile: {args.preset}, {title}", "", f"torch {torch.__version__}; {args.steps} steps", ""]
    report = {"shape": vars(shape), "dtype": str(dtype), "device": str(device), "cases": {}}
    for case in cases:
        rows = profile_case(case, device, args.steps)
        report["cases"][case.name] = rows
        lines += kernel_table(case.name, rows, args.top, device.type == "cuda")
    lines += [f"- skipped {s}" for s in skipped]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile.md").write_text(text + "\n")
        (args.out / "profile.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
