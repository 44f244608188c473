"""moe_mlp: every strategy vs the float64 per-token loop (outputs and all gradients), padded drop semantics,
stats, activation recomputation, bad and empty inputs. Triton ops run under the interpreter on CPU."""

import math

import pytest
import torch
from helpers import TOL, assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from blocksparse_moe.functional import moe_mlp, padded_slots
from blocksparse_moe.reference import per_token_moe_mlp
from blocksparse_moe.routing import plan_routing

IMPLS = ["blocksparse", "grouped", "padded", "reference"]
B = 16  # blocksparse block size in the interpreter


def _routing(T, k, E, kind):
    if kind == "one-expert":
        return torch.full((T, k), E // 2, dtype=torch.int64)
    if kind == "skip":  # only even experts: empty experts between used ones, and the last one empty
        return torch.randint(0, (E + 1) // 2, (T, k)) * 2 % E
    if kind == "dup":
        return torch.randint(0, E, (T, 1)).expand(T, k).contiguous()
    return torch.rand(T, E).argsort(dim=1)[:, :k]  # distinct experts per token


def _inputs(T, d, f, E, k, kind="uniform", glu=True, dtype=torch.float32, transposed=False):
    x = torch.randn(T, d, dtype=dtype)
    idx = _routing(T, k, E, kind)
    w = torch.rand(T, k, dtype=dtype)
    if transposed:  # strided views: w1/w3 as transposes of [E, f, d], w2 of [E, d, f]
        w1 = (torch.randn(E, f, d) / math.sqrt(d)).to(dtype).transpose(1, 2)
        w2 = (torch.randn(E, d, f) / math.sqrt(f)).to(dtype).transpose(1, 2)
        w3 = (torch.randn(E, f, d) / math.sqrt(d)).to(dtype).transpose(1, 2) if glu else None
    else:
        w1 = (torch.randn(E, d, f) / math.sqrt(d)).to(dtype)
        w2 = (torch.randn(E, f, d) / math.sqrt(f)).to(dtype)
        w3 = (torch.randn(E, d, f) / math.sqrt(d)).to(dtype) if glu else None
    return x, idx, w, w1, w2, w3


def _impl_kwargs(impl, T, k):
    if impl == "padded":
        return dict(capacity=T * k)  # ample: nothing dropped
    if impl == "blocksparse":
        return dict(block_size=B)
    return {}


def _check_against_reference(impl, x, idx, w, w1, w2, w3, activation, weight_mask=None, **kwargs):
    """Forward and every gradient of moe_mlp vs the float64 loop (weight_mask zeroes dropped assignments)."""
    dtype = x.dtype
    diff = [t for t in (x, w, w1, w2, w3) if t is not None]
    leaves = [t.detach().clone().requires_grad_() for t in diff]
    refs = [t.detach().double().requires_grad_() for t in diff]
    before = [t.detach().clone() for t in diff] + [idx.clone()]
    lx, lw, lw1, lw2, *lw3 = leaves
    rx, rw, rw1, rw2, *rw3 = refs
    out = moe_mlp(lx, idx, lw, lw1, lw2, lw3[0] if lw3 else None, activation=activation, impl=impl, **kwargs)
    mask = torch.ones_like(rw) if weight_mask is None else weight_mask.double()
    ref = per_token_moe_mlp(rx, idx, rw * mask, rw1, rw2, rw3[0] if rw3 else None, activation)
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out, ref, dtype)
    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    for name, leaf, r in zip(["x", "top_k_weights", "w1", "w2", "w3"], leaves, refs):
        assert leaf.grad is not None, name
        assert leaf.grad.shape == leaf.shape, name
        tol = TOL[dtype]
        torch.testing.assert_close(leaf.grad.double(), r.grad, **tol, msg=lambda m, n=name: f"grad {n}: {m}")
    # inputs never modified
    for t, b in zip(diff + [idx], before):
        assert torch.equal(t, b)


CASES = [
    # (T, d, f, E, k, routing, glu, activation)
    (13, 13, 19, 4, 2, "uniform", True, "silu"),  # odd sizes (not multiples of anything), GLU
    (7, 16, 24, 1, 1, "uniform", False, "gelu"),  # E = 1, k = 1
    (9, 12, 20, 3, 3, "uniform", False, "gelu_tanh"),  # k = E
    (1, 16, 16, 4, 2, "uniform", True, "relu"),  # one token (most experts empty)
    (10, 16, 20, 5, 3, "dup", False, "gelu"),  # duplicate experts in one row
    (16, 16, 33, 4, 2, "one-expert", True, "silu"),  # all tokens to one expert, F = 2B + 1
    (11, 20, 17, 6, 2, "skip", False, "relu"),  # experts with no tokens (between used ones and last)
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T,d,f,E,k,routing,glu,activation", CASES)
def test_matches_reference(impl, T, d, f, E, k, routing, glu, activation):
    x, idx, w, w1, w2, w3 = _inputs(T, d, f, E, k, routing, glu)
    _check_against_reference(impl, x, idx, w, w1, w2, w3, activation, **_impl_kwargs(impl, T, k))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(impl, dtype):
    # fp16 / bf16 inputs (bf16 exercises the interpreter's upcast switch); odd sizes, GLU
    x, idx, w, w1, w2, w3 = _inputs(12, 13, 19, 4, 2, "uniform", True, dtype)
    _check_against_reference(impl, x, idx, w, w1, w2, w3, "silu", **_impl_kwargs(impl, 12, 2))


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_weights_and_callable_activation(impl):
    # weights are transposed views (no copies expected), activation is a user callable; largest test shape
    x, idx, w, w1, w2, w3 = _inputs(24, 40, 40, 4, 2, "uniform", True, transposed=True)
    act = lambda h: torch.tanh(h) * h  # noqa: E731
    _check_against_reference(impl, x, idx, w, w1, w2, w3, act, **_impl_kwargs(impl, 24, 2))


@pytest.mark.parametrize("impl", IMPLS)
def test_weights_in_another_dtype(impl):
    # fp32 router weights with fp16 tokens: weights are cast to x's dtype, grads come back in fp32
    x, idx, w, w1, w2, w3 = _inputs(8, 16, 16, 4, 2, "uniform", True, torch.float16)
    w32 = w.float().requires_grad_()
    out = moe_mlp(x, idx, w32, w1, w2, w3, impl=impl, **_impl_kwargs(impl, 8, 2))
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert w32.grad.dtype == torch.float32 and torch.isfinite(w32.grad).all()


def test_auto_picks_grouped_on_cpu():
    # impl="auto" resolves per device: "grouped" on CPU, and agrees with the reference
    x, idx, w, w1, w2, w3 = _inputs(9, 16, 16, 3, 2)
    out, stats = moe_mlp(x, idx, w, w1, w2, w3, return_stats=True)
    assert stats.impl == ("blocksparse" if x.is_cuda else "grouped")
    assert_close(out, per_token_moe_mlp(x, idx, w, w1, w2, w3))


# ---------------------------------------------------------------------------------------------------------------
# padded: capacity, drop order, groups


def _slots_loop(idx, E, C, G):
    """Independent loop: per group, rank-major then token order; slot = (g·E + e)·C + position, G·E·C if dropped."""
    T, k = idx.shape
    S = T // G
    slots = [[None] * k for _ in range(T)]
    for g in range(G):
        count = [0] * E
        for j in range(k):
            for t in range(g * S, (g + 1) * S):
                e = int(idx[t, j])
                if count[e] < C:
                    slots[t][j] = (g * E + e) * C + count[e]
                    count[e] += 1
                else:
                    slots[t][j] = G * E * C
    return torch.tensor(slots, dtype=torch.int64).view(T, k)


@pytest.mark.parametrize(
    "T,k,E,C,G,routing",
    [
        (12, 2, 4, 3, 1, "uniform"),  # one group, some drops
        (12, 2, 4, 2, 3, "uniform"),  # three groups: capacity per group
        (10, 3, 5, 2, 2, "dup"),  # duplicate experts in a row: later ranks of the same token drop first
        (8, 2, 4, 3, 1, "one-expert"),  # all tokens to one expert: only the first C first-choices survive
        (6, 2, 3, 0, 1, "uniform"),  # capacity 0: everything dropped
        (5, 1, 1, 5, 1, "uniform"),  # E = 1, exactly full
    ],
)
def test_padded_slots_vs_loop(T, k, E, C, G, routing):
    idx = _routing(T, k, E, routing)
    assert torch.equal(padded_slots(idx, E, C, G), _slots_loop(idx, E, C, G))


@pytest.mark.parametrize("T,k,E,cf,G", [(12, 2, 4, 1.0, 1), (12, 2, 4, 0.75, 2), (9, 3, 3, 0.5, 3)])
def test_padded_drops_match_loop(T, k, E, cf, G):
    # drops: output and all gradients equal the float64 loop with dropped assignments' weights zeroed
    d, f = 13, 19
    x, idx, w, w1, w2, w3 = _inputs(T, d, f, E, k, "uniform", True)
    C = math.ceil(cf * (T // G) * k / E)
    loop = _slots_loop(idx, E, C, G)
    kept = loop < G * E * C
    _check_against_reference(
        "padded", x, idx, w, w1, w2, w3, "gelu", weight_mask=kept, capacity_factor=cf, num_groups=G
    )
    _, stats = moe_mlp(x, idx, w, w1, w2, w3, impl="padded", capacity_factor=cf, num_groups=G, return_stats=True)
    assert stats.capacity == C
    assert int(stats.dropped) == int((~kept).sum())
    assert stats.executed_flops == E * C * G * 2 * d * f * 3
    assert stats.useful_flops == 2 * T * k * d * f * 3


def test_padded_default_capacity_factor_is_one():
    # neither capacity nor capacity_factor: capacity_factor 1.0
    x, idx, w, w1, w2, w3 = _inputs(12, 8, 8, 4, 2)
    _, stats = moe_mlp(x, idx, w, w1, w2, w3, impl="padded", return_stats=True)
    assert stats.capacity == math.ceil(12 * 2 / 4)


def test_stats_flops():
    # executed vs useful FLOPs per strategy (GLU: 3 GEMMs)
    T, d, f, E, k = 11, 16, 20, 4, 2
    x, idx, w, w1, w2, w3 = _inputs(T, d, f, E, k, "skip", True)
    useful = 2 * T * k * d * f * 3
    counts = torch.bincount(idx.flatten(), minlength=E)
    padded_rows = int(((counts + B - 1) // B * B).sum())
    expected = {
        "blocksparse": padded_rows * 2 * d * f * 3,
        "grouped": useful,
        "reference": E * T * 2 * d * f * 3,
    }
    for impl, executed in expected.items():
        _, s = moe_mlp(x, idx, w, w1, w2, w3, impl=impl, return_stats=True, **_impl_kwargs(impl, T, k))
        assert (s.impl, s.capacity, int(s.dropped), s.useful_flops) == (impl, None, 0, useful)
        assert int(s.executed_flops) == executed, impl


# ---------------------------------------------------------------------------------------------------------------
# recompute_activation


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func)] = self.calls.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("impl", IMPLS[:3])
def test_recompute_activation(impl):
    # same gradients; the activation runs again in backward, the second GEMM does not
    x, idx, w, w1, w2, w3 = _inputs(13, 13, 19, 4, 2, "uniform", True)
    calls = []

    def act(h):
        calls.append(1)
        return torch.nn.functional.silu(h)

    results = []
    for recompute in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, w1, w2, w3)]
        calls.clear()
        with _CountOps() as ops:
            out = moe_mlp(
                leaves[0],
                idx,
                *leaves[1:],
                activation=act,
                impl=impl,
                recompute_activation=recompute,
                **_impl_kwargs(impl, 13, 2),
            )
            out.backward(torch.ones_like(out))
        gemms = {name: n for name, n in ops.calls.items() if "bmm" in name or name.startswith("bsm.")}
        results.append((out, [t.grad for t in leaves], len(calls), gemms))
    (out0, grads0, acts0, gemms0), (out1, grads1, acts1, gemms1) = results
    torch.testing.assert_close(out1, out0)
    for g1, g0 in zip(grads1, grads0):
        torch.testing.assert_close(g1, g0)
    assert (acts0, acts1) == (1, 2)
    assert gemms1 == gemms0  # no GEMM recomputed


def _saved_block_tensors(fn, nnz_shape) -> tuple[torch.Tensor, int]:
    """``fn()``, and how many distinct ``[nnz_max, B, B]`` tensors autograd saved while it ran."""
    saved = {}

    def pack(t):
        if tuple(t.shape) == nnz_shape:
            saved[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, len(saved)


@pytest.mark.parametrize("glu", [False, True])
def test_blocksparse_fused_activation_saves_only_pre_activation(glu):
    # a named activation runs fused in bsm::dsd_act: autograd keeps h (and g) only, no post-activation copy, with
    # or without recompute_activation (same results); a callable keeps the unfused path (one more block tensor)
    x, idx, w, w1, w2, w3 = _inputs(13, 13, 19, 4, 2, "uniform", glu)
    topo = plan_routing(idx, 4, block_size=B, ffn_size=19).topology
    leaves = [t.requires_grad_() for t in (x, w1, w2) + ((w3,) if glu else ())]
    runs = {"fused": ("silu", False), "fused-rc": ("silu", True), "callable": (torch.nn.functional.silu, False)}
    outs, saved = {}, {}
    for name, (act, recompute) in runs.items():

        def run(act=act, recompute=recompute):
            kw = dict(activation=act, recompute_activation=recompute, impl="blocksparse", block_size=B)
            return moe_mlp(x, idx, w, w1, w2, w3, **kw)

        with _CountOps() as ops:
            outs[name], saved[name] = _saved_block_tensors(run, (topo.nnz_max, B, B))
        assert ("bsm.dsd_act.default" in ops.calls) == (name != "callable")
    assert saved["fused"] == saved["fused-rc"] == (2 if glu else 1)
    assert saved["callable"] > saved["fused"]
    cot = torch.randn_like(outs["fused"])
    grads = {name: torch.autograd.grad(o, leaves, cot) for name, o in outs.items()}
    torch.testing.assert_close(outs["fused-rc"], outs["fused"])
    torch.testing.assert_close(outs["callable"], outs["fused"], atol=1e-5, rtol=1e-5)
    for g_rc, g_f, g_c in zip(grads["fused-rc"], grads["fused"], grads["callable"]):
        torch.testing.assert_close(g_rc, g_f)
        torch.testing.assert_close(g_c, g_f, atol=1e-5, rtol=1e-5)


def test_blocksparse_fused_compile_fullgraph():
    # torch.compile(fullgraph=True) of the fused blocksparse MLP (GLU, odd sizes) matches eager, forward + backward
    x, idx, w, w1, w2, w3 = _inputs(13, 13, 19, 4, 2, "uniform", True)
    leaves = [t.requires_grad_() for t in (x, w, w1, w2, w3)]

    def mlp(x, w, w1, w2, w3):
        return moe_mlp(x, idx, w, w1, w2, w3, activation="gelu", impl="blocksparse", block_size=B)

    eager = mlp(*leaves)
    compiled = torch.compile(mlp, fullgraph=True)(*leaves)
    torch.testing.assert_close(compiled, eager)
    cot = torch.randn_like(eager)
    for gc, ge in zip(torch.autograd.grad(compiled, leaves, cot), torch.autograd.grad(eager, leaves, cot)):
        torch.testing.assert_close(gc, ge)


# ---------------------------------------------------------------------------------------------------------------
# empty input, bad input


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_input(impl):
    # T = 0: empty [0, d] output, zero weight gradients
    x, idx, w, w1, w2, w3 = _inputs(0, 16, 16, 4, 2)
    leaves = [t.requires_grad_() for t in (x, w, w1, w2, w3)]
    kwargs = {} if impl == "padded" else _impl_kwargs(impl, 0, 2)
    out = moe_mlp(x, idx, w, w1, w2, w3, impl=impl, **kwargs)
    assert out.shape == (0, 16)
    out.sum().backward()
    for t in leaves:
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


def _bad_cases():
    x, idx, w, w1, w2, w3 = _inputs(6, 8, 12, 4, 2)
    base = dict(x=x, top_k_index=idx, top_k_weights=w, w1=w1, w2=w2, w3=w3)
    return [
        (dict(x=x[0]), {}, ValueError, "x must be 2-D"),
        (dict(x=x.long()), {}, TypeError, "x must be one of"),
        (dict(top_k_index=idx.float()), {}, TypeError, "int32 or int64"),
        (dict(top_k_index=idx[:5]), {}, ValueError, "top_k_index must be"),
        (dict(top_k_index=idx.clone().fill_(4)), {}, ValueError, r"expert ids in \[0, 4\)"),
        (dict(top_k_index=idx.clone().fill_(-1)), dict(impl="padded"), ValueError, "expert ids"),
        (dict(top_k_weights=w[:, :1]), {}, ValueError, "top_k_weights must have"),
        (dict(top_k_weights=w.long()), {}, TypeError, "float tensor"),
        (dict(w1=w1[:, :7]), {}, ValueError, "w1 must be"),
        (dict(w2=w2[:3]), {}, ValueError, "w2 must be"),
        (dict(w3=w3[..., :5]), {}, ValueError, "w3 must have"),
        (dict(w2=w2.double()), {}, TypeError, "w2 must have x's dtype"),
        (dict(w1=[1.0]), {}, TypeError, "w1 must be a torch.Tensor"),
        (dict(w2=w2.to("meta")), {}, ValueError, "one device"),
        ({}, dict(activation="tanh"), ValueError, "activation must be one of"),
        ({}, dict(impl="dense"), ValueError, "impl must be one of"),
        ({}, dict(backend="cuda"), ValueError, "backend must be one of"),
        ({}, dict(impl="padded", capacity_factor=-1.0), ValueError, "non-negative"),
        ({}, dict(impl="padded", capacity=-2), ValueError, "non-negative"),
        ({}, dict(impl="padded", capacity=2, capacity_factor=1.0), ValueError, "not both"),
        ({}, dict(impl="padded", num_groups=4), ValueError, "divide"),
        ({}, dict(impl="padded", num_groups=0), ValueError, "positive"),
        ({}, dict(impl="grouped", capacity_factor=1.0), ValueError, "impl='padded' only"),
        ({}, dict(impl="blocksparse", num_groups=2), ValueError, "impl='padded' only"),
        ({}, dict(capacity=4), ValueError, "impl='padded' only"),
        ({}, dict(impl="blocksparse", block_size=0), ValueError, "block_size must be"),
        ({}, dict(impl="padded", block_size=16), ValueError, "block_size applies"),
        ({}, dict(recompute_activation=1), TypeError, "recompute_activation"),
    ], base


@pytest.mark.parametrize("case", range(len(_bad_cases()[0])))
def test_bad_input(case):
    cases, base = _bad_cases()
    tensors, options, exc, match = cases[case]
    args = {**base, **tensors}
    with pytest.raises(exc, match=match):
        moe_mlp(*args.values(), **options)
