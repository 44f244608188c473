"""The per-launch roofline of ``bench.model``: GPUs, layer shapes, the routing assumption and one cost function per
kernel, all stated here (``EFFICIENCY_MODEL`` is printed in the model's header).

Every number below that is not a count is an assumption until a GPU measures it (``bench/gpu_check.sh`` prints the
estimate beside each measured number): the GPU table says which of its numbers are vendor specifications and which
were measured. The efficiencies' shape (by tile, CTAs per SM, persistence) is this model's, from the kernels'
structure; five constants (``CALIBRATION``, printed in the header) are fitted to the first GPU run: one H100,
2026-12-06, ``bench/results/2026-12-06-NVIDIA-H100-80GB-HBM3``; ``tests/test_model.py`` holds the model to that run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from blocksparse_moe import fp8 as fp8_recipes
from blocksparse_moe.kernels.expert_gemm import Fp8Mode

from .record import EagerOp, Launch, TensorInfo

__all__ = [
    "Gpu",
    "GPUS",
    "LayerShape",
    "SHAPES",
    "Cost",
    "EFFICIENCY_MODEL",
    "CALIBRATION",
    "FP8_MODEL",
    "QUANTIZE_KERNELS",
    "balanced_rows",
    "launch_cost",
    "eager_time",
]


@dataclass(frozen=True)
class Gpu:
    """One GPU of the model. ``dense_tflops``: the bf16 dense GEMM rate that "% of dense" refers to."""

    name: str
    label: str
    capability: tuple[int, int]
    sms: int
    dense_tflops: float
    hbm_tbps: float
    l2_tbps: float
    smem_per_sm: int  # bytes of shared memory a CTA set may use per SM
    main_loop_factor: float  # the architecture's factor on the main-loop efficiency of our Triton kernels
    source: str
    bf16_fma_per_clock: int  # dense bf16 tensor-core FMAs per SM per clock (bench.audit's FMA_PER_CLOCK)
    fp8_rate: float  # the E4M3 tensor-core rate over the bf16 one
    l2_mb: float  # L2 capacity
    atomics_per_s: float  # elements an eager index_add / scatter_add adds atomically per second (the L2's atomic units)
    backward_efficiency: float  # our backward GEMM launches' main-loop efficiency over the forward's
    library_efficiency: float  # torch._grouped_mm's main loops, of dense_tflops

    @property
    def sm_flops(self) -> float:
        """Dense FLOP/s of one SM."""
        return self.dense_tflops * 1e12 / self.sms

    @property
    def sm_fp32_fmas(self) -> float:
        """FP32 FMAs per second of one SM's CUDA cores: ``FP32_FMA_PER_CLOCK`` at the clock of ``dense_tflops``."""
        return FP32_FMA_PER_CLOCK * self.sm_flops / (2 * self.bf16_fma_per_clock)


# ---- The calibration: fitted to the first GPU run (one H100 80GB HBM3, 2026-12-06, torch 2.11, Triton 3.6,
# bench/gpu_check.sh: bench/results/2026-12-06-NVIDIA-H100-80GB-HBM3, the mixtral and fine presets' results.json,
# forward and backward times apart; bench.model.calibrate refits them). How each is fitted and how it carries to the
# H200 / B200: CALIBRATION below.
H100_DENSE_TFLOPS = 709.0  # the bench's `dense` row at Mixtral: cuBLAS GEMMs of the same FLOPs, 48.9 ms fwd+bwd
DENSE_OF_SPEC = H100_DENSE_TFLOPS / 989.0  # 0.72: the measured dense rate over NVIDIA's bf16 specification
SM90_MAIN_LOOP = 0.87  # our Triton kernels' main loops on sm_90 over the N-tile table (forward of ours, both shapes)
BACKWARD_EFFICIENCY = 0.72  # our backward GEMM launches over the forward's efficiency (backward of ours, both shapes)
LIBRARY_EFFICIENCY = 0.99  # torch._grouped_mm's CUTLASS kernel, of the dense rate (the baseline, both shapes)
H100_ATOMICS_PER_S = 9e10  # eager index_add elements per second (with LIBRARY_EFFICIENCY: the baseline, both shapes)
B200_MAIN_LOOP = 0.55  # assumption (issue 16): Hopper-structured kernels compiled for tcgen05, over the sm_90 factor

GPUS: dict[str, Gpu] = {
    "h100": Gpu(
        "h100", "H100 SXM", (9, 0), 132, H100_DENSE_TFLOPS, 3.35, 10.0, 227 * 1024, SM90_MAIN_LOOP,
        f"{H100_DENSE_TFLOPS:.0f} TFLOP/s bf16 dense: measured (the bench's dense row, Mixtral, 2026-12-06; "
        "specification 989); 3.35 TB/s: NVIDIA specification; L2 10 TB/s: assumption",
        bf16_fma_per_clock=2048, fp8_rate=2.0, l2_mb=50.0, atomics_per_s=H100_ATOMICS_PER_S,
        backward_efficiency=BACKWARD_EFFICIENCY, library_efficiency=LIBRARY_EFFICIENCY,
    ),
    "h200": Gpu(
        "h200", "H200", (9, 0), 132, H100_DENSE_TFLOPS, 4.3, 10.0, 227 * 1024, SM90_MAIN_LOOP,
        f"{H100_DENSE_TFLOPS:.0f} TFLOP/s bf16 dense: the H100's measured rate (the same SMs and clocks; PLATFORM.md's "
        "790 TFLOP/s on the project's H200 is a GEMM of unrecorded shape, not the bench's dense row); 4.3 TB/s "
        "device copy: measured on the project's H200 (PLATFORM.md; specification 4.8 TB/s); L2 10 TB/s: assumption",
        bf16_fma_per_clock=2048, fp8_rate=2.0, l2_mb=50.0, atomics_per_s=H100_ATOMICS_PER_S,
        backward_efficiency=BACKWARD_EFFICIENCY, library_efficiency=LIBRARY_EFFICIENCY,
    ),
    "b200": Gpu(
        "b200", "B200", (10, 0), 148, round(2250.0 * DENSE_OF_SPEC), 8.0, 20.0, 227 * 1024,
        SM90_MAIN_LOOP * B200_MAIN_LOOP,
        f"{round(2250.0 * DENSE_OF_SPEC)} TFLOP/s bf16 dense: NVIDIA's 2250 x the H100's measured / specified "
        f"{DENSE_OF_SPEC:.2f} (assumption); 8 TB/s: NVIDIA specification; L2 20 TB/s: assumption; main loops at "
        f"{B200_MAIN_LOOP} of the sm_90 efficiency (Hopper-structured kernels compiled for tcgen05, issue 16); "
        "atomics at the H100's rate (assumption)",
        bf16_fma_per_clock=4096, fp8_rate=2.0, l2_mb=126.0, atomics_per_s=H100_ATOMICS_PER_S,
        backward_efficiency=BACKWARD_EFFICIENCY, library_efficiency=LIBRARY_EFFICIENCY,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class LayerShape:
    """One MoE layer: T tokens of width d, E experts of width f, top-k routing; bf16 SwiGLU."""

    name: str
    tokens: int
    hidden: int
    ffn: int
    experts: int
    top_k: int

    @property
    def assignments(self) -> int:
        return self.tokens * self.top_k

    def useful_flops(self) -> int:
        """Forward + backward FLOPs of the expert GEMMs a perfect dropless layer executes: 3 GEMMs of
        ``2·T·k·d·f`` forward (w1, w3, w2), twice that backward (input and weight gradients)."""
        return 3 * 3 * 2 * self.assignments * self.hidden * self.ffn


SHAPES: dict[str, LayerShape] = {
    "mixtral": LayerShape("mixtral", 16384, 4096, 14336, 8, 2),
    "fine": LayerShape("fine", 32768, 2048, 768, 128, 8),
    "decode": LayerShape("decode", 64, 2048, 768, 128, 8),
}


def balanced_rows(assignments: int, experts: int) -> list[int]:
    """The routing the model assumes: balanced, ``A // E`` assignments per expert (the first ``A % E`` one more)."""
    base, extra = divmod(assignments, experts)
    return [base + (e < extra) for e in range(experts)]


EFFICIENCY_MODEL = f"""\
efficiency model (its form assumed from the kernels' structure; the numbers marked [cal]: see calibration):
  GEMM launch time = max(MMA, L2, HBM) + 3 us (launch, prologue, ramp)
    MMA  = ceil(CTAs with work / SMs) x (executed FLOPs per CTA) / (SM dense rate x main-loop efficiency); the
           dense rate: the GPU's cuBLAS bf16 GEMM rate (measured on the H100 [cal])
           main-loop efficiency: by the MMA tile's N: >=128: 0.90, 64: 0.75, 32: 0.50, 16: 0.30; x0.85 with one CTA
           per SM (prologue and epilogue not overlapped by a second CTA), except in a persistent kernel
           (gemm_kernel with 16-bit operands on sm_100, but for the backward and GLU forward epilogues: its
           programs loop over the tiles, a second one per SM overlapping the first's prologue and epilogue); x the
           GPU's main-loop factor (sm_90 {SM90_MAIN_LOOP} [cal], B200 {SM90_MAIN_LOOP} x {B200_MAIN_LOOP}); x
           {BACKWARD_EFFICIENCY} [cal] in the backward launches; fp32 operands at half the bf16 rate (tf32); M tiles
           under 64 rows (decode: mma.sync, not wgmma) at the same efficiency: they serve shapes whose weight reads
           bound them (HBM), where it does not decide
    L2   = operand tiles read by the CTAs (A and W tiles every K step) / L2 bandwidth
    HBM  = unique bytes (each operand row and weight once, every output and epilogue operand once) / (0.85 x HBM)
  CTAs per SM = min(registers, shared memory, 2048 threads); registers per thread estimated as 48 + the fp32
    accumulator elements per thread (+ 4 per element of the backward epilogue's column slice of EPI_N columns: h,
    g, act, act' live beside the accumulator), rounded up to 8 (sm_90 ptxas, bench.audit: within 16 of it);
    shared memory = stages x (A tile + W tiles)
  torch._grouped_mm (the torch_grouped_mm baseline): PyTorch's CUTLASS kernel, costed by the same MMA / L2 / HBM
    formulas on its own tiles (GroupMM.cu): sm_90 128x256x64 (64x128x128 when a group's M or N <= 128; sm_100
    64x128x128), clusters of 2 CTAs along M with the B tile multicast (half its L2 reads), one persistent
    warp-specialized CTA per SM at {LIBRARY_EFFICIENCY} [cal] of the dense rate, with no one-CTA penalty (its
    epilogue overlaps the next tile's loads) and no GPU factor (native on sm_100)
  permute kernels and eager ops: bytes / (0.85 x HBM) + 3 us each; an eager index_add / scatter_add at least its
    source elements / the GPU's atomic rate ({H100_ATOMICS_PER_S:.0e}/s on the H100 [cal]: one L2 atomic each)
  routing: balanced (T*k/E assignments per expert); the plan is built by the compiled extension on CUDA: its 6
    step kernels (routing::*) move the ids and the plan's buffers once in all, at HBM speed, + 3 us each; the
    PyTorch implementation that builds it on meta tensors here is listed, not costed
  gemm_kernel's "CTAs" here are its tiles (persistent on sm_100's fast config: min(tiles, programs_per_sm x SMs)
    programs loop over them, programs_per_sm the CTAs per SM its build holds; the list, on meta tensors, shows one
    program per tile)
  W_TMA is 0 in the list (meta tensors are not CUDA tensors); the bytes and FLOPs are the same with TMA weights"""

CALIBRATION = f"""\
calibration: fitted to one H100 80GB HBM3 on 2026-12-06 (torch 2.11, Triton 3.6; bench/gpu_check.sh's mixtral
  T=16384 d=4096 f=14336 E=8 k=2 and fine T=32768 d=2048 f=768 E=128 k=8 runs, forward and backward timed apart:
  bench/results/2026-12-06-NVIDIA-H100-80GB-HBM3); each fitted time within 5% of the model per direction; the fit:
  python -m bench.model.calibrate --gpu h100 <that folder>/mixtral <that folder>/fine (rounded to 2 digits here)
  dense rate {H100_DENSE_TFLOPS:.0f} TFLOP/s: measured, not fitted: the bench's dense row at Mixtral (cuBLAS GEMMs
    of the layer's FLOPs, 48.9 ms fwd+bwd; 679 TFLOP/s at fine); the MMA peak above and the unit of "% of dense"
    (it was NVIDIA's 989 TFLOP/s: every GEMM of the model came out ~1.3x too fast)
  main-loop factor {SM90_MAIN_LOOP}: our forward GEMMs (gemm_kernel, GLU and plain epilogues), least squares over the
    forward times of blocksparse and grouped at both shapes (23.5-23.7 ms Mixtral, 5.6 ms fine)
  backward efficiency {BACKWARD_EFFICIENCY}: our backward GEMMs (the SwiGLU-backward epilogue, the dx pair, both
    weight gradients) over the forward's, from the backward times (56.1-59.5 ms Mixtral, 12.9-13.6 ms fine);
    which of the four launches loses it, phase totals do not say
  torch._grouped_mm at {LIBRARY_EFFICIENCY} of the dense rate and the atomic rate {H100_ATOMICS_PER_S:.0e}/s:
    least squares over the baseline's times (Mixtral 20.0 / 38.3 ms, fine 11.5 / 18.2 ms); the fine layer's
    combine and dx index_add (537M bf16 atomic additions each) take 6.0 ms of each direction (bytes: 0.5 ms)
  carried to the H200 (the same SMs, clocks and L2): every number above; its 4.3 TB/s shortens the HBM terms
    only. To the B200 (assumptions, no sm_100 measurement): dense 2250 TFLOP/s (NVIDIA) x the H100's measured /
    specified {DENSE_OF_SPEC:.2f} = {round(2250.0 * DENSE_OF_SPEC)} TFLOP/s, main loops at {B200_MAIN_LOOP} of the sm_90
    factor, the backward and library efficiencies and the atomic rate as on the H100
  not calibrated: FP8 (the run's FP8 backward has a known wgrad operand-layout defect; mx on sm_90 measured 3x
    the model), decode and the L2 bandwidth (no measurement binds them), the block-sparse layout's backward
    (5-6% slower than grouped's, measured; the same launches in the model)"""

FP8_MODEL = """\
FP8 model (fp8=RECIPE: gemm_kernel / wgrad_kernel with FP8 = 1 blockwise, 2 mx, 3 rowwise on E4M3 operands;
  assumptions, not measurements):
  tensor rate: E4M3 MMAs at 2x the bf16 rate on sm_90 and sm_100 (the GPU's bf16 figure above x 2); mx on sm_90 at
    the bf16 rate (no block-scaled MMA on Hopper: Triton emulates tl.dot_scaled by upcasting to bf16), native
    (block-scaled tcgen05) on sm_100; the main-loop efficiencies above unchanged
  blockwise promotion: every 128 of K the step's MMA result is scaled into the fp32 accumulator (acc += p * sa * sw:
    2 FP32 instructions per accumulator element) on the CUDA cores, 128 FP32 FMAs per SM per clock at the clock of
    the GPU's bf16 figure (1/16 of the bf16 FMA rate on sm_90, 1/32 on sm_100), added to the MMA time (it waits
    for the step's MMA; a second CTA per SM hiding it is not modelled: an upper bound); the step's result is a second
    fp32 accumulator in the register estimate
  rowwise scales applied once after the loop (in the epilogue's column slices: no registers counted for them); the
    dgrad pair's second product (its own scales) a second fp32 accumulator in the register estimate
  bytes: operands, outputs and epilogue operands at their own element sizes (E4M3 1 B); the scales (fp32, or E8M0
    1 B) in the recipe's groups (blocksparse_moe.fp8), read once from HBM and every K step (rowwise: every tile)
    from L2; scale tiles in shared memory not counted; mx's up-projection writes a in E4M3 with its scales
    (QUANT_A: quantized in its epilogue, no quantize pass of a)
  quantize_kernel / quantize_dual_kernel (memory-bound passes): bytes / (0.85 x HBM) + 3 us; the input read twice
    (amax, then quantize), the second time from L2 when the resident programs' groups fit in it (50 MB H100 / H200:
    NVIDIA specification; 126 MB B200: assumption), else from HBM; E4M3 values and scales written once
  % of dense: of the FP8 dense rate (2x the bf16 figure)"""

FP32_FMA_PER_CLOCK = 128  # FP32 FMAs per SM per clock of sm_90's and sm_100's CUDA cores (NVIDIA architecture docs)
QUANTIZE_KERNELS = ("quantize_kernel", "quantize_dual_kernel")
_PROMOTION_INSTRUCTIONS = 2  # FP32 instructions per accumulator element of one blockwise promotion (FMUL + FFMA)
_N_EFFICIENCY = ((128, 0.90), (64, 0.75), (32, 0.50), (16, 0.30))
_OVERHEAD_S = 3e-6
_HBM_EFFICIENCY = 0.85
# Registers per thread = _BASE_REGISTERS + the fp32 accumulator elements per thread (+ the backward epilogue's live
# values of one column slice), checked against ptxas (bench.audit, sm_90, 2026-12-06): 128x128 plain / wgrad 102-110
# (model 112), the backward epilogue at 128x128 / 64x128 in slices of 8 columns 119-128 (model 128), at 64x64 72-79
# (model 96): the same CTAs per SM as measured for each.
_BASE_REGISTERS = 48
_BWD_LIVE = 4  # fp32 values live per element of the backward epilogue's column slice beside the accumulator: h, g,
# act(h), act'(h)


@dataclass(frozen=True)
class Cost:
    """What one launch does under the model, and how long it takes."""

    executed_flops: int
    useful_flops: int
    hbm_bytes: int
    l2_bytes: int
    work_ctas: int  # CTAs with MMA work (or, for permute kernels, every CTA)
    zero_ctas: int  # CTAs that only write zeros (spare tiles of the sync-free bound, experts without rows)
    idle_ctas: int  # CTAs with nothing to do (exit at once)
    ctas_per_sm: int
    efficiency: float  # main-loop efficiency assumed (0 for memory-bound kernels)
    tile: str
    mma_s: float
    l2_s: float
    hbm_s: float

    @property
    def seconds(self) -> float:
        return max(self.mma_s, self.l2_s, self.hbm_s) + _OVERHEAD_S

    @property
    def bound(self) -> str:
        return max((self.mma_s, "MMA"), (self.l2_s, "L2"), (self.hbm_s, "HBM"))[1]

    @property
    def intensity(self) -> float:
        """MMA FLOPs per byte of operand tiles read from L2."""
        return self.executed_flops / self.l2_bytes if self.l2_bytes else 0.0


def _n_efficiency(block_n: int) -> float:
    for n, eff in _N_EFFICIENCY:
        if block_n >= n:
            return eff
    return _N_EFFICIENCY[-1][1]


def _ctas_per_sm(gpu: Gpu, warps: int, acc_per_thread: float, smem: int) -> int:
    threads = warps * 32
    regs = min(255, 8 * math.ceil((_BASE_REGISTERS + acc_per_thread) / 8))
    return max(1, min(65536 // (regs * threads), gpu.smem_per_sm // max(smem, 1), 2048 // threads))


def _mma_seconds(gpu: Gpu, executed: int, work_ctas: int, efficiency: float, rate: float = 1.0) -> float:
    """``rate``: the operands' tensor-core rate over bf16's (``_fp8_rate``)."""
    if not work_ctas:
        return 0.0
    per_cta = executed / work_ctas
    return math.ceil(work_ctas / gpu.sms) * per_cta / (gpu.sm_flops * rate * efficiency)


def _fp8_recipe(args: dict) -> fp8_recipes.Recipe | None:
    """The recipe of a GEMM launch's ``FP8`` mode (None: not FP8)."""
    mode = Fp8Mode(args.get("FP8", Fp8Mode.NONE))
    return None if mode == Fp8Mode.NONE else mode.recipe()


def _fp8_rate(gpu: Gpu, recipe: fp8_recipes.Recipe | None) -> float:
    """E4M3 MMAs at ``gpu.fp8_rate``, but mx on sm_90 (``tl.dot_scaled`` upcast to bf16 by Triton) at bf16's."""
    if recipe is None or (recipe.scale_dtype == torch.uint8 and gpu.capability[0] < 10):
        return 1.0
    return gpu.fp8_rate


def _promotion_seconds(gpu: Gpu, recipe: fp8_recipes.Recipe | None, work_ctas: int, elements: int) -> float:
    """The blockwise promotions on the CUDA cores: ``elements`` accumulator elements promoted (each 128 of K) over
    all ``work_ctas``, in rounds of one CTA per SM as the MMAs; 0 for other recipes (FP8 model)."""
    if recipe is None or recipe.name != "blockwise" or not work_ctas:
        return 0.0
    return math.ceil(work_ctas / gpu.sms) * elements / work_ctas * _PROMOTION_INSTRUCTIONS / gpu.sm_fp32_fmas


def _groups(n: int, group: int | None) -> int:
    """Scales along ``n`` elements in groups of ``group`` (None: one)."""
    return 1 if group is None else math.ceil(n / group)


def _scale_itemsize(recipe: fp8_recipes.Recipe | None) -> int:
    return 0 if recipe is None else torch.empty((), dtype=recipe.scale_dtype).element_size()


def _efficiency(
    gpu: Gpu, launch: Launch, block_n: int, ctas_per_sm: int, itemsize: int, persistent: bool = False
) -> float:
    """The main-loop efficiency of one of our Triton GEMM launches (``EFFICIENCY_MODEL``, ``CALIBRATION``)."""
    eff = _n_efficiency(block_n) * gpu.main_loop_factor * (0.85 if ctas_per_sm == 1 and not persistent else 1.0)
    eff *= gpu.backward_efficiency if launch.phase == "backward" else 1.0
    return eff / 2 if itemsize == 4 else eff


def _hbm_seconds(gpu: Gpu, nbytes: int) -> float:
    return nbytes / (gpu.hbm_tbps * 1e12 * _HBM_EFFICIENCY)


def _gemm_cost(launch: Launch, gpu: Gpu, rows: list[int], useful_rows: list[int]) -> Cost:
    a = launch.args
    BM, BN, BK = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_K"]
    R, N, N_store, K = a["R"], a["N"], a["N_STORE"], a["K"]
    m_tiles = a["num_m_tiles"]
    n_tiles = math.ceil(N_store / BN)  # from the arguments: a persistent grid has fewer programs than tiles
    a_item, w_item, out_item = a["a_ptr"].itemsize, a["w_ptr"].itemsize, a["out_ptr"].itemsize
    recipe = _fp8_recipe(a)
    dual = bool(a["GLU"]) and a["EPILOGUE"] == 1
    pair = bool(a["PAIR"])
    products = 1 + dual + pair
    k_steps = math.ceil(K / BK)
    used = sum(math.ceil(r / BM) for r in rows)
    if used > m_tiles:
        raise ValueError(f"{launch.kernel}: the routing needs {used} M tiles, the grid has {m_tiles}")
    zero_m = min(m_tiles - used, math.ceil(max(R - sum(rows), 0) / BM))
    executed = used * n_tiles * 2 * BM * BN * k_steps * BK * products
    useful = sum(useful_rows) * 2 * N * K * products
    a_rows = sum(useful_rows) if a["GATHER"] else sum(rows)
    experts_used = sum(1 for r in rows if r)
    # h [, g] / dh [, dg] in out's dtype; a / aw in out3's (the up-projection's a in E4M3 with QUANT_A, + its scales)
    outputs = 1 if a["EPILOGUE"] == 0 else 1 + bool(a["GLU"])
    act_item = 0 if a["EPILOGUE"] == 0 else a["out3_ptr"].itemsize
    epilogue_reads = 1 + bool(a["GLU"]) if a["EPILOGUE"] == 2 else 0  # the saved h [, g]
    written_rows = min(sum(rows) + zero_m * BM, R)
    quant_a = Fp8Mode(a.get("QUANT_A", Fp8Mode.NONE))
    a_scales = 0 if quant_a == Fp8Mode.NONE else _groups(N, quant_a.recipe().group) * _scale_itemsize(quant_a.recipe())
    hbm = (
        a_rows * K * a_item * (1 + pair)
        + experts_used * K * N * w_item * products
        + written_rows * N_store * (out_item * (outputs + epilogue_reads) + act_item)
        + written_rows * a_scales
        + (n_tiles * R * 4 if a["EPILOGUE"] == 2 else 0)  # the fp32 per-tile dots
    )
    # every K step an A tile and a weight tile per product; the GLU's two products share their A tile
    l2 = used * n_tiles * k_steps * (BM * BK * (1 + pair) * a_item + BK * BN * products * w_item)
    promoted = 0  # accumulator elements promoted (blockwise)
    if recipe is not None:  # the scales: A per row and group of K, the weights per group of K and of N
        s_item, group, across = _scale_itemsize(recipe), recipe.group, recipe.weight_across
        hbm += (a_rows * _groups(K, group) * (1 + pair) + experts_used * _groups(K, group) * _groups(N, across)
                * products) * s_item  # fmt: skip
        if group is None:  # rowwise: once per tile
            l2 += used * n_tiles * (BM * (1 + pair) + BN * products) * s_item
        else:
            per_step = BM * (1 + pair) * _groups(BK, group) + _groups(BK, group) * _groups(BN, across) * products
            l2 += used * n_tiles * k_steps * per_step * s_item
        promoted = used * n_tiles * BM * BN * products * _groups(K, group)
    threads = a["num_warps"] * 32
    # rowwise's pair: the second product (other scales) in its own accumulator; blockwise: + the step's
    rowwise_pair = pair and recipe is not None and recipe.name == "rowwise"
    accumulators = (1 + dual + rowwise_pair) * (2 if recipe is not None and recipe.name == "blockwise" else 1)
    acc = (BM * BN * accumulators + (BM * a["EPI_N"] * _BWD_LIVE if a["EPILOGUE"] == 2 else 0)) / threads
    smem = a["num_stages"] * (BM * BK * a_item + BK * BN * (1 + dual) * w_item)
    per_sm = _ctas_per_sm(gpu, a["num_warps"], acc, smem)
    # persistent on sm_100 with TMA weights: 16-bit operands, not the two-accumulator epilogues (meta: W_TMA 0)
    persistent = bool(a.get("PERSISTENT")) or (
        gpu.capability[0] == 10 and a_item == 2 and not dual and a["EPILOGUE"] != 2
    )
    eff = _efficiency(gpu, launch, BN, per_sm, a_item, persistent)
    work = used * n_tiles
    mma = _mma_seconds(gpu, executed, work, eff, _fp8_rate(gpu, recipe)) + _promotion_seconds(
        gpu, recipe, work, promoted
    )
    return Cost(
        executed, useful, hbm, l2, work, zero_m * n_tiles, (m_tiles - used - zero_m) * n_tiles, per_sm, eff,
        f"{BM}x{BN}x{BK}", mma, l2 / (gpu.l2_tbps * 1e12), _hbm_seconds(gpu, hbm),
    )  # fmt: skip


def _wgrad_cost(launch: Launch, gpu: Gpu, rows: list[int], useful_rows: list[int]) -> Cost:
    a = launch.args
    BM, BN, BK = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_K"]
    M, N = a["M"], a["N"]
    E = a["out_ptr"].shape[0]
    if len(rows) != E:
        raise ValueError(f"{launch.kernel}: {E} experts in the output, {len(rows)} in the routing")
    products = 1 + bool(a["DUAL"])  # DUAL: a second B, its own N tiles (one product per CTA)
    tiles = math.ceil(M / BM) * math.ceil(N / BN) * products
    a_item, b_item, out_item = a["a_ptr"].itemsize, a["b_ptr"].itemsize, a["out_ptr"].itemsize
    recipe = _fp8_recipe(a)
    steps = [math.ceil(r / BK) for r in rows]
    executed = sum(tiles * 2 * BM * BN * s * BK for s in steps)
    useful = sum(2 * M * N * r * products for r in useful_rows)
    a_rows = sum(useful_rows) if a["A_GATHER"] else sum(rows)
    b_rows = sum(useful_rows) if a["B_GATHER"] else sum(rows)
    hbm = a_rows * M * a_item + b_rows * N * products * b_item + E * M * N * products * out_item
    l2 = sum(tiles * s * BK * (BM * a_item + BN * b_item) for s in steps)
    promoted = 0  # accumulator elements promoted (blockwise)
    if recipe is not None:  # both operands' scales per column and group of one expert's rows (fp8.quantize_rows)
        s_item, group = _scale_itemsize(recipe), recipe.group
        groups = [_groups(r, group) if r else 0 for r in rows]
        hbm += sum(groups) * (M + N * products) * s_item
        if group is None:  # rowwise: once per tile
            l2 += tiles * sum(groups) * (BM + BN) * s_item
        else:
            l2 += sum(tiles * s for s in steps) * (BM + BN) * _groups(BK, group) * s_item
        promoted = tiles * sum(groups) * BM * BN
    threads = a["num_warps"] * 32
    # a gathered operand's index load takes pipeline stages of its own: Triton allocates num_stages - 2 data buffers
    # (bench.audit, sm_90: 5 stages -> 3 buffers, 99,840 B; a dense wgrad's 3 stages -> 3)
    buffers = a["num_stages"] - 2 if a["A_GATHER"] or a["B_GATHER"] else a["num_stages"]
    smem = buffers * BK * (BM * a_item + BN * b_item)
    accumulators = 2 if recipe is not None and recipe.name == "blockwise" else 1  # + the step's
    per_sm = _ctas_per_sm(gpu, a["num_warps"], BM * BN * accumulators / threads, smem)
    eff = _efficiency(gpu, launch, BN, per_sm, a_item)
    work = tiles * sum(1 for r in rows if r)
    mma = _mma_seconds(gpu, executed, work, eff, _fp8_rate(gpu, recipe)) + _promotion_seconds(
        gpu, recipe, work, promoted
    )
    return Cost(
        executed, useful, hbm, l2, work, tiles * E - work, 0, per_sm, eff, f"{BM}x{BN}x{BK}", mma,
        l2 / (gpu.l2_tbps * 1e12), _hbm_seconds(gpu, hbm),
    )  # fmt: skip


def _library_tile(gpu: Gpu, group_m: int, n: int) -> tuple[int, int, int, int]:
    """``(BM, BN, BK, multicast)`` of PyTorch's bf16 ``torch._grouped_mm`` kernel (``aten/src/ATen/native/cuda/
    GroupMM.cu``: CUTLASS, persistent, TMA warp-specialized, clusters of 2 CTAs along M sharing each B tile by TMA
    multicast): on sm_90 64x128x128 (ping-pong) when the average group's M or N is at most 128, else 128x256x64
    (cooperative); on sm_100 64x128x128."""
    if gpu.capability[0] >= 10 or group_m <= 128 or n <= 128:
        return 64, 128, 128, 2
    return 128, 256, 64, 2


def _grouped_mm_cost(launch: Launch, gpu: Gpu, rows: list[int], useful_rows: list[int]) -> Cost:
    """``torch._grouped_mm``: ``mat_a [R, K]`` times a weight per group ``mat_b [E, K, N]`` → ``[R, N]``, or the
    weight gradient ``mat_a [K, R]`` times ``mat_b [R, N]`` → ``[E, K, N]``, groups of ``rows[e]`` rows, on the
    library's tiles (``_library_tile``; the efficiency model states the rest)."""
    a: TensorInfo = launch.args["mat_a"]
    b: TensorInfo = launch.args["mat_b"]
    itemsize = a.itemsize
    E = len(rows)
    if len(b.shape) == 3:  # rows x a weight per group
        (R, K), N = a.shape, b.shape[2]
        if sum(rows) != R or b.shape[0] != E:
            raise ValueError(f"{launch.kernel}: [{R}, {K}] @ {list(b.shape)} for {E} groups of {sum(rows)} rows")
        BM, BN, BK, multicast = _library_tile(gpu, R // E, N)
        tiles = [math.ceil(r / BM) * math.ceil(N / BN) for r in rows]
        steps = [math.ceil(K / BK)] * E
        hbm = (R * K + sum(1 for r in rows if r) * K * N + R * N) * itemsize
    else:  # the weight gradient: a reduction over each group's rows
        (K, R), N = a.shape, b.shape[1]
        if sum(rows) != R:
            raise ValueError(f"{launch.kernel}: [{K}, {R}] @ [{R}, {N}] for groups of {sum(rows)} rows")
        BM, BN, BK, multicast = _library_tile(gpu, K, N)
        tiles = [math.ceil(K / BM) * math.ceil(N / BN) if r else 0 for r in rows]
        steps = [math.ceil(r / BK) for r in rows]
        hbm = (R * K + R * N + E * K * N) * itemsize
    useful = sum(useful_rows) * 2 * K * N
    executed = sum(t * s * 2 * BM * BN * BK for t, s in zip(tiles, steps))
    l2 = sum(t * s for t, s in zip(tiles, steps)) * (BM * BK + BK * BN // multicast) * itemsize
    work = sum(tiles)
    eff = gpu.library_efficiency / (2 if itemsize == 4 else 1)  # persistent, warp-specialized: no one-CTA or GPU factor
    return Cost(
        executed, useful, hbm, l2, work, 0, 0, 1, eff, f"{BM}x{BN}x{BK}", _mma_seconds(gpu, executed, work, eff),
        l2 / (gpu.l2_tbps * 1e12), _hbm_seconds(gpu, hbm),
    )  # fmt: skip


def _permute_cost(launch: Launch, gpu: Gpu, moved: int) -> Cost:
    a = launch.args
    tile = f"{a['BLOCK_ROWS']}x{a['BLOCK_D']}"
    return Cost(0, 0, moved, 0, launch.ctas, 0, 0, 0, 0.0, tile, 0.0, 0.0, _hbm_seconds(gpu, moved))


def _scatter_bytes(a: dict) -> int:
    """``out[t] = Σ_j w · y[row(t, j)]``: each assignment's row read once, each token written once."""
    y: TensorInfo = a["y_ptr"]
    out: TensorInfo = a["out_ptr"]
    asg: TensorInfo = a["assignment_row_ptr"]
    d = out.shape[1]
    weights = asg.numel * a["weights_ptr"].itemsize if a["HAS_WEIGHTS"] else 0
    return asg.numel * d * y.itemsize + out.nbytes + asg.nbytes + weights


def _gather_bytes(a: dict) -> int:
    """``out[i] = w · x[token(i)]``: every sorted row written, its token row read."""
    x: TensorInfo = a["x_ptr"]
    out: TensorInfo = a["out_ptr"]
    return out.numel * (x.itemsize + out.itemsize) + a["row_assignment_ptr"].nbytes


def _weights_grad_bytes(a: dict) -> int:
    """``dw[t, j] = <a[t], b[row(t, j)]>``: each assignment reads its token's row and its sorted row."""
    out: TensorInfo = a["out_ptr"]
    d = a["a_ptr"].shape[1]
    return out.numel * d * (a["a_ptr"].itemsize + a["b_ptr"].itemsize) + out.nbytes + a["assignment_row_ptr"].nbytes


_QUANTIZE_OUTPUTS = {"quantize_kernel": ("q_ptr", "s_ptr"), "quantize_dual_kernel": ("qr_ptr", "sr_ptr", "qc_ptr",
                                                                                   "sc_ptr")}  # fmt: skip


def _quantize_cost(launch: Launch, gpu: Gpu) -> Cost:
    """A quantize pass (``kernels.quantize``): its input read twice (the maxima, then the values; the second time from
    L2 when the groups of the resident programs fit in it), the E4M3 values and scales written once (FP8 model)."""
    a = launch.args
    t: TensorInfo = a["t_ptr"]
    R, C = t.shape[-2:]
    if launch.kernel == "quantize_dual_kernel":  # a program: one row group x G columns
        rows, cols, tile = math.ceil(R / max(launch.grid[0], 1)), a["TG"], f"{a['TR']}x{a['TG']}"
    else:
        rows = (math.ceil(R / max(a["nR"], 1)) if a["ROW_BOUNDS"] else min(a["GR"], R)) if a["REDUCE_ROWS"] else a["TR"]
        cols = min(a["GC"], C) if a["REDUCE_COLS"] else a["TC"]
        tile = f"{a['TR']}x{a['TC']}"
    resident = min(launch.ctas, gpu.sms * (2048 // (a["num_warps"] * 32)))
    second_from_l2 = resident * rows * cols * t.itemsize <= gpu.l2_mb * 2**20
    written = sum(a[name].nbytes for name in _QUANTIZE_OUTPUTS[launch.kernel])
    hbm = t.nbytes * (1 if second_from_l2 else 2) + written
    l2 = 2 * t.nbytes
    return Cost(0, 0, hbm, l2, launch.ctas, 0, 0, 0, 0.0, tile, 0.0, l2 / (gpu.l2_tbps * 1e12), _hbm_seconds(gpu, hbm))


def launch_cost(launch: Launch, gpu: Gpu, rows: list[int], useful_rows: list[int]) -> Cost:
    """The cost of ``launch`` on ``gpu`` when expert e owns ``rows[e]`` sorted rows (block-padded for the
    block-sparse strategy) of which ``useful_rows[e]`` are assignments. A kernel without a cost function is an
    error (the model must learn every kernel the launchers use)."""
    if launch.kernel == "gemm_kernel":
        return _gemm_cost(launch, gpu, rows, useful_rows)
    if launch.kernel == "wgrad_kernel":
        return _wgrad_cost(launch, gpu, rows, useful_rows)
    if launch.kernel == "scatter_kernel":
        return _permute_cost(launch, gpu, _scatter_bytes(launch.args))
    if launch.kernel == "gather_kernel":
        return _permute_cost(launch, gpu, _gather_bytes(launch.args))
    if launch.kernel == "weights_grad_kernel":
        return _permute_cost(launch, gpu, _weights_grad_bytes(launch.args))
    if launch.kernel in QUANTIZE_KERNELS:
        return _quantize_cost(launch, gpu)
    if launch.kernel == "aten::_grouped_mm":
        return _grouped_mm_cost(launch, gpu, rows, useful_rows)
    if launch.kernel.startswith("routing::"):  # a step of the routing extension: its share of the plan's bytes
        moved = launch.args["bytes"]
        return Cost(0, 0, moved, 0, 1, 0, 0, 0, 0.0, "-", 0.0, 0.0, _hbm_seconds(gpu, moved))
    raise ValueError(f"bench.model has no cost function for the kernel {launch.kernel!r}")


def eager_time(op: EagerOp, gpu: Gpu) -> float:
    """Seconds of one eager op: its bytes at HBM speed, or its atomic additions at the GPU's atomic rate where those
    take longer, plus the launch."""
    return max(_hbm_seconds(gpu, op.bytes), op.atomics / gpu.atomics_per_s) + _OVERHEAD_S
