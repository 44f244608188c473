"""``python -m bench.model``: print the whole-layer roofline (see ``bench.model``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from blocksparse_moe.fp8 import RECIPES

from . import BASELINE, IMPLS, OURS, Estimate, estimate, fp8_launches, padding_ratio, speedup_vs_baseline
from .roofline import CALIBRATION, EFFICIENCY_MODEL, FP8_MODEL, GPUS, QUANTIZE_KERNELS, SHAPES, eager_time


def _mb(n: float) -> str:
    return f"{n / 1e6:9.1f}"


def report(est: Estimate) -> str:
    """The launch table, the eager ops, the summary and the closing line."""
    s, gpu = est.shape, est.gpu
    fp8 = f", FP8 {est.fp8} GEMMs" if est.fp8 else ""
    lines = [
        f"bench.model: {s.name} (T={s.tokens}, d={s.hidden}, f={s.ffn}, E={s.experts}, k={s.top_k}; bf16 SwiGLU"
        f"{fp8}, forward + backward), impl={est.impl}, {gpu.label} (sm_{gpu.capability[0]}{gpu.capability[1]}, "
        f"{gpu.sms} SMs)",
        f"GPU numbers: {gpu.source}",
        EFFICIENCY_MODEL,
        CALIBRATION,
        *([FP8_MODEL] if est.fp8 else []),
        "",
        f"{'#':>2} {'phase':8} {'kernel':19} {'tile':>10} {'w/st':>5} {'grid':>8} {'CTA/SM':>6} "
        f"{'work/zero/idle CTAs':>21} {'exec GF':>9} {'useful GF':>9} {'HBM MB':>9} {'L2 MB':>9} {'F/L2B':>6} "
        f"{'eff':>5} {'bound':>5} {'us':>9}",
    ]
    for i, (launch, c) in enumerate(est.launches):
        a = launch.args
        ws = f"{a.get('num_warps', '-')}/{a.get('num_stages', '-')}"
        ctas = f"{c.work_ctas}/{c.zero_ctas}/{c.idle_ctas}"
        grid = launch.ctas if launch.grid else "-"  # a library GEMM: its tiles are the model's assumption
        lines.append(
            f"{i:>2} {launch.phase:8} {launch.kernel:19} {c.tile:>10} {ws:>5} {grid:>8} {c.ctas_per_sm:>6} "
            f"{ctas:>21} {c.executed_flops / 1e9:9.1f} {c.useful_flops / 1e9:9.1f} {_mb(c.hbm_bytes)} "
            f"{_mb(c.l2_bytes)} {c.intensity:6.1f} {c.efficiency:5.2f} {c.bound:>5} {c.seconds * 1e6:9.1f}"
        )
    kernels = est.eager_kernels
    lines += ["", f"eager ops ({len(kernels)} kernels):"]
    groups: dict[tuple[str, str, str], list] = {}
    for op in kernels:
        groups.setdefault((op.phase, op.op or "front door", op.name), []).append(op)
    for (phase, where, name), ops in groups.items():
        t = sum(eager_time(op, gpu) for op in ops)
        lines.append(f"   {phase:8} {where:28} {name:32} x{len(ops):<3} {_mb(sum(o.bytes for o in ops))} MB "
                     f"{t * 1e6:8.1f} us")  # fmt: skip
    if est.routing_ops:
        lines.append(f"   not costed: the routing's PyTorch implementation ({len(est.routing_ops)} kernels), which "
                     "builds the plan on meta tensors here (routing::* above: the extension that builds it on "
                     "CUDA)")  # fmt: skip
    gemms = [(la, c) for la, c in est.launches if c.executed_flops]
    work = sum(c.work_ctas for _, c in gemms)
    zero = sum(c.zero_ctas for _, c in gemms)
    idle = sum(c.idle_ctas for _, c in gemms)
    fp32 = [op for op in est.eager if op.out_dtype is not None and op.out_dtype.is_floating_point
            and op.out_dtype.itemsize == 4 and op.out_bytes]  # fmt: skip
    gemm_s = sum(c.seconds for _, c in gemms)
    routing = [c for la, c in est.launches if la.kernel.startswith("routing::")]
    quantize = [c for la, c in est.launches if la.kernel in QUANTIZE_KERNELS]
    permutes = [c for la, c in est.launches if not c.executed_flops and not la.kernel.startswith("routing::")
                and la.kernel not in QUANTIZE_KERNELS]  # fmt: skip
    eager_s = sum(eager_time(op, gpu) for op in kernels)
    phases = Counter(la.phase for la, _ in gemms)
    quantized = f"{len(quantize)} quantize {sum(c.seconds for c in quantize) * 1e3:.3f} ms; " if quantize else ""
    lines += [
        "",
        "summary:",
        f"  launches: {len(gemms)} GEMM ({phases['forward']} forward, {phases['backward']} backward) "
        f"{gemm_s * 1e3:.3f} ms; {quantized}{len(permutes)} permute {sum(c.seconds for c in permutes) * 1e3:.3f} ms; "
        f"{len(routing)} routing {sum(c.seconds for c in routing) * 1e3:.3f} ms; {len(kernels)} eager ops "
        f"{eager_s * 1e3:.3f} ms; forward {est.phase_seconds('forward') * 1e3:.3f} ms, backward "
        f"{est.phase_seconds('backward') * 1e3:.3f} ms",
        f"  FLOPs: executed {est.executed_flops / 1e12:.2f} TFLOP, useful {est.useful_flops / 1e12:.2f} TFLOP "
        f"(analytic 18*T*k*d*f = {s.useful_flops() / 1e12:.2f}), executed/useful "
        f"{est.executed_flops / max(est.useful_flops, 1):.2f}",
        f"  GEMM CTAs: {work + zero + idle} launched, {work} with MMA work, {zero} writing zeros only, "
        f"{idle} exiting at once",
        f"  fp32 temporaries: {len(fp32)}, {sum(op.out_bytes for op in fp32) / 1e6:.1f} MB "
        + ", ".join(sorted({f"{op.name} ({op.op or 'front door'})" for op in fp32})),
        f"  block-sparse rows (the sync-free bound) / assignments = {padding_ratio(s):.2f}; impl='auto' runs grouped",
    ]
    if est.fp8:
        bf16 = estimate(s, est.impl, gpu, dtype=est.dtype)
        lines.append(f"  FP8 {est.fp8}: {len(fp8_launches([la for la, _ in est.launches]))} of {len(gemms)} GEMMs on "
                     f"E4M3 operands; the same layer unquantized ({bf16.seconds * 1e3:.3f} ms, "
                     f"{bf16.dense_pct:.1f}% of dense): speedup {bf16.seconds / est.seconds:.2f}x")  # fmt: skip
    if est.impl in OURS:
        base = estimate(s, BASELINE, gpu, dtype=est.dtype)
        lines.append(f"  vs the torch._grouped_mm baseline ({BASELINE}: {base.seconds * 1e3:.3f} ms): "
                     f"speedup {speedup_vs_baseline(est):.2f}x (target >= 1.3x)")  # fmt: skip
    lines.append(est.closing_line())
    return "\n".join(lines)


def to_json(est: Estimate) -> dict:
    return {
        "shape": est.shape.name,
        "tokens": est.shape.tokens,
        "impl": est.impl,
        "fp8": est.fp8,
        "gpu": est.gpu.name,
        "seconds": est.seconds,
        "forward_seconds": est.phase_seconds("forward"),
        "tflops": est.tflops,
        "dense_pct": est.dense_pct,
        "useful_flops": est.useful_flops,
        "executed_flops": est.executed_flops,
        "analytic_flops": est.shape.useful_flops(),
        "speedup_vs_baseline": speedup_vs_baseline(est) if est.impl in OURS else None,
        "launches": [
            {
                "kernel": la.kernel,
                "phase": la.phase,
                "op": la.op,
                "grid": list(la.grid),
                "tile": c.tile,
                "executed_flops": c.executed_flops,
                "useful_flops": c.useful_flops,
                "hbm_bytes": c.hbm_bytes,
                "l2_bytes": c.l2_bytes,
                "ctas_per_sm": c.ctas_per_sm,
                "work_ctas": c.work_ctas,
                "zero_ctas": c.zero_ctas,
                "idle_ctas": c.idle_ctas,
                "seconds": c.seconds,
            }
            for la, c in est.launches
        ],
        "eager_ops": [op.name for op in est.eager_kernels],
        "routing_torch_ops": [op.name for op in est.routing_ops],
    }


def _choices(value: str, allowed, what: str) -> list[str]:
    names = list(allowed) if value == "all" else value.split(",")
    bad = [n for n in names if n not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"{what} must be among {tuple(allowed)} or 'all', got {bad}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__)
    parser.add_argument("--shape", default="mixtral", help=f"{tuple(SHAPES)}, comma-separated, or all")
    parser.add_argument("--impl", default="blocksparse", help=f"{IMPLS}, comma-separated, or all")
    parser.add_argument("--gpu", default="h200", help=f"{tuple(GPUS)}, comma-separated, or all")
    parser.add_argument("--tokens", type=int, default=None, help="override the shape's T (a sweep point)")
    parser.add_argument("--fp8", default=None, help=f"the FP8 recipe of moe_mlp: {RECIPES}, comma-separated, or all "
                        "(our strategies only; the header states the FP8 model)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="write every estimate's launches and totals here")
    parser.add_argument("--quiet", action="store_true", help="print the closing lines only")
    args = parser.parse_args(argv)
    try:
        shapes = _choices(args.shape, SHAPES, "--shape")
        impls = _choices(args.impl, IMPLS, "--impl")
        gpus = _choices(args.gpu, GPUS, "--gpu")
        recipes = [None] if args.fp8 is None else _choices(args.fp8, RECIPES, "--fp8")
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if args.tokens is not None and args.tokens < 1:
        parser.error(f"--tokens must be a positive int, got {args.tokens}")
    if args.fp8 is not None and BASELINE in impls:
        parser.error(f"--fp8 applies to --impl {','.join(OURS)} (the {BASELINE} baseline is bf16), got {args.impl}")
    results = []
    for shape in shapes:
        for impl in impls:
            for gpu in gpus:
                for fp8 in recipes:
                    try:
                        est = estimate(shape, impl, gpu, tokens=args.tokens, fp8=fp8)
                    except RuntimeError as exc:  # no FP8 kernels launched: no estimate to give
                        print(f"python -m bench.model: error: {exc}", file=sys.stderr)
                        return 1
                    print(est.closing_line() if args.quiet else report(est) + "\n")
                    results.append(to_json(est))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
