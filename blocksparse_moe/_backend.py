"""Backend selection: which implementation of an op runs for a given device.

Two backends implement every op:

- ``"triton"``: the Triton kernels. Used on CUDA, and on CPU only under Triton's interpreter
  (``TRITON_INTERPRET=1``), which is how the test-suite proves the kernels on machines without a GPU.
- ``"torch"``: plain PyTorch implementations of the same strategy (same metadata, same math). The CPU path
  when the interpreter is off, and the reference the kernels are tested against.

``BSM_BACKEND=auto|triton|torch`` overrides the automatic choice for the whole process; ``auto`` picks
``triton`` on CUDA or under the interpreter and ``torch`` otherwise. An explicit ``triton`` on CPU without
the interpreter is an error, not a silent fallback.

``BSM_CHECK=1`` makes routing verify expert ids on GPU too (one host sync); on CPU they are always checked.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """Return ``"triton"`` or ``"torch"`` for ``device``; ``backend=None`` reads ``BSM_BACKEND``."""
    choice = backend if backend is not None else os.environ.get("BSM_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "triton" if device.type == "cuda" or interpreting() else "torch"
    if choice == "triton" and device.type != "cuda" and not interpreting():
        raise ValueError(
            f"backend='triton' needs a CUDA tensor or TRITON_INTERPRET=1, got a tensor on {device} "
            "with the interpreter off; use backend='torch' or 'auto'"
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
