"""FP8 recipes (``blocksparse_moe.fp8``): the reference arithmetic on hand-checked cases, the Triton quantize kernel
bit for bit against it, the emulated expert MLP against a float64 reference of the quantized math (the same
scales and roundings) and by SQNR against the unquantized float64 MLP, the edges, and the option on every entry
point."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import routing

import blocksparse_moe as bsm
from blocksparse_moe import fp8
from blocksparse_moe.backends import triton as triton_backend
from blocksparse_moe.kernels import quantize as kq

RECIPES = fp8.RECIPES


def sqnr(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB of ``actual`` against ``reference``."""
    ref = reference.double()
    noise = (actual.double() - ref).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return {torch.float8_e4m3fn: torch.uint8, torch.float32: torch.int32}.get(t.dtype, t.dtype)


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bit for bit, except that any NaN equals any NaN (the sign of a NaN is not specified)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if actual.dtype == torch.uint8:  # E8M0 scales: 255 is NaN
        assert torch.equal(actual, expected), what
        return
    na, ne = actual.float().isnan(), expected.float().isnan()
    assert torch.equal(na, ne), f"{what}: NaN at different places"
    assert torch.equal(actual.view(_bits(actual))[~na], expected.view(_bits(expected))[~ne]), what


# ----------------------------------------------------------------------------------------------- reference math


def test_reference_arithmetic_by_hand():
    """The documented arithmetic on values worked out by hand."""
    t = torch.zeros(4, 130)
    t[0, 3], t[0, 4] = 448.0 * 2, 1.0  # an outlier: scale 2, q = 448 and 0.5
    # row 1: all zero (scale 0, no NaN); row 2: a partial last group (2 elements, K = 130 = 128 + 2)
    t[2, 128], t[2, 129] = 4.48, -0.448
    t[3, :] = 1e-40  # denormals (fp32): a denormal scale, not flushed
    q, s = fp8.quantize(t, (1, 128))
    assert s.shape == (4, 2) and s.dtype == torch.float32
    assert s[0, 0] == 2.0 and q[0, 3].float() == 448.0 and q[0, 4].float() == 0.5
    assert s[1, 0] == 0 and not q[1].float().isnan().any() and (q[1].float() == 0).all()
    assert s[2, 1] == torch.tensor(4.48) / 448 and q[2, 128].float() == 448.0 and q[2, 129].float() == -44.0
    deq = fp8.dequantize(q, s, (1, 128))
    assert (deq[3] > 0).all() and (deq[1] == 0).all()
    # E8M0: the smallest power of two >= amax / 448 (nothing saturates); 0 for an all-zero group
    amax = torch.tensor([448.0, 449.0, 224.0, 0.0, 1e-30, float("inf"), float("nan")])
    b = fp8.scale_of(amax, torch.uint8)
    assert b.tolist() == [127, 128, 126, 0, 127 + math.ceil(math.log2(1e-30 / 448)), 255, 255]
    v = fp8.scale_value(b)
    assert v[:4].tolist() == [1.0, 2.0, 0.5, 2.0**-127] and v[5:].isnan().all()
    # round to nearest even in the cast: 1.0625 is the midpoint of 1 and 1.125
    q, s = fp8.quantize(torch.tensor([[448.0, 1.0625, 1.1875]]), (1, None))
    assert q.float().tolist() == [[448.0, 1.0, 1.25]] and s.item() == 1.0


def test_reference_nan_inf_propagation():
    """A NaN or an inf in a group makes that group's dequantized values NaN (documented), others untouched; no
    error, no host sync."""
    t = torch.randn(3, 64)
    t[0, 5], t[2, 40] = float("nan"), float("inf")
    for recipe in RECIPES:
        r = fp8.recipe(recipe)
        deq = fp8.fake_quantize(t, r.act_block(), r.scale_dtype)
        bad = deq.isnan()
        g = min(r.group or 64, 64)  # a group is at most the row
        assert bad[0, :g].all() and bad[0].sum() == g and not bad[1].any()
        assert bad[2, (40 // g) * g : (40 // g + 1) * g].all() and bad[2].sum() == g


def test_recipe_table():
    """One table: group along the reduced dimension, weight blocks, scale dtype."""
    assert fp8.recipe("blockwise").weight_block(0) == (128, 128) == fp8.recipe("blockwise").weight_block(1)
    assert fp8.recipe("mxfp8").weight_block(0) == (32, 1) and fp8.recipe("mxfp8").weight_block(1) == (1, 32)
    assert fp8.recipe("mxfp8").scale_dtype == torch.uint8
    assert fp8.recipe("rowwise").act_block() == (1, None) and fp8.recipe("rowwise").weight_block(0) == (None, 1)
    with pytest.raises(ValueError, match="fp8"):
        fp8.recipe("e5m2")
    with pytest.raises(TypeError, match="fp8"):
        fp8.check_recipe("fp8", 8)


def test_weight_cache_once_per_version():
    """A weight is quantized once per version for each layout; an in-place update quantizes it again; views share
    their base's entry; a graph-recording call is not cached."""
    calls = []

    def counting(t, block, scale_dtype):
        calls.append(block)
        return fp8.quantize(t, block, scale_dtype)

    r = fp8.recipe("mxfp8")
    w = torch.randn(2, 64, 32)
    a = fp8.quantized_weight(w, r, 0, counting)
    assert fp8.quantized_weight(w, r, 0, counting)[0] is a[0] and len(calls) == 1
    assert a[0].dtype == torch.float8_e4m3fn  # the cache holds E4M3 and scales, not a dequantized copy
    assert torch.equal(fp8.weight(w, r, 0, counting), fp8.dequantize(*a, r.weight_block(0))) and len(calls) == 1
    fp8.weight(w, r, 1, counting)  # the other layout: once more
    assert len(calls) == 2
    fp8.weight(w, fp8.recipe("blockwise"), 0, counting)
    fp8.weight(w, fp8.recipe("blockwise"), 1, counting)  # 128x128 blocks serve both layouts
    assert len(calls) == 3
    fp8.weight(w.transpose(1, 2).transpose(1, 2), r, 0, counting)  # a view of the same storage and layout
    assert len(calls) == 3
    w.add_(1.0)  # an optimizer step
    b = fp8.weight(w, r, 0, counting)
    assert len(calls) == 4 and not torch.equal(fp8.dequantize(*a, r.weight_block(0)), b)
    p = torch.nn.Parameter(torch.randn(2, 64, 32))
    fp8.weight(p, r, 0, counting)
    fp8.weight(p, r, 0, counting)
    assert len(calls) == 6  # requires grad with grad mode on: not cached
    fp8.weight_cache_clear()


def test_weight_cache_k_major():
    """``k_major``: the cached E4M3 weight has its reduced dimension contiguous (the layout sm_90's E4M3 wgmma reads),
    with the same values and scales as the row-major one; each layout is its own cache entry."""
    r = fp8.recipe("blockwise")
    w = torch.randn(2, 40, 24)
    for reduced in (0, 1):
        q, s = fp8.quantized_weight(w, r, reduced)
        qk, sk = fp8.quantized_weight(w, r, reduced, k_major=True)
        assert qk.stride(1 + reduced) == 1 and qk is not q
        assert torch.equal(qk.view(torch.uint8), q.view(torch.uint8)) and torch.equal(sk, s)
        assert fp8.quantized_weight(w, r, reduced, k_major=True)[0] is qk
    fp8.weight_cache_clear()


# ----------------------------------------------------------------------------------------------- Triton kernel


def _edgy(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Fresh random values with the edges in place: an outlier, an all-zero row and tile, denormals, NaN, inf."""
    t = torch.randn(shape) * 3
    m = t.view(-1, shape[-1])
    m[0, 1] = 3e4  # one huge outlier
    m[2, :] = 0  # an all-zero row (an all-zero group in every recipe's row layout)
    m[3 : min(m.shape[0], 40), : min(shape[-1], 40)] = 0  # an all-zero tile
    m[4, :] = torch.rand(shape[-1]) * 1e-39  # fp32 denormals
    m[5, 2] = float("nan")
    m[6, 7] = float("-inf")
    return t.to(dtype)


@pytest.fixture
def poisoned(monkeypatch):
    """The quantize launchers' outputs start as NaN (E4M3 0x7F) and 255 (E8M0 NaN) / NaN scales."""

    def new(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        if dtype == torch.float8_e4m3fn:
            t.view(torch.uint8).fill_(0x7F)
            return t
        return t.fill_(255 if dtype == torch.uint8 else math.nan)

    monkeypatch.setattr(kq, "new", new)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("role", ["act", "weight_k", "weight_n"])
def test_quantize_kernel_exact(poisoned, device, recipe, role, dtype):
    """Kernel == reference bit for bit: activations ``[37, 300]`` (odd sizes, partial groups), weights ``[3, 200,
    130]`` reduced along K or N (blockwise 128x128 blocks with partial ones), with the edge values of ``_edgy``."""
    r = fp8.recipe(recipe)
    shape, block = ((37, 300), r.act_block()) if role == "act" else ((3, 200, 130), r.weight_block(role == "weight_n"))
    t = _edgy(shape, dtype).to(device)
    q, s = kq.quantize(t, block, r.scale_dtype)
    q_ref, s_ref = fp8.quantize(t, block, r.scale_dtype)
    assert_same(s, s_ref, f"scales {recipe} {role}")
    assert_same(q, q_ref, f"values {recipe} {role}")


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_quantize_rows_kernel_exact(poisoned, device, recipe, transposed):
    """The weight-gradient layout (groups of one expert's rows, per column) == reference bit for bit, stored
    row-major or (``transposed``) column-major; experts with no rows (0, 4), one row (2), 129 rows (a partial second
    128-group), rows past offsets[E]."""
    r = fp8.recipe(recipe)
    offsets = torch.tensor([0, 0, 50, 51, 180, 180], dtype=torch.int32, device=device)
    t = _edgy((190, 40), torch.float32).to(device)
    rows = kq.row_groups(offsets, 190, r.group)
    q, s = kq.quantize_rows(t, rows, r.scale_dtype, transposed=transposed)
    assert q.stride() == ((1, 190) if transposed else (40, 1))
    q_ref, s_ref, ids_ref = fp8.quantize_rows(t, offsets, r.group, r.scale_dtype)
    assert torch.equal(rows.ids, ids_ref)
    assert_same(s, s_ref, f"scales {recipe}")
    assert_same(q, q_ref, f"values {recipe}")


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("align", [1, 16])
def test_quantize_rows_dequantize_kernel_exact(poisoned, device, recipe, align):
    """The weight-gradient layout of an E4M3 input with its scales along the columns (the saved FP8 x:
    ``quantize_rows(..., dequantize=)``) == ``fp8.quantize_rows`` of ``fp8.dequantize`` bit for bit: every E4M3 bit
    pattern (-0, subnormals, NaN) among ``_edgy``'s values quantized along the columns (partial column groups),
    experts with no rows, one row, 129 rows, rows past offsets[E]; ``align`` 16: the padded layout of
    the grouped strategy, column-major."""
    r = fp8.recipe(recipe)
    offsets = torch.tensor([0, 0, 50, 51, 180, 180], dtype=torch.int32, device=device)
    C = 300 if recipe == "blockwise" else 72  # partial column groups: 2·128 + 44, 2·32 + 8
    q, s = fp8.quantize(_edgy((190, C), torch.float32).to(device), r.act_block(), r.scale_dtype)
    q.view(torch.uint8)[8:136, :2] = torch.arange(256, dtype=torch.uint8).view(128, 2)  # every E4M3 bit pattern
    rows = kq.row_groups(offsets, 190, r.group, align=align)
    got_q, got_s = kq.quantize_rows(q, rows, r.scale_dtype, transposed=align > 1, dequantize=(s, r.group))
    x = fp8.dequantize(q, s, r.act_block())
    padded = fp8.padded_offsets(offsets, align) if align > 1 else offsets
    want_q, want_s, _ = fp8.quantize_rows(fp8.pad_rows(x, offsets, align) if align > 1 else x, padded, r.group,
                                          r.scale_dtype)  # fmt: skip
    if align > 1:  # padding rows: zero whatever their group's scale
        real = fp8.pad_rows(torch.ones(190, 1, device=device), offsets, align)[:, 0] == 1
        want_q = torch.where(real[:, None], want_q.view(torch.uint8), 0).view(torch.float8_e4m3fn)
    assert_same(got_s, want_s, f"{recipe} scales")
    assert_same(got_q, want_q, f"{recipe} values")


@pytest.mark.parametrize(
    "recipe, align, source",
    [
        ("blockwise", 16, "e4m3"),  # the saved FP8 x, fp32 scales, the grouped strategy's padded layout
        ("mxfp8", 1, "e4m3"),  # E8M0 scales, rows as they are (block-sparse)
        ("rowwise", 16, "e4m3"),  # one scale per row
        ("blockwise", 1, "bf16"),  # x itself (fp8_cache_x=False), bf16 bits
        ("mxfp8", 16, "fp32"),  # x itself, fp32
    ],
)
def test_quantize_rows_row_src_kernel_exact(poisoned, device, recipe, align, source):
    """``quantize_rows(..., row_src=)`` reads token rows through ``row_src`` in its pass: bit for bit the two-step
    path (the rows gathered first, ``permute.gather`` as the FP8 backward did, then ``quantize_rows``), for an E4M3
    input with its scales (``dequantize=``) and for bf16 / fp32 ones. Rows: a token used twice, tokens not used,
    -1 rows (padding: zero), experts with no rows, one row, 129 rows (a partial second 128-group), rows past
    offsets[E]."""
    from blocksparse_moe.kernels import permute as kp

    r = fp8.recipe(recipe)
    T, R, C = 97, 190, 72
    offsets = torch.tensor([0, 0, 50, 51, 180, 180], dtype=torch.int32, device=device)
    g = torch.Generator().manual_seed(3)
    row_src = torch.randint(0, T, (R,), generator=g, dtype=torch.int32)
    row_src[[3, 60, 185]] = -1  # padding rows, one past offsets[E]
    row_src[10] = row_src[11]  # a token in two rows
    row_src = row_src.to(device)
    x = _edgy((T, C), torch.float32).to(device)
    t, dequantize = (x.bfloat16() if source == "bf16" else x), None
    if source == "e4m3":
        t, s = fp8.quantize(x, r.act_block(), r.scale_dtype)
        t.view(torch.uint8)[8:72, :4] = torch.arange(256, dtype=torch.uint8).view(64, 4)  # every E4M3 bit pattern
        dequantize = (s, r.group)
    rows = kq.row_groups(offsets, R, r.group, align=align)

    def gathered(u):  # [R, *] rows of u in expert order, zero rows where row_src is -1 (the two-step path's gather)
        bits = u.view(torch.uint8) if u.dtype == torch.float8_e4m3fn else u
        out = torch.empty((R, u.shape[1]), dtype=bits.dtype, device=device)
        kp.gather(bits, row_src, 1, None, out)  # k = 1: a row's assignment is its token
        return out.view(u.dtype)

    got = kq.quantize_rows(t, rows, r.scale_dtype, transposed=align > 1, dequantize=dequantize, row_src=row_src)
    two_step = None if dequantize is None else (gathered(dequantize[0]), dequantize[1])
    want = kq.quantize_rows(gathered(t), rows, r.scale_dtype, transposed=align > 1, dequantize=two_step)
    assert_same(got[1], want[1], f"{recipe} scales")
    assert_same(got[0], want[0], f"{recipe} values")
    with pytest.raises(TypeError, match="quantize_rows: row_src must have a dtype among"):
        kq.quantize_rows(t, rows, r.scale_dtype, dequantize=dequantize, row_src=row_src.long())
    with pytest.raises(ValueError, match=r"quantize_rows: row_src must have shape \[R\]"):
        kq.quantize_rows(t, rows, r.scale_dtype, dequantize=dequantize, row_src=row_src[1:])


def test_quantize_rows_dequantize_bad_arguments():
    """``dequantize=`` names what it expected: an E4M3 t (TypeError), scales of the recipe's shape (ValueError)."""
    offsets = torch.tensor([0, 5], dtype=torch.int32)
    rows = kq.row_groups(offsets, 5, 32)
    q, s = fp8.quantize(torch.randn(5, 40), (1, 32))
    with pytest.raises(TypeError, match=r"quantize_rows: t \(with dequantize\) must have a dtype among"):
        kq.quantize_rows(q.float(), rows, dequantize=(s, 32))
    with pytest.raises(ValueError, match=r"dequantize's scale must have shape \(5, 2\).*got \(5, 1\)"):
        kq.quantize_rows(q, rows, dequantize=(s[:, :1], 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recipe", RECIPES)
def test_quantize_dual_kernel_exact(poisoned, device, recipe, dtype):
    """The one-pass quantization of a weight-gradient operand in both layouts == the two references bit for bit
    (rowwise: the two launchers); experts with no rows, one row, 129 rows, rows past offsets[E], 300 columns (a
    partial column group), the edge values of ``_edgy``; the bf16 cases write the weight-gradient layout column-major
    (``transposed``, a K-major MMA operand), the fp32 ones row-major."""
    r = fp8.recipe(recipe)
    offsets = torch.tensor([0, 0, 50, 51, 180, 180], dtype=torch.int32, device=device)
    C = 300 if r.group else 72  # rowwise (whole rows, the two launchers): fewer columns, the same code paths
    t = _edgy((190, C), dtype).to(device)
    transposed = dtype == torch.bfloat16
    rows = kq.row_groups(offsets, 190, r.group)
    (q_rows, s_rows), (q_cols, s_cols) = kq.quantize_dual(t, rows, r.scale_dtype, transposed)
    assert q_cols.stride() == ((1, 190) if transposed else (C, 1))
    q1, s1 = fp8.quantize(t, (1, r.group), r.scale_dtype)
    q2, s2, ids2 = fp8.quantize_rows(t, offsets, r.group, r.scale_dtype)
    assert torch.equal(rows.ids, ids2)
    for got, want, what in ((s_rows, s1, "row scales"), (q_rows, q1, "row values"), (s_cols, s2, "column scales"),
                            (q_cols, q2, "column values")):  # fmt: skip
        assert_same(got, want, f"{recipe} {what}")


@pytest.mark.parametrize("dual", [False, True])
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize(
    "counts",
    [
        [0, 1, 16, 7, 0, 150],  # no rows (first, inner), one row, a multiple of 16, a partial 16 and 128 (150)
        [37],  # E = 1, not a multiple of 16
        [32, 16],  # multiples of 16 only: the padded layout is the input's (and the spare rows past it)
    ],
)
def test_quantize_rows_padded_kernel_exact(poisoned, device, recipe, counts, dual):
    """The grouped strategy's weight-gradient layout (``align=16``): the kernels write each expert's rows from
    ``fp8.padded_offsets`` on, column-major, in one pass; bit for bit the reference quantization of the padded rows
    (``fp8.pad_rows``), its padding rows zero (whatever their group's scale: NaN and inf groups too) and every row
    up to the buffer's bound written (the outputs are poisoned); 3 rows past offsets[E] (no expert) follow the padded
    experts as their own group, as unpadded. The
    groups, their scales and ``group_offsets`` are those of the unpadded rows; ``dual``: ``quantize_dual``'s column
    layout (its row layout stays unpadded)."""
    r = fp8.recipe(recipe)
    offsets = torch.tensor([0, *counts], device=device).cumsum(0).to(torch.int32)
    R, C = int(offsets[-1]) + 3, 48 if r.group else 40
    t = _edgy((R, C), torch.bfloat16 if dual else torch.float32).to(device)
    rows = kq.row_groups(offsets, R, r.group, align=16)
    if dual:
        (q_rows, s_rows), (q, s) = kq.quantize_dual(t, rows, r.scale_dtype, transposed=True)
        q1, s1 = fp8.quantize(t, (1, r.group), r.scale_dtype)
        assert_same(s_rows, s1, f"{recipe} row scales")
        assert_same(q_rows, q1, f"{recipe} row values")
    else:
        q, s = kq.quantize_rows(t, rows, r.scale_dtype, transposed=True)
    padded = fp8.padded_offsets(offsets, 16)
    assert rows.rows == fp8.padded_rows(R, len(counts), 16) and rows.rows % 16 == 0
    assert torch.equal(rows.offsets, padded) and q.shape == (rows.rows, C) and q.stride() == (1, rows.rows)
    assert torch.equal(rows.group_offsets, fp8.group_offsets(offsets, r.group).int())
    q_ref, s_ref, ids_ref = fp8.quantize_rows(fp8.pad_rows(t, offsets, 16), padded, r.group, r.scale_dtype)
    real = fp8.pad_rows(torch.ones(R, 1, device=device), offsets, 16)[:, 0] == 1
    q_ref = torch.where(real[:, None], q_ref.view(torch.uint8), 0).view(torch.float8_e4m3fn)  # zero padding rows
    assert torch.equal(rows.ids, ids_ref)
    assert_same(s, s_ref, f"{recipe} scales")
    assert_same(q, q_ref, f"{recipe} values")
    _, s_unpadded, _ = fp8.quantize_rows(t, offsets, r.group, r.scale_dtype)
    used = int(fp8.group_offsets(offsets, r.group)[-1])
    assert_same(s[:used], s_unpadded[:used], f"{recipe} the groups' scales, padded or not")


def test_row_groups_bad_arguments():
    """``row_groups`` and the launchers that take its ``RowGroups`` refuse what they cannot serve, naming it."""
    offsets = torch.tensor([0, 3, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="align must divide the group, got align 48 and group 32"):
        kq.row_groups(offsets, 10, 32, align=48)
    with pytest.raises(ValueError, match="row_groups: align"):
        kq.row_groups(offsets, 10, 32, align=0)
    rows = kq.row_groups(offsets, 10, 32, align=16)
    with pytest.raises(ValueError, match=r"R = rows.input_rows = 10 .* got \(12, 4\)"):
        kq.quantize_rows(torch.randn(12, 4), rows)
    with pytest.raises(ValueError, match="quantize_dual: t must have shape"):
        kq.quantize_dual(torch.randn(10), rows)
    with pytest.raises(TypeError, match="rows must be a RowGroups"):
        kq.quantize_rows(torch.randn(10, 4), offsets)


def test_pad_rows_reference():
    """``fp8.pad_rows`` / ``padded_offsets`` / ``padded_rows`` on a case worked out by hand: counts 0, 1, 17, 16."""
    offsets = torch.tensor([0, 0, 1, 18, 34], dtype=torch.int32)
    padded = fp8.padded_offsets(offsets, 16)
    assert padded.tolist() == [0, 0, 16, 48, 64] and padded.dtype == torch.int32
    assert fp8.padded_rows(35, 4, 16) == 96  # 35 + 4 x 15 = 95, rounded up
    t = torch.arange(1, 36, dtype=torch.float32)[:, None]  # row i holds i + 1; row 34 is past offsets[E]
    out = fp8.pad_rows(t, offsets, 16)[:, 0]
    assert out.shape == (96,) and out[0] == 1 and (out[1:16] == 0).all()
    assert torch.equal(out[16:33], t[1:18, 0]) and (out[33:48] == 0).all()
    assert torch.equal(out[48:64], t[18:34, 0]) and out[64] == 35 and (out[65:] == 0).all()


def test_e4m3_rounding_sweep(device):
    """The kernel's own E4M3 rounding (integer math) == torch's cast on a dense sweep of [-448, 448], the
    subnormals and every midpoint between E4M3 neighbours (ties to even)."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite()].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    sweep = torch.cat([torch.linspace(-448, 448, 20001), torch.logspace(-12, 2.65, 4000), mids, -mids, grid])
    q, _ = kq.quantize(sweep.view(1, -1).to(device), (1, None))  # amax 448: scale 1, the values themselves
    assert_same(q, sweep.view(1, -1).to(torch.float8_e4m3fn).to(device), "rounding")


# ----------------------------------------------------------------------------------------------- the expert MLP


def _problem(T, d, f, E, k, kind="uniform", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g)
    idx = routing(T, k, E, kind, g)
    weights = torch.rand(T, k, generator=g)
    w1 = torch.randn(E, d, f, generator=g) / d**0.5
    w3 = torch.randn(E, d, f, generator=g) / d**0.5
    w2 = torch.randn(E, f, d, generator=g) / f**0.5
    dout = torch.randn(T, d, generator=g)
    return x, idx, weights, w1, w2, w3, dout


def _run(x, idx, weights, w1, w2, w3, dout, **kw):
    """moe_mlp forward and backward: ``(out, dx, dweights, dw1, dw2, dw3)``."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weights, w1, w2, w3)]
    kw.setdefault("activation", "silu")
    out = bsm.moe_mlp(leaves[0], idx, leaves[1], *leaves[2:], **kw)
    out.backward(dout.to(out.dtype))
    return (out.detach(), *(t.grad for t in leaves))


def _reference(x, idx, weights, w1, w2, w3, dout, recipe, cached=True):
    """Float64 forward and backward of the quantized math, per expert, from ``fp8.fake_quantize`` alone: every GEMM
    operand quantized as ``backends.torch_fp8`` documents (wgrad operands: groups of rows from each expert's first
    row; x's from the up-projection's quantized x, the saved FP8 x, quantized again, or with ``cached`` False
    (``fp8_cache_x=False``) from x itself), intermediates h, g, a, dh, dg rounded to fp32 where the emulation stores
    them."""
    r = fp8.recipe(recipe)
    sd, act_block = r.scale_dtype, r.act_block()

    def q(t, block):
        return fp8.fake_quantize(t, block, sd).double()

    T, k = idx.shape
    E = w1.shape[0]
    xq, dq = q(x, act_block), q(dout, act_block)
    out, dx = torch.zeros(T, x.shape[1], dtype=torch.float64), torch.zeros(T, x.shape[1], dtype=torch.float64)
    dweights = torch.zeros(T, k, dtype=torch.float64)
    dws = [torch.zeros_like(w, dtype=torch.float64) for w in (w1, w2, w3)]
    for e in range(E):
        asg = (idx.reshape(-1) == e).nonzero().flatten()  # assignments t·k + j in order: the sorted rows of e
        if asg.numel() == 0:
            continue  # an expert with no tokens
        tok, wr = asg // k, weights.reshape(-1)[asg].double()[:, None]
        h = (xq[tok] @ q(w1[e], r.weight_block(0))).float()
        g = (xq[tok] @ q(w3[e], r.weight_block(0))).float()
        a32 = torch.nn.functional.silu(h) * g
        y = (q(a32, act_block) @ q(w2[e], r.weight_block(0))).float().double()
        out.index_add_(0, tok, wr * y)
        G = dq[tok] @ q(w2[e], r.weight_block(1)).T
        hd = h.double()
        sig = torch.sigmoid(hd)
        act, dact = hd * sig, sig * (1 + hd * (1 - sig))
        a = act * g.double()
        dweights.view(-1)[asg] = (G * a).sum(1)
        dh, dg = (G * wr * dact * g.double()).float(), (G * wr * act).float()
        dxe = q(dh, act_block) @ q(w1[e], r.weight_block(1)).T + q(dg, act_block) @ q(w3[e], r.weight_block(1)).T
        dx.index_add_(0, tok, dxe.float().double())
        rows = (r.group, 1)
        aw = (a * wr).float()
        dws[1][e] = q(aw, rows).T @ q(dout[tok], rows)
        # the FP8 x autograd saves (quantized along d), requantized along the tokens; or x itself
        xr = q((xq if cached else x)[tok], rows)
        dws[0][e], dws[2][e] = xr.T @ q(dh, rows), xr.T @ q(dg, rows)
    return out, dx, dweights, dws[0], dws[1], dws[2]


NAMES = ("out", "dx", "dweights", "dw1", "dw2", "dw3")


@pytest.mark.parametrize("impl", ["grouped", "blocksparse"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_mlp_exact_quantized_math(recipe, impl):
    """The emulated MLP (torch backend, fp32) == the float64 reference of the same quantized math up to fp32
    accumulation order: > 60 dB apart (an FP8 rounding step is ~24 dB), everywhere. Sizes cross groups: d = 160
    (128 + 32), f = 96, an expert with 130 rows (a second row group), an expert with no tokens ("skip")."""
    x, idx, weights, w1, w2, w3, dout = _problem(T=130, d=160, f=96, E=4, k=2, kind="skip")
    idx[:, 0] = 0  # expert 0: 130 rows
    got = _run(x, idx, weights, w1, w2, w3, dout, impl=impl, fp8=recipe, backend="torch")
    ref = _reference(x, idx, weights, w1, w2, w3, dout, recipe)
    for name, a, b in zip(NAMES, got, ref):
        assert sqnr(a, b) > 60, f"{name}: {sqnr(a, b):.1f} dB from the quantized reference"


# Measured 2026-12-06 on this problem (torch backend, fp32; README "FP8"), out / dx / dweights / dw1 / dw2 / dw3 in dB:
# blockwise 23.8 23.8 24.1 23.1 24.0 23.5, mxfp8 23.6 23.5 23.7 23.2 23.6 23.6, rowwise 23.8 23.7 23.9 23.0 24.0 23.5
# (dw1 / dw3 from the saved FP8 x, requantized: 0.7 dB under the 23.8 / 24.2 of x quantized from its own dtype; one
# quantized tensor, x or w1: 31.5-31.8 dB); the floors sit 0.5-1.2 dB under the lowest.
SQNR_FLOOR = {"blockwise": 22.5, "mxfp8": 22.0, "rowwise": 22.5}


@pytest.mark.parametrize("recipe", RECIPES)
def test_mlp_sqnr_vs_unquantized(recipe):
    """SQNR of the FP8 MLP against the unquantized float64 MLP, per output and per gradient, at the issue's d=256,
    f=512 (SwiGLU): each above the recipe's floor (a little under the measured values)."""
    problem = _problem(T=128, d=256, f=512, E=4, k=2)
    exact = _run(*(t.double() if t.is_floating_point() else t for t in problem), impl="grouped", backend="torch")
    got = _run(*problem, impl="grouped", fp8=recipe, backend="torch")
    for name, a, b in zip(NAMES, got, exact):
        assert sqnr(a, b) > SQNR_FLOOR[recipe], f"{name}: {sqnr(a, b):.1f} dB"


def test_fp8_none_is_unchanged():
    """fp8=None is today's path bit for bit (moe_mlp, the op, the layers): the same outputs and gradients as a call
    without the option."""
    problem = _problem(T=40, d=32, f=48, E=4, k=2)
    for impl in ("grouped", "blocksparse", "padded"):
        a = _run(*problem, impl=impl, backend="torch")
        b = _run(*problem, impl=impl, backend="torch", fp8=None)
        for name, u, v in zip(NAMES, a, b):
            assert torch.equal(u, v), f"{impl} {name}"


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every buffer the backend and the kernels allocate (``torch.empty``) starts poisoned: NaN (E4M3 0x7F), E8M0
    255 (NaN), -2^30 for integers, so that an element no kernel writes shows up."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        if t.dtype == torch.uint8:
            return t.fill_(255)  # an E8M0 scale of NaN
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**30))

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.mark.parametrize(
    "recipe, impl",
    [*((r, "grouped") for r in RECIPES), ("blockwise", "blocksparse"), ("mxfp8", "blocksparse")],
)  # the weight gradients' K-major TMA path of every recipe: tests/test_fp8_wgrad.py
def test_triton_fp8_kernels_exact_quantized_math(recipe, impl, poisoned_empty):
    """The Triton backend's FP8 MLP (``backends.triton_fp8``: the E4M3 main loops of ``gemm_kernel`` and
    ``wgrad_kernel`` with the quantize kernels, interpreted) == the float64 reference of the same quantized math up to
    fp32 accumulation order (> 60 dB apart; an FP8 rounding step is ~24 dB), forward and every gradient, with no
    emulation warning. Sizes cross groups: d = 136 (128 + 8, a partial K group), f = 40 (a partial 32 group);
    an expert with no tokens ("skip"); blocksparse (16-row blocks: 16-aligned expert offsets, the weight gradients'
    K-major operands through TMA) covers the saved h, g converted to and from the blocked layout."""
    problem = _problem(T=12, d=136, f=40, E=3, k=2, kind="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused MLP runs the kernels, not the emulation
        got = _run(
            *problem, impl=impl, fp8=recipe, backend="triton", **({"block_size": 16} if impl == "blocksparse" else {})
        )
    ref = _reference(*problem, recipe)
    for name, a, b in zip(NAMES, got, ref):
        assert sqnr(a, b) > 60, f"{name}: {sqnr(a, b):.1f} dB from the quantized reference"


@pytest.mark.parametrize(
    "recipe, counts",
    [
        *((r, [0, 1, 16, 19]) for r in RECIPES),  # an expert with no tokens, one token, 16 tokens, 19 (16 + 3)
        ("blockwise", [21]),  # E = 1, 21 tokens (not a multiple of 16)
    ],
)
def test_triton_fp8_grouped_padded_wgrad(recipe, counts, poisoned_empty):
    """The grouped strategy's FP8 weight gradients read their E4M3 operands over 16-row-padded expert segments
    (``kernels.quantize.row_groups(..., align=16)``): the whole MLP backward still equals the float64 reference of
    the quantized math (> 60 dB), with every buffer poisoned (a padding row left unwritten would be NaN), for
    expert token counts that are and are not multiples of 16."""
    E, T = len(counts), sum(counts)
    x, idx, weights, w1, w2, w3, dout = _problem(T=T, d=40, f=24, E=E, k=1)
    experts = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    idx[:, 0] = experts[torch.randperm(T, generator=torch.Generator().manual_seed(1))]  # the tokens shuffled
    problem = (x, idx, weights, w1, w2, w3, dout)
    got = _run(*problem, impl="grouped", fp8=recipe, backend="triton")
    ref = _reference(*problem, recipe)
    for name, a, b in zip(NAMES, got, ref):
        assert sqnr(a, b) > 60, f"{name}: {sqnr(a, b):.1f} dB from the quantized reference"


def test_triton_fp8_row_groups():
    """The Triton FP8 weight gradients group an expert's rows from its first row: an expert with 130 rows (two
    blockwise row groups, the second partial) and one with 2, against the quantized reference; bf16 inputs run too
    (within FP8 noise of the fp32 result)."""
    x, idx, weights, w1, w2, w3, dout = _problem(T=130, d=32, f=24, E=2, k=1)
    idx[:, 0] = 0  # expert 0: 130 rows (groups of 128 and 2)
    idx[:2, 0] = 1  # expert 1: two rows
    got = _run(x, idx, weights, w1, w2, w3, dout, impl="grouped", fp8="blockwise", backend="triton")
    ref = _reference(x, idx, weights, w1, w2, w3, dout, "blockwise")
    for name, a, b in zip(NAMES, got, ref):
        assert sqnr(a, b) > 60, f"{name}: {sqnr(a, b):.1f} dB"
    half = [t.bfloat16() if t.is_floating_point() else t for t in (x, idx, weights, w1, w2, w3, dout)]
    for name, a, b in zip(NAMES, _run(*half, impl="grouped", fp8="blockwise", backend="triton"), ref):
        assert a.dtype == torch.bfloat16 and sqnr(a, b) > 20, f"{name} bf16: {sqnr(a, b):.1f} dB"


def test_triton_emulated_paths_warn_once():
    """Outside the fused MLP (a callable activation: the op-by-op path) the Triton backend emulates the FP8 GEMMs
    with its quantize kernels, equal to the torch backend's emulation (up to the fp32 summation order of the Triton
    gather / scatter), after a one-time warning."""
    triton_backend.fp8_quantizer.cache_clear()
    problem = _problem(T=12, d=40, f=24, E=3, k=2)
    silu = torch.nn.functional.silu
    with pytest.warns(UserWarning, match="runs the PyTorch emulation"):
        got = _run(*problem, impl="grouped", fp8="mxfp8", backend="triton", activation=silu)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        _run(*problem, impl="grouped", fp8="mxfp8", backend="triton", activation=silu)
    want = _run(*problem, impl="grouped", fp8="mxfp8", backend="torch", activation=silu)
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "case",
    [
        "one-hot",  # all tokens to one expert
        "k=E",  # every token to every expert
        "E=1",  # one expert
        "one-token",  # a single token
        "empty",  # no tokens: empty output and gradients
    ],
)
def test_mlp_edges(case):
    """Edge shapes run forward and backward with fp8 and stay close to the quantized reference (or empty)."""
    T, E, k, kind = {"one-hot": (16, 4, 2, "one-hot"), "k=E": (9, 3, 3, "uniform"), "E=1": (7, 1, 1, "uniform"),
                     "one-token": (1, 4, 2, "uniform"), "empty": (0, 4, 2, "uniform")}[case]  # fmt: skip
    problem = _problem(T=T, d=48, f=40, E=E, k=k, kind=kind)
    got = _run(*problem, impl="grouped", fp8="blockwise", backend="torch")
    if T == 0:
        assert all(t.numel() == 0 or not t.any() for t in got[:3])
        return
    ref = _reference(*problem, "blockwise")
    for name, a, b in zip(NAMES, got, ref):
        assert sqnr(a, b) > 60, f"{name}: {sqnr(a, b):.1f} dB"


def test_mlp_value_edges():
    """All-zero tokens give zero outputs (no NaN from a zero scale); a huge outlier stays finite; a NaN token gives
    NaN in its own output row only (documented propagation)."""
    x, idx, weights, w1, w2, w3, _ = _problem(T=12, d=32, f=24, E=3, k=2)
    x[0] = 0
    x[1, 3] = 1e4
    x[2, 5] = float("nan")
    out = bsm.moe_mlp(x, idx, weights, w1, w2, w3, activation="silu", fp8="mxfp8", backend="torch")
    assert (out[0] == 0).all() and out[1].isfinite().all()
    assert out[2].isnan().all() and out[3:].isfinite().all()


@pytest.mark.parametrize("impl", ["grouped", "padded"])
def test_compile_fullgraph(impl):
    """moe_mlp with fp8 under torch.compile(fullgraph=True) equals eager, forward and backward."""
    problem = _problem(T=16, d=32, f=24, E=3, k=2)

    def f(x, idx, weights, w1, w2, w3):
        return bsm.moe_mlp(
            x, idx, weights, w1, w2, w3, activation="silu", impl=impl, fp8="blockwise", backend="torch", check=False
        )

    x, idx, weights, w1, w2, w3, dout = problem
    eager = _run(*problem, impl=impl, fp8="blockwise", backend="torch", check=False)
    leaves = [t.clone().requires_grad_() for t in (x, weights, w1, w2, w3)]
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(leaves[0], idx, leaves[1], *leaves[2:])
    out.backward(dout)
    for name, a, b in zip(NAMES, (out.detach(), *(t.grad for t in leaves)), eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("cache_x", [None, False])
def test_padded_emulates(cache_x):
    """PaddedMoE / impl='padded' quantizes around its bmm: close to the unquantized padded result (SQNR like the
    dropless recipes), and equal to the dropless FP8 result when nothing drops, in either ``fp8_cache_x`` mode (the
    same on both sides: x's weight-gradient operand from the FP8 x, None, or from x itself, False)."""
    problem = _problem(T=32, d=64, f=48, E=4, k=2)
    mode = dict(fp8="blockwise", backend="torch", fp8_cache_x=cache_x)
    plain = _run(*problem, impl="padded", capacity_factor=2.0, backend="torch")
    quantized = _run(*problem, options=bsm.MoEOptions(impl="padded", capacity_factor=2.0, **mode))
    dropless = _run(*problem, options=bsm.MoEOptions(impl="grouped", **mode))
    for name, a, b, c in zip(NAMES, quantized, plain, dropless):
        assert sqnr(a, b) > 20, name
        # the same quantized math (capacity 2 x T·k/E: nothing drops), but for where the top-k weight enters: padded
        # differentiates the combine (dweights = <y, dout>; dw2 from a and the weighted dout, quantized per token
        # group), the fused MLP takes dweights = <dout @ w2ᵀ, a> and dw2 from the weighted a. dw1 / dw3: x from the
        # same source on both sides (before padded followed fp8_cache_x, 28 dB apart with the FP8 x on one side only)
        if name not in ("dweights", "dw2"):
            assert sqnr(a, c) > 60, f"{name}: {sqnr(a, c):.1f} dB"


def test_option_on_every_entry_point():
    """fp8 reaches every entry point and is validated once with a clear error."""
    with pytest.raises(ValueError, match="fp8 must be one of"):
        bsm.MoEOptions(fp8="fp4")
    with pytest.raises(TypeError, match="fp8 must be None or one of"):
        bsm.MoEOptions(fp8=True)
    with pytest.raises(ValueError, match="impl='reference'"):
        bsm.MoEOptions(impl="reference", fp8="blockwise")
    x, idx, weights, w1, w2, w3, _ = _problem(T=8, d=16, f=16, E=2, k=1)
    with pytest.raises(ValueError, match="callable activation runs on impl 'grouped' or 'padded'"):
        bsm.moe_mlp(x, idx, weights, w1, w2, w3, activation=torch.relu, impl="blocksparse", fp8="rowwise")
    assert bsm.dMoE(16, 16, 2, 1, fp8="mxfp8").options.fp8 == "mxfp8"
    assert bsm.PaddedMoE(16, 16, 2, 1, fp8="rowwise").options.fp8 == "rowwise"
    assert bsm.MoEExperts(2, 16, 16, fp8="blockwise").options.fp8 == "blockwise"
    layer = bsm.dMoE(16, 16, 2, 1, fp8="blockwise", impl="grouped")
    out, _ = layer(x)
    assert out.shape == x.shape and out.dtype == x.dtype and layer.experts.w1.dtype == torch.float32


def test_callable_activation_and_custom_moe_mlp():
    """A callable activation (grouped strategy, op by op) and ``custom_moe_mlp`` (concatenated gate/up, a row-wise
    gate) run FP8 GEMMs: their forward equals the fused MLP's FP8 forward (mxfp8, f a multiple of 32: the same
    groups), and every result is within FP8 noise of the unquantized one (the backward quantizes where the top-k
    weight enters differently)."""
    x, idx, weights, w1, w2, w3, dout = _problem(T=24, d=48, f=64, E=3, k=2)
    fused = _run(x, idx, weights, w1, w2, w3, dout, impl="grouped", fp8="mxfp8", backend="torch")
    silu = torch.nn.functional.silu  # a callable: the op-by-op path
    op_by_op = _run(x, idx, weights, w1, w2, w3, dout, impl="grouped", fp8="mxfp8", backend="torch", activation=silu)
    f = w1.shape[2]

    def gate(h):  # SwiGLU over [gate | up] columns
        return torch.nn.functional.silu(h[:, :f]) * h[:, f:]

    def custom(fp8=None):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weights, torch.cat([w1, w3], 2), w2)]
        out = bsm.custom_moe_mlp(*leaves[:1], idx, *leaves[1:], activation=gate, fp8=fp8, backend="torch")
        out.backward(dout)
        return (out.detach(), *(t.grad for t in leaves))

    quantized, plain = custom("mxfp8"), custom()
    assert sqnr(quantized[0], fused[0]) > 60 and sqnr(op_by_op[0], fused[0]) > 60
    for name, a, b in zip(("out", "dx", "dweights", "dw13", "dw2"), quantized, plain):
        assert 18 < sqnr(a, b) < 40, f"{name}: {sqnr(a, b):.1f} dB"


def test_hf_register_fp8(monkeypatch):
    """``register(..., fp8=...)``: a Mixtral (moe_mlp) and a gpt-oss (custom_moe_mlp: biases, clamped gate) run their
    experts in FP8; logits and gradients within FP8 noise of the eager model. The PyTorch backend: the integration
    under test hands ``fp8`` to the ops whatever their backend (the Triton FP8 MLP has its tests above; interpreted,
    it took 9 of this test's 11 s)."""
    tf = pytest.importorskip("transformers")
    from blocksparse_moe.integrations import transformers as bsm_hf

    monkeypatch.setenv("BSM_BACKEND", "torch")
    tiny = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64)
    configs = [
        tf.MixtralConfig(**tiny, intermediate_size=32, num_key_value_heads=1, num_local_experts=4),
        tf.GptOssConfig(**tiny, intermediate_size=32, num_key_value_heads=1, num_local_experts=4, head_dim=16,
                        layer_types=["full_attention"]),
    ]  # fmt: skip
    bsm_hf.register("bsm_fp8_test", fp8="blockwise")
    for config in configs:
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config).float()
        ids = torch.randint(0, 64, (2, 9))
        results = []
        for name in ("eager", "bsm_fp8_test"):
            model.set_experts_implementation(name)
            model.zero_grad(set_to_none=True)
            logits = model(ids).logits
            (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
            experts = [p.grad.clone() for n, p in model.named_parameters() if "experts" in n]
            results.append((logits.detach(), experts))
        (ref, ref_grads), (got, grads) = results
        assert not torch.equal(got, ref) and sqnr(got, ref) > 20, type(config).__name__
        for a, b in zip(grads, ref_grads):
            assert sqnr(a, b) > 15, type(config).__name__
