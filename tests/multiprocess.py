"""Running a test function on W gloo (or NCCL) processes: a free port per run, a timeout on every collective and on
the whole run, no sleeps.

``spawn(world, fn, *args)`` runs ``fn(rank, world, *args)`` on ``world`` processes (``torch.multiprocessing``)
with the default process group initialised; an exception on any rank fails the test with that rank's traceback.
Workers run the ``torch`` backend of ``moe_mlp`` on CPU (the kernels have their own tests; what these tests check
is the transport and the parallel layout).
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 120  # a rank waiting this long on a peer fails instead of hanging
RUN_TIMEOUT_S = 600  # the whole run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, backend: str, fn, args: tuple) -> None:
    os.environ["BSM_BACKEND"] = "torch" if backend == "gloo" else "auto"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)  # W processes share the machine's cores
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    try:
        fn(rank, world, *args)
        dist.barrier()  # no rank tears gloo down while a peer's collective is still in flight
    finally:
        dist.destroy_process_group()


def spawn(world: int, fn, *args, backend: str = "gloo", timeout_s: float = RUN_TIMEOUT_S) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` processes; raise the first rank's error, or ``TimeoutError``
    (after terminating the processes) when the run takes longer than ``timeout_s``."""
    context = mp.spawn(_entry, args=(world, free_port(), backend, fn, args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(deadline - time.monotonic(), 0)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            raise TimeoutError(f"{fn.__name__} on {world} processes did not finish within {timeout_s} s")
