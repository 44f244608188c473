"""The compiled routing C++ (csrc/routing.h) against the PyTorch specification, element for element.

The host module (`_routing_host`, the same steps run by host loops) is checked here on every machine; the
CUDA module (`_routing_cuda`) by the `gpu` tests. Every output buffer is poisoned before the C++ runs, so an
element it fails to write shows up as a mismatch.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import poison_
from routing_cases import CASES, assert_same_plan, cpp_buffer_table, make_index, torch_plan

from blocksparse_moe.routing import PLAN_BUFFERS, SCRATCH_BUFFERS, RoutingPlan, max_block_rows, plan_sizes, spec
from blocksparse_moe.routing import ext as _ext

host = pytest.importorskip("blocksparse_moe._routing_host", reason="host routing extension not built")


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Make spec.allocate (which _ext uses) return poisoned (not merely uninitialized) outputs."""
    allocate = spec.allocate

    def poisoned(*args, **kwargs):
        out = allocate(*args, **kwargs)
        for t in out.values():
            poison_(t)
        return out

    monkeypatch.setattr(spec, "allocate", poisoned)


def plan_host(idx: torch.Tensor, E: int, B: int) -> RoutingPlan:
    """The plan as the host build of the C++ fills it."""
    sizes = plan_sizes(idx, E, B)
    return RoutingPlan.from_buffers(sizes, _ext.plan_buffers_host(idx, sizes))


def plan_cuda(idx: torch.Tensor, E: int, B: int) -> RoutingPlan:
    """The plan as the CUDA build of the C++ fills it."""
    sizes = plan_sizes(idx, E, B)
    return RoutingPlan.from_buffers(sizes, _ext.plan_buffers_cuda(idx, sizes))


@pytest.mark.parametrize("T,k,E,B,F,kind", CASES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_host_matches_torch(T, k, E, B, F, kind, dtype):
    idx = make_index(T, k, E, kind, dtype)
    before = idx.clone()
    plan = plan_host(idx, E, B)
    assert torch.equal(idx, before)  # input not modified
    assert_same_plan(plan, torch_plan(idx, E, B), F)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_host_large(dtype):
    # T·k = 1e6 assignments onto E = 512 experts (one case): the counting sort stays stable and exact
    idx = torch.randint(0, 512, (250_000, 4), dtype=dtype)
    assert_same_plan(plan_host(idx, 512, 128), torch_plan(idx, 512, 128), 256)


def test_host_non_contiguous_index():
    # a transposed (non-contiguous) view of the ids: read in logical order, never modified
    base = torch.randint(0, 6, (3, 10), dtype=torch.int64)
    idx = base.t()
    plan = plan_host(idx, 6, 4)
    assert_same_plan(plan, torch_plan(idx, 6, 4), 8)


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
    plan = plan_host(idx, 4, 2)
    assert_same_plan(plan, torch_plan(idx, 4, 2), 3)
    flat = idx.reshape(-1)
    invalid = ((flat < 0) | (flat >= 4)).sum()
    assert int(plan.invalid_count) == int(invalid)
    assert int(plan.tokens_per_expert.sum()) == flat.numel() - int(invalid)


def _host_args(**overrides):
    """Valid raw arguments of _routing_host.plan_routing for T=3, k=2, E=4, B=2, with overrides."""
    idx = torch.tensor([[0, 1], [2, 3], [1, 1]], dtype=torch.int32)
    sizes = plan_sizes(idx, 4, 2)
    out = spec.allocate(sizes, idx.device)
    args = dict(
        top_k_index=idx.data_ptr(),
        index_dtype="int32",
        num_tokens=3,
        top_k=2,
        num_experts=4,
        block_size=2,
        max_block_rows=max_block_rows(6, 4, 2),
        buffers={name: (t.data_ptr(), t.numel()) for name, t in out.items()},
    )
    buffers = overrides.pop("buffers", None)
    args.update(overrides)
    if buffers is not None:
        args["buffers"] = buffers(args["buffers"])
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
        (dict(num_tokens=2**30, top_k=2), r"num_tokens \* top_k must be at most 2\*\*31 - 2.*got 2147483648"),
        (dict(max_block_rows=7), r"max_block_rows must be .* = 5 for A=6, E=4, B=2, got 7"),
        (dict(top_k_index=0), r"top_k_index must be a non-null pointer aligned to 4 bytes, got 0"),
        (dict(buffers=lambda o: {n: v for n, v in o.items() if n != "row_assignment"}), r"missing 'row_assignment'"),
        (dict(buffers=lambda o: {**o, "bogus": (o["counts"][0], 1)}), r"unknown buffer 'bogus'; expected exactly"),
        (dict(buffers=lambda o: {**o, "offsets": (o["offsets"][0], 4)}), r"'offsets' must have 5 int32 .*got 4"),
        (dict(buffers=lambda o: {**o, "row_assignment": (0, 6)}), r"'row_assignment' must be a non-null pointer"),
        (dict(buffers=lambda o: {**o, "row_assignment": (o["row_assignment"][0] + 2, 6)}), r"aligned to 4 bytes"),
        # a buffer the plan no longer has is rejected by name
        (dict(buffers=lambda o: {**o, "inverse": (o["counts"][0], 6)}), r"unknown buffer 'inverse'"),
        # the scratch of the sort is checked like the outputs
        (dict(buffers=lambda o: {**o, "tile_counts": (o["tile_counts"][0], 4)}), r"'tile_counts' must have 5 int32"),
        # the topology is padded_offsets: the index arrays it once had are rejected by name
        (dict(buffers=lambda o: {**o, "row_indices": (o["counts"][0], 10)}), r"unknown buffer 'row_indices'"),
        (dict(buffers=lambda o: {**o, "block_offsets_t": (o["counts"][0], 10)}), r"unknown buffer 'block_offsets_t'"),
        # R·B must fit int32 (B = 2**30: 6 assignments onto 4 experts need R = 4 block rows)
        (dict(block_size=2**30, max_block_rows=4), r"max_block_rows \* block_size must fit int32"),
    ],
)
def test_host_bad_arguments(overrides, match):
    args, _keep = _host_args(**overrides)
    with pytest.raises(ValueError, match=match):
        host.plan_routing(**args)


def test_host_bad_argument_types():
    # a wrong Python type is a TypeError from the binding, not a crash
    args, _keep = _host_args(buffers=lambda o: {**o, "counts": "not a buffer"})
    with pytest.raises(TypeError):
        host.plan_routing(**args)
    # so is the blocks_per_expert argument the topology arrays once needed (no such parameter any more)
    args, _keep = _host_args(blocks_per_expert=3)
    with pytest.raises(TypeError, match="incompatible function arguments"):
        host.plan_routing(**args)


@pytest.mark.parametrize(
    "T,k,E,B",
    [
        (0, 2, 4, 4),  # empty input
        (13, 3, 5, 4),  # odd sizes
        (6, 2, 3, 1),  # B = 1: unpadded rows, the same buffers
        (300, 2, 512, 16),  # E = 512 > T, two groups of tiles
    ],
)
def test_cpp_buffers_follow_the_table(T, k, E, B):
    # the C++ side expects exactly routing's PLAN_BUFFERS + SCRATCH_BUFFERS, in that order, with the same lengths
    sizes = plan_sizes(torch.zeros(T, k, dtype=torch.int64), E, B)
    cpp = host.buffer_sizes("int64", T, k, E, B, sizes.max_block_rows)
    expected = [(name, math.prod(shape)) for name, shape in {**sizes.shapes(), **sizes.scratch_shapes()}.items()]
    assert cpp == expected
    assert [name for name, _ in cpp] == [*PLAN_BUFFERS, *SCRATCH_BUFFERS]


def test_cpp_struct_follows_the_table():
    # csrc/routing.h's one X-macro table (which generates RoutingBuffers, expected_buffers and parse_params) is
    # spec's PLAN_BUFFERS then SCRATCH_BUFFERS, same names, same kinds, same order
    table = cpp_buffer_table()
    assert [name for name, kind in table if kind == "plan"] == list(PLAN_BUFFERS)
    assert [name for name, kind in table if kind == "scratch"] == list(SCRATCH_BUFFERS)
    assert [name for name, _ in table] == [*PLAN_BUFFERS, *SCRATCH_BUFFERS]


# ---------------------------------------------------------------------------------------------- GPU (CUDA module)

needs_cuda_module = pytest.mark.skipif(not _ext.cuda_available(), reason="_routing_cuda not built")


@pytest.mark.gpu
@needs_cuda_module
@pytest.mark.parametrize("T,k,E,B,F,kind", CASES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_cuda_matches_torch(T, k, E, B, F, kind, dtype):
    idx = make_index(T, k, E, kind, dtype).cuda()
    before = idx.clone()
    plan = plan_cuda(idx, E, B)
    assert plan.row_assignment.device == idx.device
    assert torch.equal(idx, before)
    assert_same_plan(plan, torch_plan(idx, E, B), F)


@pytest.mark.gpu
@needs_cuda_module
@pytest.mark.parametrize("E", [1, 2, 255, 256, 512, 3000])  # E = 3000: larger tiles (768)
def test_cuda_large(E):
    # T·k = 1e6 assignments, with ~1% invalid ids: the counting sort stays stable across tiles and groups
    idx = torch.randint(0, E, (250_000, 4), device="cuda")
    idx[torch.rand(idx.shape, device="cuda") < 0.01] = E + 3
    assert_same_plan(plan_cuda(idx, E, 128), torch_plan(idx, E, 128), 256)


@pytest.mark.gpu
@needs_cuda_module
def test_cuda_invalid_ids():
    # ids outside [0, E), including int64 ids that truncate to valid int32 ids
    idx = torch.tensor([[0, 7], [-1, 2**32 + 1], [3, 1]], device="cuda")
    plan = plan_cuda(idx, 4, 2)
    assert_same_plan(plan, torch_plan(idx, 4, 2), 3)
    assert int(plan.invalid_count) == 3


@pytest.mark.gpu
@needs_cuda_module
def test_cuda_side_stream():
    # runs on the caller's current stream (a side stream here), after the producer of the ids
    mod = _ext.cuda_module()
    assert mod.device_count() == torch.cuda.device_count()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        idx = torch.randint(0, 8, (4096, 2), device="cuda")
        plan = plan_cuda(idx, 8, 16)
    stream.synchronize()
    assert_same_plan(plan, torch_plan(idx, 8, 16), 32)
