"""Routing plan (PyTorch path): invariants, edge cases, and errors."""

import pytest
import torch

from blocksparse_moe.routing import max_block_rows, plan_routing


def _loop_reference(idx: torch.Tensor, E: int, B: int):
    """Independent per-assignment loop: stable order by expert."""
    flat = idx.reshape(-1).tolist()
    order = [a for e in range(E) for a, x in enumerate(flat) if x == e]
    counts = [sum(1 for x in flat if x == e) for e in range(E)]
    return order, counts


CASES = [
    # (T, k, E, B, F, routing)
    (1, 1, 1, 4, 3, "uniform"),  # one token, E = 1
    (7, 3, 3, 4, 5, "uniform"),  # k = E, odd sizes
    (13, 2, 5, 4, 9, "uniform"),  # E not a power of two, F not a multiple of B
    (16, 2, 8, 4, 8, "one-hot"),  # all tokens to one expert (others empty)
    (9, 2, 6, 8, 4, "skip"),  # experts with no tokens in the middle, F < B
    (0, 2, 4, 4, 4, "uniform"),  # empty input
    (33, 4, 4, 16, 17, "dup"),  # duplicate experts within a row
]


def _make(T, k, E, routing, dtype=torch.int64):
    if routing == "one-hot":
        return torch.full((T, k), E // 2, dtype=dtype)
    if routing == "skip":
        return torch.randint(0, E // 2, (T, k), dtype=dtype) * 2
    if routing == "dup":
        return torch.randint(0, E, (T, 1), dtype=dtype).expand(T, k).contiguous()
    if k <= E:
        return torch.rand(T, E).argsort(dim=1)[:, :k].to(dtype)
    return torch.randint(0, E, (T, k), dtype=dtype)


@pytest.mark.parametrize("T,k,E,B,F,routing", CASES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_plan_invariants(T, k, E, B, F, routing, dtype):
    idx = _make(T, k, E, routing, dtype)
    before = idx.clone()
    p = plan_routing(idx, E, block_size=B, ffn_size=F)
    assert torch.equal(idx, before)  # input not modified
    A = T * k
    order, counts = _loop_reference(idx, E, B)
    assert p.sorted_assignment.tolist() == order
    assert p.tokens_per_expert.tolist() == counts
    assert int(p.invalid_count) == 0
    assert p.offsets.tolist() == [sum(counts[:e]) for e in range(E + 1)]
    padded = [-(-c // B) * B for c in counts]
    assert p.padded_offsets.tolist() == [sum(padded[:e]) for e in range(E + 1)]
    # inverse is the inverse permutation
    assert torch.equal(p.inverse[p.sorted_assignment.long()], torch.arange(A, dtype=torch.int32))
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
    assert torch.equal(p.assignment_row.reshape(-1).long(), p.inverse.long())
    # topology
    t = p.topology
    nb = -(-F // B)
    assert t.blocks_per_expert == nb and t.nnz_max == R * nb
    used = int(p.padded_offsets[-1]) // B
    assert int(t.nnz) == used * nb
    assert sorted(t.block_offsets_t.tolist()) == list(range(t.nnz_max))  # a permutation
    ro = t.row_offsets.tolist()
    assert all(a <= b for a, b in zip(ro, ro[1:]))  # monotone
    co = t.column_offsets_t.tolist()
    assert co[0] == 0 and co[-1] == used * nb and all(a <= b for a, b in zip(co, co[1:]))
    # transposed metadata names the same blocks
    bo = t.block_offsets_t.long()
    assert torch.equal(t.row_indices_t, t.row_indices[bo])
    assert torch.equal(t.column_indices_t, t.column_indices[bo])
    for b in range(used * nb):
        r, c = int(t.row_indices[b]), int(t.column_indices[b])
        e = c // nb
        assert int(p.padded_offsets[e]) <= r * B < int(p.padded_offsets[e + 1])
    assert (t.row_indices[used * nb :] == -1).all()


def test_large_e_and_many_assignments():
    # E up to 512 and T·k near 1e6: still exact vs a stable argsort
    T, k, E = 250_000, 4, 512
    idx = torch.randint(0, E, (T, k), dtype=torch.int32)
    p = plan_routing(idx, E, block_size=128, ffn_size=256)
    assert torch.equal(p.sorted_assignment.long(), torch.argsort(idx.reshape(-1), stable=True))
    assert int(p.offsets[-1]) == T * k


def test_invalid_ids_raise_with_values():
    idx = torch.tensor([[0, 1], [5, -1]])
    with pytest.raises(ValueError, match=r"\[0, 4\).*2 assignment"):
        plan_routing(idx, 4, block_size=4)


def test_invalid_ids_excluded_when_unchecked():
    idx = torch.tensor([[0, 7], [1, 0]])
    p = plan_routing(idx, 2, block_size=2, check=False)
    assert int(p.invalid_count) == 1
    assert p.tokens_per_expert.tolist() == [2, 1]
    assert p.assignment_row.tolist()[0][1] == -1
    assert p.padded_assignment_row.tolist()[0][1] == -1
    assert p.sorted_assignment.tolist()[-1] == 1  # invalid sorts last
    assert -1 in p.row_assignment.tolist()


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(top_k_index=torch.zeros(3, dtype=torch.int64), num_experts=2), ValueError, "2-D"),
        (dict(top_k_index=torch.zeros(3, 1), num_experts=2), TypeError, "int32 or int64"),
        (dict(top_k_index=torch.zeros(3, 0, dtype=torch.int64), num_experts=2), ValueError, "top_k >= 1"),
        (dict(top_k_index=torch.zeros(3, 1, dtype=torch.int64), num_experts=0), ValueError, "num_experts"),
        (dict(top_k_index=torch.zeros(3, 1, dtype=torch.int64), num_experts=2, block_size=0), ValueError, "block"),
        (dict(top_k_index=[[0]], num_experts=2), TypeError, "torch.Tensor"),
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
