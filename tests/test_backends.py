"""The backend contract (``backends.common.Backend``): both backends implement every method with its signature,
and the public op lists are derived from it."""

from __future__ import annotations

import inspect

import pytest

from blocksparse_moe import backends, ops
from blocksparse_moe.backends.common import MLP_OPS, OPS, Backend


def _parameters(fn) -> list[tuple[str, object, object]]:
    """Names, kinds and defaults of ``fn``'s parameters (not ``self``; annotations may be absent in a backend)."""
    params = inspect.signature(fn).parameters.values()
    return [(p.name, p.kind, p.default) for p in params if p.name != "self"]


def test_ops_are_the_protocol_methods():
    # every public method of the Protocol, none of its machinery
    assert tuple(n for n, v in vars(Backend).items() if inspect.isfunction(v) and not n.startswith("_")) == OPS
    assert set(MLP_OPS) <= set(OPS)


@pytest.mark.parametrize("name", ["triton", "torch"])
def test_backend_implements_the_protocol(name):
    module = backends.get(name)
    for op in OPS:
        assert callable(getattr(module, op, None)), f"backends.{name} lacks {op}"
        assert _parameters(getattr(module, op)) == _parameters(getattr(Backend, op)), f"backends.{name}.{op}"
    assert set(OPS) <= set(module.__all__)


def test_public_op_list_is_derived_from_the_protocol():
    assert ops.__all__ == [*(n for n in OPS if n not in MLP_OPS), "expert_mlp", "mlp_routing"]
    for name in ops.__all__:
        assert callable(getattr(ops, name)), name
