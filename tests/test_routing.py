"""Routing plan (PyTorch path): invariants, edge cases, errors, the one table of plan buffers, and the topology
(``padded_offsets`` plus sizes)."""

import dataclasses

import pytest
import torch
from helpers import routing
from routing_cases import check_topology

from blocksparse_moe import routing as R
from blocksparse_moe.routing import (
    PLAN_BUFFERS,
    SCRATCH_BUFFERS,
    PlanSizes,
    RoutingPlan,
    Topology,
    build_topology,
    max_block_rows,
    plan_routing,
)


def _loop_reference(idx: torch.Tensor, E: int):
    """Independent per-assignment loop: stable order by expert, then assignment index."""
    flat = idx.reshape(-1).tolist()
    order = [a for e in range(E) for a, x in enumerate(flat) if x == e]
    counts = [sum(1 for x in flat if x == e) for e in range(E)]
    return order, counts


CASES = [
    # (T, k, E, B, F, routing)
    (1, 1, 1, 4, 3, "distinct"),  # one token, E = 1
    (7, 3, 3, 4, 5, "distinct"),  # k = E, odd sizes
    (13, 2, 5, 4, 9, "distinct"),  # E not a power of two, F not a multiple of B
    (16, 2, 8, 4, 8, "one-hot"),  # all tokens to one expert (others empty)
    (9, 2, 6, 8, 4, "skip"),  # experts with no tokens in the middle, F < B
    (0, 2, 4, 4, 4, "distinct"),  # empty input
    (33, 4, 4, 16, 17, "duplicates"),  # duplicate experts within a row
]


@pytest.mark.parametrize("T,k,E,B,F,kind", CASES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_plan_invariants(T, k, E, B, F, kind, dtype):
    idx = routing(T, k, E, kind).to(dtype)
    before = idx.clone()
    p = plan_routing(idx, E, block_size=B, ffn_size=F)
    assert torch.equal(idx, before)  # input not modified
    A = T * k
    order, counts = _loop_reference(idx, E)
    assert p.row_assignment.tolist() == order  # stable by expert, then assignment index
    assert p.tokens_per_expert.tolist() == counts
    assert int(p.invalid_count) == 0
    assert p.offsets.tolist() == [sum(counts[:e]) for e in range(E + 1)]
    padded = [-(-c // B) * B for c in counts]
    assert p.padded_offsets.tolist() == [sum(padded[:e]) for e in range(E + 1)]
    # the unpadded maps are mutually inverse permutations
    ar = p.assignment_row.reshape(-1).long()
    assert torch.equal(p.row_assignment.long()[ar], torch.arange(A))
    assert torch.equal(ar[p.row_assignment.long()], torch.arange(A))
    # padded layout maps: mutually inverse, padding rows -1, each expert's rows in its padded range
    R = max_block_rows(A, E, B)
    assert p.padded_row_assignment.shape == (R * B,)
    pra, par = p.padded_row_assignment.long(), p.padded_assignment_row.reshape(-1).long()
    assert torch.equal(pra[par], torch.arange(A))
    assert int((pra >= 0).sum()) == A
    flat = idx.reshape(-1).long()
    for a in range(A):
        e = int(flat[a])
        assert p.padded_offsets[e] <= par[a] < p.padded_offsets[e] + counts[e]
        assert par[a] - p.padded_offsets[e] == ar[a] - p.offsets[e]  # same rank within the expert
    # topology: the plan's padded_offsets (multiples of B, rising from 0) plus sizes
    t = p.topology
    nb = -(-F // B)
    assert (t.block_size, t.num_experts, t.ffn_size, t.max_block_rows) == (B, E, F, R)
    assert torch.equal(t.padded_offsets, p.padded_offsets)
    assert t.blocks_per_expert == nb and t.nnz_max == R * nb and t.num_rows == R * B
    used = sum(padded) // B  # used block rows, from the loop reference's counts
    assert int(t.nnz) == used * nb <= t.nnz_max
    po = t.padded_offsets.tolist()
    owners = [[e for e in range(E) if po[e] <= r * B < po[e + 1]] for r in range(used)]
    assert all(len(o) == 1 and counts[o[0]] > 0 for o in owners)  # each used block row: one expert, with tokens
    check_topology(p)


def test_large_e_and_many_assignments():
    # E up to 512 and T·k near 1e6: still exact vs a stable argsort
    T, k, E = 250_000, 4, 512
    idx = torch.randint(0, E, (T, k), dtype=torch.int32)
    p = plan_routing(idx, E, block_size=128, ffn_size=256)
    assert torch.equal(p.row_assignment.long(), torch.argsort(idx.reshape(-1), stable=True))
    assert int(p.offsets[-1]) == T * k


def test_invalid_ids_raise_with_values():
    idx = torch.tensor([[0, 1], [5, -1]])
    with pytest.raises(ValueError, match=r"\[0, 4\).*2 assignment"):
        plan_routing(idx, 4, block_size=4)


def test_invalid_ids_excluded_when_unchecked():
    idx = torch.tensor([[0, 7], [1, 0]])
    p = plan_routing(idx, 2, block_size=2, check=False)
    assert int(p.invalid_count) == 1
    assert p.counts.tolist() == [2, 1, 1]  # the histogram, then the invalid count
    assert p.tokens_per_expert.tolist() == [2, 1]
    assert p.assignment_row.tolist()[0][1] == -1
    assert p.padded_assignment_row.tolist()[0][1] == -1
    assert p.row_assignment.tolist() == [0, 3, 2, -1]  # stable by expert; the invalid row last, as -1


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(top_k_index=torch.zeros(3, dtype=torch.int64), num_experts=2), ValueError, "2-D"),
        (dict(top_k_index=torch.zeros(3, 1), num_experts=2), TypeError, "int32 or int64"),
        (dict(top_k_index=torch.zeros(3, 0, dtype=torch.int64), num_experts=2), ValueError, "top_k >= 1"),
        (dict(top_k_index=torch.zeros(3, 1, dtype=torch.int64), num_experts=0), ValueError, "num_experts"),
        (dict(top_k_index=torch.zeros(3, 1, dtype=torch.int64), num_experts=2, block_size=0), ValueError, "block"),
        (dict(top_k_index=[[0]], num_experts=2), TypeError, "torch.Tensor"),
        (dict(top_k_index=torch.zeros(3, 1, dtype=torch.int64), num_experts=2, ffn_size=0), ValueError, "ffn_size"),
    ],
)
def test_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        plan_routing(**kwargs)


def test_package_import_is_lazy():
    # importing the package loads no kernels (no triton) and queries no device; names resolve on use
    import subprocess
    import sys

    code = (
        "import sys, blocksparse_moe as b; assert 'triton' not in sys.modules; "
        "assert 'blocksparse_moe._routing_cuda' not in sys.modules; b.moe_mlp; b.dMoE; b.ops.sdd; "
        "b.parallel.shard_experts; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


# ------------------------------------------------------------------------------ the one table of buffers


def _tensor_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if "Tensor" in str(f.type)]


def test_dataclass_fields_follow_the_table():
    # the dataclasses hold exactly the table's buffers, in table order
    assert _tensor_fields(RoutingPlan) == list(PLAN_BUFFERS)
    # the topology's only tensor is a plan buffer: it has no buffers of its own
    assert _tensor_fields(Topology) == ["padded_offsets"] and "padded_offsets" in PLAN_BUFFERS
    assert PlanSizes.buffer_names() == (*PLAN_BUFFERS, *SCRATCH_BUFFERS)


@pytest.mark.parametrize(
    "T,k,E,B,F",
    [
        (0, 2, 4, 4, 4),  # empty input: zero-length buffers, one-element offsets
        (13, 3, 5, 4, 9),  # odd sizes, partial column block
        (6, 2, 3, 8, None),  # no topology: the same buffers
    ],
)
def test_plan_buffers_have_the_table_shapes(T, k, E, B, F):
    # the PyTorch path fills exactly the table's buffers with the table's shapes, whether or not a topology is
    # asked for; the plan wraps them by name, and the topology is the plan's padded_offsets (not a copy)
    idx = routing(T, k, E, "distinct")
    sizes = R.plan_sizes(idx, E, B, F)
    assert sizes == R.plan_sizes(idx, E, B, None)  # ffn_size changes no buffer
    buffers = R.plan_buffers_torch(idx, sizes)
    assert {name: tuple(t.shape) for name, t in buffers.items()} == sizes.shapes()
    assert list(sizes.shapes()) == list(PLAN_BUFFERS)
    assert all(t.dtype == torch.int32 for t in buffers.values())
    plan = RoutingPlan.from_buffers(sizes, buffers, F)
    for name in PLAN_BUFFERS:
        assert getattr(plan, name) is buffers[name]
    if F is None:
        assert plan.topology is None
    else:
        assert plan.topology.padded_offsets is buffers["padded_offsets"]
        check_topology(plan)


def test_build_topology_from_offsets():
    # the topology of any padded_offsets (int64 here: converted to int32), the sizes as properties; empty experts
    # (0 and 2), one partial column block (F = 10, B = 4: nb = 3)
    po = torch.tensor([0, 0, 8, 8, 12], dtype=torch.int64)
    topo = build_topology(po, block_size=4, num_experts=4, ffn_size=10, max_rows=5)
    assert topo.padded_offsets.dtype == torch.int32 and topo.padded_offsets.tolist() == [0, 0, 8, 8, 12]
    assert (topo.blocks_per_expert, topo.nnz_max, topo.num_rows) == (3, 15, 20)
    assert topo.nnz.shape == () and int(topo.nnz) == 9  # 3 used block rows · 3 blocks
    assert po.dtype == torch.int64  # the input is not modified


def test_plan_sizes():
    # the sizes every buffer follows from; max_block_rows is min(A, (A + E·(B-1)) // B)
    s = PlanSizes(num_tokens=5, top_k=2, num_experts=3, block_size=4)
    assert (s.num_assignments, s.max_block_rows) == (10, 4)
    assert s.shapes() == {
        "counts": (4,),
        "offsets": (4,),
        "padded_offsets": (4,),
        "row_assignment": (10,),
        "assignment_row": (5, 2),
        "padded_row_assignment": (16,),
        "padded_assignment_row": (5, 2),
    }
    # one tile of 256 assignments, one group: the counting sort's scratch
    assert (s.tile_size, s.num_tiles, s.tiles_per_group, s.num_groups) == (256, 1, 1, 1)
    assert s.scratch_shapes() == {"keys": (10,), "rank": (10,), "tile_counts": (4,), "group_counts": (4,)}
