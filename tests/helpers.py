"""Shared test utilities: poisoning, float64 references, tolerances, the routing-kind generator, what autograd
saves, a GPU's gemm config under the interpreter."""

from __future__ import annotations

import pytest
import torch

from blocksparse_moe.kernels import expert_gemm

POISON = float("nan")

# Tolerances vs a float64 reference, per input dtype (fp32 accumulate inside kernels), for results with no
# same-precision PyTorch computation to compare with (the PyTorch backend itself, compiled vs eager); kernels are
# judged by assert_close_to_reference.
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=1e-1, rtol=5e-2),
}


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (float) or a large sentinel (int) so unwritten elements show up."""
    if t.is_floating_point():
        return t.fill_(POISON)
    return t.fill_(-(2**30))


def poison_empty(monkeypatch) -> None:
    """From now on (``monkeypatch``'s scope), every ``torch.empty`` starts as NaN (E8M0 / uint8 255, E4M3 NaN,
    -2^30 for integers): an element that no one writes shows up in the output."""
    empty = torch.empty

    def poison(*args, **kwargs):
        t = empty(*args, **kwargs)
        if t.dtype == torch.uint8:
            return t.fill_(255)
        if t.dtype == torch.float8_e4m3fn:
            return t.view(torch.uint8).fill_(0x7F).view(torch.float8_e4m3fn)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**30))

    monkeypatch.setattr(torch, "empty", poison)


class Recorded:
    """A kernel whose launches record their keyword arguments, then run (``monkeypatch`` it over the kernel)."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    dtype = dtype or actual.dtype
    torch.testing.assert_close(actual.double(), expected.double(), **TOL.get(dtype, TOL[torch.float32]))


def assert_close_to_reference(
    out: torch.Tensor, ref64: torch.Tensor, same_precision: torch.Tensor | None, *, factor: float = 2.0, msg: str = ""
) -> None:
    """The kernel's result ``out`` is as accurate as PyTorch in its dtype (flash-attention's rule).

    ``ref64`` is the float64 reference (from the same rounded inputs) and ``same_precision`` the same-dtype PyTorch
    computation of the same thing (the torch backend, or the eager math in that dtype). Passes when
    ``max|out - ref64| <= factor · max|same_precision - ref64| + 2 ulp``, ``ulp`` being ``out``'s machine epsilon
    times ``max|ref64|``: a floor for results PyTorch happens to get (nearly) exactly, as the max over a few elements
    (one token's) can (fp32: the kernel's 2.8 ulps against PyTorch's 0.8 once, on an AMD EPYC host).
    ``same_precision=None`` marks a result that is the PyTorch computation itself (the torch backend under test):
    judged by the ``TOL`` table.
    NaN anywhere in ``out`` (a poisoned element left unwritten) fails."""
    assert out.shape == ref64.shape, f"{msg}shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    if same_precision is None:
        torch.testing.assert_close(out.double(), ref64.double(), **TOL[out.dtype], msg=msg or None)
        return
    assert same_precision.shape == ref64.shape and same_precision.dtype == out.dtype
    if out.numel() == 0:
        return
    ref64 = ref64.double()
    err = (out.double() - ref64).abs().max().item()
    torch_err = (same_precision.double() - ref64).abs().max().item()
    ulp = torch.finfo(out.dtype).eps * ref64.abs().max().item()
    bound = factor * torch_err + 2 * ulp
    assert err <= bound, (  # False for NaN
        f"{msg}max error {err:.3e} vs float64 exceeds {factor} x PyTorch's {out.dtype} error {torch_err:.3e} "
        f"+ {2 * ulp:.3e} (two ulps of max|reference|)"
    )


def routing(T: int, k: int, E: int, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[T, k]`` int64 expert ids for a routing kind, the one generator of the test-suite:

    - "uniform" (or any other name): k distinct experts per token, uniformly (needs k <= E);
    - "random": k independent uniform choices (duplicates allowed, any k);
    - "one-hot": every choice to expert ``E // 2`` (all tokens to one expert);
    - "skip": only even experts (the odd ones, and for even E the last one, get nothing);
    - "duplicates": distinct choices except that each token's first two are equal (needs k >= 2);
    - "invalid": distinct choices with ids -1, E and E+5 at [0, 0], [3, 1], [7, 0] (needs T >= 8, k >= 2).

    ``generator`` (optional) draws everything, so that processes can build the same routing."""
    g = dict(generator=generator)
    if kind == "one-hot":
        return torch.full((T, k), E // 2, dtype=torch.int64)
    if kind == "random":
        return torch.randint(0, E, (T, k), **g)
    if kind == "skip":  # only even experts: the odd ones get nothing
        return torch.randint(0, (E + 1) // 2, (T, k), **g) * 2
    if kind == "duplicates":
        idx = torch.randint(0, E, (T, k), **g)
        idx[:, 1] = idx[:, 0]
        return idx
    idx = torch.rand(T, E, **g).argsort(dim=1)[:, :k]
    if kind == "invalid":
        idx[0, 0], idx[3, 1], idx[7, 0] = -1, E, E + 5
    return idx


def saved_storages(fn) -> dict[int, torch.Tensor]:
    """The tensors autograd saves while ``fn()`` runs, one per storage."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def gpu_gemm_config(capability: int):
    """``expert_gemm.gemm_config`` as it answers on a GPU of compute capability ``capability`` (not the interpreter's
    small config), to patch in under the interpreter: the device's tiles run there."""
    config = expert_gemm.gemm_config

    def device_config(*args, **kwargs):
        with pytest.MonkeyPatch.context() as gpu:
            gpu.setattr(expert_gemm, "interpreting", lambda: False)
            return config(*args, **{**kwargs, "capability": capability})

    return device_config
