"""``python -m blocksparse_moe.info``: which implementation each part of the package will use here, and why.

Like ``torch.utils.collect_env``: versions, what is built or installed, the switches in the environment, then per
part (routing on CPU and on each CUDA device, the kernels) the backend and the reason. It never fails: a problem
is printed as the reason. Paste its output into bug reports.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable

import torch

SWITCHES = ("BSM_ROUTING", "BSM_BACKEND", "BSM_CHECK", "BSM_CACHE_DIR", "TRITON_INTERPRET")


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


def _nvrtc() -> str:
    from . import _jit

    def describe() -> str:
        major, minor = _jit.nvrtc_version()
        archs = sorted(_jit._nvrtc().getSupportedArchs())
        return f"{major}.{minor} (sm_{archs[0]} .. sm_{archs[-1]})"

    return _try(describe)


def _jit_compiles(arch: int) -> str:
    from . import _jit

    def check() -> str:
        data = _jit.binary(arch)
        kind, flag = _jit.target(arch)
        return f"the routing kernels compile for {flag} ({kind}, {len(data)} bytes, cache {_jit.cache_path(arch)})"

    return _try(check)


def collect() -> list[tuple[str, str]]:
    """``(label, value)`` lines of the report."""
    from . import _ext, _jit, backends, config
    from .routing import routing_backend

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
    lines += [(name, os.environ.get(name, "<unset>")) for name in SWITCHES]

    def routing_line(device: torch.device) -> str:
        name, why = routing_backend(device)
        return f"{name}: {why}"

    def kernels_line(device: torch.device) -> str:
        name = config.resolve_backend(device)
        why = "Triton kernels" if name == "triton" else "the PyTorch implementation of the same strategy"
        if device.type == "cpu" and name == "triton":
            why += " under Triton's interpreter (TRITON_INTERPRET=1)"
        return f"{name}: {why}"

    cpu = torch.device("cpu")
    lines.append(("routing, CPU tensors", _try(lambda: routing_line(cpu))))
    lines.append(("kernels, CPU tensors", _try(lambda: kernels_line(cpu))))
    lines.append(("torch backend GEMMs, CPU", _try(lambda: f"{backends.get('torch').host_primitive(cpu)} (probed)")))
    count = _try(lambda: str(torch.cuda.device_count()))
    if count.isdigit() and int(count) > 0:
        for index in range(int(count)):
            device = torch.device("cuda", index)
            label = _try(lambda d=device: f"{torch.cuda.get_device_name(d)}, sm_{_jit._device_arch(d)}")
            lines.append((f"routing, cuda:{index} ({label})", _try(lambda d=device: routing_line(d))))
            lines.append((f"kernels, cuda:{index}", _try(lambda d=device: kernels_line(d))))
    else:
        requested = os.environ.get("BSM_ROUTING", "auto")
        if requested != "auto":
            order = f"{requested} (forced by BSM_ROUTING)"
        else:
            order = "ext (built)" if _ext.cuda_available() else "the cupy JIT if it loads there, else torch"
        lines.append(("routing, CUDA tensors", f"no CUDA device visible; on one: {order}"))
        lines.append(("cupy JIT check (no device)", _jit_compiles(90)))
    return lines


def main() -> None:
    lines = collect()
    width = max(len(label) for label, _ in lines)
    for label, value in lines:
        print(f"{label:<{width}}  {value}")


if __name__ == "__main__":
    main()
