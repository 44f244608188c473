"""Lazy access to the compiled routing extensions (never imported or queried at package import time).

- ``_routing_cuda``: CUDA kernels (built when nvcc was found at install time).
- ``_routing_host``: the same routing C++ compiled for the host; used by the tests to prove the C++ logic.
"""

from __future__ import annotations

import importlib
from functools import cache


@cache
def _load(name: str):
    try:
        return importlib.import_module(f"blocksparse_moe.{name}")
    except ImportError as exc:  # not built
        return exc


def host_module():
    """The host build of the routing C++, or raise ImportError saying how to build it."""
    mod = _load("_routing_host")
    if isinstance(mod, Exception):
        raise ImportError(
            f"blocksparse_moe._routing_host is not built; reinstall with a C++ compiler (pip install -e .): {mod}"
        )
    return mod


def cuda_available() -> bool:
    """True when the CUDA routing extension is built (says nothing about a GPU being present)."""
    return not isinstance(_load("_routing_cuda"), Exception)


def plan_routing_cuda(top_k_index, num_experts, block_size, ffn_size):
    raise NotImplementedError("CUDA routing extension glue: see issue 2")
