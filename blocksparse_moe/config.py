"""Every choice the package makes from its environment, in one place.

Three words name the three choices users see; each is made in one function here:

- **strategy** (``impl=``): how the expert MLPs are laid out — ``blocksparse``, ``grouped``, ``padded``,
  ``reference`` (``functional.moe_mlp``; ``auto`` is resolved by ``options.resolve_impl``).
- **backend** (``backend=``, ``BSM_BACKEND``): which code runs the ops — the Triton kernels (``"triton"``: on CUDA,
  or on CPU under ``TRITON_INTERPRET=1``) or their PyTorch implementation (``"torch"``: the CPU path, float64, and
  the reference of the tests). ``resolve_backend`` below.
- **routing implementation** (``BSM_ROUTING``): which code computes the routing plan on CUDA — the compiled
  extension, the cupy/NVRTC JIT or PyTorch (``routing.routing_implementation``).

``SWITCHES`` is the table of every ``BSM_*`` environment variable (name, values, default, meaning); the README's
switch table and ``python -m blocksparse_moe.info`` print from it, and ``switch(name)`` reads one (an empty value
means unset, like an absent one; a value outside the switch's set is a ``ValueError`` naming both).
``DTYPES`` is the table of the data types each backend takes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = [
    "Switch",
    "SWITCHES",
    "switch",
    "switch_default",
    "switch_table",
    "interpreting",
    "BACKENDS",
    "FLOAT_DTYPES",
    "TRITON_DTYPES",
    "AUTOCAST_DTYPES",
    "INDEX_DTYPES",
    "resolve_backend",
    "check_enabled",
]


@dataclass(frozen=True)
class Switch:
    """One ``BSM_*`` environment variable."""

    name: str
    values: tuple[str, ...] | None  # the accepted values; None: free text (a path, a list, a number)
    default: str
    meaning: str
    when: str  # "build" (read by setup.py at install time) or "run" (read at run time)


SWITCHES: tuple[Switch, ...] = (
    Switch(
        "BSM_CUDA",
        ("auto", "1", "0"),
        "auto",
        "build the CUDA routing module when nvcc is found (`auto`), require it (`1`), or skip it (`0`)",
        "build",
    ),
    Switch(
        "BSM_CUDA_ARCHS",
        None,
        "80;90",
        "CUDA architectures of the routing module (SASS for each, PTX for the newest)",
        "build",
    ),
    Switch(
        "BSM_REQUIRE_CUDA_BUILD",
        ("0", "1"),
        "0",
        "tests: fail instead of skip when the CUDA module is not built (CI)",
        "run",
    ),
    Switch(
        "BSM_REQUIRE_NVRTC",
        ("0", "1"),
        "0",
        "tests: fail instead of skip when NVRTC cannot compile the routing source (CI)",
        "run",
    ),
    Switch(
        "BSM_ROUTING",
        ("auto", "ext", "cupy", "torch"),
        "auto",
        "routing implementation for CUDA tensors (an "
        "unavailable forced one is an error); CPU tensors always use PyTorch",
        "run",
    ),
    Switch(
        "BSM_CACHE_DIR",
        None,
        "~/.cache/blocksparse_moe",
        "folder of the NVRTC-built routing kernels; key: source hash, architecture, NVRTC version",
        "run",
    ),
    Switch(
        "BSM_BACKEND",
        ("auto", "triton", "torch"),
        "auto",
        "kernels backend: Triton (CUDA, or CPU under "
        "TRITON_INTERPRET=1) or the PyTorch implementation of the same strategy",
        "run",
    ),
    Switch(
        "BSM_CHECK",
        ("0", "1"),
        "0",
        "validate expert ids on CUDA too (one host sync); always on for CPU tensors",
        "run",
    ),
)
_BY_NAME = {s.name: s for s in SWITCHES}


def switch(name: str) -> str:
    """The value of switch ``name`` in the environment, or its default when unset or empty; a ``ValueError`` when
    the value is not one the switch takes."""
    spec = _BY_NAME[name]
    value = os.environ.get(name, "")
    if value == "":
        return spec.default
    if spec.values is not None and value not in spec.values:
        raise ValueError(f"environment variable {name} must be one of {spec.values} (or unset), got {value!r}")
    return value


def switch_default(name: str) -> str:
    """The default of switch ``name`` (its value when unset)."""
    return _BY_NAME[name].default


def switch_table() -> str:
    """The switch table as Markdown (the README's table is this text)."""
    rows = ["| switch | values | default | when | meaning |", "|---|---|---|---|---|"]
    for s in SWITCHES:
        values = "\\|".join(s.values) if s.values else "text"
        rows.append(f"| `{s.name}` | {values} | `{s.default}` | {s.when} | {s.meaning} |")
    return "\n".join(rows)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET``, Triton's own switch)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------- data types

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # tokens and weights: the torch backend
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the Triton kernels' (float64: the torch backend)
AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what torch.autocast casts
INDEX_DTYPES = (torch.int32, torch.int64)  # expert ids a user may pass (routing buffers are int32)

# ----------------------------------------------------------------------------------------------- backend

BACKENDS = ("auto", "triton", "torch")


def resolve_backend(device: torch.device, backend: str | None = None, dtype: torch.dtype | None = None) -> str:
    """Return ``"triton"`` or ``"torch"`` for operands on ``device`` of ``dtype``; ``backend=None`` reads
    ``BSM_BACKEND``. ``auto`` picks ``triton`` on CUDA or under the interpreter for ``TRITON_DTYPES``, else
    ``torch``; an explicit ``triton`` where it cannot run is an error, not a silent fallback."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    choice = backend if backend is not None else switch("BSM_BACKEND")
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
    """Whether to validate data-dependent inputs (expert ids) now. Never while ``torch.compile`` traces or on the
    meta device (no data to read); otherwise ``check`` when given, else always on CPU and on CUDA with
    ``BSM_CHECK=1`` (one host sync)."""
    if device.type == "meta" or torch.compiler.is_compiling():
        return False
    if check is not None:
        return check
    if device.type != "cuda":
        return True
    return switch("BSM_CHECK") == "1"
