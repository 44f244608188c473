"""The cupy/NVRTC routing implementation (blocksparse_moe/routing/jit.py) and the choice of routing implementation.

On every machine: the JIT source (exactly what the backend compiles) builds with NVRTC for sm_80, sm_90 and
sm_100; the cache key follows the source; the launch sequence, run step by step by the host build of the same
C++ (``_routing_host.run_step``), equals the PyTorch routing element for element; the backend choice and every
failure (NVRTC missing, compile error, unusable cache, cupy absent) are simulated. On a GPU (``-m gpu``): the cupy
backend equals the PyTorch routing and the compiled extension, and ``moe_mlp`` runs with it under CUDA-graph
capture. Without cupy/NVRTC the NVRTC tests skip, unless ``BSM_REQUIRE_NVRTC=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import poison_
from routing_cases import CASES, assert_same_plan, cpp_buffer_table, make_index, torch_plan

from blocksparse_moe import config, info, routing
from blocksparse_moe.routing import SCRATCH_BUFFERS, RoutingPlan, plan_routing, plan_sizes, routing_implementation, spec
from blocksparse_moe.routing import ext as _ext
from blocksparse_moe.routing import jit as _jit

ROOT = Path(__file__).resolve().parents[1]
REQUIRE_NVRTC = config.switch("BSM_REQUIRE_NVRTC") == "1"
ARCHS = (80, 90, 100)


def _nvrtc_or_skip():
    """cupy's NVRTC binding; skip (fail under BSM_REQUIRE_NVRTC=1) when cupy or NVRTC is missing."""
    try:
        return _jit._nvrtc()
    except _jit.JitUnavailable as exc:
        if REQUIRE_NVRTC:
            pytest.fail(f"BSM_REQUIRE_NVRTC=1 but {exc}")
        pytest.skip(f"needs cupy and NVRTC ({_jit.INSTALL_HINT}): {exc}")


@pytest.fixture
def nvrtc():
    return _nvrtc_or_skip()


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One cache folder for the tests that only need a compiled binary (each compile takes ~1 s)."""
    return tmp_path_factory.mktemp("bsm-cache")


@pytest.fixture(autouse=True)
def _fresh_choice(monkeypatch, shared_cache):
    """Every test starts with no remembered backend choice, no env switch, and a private cache folder."""
    monkeypatch.delenv("BSM_ROUTING", raising=False)
    monkeypatch.setenv("BSM_CACHE_DIR", str(shared_cache))
    _jit.reset()
    routing._auto_cuda.cache_clear()
    _jit._warned_cache.clear()
    yield
    _jit.reset()
    routing._auto_cuda.cache_clear()


# ------------------------------------------------------------------------------------------- NVRTC, no GPU


@pytest.mark.parametrize("arch", ARCHS)
def test_jit_source_compiles(nvrtc, arch):
    # the exact text the backend compiles builds for each architecture, and exports every kernel by name
    binary = _jit.nvrtc_compile(arch)
    assert binary[:4] == b"\x7fELF"  # a cubin
    for name in _jit.KERNELS:
        assert f"bsm_{name}".encode() in binary, name


def test_jit_ptx_for_an_arch_newer_than_nvrtc(nvrtc):
    # a device newer than NVRTC gets PTX of the newest arch NVRTC knows (the driver compiles it)
    newest = max(nvrtc.getSupportedArchs())
    assert _jit.target(newest + 10) == ("ptx", f"compute_{newest}")
    ptx = _jit.nvrtc_compile(newest + 10)
    assert ptx.endswith(b"\0")  # the driver reads PTX as a C string
    text = ptx.decode()
    assert sorted(re.findall(r"\.entry bsm_(\w+)\(", text)) == sorted(_jit.KERNELS)  # every step, no other
    with pytest.raises(_jit.JitUnavailable, match=r"cannot compile for sm_50"):
        _jit.target(50)  # an arch older than NVRTC supports


def test_cache_key_follows_the_source(nvrtc):
    main, headers = _jit.sources()
    key = _jit.cache_key(90)
    assert key == _jit.cache_key(90, text=(main, headers))  # deterministic
    assert _jit.cache_key(90, text=(main + "\n// changed", headers)) != key  # the kernel file
    changed = {name: body.replace("256 *", "512 *") for name, body in headers.items()}
    assert changed != headers and _jit.cache_key(90, text=(main, changed)) != key  # the header
    assert _jit.cache_key(80) != key  # the architecture
    assert _jit.cache_key(90, nvrtc=(99, 0)) != key  # the NVRTC version


def test_binary_is_cached_on_disk(nvrtc, monkeypatch, tmp_path):
    # the first call compiles and writes the cache; the next reads it; a changed source compiles again
    monkeypatch.setenv("BSM_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = _jit.nvrtc_compile
    monkeypatch.setattr(_jit, "nvrtc_compile", lambda arch: calls.append(arch) or real(arch))
    first = _jit.binary(90)
    assert calls == [90] and _jit.cache_path(90).read_bytes() == first
    assert _jit.binary(90) == first and calls == [90]
    main, headers = _jit.sources()
    monkeypatch.setattr(_jit, "sources", lambda: (main + "\n// changed", headers))
    _jit.binary(90)
    assert calls == [90, 90] and len(list((tmp_path / "cache").glob("routing-sm_90-*.cubin"))) == 2


def test_unwritable_cache_warns_once_and_still_compiles(nvrtc, monkeypatch, tmp_path):
    # a cache folder that cannot be created (its parent is a file; root ignores permission bits)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("BSM_CACHE_DIR", str(blocker / "cache"))
    with pytest.warns(RuntimeWarning, match=r"routing kernel cache is not usable: cannot write .*BSM_CACHE_DIR"):
        first = _jit.binary(90)
    assert first[:4] == b"\x7fELF"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _jit.binary(90) == first  # recompiled, without a second warning


def test_compile_error_is_reported_with_the_log(nvrtc, monkeypatch):
    main, headers = _jit.sources()
    monkeypatch.setattr(_jit, "sources", lambda: (main + "\nthis is not C++;\n", headers))
    with pytest.raises(_jit.JitUnavailable, match=r"NVRTC failed to compile .*sm_90.*\n.*error") as info:
        _jit.nvrtc_compile(90)
    assert not info.value.quiet


def test_nvrtc_library_missing(nvrtc, monkeypatch):
    # cupy installed, libnvrtc not loadable: a loud failure that says which wheel to install
    def missing():
        raise RuntimeError("CuPy failed to load libnvrtc.so.13")

    monkeypatch.setattr(nvrtc, "getVersion", missing)
    with pytest.raises(_jit.JitUnavailable, match=r"NVRTC cannot be loaded .*nvidia-cuda-nvrtc") as info:
        _jit._nvrtc()
    assert not info.value.quiet


@pytest.mark.parametrize(
    "cache, xdg, expected",
    [
        ("/tmp/bsm-a", "/tmp/xdg", "/tmp/bsm-a"),  # the switch wins
        ("", "/tmp/xdg", "/tmp/xdg/blocksparse_moe"),  # empty means unset (config.switch): XDG_CACHE_HOME
        ("", "", "~/.cache/blocksparse_moe"),  # neither: the switch's default
    ],
)
def test_cache_dir_follows_the_switch(monkeypatch, cache, xdg, expected):
    monkeypatch.setenv("BSM_CACHE_DIR", cache)
    monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    assert _jit.cache_dir() == Path(expected).expanduser()


def test_cupy_not_installed(monkeypatch):
    # no cupy at all: a quiet failure (the user did not ask for it)
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs.nvrtc", None)
    with pytest.raises(_jit.JitUnavailable, match=r"cupy is not installed .*blocksparse_moe\[cupy\]") as info:
        _jit._nvrtc()
    assert info.value.quiet


def test_sources_missing(monkeypatch, tmp_path):
    # a broken install without the sources: a clear failure, not a crash
    monkeypatch.setattr(_jit, "__file__", str(tmp_path / "blocksparse_moe" / "routing" / "jit.py"))
    with pytest.raises(_jit.JitUnavailable, match=r"routing sources .* broken install"):
        _jit.sources()


# -------------------------------------------------------------- the launch sequence, run by the host build

host = _ext._load("_routing_host")
needs_host = pytest.mark.skipif(isinstance(host, ImportError), reason="host routing extension not built")


@pytest.fixture
def poisoned(monkeypatch):
    """Make spec.allocate (which _jit uses) return poisoned buffers, so that unwritten elements show up."""
    allocate = spec.allocate

    def poisoned_allocate(*args, **kwargs):
        return {name: poison_(t) for name, t in allocate(*args, **kwargs).items()}

    monkeypatch.setattr(spec, "allocate", poisoned_allocate)


def host_launch(name: str, extent: int, params: np.ndarray) -> None:
    """Run one JIT kernel with the host loops of the same step; its extent must be the C++ one."""
    assert host.step_extent(name, params.ctypes.data) == extent, name
    host.run_step(name, params.ctypes.data)


def plan_jit_on_host(idx: torch.Tensor, E: int, B: int) -> RoutingPlan:
    sizes = plan_sizes(idx, E, B)
    return RoutingPlan.from_buffers(sizes, _jit.plan_buffers(idx, sizes, host_launch))


@needs_host
@pytest.mark.parametrize("T,k,E,B,F,kind", CASES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_launch_sequence_matches_torch(poisoned, T, k, E, B, F, kind, dtype):
    idx = make_index(T, k, E, kind, dtype)
    before = idx.clone()
    assert_same_plan(plan_jit_on_host(idx, E, B), torch_plan(idx, E, B), F)
    assert torch.equal(idx, before)  # input not modified


@needs_host
def test_launch_sequence_large(poisoned):
    # T·k = 1e6 onto E = 512 with ~1% invalid ids: many tiles and groups, stable and exact
    idx = torch.randint(0, 512, (250_000, 4), dtype=torch.int32)
    idx[torch.rand(idx.shape) < 0.01] = 515
    assert_same_plan(plan_jit_on_host(idx, 512, 128), torch_plan(idx, 512, 128), 256)


@needs_host
@pytest.mark.parametrize("E", [1, 1023, 1024, 3000])  # tile size 256, 256, 512, 768
def test_launch_sequence_tile_sizes(poisoned, E):
    # tiles grow with E (256·ceil((E+1)/1024)); partial last tile and group
    idx = torch.randint(0, E, (1500, 3), dtype=torch.int64)
    sizes = plan_sizes(idx, E, 8)
    assert sizes.tile_size == 256 * -(-(E + 1) // 1024)
    assert_same_plan(plan_jit_on_host(idx, E, 8), torch_plan(idx, E, 8), 24)


@needs_host
def test_launch_sequence_non_contiguous_index(poisoned):
    # a transposed view of the ids is read in logical order
    idx = torch.randint(0, 6, (3, 10), dtype=torch.int64).t()
    assert_same_plan(plan_jit_on_host(idx, 6, 4), torch_plan(idx, 6, 4), 8)


@needs_host
@pytest.mark.parametrize("T,k,E,B", [(0, 2, 4, 4), (300, 2, 512, 16), (7, 3, 3, 4)])
def test_params_and_layout_match_the_cpp(T, k, E, B):
    # numpy's RoutingParams has the C++ size; the sort layout and scratch sizes agree with the C++ formulas
    assert _jit.params_dtype().itemsize == host.params_bytes()
    sizes = plan_sizes(torch.zeros(T, k, dtype=torch.int32), E, B)
    cpp = dict(host.buffer_sizes("int32", T, k, E, B, sizes.max_block_rows))
    assert {name: cpp[name] for name in SCRATCH_BUFFERS} == {
        name: int(np.prod(shape)) for name, shape in sizes.scratch_shapes().items()
    }


def _cpp_struct_fields(struct: str) -> list[str]:
    header = (ROOT / "csrc" / "routing.h").read_text()
    body = re.search(rf"struct {struct} \{{(.*?)\n\}};", header, re.S).group(1)
    return re.findall(r"^\s*(?:const )?\w+\*? (\w+);", body, re.M)


def test_param_fields_follow_the_cpp_structs():
    # the numpy dtype is built by name; its order must be routing.h's RoutingShape then RoutingBuffers
    assert _cpp_struct_fields("RoutingShape") == list(_jit.SHAPE_FIELDS)
    assert [name for name, _ in cpp_buffer_table()] == list(routing.PlanSizes.buffer_names())
    assert list(_jit.params_dtype().names) == [*_jit.SHAPE_FIELDS, "top_k_index", *routing.PlanSizes.buffer_names()]


@needs_host
def test_host_steps_follow_the_kernels():
    # the host module runs by name exactly the steps routing_jit.cu exports, with steps()'s extents; a removed
    # step (the topology's) is unknown to it
    idx = torch.zeros(3, 2, dtype=torch.int32)
    sizes = plan_sizes(idx, 4, 2)
    p = _jit.params(idx, sizes, spec.allocate(sizes, idx.device))
    expected = dict(_jit.steps(sizes, True) + _jit.steps(sizes, False))
    assert {name: host.step_extent(name, p.ctypes.data) for name in _jit.KERNELS} == expected
    known = ", ".join(sorted(_jit.KERNELS))
    with pytest.raises(ValueError, match=rf"unknown routing step 'topology'; expected one of: {known}$"):
        host.step_extent("topology", p.ctypes.data)


def test_kernel_names_follow_the_cpp_steps():
    # routing_jit.cu exports bsm_<name> for every step of routing.h's BSM_ROUTING_STEPS; steps() uses only those
    header = (ROOT / "csrc" / "routing.h").read_text()
    table = re.search(r"#define BSM_ROUTING_STEPS\(X\)(.*?)\n\n", header, re.S).group(1)
    assert re.findall(r"X\((\w+),", table) == list(_jit.KERNELS)
    sizes = plan_sizes(torch.zeros(3, 2, dtype=torch.int64), 4, 2)
    assert {name for name, _ in _jit.steps(sizes, True) + _jit.steps(sizes, False)} == set(_jit.KERNELS)


def test_setup_ships_the_jit_sources(tmp_path):
    # setup.py copies exactly the files _jit compiles into the package, and _jit finds them there
    setup_py = (ROOT / "setup.py").read_text()
    assert re.search(r"JIT_SOURCES = \((.*?)\)", setup_py).group(1) == ", ".join(f'"{n}"' for n in _jit.SOURCE_FILES)
    out = tmp_path / "lib"
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    for name in _jit.SOURCE_FILES:
        assert (out / "blocksparse_moe" / "_jit_src" / name).read_bytes() == (ROOT / "csrc" / name).read_bytes()
    code = "from blocksparse_moe.routing import jit; print(jit.source_dir())"
    found = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(out)},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert found == str(out / "blocksparse_moe" / "_jit_src")


# ------------------------------------------------------------------ the backend choice, failures simulated


class _FakeModule:
    """Stands in for a loaded cupy Module on machines without a GPU."""

    def get_function(self, name):
        return name


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of compute capability 9.0 as far as the JIT backend's choice is concerned."""
    monkeypatch.setattr(_jit, "_device_arch", lambda device: 90)
    monkeypatch.setattr(_jit, "_load_module", lambda device, data: _FakeModule())
    monkeypatch.setattr(_ext, "cuda_available", lambda: False)
    return torch.device("cuda", 0)


def test_choice_on_cpu():
    # CPU tensors always use the PyTorch routing; asking for a GPU implementation explicitly is an error
    assert routing_implementation(torch.device("cpu"))[0] == "torch"
    needs = r"the 'cupy' routing implementation \(implementation\) needs a CUDA tensor, got cpu"
    with pytest.raises(ValueError, match=needs):
        routing_implementation(torch.device("cpu"), "cupy")
    with pytest.raises(ValueError, match=r"implementation must be one of .* or None, got 'cuda'"):
        routing_implementation(torch.device("cpu"), "cuda")


def test_env_switch_is_validated(monkeypatch):
    monkeypatch.setenv("BSM_ROUTING", "nvrtc")
    choices = r"\('auto', 'ext', 'cupy', 'torch'\)"
    with pytest.raises(ValueError, match=rf"BSM_ROUTING must be one of {choices} \(or unset\), got 'nvrtc'"):
        plan_routing(torch.zeros(2, 1, dtype=torch.int64), 2)


def test_choice_prefers_the_extension(fake_gpu, monkeypatch):
    monkeypatch.setattr(_ext, "cuda_available", lambda: True)
    assert routing_implementation(fake_gpu) == ("ext", "the compiled extension blocksparse_moe._routing_cuda is built")


def test_choice_cupy_when_no_extension(nvrtc, fake_gpu):
    name, why = routing_implementation(fake_gpu)
    assert name == "cupy" and re.search(r"no compiled extension; cupy JIT ready \(NVRTC \d+\.\d+, cubin for sm_90", why)


def test_choice_forced(nvrtc, fake_gpu, monkeypatch):
    assert routing_implementation(fake_gpu, "torch") == ("torch", "forced by implementation='torch'")
    monkeypatch.setenv("BSM_ROUTING", "cupy")
    assert routing_implementation(fake_gpu)[0] == "cupy"
    with pytest.raises(ImportError, match=r"_routing_cuda is not built"):
        monkeypatch.setattr(_ext, "_load", lambda name: ImportError("no such module"))
        routing_implementation(fake_gpu, "ext")


@pytest.mark.parametrize("failure", ["nvrtc missing", "compile error", "load error"])
def test_failure_warns_once_then_torch(nvrtc, fake_gpu, monkeypatch, failure):
    # an installed cupy that cannot work: one warning, then the PyTorch routing, remembered for the process
    if failure == "nvrtc missing":
        monkeypatch.setattr(nvrtc, "getVersion", lambda: (_ for _ in ()).throw(RuntimeError("no libnvrtc")))
        match = "NVRTC cannot be loaded"
    elif failure == "compile error":
        main, headers = _jit.sources()
        monkeypatch.setattr(_jit, "sources", lambda: ("#error broken\n" + main, headers))
        match = "NVRTC failed to compile"
    else:
        monkeypatch.setattr(_jit, "_load_module", lambda device, data: (_ for _ in ()).throw(OSError("bad image")))
        match = r"could not be loaded on cuda:0 \(OSError: bad image\)"
    with pytest.warns(RuntimeWarning, match=f"cupy JIT routing is unavailable, using the PyTorch routing: .*{match}"):
        assert routing_implementation(fake_gpu)[0] == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        name, why = routing_implementation(fake_gpu)  # no second warning
    assert name == "torch" and re.search(match, why)
    with pytest.raises(RuntimeError, match=f"implementation='cupy' but the cupy JIT routing is unavailable: .*{match}"):
        routing_implementation(fake_gpu, "cupy")  # forced: an error, not a fallback


def test_cupy_absent_is_quiet(fake_gpu, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs.nvrtc", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        name, why = routing_implementation(fake_gpu)
    assert name == "torch" and "cupy is not installed" in why


def test_unwritable_cache_keeps_the_jit(nvrtc, fake_gpu, monkeypatch, tmp_path):
    # a cache that cannot be written costs a warning, not the backend
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("BSM_CACHE_DIR", str(tmp_path / "file" / "cache"))
    with pytest.warns(RuntimeWarning, match="routing kernel cache is not usable"):
        assert routing_implementation(fake_gpu)[0] == "cupy"


def test_info_runs():
    # python -m blocksparse_moe.info prints every switch and each choice in its own word
    out = subprocess.run(
        [sys.executable, "-m", "blocksparse_moe.info"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    cpu = r"^routing implementation, CPU tensors +torch: cpu tensors always use the PyTorch routing$"
    assert re.search(cpu, out, re.M)
    assert re.search(r"^kernels backend, CPU tensors +(torch|triton): ", out, re.M)
    assert re.search(r"^routing implementation, (CUDA tensors|cuda:0 .*) +", out, re.M)
    assert re.search(r"^strategy +blocksparse, grouped, padded, reference", out, re.M)
    for switch in config.SWITCHES:
        assert re.search(rf"^{switch.name} +.* \(default {re.escape(switch.default)}\)$", out, re.M), switch.name


@pytest.mark.parametrize("value", ["", "auto"])
def test_info_empty_switch_is_unset(value):
    # defect 7: BSM_ROUTING="" means unset, like every other switch (it used to raise)
    env = {**os.environ, "BSM_ROUTING": value}
    out = subprocess.run(
        [sys.executable, "-m", "blocksparse_moe.info"], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    ).stdout
    assert re.search(r"^routing implementation, CPU tensors +torch: ", out, re.M)
    assert "forced by" not in out


def test_info_rejects_a_bad_switch(monkeypatch):
    # defect 7: BSM_ROUTING=bogus is an error (status 2, the switch's values named), not "forced by BSM_ROUTING"
    env = {**os.environ, "BSM_ROUTING": "bogus"}
    run = subprocess.run(
        [sys.executable, "-m", "blocksparse_moe.info"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert run.returncode == 2
    message = "BSM_ROUTING must be one of ('auto', 'ext', 'cupy', 'torch') (or unset), got 'bogus'"
    assert f"error: environment variable {message}" in run.stderr
    assert "forced by" not in run.stdout
    monkeypatch.setenv("BSM_ROUTING", "bogus")
    lines = dict(info.collect())
    assert lines["BSM_ROUTING"] == f"invalid: environment variable {message}"
    assert message in lines["routing implementation, CPU tensors"]
    assert message in lines["routing implementation, CUDA tensors"]


def test_empty_routing_switch_is_unset(monkeypatch):
    # defect 7: plan_routing with BSM_ROUTING="" routes as with the switch unset (it raised before)
    monkeypatch.setenv("BSM_ROUTING", "")
    assert routing_implementation(torch.device("cpu")) == ("torch", "cpu tensors always use the PyTorch routing")
    plan = plan_routing(torch.tensor([[1, 0], [0, 1]]), 2, block_size=1)
    assert plan.row_assignment.tolist() == [1, 2, 0, 3]


# ------------------------------------------------------------------------------------------------------ GPU


def _cupy_plan(idx, E, B):
    return plan_routing(idx, E, block_size=B, check=False, implementation="cupy")


@pytest.mark.gpu
@pytest.mark.parametrize("T,k,E,B,F,kind", CASES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_gpu_cupy_matches_torch_and_extension(nvrtc, poisoned, T, k, E, B, F, kind, dtype):
    idx = make_index(T, k, E, kind, dtype).cuda()
    before = idx.clone()
    plan = _cupy_plan(idx, E, B)
    assert plan.row_assignment.device == idx.device and torch.equal(idx, before)
    assert_same_plan(plan, torch_plan(idx, E, B), F)
    if _ext.cuda_available():
        assert_same_plan(plan, plan_routing(idx, E, block_size=B, check=False, implementation="ext"), F)


@pytest.mark.gpu
@pytest.mark.parametrize("E", [1, 2, 255, 256, 512, 3000])
def test_gpu_cupy_large(nvrtc, E):
    # T·k = 1e6 assignments with ~1% invalid ids (counted in counts[E], sorted last)
    idx = torch.randint(0, E, (250_000, 4), device="cuda")
    idx[torch.rand(idx.shape, device="cuda") < 0.01] = E + 3
    plan = _cupy_plan(idx, E, 128)
    assert_same_plan(plan, torch_plan(idx, E, 128), 256)
    assert int(plan.invalid_count) == int((idx == E + 3).sum())


@pytest.mark.gpu
def test_gpu_cupy_on_the_current_stream(nvrtc):
    # the kernels run on torch's current stream (a side stream here), ordered after the producer of the ids
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        idx = torch.randint(0, 8, (4096, 2), device="cuda")
        plan = _cupy_plan(idx, 8, 16)
    stream.synchronize()
    assert_same_plan(plan, torch_plan(idx, 8, 16), 32)


@pytest.mark.gpu
def test_gpu_moe_mlp_with_cupy_routing_under_cuda_graph(nvrtc, monkeypatch):
    # moe_mlp runs with the cupy routing inside a captured CUDA graph; replays with new ids match eager torch
    from blocksparse_moe import moe_mlp

    T, d, f, E, k = 256, 64, 96, 8, 2
    x = torch.randn(T, d, device="cuda")
    w1, w2 = torch.randn(E, d, f, device="cuda") / d**0.5, torch.randn(E, f, d, device="cuda") / f**0.5
    idx = torch.rand(T, E, device="cuda").argsort(1)[:, :k].contiguous()
    weights = torch.rand(T, k, device="cuda")
    monkeypatch.setenv("BSM_ROUTING", "cupy")

    def run():
        return moe_mlp(x, idx, weights, w1, w2, activation="gelu", impl="blocksparse")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # warm-up: compiles/loads the kernels and the Triton kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for _ in range(2):
        idx.copy_(torch.rand(T, E, device="cuda").argsort(1)[:, :k])
        x.copy_(torch.randn(T, d, device="cuda"))
        graph.replay()
        monkeypatch.setenv("BSM_ROUTING", "torch")
        expected = run()
        monkeypatch.setenv("BSM_ROUTING", "cupy")
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
