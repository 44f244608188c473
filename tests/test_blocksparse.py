"""Block-sparse SDD / DSD / DSDᵀ / DDS / DDSᵀ and SDD's weight gradient: the Triton backend (interpreter) and the
torch backend vs float64 dense references, gradients, strided operands, the topology, errors, torch.compile."""

from __future__ import annotations

import pytest
import torch
from helpers import POISON, assert_close, assert_close_to_reference, poison_

from blocksparse_moe import backends
from blocksparse_moe.ops import blocksparse as bs_ops
from blocksparse_moe.routing import Topology, plan_routing

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# "torch-tiles": the torch backend's sync-free tile schedule (used on GPU and under torch.compile) instead of its
# CPU-eager per-expert loop
BACKENDS = ["triton", "torch", "torch-tiles"]


@pytest.fixture(autouse=True)
def _tile_schedule(request, monkeypatch):
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "torch-tiles":
        monkeypatch.setattr(backends.get("torch"), "host_loop_ok", lambda x: False)


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
    return plan_routing(_routing(T, k, E, routing), E, block_size=B).topology(F), K, N


# ----------------------------------------------------------------------------------------------- references


def _block_index(topo: Topology) -> tuple[torch.Tensor, ...]:
    """For every element of every used block that lies inside S: (slot, row in block, column in block,
    row of S, column of S), by a plain loop over the block rows of each expert (``padded_offsets``)."""
    B, F, nb = topo.block_size, topo.ffn_size, topo.blocks_per_expert
    po = topo.padded_offsets.tolist()
    idx = [[], [], [], [], []]
    for e in range(topo.num_experts):
        for r in range(po[e] // B, po[e + 1] // B):
            for j in range(nb):
                for i in range(B):
                    for jj in range(min(B, F - j * B)):
                        for lst, v in zip(idx, (r * nb + j, i, jj, r * B + i, e * F + j * B + jj)):
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
    if op == "sdd_wgrad":  # x = a [P, K], y = data: per expert a[rows of e]ᵀ @ S[rows of e, e's columns]
        S = _dense(y, topo).reshape(topo.num_rows, E, F)
        return torch.stack([x.t() @ S[:, e] for e in range(E)])
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
    if op == "sdd_wgrad":
        return rand(P, K, perm=[1, 0]), data
    return rand(M, E, F, perm=[1, 2, 0]), data


def _call_kernel(op: str, x, y, topo, backend, out=None):
    """The backend function itself (no custom op), writing into ``out`` when given (poisoned by the tests)."""
    impl = backends.get("torch" if backend == "torch-tiles" else backend)
    if op in ("sdd", "dds", "dds_t", "sdd_wgrad"):
        return getattr(impl, op)(x, y, topo, out=out)
    return getattr(impl, op)(x, topo, y, out=out)


def _call_op(op: str, x, y, topo, backend=None):
    backend = "torch" if backend == "torch-tiles" else backend
    if op in ("sdd", "dds", "dds_t", "sdd_wgrad"):
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
        "sdd_wgrad": (E, x.shape[1], F),
    }[op]


def _poison_ignored(data: torch.Tensor, topo: Topology) -> torch.Tensor:
    """NaN in every element of ``data`` the contract ignores: unused slots and padding columns."""
    b, i, jj, _, _ = _block_index(topo)
    keep = torch.zeros(data.shape, dtype=torch.bool)
    keep[b, i, jj] = True
    return torch.where(keep, data, POISON)


OPS = ["sdd", "dsd", "dsd_t", "dds", "dds_t", "sdd_wgrad"]


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
    # sdd_wgrad reads rows of a only where S has blocks; the rows past the used ones must be ignored
    if op == "sdd_wgrad":
        x[int(topo.padded_offsets[-1]) :] = POISON
    before = (x.clone(), y.clone())
    out = poison_(torch.empty(_out_shape(op, x, y, topo)))
    result = _call_kernel(op, x, y, topo, backend, out=out)
    assert result is out
    same = _call_kernel(op, x, y, topo, "torch") if backend == "triton" else None  # the torch backend: TOL
    assert_close_to_reference(out, _ref(op, x.nan_to_num(), y.nan_to_num(), topo), same)
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
    same = _call_kernel(op, x, y, topo, "torch") if backend == "triton" else None  # the torch backend: TOL
    assert_close_to_reference(out, _ref(op, x, y, topo), same)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_strided(op, dtype, backend):
    """Dense operands given as transposed views (e.g. w = w_t.transpose(1, 2)), used without copies."""
    topo, K, N = _topology("empty-experts")
    x, y = _operands(op, topo, K, N, dtype, strided=True)
    assert not (x.is_contiguous() and y.is_contiguous())
    same = _call_kernel(op, x, y, topo, "torch") if backend == "triton" else None  # the torch backend: TOL
    assert_close_to_reference(_call_kernel(op, x, y, topo, backend), _ref(op, x, y, topo), same)


def test_sdd_zeros_outside_blocks():
    """SDD writes exact zeros in unused slots and in the padding columns of each expert's last block."""
    topo, K, _ = _topology("empty-experts")
    a, w = _operands("sdd", topo, K, 0, torch.float32)
    data = backends.get("triton").sdd(a, w, topo, out=poison_(torch.empty(topo.nnz_max, 16, 16)))
    b, i, jj, _, _ = _block_index(topo)
    inside = torch.zeros(data.shape, dtype=torch.bool)
    inside[b, i, jj] = True
    assert int(topo.nnz) < topo.nnz_max  # the case has unused slots
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
    same = [None, None]  # the torch backend: the TOL table
    if backend == "triton":
        same = torch.autograd.grad(_call_op(op, x, y, topo, "torch"), (x, y), cot)
    for g, r, sp in zip(grads, ref, same):
        assert g.dtype == dtype and g.shape == r.shape
        assert_close_to_reference(g, r, sp)


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
    """What the kernels compute instead of loading: expert row ranges that are whole blocks, in order, used block
    rows first, and every block row's expert (the closed form of the module docstring of ``routing``)."""
    topo, _, _ = _topology(case)
    B, E, R = topo.block_size, topo.num_experts, topo.max_block_rows
    po = topo.padded_offsets.tolist()
    assert po[0] == 0 and all(a <= b for a, b in zip(po, po[1:])) and po[-1] <= R * B
    assert all(v % B == 0 for v in po)
    assert int(topo.nnz) == po[-1] // B * topo.blocks_per_expert <= topo.nnz_max
    T, k, E_case, *_ = CASES[case]
    # R bounds Σ_e ceil(n_e / B) for every routing of T·k assignments
    assert min(T * k, (T * k + E * (B - 1)) // B) == R


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
        bs_ops.dsd(data.int(), topo, torch.randn(E, F, N).int())
    with pytest.raises(TypeError, match="backend='triton' takes operands of a dtype among"):  # fp64: torch only
        bs_ops.dsd(data.double(), topo, torch.randn(E, F, N, dtype=torch.float64), backend="triton")
    with pytest.raises(ValueError, match="one device"):  # device mix
        bs_ops.dsd(data, topo, torch.randn(E, F, N, device="meta"))
    with pytest.raises(ValueError, match="backend must be one of"):  # unknown backend
        bs_ops.dsd_t(data, topo, torch.randn(P, N), backend="cuda")
    with pytest.raises(TypeError, match="Topology"):
        bs_ops.dds(torch.randn(3, P), data, "topo")
    with pytest.raises(ValueError, match=r"data must have shape"):
        bs_ops.dds_t(torch.randn(3, E, F), data[1:], topo)
    with pytest.raises(ValueError, match=r"g must have shape \[M, E, F\]"):
        bs_ops.dds_t(torch.randn(3, E, F + 1), data, topo)
    bad = Topology(16, E, F, topo.max_block_rows, topo.padded_offsets + 1)  # offsets not from 0 in whole blocks
    with pytest.raises(ValueError, match="padded_offsets must rise from 0"):
        bs_ops.sdd(a, w, bad)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        bs_ops.sdd(a, w, Topology(12, E, F, topo.max_block_rows, topo.padded_offsets))
    # one validation for both backends: the torch backend rejects what the triton one does
    with pytest.raises(ValueError, match="padded_offsets must rise from 0"):
        bs_ops.sdd(a, w, bad, backend="torch")


@pytest.mark.parametrize("B", [16, 32])
def test_triton_blocks_under_64_rows_only_when_interpreting(B, monkeypatch):
    """On a GPU the Triton backend takes block sizes 64 and 128 (``layouts.GPU_BLOCK_SIZES``: the tiles
    ``bench.audit`` builds); 16 and 32, the interpreter tests' sizes, raise a ValueError naming the supported ones
    before any launch, for the block-sparse ops and the fused MLP's blocked layout alike. The torch backend takes
    them. (Before: they launched mma.sync tiles no audit build covered.)"""
    from blocksparse_moe.ops.mlp import expert_mlp, mlp_routing

    triton_backend = backends.get("triton")
    E, d, F = 3, 8, 2 * B
    idx = _routing(5, 2, E, "uniform")
    topo = plan_routing(idx, E, block_size=B).topology(F)
    a, w = torch.randn(topo.num_rows, d), torch.randn(E, d, F)
    expected = bs_ops.sdd(a, w, topo, backend="torch")
    torch.testing.assert_close(bs_ops.sdd(a, w, topo, backend="triton"), expected)  # interpreting: B is taken
    monkeypatch.setattr(triton_backend, "interpreting", lambda: False)  # the GPU path
    with pytest.raises(ValueError, match=rf"block_size in \(64, 128\) on a GPU, got {B}"):
        bs_ops.sdd(a, w, topo, backend="triton")
    with pytest.raises(ValueError, match=rf"block_size in \(64, 128\) on a GPU, got {B}"):  # the blocked MLP
        x, weights = torch.randn(5, d), torch.rand(5, 2)
        w1, w2 = torch.randn(E, d, F), torch.randn(E, F, d)
        expert_mlp(x, weights, w1, w2, None, mlp_routing(plan_routing(idx, E, block_size=B)), "silu", "triton")
    torch.testing.assert_close(bs_ops.sdd(a, w, topo, backend="torch"), expected)  # the torch backend takes B


@pytest.mark.parametrize("op", OPS)
def test_float64_torch_backend(op):
    """float64 runs on the torch backend (``auto`` picks it: the kernels take fp32 / fp16 / bf16) and matches
    the float64 reference to float64 precision."""
    topo, K, N = _topology("k=E")
    x, y = _operands(op, topo, K, N, torch.float64)
    torch.testing.assert_close(_call_op(op, x, y, topo), _ref(op, x, y, topo), atol=1e-12, rtol=1e-12)
