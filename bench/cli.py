"""``python -m bench``: time the MoE MLP strategies over a token sweep; table on stdout, CSV/JSON/PNGs in --out.

``--ep WORLD_SIZE [args...]`` runs the expert-parallel benchmark instead (``bench.ep``, given the other args).
The CLI never sets ``TRITON_INTERPRET``: on CPU the library runs its PyTorch backends.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .harness import Progress, run
from .library import BLOCK_SIZES, GPU_BLOCK_SIZES
from .problems import DTYPES, Shape, parse_routing
from .strategies import FP8_STRATEGIES, STRATEGIES

__all__ = ["PRESETS", "Preset", "main", "parse_args", "prepare_out_dir"]


@dataclass(frozen=True)
class Preset:
    hidden: int
    ffn: int
    experts: int
    top_k: int
    glu: bool
    activation: str
    tokens: tuple[int, ...]
    description: str


PRESETS = {
    "quick": Preset(256, 512, 8, 2, True, "silu", (256, 512, 1024), "small SwiGLU layer, the CPU default"),
    "mixtral": Preset(4096, 14336, 8, 2, True, "silu", (1024, 4096, 16384), "Mixtral 8x7B expert MLP"),
    "fine": Preset(2048, 768, 128, 8, True, "silu", (1024, 4096, 16384), "fine-grained experts (Qwen3-MoE-like)"),
    "switch": Preset(768, 3072, 128, 1, False, "relu", (1024, 4096, 16384), "Switch-Base: k=1, ReLU MLP"),
}


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(v > 0 and math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected positive finite numbers, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    names = [v for v in text.split(",") if v]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(STRATEGIES)}, got {text!r}")
    return names


def _recipes(text: str) -> list[str]:
    from blocksparse_moe.fp8 import RECIPES

    names = [v for v in text.split(",") if v]
    if not names or any(n not in RECIPES for n in names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(RECIPES)}, got {text!r}")
    return list(dict.fromkeys(names))  # each recipe once


def _routings(text: str) -> list[str]:
    specs = [v for v in text.split(",") if v]
    for s in specs:
        try:
            parse_routing(s)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return specs


def prepare_out_dir(path: Path) -> str | None:
    """Create the output folder ``path`` if needed and check that a file can be written in it.

    Returns None when it is usable, else the reason (for an argparse-style error).
    """
    if path.exists() and not path.is_dir():
        return f"--out must be a folder, got {str(path)!r}, which is an existing file"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"--out must be a writable folder, got {str(path)!r}: creating it failed ({e.strerror or e})"
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        return f"--out must be a writable folder, got {str(path)!r}: writing a file in it failed ({e.strerror or e})"
    return None


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="layer shape and token sweep")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when visible, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--impls", type=_names, default=list(STRATEGIES), help=f"subset of {','.join(STRATEGIES)}")
    p.add_argument("--tokens", type=_ints, default=None, help="token counts (comma list), overrides the preset")
    p.add_argument("--experts", type=_ints, default=None, help="expert counts (comma list)")
    p.add_argument("--top-k", type=_ints, default=None, help="top-k values (comma list)")
    p.add_argument("--hidden", type=int, default=None, help="d, the model width")
    p.add_argument("--ffn", type=int, default=None, help="f, the expert width")
    p.add_argument("--glu", action=argparse.BooleanOptionalAction, default=None, help="GLU experts (w3)")
    p.add_argument("--activation", choices=("gelu", "relu", "silu"), default=None)
    p.add_argument("--fp8", type=_recipes, default=[], metavar="RECIPE[,RECIPE]",
                   help=f"also run {' and '.join(FP8_STRATEGIES)} with moe_mlp(fp8=RECIPE) (blockwise, mxfp8, "
                        "rowwise; the PyTorch emulation on CPU): rows '<strategy>+fp8:<recipe>' + SQNR, and "
                        "'<strategy>+fp8:<recipe>:prequant' (weights prequantized, forward only; with hf_experts "
                        "also 'hf:blocksparse_moe+fp8:<recipe>:prequant')")  # fmt: skip
    p.add_argument("--routing", type=_routings, default=["uniform"], help="uniform | zipf:S | one-hot (comma list)")
    p.add_argument("--capacity-factors", type=_floats, default=[1.0, 1.25, 2.0], help="padded baselines")
    p.add_argument("--block-size", type=int, choices=BLOCK_SIZES, default=None,
                   help="blocksparse block size (default 128 cuda, 64 cpu)")  # fmt: skip
    p.add_argument("--min-run-time", type=float, default=0.2, help="CPU measuring budget per timing, seconds")
    p.add_argument("--reference-max-waste", type=float, default=8.0, help="skip 'reference' when E/k exceeds this")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; no case starts after that")
    p.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                   help="after each shape, time fwd+bwd of its cases in alternation ROUNDS times (0: off): the "
                        "times to compare rows by on a shared machine, whose load hits every case alike")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="output folder (default bench/out/<timestamp>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse and check the arguments; a bad one exits with an argparse error (code 2). Creates nothing."""
    p = _build_parser()
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested, but torch sees no CUDA device")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.block_size is None:
        args.block_size = 128 if args.device == "cuda" else 64
    if args.device == "cuda" and args.block_size not in GPU_BLOCK_SIZES:
        sizes = ", ".join(map(str, GPU_BLOCK_SIZES))
        p.error(f"--block-size {args.block_size} is a CPU size: on cuda choose from {sizes}")
    for name in ("hidden", "ffn"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if not (args.min_run_time > 0 and math.isfinite(args.min_run_time)):
        p.error(f"--min-run-time must be a finite number of seconds > 0, got {args.min_run_time}")
    if args.time_budget is not None and not (args.time_budget > 0 and math.isfinite(args.time_budget)):
        p.error(f"--time-budget must be a finite number of seconds > 0 (omit it for no budget), got {args.time_budget}")
    if args.interleave < 0:
        p.error(f"--interleave must be a number of rounds >= 0 (0: off), got {args.interleave}")
    if not args.reference_max_waste >= 1:  # also NaN
        p.error(
            "--reference-max-waste must be >= 1 (the waste E/k is at least 1; inf never skips 'reference'), "
            f"got {args.reference_max_waste}"
        )
    if args.fp8 and not set(FP8_STRATEGIES) & set(args.impls):
        ours = " or ".join(FP8_STRATEGIES)
        p.error(f"--fp8 adds rows to {ours}: --impls must include one of them, got {','.join(args.impls)}")
    preset = PRESETS[args.preset]
    for k in args.top_k or [preset.top_k]:
        for e in args.experts or [preset.experts]:
            if k > e:
                p.error(f"--top-k must be <= --experts, got top_k={k} with experts={e}")
    return args


def shapes_from_args(args: argparse.Namespace) -> list[Shape]:
    """Preset values overridden by the explicit flags; tokens vary fastest."""
    pre = PRESETS[args.preset]
    glu = pre.glu if args.glu is None else args.glu
    return [
        Shape(
            tokens=t,
            hidden=args.hidden or pre.hidden,
            ffn=args.ffn or pre.ffn,
            experts=e,
            top_k=k,
            glu=glu,
            activation=args.activation or pre.activation,
            routing=r,
        )
        for r in args.routing
        for e in args.experts or [pre.experts]
        for k in args.top_k or [pre.top_k]
        for t in args.tokens or pre.tokens
    ]


def _run_ep(argv: list[str]) -> int:
    i = argv.index("--ep")
    if i + 1 >= len(argv):
        print("python -m bench: error: --ep needs a WORLD_SIZE", file=sys.stderr)
        return 2
    world = argv[i + 1]
    if not world.isdigit() or int(world) < 1:
        print(f"python -m bench: error: --ep WORLD_SIZE must be a positive integer, got {world!r}", file=sys.stderr)
        return 2
    rest = argv[:i] + argv[i + 2 :]
    try:
        ep = importlib.import_module("bench.ep")
    except ImportError as e:
        print(
            f"python -m bench --ep: the expert-parallel benchmark (bench/ep.py) is not available: {e}", file=sys.stderr
        )
        return 2
    ep.main(["--world", world, *rest])
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if "--ep" in argv:
        return _run_ep(argv)
    args = parse_args(argv)
    from . import plots, report

    device = torch.device(args.device)
    shapes = shapes_from_args(args)
    out_dir = args.out or Path(__file__).parent / "out" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    problem = prepare_out_dir(out_dir)  # before any measuring: fail in a second, not after the run
    if problem is not None:
        _build_parser().error(problem)
    pre = PRESETS[args.preset]
    print(
        f"bench: preset {args.preset} ({pre.description}), {len(shapes)} shape(s) x {','.join(args.impls)} on "
        f"{args.device} {args.dtype}, capacity factors {args.capacity_factors}"
        f"{', fp8 ' + ','.join(args.fp8) if args.fp8 else ''}; writing to {out_dir}",
        file=sys.stderr,
    )
    start = time.perf_counter()
    progress = Progress(len(shapes), enabled=not args.no_progress)
    try:
        rows, notes = run(
            shapes,
            dtype=DTYPES[args.dtype],
            device=device,
            strategies=args.impls,
            capacity_factors=args.capacity_factors,
            block_size=args.block_size,
            min_run_time=args.min_run_time,
            reference_max_waste=args.reference_max_waste,
            seed=args.seed,
            progress=progress,
            time_budget=args.time_budget,
            interleave=args.interleave,
            fp8=tuple(args.fp8),
        )
    finally:
        progress.close()
    elapsed = time.perf_counter() - start
    meta = report.metadata(
        device,
        argv,
        {
            "preset": args.preset,
            "block_size": args.block_size,
            "dtype": args.dtype,
            "interleave": args.interleave,
            "fp8": args.fp8,
            "elapsed_s": round(elapsed, 1),
        },
    )
    title = f"{meta['gpu'] or meta['cpu']} | torch {meta['torch']} | {meta['date_utc']}"
    table = report.markdown(rows, args.capacity_factors)
    header = (
        f"## MoE MLP benchmark: {args.preset} on {meta['gpu'] or meta['cpu']} ({args.device}, {args.dtype})\n\n"
        f"{meta['date_utc']}, torch {meta['torch']}, triton {meta['triton']}, commit {meta['git_commit']}, "
        f"backend {meta['backend']}. Timer: {meta['timer']}. {meta['flops']}. {meta['saved']}.\n"
        f"Command: `{meta['command']}`\n"
    )
    if args.fp8:
        header += (
            f"FP8 rows (`<strategy>+fp8:<recipe>`): `moe_mlp(..., fp8=RECIPE)` for {', '.join(args.fp8)}"
            f"{' (the PyTorch emulation: cast, scale, fp32 matmul)' if meta['backend'] == 'torch' else ''}; "
            "`<strategy>+fp8:<recipe>:prequant`: the same forward on weights prequantized before timing "
            "(`fp8.prequantize`: serving FP8 weights from a checkpoint; inference, forward only); their "
            "error is expected: SQNR dB = 10·log10(Σ ref² / Σ (out - ref)²) against the float64 reference, for the "
            "output and the worst input gradient.\n"
        )
    skipped = "".join(f"- skipped {n}\n" for n in notes)
    text = header + "\n" + table + ("\n" + skipped if skipped else "")
    print(text)
    (out_dir / "results.md").write_text(text)
    report.write_csv(rows, out_dir / "results.csv")
    report.write_json(rows, notes, meta, out_dir / "results.json")
    pngs = plots.plot_all(rows, out_dir, title)
    print(
        f"bench: {len(rows)} rows in {elapsed:.0f} s; wrote results.md, results.csv, results.json"
        f"{', ' if pngs else ''}{', '.join(p.name for p in pngs)} to {out_dir}",
        file=sys.stderr,
    )
    return 0
