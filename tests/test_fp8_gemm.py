"""The FP8 main loops of ``gemm_kernel`` (``expert_gemm.gemm(..., scales=GemmScales)``, interpreter): every recipe
(``Fp8Mode`` BLOCKWISE, MX, ROWWISE) with every epilogue the fused MLP runs, against a float64 reference *of the
quantized math*: the operands of ``fp8.quantize`` dequantized in float64 (``q.double() · scale``), multiplied in
float64. Under the interpreter E4M3 ``tl.dot`` and ``tl.dot_scaled`` are exact products with fp32 accumulation, so
the kernel matches that reference to fp32 accumulation accuracy (checked against ``|A| @ |W|``, the bound of the
rounding of a sum); never against unquantized math (``test_fp8.py`` judges the recipes by SQNR). Outputs are
poisoned; the edges and the errors are named where they are tested."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import Recorded, gpu_gemm_config, poison_, routing

from blocksparse_moe import fp8
from blocksparse_moe.activations import act_backward, get_activation
from blocksparse_moe.kernels import expert_gemm
from blocksparse_moe.kernels import quantize as quantize_kernels
from blocksparse_moe.kernels.expert_gemm import BackwardEpilogue, Fp8Mode, GemmScales, WeightLoad
from blocksparse_moe.kernels.layouts import Rows, Schedule
from blocksparse_moe.routing import RoutingPlan, plan_routing

MODES = [Fp8Mode.BLOCKWISE, Fp8Mode.MX, Fp8Mode.ROWWISE]
BLOCK_M = 16
ACC_RTOL = 1e-5  # fp32 accumulation, relative to |A| @ |W|


def _plan(T: int, k: int, E: int, kind: str) -> RoutingPlan:
    return plan_routing(routing(T, k, E, kind), E, block_size=1, check=False)


def _expand(scale: torch.Tensor, block: tuple[int | None, int | None], shape: tuple[int, int]) -> torch.Tensor:
    """Per-group float64 scale values ``[..., R/br, C/bc]`` over their elements ``[..., R, C]``."""
    R, C = shape
    br, bc = block[0] or max(R, 1), block[1] or max(C, 1)
    value = fp8.scale_value(scale).double()
    return value.repeat_interleave(br, -2).repeat_interleave(bc, -1)[..., :R, :C]


def quantized(t: torch.Tensor, block: tuple[int | None, int | None], mode: Fp8Mode):
    """``(q, scale, q.double() · scale)``: ``t`` quantized by ``fp8.quantize`` for ``mode``'s recipe, and the
    float64 values the FP8 GEMM multiplies."""
    q, s = fp8.quantize(t, block, mode.recipe().scale_dtype)
    return q, s, q.double() * _expand(s, block, tuple(t.shape[-2:]))


def weight(E: int, K: int, N: int, mode: Fp8Mode, transposed: bool):
    """E4M3 weights ``[E, K, N]`` with their scales: as stored (quantized with ``weight_block(0)``) or the view
    ``w.transpose(1, 2)`` of a ``[E, N, K]`` weight quantized with ``weight_block(1)`` (the dgrad's ``wᵀ``), with
    its scales' transposed view. Returns ``(q, scale, float64 values)``, all ``[E, K, N]`` views."""
    rcp = mode.recipe()
    if transposed:
        q, s, v = quantized(torch.randn(E, N, K) / K**0.5, rcp.weight_block(1), mode)
        return q.transpose(1, 2), s.transpose(1, 2), v.transpose(1, 2)
    return quantized(torch.randn(E, K, N) / K**0.5, rcp.weight_block(0), mode)


def expert_rows(plan: RoutingPlan, a64: torch.Tensor, gathered: bool) -> list[tuple[int, int, torch.Tensor]]:
    """``(first row, expert, A's rows of that expert)`` per expert, in float64."""
    off = plan.offsets.tolist()
    src = plan.row_token.long()
    return [
        (off[e], e, a64[src[off[e] : off[e + 1]]] if gathered else a64[off[e] : off[e + 1]])
        for e in range(plan.num_experts)
    ]


def reference(plan: RoutingPlan, a64: torch.Tensor, w64: torch.Tensor, gathered: bool):
    """``(A @ W[e] per row, |A| @ |W[e]|)`` ``[R, N]`` in float64 (rows no expert owns: zero)."""
    R, N = plan.num_assignments, w64.shape[2]
    ref, bound = torch.zeros(R, N, dtype=torch.float64), torch.zeros(R, N, dtype=torch.float64)
    for first, e, rows in expert_rows(plan, a64, gathered):
        ref[first : first + rows.shape[0]] = rows @ w64[e]
        bound[first : first + rows.shape[0]] = rows.abs() @ w64[e].abs()
    return ref, bound


def assert_accumulated(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """``out`` is ``ref`` to fp32 accumulation accuracy (``ACC_RTOL · bound``), then rounded to out's dtype."""
    assert not out.isnan().any(), f"{what}: NaN (an element left unwritten)"
    rounding = 0.0 if out.dtype == torch.float32 else torch.finfo(out.dtype).eps
    err = (out.double() - ref).abs()
    tol = ACC_RTOL * bound + rounding * ref.abs() + 1e-30
    assert (err <= tol).all(), f"{what}: max error {err.max():.3e}, worst ratio {(err / tol).max():.2f}"


def assert_derived(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Epilogue results computed from the accumulator (activations, products): fp32 math, or one more rounding to
    bf16 of values derived from a rounded h."""
    assert not out.isnan().any(), f"{what}: NaN (an element left unwritten)"
    rtol = 1e-5 if out.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=rtol * ref.abs().max().item(), msg=what)


def _poisoned(R: int, N: int, dtype: torch.dtype) -> torch.Tensor:
    return poison_(torch.empty(R, N, dtype=dtype))


USES = ["plain", "plain-gathered", "forward", "forward-glu", "backward-glu", "pair"]
# (out dtype, weights as a transposed view, TMA weights): each use and recipe runs both
VARIANTS = [(torch.float32, False, True), (torch.bfloat16, True, False)]


@pytest.mark.parametrize("variant", VARIANTS, ids=["fp32-stored-tma", "bf16-transposed-pointers"])
@pytest.mark.parametrize("use", USES)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name.lower())
def test_fp8_gemm(mode, use, variant, monkeypatch):
    _check_fp8_gemm(mode, use, variant, BLOCK_M, monkeypatch)


@pytest.mark.parametrize("use", [u for u in USES if u != "forward-glu"])  # (its 64-column tiles: not swapped)
def test_fp8_gemm_swapped(use, monkeypatch):
    # sm_100's 64-row MX tiles computed transposed (SWAP_AB: the weight's columns as the block-scaled MMA's M), the
    # device config forced under the interpreter: the same checks as test_fp8_gemm (dot_scaled with W and its scales
    # as the left operand), weights by TMA (transposed views: the FP8 MLP's K-contiguous weights)
    sm100_config = gpu_gemm_config(100)

    monkeypatch.setattr(expert_gemm, "gemm_config", sm100_config)
    recorded = Recorded(expert_gemm.gemm_kernel)
    monkeypatch.setattr(expert_gemm, "gemm_kernel", recorded)
    _check_fp8_gemm(Fp8Mode.MX, use, (torch.bfloat16, True, True), 64, monkeypatch)
    assert recorded.calls[-1]["SWAP_AB"] and recorded.calls[-1]["BLOCK_M"] == 64


def _check_fp8_gemm(mode: Fp8Mode, use: str, variant: tuple, block_m: int, monkeypatch) -> None:
    """``use`` (``USES``) of an FP8 ``gemm`` in ``mode`` over M tiles of ``block_m`` rows (``VARIANTS``: out's
    dtype, weights as a transposed view, TMA weights), against the float64 reference of the quantized math."""
    # experts 1 and 3 get no rows (an expert with no rows); K = 144 and N = 48 are multiples of no scale group
    # (K: a second, partial blockwise group, a partial last MX step) but 16-byte aligned, so TMA runs when on
    out_dtype, transposed, tma = variant
    monkeypatch.setattr(expert_gemm, "TMA_WEIGHTS", tma)
    T, k, E, K, N = 13, 2, 4, 144, 48
    plan = _plan(T, k, E, "skip")
    R, rcp = plan.num_assignments, mode.recipe()
    schedule = Schedule.build(plan.offsets, R, block_m)
    gathered = use not in ("plain", "pair")
    a_q, a_s, a64 = quantized(torch.randn(T if gathered else R, K), rcp.act_block(), mode)
    w_q, w_s, w64 = weight(E, K, N, mode, transposed)
    assert (expert_gemm._tma_mode(w_q) != WeightLoad.POINTERS) == tma
    inputs = [t.clone() for t in (a_q.view(torch.uint8), a_s, w_q.view(torch.uint8), w_s)]
    a = Rows.dense(a_q, gathered=gathered)
    row_src = plan.row_token if gathered else None
    out = _poisoned(R, N, out_dtype)
    ref, bound = reference(plan, a64, w64, gathered)

    if use in ("plain", "plain-gathered"):
        expert_gemm.gemm(a, w_q, Rows.dense(out), schedule, row_src=row_src, scales=GemmScales(mode, a_s, w_s))
        assert_accumulated(out, ref, bound, "out")
    elif use.startswith("forward"):
        glu = use == "forward-glu"
        g_q, g_s, g64 = weight(E, K, N, mode, transposed)
        gate_out, act_out = _poisoned(R, N, out_dtype), _poisoned(R, N, out_dtype)
        expert_gemm.gemm(
            a, w_q, Rows.dense(out), schedule, row_src=row_src, gate=g_q if glu else None, gate_out=gate_out,
            act_out=act_out, activation="silu", scales=GemmScales(mode, a_s, w_s, g_s if glu else None),
        )  # fmt: skip
        assert_accumulated(out, ref, bound, "h")
        act = get_activation("silu")(ref.to(out_dtype).double())
        if glu:
            ref_g, bound_g = reference(plan, a64, g64, gathered)
            assert_accumulated(gate_out, ref_g, bound_g, "g")
            act = act * ref_g.to(out_dtype).double()
        assert_derived(act_out, act, "a")
    elif use == "backward-glu":
        # acc = G = dout[token] @ w2ᵀ; the epilogue: dh = w·G·g·act'(h), dg = w·G·act(h), aw = w·a, Σ G·a
        h, g = torch.randn(R, N).to(out_dtype), torch.randn(R, N).to(out_dtype)
        weights = torch.rand(T * k)
        dg, aw = _poisoned(R, N, out_dtype), _poisoned(R, N, out_dtype)
        dots = expert_gemm.gemm(
            a, w_q, Rows.dense(out), schedule, row_src=row_src, gate_out=dg, act_out=aw, activation="silu",
            backward=BackwardEpilogue(h, g, plan.row_assignment, weights), scales=GemmScales(mode, a_s, w_s),
        )  # fmt: skip
        h64, g64 = h.double(), g.double()
        wr = weights.double()[plan.row_assignment.long()][:, None]
        act = get_activation("silu")(h64)
        assert_derived(out, act_backward(ref * wr * g64, h64, "silu"), "dh")
        assert_derived(dg, ref * wr * act, "dg")
        assert_derived(aw, act * g64 * wr, "aw")
        assert_derived(dots.sum(0), (ref * act * g64).sum(1), "dots")
    else:  # pair: out = a @ w + a2 @ w2, each with its own scales
        a2_q, a2_s, a2_64 = quantized(torch.randn(R, K), rcp.act_block(), mode)
        w2_q, w2_s, w2_64 = weight(E, K, N, mode, transposed)
        scales = GemmScales(mode, a_s, w_s, w2_s, a2_s)
        expert_gemm.gemm(a, w_q, Rows.dense(out), schedule, pair=(Rows.dense(a2_q), w2_q), scales=scales)
        ref2, bound2 = reference(plan, a2_64, w2_64, False)
        assert_accumulated(out, ref + ref2, bound + bound2, "out")
    # inputs are never modified
    for before, after in zip(inputs, (a_q.view(torch.uint8), a_s, w_q.view(torch.uint8), w_s)):
        assert torch.equal(before, after)


EDGES = {
    # name: (T, k, E, K, N, routing)
    "one-row": (1, 1, 1, 80, 40, "uniform"),  # one row, E = 1; K = 80, N = 40 (unaligned: pointer loads)
    "one-expert": (20, 2, 3, 80, 40, "one-hot"),  # all rows on one expert: several M tiles, the others empty
    "k=E": (5, 3, 3, 32, 24, "uniform"),  # k = E: every token on every expert
    "two-column-blocks": (6, 1, 2, 64, 136, "uniform"),  # N = 136: a second, partial 128-column weight block
    "empty": (0, 2, 3, 80, 40, "uniform"),  # no rows: nothing to launch
}


@pytest.mark.parametrize("case", list(EDGES))
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name.lower())
def test_fp8_gemm_edges(mode, case):
    _check_gathered_gemm(mode, *EDGES[case])


def _check_gathered_gemm(mode: Fp8Mode, T: int, k: int, E: int, K: int, N: int, kind: str) -> None:
    """The plain gathered GEMM ``x[token] @ w[e]`` of mode ``mode`` on a poisoned fp32 out, against the reference."""
    plan = _plan(T, k, E, kind)
    R, rcp = plan.num_assignments, mode.recipe()
    a_q, a_s, a64 = quantized(torch.randn(T, K), rcp.act_block(), mode)
    w_q, w_s, w64 = weight(E, K, N, mode, False)
    out = _poisoned(R, N, torch.float32)
    expert_gemm.gemm(
        Rows.dense(a_q, gathered=True), w_q, Rows.dense(out), Schedule.build(plan.offsets, R, BLOCK_M),
        row_src=plan.row_token, scales=GemmScales(mode, a_s, w_s),
    )  # fmt: skip
    assert_accumulated(out, *reference(plan, a64, w64, True), "out")


@pytest.mark.parametrize("block_k", [64, 128])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name.lower())
def test_fp8_gemm_gpu_k_steps(mode, block_k, monkeypatch):
    # the GPU configs' K steps (128: one blockwise group, four MX groups per step) on K = 80: the last step holds
    # a partial group and (MX) masked scale groups, which must read a finite scale (a masked E8M0 255 is NaN)
    config = expert_gemm.gemm_config

    def gpu_k_step(*args, **kwargs):
        return replace(config(*args, **kwargs), block_k=block_k)

    monkeypatch.setattr(expert_gemm, "gemm_config", gpu_k_step)
    _check_gathered_gemm(mode, T=9, k=2, E=3, K=80, N=40, kind="uniform")


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name.lower())
def test_fp8_gemm_zero_and_nan_groups(mode):
    # an all-zero group (fp32 scale 0, E8M0 2^-127: q = 0) gives zeros, no NaN; a NaN in a group makes its scale
    # NaN (E8M0: 255) and every product reading the group NaN (fp8.py's documented propagation): the token's whole
    # output row, as in the reference
    T, k, E, K, N = 6, 1, 2, 80, 40
    plan = _plan(T, k, E, "uniform")
    R, rcp = plan.num_assignments, mode.recipe()
    x = torch.randn(T, K)
    x[1, :32] = 0  # token 1: an all-zero group (every recipe's first group covers its first 32 elements)
    x[2] = 0  # token 2: all zero (rowwise: the row's one scale is 0)
    x[4, 40] = float("nan")  # token 4: a NaN
    w = torch.randn(E, K, N) / K**0.5
    w[1] = 0  # expert 1's weight all zero: zero scales
    a_q, a_s, a64 = quantized(x, rcp.act_block(), mode)
    w_q, w_s, w64 = quantized(w, rcp.weight_block(0), mode)
    out = _poisoned(R, N, torch.float32)
    expert_gemm.gemm(
        Rows.dense(a_q, gathered=True), w_q, Rows.dense(out), Schedule.build(plan.offsets, R, BLOCK_M),
        row_src=plan.row_token, scales=GemmScales(mode, a_s, w_s),
    )  # fmt: skip
    ref, bound = reference(plan, a64, w64, True)
    nan = plan.row_token.long() == 4
    assert ref[nan].isnan().all() and not ref[~nan].isnan().any()
    assert out[nan].isnan().all()
    assert_accumulated(out[~nan], ref[~nan], bound[~nan], "out")
    off = plan.offsets.tolist()
    assert (out[off[1] : off[2]] == 0).all()  # expert 1's rows: zero weights
    assert (out[plan.row_token.long() == 2] == 0).all()


def _small(mode: Fp8Mode):
    """A valid gathered FP8 launch's arguments: ``(a, w, out, schedule, row_src, scales)``."""
    plan = _plan(4, 1, 2, "uniform")
    rcp = mode.recipe()
    a_q, a_s, _ = quantized(torch.randn(4, 64), rcp.act_block(), mode)
    w_q, w_s, _ = weight(2, 64, 32, mode, False)
    out = Rows.dense(torch.empty(4, 32))
    return Rows.dense(a_q, gathered=True), w_q, out, Schedule.build(plan.offsets, 4, BLOCK_M), plan.row_token, a_s, w_s


def test_fp8_gemm_errors():
    a, w, out, schedule, row_src, a_s, w_s = _small(Fp8Mode.BLOCKWISE)

    def launch(**kwargs):
        args = dict(
            a=a, w=w, out=out, schedule=schedule, row_src=row_src, scales=GemmScales(Fp8Mode.BLOCKWISE, a_s, w_s)
        )
        args.update(kwargs)
        expert_gemm.gemm(args.pop("a"), args.pop("w"), args.pop("out"), args.pop("schedule"), **args)

    with pytest.raises(TypeError, match=r"E4M3 operands \(a, w\) need their scales"):
        launch(scales=None)
    with pytest.raises(TypeError, match="scales must be a GemmScales"):
        launch(scales=(a_s, w_s))
    with pytest.raises(ValueError, match="scales.mode must be"):
        launch(scales=GemmScales(Fp8Mode.NONE, a_s, w_s))
    with pytest.raises(TypeError, match=r"gemm: w \(FP8\) must have a dtype among \(torch.float8_e4m3fn,\)"):
        launch(w=w.float())
    with pytest.raises(TypeError, match=r"gemm: out \(FP8\)"):
        launch(out=Rows.dense(torch.empty(4, 32, dtype=torch.float8_e4m3fn)))
    with pytest.raises(TypeError, match=r"scales.a \(blockwise\) must have a dtype among \(torch.float32,\)"):
        launch(scales=GemmScales(Fp8Mode.BLOCKWISE, a_s.to(torch.uint8), w_s))
    with pytest.raises(TypeError, match=r"scales.w \(mxfp8\) must have a dtype among \(torch.uint8,\)"):  # mx
        launch(scales=GemmScales(Fp8Mode.MX, torch.zeros(4, 2, dtype=torch.uint8), torch.zeros(2, 2, 32)))
    with pytest.raises(ValueError, match=r"scales.w \(blockwise\) must have shape \[E, K groups, N groups\] = "
                                         r"\(2, 1, 1\), got \(2, 1, 32\)"):  # fmt: skip
        launch(scales=GemmScales(Fp8Mode.BLOCKWISE, a_s, torch.ones(2, 1, 32)))
    with pytest.raises(ValueError, match=r"scales.a \(rowwise\) must have shape .* = \(4, 1\), got \(4, 1, 1\)"):
        launch(scales=GemmScales(Fp8Mode.ROWWISE, a_s[..., None], w_s))
    with pytest.raises(ValueError, match="scales.w2 is needed"):  # a GLU gate without its scales
        launch(gate=w, gate_out=torch.empty(4, 32), act_out=torch.empty(4, 32))
    with pytest.raises(ValueError, match="scales.w2 must be None without a gate or a pair"):
        launch(scales=GemmScales(Fp8Mode.BLOCKWISE, a_s, w_s, w_s))
    blocked = Rows.blocked(torch.zeros(2, 16, 16, dtype=torch.float8_e4m3fn), 1, 16)
    with pytest.raises(ValueError, match="an FP8 a must be dense or gathered, got a blocked layout"):
        launch(a=blocked, row_src=None, scales=GemmScales(Fp8Mode.BLOCKWISE, torch.ones(32, 1), torch.ones(2, 1, 1)))


def test_fp8_gemm_needs_e4m3_mmas(monkeypatch):
    # an sm_80 device (no E4M3 MMA: Triton does not compile the kernel there): a clear error before the launch
    monkeypatch.setattr(expert_gemm, "capability", lambda t: 80)
    a, w, out, schedule, row_src, a_s, w_s = _small(Fp8Mode.ROWWISE)
    with pytest.raises(ValueError, match=r"gemm: FP8 operands need E4M3 MMAs \(compute capability 8\.9 or newer\), "
                                         r"got a device of compute capability 8\.0"):  # fmt: skip
        expert_gemm.gemm(a, w, out, schedule, row_src=row_src, scales=GemmScales(Fp8Mode.ROWWISE, a_s, w_s))


def test_fp8_gemm_configs(monkeypatch):
    # the GPU configs (bench.audit builds them): a K step of 128 (one blockwise group per step, four MX groups),
    # 64 for MX off sm_100 (emulated), 32 for unaligned operands; blockwise tiles within one 128-column weight block
    monkeypatch.setattr(expert_gemm, "interpreting", lambda: False)
    e4m3 = torch.float8_e4m3fn
    for mode in MODES:
        for cc in (90, 100, 120):
            for epilogue, glu, pair in ((0, False, False), (1, True, False), (2, True, False), (0, False, True)):
                cfg = expert_gemm.gemm_config(e4m3, 128, epilogue=epilogue, glu=glu, pair=pair, capability=cc, fp8=mode)
                rowwise_glu_100 = mode == Fp8Mode.ROWWISE and cc == 100 and glu and epilogue == 1  # (below)
                assert cfg.block_k == 128 or (mode == Fp8Mode.MX and cc != 100) or rowwise_glu_100
                assert 128 % cfg.block_n == 0 and cfg.block_k % 32 == 0
                slow = expert_gemm.gemm_config(e4m3, 128, aligned=False, capability=cc, fp8=mode)
                assert slow.block_k == slow.block_n == 32
    # sm_100's aligned 128-row MX / rowwise GLU forward: 128 columns per weight (MX: whole scale chunks, its weights'
    # scales by TMA; rowwise: K steps of 64), the epilogue in 32-column slices, 4 warps; blockwise, MX's 64-row,
    # unaligned and the other architectures' keep 64 columns (rowwise's 64-row: below)
    for mode, block_k in ((Fp8Mode.MX, 128), (Fp8Mode.ROWWISE, 64)):
        wide = expert_gemm.gemm_config(e4m3, 128, epilogue=1, glu=True, capability=100, fp8=mode)
        assert (wide.block_n, wide.block_k, wide.epi_n, wide.num_warps, wide.num_stages) == (128, block_k, 32, 4, 3)
        assert expert_gemm.mx_chunk_tiles(wide) == (mode == Fp8Mode.MX)
        for block_m, cc in ((64, 100), (128, 90), (128, 120)):
            cfg = expert_gemm.gemm_config(e4m3, block_m, epilogue=1, glu=True, capability=cc, fp8=mode)
            assert cfg.block_n == (128 if (mode, block_m, cc) == (Fp8Mode.ROWWISE, 64, 100) else 64)
        assert expert_gemm.gemm_config(e4m3, 128, epilogue=1, glu=True, aligned=False, capability=100,
                                       fp8=mode).block_n == 32  # fmt: skip
    assert expert_gemm.gemm_config(e4m3, 128, epilogue=1, glu=True, capability=100, fp8=Fp8Mode.BLOCKWISE).block_n == 64
    # rowwise: the down GEMM, the up-projection without GLU and the pair scale their accumulators in slices of 16
    # columns (sm_90's 128-row tiles: 2 CTAs per SM, bench.audit), every architecture and alignment
    for cc in (90, 100, 120):
        for epilogue, pair in ((0, False), (1, False), (0, True)):
            for aligned in (True, False):
                cfg = expert_gemm.gemm_config(e4m3, 128, epilogue=epilogue, pair=pair, aligned=aligned, capability=cc,
                                              fp8=Fp8Mode.ROWWISE)  # fmt: skip
                assert cfg.epi_n == 16, (cc, epilogue, pair, aligned)

    # rowwise with its rows through TMA: 256-deep K steps in 2 stages for sm_90's 128-row pair (dense rows, at 64
    # columns) and sm_100's 64-row tiles (dense, or gathered by TMA's row gather) but the GLU forward's; sm_90's
    # gathered rows (cp.async), the other tiles and the other recipes as before
    def steps(block_m, cc, mode=Fp8Mode.ROWWISE, pair=False, dense_rows=True, epilogue=0):
        cfg = expert_gemm.gemm_config(e4m3, block_m, epilogue=epilogue, pair=pair, capability=cc, fp8=mode,
                                      dense_rows=dense_rows)  # fmt: skip
        return cfg.block_n, cfg.block_k, cfg.num_stages

    assert steps(128, 90, pair=True) == (64, 256, 2) and steps(128, 90, pair=True, dense_rows=False) == (128, 128, 3)
    assert steps(64, 100, pair=True) == steps(64, 100) == (128, 256, 2)
    assert steps(64, 100, dense_rows=False) == steps(64, 100, dense_rows=False, epilogue=2) == (128, 256, 2)
    assert steps(64, 100, dense_rows=False, epilogue=1) == (128, 256, 2)  # the up-projection without GLU
    assert steps(128, 100) == steps(128, 100, dense_rows=False, epilogue=2) == (128, 128, 3)
    glu = expert_gemm.gemm_config(e4m3, 64, epilogue=1, glu=True, capability=100, fp8=Fp8Mode.ROWWISE)
    assert (glu.block_n, glu.block_k, glu.epi_n, glu.num_stages) == (128, 128, 32, 2)  # its two accumulators: TMEM
    assert steps(64, 90, pair=True) == steps(128, 90) == steps(128, 100, pair=True) == (128, 128, 3)
    for mode in (Fp8Mode.BLOCKWISE, Fp8Mode.MX):
        assert steps(128, 90, mode, pair=True) == steps(128, 90, mode, pair=True, dense_rows=False)
        assert steps(64, 100, mode, pair=True) == steps(64, 100, mode, pair=True, dense_rows=False)
    # sm_100 keeps its warp-specialized loop (rows by cp.async) for blockwise, MX's swapped tiles and MX's gathered
    # rows; rowwise and MX's dense 128-row tiles take their rows through TMA without it
    cases = (
        (Fp8Mode.ROWWISE, 64, False, False),
        (Fp8Mode.ROWWISE, 128, True, False),
        (Fp8Mode.MX, 128, False, False),
        (Fp8Mode.MX, 128, True, True),
        (Fp8Mode.MX, 64, False, True),
        (Fp8Mode.BLOCKWISE, 128, False, True),
    )
    for mode, block_m, gathered, ws in cases:
        cfg = expert_gemm.gemm_config(e4m3, block_m, capability=100, fp8=mode, dense_rows=not gathered)
        assert expert_gemm.fp8_rows_warp_specialized(mode, cfg, gathered) == ws, (mode, block_m, gathered)
    monkeypatch.setattr(expert_gemm, "interpreting", lambda: True)
    assert expert_gemm.gemm_config(e4m3, 16, fp8=Fp8Mode.MX).block_k == 32  # whole MX groups when interpreting
    for epilogue, glu, pair in ((0, False, False), (1, False, False), (1, True, False), (2, True, False),
                                (0, False, True)):  # fmt: skip
        cfg = expert_gemm.gemm_config(e4m3, 16, epilogue=epilogue, glu=glu, pair=pair, fp8=Fp8Mode.ROWWISE)
        assert cfg.epi_n < cfg.block_n  # the interpreter's tests run every epilogue in column slices


# ----------------------------------------------------------------------------------------------- MX scales by TMA


def test_mx_scale_chunks_layout():
    # tcgen05's scale-factor chunks (SW_TMA): column 128·c + 32·i + j, group 4·b + q at byte 16·j + 4·i + q of chunk
    # (c, b); N = 136 and G = 7 are multiples of neither 128 nor 4 (padding 127 = 2^0); a transposed view as input
    E, G, N = 2, 7, 136
    s = torch.randint(0, 256, (E, N, G), dtype=torch.uint8).transpose(1, 2)  # [E, G, N], N-strided like wᵀ's
    before = s.clone()
    chunks = expert_gemm._mx_scale_chunks(s)
    assert chunks.shape == (E, 2, 2, 2, 256) and chunks.is_contiguous() and torch.equal(s, before)
    flat = chunks.reshape(E, 2, 2, 512)
    for e in range(E):
        for n in range(256):
            for g in range(8):
                c, i, j, b, q = n // 128, (n % 128) // 32, n % 32, g // 4, g % 4
                want = s[e, g, n].item() if n < N and g < G else 127
                assert flat[e, c, b, 16 * j + 4 * i + q].item() == want, (e, n, g)


def test_mx_scales_tma_rule(monkeypatch):
    # SW_TMA: MX only, tiles of whole chunks (128 rows, 128 columns, K steps of 4 groups), K > 0, sm_100 only
    # (_scale_tma_device: never when interpreting), TMA_SCALES on
    cfg = expert_gemm.GemmConfig(128, 128, 128, 8, 4, 3)
    cpu = torch.device("cpu")
    assert not expert_gemm._mx_scales_tma(Fp8Mode.MX, cfg, 256, cpu)  # interpreting: not sm_100
    monkeypatch.setattr(expert_gemm, "_scale_tma_device", lambda device: True)
    assert expert_gemm._mx_scales_tma(Fp8Mode.MX, cfg, 256, cpu)
    assert expert_gemm._mx_scales_tma(Fp8Mode.MX, replace(cfg, block_n=256, block_k=256), 256, cpu)
    for mode in (Fp8Mode.NONE, Fp8Mode.BLOCKWISE, Fp8Mode.ROWWISE):
        assert not expert_gemm._mx_scales_tma(mode, cfg, 256, cpu)
    for partial in (dict(block_m=64), dict(block_n=64), dict(block_k=64)):  # a tile of part of a chunk
        assert not expert_gemm._mx_scales_tma(Fp8Mode.MX, replace(cfg, **partial), 256, cpu)
    assert not expert_gemm._mx_scales_tma(Fp8Mode.MX, cfg, 0, cpu)  # K = 0: no scale groups
    monkeypatch.setattr(expert_gemm, "TMA_SCALES", False)
    assert not expert_gemm._mx_scales_tma(Fp8Mode.MX, cfg, 256, cpu)


def test_mx_tile_scales_layout():
    # A's scales per M tile (SA_TMA): tile m holds its rows start .. start + 128 of _gemm_tile's formula, 127 past
    # its expert's end and in the tiles zeroing the rows past offsets[E]; G = 3 groups (a padded chunk); an expert
    # without rows (1) and one of two tiles (2); the scales a transposed view
    offsets = torch.tensor([0, 5, 5, 200], dtype=torch.int32)
    schedule = Schedule.build(offsets, 200, 128)
    s = torch.randint(0, 256, (3, 200), dtype=torch.uint8).t()
    chunks = expert_gemm._mx_tile_scales(s, schedule)
    assert chunks.shape == (schedule.max_m_tiles, 1, 1, 2, 256)
    flat = chunks.reshape(schedule.max_m_tiles, 512)
    starts = {0: (0, 5), 1: (5, 200), 2: (133, 200)}  # tile: (first row, the expert's end)
    for m in range(schedule.max_m_tiles):
        first, end = starts.get(m, (0, 0))  # the rest: zeroing tiles
        for r in range(128):
            for g in range(4):
                i, j = r // 32, r % 32
                want = s[first + r, g].item() if first + r < end and g < 3 else 127
                assert flat[m, 16 * j + 4 * i + g].item() == want, (m, r, g)


def _launch_tiles(
    use: str, T: int, k: int, E: int, K: int, N: int, kind: str, mode: Fp8Mode = Fp8Mode.MX, block_m: int = 128
) -> tuple[torch.Tensor, ...]:
    """One FP8 ``gemm`` of ``use`` (``mode``'s recipe) on fresh random operands (seeded by the caller) with M tiles
    of ``block_m`` rows, poisoned outputs checked against the float64 reference of the quantized math; returns the
    outputs (bf16)."""
    rcp = mode.recipe()
    plan = _plan(T, k, E, kind)
    R = plan.num_assignments
    schedule = Schedule.build(plan.offsets, R, block_m)
    gathered = use in ("plain-gathered", "forward", "forward-aq", "forward-glu", "forward-glu-aq", "backward-glu")
    a_q, a_s, a64 = quantized(torch.randn(T if gathered else R, K), rcp.act_block(), mode)
    w_q, w_s, w64 = weight(E, K, N, mode, True)  # the FP8 MLP's K-major weights (wᵀ views of [E, N, K] storage)
    inputs = [t.clone() for t in (a_q.view(torch.uint8), a_s, w_q.view(torch.uint8), w_s)]
    a, row_src = Rows.dense(a_q, gathered=gathered), plan.row_token if gathered else None
    out = _poisoned(R, N, torch.bfloat16)
    ref, bound = reference(plan, a64, w64, gathered)
    outs: tuple[torch.Tensor, ...] = (out,)
    if use in ("plain", "plain-gathered"):
        expert_gemm.gemm(a, w_q, Rows.dense(out), schedule, row_src=row_src, scales=GemmScales(mode, a_s, w_s))
    elif use in ("forward", "forward-aq"):  # the up-projection without GLU: h and a = act(h)
        act_out = _poisoned(R, N, torch.bfloat16)
        expert_gemm.gemm(a, w_q, Rows.dense(out), schedule, row_src=row_src, act_out=act_out, activation="silu",
                         scales=GemmScales(mode, a_s, w_s))  # fmt: skip
        assert_derived(act_out, torch.nn.functional.silu(ref.bfloat16().double()), "a")
        outs += (act_out,)
        if use == "forward-aq":  # a quantized in the epilogue: bit for bit kernels.quantize of the a written above
            h = out.clone()
            out = _poisoned(R, N, torch.bfloat16)
            aq = torch.full((R, N), 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn)  # poisoned: E4M3 NaN
            act_scales = torch.full((R, -(-N // rcp.group)), 255, dtype=torch.uint8)  # E8M0 NaN
            expert_gemm.gemm(a, w_q, Rows.dense(out), schedule, row_src=row_src, act_out=aq, act_scales=act_scales,
                             activation="silu", scales=GemmScales(mode, a_s, w_s))  # fmt: skip
            assert torch.equal(out.view(torch.int16), h.view(torch.int16)), "h"
            separate_q, separate_s = quantize_kernels.quantize(act_out, rcp.act_block(), rcp.scale_dtype)
            assert torch.equal(aq.view(torch.uint8), separate_q.view(torch.uint8)), "a's E4M3 bits"
            assert torch.equal(act_scales, separate_s), "a's scales"
            outs += (aq.view(torch.uint8), act_scales)
    elif use in ("forward-glu", "forward-glu-aq"):  # the gate's scales: sw2; -aq: a quantized in the epilogue
        g_q, g_s, g64 = weight(E, K, N, mode, True)
        gate_out, act_out, act_scales = _poisoned(R, N, torch.bfloat16), _poisoned(R, N, torch.bfloat16), None
        if use == "forward-glu-aq":  # poisoned: E4M3 NaN bits 0x7F, E8M0 NaN 255
            act_out = torch.full((R, N), 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn)
            act_scales = torch.full((R, -(-N // rcp.group)), 255, dtype=torch.uint8)
        expert_gemm.gemm(
            a, w_q, Rows.dense(out), schedule, row_src=row_src, gate=g_q, gate_out=gate_out, act_out=act_out,
            act_scales=act_scales, activation="silu", scales=GemmScales(mode, a_s, w_s, g_s),
        )  # fmt: skip
        g_ref = reference(plan, a64, g64, gathered)
        assert_accumulated(gate_out, *g_ref, "g")
        if act_scales is None:
            assert_derived(act_out, torch.nn.functional.silu(ref) * g_ref[0], "a")
        else:
            assert not (act_scales == 255).any(), "a scale left unwritten (poison) or NaN"
        outs += (gate_out, act_out) if act_scales is None else (gate_out, act_out.view(torch.uint8), act_scales)
    elif use == "backward-glu":  # G = ref: dh = w·G·g·act'(h), dg = w·G·act(h), aw = w·a, Σ G·a
        h, g = torch.randn(R, N).bfloat16(), torch.randn(R, N).bfloat16()
        weights = torch.rand(T * k)
        dg, aw = _poisoned(R, N, torch.bfloat16), _poisoned(R, N, torch.bfloat16)
        dots = expert_gemm.gemm(
            a, w_q, Rows.dense(out), schedule, row_src=row_src, gate_out=dg, act_out=aw, activation="silu",
            backward=BackwardEpilogue(h, g, plan.row_assignment, weights), scales=GemmScales(mode, a_s, w_s),
        )  # fmt: skip
        h64, g64, wr = h.double(), g.double(), weights.double()[plan.row_assignment.long()][:, None]
        act = get_activation("silu")(h64)
        assert_derived(out, act_backward(ref * wr * g64, h64, "silu"), "dh")
        assert_derived(dg, ref * wr * act, "dg")
        assert_derived(aw, act * g64 * wr, "aw")
        assert_derived(dots.sum(0), (ref * act * g64).sum(1), "dots")
        outs += (dg, aw, dots)
    else:  # pair: the second weight's scales: sw2 (the second mainloop's W)
        a2_q, a2_s, a2_64 = quantized(torch.randn(R, K), rcp.act_block(), mode)
        w2_q, w2_s, w2_64 = weight(E, K, N, mode, True)
        scales = GemmScales(mode, a_s, w_s, w2_s, a2_s)
        expert_gemm.gemm(a, w_q, Rows.dense(out), schedule, pair=(Rows.dense(a2_q), w2_q), scales=scales)
        ref2, bound2 = reference(plan, a2_64, w2_64, False)
        ref, bound = ref + ref2, bound + bound2
    if use != "backward-glu":  # (the backward epilogue's out is dh: checked above)
        assert_accumulated(out, ref, bound, "out")
    for before, after in zip(inputs, (a_q.view(torch.uint8), a_s, w_q.view(torch.uint8), w_s)):
        assert torch.equal(before, after)  # inputs are never modified
    return outs


MX_TMA_CASES = {
    # name: (use, T, k, E, K, N, routing); "plain" and "pair" read a dense A: its scales through TMA too (SA_TMA)
    # experts 1 and 3 without rows; K = 208: 7 groups (the last partial, the second chunk of groups padded), two K
    # steps; N = 136: a second, partial chunk of 128 columns
    "plain-empty-experts": ("plain", 13, 2, 4, 208, 136, "skip"),
    "dense-one-expert": ("plain", 70, 2, 3, 80, 40, "one-hot"),  # dense rows all on one expert: two M tiles
    "dense-one-row": ("plain", 1, 1, 1, 80, 40, "uniform"),  # one dense row, E = 1
    "glu-forward": ("forward-glu", 13, 2, 4, 208, 136, "skip"),  # the gate's scales (sw2) too
    "glu-backward": ("backward-glu", 13, 2, 4, 208, 136, "skip"),  # the backward epilogue
    "pair": ("pair", 13, 2, 4, 208, 136, "skip"),  # the pair's second weight reads sw2 in its own K loop
    "one-row": ("plain-gathered", 1, 1, 1, 80, 40, "uniform"),  # one row, E = 1; K = 80: one partial K step
    "one-expert": ("plain-gathered", 70, 2, 3, 80, 40, "one-hot"),  # all rows on one expert: two M tiles
    "k=E": ("plain-gathered", 5, 3, 3, 32, 24, "uniform"),  # k = E: every token on every expert
    "empty": ("plain-gathered", 0, 2, 3, 80, 40, "uniform"),  # no rows: nothing to launch
}


@pytest.mark.parametrize("case", list(MX_TMA_CASES))
def test_mx_scales_tma(case, monkeypatch):
    # SW_TMA / SA_TMA (sm_100's path, forced here with its 128 x 128 x 128 tiles): the weights' (and a dense A's)
    # scales through 5-D descriptors over tcgen05's chunks give the pointer loads' results bit for bit, and the
    # reference's
    use, *shape = MX_TMA_CASES[case]
    config = expert_gemm.gemm_config
    monkeypatch.setattr(expert_gemm, "gemm_config", lambda *a, **kw: replace(config(*a, **kw), block_n=128,
                                                                             block_k=128))  # fmt: skip
    monkeypatch.setattr(expert_gemm, "_scale_tma_device", lambda device: True)
    results = {}
    for tma in (False, True):
        monkeypatch.setattr(expert_gemm, "TMA_SCALES", tma)
        kernel = Recorded(expert_gemm.gemm_kernel)
        monkeypatch.setattr(expert_gemm, "gemm_kernel", kernel)
        torch.manual_seed(17)
        results[tma] = _launch_tiles(use, *shape)
        dense = use in ("plain", "pair")
        assert [(c["SW_TMA"], c["SA_TMA"]) for c in kernel.calls] == ([] if case == "empty" else [(tma, tma and dense)])
    for pointers, tma in zip(results[False], results[True]):
        assert torch.equal(pointers.view(torch.uint8 if pointers.dtype != torch.float32 else torch.int32),
                           tma.view(torch.uint8 if tma.dtype != torch.float32 else torch.int32))  # fmt: skip


GLU_128_CASES = {
    # name: (T, k, E, K, N, routing), gathered rows; 128-row M tiles; K, N 16-byte aligned (sm_100's configs serve
    # aligned operands)
    # experts 1 and 3 without rows; K = 208: 7 MX groups (the last partial), several K steps (a partial last one);
    # N = 144: a full and a partial 128-column tile (its first 32-column slice cut by N, a partial MX group of a; the
    # other three wholly past N)
    "empty-experts,partial-n": (13, 2, 4, 208, 144, "skip"),
    "one-row,E=1": (1, 1, 1, 80, 48, "uniform"),  # one row, E = 1; a partial K step, one partial N tile
    "one-expert,odd": (67, 2, 3, 80, 176, "one-hot"),  # all rows on one expert: 134 rows, a second M tile of 6
}


@pytest.mark.parametrize(
    "mode, quant_a", [(Fp8Mode.MX, False), (Fp8Mode.MX, True), (Fp8Mode.ROWWISE, False)], ids=["mx", "mx-aq", "rowwise"]
)
@pytest.mark.parametrize("case", list(GLU_128_CASES))
def test_glu_forward_sm100_tiles(case, mode, quant_a, monkeypatch):
    # sm_100's MX / rowwise GLU forward forced under the interpreter (gemm_config's choice for capability 100:
    # 128 x 128 tiles of two accumulators, the epilogue in 32-column slices; MX: the weights' scales by TMA;
    # rowwise: K steps of 64, each slice scaled by its rows' and columns' scales): h, g vs the float64 reference of
    # the quantized math, a vs float64, and h, g, a (mx-aq: a's E4M3 bits and scales, quantized in the epilogue) bit
    # for bit those of the interpreter's 32-wide tiles (MX scales by pointers); every output poisoned
    T, k, E, K, N, kind = GLU_128_CASES[case]
    use = "forward-glu-aq" if quant_a else "forward-glu"
    sm100_config = gpu_gemm_config(100)

    results = {}
    for sm100 in (False, True):
        with monkeypatch.context() as m:
            if sm100:
                m.setattr(expert_gemm, "gemm_config", sm100_config)
                m.setattr(expert_gemm, "_scale_tma_device", lambda device: True)
            kernel = Recorded(expert_gemm.gemm_kernel)
            m.setattr(expert_gemm, "gemm_kernel", kernel)
            torch.manual_seed(23)
            results[sm100] = _launch_tiles(use, T, k, E, K, N, kind, mode)
        call = kernel.calls[-1]
        tiles = (call["BLOCK_N"], call["BLOCK_K"], call["EPI_N"], call["SW_TMA"], call["num_warps"])
        wide = (128, 128 if mode == Fp8Mode.MX else 64, 32, mode == Fp8Mode.MX, 4)
        assert tiles == (wide if sm100 else (32, 32, 8, False, 4)), tiles
    for name, narrow, wide in zip(("h", "g", "a"), results[False], results[True]):
        assert torch.equal(narrow.view(torch.uint8), wide.view(torch.uint8)), name
    if quant_a:
        assert torch.equal(results[False][3], results[True][3]), "a's scales"


def _rows_tma_against_pointers(monkeypatch, seed: int, *launch) -> tuple[dict, dict]:
    """``_launch_tiles(*launch)`` (fresh operands from ``seed``) with the A rows through TMA (``TMA_ROWS``) and by
    pointer loads: the outputs bit for bit equal; returns the two launches' ``gemm_kernel`` arguments (TMA first)."""
    results, calls = {}, {}
    for tma in (True, False):
        monkeypatch.setattr(expert_gemm, "TMA_ROWS", tma)
        kernel = Recorded(expert_gemm.gemm_kernel)
        monkeypatch.setattr(expert_gemm, "gemm_kernel", kernel)
        torch.manual_seed(seed)
        results[tma] = _launch_tiles(*launch)
        calls[tma] = kernel.calls[-1]
    for i, (tma, pointers) in enumerate(zip(results[True], results[False])):
        assert torch.equal(tma.view(torch.uint8), pointers.view(torch.uint8)), i
    return calls[True], calls[False]


DENSE_TMA_CASES = {
    # name: (T, k, E, K, N, routing, block_m); K and N 16-byte aligned (A's rows through TMA)
    # M tiles of 16 rows over experts of ~6 rows: each tile's rows run into the next experts' (loaded, never stored)
    "tiles-past-each-expert": (13, 2, 4, 208, 48, "uniform", 16),
    "empty-experts": (13, 2, 4, 80, 48, "skip", 16),  # experts 1 and 3 without rows
    # all 134 rows on one expert, 128-row tiles: the second tile's 6 rows, then TMA's zeros past A's last row
    "one-expert,past-the-last-row": (67, 2, 3, 80, 176, "one-hot", 128),
}


@pytest.mark.parametrize("use", ["plain", "pair"])
@pytest.mark.parametrize("mode", [Fp8Mode.BLOCKWISE, Fp8Mode.MX, Fp8Mode.ROWWISE])
@pytest.mark.parametrize("case", list(DENSE_TMA_CASES))
def test_dense_rows_through_tma(case, mode, use, monkeypatch):
    # an FP8 A of dense rows (the down GEMM's a, the pair's dh and dg) loaded by TMA from each M tile's first row
    # (expert_gemm._dense_a_tma): poisoned outputs against the float64 reference of the quantized math
    # (_launch_tiles), and bit for bit the pointer loads' (TMA_ROWS off), which mask the rows past the expert's end
    T, k, E, K, N, kind, block_m = DENSE_TMA_CASES[case]
    tma, pointers = _rows_tma_against_pointers(monkeypatch, 31, use, T, k, E, K, N, kind, mode, block_m)
    assert (tma["A_TMA"], pointers["A_TMA"]) == (WeightLoad.TMA, WeightLoad.POINTERS)


GATHER4_CASES = {
    # name: (T, k, E, K, N, routing, block_m); K and N 16-byte aligned, sm_100's configs (K steps of 128 or 256)
    "tiles-past-each-expert,partial-k": (13, 2, 4, 208, 64, "uniform", 64),  # K = 208: the last K step partial
    "one-expert,odd": (67, 2, 3, 144, 128, "one-hot", 128),  # all 134 rows on one expert: a second M tile of 6
}


@pytest.mark.parametrize("use", ["forward-glu", "forward", "backward-glu"])
@pytest.mark.parametrize("mode", [Fp8Mode.BLOCKWISE, Fp8Mode.MX, Fp8Mode.ROWWISE])
@pytest.mark.parametrize("case", list(GATHER4_CASES))
def test_gathered_rows_through_tma_gather(case, mode, use, monkeypatch):
    # sm_100's gathered E4M3 rows (x, dout) by TMA's row gather (GATHER4, K steps of 128 or more) in its configs,
    # forced under the interpreter: poisoned outputs against the float64 reference of the quantized math
    # (_launch_tiles), and bit for bit the pointer loads' (TMA_ROWS off)
    T, k, E, K, N, kind, block_m = GATHER4_CASES[case]
    monkeypatch.setattr(expert_gemm, "gemm_config", gpu_gemm_config(100))
    monkeypatch.setattr(expert_gemm, "_gather4_device", lambda device: True)
    use = "forward-glu-aq" if mode == Fp8Mode.MX and use == "forward-glu" else use  # (mxfp8 quantizes a there)
    tma, pointers = _rows_tma_against_pointers(monkeypatch, 37, use, T, k, E, K, N, kind, mode, block_m)
    # (sm_100's 128-row rowwise GLU forward: K steps of 64, its rows by cp.async: the row gather cost more there)
    gather4 = tma["BLOCK_K"] >= 128
    assert gather4 or (mode == Fp8Mode.ROWWISE and use == "forward-glu" and block_m == 128), tma["BLOCK_K"]
    assert tma["A_TMA"] == (WeightLoad.GATHER4 if gather4 else WeightLoad.POINTERS)
    assert pointers["A_TMA"] == WeightLoad.POINTERS


ROWWISE_128_CASES = {
    # name: (use, T, k, E, K, N, routing); 128-row M tiles; K and N 16-byte aligned (the fast configs) unless named
    # experts 1 and 3 without rows; K = 208: two K steps, the last partial; N = 144: a full and a partial 128-column
    # tile (its first 16-column slice cut by N, the other seven wholly past N)
    "down,empty-experts,partial-n": ("plain", 13, 2, 4, 208, 144, "skip"),
    "down,one-row,E=1": ("plain-gathered", 1, 1, 1, 80, 48, "uniform"),  # one row, E = 1; one partial K step
    "down,one-expert,odd": ("plain-gathered", 67, 2, 3, 80, 176, "one-hot"),  # all rows on one expert: 134 rows
    "down,unaligned,odd": ("plain-gathered", 7, 2, 3, 72, 40, "uniform"),  # N = 40: the 32 x 32 fallback's slices
    "up,empty-experts,partial-n": ("forward", 13, 2, 4, 208, 144, "skip"),  # the up-projection without GLU
    "backward,empty-experts,partial-n": ("backward-glu", 13, 2, 4, 208, 144, "skip"),  # G's slices in 8 columns
    "pair,empty-experts,partial-n": ("pair", 13, 2, 4, 208, 144, "skip"),  # two products, each with its scales
    "pair,one-expert,odd": ("pair", 67, 2, 3, 80, 176, "one-hot"),  # all rows on one expert: a second M tile of 6
}


# (BLOCK_N, EPI_N, the backward's EPI_N, warps) of gemm_config's rowwise 128-row tiles: aligned per capability,
# and the unaligned fallback's; sm_90's pair 64 columns wide (its two accumulators: 2 CTAs per SM)
ROWWISE_TILES = {90: (128, 16, 8, 8), 100: (128, 16, 16, 4), "unaligned": (32, 16, 8, 8), "pair90": (64, 16, 8, 8)}


@pytest.mark.parametrize("capability", [90, 100])
@pytest.mark.parametrize("case", list(ROWWISE_128_CASES))
def test_rowwise_gpu_tiles(case, capability, monkeypatch):
    # sm_90's (and sm_100's) rowwise configs forced under the interpreter (gemm_config's choice for the capability:
    # 128 x 128 x 128 tiles on 8 warps, sm_100's on 4, the accumulators scaled column slice by column slice in the
    # epilogue, EPI_N 16; sm_90's backward epilogue 8): every output poisoned and checked against the float64
    # reference of the quantized math
    # (_launch_tiles), and bit for bit that of the same tiles scaled whole after the loop (EPI_N = BLOCK_N: the math
    # of scaling the accumulator at once, the old path), but for the backward's fp32 dots: Σ G·a summed slice by
    # slice, in another order (to fp32 rounding)
    use, T, k, E, K, N, kind = ROWWISE_128_CASES[case]
    config = expert_gemm.gemm_config

    def gpu_config(*args, whole=False, **kwargs):
        with pytest.MonkeyPatch.context() as gpu:
            gpu.setattr(expert_gemm, "interpreting", lambda: False)
            cfg = config(*args, **{**kwargs, "capability": capability})
        return replace(cfg, epilogue_n=None) if whole else cfg

    pair90 = use == "pair" and capability == 90 and "unaligned" not in case
    block_n, epi_n, backward_epi_n, warps = ROWWISE_TILES[
        "unaligned" if "unaligned" in case else "pair90" if pair90 else capability
    ]
    epi_n = backward_epi_n if use == "backward-glu" else epi_n
    results = {}
    for whole in (False, True):
        with monkeypatch.context() as m:
            m.setattr(expert_gemm, "gemm_config", lambda *a, whole=whole, **kw: gpu_config(*a, whole=whole, **kw))
            kernel = Recorded(expert_gemm.gemm_kernel)
            m.setattr(expert_gemm, "gemm_kernel", kernel)
            torch.manual_seed(29)
            results[whole] = _launch_tiles(use, T, k, E, K, N, kind, Fp8Mode.ROWWISE)
        call = kernel.calls[-1]
        tiles = (call["BLOCK_N"], call["EPI_N"], call["num_warps"])
        assert tiles == (block_n, block_n if whole else epi_n, warps), tiles
        # sm_90's pair: 256-deep K steps in 2 stages, its dense rows (dh, dg) through TMA as every aligned dense A
        steps = (256, 2) if pair90 else (128, 3) if "unaligned" not in case else (32, 3)
        assert (call["BLOCK_K"], call["num_stages"]) == steps, (call["BLOCK_K"], call["num_stages"])
        dense = use in ("plain", "pair") and "unaligned" not in case
        assert call["A_TMA"] == int(WeightLoad.TMA if dense else WeightLoad.POINTERS), call["A_TMA"]
    if use == "backward-glu":
        dots, whole_dots = results[False][-1], results[True][-1]
        torch.testing.assert_close(dots, whole_dots, rtol=1e-6, atol=1e-6 * whole_dots.abs().max().item())
        results = {whole: outs[:-1] for whole, outs in results.items()}
    for i, (sliced, whole) in enumerate(zip(results[False], results[True])):
        assert torch.equal(sliced.view(torch.int16 if sliced.dtype == torch.bfloat16 else torch.int32),
                           whole.view(torch.int16 if whole.dtype == torch.bfloat16 else torch.int32)), i  # fmt: skip


@pytest.mark.parametrize("block_m", [64, 128])
@pytest.mark.parametrize("fp8_name", ["blockwise", "mxfp8", "rowwise"])
def test_fp8_mlp_launches_what_sm100_builds(fp8_name, block_m, monkeypatch):
    # the FP8 MLP (backends.triton_fp8, forward and backward, GLU) as gemm launches it on sm_100 (its configs, warp
    # specialization, TMA's row gather and MX scale chunks forced under the interpreter): every gemm_kernel launch is
    # an sm_100 build of the audit (bench.audit's specs) with the same tile, stages, warp specialization, row loads
    # (A_TMA) and scale loads, so that the compile evidence is the launched code's
    from bench.audit import jobs as audit_jobs
    from blocksparse_moe import functional
    from blocksparse_moe.backends import triton as triton_backend
    from blocksparse_moe.kernels import specs

    built = [s for s in audit_jobs._gpu_specs(specs) if s.kernel is expert_gemm.gemm_kernel and s.fp8]
    monkeypatch.setattr(expert_gemm, "gemm_config", gpu_gemm_config(100))
    for device_check in ("_warp_specialize", "_gather4_device", "_scale_tma_device"):
        monkeypatch.setattr(expert_gemm, device_check, lambda device: True)
    monkeypatch.setattr(triton_backend, "_grouped_block_m", lambda rows, num_experts, fp8=False: block_m)
    kernel = Recorded(expert_gemm.gemm_kernel)
    monkeypatch.setattr(expert_gemm, "gemm_kernel", kernel)
    T, d, f, E, k = 6, 128, 128, 2, 2
    torch.manual_seed(11)
    x, idx, weights = torch.randn(T, d), routing(T, k, E, "uniform"), torch.rand(T, k)
    w1, w3, w2 = torch.randn(E, d, f) / d**0.5, torch.randn(E, d, f) / d**0.5, torch.randn(E, f, d) / f**0.5
    leaves = [t.clone().requires_grad_() for t in (x, w1, w2, w3)]
    out = functional.moe_mlp(leaves[0], idx, weights, leaves[1], leaves[2], leaves[3], activation="silu",
                             impl="grouped", backend="triton", fp8=fp8_name)  # fmt: skip
    out.backward(torch.randn(T, d))
    keys = ("FP8", "EPILOGUE", "GLU", "PAIR", "GATHER", "BLOCK_M", "BLOCK_N", "BLOCK_K", "EPI_N", "SWAP_AB",
            "WARP_SPEC", "A_TMA", "SW_TMA", "SA_TMA", "QUANT_A")  # fmt: skip
    assert len(kernel.calls) == 4  # up (GLU), down, the dgrad with its backward epilogue, the dx pair
    for call in kernel.calls:
        launched = tuple(int(call[key]) for key in keys) + (call["num_warps"], call["num_stages"])
        found = [s for s in built if 100 in (s.archs or (100,)) and "aligned" in s.variants and
                 tuple(int(s.constexprs[key]) for key in keys) + (s.num_warps, s.num_stages) == launched]  # fmt: skip
        assert found, str(dict(zip((*keys, "num_warps", "num_stages"), launched)))


def test_mx_scales_tma_in_the_fp8_mlp(monkeypatch):
    # the FP8 MLP (backends.triton_fp8, mxfp8) forward and backward with sm_100's scale loads forced (128-row tiles
    # of 128 x 128 x 128): the scales its GEMMs pass (the weights' transposed views in the backward, the epilogue-
    # quantized a, the dgrad pair's dh / dg) give the pointer path's output and gradients bit for bit; expert 1
    # without rows, d = 48 and f = 40 (partial K groups and chunks)
    from blocksparse_moe import functional
    from blocksparse_moe.backends import triton as triton_backend

    config = expert_gemm.gemm_config
    monkeypatch.setattr(expert_gemm, "gemm_config", lambda *a, **kw: replace(config(*a, **kw), block_n=128,
                                                                             block_k=128))  # fmt: skip
    monkeypatch.setattr(triton_backend, "_grouped_block_m", lambda rows, num_experts, fp8=False: 128)
    monkeypatch.setattr(expert_gemm, "_scale_tma_device", lambda device: True)
    T, d, f, E, k = 10, 48, 40, 3, 2
    torch.manual_seed(5)
    x = torch.randn(T, d)
    idx, weights = routing(T, k, E, "skip"), torch.rand(T, k)
    w1, w3, w2 = torch.randn(E, d, f) / d**0.5, torch.randn(E, d, f) / d**0.5, torch.randn(E, f, d) / f**0.5
    dout = torch.randn(T, d)
    results = {}
    for tma in (False, True):
        monkeypatch.setattr(expert_gemm, "TMA_SCALES", tma)
        kernel = Recorded(expert_gemm.gemm_kernel)
        monkeypatch.setattr(expert_gemm, "gemm_kernel", kernel)
        leaves = [t.clone().requires_grad_() for t in (x, weights, w1, w2, w3)]
        out = functional.moe_mlp(leaves[0], idx, leaves[1], leaves[2], leaves[3], leaves[4], activation="silu",
                                 impl="grouped", backend="triton", fp8="mxfp8")  # fmt: skip
        out.backward(dout)
        results[tma] = [out.detach(), *(t.grad for t in leaves)]
        # up (gathered x: W's scales only), down (dense a: both), down_bwd (gathered dout), the dgrad pair (both)
        assert [(c["SW_TMA"], c["SA_TMA"]) for c in kernel.calls] == [(tma, False), (tma, tma), (tma, False),
                                                                       (tma, tma)]  # fmt: skip
    for pointers, tma in zip(results[False], results[True]):
        assert not pointers.isnan().any() and torch.equal(pointers, tma)


# the FP8 M tiles of decode (backends.triton._grouped_block_m: at least FP8_MIN_BLOCK_M = 64 rows with fp8) and the
# up-projection without GLU (bench.audit's "up" / "up,aq" builds)
DECODE_USES = ["plain", "plain-gathered", "forward", "forward-glu", "backward-glu", "pair"]
DECODE_CASES = {
    # name: (T, k, E, K, N, routing); the GPU configs need 16-byte aligned K and N (else the 32 x 32 fallback)
    # decode: 5 tokens, k = 2 over E = 4 experts, experts 1 and 3 without rows: a few rows in one 64-row M tile per
    # expert; K = 144: two K steps (the last partial; MX off sm_100: three of 64), N = 144: a full and a partial
    # column tile
    "decode": (5, 2, 4, 144, 144, "skip"),
    "one-row,E=1": (1, 1, 1, 80, 48, "uniform"),  # one row, E = 1; one partial K step, one partial N tile
    "one-expert,odd": (67, 1, 3, 80, 48, "one-hot"),  # all rows on one expert: 67 rows, a second M tile of 3
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
@pytest.mark.parametrize("capability", [90, 100, 120])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name.lower())
def test_fp8_decode_tiles(mode, capability, case, monkeypatch):
    # gemm_config's 64-row FP8 tiles for each capability (what the FP8 MLP runs at decode), forced under the
    # interpreter: every use of the FP8 MLP (the up-projection without GLU; mxfp8's with a quantized in its epilogue,
    # bit for bit the separate quantize pass), each output poisoned and checked against the float64 reference of the
    # quantized math; sm_100's mxfp8 tiles but the GLU forward's are swapped (SWAP_AB)
    monkeypatch.setattr(expert_gemm, "gemm_config", gpu_gemm_config(capability))
    uses = [*DECODE_USES, "forward-aq"] if mode in expert_gemm.EPILOGUE_QUANT else DECODE_USES
    for use in uses if case == "decode" else ["forward-aq" if "forward-aq" in uses else "forward"]:
        kernel = Recorded(expert_gemm.gemm_kernel)
        monkeypatch.setattr(expert_gemm, "gemm_kernel", kernel)
        torch.manual_seed(31)
        _launch_tiles(use, *DECODE_CASES[case], mode, block_m=64)
        swap = mode == Fp8Mode.MX and capability == 100 and use != "forward-glu"
        assert all(c["BLOCK_M"] == 64 and c["SWAP_AB"] == swap and c["BLOCK_N"] > 32 for c in kernel.calls), use
