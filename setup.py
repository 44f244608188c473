"""Build the routing extensions with CMake + pybind11 (metadata lives in pyproject.toml; never imports torch).

Environment switches (``SWITCHES``: the build's rows of blocksparse_moe.config.SWITCHES, read here without importing
the package, which imports torch; a test checks that names, values and defaults agree; empty means unset):
    BSM_CUDA=auto|1|0   build blocksparse_moe._routing_cuda when nvcc is found (auto), or fail without it (1),
                        or skip it (0). Without it the package is pure Python + Triton.
    BSM_CUDA_ARCHS      CUDA architectures, default "80;90" (SASS for each, PTX for the newest).
    MAX_JOBS            parallel build jobs (default: CPU count).

blocksparse_moe._routing_host (the same routing C++ for the host compiler) is always attempted; if it fails the
install continues with one warning.

The routing sources the cupy backend compiles at run time with NVRTC (JIT_SOURCES) are copied into the package,
as blocksparse_moe/_jit_src/, so that installs without any compiled module can still run the C++ routing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
# name -> (accepted values or None for free text, default): the build's rows of blocksparse_moe.config.SWITCHES
SWITCHES = {"BSM_CUDA": (("auto", "1", "0"), "auto"), "BSM_CUDA_ARCHS": (None, "80;90")}
JIT_SOURCES = ("routing_jit.cu", "routing.h")  # = blocksparse_moe/routing/jit.py SOURCE_FILES (a test checks it)


def switch(name: str) -> str:
    """The value of build switch ``name``, its default when unset or empty; a ValueError for a value it does not
    take (the rule of blocksparse_moe.config.switch)."""
    values, default = SWITCHES[name]
    value = os.environ.get(name, "") or default
    if values is not None and value not in values:
        raise ValueError(f"environment variable {name} must be one of {values} (or unset), got {value!r}")
    return value


class CMakeExtension(Extension):
    """An extension module produced by the CMake target of the same (last) name."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[], optional=True)
        self.target = name.rpartition(".")[2]


def _warn(message: str) -> None:
    print(f"WARNING (blocksparse_moe build): {message}", file=sys.stderr, flush=True)


class CMakeBuild(build_ext):
    """Configure once, build every target (keep going on errors), then keep the modules that were built."""

    def build_extensions(self) -> None:
        mode = switch("BSM_CUDA")
        build_dir = Path(self.build_temp).resolve() / "cmake"
        out_dir = Path(self.get_ext_fullpath(self.extensions[0].name)).resolve().parent
        build_dir.mkdir(parents=True, exist_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)

        configured = self._configure(build_dir, out_dir, mode)
        outputs = {ext.target: Path(self.get_ext_fullpath(ext.name)) for ext in self.extensions}
        for path in outputs.values():
            path.unlink(missing_ok=True)  # a stale module from an earlier build must not pass for a new one
        if configured:
            jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
            keep_going = ["-k", "0"] if (build_dir / "build.ninja").exists() else ["-k"]
            subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs, "--", *keep_going], check=False)

        built = [ext for ext in self.extensions if outputs[ext.target].exists()]
        for ext in self.extensions:
            if ext in built or not configured:  # not configured: _configure has already warned
                continue
            if ext.target == "_routing_cuda":
                if mode == "1":
                    raise RuntimeError("BSM_CUDA=1 but blocksparse_moe._routing_cuda failed to build (see above)")
                if self._cuda_configured(build_dir):
                    _warn("the CUDA routing extension failed to build (see above); using the PyTorch routing path")
            else:
                _warn(f"{ext.name} failed to build (see above); the package works without it, its tests skip")
        self.extensions[:] = built  # so that an editable install copies only what exists

    def _configure(self, build_dir: Path, out_dir: Path, mode: str) -> bool:
        """Run CMake; in auto mode a CUDA configuration failure retries without CUDA. False: nothing to build."""
        import pybind11  # a build requirement (pyproject.toml)

        args = [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DBSM_OUTPUT_DIR={out_dir}",
            f"-DBSM_CUDA_ARCHS={switch('BSM_CUDA_ARCHS')}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja") and not (build_dir / "Makefile").exists():
            args += ["-G", "Ninja"]
        if subprocess.run([*args, f"-DBSM_CUDA={mode}"], check=False).returncode == 0:
            if mode == "auto" and not self._cuda_configured(build_dir):
                _warn("nvcc not found: blocksparse_moe._routing_cuda is not built (routing uses PyTorch on GPU)")
            return True
        if mode == "1":
            raise RuntimeError("BSM_CUDA=1 but CMake could not configure the CUDA build (see above)")
        if mode == "auto" and subprocess.run([*args, "-DBSM_CUDA=0"], check=False).returncode == 0:
            _warn("CUDA configuration failed (see above): blocksparse_moe._routing_cuda is not built")
            return True
        _warn("CMake configuration failed (see above): no compiled routing extension is built")
        return False

    @staticmethod
    def _cuda_configured(build_dir: Path) -> bool:
        cache = build_dir / "CMakeCache.txt"
        return cache.exists() and "BSM_HAVE_CUDA_CONFIGURED:INTERNAL=ON" in cache.read_text()


class BuildPy(build_py):
    """The Python package plus csrc's JIT sources as blocksparse_moe/_jit_src/ (read by blocksparse_moe.routing.jit)."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "blocksparse_moe" / "_jit_src"
        target.mkdir(parents=True, exist_ok=True)
        for name in JIT_SOURCES:
            shutil.copyfile(ROOT / "csrc" / name, target / name)


setup(
    ext_modules=[CMakeExtension("blocksparse_moe._routing_host"), CMakeExtension("blocksparse_moe._routing_cuda")],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy},
)
