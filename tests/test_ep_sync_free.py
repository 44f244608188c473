"""Expert parallelism's sync-free mode (``capacity_per_rank``): exchange buffers sized from shapes, no host read,
exactly the default mode within the bound, GShard's drop past it (counted), ``torch.compile(fullgraph=True)``.
2 gloo processes on CPU against one process holding every expert."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.distributed as dist
from helpers import routing
from multiprocess import spawn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from blocksparse_moe.backends import torch as torch_backend
from blocksparse_moe.functional import moe_mlp
from blocksparse_moe.layers.moe import PaddedMoE, dMoE
from blocksparse_moe.ops import _checks as op_checks
from blocksparse_moe.parallel import expert_parallel, expert_parallel_moe_mlp

FP32 = dict(atol=1e-4, rtol=1e-4)
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def _no_host_reads():
    """Every Python-level way to read a tensor's data on the host raises inside the block. The local experts take
    their GPU path: the CPU-only shortcuts that read index data on the host (free on CPU, never taken on CUDA or
    under compile) are turned off."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    cpu_only = [(torch_backend, "host_loop_ok"), (op_checks, "_readable")]
    saved_cpu_only = [getattr(module, name) for module, name in cpu_only]
    for module, name in cpu_only:
        setattr(module, name, lambda t: False)

    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"host read: Tensor.{name}")

        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
        for (module, name), fn in zip(cpu_only, saved_cpu_only):
            setattr(module, name, fn)


def _kept(idx: torch.Tensor, experts_per_rank: int, capacity: int) -> torch.Tensor:
    """[T, k] bool: the assignments the bounded exchange keeps, by its documented policy: per destination rank,
    the first ``capacity`` of this rank's assignments in (expert id, token, choice) order."""
    keep = torch.zeros(idx.shape, dtype=torch.bool)
    order = sorted(((int(e), a) for a, e in enumerate(idx.flatten().tolist())), key=lambda p: p)
    taken: dict[int, int] = {}
    for e, a in order:
        rank = e // experts_per_rank
        if taken.get(rank, 0) < capacity:
            keep.view(-1)[a] = True
            taken[rank] = taken.get(rank, 0) + 1
    return keep


def _check_functional(rank: int, world: int) -> None:
    g = torch.Generator().manual_seed(0)
    E_l, d, f, k = 2, 9, 7, 2
    E = E_l * world
    counts = [5, 0, 3, 1][:world] if world > 2 else [7, 4]
    T = sum(counts)
    x, weights = torch.randn(T, d, generator=g), torch.rand(T, k, generator=g)
    ws = [torch.randn(E, *shape, generator=g) / 3 for shape in ((d, f), (f, d), (d, f))]
    mine = slice(rank * E_l, (rank + 1) * E_l)
    lo, hi = sum(counts[:rank]), sum(counts[: rank + 1])
    for kind, capacity in (
        ("uniform", max(counts) * k),  # within the bound: equal to one process (never drops)
        ("one-hot", max(counts) * k),  # all tokens to one expert (one rank receives every row), still in bound
        ("one-hot", 2),  # over the bound: rows past 2 per destination are dropped
        ("uniform", 0),  # capacity 0: everything is dropped, the output is zero
    ):
        idx = routing(T, k, E, kind, generator=g)
        keep = _kept(idx[lo:hi], E_l, capacity)
        single = moe_mlp(
            x,
            idx,
            weights * torch.cat([_kept(idx[a:b], E_l, capacity) for a, b in _ranges(counts)]),
            *ws,
            activation="silu",
        )
        leaves = [t.clone().requires_grad_() for t in (x[lo:hi], weights[lo:hi], *(w[mine] for w in ws))]
        out = expert_parallel_moe_mlp(
            leaves[0],
            idx[lo:hi],
            leaves[1],
            *leaves[2:],
            group=None,
            num_experts=E,
            activation="silu",
            capacity_per_rank=capacity,
        )
        torch.testing.assert_close(out, single[lo:hi], **FP32, msg=lambda m, c=capacity, r=kind: f"{r} C={c}: {m}")
        out.sum().backward()
        assert torch.all(leaves[1].grad[~keep] == 0)  # dropped choices: no weight gradient
        if capacity == 0:
            assert torch.all(out == 0)


def _ranges(counts: list[int]) -> list[tuple[int, int]]:
    return [(sum(counts[:r]), sum(counts[: r + 1])) for r in range(len(counts))]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _check_layer(rank: int, world: int) -> None:
    # the layer on a mesh (dMoE, PaddedMoE): several AdamW steps of the sync-free mode within its bound, of
    # pipelined chunks, and of both, equal to the default mode; no host read in forward and backward; the counter
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    d, T = 8, 6
    for make in (lambda: dMoE(d, 6, 2 * world, top_k=2), lambda: PaddedMoE(d, 6, 2 * world, capacity_factor=1.0)):
        torch.manual_seed(0)
        full = make()
        exact = expert_parallel(copy.deepcopy(full), mesh)
        variants = [
            expert_parallel(copy.deepcopy(full), mesh, capacity_per_rank=T * 2),  # sync-free, within the bound
            expert_parallel(copy.deepcopy(full), mesh, num_chunks=4),  # pipelined chunks of 1, 1, 2, 2 tokens
            expert_parallel(copy.deepcopy(full), mesh, capacity_per_rank=4, num_chunks=3),  # both: 2 tokens a chunk
        ]
        models = [exact, *variants]
        opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
        g = torch.Generator().manual_seed(rank)
        for _ in range(3):
            x = torch.randn(T, d, generator=g)
            losses = []
            for model, opt in zip(models, opts):
                y, aux = model(x)
                loss = (y**2).mean() + aux
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.detach())
            for loss in losses[1:]:
                torch.testing.assert_close(loss, losses[0], **FP32)
        for model in variants:
            assert model.experts.dropped_assignments.item() == 0
            for (name, a), b in zip(exact.named_parameters(), model.parameters()):
                torch.testing.assert_close(_full(b), _full(a), **FP32, msg=lambda m, n=name: f"{n}: {m}")

    # no host read in the bounded experts' forward and backward (ids unchecked, as on CUDA by default)
    torch.manual_seed(0)
    layer = expert_parallel(dMoE(d, 6, 2 * world, top_k=2), mesh, capacity_per_rank=3)
    x = torch.randn(T, d, requires_grad=True)
    _, weights, idx = layer.router(x)
    with _no_host_reads():
        out = layer.experts(x, idx, weights, check=False)
        out.sum().backward()
        dropped = layer.experts.dropped_assignments
    # the default mode reads its split sizes on the host: the guard sees it
    exact = expert_parallel(dMoE(d, 6, 2 * world, top_k=2), mesh)
    with pytest.raises(AssertionError, match="host read: Tensor.tolist"), _no_host_reads():
        exact.experts(x, idx, weights, check=False)
    exact.experts(x, idx, weights)  # the peers' pending exchange completes
    # the counter: this rank's assignments over 3 per destination rank
    assert dropped.item() == (~_kept(idx, 2, 3)).sum().item()

    # errors
    untouched = dMoE(d, 6, 2 * world)
    with pytest.raises(ValueError, match="capacity_per_rank must be a non-negative int, got -1"):
        expert_parallel(untouched, mesh, capacity_per_rank=-1)
    with pytest.raises(ValueError, match="num_chunks must be a positive int, got 0"):
        expert_parallel(untouched, mesh, num_chunks=0)
    assert type(untouched.experts.w1) is torch.nn.Parameter and untouched.experts.w1.shape[0] == 2 * world  # as built


def _check_shared_overlap(rank: int, world: int) -> None:
    # the shared expert runs once per forward, inside the experts' forward (while the dispatch is in flight), and
    # the layer's output and gradients equal the single-process layer's, in both exchange modes and with chunks
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    torch.manual_seed(0)
    full = dMoE(8, 6, 2 * world, top_k=2, shared_expert_size=5)
    x = torch.randn(5 + rank, 8)
    for kw in (dict(), dict(capacity_per_rank=10, num_chunks=2)):
        layer = expert_parallel(copy.deepcopy(full), mesh, **kw)
        calls, inside = [], []  # shared-expert calls; shared-expert calls done when the experts' forward returned
        layer.shared_expert.up.register_forward_hook(lambda m, a, o, calls=calls: calls.append(1))
        layer.experts.register_forward_hook(lambda m, a, o, calls=calls, inside=inside: inside.append(len(calls)))
        leaf, ref_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, _ = layer(leaf)
        assert len(calls) == 1 and inside == [1], (calls, inside)  # computed once, before the experts returned
        y_ref, _ = full(ref_leaf)
        torch.testing.assert_close(y, y_ref, **FP32)
        y.sum().backward()
        y_ref.sum().backward()
        torch.testing.assert_close(leaf.grad, ref_leaf.grad, **FP32)
        for name in ("up", "gate", "down"):  # replicated, and both layers saw this rank's tokens only
            got, want = (getattr(m.shared_expert, name).weight.grad for m in (layer, full))
            torch.testing.assert_close(got, want, **FP32)
        full.zero_grad()


def _check_compile(rank: int, world: int) -> None:
    # the bounded experts' forward and backward under torch.compile(fullgraph=True) (inductor), equal to eager: the
    # exchange is functional collectives, captured whole with the experts
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    torch.manual_seed(0)
    layer = expert_parallel(dMoE(8, 6, 2 * world, top_k=2), mesh, capacity_per_rank=12)
    x = torch.randn(6, 8)
    _, weights, idx = layer.router(x)
    weights = weights.detach()
    results = []
    for fn in (layer.experts, torch.compile(layer.experts, fullgraph=True)):
        leaf = x.clone().requires_grad_()
        out = fn(leaf, idx, weights, check=False)
        out.sum().backward()
        results.append((out.detach(), leaf.grad, layer.experts.w1.grad.to_local().clone()))
        layer.zero_grad()
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, **FP32)
    dist.barrier()


def _check_all(rank: int, world: int) -> None:
    _check_functional(rank, world)
    _check_layer(rank, world)
    _check_shared_overlap(rank, world)


def test_sync_free_mode():
    spawn(2, _check_all)


def test_sync_free_mode_compiles_fullgraph():
    spawn(2, _check_compile)
