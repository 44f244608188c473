"""``wgrad_kernel``'s FP8 main loops (``expert_gemm.wgrad(..., scales=WgradScales)``, issue 17) under the
interpreter, against a float64 reference of the quantized math: both operands quantized along the rows with
``fp8.quantize_rows`` (groups of one expert's rows), dequantized ``q · scale`` in float64, ``out[e] = aᵀ @ b`` over
expert e's rows. Under the interpreter E4M3 ``tl.dot`` / ``tl.dot_scaled`` are exact products with fp32
accumulation, so the kernel's fp32 result is within fp32 accumulation error (``RTOL`` of ``Σ |a||b|``) of the
reference. FP8 against the unquantized math is ``test_fp8.py``'s (SQNR)."""

from __future__ import annotations

import pytest
import torch
from helpers import Recorded, poison_

from blocksparse_moe import fp8
from blocksparse_moe.kernels import expert_gemm
from blocksparse_moe.kernels.expert_gemm import FP8_RECIPES, Fp8Mode, WeightLoad, WgradScales
from blocksparse_moe.kernels.layouts import Rows

E4M3 = torch.float8_e4m3fn
MODES = list(FP8_RECIPES)
RTOL = 1e-5  # fp32 accumulation, relative to Σ |a||b| of each element


def _offsets(counts: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)


class Operand:
    """Expert-sorted rows ``t [R, C]`` quantized along the rows with ``mode``'s recipe: ``q``, ``scale`` and their
    float64 dequantized values ``d`` (rows past ``offsets[E]`` zeroed: no expert owns them). The scale rows of the
    groups no row belongs to (the bound's slack, an empty expert's rowwise group) are poisoned (NaN, E8M0's 255):
    the kernel must never read them."""

    def __init__(self, t: torch.Tensor, offsets: torch.Tensor, mode: Fp8Mode):
        rcp = FP8_RECIPES[mode]
        self.q, self.scale, ids = fp8.quantize_rows(t, offsets, rcp.group, rcp.scale_dtype)
        unused = torch.ones(self.scale.shape[0], dtype=torch.bool)
        unused[ids] = False
        self.scale[unused] = 255 if mode == Fp8Mode.MX else float("nan")
        d = self.q.double() * fp8.scale_value(self.scale).double()[ids]
        self.d = torch.where((torch.arange(t.shape[0]) < offsets[-1])[:, None], d, 0)


def _rows(R: int, C: int, offsets: torch.Tensor, extra: int) -> torch.Tensor:
    """Fresh random rows; the ``extra`` last rows (past ``offsets[E]``) NaN: they must never reach a sum."""
    t = torch.randn(R, C) * torch.rand(R, 1) * 4
    t[R - extra :] = float("nan")
    return t


def _reference(a: Operand, b: Operand, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ref, bound)``: float64 ``a.dᵀ @ b.d`` per expert, and ``Σ |a||b|`` (the accumulation error's scale)."""
    pairs = list(zip(offsets[:-1].tolist(), offsets[1:].tolist()))
    ref = torch.stack([a.d[o0:o1].T @ b.d[o0:o1] for o0, o1 in pairs])
    bound = torch.stack([a.d[o0:o1].abs().T @ b.d[o0:o1].abs() for o0, o1 in pairs])
    return ref, bound


def _check(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    """The kernel's result within fp32 accumulation of the float64 quantized math, rounded to out's dtype."""
    rounding = 0.0 if out.dtype == torch.float32 else torch.finfo(out.dtype).eps
    err = (out.double() - ref).abs()
    allowed = RTOL * bound + rounding * ref.abs() + 1e-30
    assert not out.isnan().any(), "NaN in the result (a poisoned element left unwritten, or a padding row read)"
    assert (err <= allowed).all(), f"max error {(err - allowed).max().item():.3e} over the allowed"


def _launch(
    a: Operand,
    b: Operand,
    offsets: torch.Tensor,
    mode: Fp8Mode,
    dtype: torch.dtype,
    b2: Operand | None = None,
    row_align: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    E, M, N = offsets.shape[0] - 1, a.q.shape[1], b.q.shape[1]
    out = poison_(torch.empty(E, M, N, dtype=dtype))
    out2 = poison_(torch.empty(E, M, N, dtype=dtype)) if b2 is not None else None
    group_offsets = fp8.group_offsets(offsets, FP8_RECIPES[mode].group)
    scales = WgradScales(mode, a.scale, b.scale, group_offsets, b2.scale if b2 is not None else None)
    expert_gemm.wgrad(
        Rows.dense(a.q), Rows.dense(b.q), out, offsets, b2=Rows.dense(b2.q) if b2 is not None else None, out2=out2,
        scales=scales, row_align=row_align,
    )  # fmt: skip
    return out, out2


CASES = {
    # an empty expert, a one-row expert, 37 rows (not a multiple of any group: a partial last group), M and N not
    # multiples of the tiles (24 × 40), padding rows past offsets[E]
    "edges": ([5, 0, 37, 1], 24, 40, 3),
    "E=1": ([23], 16, 16, 0),  # one expert, no padding rows
    # all rows to one expert between two empty ones: 150 rows, two blockwise groups (the second partial), five MX
    # groups, K steps crossing the blockwise group at 128
    "one-expert": ([0, 150, 0], 16, 24, 2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_wgrad_fp8_quantized_math(mode, case, dtype):
    counts, M, N, extra = CASES[case]
    offsets = _offsets(counts)
    R = int(offsets[-1]) + extra
    a = Operand(_rows(R, M, offsets, extra), offsets, mode)
    b = Operand(_rows(R, N, offsets, extra), offsets, mode)
    kept = [t.clone() for t in (a.q, a.scale, b.q, b.scale)]
    out, _ = _launch(a, b, offsets, mode, dtype)
    _check(out, *_reference(a, b, offsets))
    for e, n in enumerate(counts):
        if n == 0:  # an expert with no rows: exact zeros
            assert torch.equal(out[e], torch.zeros_like(out[e]))
    for before, after in zip(kept, (a.q, a.scale, b.q, b.scale)):  # inputs are never modified
        assert torch.equal(before.view(torch.uint8), after.view(torch.uint8))


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_wgrad_fp8_zero_group(mode):
    # an all-zero group: expert 0's rows of A all zero (every recipe's groups there have amax 0: a zero fp32 scale,
    # E8M0 2^-127) give exact zeros, no NaN; expert 1's B rows zero in its first 32 rows only (one MX group; part
    # of a blockwise / rowwise group)
    offsets = _offsets([40, 70])
    at, bt = _rows(110, 16, offsets, 0), _rows(110, 32, offsets, 0)
    at[:40] = 0
    bt[40:72] = 0
    a, b = Operand(at, offsets, mode), Operand(bt, offsets, mode)
    out, _ = _launch(a, b, offsets, mode, torch.float32)
    _check(out, *_reference(a, b, offsets))
    assert torch.equal(out[0], torch.zeros_like(out[0]))


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_wgrad_fp8_dual(mode):
    # DUAL: out = aᵀ @ b and out2 = aᵀ @ b2 over the same A tiles (dW1 and dW3 from x, dh, dg), each with its own
    # scales; an empty expert, a one-row expert, a partial group, padding rows
    offsets = _offsets([5, 0, 37, 1])
    R = int(offsets[-1]) + 3
    a, b, b2 = (Operand(_rows(R, C, offsets, 3), offsets, mode) for C in (24, 40, 40))
    out, out2 = _launch(a, b, offsets, mode, torch.float32, b2=b2)
    _check(out, *_reference(a, b, offsets))
    _check(out2, *_reference(a, b2, offsets))


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_wgrad_fp8_strided_operands_and_scales(mode):
    # any strides: the E4M3 operands are column slices of wider tensors (the columns beside them NaN: never read),
    # the scales transposed views (column-major storage), b2's with b's strides; DUAL, a partial group, padding rows
    offsets = _offsets([5, 0, 37, 1])
    R = int(offsets[-1]) + 3
    a, b, b2 = (Operand(_rows(R, C, offsets, 3), offsets, mode) for C in (24, 40, 40))
    for op in (a, b, b2):
        wide = torch.full((R, op.q.shape[1] + 7), float("nan")).to(E4M3)
        wide[:, 3 : 3 + op.q.shape[1]] = op.q
        op.q = wide[:, 3 : 3 + op.q.shape[1]]
        op.scale = op.scale.T.contiguous().T
    assert a.q.stride() == (31, 1) and a.scale.stride() == (1, a.scale.shape[0])
    out, out2 = _launch(a, b, offsets, mode, torch.float32, b2=b2)
    _check(out, *_reference(a, b, offsets))
    _check(out2, *_reference(a, b2, offsets))


@pytest.mark.parametrize(
    "layout, counts, extra",
    [
        # [R, C] as stored: TMA over the rows (an empty expert, a one-row expert, a partial group, padding rows)
        ("rows", [5, 0, 37, 1], 5),
        # K-major (a [C, R] tensor's transposed view) with 16-aligned expert offsets (row_align=16): TMA over the
        # storage; an empty expert, 48 rows (one and a half MX groups), 16 padding rows
        ("k-major", [16, 0, 48, 32], 16),
    ],
)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_wgrad_fp8_tma_rows(mode, layout, counts, extra, monkeypatch):
    # aligned E4M3 operands (M, N, the strides multiples of 16 bytes) come through tensor descriptors built over the
    # expert's rows [0, end) (TMA's zero fill masks the next expert's rows and the NaN padding rows): the same result
    # as the pointer loads, bit for bit; DUAL with B2 through its own descriptor
    offsets = _offsets(counts)
    R = int(offsets[-1]) + extra  # 48 / 112 rows: a K-major operand's column stride a multiple of 16 bytes
    a, b, b2 = (Operand(_rows(R, C, offsets, extra), offsets, mode) for C in (32, 48, 48))
    if layout == "k-major":
        for op in (a, b, b2):
            op.q = op.q.T.contiguous().T
    recorded = Recorded(expert_gemm.wgrad_kernel)
    monkeypatch.setattr(expert_gemm, "wgrad_kernel", recorded)
    expected = WeightLoad.TMA if layout == "rows" else WeightLoad.TMA_T
    results = {}
    for tma in (True, False):
        monkeypatch.setattr(expert_gemm, "TMA_ROWS", tma)
        results[tma] = _launch(a, b, offsets, mode, torch.float32, b2=b2, row_align=16)
        call = recorded.calls[-1]
        loads = expected if tma else WeightLoad.POINTERS
        assert (call["A_TMA"], call["B_TMA"], call["FP8"]) == (loads, loads, mode)
    for on, off, other in zip(results[True], results[False], (b, b2)):
        assert torch.equal(on, off)
        _check(on, *_reference(a, other, offsets))
    if layout == "k-major":  # without the promise of aligned offsets: pointer loads, the same result
        assert torch.equal(_launch(a, b, offsets, mode, torch.float32, b2=b2)[0], results[True][0])
        assert recorded.calls[-1]["A_TMA"] == WeightLoad.POINTERS


def test_wgrad_fp8_empty():
    # no rows at all (every expert empty): nothing to reduce, zeros
    offsets = _offsets([0, 0])
    a, b = (Operand(torch.randn(0, C), offsets, Fp8Mode.BLOCKWISE) for C in (16, 16))
    out, _ = _launch(a, b, offsets, Fp8Mode.BLOCKWISE, torch.float32)
    assert torch.equal(out, torch.zeros(2, 16, 16))


def _bad(**change) -> dict:
    """A valid blockwise launch's arguments with ``change`` applied: ``s_<field>`` replaces a ``WgradScales`` field,
    anything else a ``wgrad`` argument (``scales`` the whole object)."""
    offsets = _offsets([5, 0, 37])
    a, b = (Operand(torch.randn(42, C), offsets, Fp8Mode.BLOCKWISE) for C in (16, 32))
    args = dict(a=Rows.dense(a.q), b=Rows.dense(b.q), out=torch.empty(3, 16, 32), offsets=offsets, b2=None, out2=None)
    fields = dict(mode=Fp8Mode.BLOCKWISE, a=a.scale, b=b.scale, group_offsets=fp8.group_offsets(offsets, 128), b2=None)
    fields.update({key[2:]: change.pop(key) for key in list(change) if key.startswith("s_")})
    args.update(change)
    args.setdefault("scales", WgradScales(**fields))
    return args


def _q(t: torch.Tensor) -> torch.Tensor:
    return t.to(E4M3)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(scales=None), TypeError, "E4M3 operand a needs scales"),  # FP8 operands without scales
        (dict(scales=(1, 2)), TypeError, "scales must be a WgradScales"),
        (dict(s_mode=Fp8Mode.NONE), ValueError, "scales.mode must be one of"),  # NONE is not an FP8 mode
        (dict(a=Rows.dense(torch.randn(42, 16, dtype=torch.bfloat16))), TypeError, "a \\(FP8\\) must have a dtype"),
        (dict(s_a=torch.zeros(4, 16, dtype=torch.uint8)), TypeError, "scales.a \\(BLOCKWISE\\) must have a dtype"),
        (dict(s_b=torch.zeros(5, 32)), ValueError, "scales.b must have shape \\[groups \\+ 1, cols\\] = \\(4, 32\\)"),
        (dict(s_a=torch.zeros(4, 8)), ValueError, "scales.a must have shape"),  # a's scales for other columns
        (dict(s_group_offsets=torch.zeros(3, dtype=torch.int64)), ValueError, "group_offsets must have shape"),
        (dict(s_group_offsets=torch.zeros(4)), TypeError, "group_offsets must have a dtype"),
        (dict(a=Rows.dense(_q(torch.randn(7, 16)), gathered=True)), ValueError, "a must be dense rows.*gathered"),
        (dict(b=Rows.blocked(_q(torch.randn(6, 16, 16)), 2, 32)), ValueError, "b must be dense rows.*blocked"),
        (dict(b2=Rows.dense(_q(torch.randn(42, 32))), out2=torch.empty(3, 16, 32)), ValueError, "scales.b2 must be"),
        (dict(row_align=0), ValueError, "row_align must be a positive int, got 0"),
    ],
)
def test_wgrad_fp8_bad_scales(change, error, match):
    args = _bad(**change)
    with pytest.raises(error, match=match):
        expert_gemm.wgrad(
            args["a"], args["b"], args["out"], args["offsets"], b2=args["b2"], out2=args["out2"], scales=args["scales"],
            row_align=args.get("row_align", 1),
        )  # fmt: skip


def test_wgrad_fp8_needs_e4m3_mmas(monkeypatch):
    # an sm_80 device (no E4M3 MMA: the kernel does not compile there): a clear error before the launch
    monkeypatch.setattr(expert_gemm, "capability", lambda t: 80)
    args = _bad()
    with pytest.raises(ValueError, match=r"8\.9 or newer\), got a device of compute capability 8\.0"):
        expert_gemm.wgrad(args["a"], args["b"], args["out"], args["offsets"], scales=args["scales"])


def test_grouped_fp8_mlp_wgrad_reads_k_major(monkeypatch):
    # the grouped strategy's FP8 MLP backward (backends.triton_fp8) launches its weight gradients (dW2; dW1 and dW3
    # in one dual launch) over 16-row-padded expert segments: row_align=16, the offsets fp8.padded_offsets of the
    # routing's, column-major E4M3 operands (unit row stride, a column stride multiple of 16) that wgrad_kernel reads
    # through TMA over their storage (TMA_T: the K-major tiles sm_90's E4M3 wgmma reads without a register copy);
    # counts 5, 0 (no tokens), 17, 1 (one token)
    import blocksparse_moe as bsm

    counts = [5, 0, 17, 1]
    T, d, f, E = sum(counts), 32, 16, len(counts)
    g = torch.Generator().manual_seed(0)
    idx = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))[torch.randperm(T, generator=g)][:, None]
    x, weights = torch.randn(T, d, generator=g, requires_grad=True), torch.rand(T, 1, generator=g)
    w1, w3 = (torch.randn(E, d, f, generator=g, requires_grad=True) for _ in range(2))
    w2 = torch.randn(E, f, d, generator=g, requires_grad=True)
    launches = []
    wgrad = expert_gemm.wgrad

    def record(a, b, out, offsets, **kw):
        launches.append((a, b, kw.get("b2"), offsets, kw["row_align"]))
        return wgrad(a, b, out, offsets, **kw)

    monkeypatch.setattr(expert_gemm, "wgrad", record)
    kernel = Recorded(expert_gemm.wgrad_kernel)
    monkeypatch.setattr(expert_gemm, "wgrad_kernel", kernel)
    out = bsm.moe_mlp(x, idx, weights, w1, w2, w3, activation="silu", impl="grouped", fp8="blockwise", backend="triton")
    out.backward(torch.randn(T, d, generator=g))
    padded = fp8.padded_offsets(_offsets(counts), 16)
    assert padded.tolist() == [0, 16, 16, 48, 64] and len(launches) == 2 and launches[1][2] is not None  # dW2, dW1|3
    for a, b, b2, offsets, row_align in launches:
        assert row_align == 16 and offsets.tolist() == padded.tolist()
        for r in (a, b) if b2 is None else (a, b, b2):
            t = r.tensor
            assert t.dtype == E4M3 and t.stride(0) == 1 and t.stride(1) % 16 == 0 and t.shape[0] >= padded[-1]
    assert [(c["A_TMA"], c["B_TMA"]) for c in kernel.calls] == [(WeightLoad.TMA_T, WeightLoad.TMA_T)] * 2
