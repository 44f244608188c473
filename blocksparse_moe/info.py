"""``python -m blocksparse_moe.info``: which implementation each part of the package will use here, and why.

Like ``torch.utils.collect_env``: versions, what is built or installed, every switch of ``config.SWITCHES`` (its
value and default), then the three choices users see, each in its own word: the **strategy** (``impl=``, chosen per
call), the **kernels backend** (``backend=`` / ``BSM_BACKEND``) and the **routing implementation** (``BSM_ROUTING``),
on CPU and on each CUDA device, with the reason. The report never stops at a problem: it is printed as the reason.
A switch set to a value it does not take is an error: the report says so on its line and ``main`` exits with
status 2 after printing it. Paste its output into bug reports.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable

import torch

from . import backends, config
from .routing import ext as _ext
from .routing import jit as _jit
from .routing import routing_implementation

STRATEGIES = "blocksparse, grouped, padded, reference (moe_mlp(impl=...), chosen per call)"


def _try(fn: Callable[[], str]) -> str:
    try:
        return fn()
    except Exception as exc:  # info must describe failures, not raise them
        return f"unavailable: {type(exc).__name__}: {exc}".splitlines()[0]


def _version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    return _try(lambda: str(importlib.import_module(module).__version__))


def _extension(name: str) -> str:
    spec = importlib.util.find_spec(f"blocksparse_moe.{name}")
    return f"built ({spec.origin})" if spec is not None and spec.origin else "not built"


def _switch_line(switch: config.Switch) -> str:
    """``value (default D)``; ``<unset>`` for an absent or empty variable; ``invalid: ...`` for a value it does not
    take."""
    raw = os.environ.get(switch.name, "")
    try:
        config.switch(switch.name)
    except ValueError as exc:
        return f"invalid: {exc}"
    return f"{raw or '<unset>'} (default {switch.default})"


def invalid_switches() -> list[str]:
    """The errors of the switches set to a value they do not take."""
    errors = []
    for s in config.SWITCHES:
        try:
            config.switch(s.name)
        except ValueError as exc:
            errors.append(str(exc))
    return errors


def _nvrtc() -> str:
    def describe() -> str:
        major, minor = _jit.nvrtc_version()
        archs = sorted(_jit._nvrtc().getSupportedArchs())
        return f"{major}.{minor} (sm_{archs[0]} .. sm_{archs[-1]})"

    return _try(describe)


def _jit_compiles(arch: int) -> str:
    def check() -> str:
        data = _jit.binary(arch)
        kind, flag = _jit.target(arch)
        return f"the routing kernels compile for {flag} ({kind}, {len(data)} bytes, cache {_jit.cache_path(arch)})"

    return _try(check)


def collect() -> list[tuple[str, str]]:
    """``(label, value)`` lines of the report."""
    lines = [
        ("python", sys.version.split()[0]),
        ("blocksparse_moe", os.path.dirname(__file__)),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
        ("triton", _version("triton")),
        ("cupy", _version("cupy")),
        ("NVRTC (through cupy)", _nvrtc()),
        ("_routing_host", _extension("_routing_host")),
        ("_routing_cuda", _extension("_routing_cuda")),
        ("routing JIT sources", _try(lambda: str(_jit.source_dir()))),
        ("routing JIT cache", str(_jit.cache_dir())),
    ]
    lines += [(s.name, _switch_line(s)) for s in config.SWITCHES]
    lines.append(("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET") or "<unset>"))
    lines.append(("strategy", STRATEGIES))

    def routing_line(device: torch.device) -> str:
        name, why = routing_implementation(device)
        return f"{name}: {why}"

    def kernels_line(device: torch.device) -> str:
        name = config.resolve_backend(device)
        why = "Triton kernels" if name == "triton" else "the PyTorch implementation of the same strategy"
        if device.type == "cpu" and name == "triton":
            why += " under Triton's interpreter (TRITON_INTERPRET=1)"
        return f"{name}: {why}"

    cpu = torch.device("cpu")
    lines.append(("routing implementation, CPU tensors", _try(lambda: routing_line(cpu))))
    lines.append(("kernels backend, CPU tensors", _try(lambda: kernels_line(cpu))))
    lines.append(("torch backend GEMMs, CPU", _try(lambda: f"{backends.get('torch').host_primitive(cpu)} (probed)")))
    count = _try(lambda: str(torch.cuda.device_count()))
    if count.isdigit() and int(count) > 0:
        for index in range(int(count)):
            device = torch.device("cuda", index)
            label = _try(lambda d=device: f"{torch.cuda.get_device_name(d)}, sm_{_jit._device_arch(d)}")
            lines.append((f"routing implementation, cuda:{index} ({label})", _try(lambda d=device: routing_line(d))))
            lines.append((f"kernels backend, cuda:{index}", _try(lambda d=device: kernels_line(d))))
    else:

        def order() -> str:
            requested = config.switch("BSM_ROUTING")
            if requested != "auto":
                return f"{requested} (forced by BSM_ROUTING={requested!r})"
            return "ext (built)" if _ext.cuda_available() else "the cupy JIT if it loads there, else torch"

        lines.append(("routing implementation, CUDA tensors", f"no CUDA device visible; on one: {_try(order)}"))
        lines.append(("cupy JIT check (no device)", _jit_compiles(90)))
    return lines


def main() -> int:
    """Print the report; status 2 (and the errors on stderr) when a switch holds a value it does not take."""
    lines = collect()
    width = max(len(label) for label, _ in lines)
    for label, value in lines:
        print(f"{label:<{width}}  {value}")
    errors = invalid_switches()
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 2 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
