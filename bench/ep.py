"""Expert-parallel benchmark: exchange time, expert compute time and the overlapped step time per chunk count.

Spawns ``--world`` processes (NCCL, one GPU each, when there are enough GPUs; gloo on CPU otherwise) and times the
expert-parallel MoE MLP forward (``parallel.ep_pipeline``) for each chunk count of ``--chunks``; per rank, the
median over ``--iters`` iterations (after ``--warmup``) of:

- exchange: the pipeline with identity experts (routing, gathers, the count exchange, both all-to-alls, the
  weighted sum): everything but the expert compute;
- experts: ``moe_mlp`` of the local experts on the received rows of every chunk, alone (rows already there);
- step: the pipelined forward (chunk i's experts run while the later chunks' rows travel);
- hidden: exchange + experts - step, the time the pipeline overlapped.

Usage: ``python -m bench.ep --world 2 --chunks 1,2,4`` (or ``python -m bench --ep 2 ...``).
"""

from __future__ import annotations

import argparse
import dataclasses
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
    p.add_argument("--chunks", default="1,2,4", help="comma-separated chunk counts to time (pipelined token chunks)")
    p.add_argument("--capacity-per-rank", type=int, default=None, help="the sync-free mode's bound (default: exact)")
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
    try:
        args.chunks = [int(c) for c in args.chunks.split(",")]
    except ValueError:
        args.chunks = []
    if not args.chunks or min(args.chunks) < 1:
        p.error(f"--chunks must be comma-separated positive integers, got {','.join(map(str, args.chunks))!r}")
    if args.capacity_per_rank is not None and args.capacity_per_rank < 0:
        p.error(f"--capacity-per-rank must be a non-negative integer, got {args.capacity_per_rank}")
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
    from blocksparse_moe.parallel.expert_parallel import ep_dispatch_chunks, ep_local_experts, ep_pipeline

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
        options = dict(activation="silu" if args.glu else "gelu", impl=args.impl)
        route = dict(group=None, num_experts=E, capacity_per_rank=args.capacity_per_rank)

        def experts(sent):
            return ep_local_experts(sent, w1, w2, w3, **options)

        def identity(sent):
            return sent.tokens

        results = []
        with torch.no_grad():
            for n in args.chunks:
                # the rows of each chunk, received in full beforehand: compute alone
                arrived = [
                    dataclasses.replace(sent, tokens=sent.tokens.clone())
                    for sent in ep_dispatch_chunks(x, top_k_index, num_chunks=n, **route)
                ]
                stages = {
                    "exchange": lambda n=n: ep_pipeline(x, top_k_index, top_k_weights, identity, num_chunks=n, **route),
                    "experts": lambda arrived=arrived: [experts(sent) for sent in arrived],
                    "step": lambda n=n: ep_pipeline(x, top_k_index, top_k_weights, experts, num_chunks=n, **route),
                }
                times: dict[str, list[float]] = {name: [] for name in stages}
                for it in range(args.warmup + args.iters):
                    for name, stage in stages.items():
                        dist.barrier()
                        sync()
                        t0 = time.perf_counter()
                        stage()
                        sync()
                        if it >= args.warmup:
                            times[name].append((time.perf_counter() - t0) * 1e3)
                rows = sum(sent.tokens.shape[0] for sent in arrived)
                results.append((n, rank, rows, {name: statistics.median(v) for name, v in times.items()}))
        queue.put(results)
    finally:
        dist.destroy_process_group()


def format_table(results: list[tuple[int, int, int, dict[str, float]]]) -> str:
    lines = [
        "| chunks | rank | rows received | exchange ms | experts ms | step ms | hidden ms |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for chunks, rank, received, ms in sorted(results):
        hidden = ms["exchange"] + ms["experts"] - ms["step"]
        lines.append(
            f"| {chunks} | {rank} | {received} | {ms['exchange']:.3f} | {ms['experts']:.3f} | {ms['step']:.3f} "
            f"| {hidden:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark; prints and returns the markdown table."""
    args = parse_args(argv)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(args, _free_port(), queue), nprocs=args.world, join=True, start_method="spawn")
    results = [row for _ in range(args.world) for row in queue.get()]
    if args.backend == "nccl":
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU figures: {args.world} processes on {os.cpu_count()} cores, not GPU numbers"
    header = (
        f"Expert parallelism, forward: world={args.world} ({args.backend}; {device}), {args.tokens} tokens/rank, "
        f"d={args.hidden}, f={args.ffn}, E={args.experts}, k={args.top_k}, glu={args.glu}, skew={args.skew}, "
        f"{args.dtype}, impl={args.impl}, capacity_per_rank={args.capacity_per_rank}; median of {args.iters} "
        f"iterations after {args.warmup} warm-up"
    )
    table = header + "\n\n" + format_table(results)
    print(table)
    return table


if __name__ == "__main__":
    main()
