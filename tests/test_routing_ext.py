"""The compiled routing C++ (csrc/routing.h) against the PyTorch specification, element for element.

The host module (`_routing_host`, the same functors run by host loops) is checked here on every machine; the
CUDA module (`_routing_cuda`) by the `gpu` tests. Every output buffer is poisoned before the C++ runs, so an
element it fails to write shows up as a mismatch.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import poison_

from blocksparse_moe import _ext
from blocksparse_moe.routing import RoutingPlan, Topology, _plan_routing_torch, max_block_rows

host = pytest.importorskip("blocksparse_moe._routing_host", reason="host routing extension not built")


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Make _ext allocate poisoned (not merely uninitialized) outputs."""
    allocate = _ext._allocate

    def poisoned(*args, **kwargs):
        out, nb = allocate(*args, **kwargs)
        for t in out.values():
            poison_(t)
        return out, nb

    monkeypatch.setattr(_ext, "_allocate", poisoned)


def assert_same_plan(actual: RoutingPlan, expected: RoutingPlan) -> None:
    """Every field equal: ints by value, tensors by dtype, shape and every element."""
    assert (actual.topology is None) == (expected.topology is None)
    pairs = [(actual, expected)]
    if expected.topology is not None:
        pairs.append((actual.topology, expected.topology))
    for a, e in pairs:
        for field in dataclasses.fields(e):
            x, y = getattr(a, field.name), getattr(e, field.name)
            if isinstance(y, Topology):
                continue
            if isinstance(y, torch.Tensor):
                assert x.dtype == y.dtype == torch.int32, field.name
                assert x.shape == y.shape, (field.name, x.shape, y.shape)
                assert torch.equal(x.cpu(), y.cpu()), f"{field.name}:\n{x}\nexpected\n{y}"
            else:
                assert x == y, field.name


def make_index(T: int, k: int, E: int, routing: str, dtype: torch.dtype) -> torch.Tensor:
    if routing == "one-hot":
        return torch.full((T, k), E // 2, dtype=dtype)
    if routing == "skip":  # even experts only: every odd expert is empty
        return torch.randint(0, max(E // 2, 1), (T, k), dtype=dtype) * 2
    if routing == "dup":  # the same expert for all k choices of a token
        return torch.randint(0, E, (T, 1), dtype=dtype).expand(T, k).contiguous()
    if routing == "distinct":  # k distinct experts per token (MoE top-k)
        return torch.rand(T, E).argsort(dim=1)[:, :k].to(dtype)
    return torch.randint(0, E, (T, k), dtype=dtype)


CASES = [
    # (T, k, E, B, F, routing)
    (0, 2, 4, 4, 4, "uniform"),  # T = 0: empty input, empty plan, zero-size topology
    (1, 1, 1, 4, 3, "uniform"),  # T = 1 token, E = 1, F < B
    (1, 3, 3, 2, 5, "distinct"),  # one token with k = E
    (7, 3, 3, 4, 5, "distinct"),  # k = E, odd sizes
    (13, 2, 5, 4, 9, "uniform"),  # E not a power of two, F not a multiple of B
    (16, 2, 8, 4, 8, "one-hot"),  # all tokens to one expert (all others empty)
    (9, 2, 6, 8, 4, "skip"),  # empty experts between used ones, F < B
    (33, 4, 4, 16, 17, "dup"),  # duplicate experts within a token, F = B + 1 (one partial column block)
    (11, 3, 7, 1, 3, "uniform"),  # B = 1: every padded row its own block row, no padding
    (5, 2, 3, 64, 64, "uniform"),  # B larger than all assignments: one block row per used expert
    (21, 2, 5, 4, None, "uniform"),  # no ffn_size: plan without topology
    (300, 2, 512, 16, 40, "distinct"),  # E = 512 > T: most experts empty
    (37, 5, 37, 8, 23, "uniform"),  # prime E, odd everything
]


@pytest.mark.parametrize("T,k,E,B,F,routing", CASES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_host_matches_torch(T, k, E, B, F, routing, dtype):
    idx = make_index(T, k, E, routing, dtype)
    before = idx.clone()
    plan = _ext.plan_routing_host(idx, E, B, F)
    assert torch.equal(idx, before)  # input not modified
    assert_same_plan(plan, _plan_routing_torch(idx, E, B, F))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_host_large(dtype):
    # T·k = 1e6 assignments onto E = 512 experts (one case): the counting sort stays stable and exact
    idx = torch.randint(0, 512, (250_000, 4), dtype=dtype)
    assert_same_plan(_ext.plan_routing_host(idx, 512, 128, 256), _plan_routing_torch(idx, 512, 128, 256))


def test_host_non_contiguous_index():
    # a transposed (non-contiguous) view of the ids: read in logical order, never modified
    base = torch.randint(0, 6, (3, 10), dtype=torch.int64)
    idx = base.t()
    plan = _ext.plan_routing_host(idx, 6, 4, 8)
    assert_same_plan(plan, _plan_routing_torch(idx, 6, 4, 8))


@pytest.mark.parametrize(
    "ids",
    [
        [[0, 7], [1, 0]],  # one id >= E
        [[-1, 2], [3, -5]],  # negative ids
        [[4, 4], [-1, 9]],  # every id invalid: empty plan with the invalid bin full
        [[2**32 + 1, 1], [-(2**33), 0]],  # int64 ids that truncate to valid int32 ids must stay invalid
    ],
)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_host_invalid_ids_counted_and_excluded(ids, dtype):
    if dtype == torch.int32 and any(abs(x) >= 2**31 for row in ids for x in row):
        pytest.skip("ids do not fit int32")
    idx = torch.tensor(ids, dtype=dtype)
    plan = _ext.plan_routing_host(idx, 4, 2, 3)
    assert_same_plan(plan, _plan_routing_torch(idx, 4, 2, 3))
    flat = idx.reshape(-1)
    invalid = ((flat < 0) | (flat >= 4)).sum()
    assert int(plan.invalid_count) == int(invalid)
    assert int(plan.tokens_per_expert.sum()) == flat.numel() - int(invalid)


def _host_args(**overrides):
    """Valid raw arguments of _routing_host.plan_routing for T=3, k=2, E=4, B=2, nb=2, with overrides."""
    idx = torch.tensor([[0, 1], [2, 3], [1, 1]], dtype=torch.int32)
    out, nb = _ext._allocate(idx, 4, 2, 3)
    args = dict(
        top_k_index=idx.data_ptr(),
        index_dtype="int32",
        num_tokens=3,
        top_k=2,
        num_experts=4,
        block_size=2,
        blocks_per_expert=nb,
        max_block_rows=max_block_rows(6, 4, 2),
        outputs={name: (t.data_ptr(), t.numel()) for name, t in out.items()},
    )
    outputs = overrides.pop("outputs", None)
    args.update(overrides)
    if outputs is not None:
        args["outputs"] = outputs(args["outputs"])
    return args, (idx, out)  # keep the buffers alive while the module writes them


def test_host_raw_arguments_valid():
    # the baseline of the error cases below runs and fills every buffer
    args, (_, out) = _host_args()
    host.plan_routing(**args)
    assert all((t != -(2**30)).all() for t in out.values())


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(index_dtype="int16"), r"index_dtype must be 'int32' or 'int64', got 'int16'"),
        (dict(num_tokens=-1), r"num_tokens must be in \[0, 2147483647\], got -1"),
        (dict(top_k=0), r"top_k must be in \[1, 2147483647\], got 0"),
        (dict(num_experts=0), r"num_experts must be in \[1, 2147483646\], got 0"),
        (dict(block_size=0), r"block_size must be in \[1, 2147483647\], got 0"),
        (dict(blocks_per_expert=-1), r"blocks_per_expert must be in \[0, 2147483647\], got -1"),
        (dict(num_tokens=2**30, top_k=2), r"num_tokens \* top_k must be at most 2\*\*31 - 2.*got 2147483648"),
        (dict(max_block_rows=7), r"max_block_rows must be .* = 5 for A=6, E=4, B=2, got 7"),
        (dict(top_k_index=0), r"top_k_index must be a non-null pointer aligned to 4 bytes, got 0"),
        (dict(outputs=lambda o: {n: v for n, v in o.items() if n != "inverse"}), r"outputs is missing 'inverse'"),
        (dict(outputs=lambda o: {**o, "bogus": (o["counts"][0], 1)}), r"unknown output 'bogus'; expected exactly"),
        (dict(outputs=lambda o: {**o, "offsets": (o["offsets"][0], 4)}), r"'offsets' must have 5 int32 .*got 4"),
        (dict(outputs=lambda o: {**o, "inverse": (0, 6)}), r"'inverse' must be a non-null pointer .*got 0"),
        (dict(outputs=lambda o: {**o, "inverse": (o["inverse"][0] + 2, 6)}), r"aligned to 4 bytes"),
        # blocks_per_expert = 0 means no topology: topology buffers are then unexpected
        (dict(blocks_per_expert=0), r"unknown output 'block_offsets_t'"),
        # R·nb must fit int32
        (dict(blocks_per_expert=2**30), r"max_block_rows \* blocks_per_expert .* must fit int32"),
    ],
)
def test_host_bad_arguments(overrides, match):
    args, _keep = _host_args(**overrides)
    with pytest.raises(ValueError, match=match):
        host.plan_routing(**args)


def test_host_bad_argument_types():
    # a wrong Python type is a TypeError from the binding, not a crash
    args, _keep = _host_args(outputs=lambda o: {**o, "counts": "not a buffer"})
    with pytest.raises(TypeError):
        host.plan_routing(**args)


def test_wrong_device_and_python_validation():
    idx = torch.zeros(2, 2, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match=r"plan_routing_host needs top_k_index on cpu, got a tensor on meta"):
        _ext.plan_routing_host(idx, 4, 2, None)
    with pytest.raises(ValueError, match=r"plan_routing_cuda needs top_k_index on cuda, got a tensor on cpu"):
        _ext.plan_routing_cuda(torch.zeros(2, 2, dtype=torch.int64), 4, 2, None)
    with pytest.raises(TypeError, match="int32 or int64"):
        _ext.plan_routing_host(torch.zeros(2, 2), 4, 2, None)


# ---------------------------------------------------------------------------------------------- GPU (CUDA module)

needs_cuda_module = pytest.mark.skipif(not _ext.cuda_available(), reason="_routing_cuda not built")


@pytest.mark.gpu
@needs_cuda_module
@pytest.mark.parametrize("T,k,E,B,F,routing", CASES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_cuda_matches_torch(T, k, E, B, F, routing, dtype):
    idx = make_index(T, k, E, routing, dtype).cuda()
    before = idx.clone()
    plan = _ext.plan_routing_cuda(idx, E, B, F)
    assert plan.sorted_assignment.device == idx.device
    assert torch.equal(idx, before)
    assert_same_plan(plan, _plan_routing_torch(idx, E, B, F))


@pytest.mark.gpu
@needs_cuda_module
@pytest.mark.parametrize("E", [1, 2, 255, 256, 512])  # key bits at and around powers of two
def test_cuda_large(E):
    # T·k = 1e6 assignments, with ~1% invalid ids: CUB's radix sort is stable over ceil(log2(E+1)) bits
    idx = torch.randint(0, E, (250_000, 4), device="cuda")
    idx[torch.rand(idx.shape, device="cuda") < 0.01] = E + 3
    assert_same_plan(_ext.plan_routing_cuda(idx, E, 128, 256), _plan_routing_torch(idx, E, 128, 256))


@pytest.mark.gpu
@needs_cuda_module
def test_cuda_invalid_ids():
    # ids outside [0, E), including int64 ids that truncate to valid int32 ids
    idx = torch.tensor([[0, 7], [-1, 2**32 + 1], [3, 1]], device="cuda")
    plan = _ext.plan_routing_cuda(idx, 4, 2, 3)
    assert_same_plan(plan, _plan_routing_torch(idx, 4, 2, 3))
    assert int(plan.invalid_count) == 3


@pytest.mark.gpu
@needs_cuda_module
def test_cuda_side_stream_and_workspace():
    # runs on the caller's current stream; workspace size is a host-side query
    mod = _ext.cuda_module()
    assert mod.device_count() == torch.cuda.device_count()
    assert mod.workspace_bytes(1000, 8) >= 3 * 4000
    idx = torch.randint(0, 8, (4096, 2), device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        plan = _ext.plan_routing_cuda(idx, 8, 16, 32)
    stream.synchronize()
    assert_same_plan(plan, _plan_routing_torch(idx, 8, 16, 32))
    with pytest.raises(ValueError, match=r"workspace must hold workspace_bytes\(6, 4\) = \d+ bytes, got 0"):
        args, _keep = _host_args()
        mod.plan_routing(**args, workspace=0, workspace_bytes=0, stream=0)
