"""Backend selection: which implementation of an op runs for a given device.

Two backends implement every op:

- ``"triton"``: the Triton kernels. Used on CUDA, and on CPU only under Triton's interpreter
  (``TRITON_INTERPRET=1``), which is how the test-suite proves the kernels on machines without a GPU.
- ``"torch"``: plain PyTorch implementations of the same strategy (same metadata, same math). The CPU path
  when the interpreter is off, and the reference the kernels are tested against.

``BSM_BACKEND=auto|triton|torch`` overrides the automatic choice for the whole process; ``auto`` picks
``triton`` on CUDA or under the interpreter and ``torch`` otherwise, and ``torch`` for float64 operands (the
kernels take fp32 / fp16 / bf16). An explicit ``triton`` on CPU without the interpreter, or for float64, is an
error, not a silent fallback. The op layer resolves the backend once per op call (``ops/``); the implementations
live in ``backends/triton.py`` and ``backends/torch.py``.

``BSM_CHECK=1`` makes routing verify expert ids on GPU too (one host sync); on CPU they are always checked.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(device: torch.device, backend: str | None = None, dtype: torch.dtype | None = None) -> str:
    """Return ``"triton"`` or ``"torch"`` for operands on ``device`` of ``dtype``; ``backend=None`` reads
    ``BSM_BACKEND``."""
    choice = backend if backend is not None else os.environ.get("BSM_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        runs = (device.type == "cuda" or interpreting()) and (dtype is None or dtype in TRITON_DTYPES)
        return "triton" if runs else "torch"
    if choice == "triton" and device.type != "cuda" and not interpreting():
        raise ValueError(
            f"backend='triton' needs a CUDA tensor or TRITON_INTERPRET=1, got a tensor on {device} "
            "with the interpreter off; use backend='torch' or 'auto'"
        )
    if choice == "triton" and dtype is not None and dtype not in TRITON_DTYPES:
        raise TypeError(
            f"backend='triton' takes operands of a dtype among {TRITON_DTYPES}, got {dtype}; "
            "use backend='torch' (or 'auto') for float64"
        )
    return choice


def check_enabled(device: torch.device, check: bool | None = None) -> bool:
    """Whether to validate data-dependent inputs (expert ids). Always on CPU; on GPU opt-in (host sync); never on
    the meta device, whose tensors hold no data to read (shape inference, ``torch.device("meta")`` init)."""
    if device.type == "meta":
        return False
    if check is not None:
        return check
    if device.type != "cuda":
        return True
    return os.environ.get("BSM_CHECK", "0") not in ("", "0")
