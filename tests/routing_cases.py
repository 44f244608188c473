"""Routing cases and plan comparison shared by the routing tests (PyTorch, compiled extension, cupy JIT)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from helpers import routing

from blocksparse_moe.routing import RoutingPlan, Topology, plan_routing

CASES = [
    # (T, k, E, B, F, routing kind)
    (0, 2, 4, 4, 4, "distinct"),  # T = 0: empty input, empty plan, zero-size topology
    (1, 1, 1, 4, 3, "distinct"),  # T = 1 token, E = 1, F < B
    (1, 3, 3, 2, 5, "distinct"),  # one token with k = E
    (7, 3, 3, 4, 5, "distinct"),  # k = E, odd sizes
    (13, 2, 5, 4, 9, "distinct"),  # E not a power of two, F not a multiple of B
    (16, 2, 8, 4, 8, "one-hot"),  # all tokens to one expert (all others empty)
    (9, 2, 6, 8, 4, "skip"),  # empty experts between used ones, F < B
    (33, 4, 4, 16, 17, "duplicates"),  # a token choosing one expert twice, F = B + 1 (one partial column block)
    (11, 3, 7, 1, 3, "distinct"),  # B = 1: every padded row its own block row, no padding
    (5, 2, 3, 64, 64, "distinct"),  # B larger than all assignments: one block row per used expert
    (21, 2, 5, 4, None, "distinct"),  # no ffn_size: the plan alone
    (300, 2, 512, 16, 40, "distinct"),  # E = 512 > T: most experts empty
    (37, 5, 37, 8, 23, "distinct"),  # prime E, odd everything
    (12, 2, 9, 4, 6, "invalid"),  # ids -1, E and E+5 (unchecked): counted in counts[E], excluded from the plan
]


def cpp_buffer_table() -> list[tuple[str, str]]:
    """``(name, kind)`` of each row of csrc/routing.h's ``BSM_ROUTING_BUFFERS`` X-macro table, in order, and check
    that ``RoutingBuffers`` is the input pointer followed by that table."""
    header = (Path(__file__).resolve().parents[1] / "csrc" / "routing.h").read_text()
    table = re.search(r"#define BSM_ROUTING_BUFFERS\(X\)(.*?)\n\n", header, re.S).group(1)
    struct = re.search(r"struct RoutingBuffers \{(.*?)\n\};", header, re.S).group(1)
    fields = re.findall(r"^\s*(?:const )?\w+\* (\w+);|^\s*(BSM_ROUTING_BUFFERS)\(", struct, re.M)
    assert ["".join(f) for f in fields] == ["top_k_index", "BSM_ROUTING_BUFFERS"], struct
    return re.findall(r"X\((\w+), (plan|scratch), ", table)


def make_index(T: int, k: int, E: int, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """``[T, k]`` ids of ``dtype`` for a routing kind of ``helpers.routing``."""
    return routing(T, k, E, kind).to(dtype)


def torch_plan(idx: torch.Tensor, E: int, B: int) -> RoutingPlan:
    """The plan of the PyTorch implementation, whatever the device, unchecked (the reference of the tests)."""
    return plan_routing(idx, E, B, check=False, implementation="torch")


def check_row_tokens(plan: RoutingPlan) -> None:
    """``row_token`` / ``padded_row_token`` are the token of each row's assignment (``// k``), -1 where none."""
    for rows, tokens in ((plan.row_assignment, plan.row_token), (plan.padded_row_assignment, plan.padded_row_token)):
        expected = [a // plan.top_k if a >= 0 else -1 for a in rows.tolist()]
        assert tokens.tolist() == expected


def check_topology(plan: RoutingPlan, ffn_size: int) -> None:
    """What the topology is: the plan's ``padded_offsets`` (multiples of B, rising from 0, each expert's rows
    rounded up to whole blocks, within ``max_block_rows·B``) plus sizes; ``nnz`` a device scalar (no sync)."""
    t = plan.topology(ffn_size)
    B, E, R = plan.block_size, plan.num_experts, plan.max_block_rows
    assert (t.block_size, t.num_experts, t.max_block_rows) == (B, E, R)
    assert t.padded_offsets.dtype == torch.int32 and t.padded_offsets.shape == (E + 1,)
    assert t.padded_offsets.device == plan.padded_offsets.device
    assert torch.equal(t.padded_offsets, plan.padded_offsets)  # the plan's offsets, nothing else
    po, counts = t.padded_offsets.tolist(), plan.tokens_per_expert.tolist()
    assert po[0] == 0 and all(v % B == 0 for v in po), po
    assert all(a <= b for a, b in zip(po, po[1:])), po
    assert [po[e + 1] - po[e] for e in range(E)] == [-(-n // B) * B for n in counts], (po, counts)
    nb = -(-t.ffn_size // B)
    assert t.blocks_per_expert == nb and t.num_rows == R * B and t.nnz_max == R * nb
    assert po[-1] <= t.num_rows
    nnz = t.nnz
    assert nnz.shape == () and nnz.device == plan.padded_offsets.device
    assert int(nnz) == po[-1] // B * nb <= t.nnz_max


def _assert_same_value(name: str, x: object, y: object) -> None:
    if isinstance(y, torch.Tensor):
        assert x.dtype == y.dtype == torch.int32, name
        assert x.shape == y.shape, (name, x.shape, y.shape)
        assert torch.equal(x.cpu(), y.cpu()), f"{name}:\n{x}\nexpected\n{y}"
    else:
        assert x == y, (name, x, y)


def assert_same_plan(actual: RoutingPlan, expected: RoutingPlan, ffn_size: int | None = None) -> None:
    """Every field equal (ints by value, tensors by dtype, shape and every element), the row tokens what
    ``check_row_tokens`` says; with ``ffn_size``, the topologies' fields and sizes too, and ``actual``'s topology
    is what ``check_topology`` says it is."""
    for field in dataclasses.fields(expected):
        _assert_same_value(field.name, getattr(actual, field.name), getattr(expected, field.name))
    check_row_tokens(actual)
    if ffn_size is not None:
        names = [field.name for field in dataclasses.fields(Topology)]
        got, want = actual.topology(ffn_size), expected.topology(ffn_size)
        for name in (*names, "blocks_per_expert", "nnz_max", "num_rows", "nnz"):
            _assert_same_value(f"topology.{name}", getattr(got, name), getattr(want, name))
        check_topology(actual, ffn_size)
