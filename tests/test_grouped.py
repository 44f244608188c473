"""grouped_mm (with and without the fused gather) and grouped_mm_wgrad: kernels (interpreter) and the torch backend
vs float64 per-row references; gradients through the custom ops; strided weights; errors; torch.compile of
gather → grouped_mm → scatter."""

from __future__ import annotations

import pytest
import torch
import triton
from helpers import TOL, Recorded, assert_close, assert_close_to_reference, gpu_gemm_config, poison_, routing

from blocksparse_moe import backends
from blocksparse_moe.activations import ACTIVATIONS
from blocksparse_moe.kernels import expert_gemm
from blocksparse_moe.kernels.layouts import Rows, Schedule
from blocksparse_moe.ops import _checks
from blocksparse_moe.ops.grouped import grouped_mm, row_sources
from blocksparse_moe.ops.permute import gather_rows, scatter_rows
from blocksparse_moe.routing import RoutingPlan, plan_routing

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["triton", "torch"]


class kernels:  # noqa: N801 - the backend functions behind the ops, validated as the ops do, writing into ``out``
    @staticmethod
    def grouped_mm(x, w, offsets, row_assignment=None, assignment_row=None, *, backend="triton", out=None):
        _checks.grouped_mm_shape(x, w, offsets, row_assignment, assignment_row, out)
        row_src = None if row_assignment is None else row_sources(row_assignment, assignment_row.shape[1])
        return backends.get(backend).grouped_mm(x, w, offsets, row_src, out=out)

    @staticmethod
    def grouped_mm_wgrad(x, dy, offsets, row_assignment=None, k=1, *, backend="triton", out=None):
        _checks.grouped_mm_wgrad_shape(x, dy, offsets, row_assignment, k, out)
        row_src = None if row_assignment is None else row_sources(row_assignment, k)
        return backends.get(backend).grouped_mm_wgrad(x, dy, offsets, row_src, out=out)


CASES = {
    # name: (T, k, E, K, N, routing)
    "empty-experts": (13, 2, 5, 19, 23, "skip"),  # experts with no rows (dw = 0); odd K and N
    "one-token": (1, 1, 1, 5, 3, "uniform"),  # one token, E = 1, k = 1, everything smaller than a tile
    "k=E": (9, 3, 3, 17, 21, "uniform"),  # k = E: every token on every expert
    "one-expert": (20, 2, 4, 18, 33, "one-hot"),  # all 40 rows on one expert: several M tiles, others empty
    "duplicates": (8, 3, 4, 16, 16, "duplicates"),  # a token choosing the same expert twice
    "invalid": (11, 2, 4, 9, 13, "invalid"),  # ids -1 and E with check=False: rows >= offsets[E] are zero
    "empty": (0, 2, 3, 9, 11, "uniform"),  # no tokens: empty output, dw = 0
}


def _case(case: str) -> tuple[RoutingPlan, int, int]:
    T, k, E, K, N, kind = CASES[case]
    return plan_routing(routing(T, k, E, kind), E, block_size=1, check=False), K, N


def _sources(plan: RoutingPlan, gather: bool) -> list[tuple[int, int, int]]:
    """(sorted row, source row of x, expert) for every row an expert owns."""
    offsets, k = plan.offsets.tolist(), plan.top_k
    ra = plan.row_assignment.tolist()
    return [
        (i, ra[i] // k if gather else i, e) for e in range(plan.num_experts) for i in range(offsets[e], offsets[e + 1])
    ]


def ref_grouped_mm(x, w, plan, gather):
    """float64 ``[R, N]`` one row at a time (rows no expert owns stay zero); differentiable in x and w."""
    R = plan.num_assignments
    rows = [torch.zeros(w.shape[2], dtype=torch.float64)] * R
    for i, src, e in _sources(plan, gather):
        rows[i] = x.double()[src] @ w.double()[e]
    return torch.stack(rows) if rows else (x.double()[:0] @ w.double().sum(0))


def ref_wgrad(x, dy, plan, gather):
    """float64 ``[E, K, N]``: Σ over each expert's rows of the outer products."""
    dw = torch.zeros(plan.num_experts, x.shape[1], dy.shape[1], dtype=torch.float64)
    for i, src, e in _sources(plan, gather):
        dw[e] += torch.outer(x.double()[src], dy.double()[i])
    return dw


def _operands(plan, K, N, gather, dtype):
    T, R = plan.num_tokens, plan.num_assignments
    x = torch.randn(T if gather else R, K).to(dtype)
    w = torch.randn(plan.num_experts, K, N).to(dtype) / K**0.5
    maps = (plan.row_assignment, plan.assignment_row) if gather else (None, None)
    return x, w, maps


# ----------------------------------------------------------------------------------------------- kernels


# the torch backend runs a CPU-eager expert loop, and on GPU / under torch.compile a sync-free tile schedule
@pytest.mark.parametrize(
    "backend, host_loop", [("triton", True), ("torch", True), ("torch", False)], ids=["triton", "torch", "torch-tiles"]
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gather", [True, False], ids=["gather", "sorted"])
@pytest.mark.parametrize("case", list(CASES))
def test_grouped_mm_and_wgrad(case, gather, dtype, backend, host_loop, monkeypatch):
    monkeypatch.setattr(backends.get("torch"), "host_loop_ok", lambda x: host_loop and x.device.type == "cpu")
    plan, K, N = _case(case)
    x, w, maps = _operands(plan, K, N, gather, dtype)
    inputs = [x.clone(), w.clone(), plan.offsets.clone()]
    R = plan.num_assignments

    out = poison_(torch.empty(R, N, dtype=dtype))
    assert kernels.grouped_mm(x, w, plan.offsets, *maps, backend=backend, out=out) is out
    assert not out.isnan().any()
    same = kernels.grouped_mm(x, w, plan.offsets, *maps, backend="torch") if backend == "triton" else None  # TOL
    assert_close_to_reference(out, ref_grouped_mm(x, w, plan, gather), same)

    dy = torch.randn(R, N).to(dtype)
    dw = poison_(torch.empty(plan.num_experts, K, N, dtype=dtype))
    kernels.grouped_mm_wgrad(x, dy, plan.offsets, maps[0], plan.top_k, backend=backend, out=dw)
    assert not dw.isnan().any()
    if backend == "triton":  # judged against the torch backend's error in the same dtype
        same = kernels.grouped_mm_wgrad(x, dy, plan.offsets, maps[0], plan.top_k, backend="torch")
        assert_close_to_reference(dw, ref_wgrad(x, dy, plan, gather), same)
    else:  # the torch backend itself: the TOL table, K-scaled for the sum over each expert's rows
        tol = TOL[dtype]
        torch.testing.assert_close(dw.double(), ref_wgrad(x, dy, plan, gather), atol=tol["atol"] * 4, rtol=tol["rtol"])
    empty = plan.tokens_per_expert == 0
    assert torch.equal(dw[empty], torch.zeros_like(dw[empty]))  # experts with no rows: exactly zero

    for before, after in zip(inputs, (x, w, plan.offsets)):  # inputs never modified
        assert torch.equal(before, after)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_weights(backend):
    # w given as a transpose view of [E, N, K] storage (as wᵀ in the backward), x as a column slice
    plan, K, N = _case("empty-experts")
    x = torch.randn(plan.num_tokens, K + 6)[:, 3 : 3 + K]
    w = torch.randn(plan.num_experts, N, K).transpose(1, 2)
    out = kernels.grouped_mm(x, w, plan.offsets, plan.row_assignment, plan.assignment_row, backend=backend)
    ra, ar = plan.row_assignment, plan.assignment_row
    same = kernels.grouped_mm(x, w, plan.offsets, ra, ar, backend="torch") if backend == "triton" else None  # TOL
    assert_close_to_reference(out, ref_grouped_mm(x, w, plan, True), same)


def test_many_experts_tile_search():
    # E = 37 (binary search over 38 tile offsets), one M tile each or none, plus invalid rows at the end
    E = 37
    idx = torch.randint(0, E + 3, (23, 2))  # ids >= E are invalid
    plan = plan_routing(idx, E, block_size=1, check=False)
    x, w = torch.randn(23, 8), torch.randn(E, 8, 5)
    out = poison_(torch.empty(46, 5))
    kernels.grouped_mm(x, w, plan.offsets, plan.row_assignment, plan.assignment_row, backend="triton", out=out)
    same = kernels.grouped_mm(x, w, plan.offsets, plan.row_assignment, plan.assignment_row, backend="torch")
    assert_close_to_reference(out, ref_grouped_mm(x, w, plan, True), same)


def _tile_expert_reference(offsets: list[int], rows: int, block_m: int, padded: bool) -> list[int]:
    """The expert of every M tile of the bound, one expert at a time; E for the tiles past the experts' tiles."""
    E = len(offsets) - 1
    experts = [e for e in range(E) for _ in range((offsets[e + 1] - offsets[e] + block_m - 1) // block_m)]
    bound = Schedule.max_tiles(rows, E, block_m, padded)
    return (experts + [E] * bound)[:bound]


@pytest.mark.parametrize(
    "counts, block_m, padded",
    [
        ([5, 0, 0, 17, 1], 4, False),  # empty experts between full ones, odd counts, a one-row expert
        ([0, 9, 0], 4, False),  # empty first and last experts
        ([7], 16, False),  # E = 1, fewer rows than one tile
        ([0, 0, 0], 4, False),  # no rows at all: every tile zeroes
        ([8, 0, 16, 4], 4, True),  # block-padded offsets: tiles = offsets / block_m
    ],
)
def test_schedule_tile_expert_map(counts, block_m, padded):
    extra = 3  # rows past offsets[E] (invalid assignments, padding): zeroing tiles map to E
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    rows = int(offsets[-1]) + (0 if padded else extra)
    schedule = Schedule.build(offsets, rows, block_m, padded=padded)
    assert schedule.tile_expert.dtype == torch.int32 and schedule.tile_expert.shape == (schedule.max_m_tiles,)
    assert schedule.tile_expert.tolist() == _tile_expert_reference(offsets.tolist(), rows, block_m, padded)


@pytest.mark.parametrize("programs", [1, 2, 5])
@pytest.mark.parametrize(
    "T, k, E, K, N, kind",
    [
        (37, 2, 5, 19, 23, "skip"),  # empty experts, odd K and N; 7+ M tiles x 2 N tiles for 1, 2, 5 programs
        (29, 1, 1, 9, 40, "uniform"),  # E = 1: one expert's tiles, 3 N tiles
        (20, 2, 4, 18, 33, "one-hot"),  # all rows to one expert, the others empty
        (11, 2, 4, 9, 13, "invalid"),  # rows past offsets[E]: zeroing tiles in the loop
    ],
)
def test_persistent_tile_loop(T, k, E, K, N, kind, programs, monkeypatch):
    # the persistent gemm_kernel with fewer programs than tiles: every program loops over several tiles, each
    # tile reading its expert from the tile map; the result does not depend on the program count
    monkeypatch.setattr(expert_gemm, "INTERPRETER_PROGRAMS", programs)
    plan = plan_routing(routing(T, k, E, kind), E, block_size=1, check=False)
    x, w, maps = _operands(plan, K, N, True, torch.float32)
    schedule_tiles = Schedule.build(plan.offsets, plan.num_assignments, 16).max_m_tiles * triton.cdiv(N, 16)
    assert expert_gemm.persistent_programs(x.device, schedule_tiles, 2) == programs < schedule_tiles
    out = poison_(torch.empty(plan.num_assignments, N))
    kernels.grouped_mm(x, w, plan.offsets, *maps, backend="triton", out=out)
    same = kernels.grouped_mm(x, w, plan.offsets, *maps, backend="torch")
    assert_close_to_reference(out, ref_grouped_mm(x, w, plan, True), same)


def test_persistent_programs(monkeypatch):
    # interpreting: a few programs (never more than the tiles); meta tensors (bench.model): one per tile; on a GPU
    # the config's programs per SM (the CTAs per SM its build holds), from a host query of the device (no sync)
    assert expert_gemm.persistent_programs(torch.device("cpu"), 100, 2) == expert_gemm.INTERPRETER_PROGRAMS
    assert expert_gemm.persistent_programs(torch.device("cpu"), 2, 2) == 2
    monkeypatch.setattr(expert_gemm, "interpreting", lambda: False)
    assert expert_gemm.persistent_programs(torch.device("meta"), 100, 2) == 100
    monkeypatch.setattr(expert_gemm, "_sm_count", lambda index: 132 if index == 1 else 0)
    assert expert_gemm.persistent_programs(torch.device("cuda", 1), 10**6, 2) == 132 * 2
    assert expert_gemm.persistent_programs(torch.device("cuda", 1), 10**6, 1) == 132  # a 1-CTA/SM build
    assert expert_gemm.persistent_programs(torch.device("cuda", 1), 7, 2) == 7


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "counts",
    [
        [5, 0, 37, 1],  # K steps straddling expert ends (16-row steps), an empty expert, a one-row expert
        [23],  # E = 1
        [0, 48, 0],  # all rows to one expert, empty first and last experts
    ],
)
@pytest.mark.parametrize("use", ["a", "b,dual", "a,b"])  # the dense operand(s): aw (dW2), dh and dg (dW1, dW3), both
def test_wgrad_tma_dense_rows(use, counts, dtype, monkeypatch):
    # wgrad_kernel reading its dense row operands through descriptors built on the device over the expert's rows:
    # rows past an expert's end come back as zeros (the next expert's rows and, here NaN, the rows past offsets[E]
    # never reach a sum); the gathered operand stays on pointer loads; the same result as the pointer loads
    E, M, N, T, extra = len(counts), 32, 48, 19, 3
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    R = int(offsets[-1]) + extra
    row_src = torch.randint(0, T, (R,), dtype=torch.int32)
    row_src[R - extra :] = -1
    dense_a, dense_b = "a" in use.split(","), "b" in use.split(",")

    def operand(dense: bool, cols: int) -> tuple[Rows, torch.Tensor]:
        if not dense:  # token rows, gathered through row_src
            t = torch.randn(T, cols).to(dtype)
            return Rows.dense(t, gathered=True), t[row_src.clamp(min=0).long()] * (row_src >= 0)[:, None]
        t = torch.randn(R, cols).to(dtype)
        t[R - extra :] = float("nan")  # rows no expert owns
        return Rows.dense(t), torch.where((torch.arange(R) < R - extra)[:, None], t, 0)

    a, a_rows = operand(dense_a, M)
    b, b_rows = operand(dense_b, N)
    b2, b2_rows = operand(dense_b, N) if "dual" in use else (None, None)
    gather = None if dense_a and dense_b else row_src
    recorded = Recorded(expert_gemm.wgrad_kernel)
    monkeypatch.setattr(expert_gemm, "wgrad_kernel", recorded)
    results = {}
    for tma in (True, False):
        monkeypatch.setattr(expert_gemm, "TMA_ROWS", tma)
        out, out2 = poison_(torch.empty(E, M, N, dtype=dtype)), poison_(torch.empty(E, M, N, dtype=dtype))
        expert_gemm.wgrad(a, b, out, offsets, row_src=gather, b2=b2, out2=out2 if b2 is not None else None)
        results[tma] = (out, out2)
        assert (recorded.calls[-1]["A_TMA"], recorded.calls[-1]["B_TMA"]) == (tma and dense_a, tma and dense_b)
    for i, rows_b in enumerate((b_rows, b2_rows) if b2 is not None else (b_rows,)):
        ref = torch.stack(
            [a_rows[o0:o1].double().T @ rows_b[o0:o1].double() for o0, o1 in zip(offsets[:-1], offsets[1:])]
        )
        assert torch.equal(results[True][i], results[False][i])  # the TMA loads give the masked loads' tiles
        torch.testing.assert_close(results[True][i].double(), ref, atol=TOL[dtype]["atol"] * 4, rtol=TOL[dtype]["rtol"])


def _gathered_rows(counts, T: int, extra: int, spare_every: int):
    """Expert offsets of ``counts`` rows each, ``R`` = their sum + ``extra`` rows, and the rows' random tokens of
    ``T`` (``row_src``), with -1 for the ``extra`` rows past offsets[E] (rows no expert owns) and for every
    ``spare_every``-th row (spare rows inside the experts)."""
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    R = int(offsets[-1]) + extra
    row_src = torch.randint(0, T, (R,), dtype=torch.int32)
    row_src[R - extra :] = -1
    row_src[::spare_every] = -1
    return offsets, R, row_src


@pytest.mark.parametrize("glu", [False, True], ids=["plain", "glu-forward"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "counts",
    [
        [5, 0, 37, 1],  # an empty expert, a one-row expert, odd row counts (partial 16-row M tiles)
        [23],  # E = 1
        [0, 48, 0],  # all rows to one expert, empty first and last experts
    ],
)
def test_gemm_gather4_rows(counts, dtype, glu, monkeypatch):
    # gemm_kernel's gathered A through TMA's row gather (A_TMA GATHER4, sm_100's load, forced here): rows with
    # row_src = -1 (spare rows inside the experts, and the rows past offsets[E]) and rows past an expert's end read
    # zeros; the same tiles as the pointer loads, and the float64 reference (plain, and the GLU forward epilogue)
    E, K, N, T, extra = len(counts), 32, 48, 19, 3
    offsets, R, row_src = _gathered_rows(counts, T, extra, spare_every=7)
    x = torch.randn(T, K).to(dtype)
    w, gate = torch.randn(E, K, N).to(dtype), torch.randn(E, K, N).to(dtype)
    xs = torch.where((row_src >= 0)[:, None], x.double()[row_src.clamp(min=0).long()], 0)
    ref_h = torch.zeros(R, N, dtype=torch.float64)
    ref_g = torch.zeros(R, N, dtype=torch.float64)
    for e, (o0, o1) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        ref_h[o0:o1], ref_g[o0:o1] = xs[o0:o1] @ w[e].double(), xs[o0:o1] @ gate[e].double()
    schedule = Schedule.build(offsets, R, 16)
    recorded = Recorded(expert_gemm.gemm_kernel)
    monkeypatch.setattr(expert_gemm, "gemm_kernel", recorded)
    monkeypatch.setattr(expert_gemm, "_gather4_device", lambda device: True)
    results = {}
    for tma in (True, False):
        monkeypatch.setattr(expert_gemm, "TMA_ROWS", tma)
        outs = [poison_(torch.empty(R, N, dtype=dtype)) for _ in range(3)]  # h (or out), g, a
        x_in = x.clone()
        if glu:
            expert_gemm.gemm(Rows.dense(x_in, gathered=True), w, Rows.dense(outs[0]), schedule, row_src=row_src,
                             gate=gate, gate_out=outs[1], act_out=outs[2], activation="silu")  # fmt: skip
        else:
            expert_gemm.gemm(Rows.dense(x_in, gathered=True), w, Rows.dense(outs[0]), schedule, row_src=row_src)
        assert torch.equal(x_in, x)  # the input is not modified
        assert recorded.calls[-1]["A_TMA"] == (expert_gemm.WeightLoad.GATHER4 if tma else 0)
        results[tma] = outs if glu else outs[:1]
    for gathered, pointers in zip(results[True], results[False]):
        assert torch.equal(gathered, pointers)  # TMA's row gather gives the masked loads' tiles
    tol = dict(atol=TOL[dtype]["atol"] * 2, rtol=TOL[dtype]["rtol"])
    torch.testing.assert_close(results[True][0].double(), ref_h, **tol)
    if glu:
        torch.testing.assert_close(results[True][1].double(), ref_g, **tol)
        h, g = results[True][0].double(), results[True][1].double()
        torch.testing.assert_close(results[True][2].double(), torch.nn.functional.silu(h) * g, **tol)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "counts, N",
    [
        ([5, 0, 131, 1], 208),  # an empty expert, a one-row expert, odd counts (partial 128-row M tiles); N = 208:
        # a full and a partial 128-column tile (80 columns: a slice cut by N, slices wholly past N)
        ([7], 48),  # E = 1, one partial M tile; one partial N tile
        ([0, 129, 0], 144),  # all rows to one expert (its second M tile one row), empty first and last experts
    ],
)
def test_glu_forward_sm100_tiles(counts, N, dtype, activation, monkeypatch):
    # the GLU forward with sm_100's config forced under the interpreter (gemm_config's choice for capability 100:
    # 128x128 tiles of two accumulators, the epilogue in column slices of EPI_N < 128; TMA weights, the rows through
    # TMA's row gather as there): h, g and a = act(h)·g vs float64 (as accurate as PyTorch in the dtype), every
    # output poisoned, the rows no expert owns (spare rows inside the experts, rows past offsets[E]) zero
    E, K, T, extra = len(counts), 80, 23, 3  # K = 80: a full and a partial 64-wide K step (16-aligned: sm_100's
    # config serves aligned operands)
    offsets, R, row_src = _gathered_rows(counts, T, extra, spare_every=11)
    x = torch.randn(T, K).to(dtype)
    w, gate = (torch.randn(E, K, N) / K**0.5).to(dtype), (torch.randn(E, K, N) / K**0.5).to(dtype)
    xs = torch.where((row_src >= 0)[:, None], x[row_src.clamp(min=0).long()], 0)
    act = ACTIVATIONS[activation]
    ref = [torch.zeros(R, N, dtype=torch.float64) for _ in range(2)]  # h, g
    same = [torch.zeros(R, N, dtype=dtype) for _ in range(2)]  # the same products in the dtype (PyTorch's error)
    for e, (o0, o1) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        for i, weight in enumerate((w, gate)):
            ref[i][o0:o1], same[i][o0:o1] = xs[o0:o1].double() @ weight[e].double(), xs[o0:o1] @ weight[e]
    ref.append(act(ref[0]) * ref[1])
    same.append((act(same[0].float()) * same[1].float()).to(dtype))

    sm100_config = gpu_gemm_config(100)

    monkeypatch.setattr(expert_gemm, "gemm_config", sm100_config)
    monkeypatch.setattr(expert_gemm, "_gather4_device", lambda device: True)
    recorded = Recorded(expert_gemm.gemm_kernel)
    monkeypatch.setattr(expert_gemm, "gemm_kernel", recorded)
    outs = [poison_(torch.empty(R, N, dtype=dtype)) for _ in range(3)]  # h, g, a
    x_in, w_in, gate_in = x.clone(), w.clone(), gate.clone()
    schedule = Schedule.build(offsets, R, 128)
    expert_gemm.gemm(Rows.dense(x_in, gathered=True), w_in, Rows.dense(outs[0]), schedule, row_src=row_src,
                     gate=gate_in, gate_out=outs[1], act_out=outs[2], activation=activation)  # fmt: skip
    assert torch.equal(x_in, x) and torch.equal(w_in, w) and torch.equal(gate_in, gate)  # inputs not modified
    call = recorded.calls[-1]
    assert (call["BLOCK_M"], call["BLOCK_N"], call["num_warps"]) == (128, 128, 4)
    assert call["EPI_N"] < call["BLOCK_N"] and call["A_TMA"] == expert_gemm.WeightLoad.GATHER4 and call["W_TMA"]
    for name, out, r64, r in zip(("h", "g", "a"), outs, ref, same):
        assert_close_to_reference(out, r64, r, msg=f"{name}: ")


SWAP_TILES = {
    # name: (capability, block_m) of a config gemm_config swaps (SWAP_AB) for every use: accᵀ = Wᵀ · Aᵀ
    "sm90-m16": (90, 16),  # decode tiles on sm_90: 16 rows as the MMA's N
    "sm90-m32": (90, 32),
    "sm100-m64": (100, 64),  # 64-row tiles on sm_100 (and its gathered rows through TMA's row gather)
}


def _device_config(monkeypatch, capability: int) -> None:
    """``gemm`` picks the GPU config of ``capability`` under the interpreter (its tiles, stages, SWAP_AB)."""
    config = expert_gemm.gemm_config

    def device_config(*args, **kwargs):
        with pytest.MonkeyPatch.context() as gpu:
            gpu.setattr(expert_gemm, "interpreting", lambda: False)
            return config(*args, **{**kwargs, "capability": capability})

    monkeypatch.setattr(expert_gemm, "gemm_config", device_config)
    monkeypatch.setattr(expert_gemm, "_gather4_device", lambda device: capability == 100)


def _per_expert(offsets, a, w):
    """``out[rows of e] = a[rows of e] @ w[e]`` (zeros elsewhere), in ``a``'s dtype: the float64 reference when
    given float64, PyTorch's same-precision product otherwise."""
    out = torch.zeros(a.shape[0], w.shape[2], dtype=a.dtype)
    for e, (o0, o1) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        out[o0:o1] = a[o0:o1] @ w[e].to(a.dtype)
    return out


@pytest.mark.parametrize("use", ["plain", "plain-gathered", "glu-forward", "backward-glu", "pair"])
@pytest.mark.parametrize("tile", list(SWAP_TILES))
@pytest.mark.parametrize(
    "counts, N",
    [
        ([5, 0, 37, 1], 48),  # an empty expert, a one-row expert, odd counts (partial M tiles); one partial N tile
        ([23], 272),  # E = 1; a full and a partial N tile (256 columns swapped, 128 for the GLU forward)
        ([0, 70, 0], 48),  # all rows to one expert (two M tiles or more, the last partial), empty first and last
    ],
)
def test_swapped_operands(counts, N, tile, use, monkeypatch):
    # the small-M tiles computed transposed (SWAP_AB: the weight's columns as the MMA's M, the tile's rows its N),
    # with the device config forced under the interpreter, for every epilogue, dense and gathered A: vs float64, at
    # most 2x PyTorch's fp16 error, every output poisoned; rows no expert owns (spare rows, rows past offsets[E]) 0
    capability, block_m = SWAP_TILES[tile]
    _device_config(monkeypatch, capability)
    dtype, E, K, T, extra = torch.float16, len(counts), 80, 19, 3  # K = 80: a full and a partial 64-wide K step
    offsets, R, row_src = _gathered_rows(counts, T, extra, spare_every=7)
    gathered = use in ("plain-gathered", "glu-forward", "backward-glu")
    # the backward and the pair read transposed weight views (wᵀ: K contiguous), the others [E, K, N] as stored
    transposed = use in ("backward-glu", "pair")
    w, w2 = ((torch.randn(E, N, K) / K**0.5).to(dtype).transpose(1, 2) if transposed else
             (torch.randn(E, K, N) / K**0.5).to(dtype) for _ in range(2))  # fmt: skip
    inputs = {"x": torch.randn(T if gathered else R, K).to(dtype), "w": w, "w2": w2}
    x = inputs["x"]
    rows = torch.where((row_src >= 0)[:, None], x[row_src.clamp(min=0).long()], 0) if gathered else x
    ref64, same = _per_expert(offsets, rows.double(), w), _per_expert(offsets, rows, w)
    recorded = Recorded(expert_gemm.gemm_kernel)
    monkeypatch.setattr(expert_gemm, "gemm_kernel", recorded)
    before = {name: t.clone() for name, t in inputs.items()}
    a, schedule = Rows.dense(x, gathered=gathered), Schedule.build(offsets, R, block_m)
    src = row_src if gathered else None
    outs = [poison_(torch.empty(R, N, dtype=dtype)) for _ in range(3)]
    if use.startswith("plain"):
        expert_gemm.gemm(a, w, Rows.dense(outs[0]), schedule, row_src=src)
        checks = {"out": (ref64, same)}
    elif use == "glu-forward":
        expert_gemm.gemm(a, w, Rows.dense(outs[0]), schedule, row_src=src, gate=w2, gate_out=outs[1],
                         act_out=outs[2], activation="silu")  # fmt: skip
        g64, g = _per_expert(offsets, rows.double(), w2), _per_expert(offsets, rows, w2)
        silu = torch.nn.functional.silu
        checks = {"h": (ref64, same), "g": (g64, g), "a": (silu(ref64) * g64, (silu(same.float()) * g).to(dtype))}
    elif use == "backward-glu":  # acc = G = dout[token] @ w2ᵀ: dh = w·G·g·act'(h), dg = w·G·act(h), aw = w·a
        inputs["h"], inputs["g"] = torch.randn(R, N).to(dtype), torch.randn(R, N).to(dtype)
        inputs["row_asg"] = torch.where(row_src >= 0, torch.randint(0, 2 * T, (R,), dtype=torch.int32), -1)
        inputs["weights"] = torch.rand(2 * T)
        before.update({name: inputs[name].clone() for name in ("h", "g", "row_asg", "weights")})
        h, g, row_asg, weights = (inputs[name] for name in ("h", "g", "row_asg", "weights"))
        backward = expert_gemm.BackwardEpilogue(h, g, row_asg, weights)
        dots = expert_gemm.gemm(a, w, Rows.dense(outs[0]), schedule, row_src=src, gate_out=outs[1], act_out=outs[2],
                                activation="silu", backward=backward)  # fmt: skip
        outs.append(dots.sum(0))
        wr = torch.where(row_asg >= 0, weights[row_asg.clamp(min=0).long()], 0)[:, None]

        def epilogue(G, h, g):  # in h's dtype (float64, or fp32 for PyTorch's same-precision results)
            s = torch.sigmoid(h)
            act, dact, Gw = h * s, s * (1 + h * (1 - s)), G.to(h.dtype) * wr.to(h.dtype)
            return Gw * g * dact, Gw * act, act * g * wr.to(h.dtype), (G.to(h.dtype) * act * g).sum(1)

        exact, fp32 = epilogue(ref64, h.double(), g.double()), epilogue(same, h.float(), g.float())
        in_dtype = [v.to(dtype) for v in fp32[:3]] + [fp32[3]]
        checks = dict(zip(("dh", "dg", "aw", "dots"), zip(exact, in_dtype)))
    else:  # the dgrad pair: out = a @ w + a2 @ w2 (a2 in a's layout)
        inputs["x2"] = torch.randn(R, K).to(dtype)
        before["x2"] = inputs["x2"].clone()
        x2 = inputs["x2"]
        expert_gemm.gemm(a, w, Rows.dense(outs[0]), schedule, pair=(Rows.dense(x2), w2))
        pair64, pair = ref64 + _per_expert(offsets, x2.double(), w2), same.float() + _per_expert(offsets, x2, w2)
        checks = {"out": (pair64, pair.to(dtype))}
    call = recorded.calls[-1]
    assert call["SWAP_AB"] and call["BLOCK_M"] == block_m  # the swapped config ran
    gather4 = capability == 100 and gathered  # sm_100's gathered rows come by TMA's row gather
    assert call["A_TMA"] == (expert_gemm.WeightLoad.GATHER4 if gather4 else expert_gemm.WeightLoad.POINTERS)
    for out, (name, (r64, r)) in zip(outs, checks.items()):
        assert_close_to_reference(out, r64, r, msg=f"{name}: ")
    for name, t in inputs.items():
        assert torch.equal(t, before[name]), name  # inputs are never modified


# ----------------------------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gather", [True, False], ids=["gather", "sorted"])
@pytest.mark.parametrize("case", ["empty-experts", "k=E", "duplicates", "invalid", "empty"])
def test_gradients(case, gather, backend):
    plan, K, N = _case(case)
    x, w, maps = _operands(plan, K, N, gather, torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    out = grouped_mm(x, w, plan.offsets, *maps, backend=backend)
    dy = torch.randn(out.shape)
    out.backward(dy)
    expected = ref_grouped_mm(x64, w64, plan, gather)
    dx, dw = torch.autograd.grad(expected, (x64, w64), dy.double(), allow_unused=True, materialize_grads=True)
    same = [None, None]  # the torch backend itself: the TOL table
    if backend == "triton":  # the torch backend's gradients in the same dtype
        xs, ws = (t.detach().requires_grad_() for t in (x, w))
        torch_out = grouped_mm(xs, ws, plan.offsets, *maps, backend="torch")
        same = torch.autograd.grad(torch_out, (xs, ws), dy, allow_unused=True, materialize_grads=True)
    assert_close_to_reference(x.grad, dx, same[0])
    assert_close_to_reference(w.grad, dw, same[1])


def _moe(x, w, weights, plan, backend):
    """gather → grouped_mm → scatter with the top-k weights (the unfused path of a one-matrix MoE)."""
    ra, ar = plan.row_assignment, plan.assignment_row
    h = grouped_mm(gather_rows(x, ra, ar, backend=backend), w, plan.offsets, backend=backend)
    return scatter_rows(h, ra, ar, weights, backend=backend)


def test_torch_compile_matches_eager():
    # torch.compile(fullgraph=True) of gather → grouped_mm → scatter (and the fused-gather form), forward + backward
    plan, K, N = _case("empty-experts")
    x = torch.randn(plan.num_tokens, K, requires_grad=True)
    w = torch.randn(plan.num_experts, K, N, requires_grad=True)
    weights = torch.rand(plan.num_tokens, plan.top_k, requires_grad=True)

    def step(fn):
        out = fn(x, w, weights)
        grads = torch.autograd.grad(out, (x, w, weights), torch.ones_like(out))
        return out, *grads

    def fused(x, w, weights):
        h = grouped_mm(x, w, plan.offsets, plan.row_assignment, plan.assignment_row, backend="triton")
        return scatter_rows(h, plan.row_assignment, plan.assignment_row, weights, backend="triton")

    def unfused(x, w, weights):
        return _moe(x, w, weights, plan, "triton")

    for fn in (fused, unfused):
        eager = step(fn)
        compiled = step(torch.compile(fn, fullgraph=True))
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(a, b)
    for a, b in zip(step(fused), step(unfused)):  # fused gather == explicit gather
        assert_close(a, b)


# ----------------------------------------------------------------------------------------------- errors


def _args():
    plan = plan_routing(routing(5, 2, 3, "uniform"), 3, block_size=1)
    return torch.randn(5, 8), torch.randn(3, 8, 4), plan.offsets, plan.row_assignment, plan.assignment_row


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda x, w, o, ra, ar: (x, w[:, :7], o, ra, ar), ValueError, r"w must have shape \[E, K, N\] = \(3, 8, \*\)"),
        (lambda x, w, o, ra, ar: (x, w[:2], o, ra, ar), ValueError, r"w must have shape \[E, K, N\] = \(3, 8, \*\)"),
        (lambda x, w, o, ra, ar: (x[:4], w, o, ra, ar), ValueError, r"x must have shape \[T, K\] = \(5, \*\)"),
        (lambda x, w, o, ra, ar: (x, w.half(), o, ra, ar), TypeError, "w must have x's dtype torch.float32"),
        (lambda x, w, o, ra, ar: (x, w, o.long(), ra, ar), TypeError, "offsets must be torch.int32, got torch.int64"),
        (lambda x, w, o, ra, ar: (x, w, o, ra, None), ValueError, "must be given together"),
        (lambda x, w, o, ra, ar: (x, w, o, ra.to("meta"), ar), ValueError, "expected all tensors on one device"),
        (lambda x, w, o, ra, ar: (x, w, o.flip(0), ra, ar), ValueError, "offsets must rise from 0"),
        (lambda x, w, o, ra, ar: (x.int(), w, o, ra, ar), TypeError, "x must have a dtype among"),
    ],
)
def test_errors(change, error, match):
    with pytest.raises(error, match=match):
        kernels.grouped_mm(*change(*_args()), backend="triton")


def test_other_errors():
    x, w, o, ra, ar = _args()
    with pytest.raises(ValueError, match="backend must be one of"):
        grouped_mm(x, w, o, ra, ar, backend="cutlass")
    with pytest.raises(ValueError, match=r"dy must have shape \[R, N\] = \(10, \*\), got \(9, 4\)"):
        kernels.grouped_mm_wgrad(x, torch.randn(9, 4), o, ra, 2)
    with pytest.raises(ValueError, match="k \\(choices per token\\) must be a positive int, got 0"):
        kernels.grouped_mm_wgrad(x, torch.randn(10, 4), o, ra, 0)
    with pytest.raises(TypeError, match="out must have dtype torch.float32, got torch.bfloat16"):
        kernels.grouped_mm(x, w, o, ra, ar, out=torch.empty(10, 4, dtype=torch.bfloat16))
    # one validation for both backends (the torch backend once skipped these): bad offsets and row maps
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="offsets must rise from 0"):
            grouped_mm(x, w, torch.tensor([0, 3, 2, 10], dtype=torch.int32), ra, ar, backend=backend)
        with pytest.raises(ValueError, match="offsets must rise from 0"):
            grouped_mm(x, w, torch.tensor([0, -1, 4, 10], dtype=torch.int32), ra, ar, backend=backend)
        with pytest.raises(ValueError, match=r"row_assignment must hold assignments in \[-1, 10\)"):
            grouped_mm(x, w, o, torch.full_like(ra, 10), ar, backend=backend)
