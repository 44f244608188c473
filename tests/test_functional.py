"""moe_mlp: every strategy vs the float64 per-token loop (outputs and all gradients), padded drop semantics,
stats, activation recomputation, bad and empty inputs. Triton ops run under the interpreter on CPU."""

import math

import pytest
import torch
from helpers import TOL, assert_close, routing
from torch.utils._python_dispatch import TorchDispatchMode

from blocksparse_moe.functional import custom_moe_mlp, moe_mlp
from blocksparse_moe.options import MoEOptions
from blocksparse_moe.reference import per_token_moe_mlp
from blocksparse_moe.routing import plan_routing
from blocksparse_moe.strategies import padded_slots

IMPLS = ["blocksparse", "grouped", "padded", "reference"]
B = 16  # blocksparse block size in the interpreter


def _inputs(T, d, f, E, k, kind="uniform", glu=True, dtype=torch.float32, transposed=False):
    x = torch.randn(T, d, dtype=dtype)
    idx = routing(T, k, E, kind)
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


def _check_against_reference(impl, x, idx, w, w1, w2, w3, activation, weight_mask=None, ref_index=None, **kwargs):
    """Forward and every gradient of moe_mlp vs the float64 loop (weight_mask zeroes dropped assignments; the loop
    routes by ref_index when given, e.g. invalid ids replaced by valid ones whose weight the mask zeroes)."""
    dtype = x.dtype
    diff = [t for t in (x, w, w1, w2, w3) if t is not None]
    leaves = [t.detach().clone().requires_grad_() for t in diff]
    refs = [t.detach().double().requires_grad_() for t in diff]
    before = [t.detach().clone() for t in diff] + [idx.clone()]
    lx, lw, lw1, lw2, *lw3 = leaves
    rx, rw, rw1, rw2, *rw3 = refs
    out = moe_mlp(lx, idx, lw, lw1, lw2, lw3[0] if lw3 else None, activation=activation, impl=impl, **kwargs)
    mask = torch.ones_like(rw) if weight_mask is None else weight_mask.double()
    ref_idx = idx if ref_index is None else ref_index
    ref = per_token_moe_mlp(rx, ref_idx, rw * mask, rw1, rw2, rw3[0] if rw3 else None, activation)
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
    (10, 16, 20, 5, 3, "duplicates", False, "gelu"),  # duplicate experts in one row
    (16, 16, 33, 4, 2, "one-hot", True, "silu"),  # all tokens to one expert, F = 2B + 1
    (11, 20, 17, 6, 2, "skip", False, "relu"),  # experts with no tokens (between used ones and last)
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T,d,f,E,k,kind,glu,activation", CASES)
def test_matches_reference(impl, T, d, f, E, k, kind, glu, activation):
    x, idx, w, w1, w2, w3 = _inputs(T, d, f, E, k, kind, glu)
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
    # fp32 router weights with fp16 tokens: output in fp16, the weights' gradient in fp32 and right
    x, idx, w, w1, w2, w3 = _inputs(8, 16, 16, 4, 2, "uniform", True, torch.float16)
    w32 = w.float().requires_grad_()
    out = moe_mlp(x, idx, w32, w1, w2, w3, impl=impl, **_impl_kwargs(impl, 8, 2))
    assert out.dtype == torch.float16
    grad = torch.randn(out.shape, dtype=torch.float64)
    out.float().backward(grad.float())
    w64 = w.double().requires_grad_()
    per_token_moe_mlp(x, idx, w64, w1, w2, w3).backward(grad)
    assert w32.grad.dtype == torch.float32
    torch.testing.assert_close(w32.grad.double(), w64.grad, **TOL[torch.float16])


def test_auto_picks_grouped_on_cpu():
    # impl="auto" resolves per device: "grouped" on CPU, and agrees with the reference
    x, idx, w, w1, w2, w3 = _inputs(9, 16, 16, 3, 2)
    out, stats = moe_mlp(x, idx, w, w1, w2, w3, return_stats=True)
    assert stats.impl == ("blocksparse" if x.is_cuda else "grouped")
    assert_close(out, per_token_moe_mlp(x, idx, w, w1, w2, w3))


# ---------------------------------------------------------------------------------------------------------------
# padded: capacity, drop order, groups


def _slots_loop(idx, E, C, G):
    """Independent loop: per group, rank-major then token order; slot = (g·E + e)·C + position, G·E·C if dropped
    (or an invalid id)."""
    T, k = idx.shape
    S = T // G
    slots = [[None] * k for _ in range(T)]
    for g in range(G):
        count = [0] * E
        for j in range(k):
            for t in range(g * S, (g + 1) * S):
                e = int(idx[t, j])
                if 0 <= e < E and count[e] < C:
                    slots[t][j] = (g * E + e) * C + count[e]
                    count[e] += 1
                else:
                    slots[t][j] = G * E * C
    return torch.tensor(slots, dtype=torch.int64).view(T, k)


@pytest.mark.parametrize(
    "T,k,E,C,G,kind",
    [
        (12, 2, 4, 3, 1, "uniform"),  # one group, some drops
        (12, 2, 4, 2, 3, "uniform"),  # three groups: capacity per group
        (10, 3, 5, 2, 2, "duplicates"),  # duplicate experts in a row: later ranks of the same token drop first
        (8, 2, 4, 3, 1, "one-hot"),  # all tokens to one expert: only the first C first-choices survive
        (6, 2, 3, 0, 1, "uniform"),  # capacity 0: everything dropped
        (5, 1, 1, 5, 1, "uniform"),  # E = 1, exactly full
        (12, 2, 4, 6, 1, "invalid"),  # ids -1, E, E+5 (unchecked) claim no slot, and the last slot is used
        (12, 2, 4, 2, 2, "invalid"),  # the same with two groups and drops
    ],
)
def test_padded_slots_vs_loop(T, k, E, C, G, kind):
    idx = routing(T, k, E, kind)
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
    # executed vs useful FLOPs per strategy (GLU: 3 GEMMs), against counts from the routing
    T, d, f, E, k = 11, 16, 20, 4, 2
    x, idx, w, w1, w2, w3 = _inputs(T, d, f, E, k, "skip", True)
    useful = 2 * T * k * d * f * 3
    counts = torch.bincount(idx.flatten(), minlength=E)
    padded_rows = int(((counts + B - 1) // B * B).sum())
    padded_width = math.ceil(f / B) * B  # the blocks cover whole B x B tiles: f = 20 runs as 32 columns
    expected = {
        "blocksparse": padded_rows * 2 * d * padded_width * 3,
        "grouped": useful,
        "reference": E * T * 2 * d * f * 3,
    }
    for impl, executed in expected.items():
        _, s = moe_mlp(x, idx, w, w1, w2, w3, impl=impl, return_stats=True, **_impl_kwargs(impl, T, k))
        assert (s.impl, s.capacity, int(s.dropped), s.useful_flops) == (impl, None, 0, useful)
        assert int(s.executed_flops) == executed, impl


def test_stats_executed_flops_hand_computed():
    # small case by hand: T = 10, k = 2, E = 3, d = 8, f = 20, no GLU (2 GEMMs, 2·d·f = 320 FLOPs per row per GEMM)
    # tokens 0-2 choose (0, 2), tokens 3-9 choose (2, 2): experts get 3, 0 and 17 assignments (expert 1 empty)
    idx = torch.tensor([[0, 2]] * 3 + [[2, 2]] * 7)
    x, w = torch.randn(10, 8), torch.rand(10, 2)
    w1, w2 = torch.randn(3, 8, 20), torch.randn(3, 20, 8)
    assert moe_mlp(x, idx, w, w1, w2, impl="grouped", return_stats=True)[1].useful_flops == 20 * 320 * 2  # 12 800
    # blocksparse, B = 16: rows 3 -> 16, 0 -> 0, 17 -> 32 (48 rows); columns 20 -> 2 blocks = 32 (column padding)
    # 48 rows · 2 · 8 · 32 · 2 GEMMs = 49 152
    _, s = moe_mlp(x, idx, w, w1, w2, impl="blocksparse", block_size=16, return_stats=True)
    assert int(s.executed_flops) == 49_152
    # B = 32: 3 -> 32, 17 -> 32 (64 rows); 20 columns -> one block of 32: 64 · 2 · 8 · 32 · 2 = 65 536
    _, s = moe_mlp(x, idx, w, w1, w2, impl="blocksparse", block_size=32, return_stats=True)
    assert int(s.executed_flops) == 65_536
    # padded, one group: C = ceil(1.0 · 10 · 2 / 3) = 7 slots per expert, all computed: 3 · 7 · 320 · 2 = 13 440;
    # expert 2 keeps 7 of its 17 (10 dropped)
    _, s = moe_mlp(x, idx, w, w1, w2, impl="padded", return_stats=True)
    assert (s.capacity, int(s.dropped), s.executed_flops) == (7, 10, 13_440)
    # padded, two groups of 5 tokens: C = ceil(5 · 2 / 3) = 4 per group: 2 · 3 · 4 · 320 · 2 = 15 360; expert 2
    # gets 3 + 4 = 7 in group 0 (keeps 4) and 10 in group 1 (keeps 4): 9 dropped
    _, s = moe_mlp(x, idx, w, w1, w2, impl="padded", num_groups=2, return_stats=True)
    assert (s.capacity, int(s.dropped), s.executed_flops) == (4, 9, 15_360)


# ---------------------------------------------------------------------------------------------------------------
# unchecked invalid ids, unchosen experts, combine weights, meta tensors


def _invalid_case(impl, T=12, k=2, E=4):
    """Routing with ids -1, E and E+5 (helpers' "invalid" kind), the reference routing (those replaced by expert 0)
    and the weight mask that zeroes them."""
    x, idx, w, w1, w2, w3 = _inputs(T, 13, 19, E, k, "invalid", True)
    valid = (idx >= 0) & (idx < E)
    kwargs = _impl_kwargs(impl, T, k)
    if impl == "padded":  # tight capacity: a stray id that claimed a slot would displace a valid assignment
        kwargs = dict(capacity=4)
    return x, idx, w, w1, w2, w3, valid, torch.where(valid, idx, 0), kwargs


@pytest.mark.parametrize("impl", IMPLS)
def test_unchecked_invalid_ids_contribute_zero_eager(impl):
    # check=False (eager, CPU): ids -1, E, E+5 contribute zero and take nobody's slot; outputs and all gradients
    # equal the loop without those assignments (padded: capacity 4, drops computed on the valid ids only)
    x, idx, w, w1, w2, w3, valid, ref_idx, kwargs = _invalid_case(impl)
    mask = valid if impl != "padded" else _slots_loop(idx, 4, 4, 1) < 16  # E = C = 4
    _check_against_reference(
        impl, x, idx, w, w1, w2, w3, "silu", weight_mask=mask, ref_index=ref_idx, check=False, **kwargs
    )
    with pytest.raises(ValueError, match="expert ids"):  # checked by default on CPU
        moe_mlp(x, idx, w, w1, w2, w3, impl=impl, **kwargs)


@pytest.mark.parametrize("impl", IMPLS)
def test_unchecked_invalid_ids_contribute_zero_compiled(impl):
    # torch.compile(fullgraph=True) never checks ids: the same ids contribute zero and nothing is read or written
    # out of bounds (inductor's CPU code bounds-checks its indexing, so a stray index raises here)
    x, idx, w, w1, w2, w3, valid, ref_idx, kwargs = _invalid_case(impl)
    mask = valid if impl != "padded" else _slots_loop(idx, 4, 4, 1) < 16
    compiled = torch.compile(
        lambda x, idx, w: moe_mlp(x, idx, w, w1, w2, w3, activation="silu", impl=impl, **kwargs), fullgraph=True
    )
    out = compiled(x, idx, w)
    assert_close(out, per_token_moe_mlp(x, ref_idx, w * mask, w1, w2, w3, "silu"))


@pytest.mark.parametrize("impl", IMPLS)
def test_output_independent_of_unchosen_experts(impl):
    # expert 3 (chosen by no token) holds inf and NaN: no output or input gradient may notice (0 · inf = NaN
    # must never happen); equal to the loop over the other experts
    x, idx, w, w1, w2, w3 = _inputs(10, 13, 19, 4, 2, "uniform", True)
    idx = idx % 3  # experts 0-2 only (duplicates allowed)
    w1, w2 = w1.clone(), w2.clone()
    w1[3] = float("inf")
    w2[3] = float("nan")
    leaf = x.clone().requires_grad_()
    out = moe_mlp(leaf, idx, w, w1, w2, w3, impl=impl, **_impl_kwargs(impl, 10, 2))
    ref_x = x.double().requires_grad_()
    ref = per_token_moe_mlp(ref_x, idx, w, w1[:3], w2[:3], w3[:3])
    assert_close(out, ref)
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    assert_close(leaf.grad, ref_x.grad, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_combine_weights_in_fp32(impl):
    # one weight policy everywhere: bf16 tokens, fp32 weights used as fp32. Each token picks one expert twice with
    # weights 1 + 2^-10 and -1, so out = 2^-10 · y exactly in fp32; with the weights rounded to bf16 first
    # (1 + 2^-10 -> 1) the output would be exactly 0
    x, _, _, w1, w2, w3 = _inputs(8, 16, 16, 4, 2, "uniform", True, torch.bfloat16)
    one = torch.randint(0, 4, (8, 1))
    w = torch.tensor([[1 + 2**-10, -1.0]]).expand(8, 2)
    kwargs = _impl_kwargs(impl, 8, 2)
    y = moe_mlp(x, one, torch.ones(8, 1), w1, w2, w3, impl=impl, **_impl_kwargs(impl, 8, 1))
    out = moe_mlp(x, one.expand(8, 2), w, w1, w2, w3, impl=impl, **kwargs)
    assert out.dtype == torch.bfloat16 and out.abs().sum() > 0
    torch.testing.assert_close(out.float(), y.float() * 2**-10, atol=1e-6, rtol=2e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_combine_weights_in_fp32_under_autocast(impl):
    # defect 3: under CPU autocast (bf16) the combine still runs in fp32 on every strategy. Each token picks one
    # expert twice with weights 1 + 2^-9 and -1: out = 2^-9 · y; the padded strategy's combine was a bmm that
    # autocast ran in bf16 (1 + 2^-9 -> 1), which returned exactly 0
    x, _, _, w1, w2, w3 = _inputs(8, 16, 16, 4, 2, "uniform", True)
    one = torch.randint(0, 4, (8, 1))
    w = torch.tensor([[1 + 2**-9, -1.0]]).expand(8, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe_mlp(x, one, torch.ones(8, 1), w1, w2, w3, impl=impl, **_impl_kwargs(impl, 8, 1))
        out = moe_mlp(x, one.expand(8, 2), w, w1, w2, w3, impl=impl, **_impl_kwargs(impl, 8, 2))
    assert out.dtype == torch.bfloat16 and out.abs().sum() > 0
    torch.testing.assert_close(out.float(), y.float() * 2**-9, atol=1e-6, rtol=2e-2)


def test_grouped_callable_activation_compile_dynamic():
    # defect 4: torch.compile(dynamic=True) of the grouped strategy with a callable activation (symbolic T and k)
    # matches eager, forward and gradients, for two shapes through one compiled function
    _, _, _, w1, w2, w3 = _inputs(1, 12, 20, 4, 2)

    def mlp(x, idx, w):
        return moe_mlp(x, idx, w, w1, w2, w3, activation=torch.nn.functional.silu, impl="grouped")

    compiled = torch.compile(mlp, dynamic=True, fullgraph=True)
    for T, k in ((9, 2), (7, 3)):
        x, idx, w, *_ = _inputs(T, 12, 20, 4, k)
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        out = compiled(xc, idx, w)
        ref = mlp(xe, idx, w)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        out.sum().backward()
        ref.sum().backward()
        torch.testing.assert_close(xc.grad, xe.grad, atol=1e-5, rtol=1e-5)


def test_padded_symbolic_capacity_factor_compiles():
    # defect 4: a symbolic capacity factor (here derived from T under dynamic=True) passes the option checks
    # (math.isfinite on it broke the graph) and matches eager
    _, _, _, w1, w2, _ = _inputs(1, 12, 16, 4, 2, glu=False)

    def mlp(x, idx, w):
        return moe_mlp(x, idx, w, w1, w2, impl="padded", capacity_factor=x.shape[0] / 16)

    compiled = torch.compile(mlp, dynamic=True, fullgraph=True)
    for T in (12, 20):
        x, idx, w, *_ = _inputs(T, 12, 16, 4, 2, glu=False)
        torch.testing.assert_close(compiled(x, idx, w), mlp(x, idx, w), atol=1e-5, rtol=1e-5)


def test_options_object_equals_keywords():
    # moe_mlp(options=MoEOptions(...)) is the same call as the keywords that build it
    x, idx, w, w1, w2, w3 = _inputs(11, 12, 20, 4, 2)
    for kwargs in (dict(impl="padded", capacity=3, num_groups=1), dict(impl="blocksparse", block_size=B)):
        a, sa = moe_mlp(x, idx, w, w1, w2, w3, return_stats=True, **kwargs)
        b, sb = moe_mlp(x, idx, w, w1, w2, w3, return_stats=True, options=MoEOptions(**kwargs))
        assert torch.equal(a, b) and sa.impl == sb.impl and sa.capacity == sb.capacity


@pytest.mark.parametrize("impl", IMPLS)
def test_meta_tensors_shape_inference(impl):
    # meta tensors hold no data: the id check is skipped and the output shape and dtype come out
    x, idx, w, w1, w2, w3 = (t.to("meta") for t in _inputs(13, 16, 20, 4, 2, "uniform", True))
    out, stats = moe_mlp(x, idx, w, w1, w2, w3, impl=impl, return_stats=True, **_impl_kwargs(impl, 13, 2))
    assert out.device.type == "meta" and out.shape == (13, 16) and out.dtype == torch.float32
    assert stats.impl == impl


# ---------------------------------------------------------------------------------------------------------------
# custom_moe_mlp (row-wise gates and biases: the path of the Hugging Face integration)


def _interleaved_swiglu(h):
    """A gate that needs whole rows: interleaved gate/up columns, clamped (gpt-oss-like)."""
    gate, up = h[:, ::2].clamp(max=2.0), h[:, 1::2].clamp(-2.0, 2.0)
    return gate * torch.sigmoid(1.7 * gate) * (up + 1)


def _custom_loop(x, idx, w, up, down, up_bias, down_bias, gate):
    rows = []
    for t in range(x.shape[0]):
        acc = x.new_zeros(down.shape[2])
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if not 0 <= e < up.shape[0]:
                continue
            h = gate((x[t] @ up[e] + up_bias[e]).unsqueeze(0))[0]
            acc = acc + w[t, j] * (h @ down[e] + down_bias[e])
        rows.append(acc)
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["uniform", "skip", "invalid"])
def test_custom_moe_mlp_matches_loop(kind):
    # a row-wise gate over interleaved columns, biases, empty experts ("skip"), unchecked invalid ids ("invalid")
    T, d, f, E, k = 12, 13, 9, 5, 2
    x = torch.randn(T, d)
    idx = routing(T, k, E, kind)
    w = torch.rand(T, k)
    params = [
        torch.randn(E, d, 2 * f) / d**0.5,
        torch.randn(E, f, d) / f**0.5,
        torch.randn(E, 2 * f),
        torch.randn(E, d),
    ]
    leaves = [t.clone().requires_grad_() for t in (x, w, *params)]
    refs = [t.double().requires_grad_() for t in (x, w, *params)]
    lx, lw, up, down, up_bias, down_bias = leaves
    out = custom_moe_mlp(
        lx, idx, lw, up, down, activation=_interleaved_swiglu, up_bias=up_bias, down_bias=down_bias, check=False
    )
    ref = _custom_loop(refs[0], idx, refs[1], *refs[2:], _interleaved_swiglu)
    assert_close(out, ref)
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    for name, leaf, r in zip(["x", "w", "up", "down", "up_bias", "down_bias"], leaves, refs):
        torch.testing.assert_close(leaf.grad.double(), r.grad, **TOL[torch.float32], msg=lambda m, n=name: f"{n}: {m}")


def test_custom_moe_mlp_bad_input():
    x, idx, w = torch.randn(4, 6), torch.randint(0, 3, (4, 2)), torch.rand(4, 2)
    up, down = torch.randn(3, 6, 8), torch.randn(3, 4, 6)
    with pytest.raises(TypeError, match="activation must be a callable"):
        custom_moe_mlp(x, idx, w, up, down, activation="silu")
    with pytest.raises(ValueError, match="up must have shape"):
        custom_moe_mlp(x, idx, w, up[:, :5], down, activation=torch.relu)
    with pytest.raises(ValueError, match="down must have shape"):
        custom_moe_mlp(x, idx, w, up, down[..., :5], activation=torch.relu)
    with pytest.raises(ValueError, match="up_bias must have shape"):
        custom_moe_mlp(x, idx, w, up, down, activation=torch.relu, up_bias=torch.randn(3, 7))
    with pytest.raises(TypeError, match="down must have x's dtype"):
        custom_moe_mlp(x, idx, w, up, down.double(), activation=torch.relu)
    with pytest.raises(ValueError, match="expert ids"):
        custom_moe_mlp(x, idx + 1, w, up, down, activation=torch.relu)
    # the activation's output width must be down's rows (defect: the error named internal operands)
    with pytest.raises(ValueError, match=r"activation must map rows \[R, 8\] to \[R, 4\] \(down's rows h\)"):
        custom_moe_mlp(x, idx, w, up, down, activation=torch.relu)
    with pytest.raises(ValueError, match=r"post must map rows \[R, 6\] to \[R, 6\]"):
        custom_moe_mlp(x, idx, w, up, down, activation=lambda h: h[:, :4], post=lambda y: y[:, :2])
    with pytest.raises(TypeError, match="check must be a bool"):
        custom_moe_mlp(x, idx, w, up, down, activation=lambda h: h[:, :4], check="no")


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
    # a named activation runs the fused bsm::expert_mlp: autograd keeps h (and g) only, no post-activation copy,
    # with or without recompute_activation (same results); a callable keeps the unfused path (more block tensors)
    x, idx, w, w1, w2, w3 = _inputs(13, 13, 19, 4, 2, "uniform", glu)
    topo = plan_routing(idx, 4, block_size=B).topology(19)
    leaves = [t.requires_grad_() for t in (x, w1, w2) + ((w3,) if glu else ())]
    runs = {"fused": ("silu", False), "fused-rc": ("silu", True), "callable": (torch.nn.functional.silu, False)}
    outs, saved = {}, {}
    for name, (act, recompute) in runs.items():

        def run(act=act, recompute=recompute):
            kw = dict(activation=act, recompute_activation=recompute, impl="blocksparse", block_size=B)
            return moe_mlp(x, idx, w, w1, w2, w3, **kw)

        with _CountOps() as ops:
            outs[name], saved[name] = _saved_block_tensors(run, (topo.nnz_max, B, B))
        assert ("bsm.expert_mlp.default" in ops.calls) == (name != "callable")
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
        (dict(x=x.long()), {}, TypeError, "x must have a dtype among"),
        (
            dict(top_k_index=idx.float()),
            {},
            TypeError,
            r"top_k_index must have a dtype among \(torch.int32, torch.int64\)",
        ),
        (dict(top_k_index=idx[:5]), {}, ValueError, "top_k_index must be"),
        (dict(top_k_index=idx.clone().fill_(4)), {}, ValueError, r"expert ids in \[0, 4\)"),
        (dict(top_k_index=idx.clone().fill_(-1)), dict(impl="padded"), ValueError, "expert ids"),
        (dict(top_k_weights=w[:, :1]), {}, ValueError, "top_k_weights must have"),
        (dict(top_k_weights=w.long()), {}, TypeError, "top_k_weights must have a dtype among"),
        (dict(w1=w1[:, :7]), {}, ValueError, "w1 must be"),
        (dict(w2=w2[:3]), {}, ValueError, "w2 must have shape"),
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
        ({}, dict(impl="padded", capacity_factor=float("inf")), ValueError, "finite non-negative"),
        ({}, dict(impl="padded", capacity_factor=float("nan")), ValueError, "finite non-negative"),
        ({}, dict(impl="blocksparse", block_size=0), ValueError, "block_size must be"),
        ({}, dict(impl="blocksparse", block_size=256), ValueError, r"block_size must be one of \(16, 32, 64, 128\)"),
        ({}, dict(block_size=48), ValueError, "block_size must be one of"),
        ({}, dict(impl="padded", block_size=16), ValueError, "block_size applies"),
        ({}, dict(recompute_activation=1), TypeError, "recompute_activation"),
        ({}, dict(check="no"), TypeError, "check must be a bool"),  # a truthy string was accepted
        ({}, dict(return_stats="yes"), TypeError, "return_stats must be a bool"),  # a truthy string was accepted
        ({}, dict(options={"impl": "grouped"}), TypeError, "options must be a MoEOptions"),
        ({}, dict(options=MoEOptions(), impl="grouped"), ValueError, r"not both; got options and \['impl'\]"),
    ], base


@pytest.mark.parametrize("case", range(len(_bad_cases()[0])))
def test_bad_input(case):
    cases, base = _bad_cases()
    tensors, options, exc, match = cases[case]
    args = {**base, **tensors}
    with pytest.raises(exc, match=match):
        moe_mlp(*args.values(), **options)
