"""The build: the package imports lazily, and the CUDA module (when built) holds sm_80 + sm_90 cubins with one
kernel per step of csrc/routing.h (no other) that use no local memory, links cudart statically, reports a missing
GPU instead of crashing, and expects exactly routing's buffer table (so a module built from older sources fails).

Without a built CUDA module these tests skip, unless BSM_REQUIRE_CUDA_BUILD=1 (CI, where nvcc exists) makes
that a failure.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blocksparse_moe.config import SWITCHES, switch

ROOT = Path(__file__).resolve().parents[1]
REQUIRE = switch("BSM_REQUIRE_CUDA_BUILD") == "1"


def _built(name: str) -> Path:
    """Path of blocksparse_moe.<name>; skip (or fail under BSM_REQUIRE_CUDA_BUILD=1) when it is not built."""
    spec = importlib.util.find_spec(f"blocksparse_moe.{name}")
    if spec is None or spec.origin is None:
        message = f"blocksparse_moe.{name} is not built (pip install -e . with nvcc on PATH)"
        if REQUIRE:
            pytest.fail(f"BSM_REQUIRE_CUDA_BUILD=1 but {message}")
        pytest.skip(message)
    return Path(spec.origin)


def _cuobjdump(*args: str) -> str:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        if REQUIRE:
            pytest.fail(f"cuobjdump not found at {tool}")
        pytest.skip(f"cuobjdump not found at {tool}")
    return subprocess.run([str(tool), *args], check=True, capture_output=True, text=True).stdout


def test_import_is_lazy():
    # importing the package loads no compiled extension and touches no device
    code = "import sys, blocksparse_moe; print([m for m in sys.modules if '_routing_' in m])"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_setup_switches_follow_the_config():
    # setup.py reads its switches without importing torch (nor the package); its table is config's build rows
    tree = ast.parse((ROOT / "setup.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in imported and "blocksparse_moe" not in imported
    table = next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "SWITCHES")
    assert ast.literal_eval(table) == {s.name: (s.values, s.default) for s in SWITCHES if s.when == "build"}


def _setup_switch():
    """setup.py's ``switch`` function with its ``SWITCHES`` table, run without running setup()."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    keep = [
        n
        for n in tree.body
        if getattr(n, "name", None) == "switch" or (isinstance(n, ast.Assign) and n.targets[0].id == "SWITCHES")
    ]
    namespace = {"os": os}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace["switch"]


@pytest.mark.parametrize("value, mode", [("", "auto"), ("0", "0")])
def test_setup_empty_switch_is_unset(monkeypatch, value, mode):
    # the rule of config.switch: empty means unset; a value outside the set is an error naming it
    switch_of_setup = _setup_switch()
    monkeypatch.setenv("BSM_CUDA", value)
    assert switch_of_setup("BSM_CUDA") == mode
    monkeypatch.setenv("BSM_CUDA", "yes")
    with pytest.raises(ValueError, match=r"BSM_CUDA must be one of \('auto', '1', '0'\) \(or unset\), got 'yes'"):
        switch_of_setup("BSM_CUDA")


def test_cuda_available_matches_build():
    from blocksparse_moe.routing import ext as _ext

    built = importlib.util.find_spec("blocksparse_moe._routing_cuda") is not None
    assert _ext.cuda_available() is built
    if REQUIRE:
        assert built, "BSM_REQUIRE_CUDA_BUILD=1 but blocksparse_moe._routing_cuda is not built"


def test_host_module_built():
    # the host build needs only a C++ compiler: CI (BSM_REQUIRE_CUDA_BUILD=1) must have it
    _built("_routing_host")
    from blocksparse_moe.routing import ext as _ext

    assert callable(_ext.host_module().plan_routing)


def test_device_count_without_crash():
    # with no GPU / no driver, cudaGetDeviceCount fails (error 35 here): reported as 0 devices, never a crash
    _built("_routing_cuda")
    from blocksparse_moe.routing import ext as _ext

    assert _ext.cuda_module().device_count() == torch.cuda.device_count()


@pytest.mark.parametrize(
    "T,k,E,B",
    [
        (0, 2, 4, 4),  # empty input
        (300, 2, 512, 16),  # E = 512 > T, two groups of tiles
    ],
)
def test_cuda_module_follows_the_table(T, k, E, B):
    # the built module (callable without a GPU) expects routing's PLAN_BUFFERS + SCRATCH_BUFFERS with their sizes,
    # and takes the RoutingParams routing.jit builds from the same names: not a module built from older sources
    path = _built("_routing_cuda")
    from blocksparse_moe.routing import PLAN_BUFFERS, SCRATCH_BUFFERS, plan_sizes
    from blocksparse_moe.routing import ext as _ext
    from blocksparse_moe.routing import jit as _jit

    mod = _ext.cuda_module()
    assert Path(mod.__file__) == path
    sizes = plan_sizes(torch.zeros(T, k, dtype=torch.int32), E, B)
    expected = [(name, math.prod(shape)) for name, shape in {**sizes.shapes(), **sizes.scratch_shapes()}.items()]
    assert mod.buffer_sizes("int32", T, k, E, B, sizes.max_block_rows) == expected
    assert [name for name, _ in expected] == [*PLAN_BUFFERS, *SCRATCH_BUFFERS]
    assert mod.params_bytes() == _jit.params_dtype().itemsize


def _step_structs() -> list[str]:
    """The step struct of each entry of routing.h's BSM_ROUTING_STEPS (Keys twice: int32 and int64 ids)."""
    header = (ROOT / "csrc" / "routing.h").read_text()
    table = re.search(r"#define BSM_ROUTING_STEPS\(X\)(.*?)\n\n", header, re.S).group(1)
    return re.findall(r"X\(\w+, ::bsm::(\w+)", table)


def test_kernels_follow_the_steps():
    # each cubin holds step_kernel<Step> for exactly the steps of BSM_ROUTING_STEPS (no removed step survives)
    path = _built("_routing_cuda")
    usage = _cuobjdump("--dump-resource-usage", str(path))
    cubins = re.split(r"Fatbin elf code:", usage)[1:]
    assert len(cubins) == 2, usage  # sm_80, sm_90
    for cubin in cubins:
        # mangled step_kernel<bsm::Step...>: "step_kernelINS_" then the length-prefixed struct name
        names = [m.group(2)[: int(m.group(1))] for m in re.finditer(r"step_kernelINS_(\d+)(\w+)", cubin)]
        assert sorted(names) == sorted(_step_structs()), cubin


def test_cubins_for_sm80_and_sm90():
    path = _built("_routing_cuda")
    elves = _cuobjdump("--list-elf", str(path))
    assert re.search(r"\.sm_80\.cubin", elves), elves
    assert re.search(r"\.sm_90\.cubin", elves), elves
    assert re.search(r"\.sm_90\.ptx", _cuobjdump("--list-ptx", str(path)))  # PTX for the newest arch


def test_no_local_memory_or_spills():
    path = _built("_routing_cuda")
    usage = _cuobjdump("--dump-resource-usage", str(path))
    functions = re.findall(r"Function (\S+):\s*\n\s*(.*)", usage)
    assert functions, usage
    offenders = [
        f"{name}: {line.strip()}"
        for name, line in functions
        if re.search(r"STACK:(\d+)", line).group(1) != "0" or re.search(r"LOCAL:(\d+)", line).group(1) != "0"
    ]
    assert not offenders, "kernels with stack / local memory (spills):\n" + "\n".join(offenders)


def test_cudart_linked_statically():
    path = _built("_routing_cuda")
    if shutil.which("ldd") is None:
        pytest.skip("ldd not available")
    needed = subprocess.run(["ldd", str(path)], check=True, capture_output=True, text=True).stdout
    assert "libcudart" not in needed, needed
