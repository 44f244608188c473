"""The activation module: every name is supported everywhere, with one meaning — the PyTorch function, its backward
(``act_backward``, in place), and the Triton helpers (interpreter) agree with float64 autograd; unknown names are
refused."""

import pytest
import torch
import triton
import triton.language as tl

from blocksparse_moe import activations
from blocksparse_moe.activations import NAMES, act_backward, activate, activate_and_grad, kernel_code


@triton.jit
def _act_kernel(h_ptr, a_ptr, a2_ptr, da_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    h = tl.load(h_ptr + offs, mask=ok, other=0.0)
    tl.store(a_ptr + offs, activate(h, ACT), mask=ok)
    a2, da = activate_and_grad(h, ACT)
    tl.store(a2_ptr + offs, a2, mask=ok)
    tl.store(da_ptr + offs, da, mask=ok)


def _inputs() -> torch.Tensor:
    # a spread of values, both signs, around the kinks and saturations (never 0 exactly: relu' is a choice there)
    return torch.cat([torch.randn(200) * 3, torch.linspace(-8, 8, 57) + 0.01])


@pytest.mark.parametrize("name", NAMES)
def test_every_name_agrees_everywhere(name):
    h = _inputs()
    h64 = h.double().requires_grad_()
    ref = activations.ACTIVATIONS[name](h64)
    (ref_grad,) = torch.autograd.grad(ref.sum(), h64)
    # the PyTorch function, and its backward grad · act'(h), written into grad (fp32 and float64)
    torch.testing.assert_close(activations.ACTIVATIONS[name](h).double(), ref.detach(), atol=1e-5, rtol=1e-5)
    grad = torch.randn(h.shape, dtype=torch.float64)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        buffer, hd = grad.to(dtype, copy=True), h.to(dtype)
        before = hd.clone()
        result = act_backward(buffer, hd, name)
        assert result.data_ptr() == buffer.data_ptr() and result.dtype == dtype  # in place, in grad's dtype
        assert torch.equal(hd, before)  # h is only read
        torch.testing.assert_close(result.double(), grad * ref_grad, atol=tol, rtol=tol)
    # the Triton helpers, by kernel code (outputs poisoned)
    outs = [torch.full_like(h, float("nan")) for _ in range(3)]
    _act_kernel[(triton.cdiv(h.numel(), 64),)](h, *outs, h.numel(), ACT=kernel_code(name), BLOCK=64)
    for out, expected in zip(outs, (ref, ref, ref_grad)):
        torch.testing.assert_close(out.double(), expected.detach(), atol=1e-5, rtol=1e-5)


def test_codes_distinct_and_names_checked():
    assert len({kernel_code(n) for n in NAMES}) == len(NAMES)
    assert activations.get_activation(torch.tanh) is torch.tanh  # a callable passes through
    for bad in ("tanh", "", None, 3):
        with pytest.raises(ValueError, match=r"activation must be one of \['identity', 'gelu'"):
            activations.check_name(bad)
    with pytest.raises(ValueError, match="or a callable, got 'swish'"):
        activations.get_activation("swish")
