"""``impl="auto"``: decided on the host without shapes or device data (no sync): the grouped strategy (measured
faster than the block-sparse one at both reference shapes on an H100, modelled faster at decode and tied elsewhere:
``tests/test_model.py`` checks the model agrees), or the block-sparse one when a block size is asked for."""

from __future__ import annotations

import pytest
import torch

import blocksparse_moe as bsm
from blocksparse_moe.options import BLOCK_SIZES, MoEOptions, resolve_impl


def test_auto_is_grouped_unless_a_block_size_is_given():
    assert resolve_impl("auto") == "grouped"
    for B in BLOCK_SIZES:
        assert resolve_impl("auto", B) == "blocksparse"  # a block size asks for the block-sparse layout
    for impl in ("blocksparse", "grouped", "padded", "reference"):
        assert resolve_impl(impl) == impl  # only "auto" is decided
    assert resolve_impl("blocksparse", 16) == "blocksparse"
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("fastest")


@pytest.mark.parametrize(
    "T, k, E",
    [
        (64, 8, 128),  # decode: 16,768 block-sparse rows for 512 assignments
        (37, 2, 8),  # odd sizes, Mixtral-like experts
        (5, 1, 1),  # E = 1
        (6, 4, 4),  # k = E
    ],
)
def test_moe_mlp_runs_what_auto_resolves_to(T, k, E):
    d, f = 8, 12
    x, w1, w2 = torch.randn(T, d), torch.randn(E, d, f), torch.randn(E, f, d)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    w = torch.rand(T, k)
    _, stats = bsm.moe_mlp(x, idx, w, w1, w2, activation="relu", backend="torch", return_stats=True)
    assert stats.impl == "grouped"
    opts = MoEOptions(block_size=16, backend="torch")
    _, stats16 = bsm.moe_mlp(x, idx, w, w1, w2, activation="relu", options=opts, return_stats=True)
    assert stats16.impl == "blocksparse"
