"""Routing cases and plan comparison shared by the routing tests (PyTorch, compiled extension, cupy JIT)."""

from __future__ import annotations

import dataclasses

import torch
from helpers import routing

from blocksparse_moe.routing import RoutingPlan, Topology

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
    (21, 2, 5, 4, None, "distinct"),  # no ffn_size: plan without topology
    (300, 2, 512, 16, 40, "distinct"),  # E = 512 > T: most experts empty
    (37, 5, 37, 8, 23, "distinct"),  # prime E, odd everything
    (12, 2, 9, 4, 6, "invalid"),  # ids -1, E and E+5 (unchecked): counted in counts[E], excluded from the plan
]


def make_index(T: int, k: int, E: int, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """``[T, k]`` ids of ``dtype`` for a routing kind of ``helpers.routing``."""
    return routing(T, k, E, kind).to(dtype)


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
