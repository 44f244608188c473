"""gather_rows / scatter_rows / weights_grad: kernels (interpreter) and the torch backend vs float64 per-token loop
references, on the unpadded and block-padded layouts; gradients through the custom ops; determinism; errors."""

from __future__ import annotations

import pytest
import torch
from helpers import TOL, assert_close, assert_close_to_reference, poison_, routing

from blocksparse_moe import backends
from blocksparse_moe.ops import _checks
from blocksparse_moe.ops import permute as ops
from blocksparse_moe.routing import RoutingPlan, plan_routing

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["triton", "torch"]


class kernels:  # noqa: N801 - the backend functions behind the ops, validated as the ops do, writing into ``out``
    @staticmethod
    def gather_rows(x, ra, ar, weights=None, *, backend="triton", out=None):
        _checks.gather_rows_shape(x, ra, ar, weights, out)
        return backends.get(backend).gather_rows(x, ra, ar, weights, out=out)

    @staticmethod
    def scatter_rows(y, ra, ar, weights=None, *, backend="triton", out=None):
        _checks.scatter_rows_shape(y, ra, ar, weights, out)
        return backends.get(backend).scatter_rows(y, ra, ar, weights, out=out)

    @staticmethod
    def weights_grad(a, b, ar, dtype=None, *, backend="triton", out=None):
        _checks.weights_grad_shape(a, b, ar, dtype or a.dtype, out)
        return backends.get(backend).weights_grad(a, b, ar, dtype, out=out)


LAYOUTS = ["unpadded", "padded"]

CASES = {
    # name: (T, k, E, d, routing)
    "empty-experts": (13, 2, 5, 19, "skip"),  # experts with no tokens; odd d crossing feature tiles
    "one-token": (1, 1, 1, 7, "uniform"),  # one token, E = 1, k = 1, d < one feature tile
    "k=E": (9, 3, 3, 33, "uniform"),  # k = E: every token on every expert
    "one-expert": (20, 2, 4, 18, "one-hot"),  # all tokens on one expert
    "duplicates": (8, 3, 4, 16, "duplicates"),  # a token choosing the same expert twice
    "invalid": (11, 2, 4, 17, "invalid"),  # ids -1 and E with check=False: rows -1, contributions dropped
    "empty": (0, 2, 3, 9, "uniform"),  # no tokens: empty outputs
}


def _plan(case: str) -> tuple[RoutingPlan, int]:
    T, k, E, d, kind = CASES[case]
    return plan_routing(routing(T, k, E, kind), E, block_size=16, check=False), d


def _maps(plan: RoutingPlan, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    if layout == "padded":
        return plan.padded_row_assignment, plan.padded_assignment_row
    return plan.row_assignment, plan.assignment_row


# ----------------------------------------------------------------------------------------------- references


def ref_gather(x, row_assignment, k, weights):
    """float64 ``[R, d]``, one row at a time; differentiable in x and weights."""
    rows = []
    for a in row_assignment.tolist():
        if a < 0:
            rows.append(torch.zeros(x.shape[1], dtype=torch.float64))
        else:
            w = 1.0 if weights is None else weights.double().reshape(-1)[a]
            rows.append(w * x.double()[a // k])
    return torch.stack(rows) if rows else x.double()[:0]


def ref_scatter(y, assignment_row, weights):
    """float64 ``[T, d]``, one token and choice at a time; differentiable in y and weights."""
    T, k = assignment_row.shape
    out = []
    for t in range(T):
        acc = torch.zeros(y.shape[1], dtype=torch.float64)
        for j in range(k):
            r = int(assignment_row[t, j])
            if r >= 0:
                acc = acc + (1.0 if weights is None else weights.double()[t, j]) * y.double()[r]
        out.append(acc)
    return torch.stack(out) if out else y.double()[:0]


# ----------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(CASES))
def test_gather_scatter(case, layout, dtype, backend, weighted):
    plan, d = _plan(case)
    ra, ar = _maps(plan, layout)
    T, k = ar.shape
    x = torch.randn(T, d).to(dtype)
    y = torch.randn(ra.shape[0], d).to(dtype)
    weights = torch.rand(T, k) if weighted else None  # fp32 router weights beside fp16/bf16 activations
    inputs = [t.clone() for t in (x, y, ra, ar)]

    out = poison_(torch.empty(ra.shape[0], d, dtype=dtype))
    res = kernels.gather_rows(x, ra, ar, weights, backend=backend, out=out)
    assert res is out and not out.isnan().any()
    same = kernels.gather_rows(x, ra, ar, weights, backend="torch") if backend == "triton" else None  # torch: TOL
    assert_close_to_reference(out, ref_gather(x, ra, k, weights), same)

    out = poison_(torch.empty(T, d, dtype=dtype))
    kernels.scatter_rows(y, ra, ar, weights, backend=backend, out=out)
    assert not out.isnan().any()
    same = kernels.scatter_rows(y, ra, ar, weights, backend="torch") if backend == "triton" else None  # torch: TOL
    assert_close_to_reference(out, ref_scatter(y, ar, weights), same)

    for before, after in zip(inputs, (x, y, ra, ar)):  # inputs never modified
        assert torch.equal(before, after)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_weights_grad(case, dtype, backend):
    plan, d = _plan(case)
    ra, ar = plan.padded_row_assignment, plan.padded_assignment_row
    a, b = torch.randn(ar.shape[0], d).to(dtype), torch.randn(ra.shape[0], d).to(dtype)
    out = poison_(torch.empty(ar.shape, dtype=torch.float32))
    kernels.weights_grad(a, b, ar, torch.float32, backend=backend, out=out)
    expected = torch.zeros(ar.shape, dtype=torch.float64)
    for (t, j), r in zip(torch.cartesian_prod(*map(torch.arange, ar.shape)).tolist(), ar.reshape(-1).tolist()):
        if r >= 0:
            expected[t, j] = a[t].double() @ b[r].double()
    # the torch backend in the same dtypes; the torch backend itself: the TOL table scaled by the d-term dot product
    same = kernels.weights_grad(a, b, ar, torch.float32, backend="torch") if backend == "triton" else None
    if same is None:
        tol = TOL[dtype]
        torch.testing.assert_close(out.double(), expected, atol=tol["atol"] * d, rtol=tol["rtol"])
    else:
        assert_close_to_reference(out, expected, same)


def test_scatter_is_deterministic():
    # k = 4 contributions per token summed in order: two runs agree bitwise (no atomics)
    plan = plan_routing(routing(37, 4, 6, "uniform"), 6, block_size=16)
    y, w = torch.randn(plan.row_assignment.shape[0], 40), torch.rand(37, 4)
    first = kernels.scatter_rows(y, plan.row_assignment, plan.assignment_row, w, backend="triton")
    second = kernels.scatter_rows(y, plan.row_assignment, plan.assignment_row, w, backend="triton")
    assert torch.equal(first, second)


def test_strided_operands():
    # non-contiguous x (a transpose), weights and output: strides are honoured, nothing is copied
    plan = plan_routing(routing(10, 2, 3, "uniform"), 3, block_size=16)
    ra, ar = plan.row_assignment, plan.assignment_row
    x = torch.randn(21, 10).t()
    weights = torch.rand(2, 10).t()
    out = poison_(torch.empty(21, 20)).t()
    kernels.gather_rows(x, ra, ar, weights, backend="triton", out=out)
    same = kernels.gather_rows(x, ra, ar, weights, backend="torch")
    assert_close_to_reference(out, ref_gather(x, ra, 2, weights), same)
    back = kernels.scatter_rows(out, ra, ar, weights, backend="triton")
    same = kernels.scatter_rows(out, ra, ar, weights, backend="torch")
    assert_close_to_reference(back, ref_scatter(out, ar, weights), same)


# ----------------------------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("op", ["gather", "scatter"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", ["empty-experts", "k=E", "duplicates", "invalid", "empty"])
def test_gradients(case, layout, backend, op):
    plan, d = _plan(case)
    ra, ar = _maps(plan, layout)
    T, k = ar.shape
    data = torch.randn(T if op == "gather" else ra.shape[0], d, requires_grad=True)
    weights = torch.rand(T, k, requires_grad=True)
    data64 = data.detach().double().requires_grad_()
    weights64 = weights.detach().double().requires_grad_()
    if op == "gather":
        out, expected = ops.gather_rows(data, ra, ar, weights, backend), ref_gather(data64, ra, k, weights64)
    else:
        out, expected = ops.scatter_rows(data, ra, ar, weights, backend), ref_scatter(data64, ar, weights64)
    dout = torch.randn(out.shape)
    out.backward(dout)
    expected_grads = torch.autograd.grad(
        expected, (data64, weights64), dout.double(), allow_unused=True, materialize_grads=True
    )
    same = [None, None]  # the torch backend itself: the TOL table
    if backend == "triton":  # the torch backend's gradients in the same dtype
        ds, ws = (t.detach().requires_grad_() for t in (data, weights))
        op_fn = ops.gather_rows if op == "gather" else ops.scatter_rows
        same = torch.autograd.grad(op_fn(ds, ra, ar, ws, "torch"), (ds, ws), dout)
    assert_close_to_reference(data.grad, expected_grads[0], same[0])
    assert_close_to_reference(weights.grad, expected_grads[1], same[1])


def test_gradients_without_weights_and_dtype():
    # weights=None: only the data gradient; bf16 activations with fp32 weights keep each gradient's dtype
    plan = plan_routing(routing(9, 2, 3, "uniform"), 3, block_size=16)
    ra, ar = plan.row_assignment, plan.assignment_row
    x = torch.randn(9, 12).bfloat16().requires_grad_()
    weights = torch.rand(9, 2, requires_grad=True)
    ops.scatter_rows(ops.gather_rows(x, ra, ar), ra, ar, weights).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and weights.grad.dtype == torch.float32
    expected = ref_scatter(ref_gather(x, ra, 2, None), ar, weights.detach())
    assert_close(ops.scatter_rows(ops.gather_rows(x, ra, ar), ra, ar, weights), expected, torch.bfloat16)
    # d/dx sum(Σ_j w[t, j] x[t]) = Σ_j w[t, j] for every feature
    assert_close(x.grad, weights.detach().sum(1, keepdim=True).expand(9, 12), torch.bfloat16)


# ----------------------------------------------------------------------------------------------- errors


def _args():
    plan = plan_routing(routing(5, 2, 3, "uniform"), 3, block_size=16)
    return torch.randn(5, 8), plan.row_assignment, plan.assignment_row, torch.rand(5, 2)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda x, ra, ar, w: (x[:4], ra, ar, w), ValueError, r"x must have shape \[T, d\] = \(5, \*\), got \(4, 8\)"),
        (lambda x, ra, ar, w: (x, ra.long(), ar, w), TypeError, "row_assignment must be torch.int32, got torch.int64"),
        (lambda x, ra, ar, w: (x, ra, ar[:, :1], w), ValueError, r"weights must have shape \[T, k\] = \(5, 1\)"),
        (lambda x, ra, ar, w: (x.int(), ra, ar, w), TypeError, "x must have a dtype among"),
        (lambda x, ra, ar, w: (x, ra, ar, w.to("meta")), ValueError, "expected all tensors on one device"),
        (lambda x, ra, ar, w: (x, ra, ar.clone().fill_(10), w), ValueError, r"assignment_row must hold rows in"),
        (lambda x, ra, ar, w: ("x", ra, ar, w), TypeError, "x must be a torch.Tensor, got str"),
    ],
)
def test_gather_errors(change, error, match):
    with pytest.raises(error, match=match):
        kernels.gather_rows(*change(*_args()), backend="triton")


def test_other_errors():
    x, ra, ar, w = _args()
    with pytest.raises(ValueError, match=r"y must have shape \[R, d\] = \(10, \*\), got \(5, 8\)"):
        kernels.scatter_rows(x, ra, ar, w)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.gather_rows(x, ra, ar, w, backend="cuda")
    with pytest.raises(TypeError, match="out must have dtype torch.float32, got torch.float16"):
        kernels.gather_rows(x, ra, ar, w, out=torch.empty(10, 8, dtype=torch.float16))
    with pytest.raises(TypeError, match="a and b must have one dtype"):
        kernels.weights_grad(x, torch.randn(10, 8).half(), ar)
    with pytest.raises(TypeError, match="backend='triton' takes operands of a dtype among"):  # float64: torch only
        ops.gather_rows(x.double(), ra, ar, w, backend="triton")
    # float64 on the default backend: the torch one, exact
    torch.testing.assert_close(ops.gather_rows(x.double(), ra, ar, w), ref_gather(x, ra, 2, w), atol=0, rtol=1e-15)
