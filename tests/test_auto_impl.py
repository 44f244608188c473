"""``impl="auto"``: chosen on the host from shapes only (no sync): the grouped strategy off CUDA, and on CUDA where
the block-sparse strategy's block padding would dominate (decode), else the block-sparse one. The threshold
(``AUTO_MAX_PADDING``) is where ``bench.model`` puts the crossover (``tests/test_model.py`` checks that the model
and the rule agree at the reference shapes)."""

from __future__ import annotations

import pytest
import torch

import blocksparse_moe as bsm
from blocksparse_moe import functional
from blocksparse_moe.options import AUTO_MAX_PADDING, resolve_impl

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def _auto(device: torch.device, T: int, k: int, E: int, B: int = 128) -> str:
    return resolve_impl("auto", device, assignments=T * k, experts=E, block_size=B)


def test_reference_shapes():
    assert _auto(CUDA, 16384, 2, 8) == "blocksparse"  # Mixtral: 4096 rows per expert, 3% block padding
    assert _auto(CUDA, 32768, 8, 128) == "blocksparse"  # fine-grained experts, training batch
    assert _auto(CUDA, 64, 8, 128) == "grouped"  # decode: 16,768 block-sparse rows for 512 assignments
    assert _auto(CUDA, 256, 2, 8) == "grouped"  # Mixtral's experts at 256 tokens: 1408 rows for 512
    for T, k, E in ((16384, 2, 8), (64, 8, 128), (0, 2, 8)):
        assert _auto(CPU, T, k, E) == "grouped"  # off CUDA: never block padding


def test_threshold_edge():
    # E = 1, B = 128: the block-sparse rows are ceil(A / 128) · 128 = 128 for 1 <= A <= 128
    assert AUTO_MAX_PADDING == 1.5
    assert _auto(CUDA, 85, 1, 1) == "grouped"  # 128 > 1.5 · 85 = 127.5
    assert _auto(CUDA, 86, 1, 1) == "blocksparse"  # 128 <= 129
    assert _auto(CUDA, 86, 1, 1, B=64) == "blocksparse"  # smaller blocks pad less: 128 rows for 86 (1.49)
    assert _auto(CUDA, 40, 1, 1, B=64) == "grouped"  # 64 > 60
    assert _auto(CUDA, 0, 2, 8) == "blocksparse"  # no tokens: nothing is padded (the layer returns empty)


def test_explicit_impls_and_no_shapes():
    for impl in ("blocksparse", "grouped", "padded", "reference"):
        assert resolve_impl(impl, CUDA, assignments=512, experts=128) == impl  # only "auto" is decided
    assert resolve_impl("auto", CUDA) == "blocksparse"  # without shapes: the large-shape answer
    assert resolve_impl("auto", CPU) == "grouped"
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("fastest", CUDA)


def test_moe_mlp_decides_from_its_shapes(monkeypatch):
    # the front door hands the rule T·k, E and the block size it would use (no data read)
    seen = []

    def spy(impl, device, **shapes):
        seen.append(shapes)
        return resolve_impl(impl, device, **shapes)

    monkeypatch.setattr(functional, "resolve_impl", spy)
    T, d, f, E, k = 6, 8, 12, 4, 2
    x, w1, w2 = torch.randn(T, d), torch.randn(E, d, f), torch.randn(E, f, d)
    idx, w = torch.randint(0, E, (T, k)), torch.rand(T, k)
    _, stats = bsm.moe_mlp(x, idx, w, w1, w2, activation="relu", backend="torch", return_stats=True)
    _, stats16 = bsm.moe_mlp(x, idx, w, w1, w2, activation="relu", backend="torch", block_size=16, return_stats=True)
    A = T * k
    assert seen == [dict(assignments=A, experts=E, block_size=64), dict(assignments=A, experts=E, block_size=16)]
    assert stats.impl == stats16.impl == "grouped"  # CPU
