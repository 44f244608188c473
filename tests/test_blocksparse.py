"""Block-sparse SDD / DSD / DSDᵀ / DDS / DDSᵀ: kernels (interpreter) and the torch backend vs float64 dense
references, gradients, strided operands, topology invariants, errors, and torch.compile."""

from __future__ import annotations

import pytest
import torch
from helpers import POISON, TOL, assert_close, poison_

from blocksparse_moe.kernels import blocksparse as kernels
from blocksparse_moe.ops import blocksparse as bs_ops
from blocksparse_moe.routing import Topology, plan_routing

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# "torch-slots": the torch backend's sync-free slot schedule (used on GPU and under torch.compile) instead of its
# CPU-eager per-expert loop
BACKENDS = ["triton", "torch", "torch-slots"]


@pytest.fixture(autouse=True)
def _slot_schedule(request, monkeypatch):
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "torch-slots":
        monkeypatch.setattr(kernels, "host_loop_ok", lambda x: False)


CASES = {
    # name: (T, k, E, B, F, K, N, routing)
    "empty-experts": (13, 2, 5, 16, 21, 19, 23, "skip"),  # experts with no tokens; F, K, N odd, F % B != 0
    "one-token": (1, 1, 1, 16, 7, 5, 3, "uniform"),  # one token, E = 1, F < B, one block
    "k=E": (9, 3, 3, 32, 40, 33, 37, "uniform"),  # k = E, B = 32, partial last block per expert
    "one-expert": (20, 2, 4, 16, 33, 17, 18, "one-hot"),  # all tokens on one expert (others empty), nb = 3
    "B=64": (11, 2, 3, 64, 70, 24, 20, "uniform"),  # the GPU block size 64, partial second block
    "empty": (0, 2, 3, 16, 20, 9, 11, "uniform"),  # no tokens: P = 0, nnz_max = 0
}
SMALL = ["empty-experts", "one-token", "one-expert"]


def _routing(T: int, k: int, E: int, routing: str) -> torch.Tensor:
    if routing == "one-hot":
        return torch.full((T, k), E // 2, dtype=torch.int64)
    if routing == "skip":  # only even experts: the odd ones get nothing
        return torch.randint(0, (E + 1) // 2, (T, k)) * 2
    return torch.rand(T, E).argsort(dim=1)[:, :k]


def _topology(case: str) -> tuple[Topology, int, int]:
    T, k, E, B, F, K, N, routing = CASES[case]
    return plan_routing(_routing(T, k, E, routing), E, block_size=B, ffn_size=F).topology, K, N


# ----------------------------------------------------------------------------------------------- references


def _block_index(topo: Topology) -> tuple[torch.Tensor, ...]:
    """For every element of every used block that lies inside S: (slot, row in block, column in block,
    row of S, column of S), built by a plain loop over the row-major metadata."""
    B, F, nb = topo.block_size, topo.ffn_size, topo.blocks_per_expert
    nnz = int(topo.row_offsets[-1])
    idx = [[], [], [], [], []]
    for b in range(nnz):
        r, c = int(topo.row_indices[b]), int(topo.column_indices[b])
        e, j = divmod(c, nb)
        for i in range(B):
            for jj in range(min(B, F - j * B)):
                for lst, v in zip(idx, (b, i, jj, r * B + i, e * F + j * B + jj)):
                    lst.append(v)
    return tuple(torch.tensor(v, dtype=torch.long) for v in idx)


def _dense(data: torch.Tensor, topo: Topology) -> torch.Tensor:
    """S as a float64 dense ``[P, E·F]`` (differentiable in data)."""
    b, i, jj, rows, cols = _block_index(topo)
    S = torch.zeros(topo.num_rows, topo.num_experts * topo.ffn_size, dtype=torch.float64)
    return S.index_put((rows, cols), data.double()[b, i, jj])


def _blocks(dense: torch.Tensor, topo: Topology) -> torch.Tensor:
    """The blocks of ``topo`` cut out of a dense ``[P, E·F]``: zeros in padding columns and unused slots."""
    b, i, jj, rows, cols = _block_index(topo)
    out = torch.zeros(topo.nnz_max, topo.block_size, topo.block_size, dtype=torch.float64)
    return out.index_put((b, i, jj), dense[rows, cols])


def _ref(op: str, x: torch.Tensor, y: torch.Tensor, topo: Topology) -> torch.Tensor:
    """Float64 dense reference of each op; ``(x, y)`` are the op's two tensor operands in wrapper order."""
    E, F = topo.num_experts, topo.ffn_size
    x, y = x.double(), y.double()
    if op == "sdd":  # x = a [P, K], y = w [E, K, F]
        return _blocks(x @ y.permute(1, 0, 2).reshape(x.shape[1], E * F), topo)
    if op == "dsd":  # x = data, y = w [E, F, N]
        return _dense(x, topo) @ y.reshape(E * F, -1)
    if op == "dsd_t":  # x = data, y = a [P, N]
        return (_dense(x, topo).t() @ y).reshape(E, F, -1)
    if op == "dds":  # x = a [M, P], y = data
        return (x @ _dense(y, topo)).reshape(-1, E, F)
    return x.reshape(x.shape[0], E * F) @ _dense(y, topo).t()  # dds_t: x = g [M, E, F], y = data


# ----------------------------------------------------------------------------------------------- inputs


def _operands(op: str, topo: Topology, K: int, N: int, dtype: torch.dtype, strided: bool = False):
    """Fresh random operands of ``op`` in wrapper order. ``strided``: dense operands are transposed views."""
    P, E, F, B = topo.num_rows, topo.num_experts, topo.ffn_size, topo.block_size
    M = N

    def rand(*shape, perm=None):
        if strided and perm is not None:  # allocate in another layout, return the transposed view
            inv = [perm.index(d) for d in range(len(perm))]
            return torch.randn(*[shape[p] for p in perm]).to(dtype).permute(*inv)
        return torch.randn(*shape).to(dtype)

    data = torch.randn(topo.nnz_max, B, B).to(dtype)
    if op == "sdd":
        return rand(P, K, perm=[1, 0]), rand(E, K, F, perm=[0, 2, 1])
    if op == "dsd":
        return data, rand(E, F, N, perm=[0, 2, 1])
    if op == "dsd_t":
        return data, rand(P, N, perm=[1, 0])
    if op == "dds":
        return rand(M, P, perm=[1, 0]), data
    return rand(M, E, F, perm=[1, 2, 0]), data


def _call_kernel(op: str, x, y, topo, backend, out=None):
    backend = "torch" if backend == "torch-slots" else backend
    if op in ("sdd", "dds", "dds_t"):
        return getattr(kernels, op)(x, y, topo, backend=backend, out=out)
    return getattr(kernels, op)(x, topo, y, backend=backend, out=out)


def _call_op(op: str, x, y, topo, backend=None):
    backend = "torch" if backend == "torch-slots" else backend
    if op in ("sdd", "dds", "dds_t"):
        return getattr(bs_ops, op)(x, y, topo, backend=backend)
    return getattr(bs_ops, op)(x, topo, y, backend=backend)


def _out_shape(op: str, x, y, topo: Topology) -> tuple[int, ...]:
    E, F = topo.num_experts, topo.ffn_size
    return {
        "sdd": (topo.nnz_max, topo.block_size, topo.block_size),
        "dsd": (topo.num_rows, y.shape[-1]),
        "dsd_t": (E, F, y.shape[-1]),
        "dds": (x.shape[0], E, F),
        "dds_t": (x.shape[0], topo.num_rows),
    }[op]


def _poison_ignored(data: torch.Tensor, topo: Topology) -> torch.Tensor:
    """NaN in every element of ``data`` the contract ignores: unused slots and padding columns."""
    b, i, jj, _, _ = _block_index(topo)
    keep = torch.zeros(data.shape, dtype=torch.bool)
    keep[b, i, jj] = True
    return torch.where(keep, data, POISON)


OPS = ["sdd", "dsd", "dsd_t", "dds", "dds_t"]


# ----------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward(op, case, backend):
    """fp32, contiguous; outputs poisoned; data's ignored elements are NaN; inputs unchanged."""
    topo, K, N = _topology(case)
    x, y = _operands(op, topo, K, N, torch.float32)
    if op != "sdd":  # the sparse operand's unused slots and padding columns must be ignored
        x, y = (_poison_ignored(x, topo), y) if op in ("dsd", "dsd_t") else (x, _poison_ignored(y, topo))
    before = (x.clone(), y.clone())
    out = poison_(torch.empty(_out_shape(op, x, y, topo)))
    result = _call_kernel(op, x, y, topo, backend, out=out)
    assert result is out
    assert_close(out, _ref(op, x.nan_to_num(), y.nan_to_num(), topo), torch.float32)
    torch.testing.assert_close((x, y), before, equal_nan=True)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", ["empty-experts", "k=E"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_half(op, case, dtype, backend):
    """fp16 / bf16 inputs, output in the input dtype (reference from the rounded inputs)."""
    topo, K, N = _topology(case)
    x, y = _operands(op, topo, K, N, dtype)
    out = _call_kernel(op, x, y, topo, backend)
    assert out.dtype == dtype
    assert_close(out, _ref(op, x, y, topo), dtype)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_strided(op, dtype, backend):
    """Dense operands given as transposed views (e.g. w = w_t.transpose(1, 2)), used without copies."""
    topo, K, N = _topology("empty-experts")
    x, y = _operands(op, topo, K, N, dtype, strided=True)
    assert not (x.is_contiguous() and y.is_contiguous())
    assert_close(_call_kernel(op, x, y, topo, backend), _ref(op, x, y, topo), dtype)


def test_sdd_zeros_outside_blocks():
    """SDD writes exact zeros in unused slots and in the padding columns of each expert's last block."""
    topo, K, _ = _topology("empty-experts")
    a, w = _operands("sdd", topo, K, 0, torch.float32)
    data = kernels.sdd(a, w, topo, backend="triton", out=poison_(torch.empty(topo.nnz_max, 16, 16)))
    b, i, jj, _, _ = _block_index(topo)
    inside = torch.zeros(data.shape, dtype=torch.bool)
    inside[b, i, jj] = True
    assert int(topo.row_offsets[-1]) < topo.nnz_max  # the case has unused slots
    assert torch.equal(data[~inside], torch.zeros(int((~inside).sum())))


# ----------------------------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "case,dtype",
    [(c, torch.float32) for c in SMALL + ["empty"]] + [("k=E", torch.float16), ("k=E", torch.bfloat16)],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients(op, case, dtype, backend):
    """Both operands' gradients through the custom op vs autograd through the float64 dense reference."""
    topo, K, N = _topology(case)
    x, y = (t.requires_grad_() for t in _operands(op, topo, K, N, dtype))
    out = _call_op(op, x, y, topo, backend)
    cot = torch.randn(out.shape).to(dtype)
    grads = torch.autograd.grad(out, (x, y), cot)
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    ref = torch.autograd.grad(_ref(op, x64, y64, topo), (x64, y64), cot.double())
    for g, r in zip(grads, ref):
        assert g.dtype == dtype and g.shape == r.shape
        # bf16/fp16 gradients chain a rounded forward-shaped product: compare with a K-scaled tolerance
        torch.testing.assert_close(g.double(), r, atol=TOL[dtype]["atol"] * 4, rtol=TOL[dtype]["rtol"] * 2)


def test_gradients_strided():
    """Gradients when the weight is a transposed view (the layout of a real MLP's second projection)."""
    topo, K, N = _topology("one-expert")
    a, w = (t.requires_grad_() for t in _operands("sdd", topo, K, N, torch.float32, strided=True))
    out = bs_ops.sdd(a, w, topo)
    cot = torch.randn(out.shape)
    grads = torch.autograd.grad(out, (a, w), cot)
    a64, w64 = (t.detach().double().requires_grad_() for t in (a, w))
    ref = torch.autograd.grad(_ref("sdd", a64, w64, topo), (a64, w64), cot.double())
    for g, r in zip(grads, ref):
        assert_close(g, r, torch.float32)


def test_compile_fullgraph():
    """sdd → gelu → dsd under torch.compile(fullgraph=True) matches eager, forward and backward."""
    topo, K, N = _topology("empty-experts")
    E, F = topo.num_experts, topo.ffn_size
    a = torch.randn(topo.num_rows, K, requires_grad=True)
    w1 = torch.randn(E, K, F, requires_grad=True)
    w2 = torch.randn(E, F, N, requires_grad=True)

    def mlp(a, w1, w2):
        h = torch.nn.functional.gelu(bs_ops.sdd(a, w1, topo))
        return bs_ops.dsd(h, topo, w2)

    compiled = torch.compile(mlp, fullgraph=True)
    cot = torch.randn(topo.num_rows, N)
    y_eager = mlp(a, w1, w2)
    y_comp = compiled(a, w1, w2)
    assert_close(y_comp, y_eager.detach(), torch.float32)
    g_eager = torch.autograd.grad(y_eager, (a, w1, w2), cot)
    g_comp = torch.autograd.grad(y_comp, (a, w1, w2), cot)
    for gc, ge in zip(g_comp, g_eager):
        assert_close(gc, ge, torch.float32)


# ----------------------------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("case", list(CASES))
def test_topology_invariants(case):
    """The metadata properties the kernels rely on."""
    topo, _, _ = _topology(case)
    nb, E, R = topo.blocks_per_expert, topo.num_experts, topo.max_block_rows
    nnz = int(topo.row_offsets[-1])
    ri, ci = topo.row_indices.tolist(), topo.column_indices.tolist()
    ro, co = topo.row_offsets.tolist(), topo.column_offsets_t.tolist()
    assert co[-1] == nnz and ro[0] == 0 and co[0] == 0
    # used slots are contiguous at the front; unused ones hold -1
    assert all(ri[b] == -1 and ci[b] == -1 for b in range(nnz, topo.nnz_max))
    assert all(0 <= ci[b] < E * nb for b in range(nnz))
    # row r owns slots row_offsets[r]..row_offsets[r+1] (the SDD slot scan and DSD row walk)
    for r in range(R):
        assert all(ri[b] == r for b in range(ro[r], ro[r + 1]))
    # column c owns positions column_offsets_t[c].. (the DSDᵀ walk); each maps to a slot of that column and row
    bo, rit, cit = topo.block_offsets_t.tolist(), topo.row_indices_t.tolist(), topo.column_indices_t.tolist()
    assert sorted(bo) == list(range(topo.nnz_max))
    for c in range(E * nb):
        for t in range(co[c], co[c + 1]):
            assert cit[t] == c and ci[bo[t]] == c and ri[bo[t]] == rit[t]
    # the column-major walk covers each used slot once
    assert sorted(bo[:nnz]) == list(range(nnz))


# ----------------------------------------------------------------------------------------------- errors


def test_bad_inputs():
    topo, K, N = _topology("empty-experts")
    P, E, F = topo.num_rows, topo.num_experts, topo.ffn_size
    a, w = torch.randn(P, K), torch.randn(E, K, F)
    data = torch.randn(topo.nnz_max, 16, 16)
    with pytest.raises(ValueError, match=r"a must have shape \[P, K\]"):  # wrong dims
        bs_ops.sdd(a[None], w, topo)
    with pytest.raises(ValueError, match=r"w must have shape \[E, K, F\] = \(5, 19, 21\), got \(5, 18, 21\)"):
        bs_ops.sdd(a, w[:, 1:], topo)  # mismatched K
    with pytest.raises(ValueError, match=r"a must have shape \[P, K\]"):  # wrong row count
        bs_ops.sdd(a[1:], w, topo)
    with pytest.raises(TypeError, match="one dtype"):  # dtype mix
        bs_ops.sdd(a, w.half(), topo)
    with pytest.raises(TypeError, match="one dtype"):  # unsupported dtype
        bs_ops.dsd(data.double(), topo, torch.randn(E, F, N, dtype=torch.float64))
    with pytest.raises(ValueError, match="one device"):  # device mix
        kernels.dsd(data, topo, torch.randn(E, F, N, device="meta"))
    with pytest.raises(ValueError, match="backend must be one of"):  # unknown backend
        bs_ops.dsd_t(data, topo, torch.randn(P, N), backend="cuda")
    with pytest.raises(TypeError, match="Topology"):
        bs_ops.dds(torch.randn(3, P), data, "topo")
    with pytest.raises(ValueError, match=r"data must have shape"):
        bs_ops.dds_t(torch.randn(3, E, F), data[1:], topo)
    with pytest.raises(ValueError, match=r"g must have shape \[M, E, F\]"):
        bs_ops.dds_t(torch.randn(3, E, F + 1), data, topo)
    with pytest.raises(ValueError, match="out must have shape"):
        kernels.sdd(a, w, topo, out=torch.empty(1))
    with pytest.raises(TypeError, match="out must have the operands' dtype"):
        kernels.sdd(a, w, topo, out=torch.empty(topo.nnz_max, 16, 16, dtype=torch.float16))
    small = plan_routing(torch.zeros(3, 1, dtype=torch.long), 2, block_size=8, ffn_size=8).topology
    with pytest.raises(ValueError, match=r"block_size in \(16, 32, 64, 128\), got 8"):
        kernels.sdd(torch.randn(small.num_rows, 4), torch.randn(2, 4, 8), small, backend="triton")


def test_torch_backend_any_block_size():
    """The torch backend has no block-size restriction (B = 8 here)."""
    topo = plan_routing(torch.tensor([[0], [1], [1]]), 2, block_size=8, ffn_size=12).topology
    a, w = torch.randn(topo.num_rows, 5), torch.randn(2, 5, 12)
    assert_close(kernels.sdd(a, w, topo, backend="torch"), _ref("sdd", a, w, topo), torch.float32)


def test_compile_specs():
    """One spec per dtype × block size × layout (aligned config), plus the 16-bit unaligned fallbacks at
    B = 64 / 128, plus the fused-activation DSD (forward and Sᵀ, GLU or not) at B = 64 / 128; every non-constexpr
    argument typed."""
    specs = kernels.compile_specs()
    # 3 dtypes × 4 block sizes × (3 SDD + 5 DSD layouts), plus 2 dtypes × 2 block sizes × 8 unaligned fallbacks
    plain = 3 * 4 * (3 + 5) + 2 * 2 * (3 + 5)
    # fused: (3 dtypes × 2 block sizes + 4 16-bit fallbacks) × 2 ops × (GLU or not), + dsd_act's fp32 B = 128
    # unaligned fallback, GLU or not
    fused = (3 * 2 + 4) * 2 * 2 + 2
    assert len(specs) == plain + fused and len({s.name for s in specs}) == len(specs)
    for s in specs:
        assert set(s.signature) == set(s.kernel.arg_names)
        assert all(s.signature[n] == "constexpr" for n in s.constexprs)
        assert s.is_matmul == (s.constexprs["B"] >= 64)


# ----------------------------------------------------------------------------------------------- fused activation

ACTS = ["gelu", "gelu_tanh", "relu", "silu", "none"]
_ACTS64 = {
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda h: torch.nn.functional.gelu(h, approximate="tanh"),
    "relu": torch.relu,
    "silu": torch.nn.functional.silu,
    "none": lambda h: h,
}


def _act_operands(topo: Topology, N: int, dtype: torch.dtype, glu: bool):
    """Fresh random h (and g), NaN in every element the contract ignores (unused slots, padding columns), w."""
    B, E, F = topo.block_size, topo.num_experts, topo.ffn_size
    h = _poison_ignored(torch.randn(topo.nnz_max, B, B).to(dtype), topo)
    g = _poison_ignored(torch.randn(topo.nnz_max, B, B).to(dtype), topo) if glu else None
    return h, g, torch.randn(E, F, N).to(dtype)


def _act_ref(h, g, w, topo: Topology, activation: str) -> torch.Tensor:
    """Float64 ``(act(h) [* g]) @ w`` on the dense S (ignored elements never read)."""
    E, F = topo.num_experts, topo.ffn_size
    a = _dense(h, topo).double()
    a = _ACTS64[activation](a)
    if g is not None:
        a = a * _dense(g, topo)
    return a @ w.double().reshape(E * F, -1)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_dsd_act_forward(activation, glu, backend):
    """Fused ``dsd_act`` and its Sᵀ twin ``dsd_t_act`` (fp32, poisoned outputs and ignored inputs) vs float64;
    "empty-experts": experts with no tokens, odd F with a partial last block whose NaN padding must be masked."""
    topo, _, N = _topology("empty-experts")
    h, g, w = _act_operands(topo, N, torch.float32, glu)
    out = poison_(torch.empty(topo.num_rows, N))
    y = kernels.dsd_act(h, g, topo, w, activation, backend=backend, out=out)
    assert y is out
    assert_close(y, _act_ref(h, g, w, topo, activation), torch.float32)
    a = torch.randn(topo.num_rows, N)
    out_t = poison_(torch.empty(topo.num_experts, topo.ffn_size, N))
    kernels.dsd_t_act(h, g, topo, a, activation, backend=backend, out=out_t)
    E, F = topo.num_experts, topo.ffn_size
    act = _ACTS64[activation](_dense(h, topo))
    act = act if g is None else act * _dense(g, topo)
    assert_close(out_t, (act.t() @ a.double()).reshape(E, F, N), torch.float32)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dsd_act_gradients(activation, glu, dtype):
    """Gradients of h, g and w through ``bsm::dsd_act`` (triton) vs float64 autograd of the dense reference;
    gradients of ignored elements are unspecified (the NaN inputs there), so only the used ones are compared.
    "k=E": B = 32, two N tiles, a partial last block per expert; fp16/bf16 take the UPCAST dots."""
    topo, _, N = _topology("k=E" if dtype == torch.float32 else "one-expert")
    h, g, w = _act_operands(topo, N, dtype, glu)
    leaves = [t.requires_grad_() for t in (h, g, w) if t is not None]
    y = bs_ops.dsd_act(h, g, topo, w, activation)
    assert y.dtype == dtype
    cot = torch.randn(y.shape).to(dtype)
    grads = torch.autograd.grad(y, leaves, cot)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    h64, w64 = leaves64[0], leaves64[-1]
    g64 = leaves64[1] if glu else None
    ref = _act_ref(h64, g64, w64, topo, activation)
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), ref.detach(), atol=tol["atol"] * 2, rtol=tol["rtol"] * 2)
    refs = torch.autograd.grad(ref, leaves64, cot.double())
    keep = ~_poison_ignored(torch.zeros(h.shape), topo).isnan()
    for gr, r, t in zip(grads, refs, leaves):
        assert gr.dtype == dtype and gr.shape == t.shape
        if gr.shape == h.shape:
            gr, r = torch.where(keep, gr.double(), 0.0), torch.where(keep, r, 0.0)
        torch.testing.assert_close(gr.double(), r, atol=tol["atol"] * 4, rtol=tol["rtol"] * 2)


def test_dsd_act_bad_inputs():
    """Unknown activation, a gate of another shape / dtype: ValueError / TypeError naming expected and got."""
    topo, _, N = _topology("one-token")
    h, g, w = _act_operands(topo, N, torch.float32, glu=True)
    with pytest.raises(ValueError, match="activation must be one of"):
        bs_ops.dsd_act(h, g, topo, w, "tanh")
    with pytest.raises(ValueError, match="g"):
        kernels.dsd_act(h, g[:, :1], topo, w, "silu")
    with pytest.raises(TypeError, match="one dtype"):
        kernels.dsd_act(h, g.half(), topo, w, "silu")


def test_dsd_act_compile_fullgraph():
    """sdd, sdd → fused silu-GLU dsd_act under torch.compile(fullgraph=True) matches eager, forward and backward."""
    topo, K, N = _topology("empty-experts")
    E, F = topo.num_experts, topo.ffn_size
    a = torch.randn(topo.num_rows, K, requires_grad=True)
    w1, w3 = (torch.randn(E, K, F, requires_grad=True) for _ in range(2))
    w2 = torch.randn(E, F, N, requires_grad=True)

    def mlp(a, w1, w3, w2):
        return bs_ops.dsd_act(bs_ops.sdd(a, w1, topo), bs_ops.sdd(a, w3, topo), topo, w2, "silu")

    compiled = torch.compile(mlp, fullgraph=True)
    cot = torch.randn(topo.num_rows, N)
    y_eager = mlp(a, w1, w3, w2)
    y_comp = compiled(a, w1, w3, w2)
    assert_close(y_comp, y_eager.detach(), torch.float32)
    g_eager = torch.autograd.grad(y_eager, (a, w1, w3, w2), cot)
    g_comp = torch.autograd.grad(y_comp, (a, w1, w3, w2), cot)
    for gc, ge in zip(g_comp, g_eager):
        assert_close(gc, ge, torch.float32)
