"""Test setup: Triton's interpreter when there is no GPU (set before any kernel module is imported; its language
patched once per launch), one intra-op thread per pytest-xdist worker, seeded RNGs, and the ``gpu`` marker."""

import os
import random
import warnings

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of pytest-xdist's processes (one per core): one intra-op thread each
    # (before torch starts its thread pool; the processes tests spawn inherit it). Two workers of two threads beside
    # the CI's audit spin-wait in OpenMP regions on 2 cores: tests/test_mlp.py beside 94 audit builds took 124 s
    # (105 s user) with PyTorch's default, 109 s (89 s user) with one thread, and the audit 77 -> 67 s.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def _patch_the_language_once_per_launch() -> None:
    """Triton's interpreter patches ``triton.language`` (every builtin of ``tl``, ``tl.core``, ``tl.math`` and the
    tensor classes, through ``inspect.getmembers``) at each kernel launch, and again at every call of a
    ``@triton.jit`` helper inside the running kernel (``InterpretedFunction.__call__``), where the launch's patch is
    still in place. The kernels call helpers in every tile and K step: those redundant patches took ~28% of an
    interpreter test's time (``tests/test_mlp.py::test_weights_of_mixed_layouts``, cProfile, Triton 3.9). Here a
    helper's call skips the patch when the running launch already patched every language module the helper sees
    (the same module objects: nothing changes for the helper). Launches are patched and restored as before. A
    Triton without these internals is left as it is, with a warning."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_lang, scope_type = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "_LangPatchScope", None)
    if patch_lang is None or scope_type is None or not hasattr(scope_type, "restore"):
        warnings.warn(  # correct as it is, but CI's 20 minutes were measured with the patch (docs/audit.md, "Time")
            "tests/conftest.py: this Triton's interpreter has no _patch_lang / _LangPatchScope; the interpreter tests "
            "run without the once-per-launch language patch (slower)",
            stacklevel=1,
        )
        return
    import triton.language as tl

    patched: set = set()  # the language modules the running launch has patched (kernels launch no kernels)

    def languages(fn) -> set:
        return {v for v in fn.__globals__.values() if v is tl or v is tl.core}

    def once_per_launch(fn):
        if not patched:  # a launch: patched here, restored by the launch when its grid has run
            scope = patch_lang(fn)
            patched.update(languages(fn))
            restore = scope.restore

            def restore_and_forget() -> None:
                patched.clear()
                restore()

            scope.restore = restore_and_forget
            return scope
        helper = languages(fn)
        if helper <= patched:
            return scope_type()  # a helper inside the launch: its languages are patched already
        patched.update(helper)  # (e.g. tl.cdiv, which sees tl.core): patched as Triton does, never restored
        return patch_lang(fn)

    interpreter._patch_lang = once_per_launch


if not HAS_CUDA:
    _patch_the_language_once_per_launch()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from a clean torch.compile cache: the layers' ``forward`` code objects are shared by every
    test, and the suite's compile tests together would otherwise pass dynamo's recompile limit (8 per code object)
    and fail a ``fullgraph=True`` case depending on test order."""
    yield
    torch._dynamo.reset()


@pytest.fixture
def device() -> torch.device:
    """The device kernels are tested on: CUDA when present, else CPU under the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
