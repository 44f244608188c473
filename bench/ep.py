"""Expert-parallel benchmark: all-to-all time vs expert compute time per rank.

Spawns ``--world`` processes (NCCL, one GPU each, when there are enough GPUs; gloo on CPU otherwise), runs the
expert-parallel MoE MLP forward in its three stages and prints, per rank, the median over ``--iters``
iterations (after ``--warmup``) of:

- dispatch: routing plan, gather, count exchange (the one host sync) and the token all-to-all;
- experts: ``moe_mlp`` of the local experts on the received rows;
- combine: the result all-to-all and the weighted sum;
- a2a share: (dispatch + combine) / total.

Usage: ``python -m bench.ep --world 2`` (or ``python -m bench --ep 2``).
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .library import DROPLESS_IMPLS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ep", description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2, help="processes (ranks) in the expert-parallel group")
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=128, help="d")
    p.add_argument("--ffn", type=int, default=256, help="f, the expert width")
    p.add_argument("--experts", type=int, default=8, help="E over all ranks (divisible by --world)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--glu", action="store_true", help="GLU experts (w3)")
    p.add_argument("--skew", type=float, default=0.0, help="router logit bias towards rank 0's experts (0 = uniform)")
    p.add_argument("--impl", default="auto", choices=DROPLESS_IMPLS, help="moe_mlp impl for the local experts")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"), help="default: bf16 on GPU")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backend", default=None, choices=("gloo", "nccl"), help="default: nccl with enough GPUs")
    args = p.parse_args(argv)
    for name in ("world", "tokens", "hidden", "ffn", "experts"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.experts % args.world:
        p.error(f"--experts must be divisible by --world, got {args.experts} and {args.world}")
    if not 1 <= args.top_k <= args.experts:
        p.error(f"--top-k must be in [1, {args.experts}], got {args.top_k}")
    if not math.isfinite(args.skew):
        p.error(f"--skew must be a finite number, got {args.skew}")
    if args.iters < 1 or args.warmup < 0:
        p.error(f"--iters must be >= 1 and --warmup >= 0, got {args.iters} and {args.warmup}")
    if args.backend is None:
        args.backend = "nccl" if torch.cuda.device_count() >= args.world else "gloo"
    if args.backend == "nccl" and torch.cuda.device_count() < args.world:
        p.error(f"--backend nccl needs {args.world} GPUs, found {torch.cuda.device_count()}")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.backend == "nccl" else "float32"
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, args: argparse.Namespace, port: int, queue) -> None:
    from blocksparse_moe.parallel.expert_parallel import ep_combine, ep_dispatch, ep_local_experts

    if args.backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        sync = torch.cuda.synchronize
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world))

        def sync() -> None:
            pass

    dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world)
    try:
        g = torch.Generator(device).manual_seed(rank)
        dtype = getattr(torch, args.dtype)
        E, E_l, T, d, f = args.experts, args.experts // args.world, args.tokens, args.hidden, args.ffn
        x = torch.randn(T, d, device=device, dtype=dtype, generator=g)
        logits = torch.randn(T, E, device=device, generator=g)
        logits[:, :E_l] += args.skew
        top_k_weights, top_k_index = logits.softmax(1).topk(args.top_k, dim=1)
        top_k_weights = top_k_weights.to(dtype)
        w1 = torch.randn(E_l, d, f, device=device, dtype=dtype, generator=g) / d**0.5
        w2 = torch.randn(E_l, f, d, device=device, dtype=dtype, generator=g) / f**0.5
        w3 = torch.randn(E_l, d, f, device=device, dtype=dtype, generator=g) / d**0.5 if args.glu else None

        times: dict[str, list[float]] = {"dispatch": [], "experts": [], "combine": []}
        rows = 0
        with torch.no_grad():
            for it in range(args.warmup + args.iters):
                dist.barrier()
                sync()
                t0 = time.perf_counter()
                sent = ep_dispatch(x, top_k_index, group=None, num_experts=E)
                sync()
                t1 = time.perf_counter()
                y = ep_local_experts(sent, w1, w2, w3, activation="silu" if args.glu else "gelu", impl=args.impl)
                sync()
                t2 = time.perf_counter()
                ep_combine(y, top_k_weights, sent)
                sync()
                t3 = time.perf_counter()
                if it >= args.warmup:
                    for name, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                        times[name].append(dt * 1e3)
                rows = sent.tokens.shape[0]
        queue.put((rank, T * args.top_k, rows, {name: statistics.median(v) for name, v in times.items()}))
    finally:
        dist.destroy_process_group()


def format_table(results: list[tuple[int, int, int, dict[str, float]]]) -> str:
    lines = [
        "| rank | rows sent | rows received | dispatch ms | experts ms | combine ms | total ms | a2a share |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rank, sent, received, ms in sorted(results):
        total = sum(ms.values())
        share = (ms["dispatch"] + ms["combine"]) / total if total else 0.0
        lines.append(
            f"| {rank} | {sent} | {received} | {ms['dispatch']:.3f} | {ms['experts']:.3f} | {ms['combine']:.3f} "
            f"| {total:.3f} | {share:.0%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark; prints and returns the markdown table."""
    args = parse_args(argv)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(args, _free_port(), queue), nprocs=args.world, join=True, start_method="spawn")
    results = [queue.get() for _ in range(args.world)]
    device = torch.cuda.get_device_name(0) if args.backend == "nccl" else f"CPU ({os.cpu_count()} cores)"
    header = (
        f"Expert parallelism, forward: world={args.world} ({args.backend}, {device}), {args.tokens} tokens/rank, "
        f"d={args.hidden}, f={args.ffn}, E={args.experts}, k={args.top_k}, glu={args.glu}, skew={args.skew}, "
        f"{args.dtype}, impl={args.impl}; median of {args.iters} iterations after {args.warmup} warm-up"
    )
    table = header + "\n\n" + format_table(results)
    print(table)
    return table


if __name__ == "__main__":
    main()
