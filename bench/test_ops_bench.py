"""pytest-benchmark suite over the individual ops and the ``moe_mlp`` strategies, for regression tracking.

Not part of the default test run (``tests/``). Run: ``python -m pytest bench/test_ops_bench.py --benchmark-only -q``
(compare runs with ``--benchmark-autosave`` / ``--benchmark-compare``). Small shapes: on CPU the PyTorch backends
run (no ``TRITON_INTERPRET``), on CUDA the Triton kernels.
"""

from __future__ import annotations

import pytest
import torch

from blocksparse_moe.functional import moe_mlp
from blocksparse_moe.ops.blocksparse import dsd, sdd
from blocksparse_moe.ops.grouped import grouped_mm
from blocksparse_moe.ops.permute import gather_rows, scatter_rows
from blocksparse_moe.routing import plan_routing

T, D, F, E, K = 256, 128, 256, 8, 2
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
BLOCK = 128 if DEVICE.type == "cuda" else 64


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def case():
    g = torch.Generator().manual_seed(0)
    opts = dict(device=DEVICE, dtype=DTYPE)
    index = torch.rand(T, E, generator=g).topk(K, dim=1).indices.to(device=DEVICE, dtype=torch.int32)
    c = dict(
        x=torch.randn(T, D, generator=g).to(**opts),
        index=index,
        weights=torch.softmax(torch.randn(T, K, generator=g), 1).to(**opts),
        w1=(torch.randn(E, D, F, generator=g) * D**-0.5).to(**opts),
        w2=(torch.randn(E, F, D, generator=g) * F**-0.5).to(**opts),
        w3=(torch.randn(E, D, F, generator=g) * D**-0.5).to(**opts),
        plan=plan_routing(index, E, block_size=BLOCK),
        plan1=plan_routing(index, E, block_size=1),
    )
    p = c["plan"]
    c["xs"] = gather_rows(c["x"], p.padded_row_assignment, p.padded_assignment_row)
    c["h"] = sdd(c["xs"], c["w1"], p.topology(F))
    return c


def _bench(benchmark, fn):
    def run():
        out = fn()
        _sync()
        return out

    run()  # warm-up (Triton compile / autotune) is not measured
    benchmark(run)


def test_gather_rows(benchmark, case):
    p = case["plan"]
    _bench(benchmark, lambda: gather_rows(case["x"], p.padded_row_assignment, p.padded_assignment_row))


def test_scatter_rows(benchmark, case):
    p = case["plan"]
    _bench(
        benchmark, lambda: scatter_rows(case["xs"], p.padded_row_assignment, p.padded_assignment_row, case["weights"])
    )


def test_grouped_mm_fused_gather(benchmark, case):
    p = case["plan1"]
    _bench(benchmark, lambda: grouped_mm(case["x"], case["w1"], p.offsets, p.row_assignment, p.assignment_row))


def test_sdd(benchmark, case):
    _bench(benchmark, lambda: sdd(case["xs"], case["w1"], case["plan"].topology(F)))


def test_dsd(benchmark, case):
    _bench(benchmark, lambda: dsd(case["h"], case["plan"].topology(F), case["w2"]))


@pytest.mark.parametrize("impl", ["blocksparse", "grouped", "padded", "reference"])
def test_moe_mlp_forward(benchmark, case, impl):
    kw = dict(block_size=BLOCK) if impl == "blocksparse" else {}
    c = case
    _bench(
        benchmark,
        lambda: moe_mlp(
            c["x"], c["index"], c["weights"], c["w1"], c["w2"], c["w3"], activation="silu", impl=impl, **kw
        ),
    )


@pytest.mark.parametrize("impl", ["blocksparse", "grouped", "padded"])
def test_moe_mlp_forward_backward(benchmark, case, impl):
    kw = dict(block_size=BLOCK) if impl == "blocksparse" else {}
    c = case
    leaves = [c[n].detach().requires_grad_() for n in ("x", "weights", "w1", "w2", "w3")]
    x, weights, w1, w2, w3 = leaves
    grad = torch.randn_like(c["x"])

    def step():
        out = moe_mlp(x, c["index"], weights, w1, w2, w3, activation="silu", impl=impl, **kw)
        return torch.autograd.grad(out, leaves, grad)

    _bench(benchmark, step)
