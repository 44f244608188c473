"""The cupy implementation of the routing (``"cupy"``): ``csrc/routing.h`` compiled at first use with NVRTC, cached
on disk, and launched on PyTorch's current stream with raw pointers (no copy, no host sync). For GPU installs without
the compiled extension (``pip install "blocksparse_moe[cupy]"``); ``routing.routing_implementation`` decides when.

Layers, each testable without a GPU except the last:

- ``sources()``: exactly what NVRTC compiles: ``routing_jit.cu`` (the steps of ``routing.h`` as ``extern "C"``
  kernels) with ``routing.h`` as a named header. No CUDA header is used, so no toolkit is needed. Found in the
  package (``blocksparse_moe/_jit_src``, copied there by ``setup.py``) or in the source tree (``csrc/``).
- ``nvrtc_compile(arch)``: NVRTC → a cubin for ``sm_<arch>`` (PTX for an arch newer than NVRTC knows), through the
  low-level binding ``cupy_backends.cuda.libs.nvrtc``, which needs no device (cupy's ``RawModule`` queries one).
- ``binary(arch)``: ``nvrtc_compile`` through the disk cache (``BSM_CACHE_DIR``, default ``~/.cache/blocksparse_moe``),
  keyed by the sources, options, arch and NVRTC version (``cache_key``). An unwritable cache warns once.
- ``params(...)``: ``routing.h``'s ``RoutingParams`` as a one-element numpy structured array, built by name.
- ``steps(...)``: the launch sequence of ``routing.h``'s ``plan_routing`` (names and extents).
- ``plan_buffers(idx, sizes)``: allocate with torch (``spec.allocate``), build the params, launch every step. The
  tests run it on the CPU with ``_routing_host.run_step`` as the launcher (same steps, host loops).
- ``prepare(device)`` / the launcher: load the binary into the device's context (``cupy.cuda.function.Module``)
  and launch each kernel on ``cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)``.

Failures that make the implementation unavailable raise ``JitUnavailable`` (``quiet`` when cupy is simply not
installed); the dispatcher (``routing``) then warns once and uses the PyTorch routing, or raises when cupy was forced.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import tempfile
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import torch

from ..config import switch, switch_default
from . import spec
from .spec import PlanSizes

__all__ = ["JitUnavailable", "binary", "cache_dir", "cache_key", "nvrtc_compile", "plan_buffers", "prepare", "sources"]

# The files NVRTC compiles (setup.py ships the same two names in blocksparse_moe/_jit_src).
SOURCE_FILES = ("routing_jit.cu", "routing.h")
OPTIONS = ("-std=c++17",)
THREADS = 256  # threads per block; every kernel strides over its own extent, so the grid only sets the speed
MAX_BLOCKS = 1 << 20
# routing.h's RoutingShape, in order (all int64); RoutingBuffers follows: top_k_index, then sizes.buffer_names().
SHAPE_FIELDS = (
    "num_tokens",
    "top_k",
    "num_experts",
    "block_size",
    "max_block_rows",
    "index_is_int64",
    "tile_size",
    "num_tiles",
    "tiles_per_group",
    "num_groups",
)
# The kernels routing_jit.cu exports (bsm_<name>): routing.h's BSM_ROUTING_STEPS (a test checks it).
KERNELS = ("init", "keys_i32", "keys_i64", "tile_scan", "counts", "offsets", "place")
INSTALL_HINT = 'pip install "blocksparse_moe[cupy]"'


class JitUnavailable(RuntimeError):
    """The cupy JIT routing cannot run here; ``quiet`` when the reason is only that cupy is not installed."""

    def __init__(self, reason: str, quiet: bool = False) -> None:
        super().__init__(reason)
        self.quiet = quiet


# ------------------------------------------------------------------------------------------------ sources


def source_dir() -> Path:
    """Where the JIT sources are: the package copy (installed wheels) or the source tree's ``csrc/``."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "_jit_src", package.parent / "csrc"):
        if all((candidate / name).is_file() for name in SOURCE_FILES):
            return candidate
    raise JitUnavailable(
        f"the routing sources {SOURCE_FILES} are neither in {package / '_jit_src'} nor in {package.parent / 'csrc'} "
        "(a broken install: reinstall blocksparse_moe)"
    )


def sources() -> tuple[str, dict[str, str]]:
    """``(routing_jit.cu text, {header name: text})``: exactly what NVRTC compiles."""
    folder = source_dir()
    main, *headers = SOURCE_FILES
    return (folder / main).read_text(), {name: (folder / name).read_text() for name in headers}


# ------------------------------------------------------------------------------------------------ compile


def _nvrtc():
    """cupy's low-level NVRTC binding, with the library loaded (JitUnavailable when either is missing)."""
    try:
        nvrtc = importlib.import_module("cupy_backends.cuda.libs.nvrtc")
    except ImportError as exc:
        raise JitUnavailable(f"cupy is not installed ({INSTALL_HINT}): {exc}", quiet=True) from exc
    try:
        nvrtc.getVersion()
    except Exception as exc:  # cupy raises several types when libnvrtc cannot be loaded
        raise JitUnavailable(
            f"NVRTC cannot be loaded ({type(exc).__name__}: {exc}); install the NVRTC wheel that matches cupy's "
            'CUDA major version: pip install "nvidia-cuda-nvrtc==13.*" (cupy-cuda13x) or nvidia-cuda-nvrtc-cu12 '
            f"(cupy-cuda12x), or {INSTALL_HINT}"
        ) from exc
    return nvrtc


def nvrtc_version() -> tuple[int, int]:
    return tuple(_nvrtc().getVersion())


def target(arch: int) -> tuple[str, str]:
    """``("cubin" | "ptx", NVRTC -arch value)`` for a device of compute capability ``arch`` (e.g. 90)."""
    supported = sorted(_nvrtc().getSupportedArchs())
    if arch in supported:
        return "cubin", f"sm_{arch}"
    if arch > supported[-1]:  # newer than this NVRTC: PTX of the newest arch it knows, JIT-compiled by the driver
        return "ptx", f"compute_{supported[-1]}"
    major, minor = nvrtc_version()
    raise JitUnavailable(f"NVRTC {major}.{minor} cannot compile for sm_{arch} (it supports sm_{supported})")


def cache_key(arch: int, nvrtc: tuple[int, int] | None = None, text: tuple[str, dict[str, str]] | None = None) -> str:
    """Hex digest of everything the binary depends on: sources, options, target and NVRTC version."""
    main, headers = text if text is not None else sources()
    kind, arch_flag = target(arch)
    digest = hashlib.sha256()
    parts = [main, *(f"{name}\0{body}" for name, body in sorted(headers.items())), *OPTIONS, kind, arch_flag]
    parts.append(".".join(map(str, nvrtc if nvrtc is not None else nvrtc_version())))
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0\1")
    return digest.hexdigest()


def nvrtc_compile(arch: int, text: tuple[str, dict[str, str]] | None = None) -> bytes:
    """The routing kernels compiled by NVRTC for compute capability ``arch`` (cubin, or PTX; see ``target``)."""
    nvrtc = _nvrtc()
    main, headers = text if text is not None else sources()
    kind, arch_flag = target(arch)
    program = nvrtc.createProgram(
        main, SOURCE_FILES[0], [body.encode() for body in headers.values()], [name.encode() for name in headers]
    )
    try:
        try:
            nvrtc.compileProgram(program, [*OPTIONS, f"-arch={arch_flag}"])
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(program)
            raise JitUnavailable(f"NVRTC failed to compile the routing kernels for {arch_flag}: {exc}\n{log}") from exc
        if kind == "cubin":
            return nvrtc.getCUBIN(program)
        return nvrtc.getPTX(program).rstrip(b"\0") + b"\0"  # the driver reads PTX as a C string
    finally:
        nvrtc.destroyProgram(program)


def cache_dir() -> Path:
    """``BSM_CACHE_DIR``, else ``$XDG_CACHE_HOME/blocksparse_moe``, else ``~/.cache/blocksparse_moe``."""
    chosen = switch("BSM_CACHE_DIR")
    if chosen == switch_default("BSM_CACHE_DIR") and os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "blocksparse_moe"
    return Path(chosen).expanduser()


def cache_path(arch: int) -> Path:
    kind, arch_flag = target(arch)
    return cache_dir() / f"routing-{arch_flag}-{cache_key(arch)[:24]}.{kind}"


_warned_cache: set[str] = set()


def binary(arch: int) -> bytes:
    """``nvrtc_compile(arch)`` through the disk cache. A cache that cannot be read or written costs a compile per
    process and one warning, nothing else."""
    path = cache_path(arch)
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):  # not cached (yet)
        pass
    except OSError as exc:
        _warn_cache(f"cannot read {path} ({exc})")
    data = nvrtc_compile(arch)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)  # atomic: a concurrent reader sees the old file or the whole new one
    except OSError as exc:
        _warn_cache(f"cannot write {path} ({exc})")
    return data


def _warn_cache(problem: str) -> None:
    if problem in _warned_cache:
        return
    _warned_cache.add(problem)
    warnings.warn(
        f"blocksparse_moe: the routing kernel cache is not usable: {problem}; the kernels are recompiled in each "
        "process (set BSM_CACHE_DIR to a writable folder)",
        RuntimeWarning,
        stacklevel=3,
    )


# ------------------------------------------------------------------------------------------------ launch sequence


@cache
def params_dtype() -> np.dtype:
    """``routing.h``'s ``RoutingParams``: the shape (int64) then the pointers (uint64), 8-byte fields only."""
    pointers = ("top_k_index", *PlanSizes.buffer_names())
    return np.dtype([(name, "<i8") for name in SHAPE_FIELDS] + [(name, "<u8") for name in pointers])


def params(top_k_index: torch.Tensor, sizes: PlanSizes, buffers: dict[str, torch.Tensor]) -> np.ndarray:
    """The kernels' argument: a one-element structured array (cupy passes it by value)."""
    dtype = params_dtype()
    shape = [
        int(top_k_index.dtype == torch.int64) if n == "index_is_int64" else getattr(sizes, n) for n in SHAPE_FIELDS
    ]
    pointers = [top_k_index.data_ptr()]
    pointers += [buffers[n].data_ptr() for n in dtype.names[len(SHAPE_FIELDS) + 1 :]]
    return np.array([(*shape, *pointers)], dtype=dtype)


def steps(sizes: PlanSizes, index_is_int64: bool) -> list[tuple[str, int]]:
    """``(kernel name, extent)`` in the order of ``routing.h``'s ``plan_routing`` (the extents size the grids)."""
    A, bins = sizes.num_assignments, sizes.num_experts + 1
    return [
        ("init", max(sizes.num_tiles * bins, sizes.max_block_rows * sizes.block_size)),
        ("keys_i64" if index_is_int64 else "keys_i32", A),
        ("tile_scan", sizes.num_groups * bins),
        ("counts", bins),
        ("offsets", bins),
        ("place", A),
    ]


Launcher = Callable[[str, int, np.ndarray], None]


def plan_buffers(
    top_k_index: torch.Tensor, sizes: PlanSizes, launch: Launcher | None = None
) -> dict[str, torch.Tensor]:
    """The plan's buffers filled by the routing kernels, launched by ``launch(name, extent, params)`` (default:
    the CUDA launcher of the tensor's device, on the current stream; no sync, no copy)."""
    idx = top_k_index.contiguous()
    buffers = spec.allocate(sizes, idx.device)
    p = params(idx, sizes, buffers)
    sequence = [(name, extent) for name, extent in steps(sizes, idx.dtype == torch.int64) if extent]
    if launch is None:
        _launcher(idx.device).run(sequence, p)
    else:
        for name, extent in sequence:
            launch(name, extent, p)
    return {name: buffers[name] for name in sizes.shapes()}


# ------------------------------------------------------------------------------------------------ CUDA


def _device_arch(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _load_module(device: torch.device, data: bytes):
    """The binary loaded into ``device``'s (primary) context, as a ``cupy.cuda.function.Module``."""
    import cupy

    with cupy.cuda.Device(device.index):
        module = cupy.cuda.function.Module()
        module.load(data)
        return module


class _Launcher:
    """Launches the ``bsm_<name>`` kernels of one device's module on PyTorch's current stream."""

    def __init__(self, device: torch.device, module) -> None:
        import cupy

        self.device = device
        self.cupy = cupy
        self.functions = {name: module.get_function(f"bsm_{name}") for name in KERNELS}

    def run(self, sequence: list[tuple[str, int]], p: np.ndarray) -> None:
        """Launch ``bsm_<name>`` over ``extent`` for each step, in order, on the current stream."""
        stream = self.cupy.cuda.ExternalStream(torch.cuda.current_stream(self.device).cuda_stream, self.device.index)
        with self.cupy.cuda.Device(self.device.index):
            for name, extent in sequence:
                blocks = min(-(-extent // THREADS), MAX_BLOCKS)
                self.functions[name]((blocks,), (THREADS,), (p,), stream=stream)


_prepared: dict[int, str | JitUnavailable] = {}
_launchers: dict[int, _Launcher] = {}


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _prepare(device_index: int) -> str:
    device = torch.device("cuda", device_index)
    arch = _device_arch(device)
    data = binary(arch)
    try:
        module = _load_module(device, data)
        _launchers[device_index] = _Launcher(device, module)
    except Exception as exc:  # the driver refused the binary (e.g. PTX newer than the driver), or a kernel is missing
        raise JitUnavailable(
            f"the NVRTC-built routing kernels could not be loaded on cuda:{device_index} ({type(exc).__name__}: {exc})"
        ) from exc
    major, minor = nvrtc_version()
    kind, arch_flag = target(arch)
    return f"cupy JIT ready (NVRTC {major}.{minor}, {kind} for {arch_flag}, cache {cache_dir()})"


def prepare(device: torch.device) -> str:
    """Compile (or read from the cache) and load the kernels for ``device``, once per process; returns a status
    line, or raises ``JitUnavailable`` (a failure is remembered and raised again without a new attempt)."""
    index = _device_index(torch.device(device))
    if index not in _prepared:
        try:
            _prepared[index] = _prepare(index)
        except JitUnavailable as exc:
            _prepared[index] = exc
    result = _prepared[index]
    if isinstance(result, JitUnavailable):
        raise JitUnavailable(str(result), quiet=result.quiet)
    return result


def _launcher(device: torch.device) -> _Launcher:
    prepare(device)
    return _launchers[_device_index(device)]


def reset() -> None:
    """Forget what ``prepare`` decided and loaded (tests)."""
    _prepared.clear()
    _launchers.clear()
