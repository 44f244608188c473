"""The implementations of every op contract, one module per backend: ``triton`` (the kernels; CUDA, or CPU under
Triton's interpreter) and ``torch`` (PyTorch; the CPU path, float64, and the reference). ``get(name)`` returns one;
``config.resolve_backend`` chooses the name, once per op call, in the op layer."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["get"]


def get(name: str) -> ModuleType:
    """The backend module ``name`` (``"triton"`` or ``"torch"``)."""
    if name not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {name!r}")
    return importlib.import_module(f"{__name__}.{name}")
