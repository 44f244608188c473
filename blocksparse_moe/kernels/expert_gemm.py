"""The two matmul kernels behind every expert GEMM, and their launchers: ``gemm_kernel`` (rows of one expert times
that expert's weight, with a fused gather and fused epilogues; launched by ``gemm``) and ``wgrad_kernel`` (an
expert's weight gradient, a reduction over its rows; launched by ``wgrad``), and ``scale_chunks_kernel``, the copy
of MX scales into tcgen05's layout that ``gemm`` runs on sm_100 (``SW_TMA`` / ``SA_TMA``, under FP8 below). They
serve both dropless strategies and every public op:

=============================  =============================================================================
``sdd`` / ``dsd`` / ``dds_t``  ``gemm_kernel``, block-sparse operand or result in the blocked row layout
``dsd_t`` / ``dds``            ``wgrad_kernel``, block-sparse operand in the blocked row layout
``grouped_mm`` / ``_wgrad``    the same two kernels with dense row layouts (and the gather fused)
fused MLP (both strategies)    up-projection with the GLU pair and activation in the epilogue; its backward
                               dgrad with ``act'`` / GLU products / top-k weight gradient in the epilogue
=============================  =============================================================================

Design origin: MegaBlocks' SDD/DSD over an expert topology and grouped GEMMs (``torch._grouped_mm``); the gated
up-projection with SwiGLU in the epilogue and dSwiGLU in the dgrad epilogue follow SonicMoE; the program order is
the grouped ordering of Triton's matmul tutorial.

**Row layouts and the tile schedule**: ``layouts`` (gathered, dense and blocked rows, one address formula; the M
tiles of each expert and the tile -> expert map ``tile_expert``, built on the device). The row part of an address is
computed once per tile (from ``row_src`` when gathering); in the main loop the column part of a K step ``k0 .. k0 +
BLOCK_K`` (``BLOCK_K | B``) is the scalar ``(k0 >> LB)·s_cb + (k0 & (B-1))·s_c`` plus a constant vector: **the main
loops hold no index load and no integer division**, only address increments, loads and MMA (the gathered reduction
of ``wgrad_kernel`` loads ``row_src`` in its loop; the pipeliner gives that index load its own stage, so the data
loads stay in flight).

**Weight loads** (``W_TMA``: ``WeightLoad``). Where operands allow (Hopper or newer, 16-byte aligned weights with
16-byte multiple strides, the fast config), ``gemm_kernel`` reads the weight tiles through TMA with host tensor
descriptors: over ``[E, K, N]`` as stored (``TMA``), or over the transposed storage for the ``wᵀ`` views of the
backward (``TMA_T``), the tile transposed in shared memory; K and N past the end come back as zeros. Otherwise
pointer loads (``POINTERS``). Each weight is read with its own strides (or its own descriptor): a GLU gate or a
pair's second weight may be stored differently from the first (both then load by pointers unless both can use the
same TMA mode). ``gemm_kernel``'s rows stay pointer loads (gathered: TMA has no row gather on Hopper), pipelined as
asynchronous copies, but for gathered rows on sm_100 outside the warp-specialized loop (``A_TMA`` ``GATHER4``:
Blackwell's TMA row gather, ``tl.tensor_descriptor.gather`` over a host descriptor of the token rows;
``_gather_load``; 16-bit rows, and E4M3 rows at K steps of 128 or more): the GLU forward and the backward epilogue
there (and the FP8 GEMMs that leave that loop for it: ``fp8_rows_warp_specialized``), and for an FP8 A of dense rows
outside the warp-specialized loop (``A_TMA`` ``TMA``, ``_dense_a_tma``: the down GEMM's a, the dgrad pair's dh and
dg) from a host descriptor over ``[R, K]``, an M tile per box from the tile's first row (the rows past its expert's
end load other experts' rows, or TMA's zeros past A's last row: their results are never stored). ``wgrad_kernel``
reads a dense row operand (not gathered, not blocked; 16-bit or E4M3, 16-byte aligned: ``_row_tma``, ``A_TMA`` /
``B_TMA``) through a tensor descriptor it builds on the device over the expert's rows ``[0, end)``, so that TMA's
zero fill masks the rows past the expert (launch-time scratch memory: ``_common.scratch_allocator``): over ``[rows,
cols]`` (``TMA``), or for an E4M3 operand stored K-major (unit row stride: a ``[cols, rows]`` tensor's transposed
view) with 16-aligned expert offsets (``row_align``) over that storage (``TMA_T``: sm_90's E4M3 wgmma reads K-major
shared tiles only, and copies the others through registers into K-major buffers every K step: 547 -> 87 instructions
per 128-row step, rowwise); its gathered operand stays on asynchronous copies (on sm_100 TMA's row gather costs more
loop instructions there: docs/audit.md).

**Program order (L2).** ``gemm_kernel`` runs the ``max_m_tiles · cdiv(N, BLOCK_N)`` output tiles of ``BLOCK_M ×
BLOCK_N`` (``_gemm_tile``), each reading its expert from ``tile_expert`` (one index load per tile, outside the K
loop). On sm_100 with TMA weights (the fast config) the kernel is persistent (``PERSISTENT``) and its K loop
warp-specialized (``WARP_SPEC``: the TMA weight loads in a producer partition; 96 registers and 2 CTAs per SM, one
CTA barrier fewer per K step): ``P = min(tiles, SMs · programs_per_sm)`` programs (``persistent_programs``; the
config's ``programs_per_sm``, the CTAs per SM its build holds: 2, or 1) loop over the tiles, program p taking tiles
p, p + P, ...; so it is when interpreting (a few programs, for the tests).
Elsewhere one program runs one tile: the tile loop alone costs registers (sm_90: 102 -> 162 for the dense
``grouped_mm``, one CTA per SM; spills in sm_80 / sm_100 / sm_120 fallback builds). The tiles are numbered in
Triton's *grouped* order: ``GROUP_M`` consecutive M tiles (the same expert, except at expert boundaries) sweep the N
tiles together, so the programs resident at one time (consecutive tiles) share their weight columns and their A rows
in L2 instead of re-reading the weights once per M tile. ``wgrad_kernel``: grid ``(E · tiles_m · tiles_n,)``,
expert-major (the programs of one expert share its rows), grouped order inside.

**Swapped operands** (``SWAP_AB``: ``GemmConfig.swap_ab``, small M tiles; TensorRT-LLM / vLLM do so for decode):
the K loops accumulate the tile transposed, ``accᵀ [BLOCK_N, BLOCK_M] += Wᵀ · Aᵀ`` (``_mma``), so that the weight's
columns are the MMA's M (wgmma and tcgen05 need M >= 64; Triton runs smaller M on mma.sync) and the tile's few rows
its N (multiples of 8 / 16 from 16); the accumulators are transposed back once after the K loops (a layout
conversion per tile) and every epilogue runs unchanged. 16- and 32-bit operands, and ``FP8`` ``MX`` (``_fp8_dot``:
sm_100's 64-row tiles, native block-scaled MMAs of M = 128; blockwise and rowwise measured no better swapped).

**Epilogues** of ``gemm_kernel`` (``EPILOGUE``: ``Epilogue``), one ``@triton.jit`` helper each:

- ``PLAIN`` (``_store_plain``): ``out = acc`` (``PAIR``: ``acc = A @ W + A2 @ W2``, e.g. the dgrad
  ``[dh | dg] @ [w1 | w3]ᵀ``); FP8 rowwise in column slices of ``EPI_N`` (``_rowwise_plain_epilogue``, below);
- ``FORWARD`` (``_forward_epilogue``): ``h = acc`` (and ``GLU``: ``g = acc2``, the gate weight's accumulator over
  the same A tiles); stores ``h`` [, ``g``] and ``a = act(h) [· g]`` (computed from the rounded h, g, as the
  backward recomputes it), in column slices of ``EPI_N`` as the backward epilogue (``_sliced_forward_epilogue``:
  sm_100's 128-wide GLU tile in slices of 32, FP8 rowwise without GLU in slices of 16; one slice, the whole tile,
  in the other GPU configs), or with
  ``QUANT_A`` (an FP8 mode of ``EPILOGUE_QUANT``: MX) a as E4M3 bits plus one scale per row and group of the mode's
  columns (``_quantized_forward_epilogue``: group by group, a column slice of the accumulators each as in the
  backward epilogue, a rounded to h's dtype, then ``kernels.quantize``'s helpers: bit for bit ``quantize(a, (1,
  group))`` of the a written otherwise; ``gemm(..., act_scales=)``, the FP8 MLP's up-projection:
  ``backends.triton_fp8``);
- ``BACKWARD`` (``_backward_epilogue``): ``acc = G = dout[token] @ w2ᵀ`` at the tile; with ``w`` the row's top-k
  weight and ``a`` recomputed from the saved ``h``, ``g``: stores ``dh = w·G·g·act'(h)``, ``dg = w·G·act(h)``,
  ``aw = w·a`` (for ``dW2``) and ``dots[n_tile, p] = Σ_tile G·a`` (the top-k weight gradient ``<dout @ w2ᵀ, a>``,
  reduced over the N tiles afterwards, deterministically). Full-width tiles: the accumulator is split into column
  slices of ``EPI_N`` (``tl.split`` halvings) and the epilogue runs slice by slice, loading h and g per slice, so
  that only one slice's temporaries are live beside the accumulator.

**FP8** (``FP8``: ``Fp8Mode``; issue 17, the recipes of ``blocksparse_moe.fp8``): ``gemm_kernel`` reads E4M3 A
(dense or gathered) and weights with their scales (``GemmScales``, ``fp8.quantize``'s layouts, read through their
strides; a gathered A's scales are its tokens'), accumulates in fp32 and runs every epilogue unchanged on the fp32
accumulator; the output in out's dtype. ``BLOCKWISE``: each K step's MMA into a fresh accumulator, promoted as
``acc += p · (sa · sw)[:, None]`` (A's scales of the step's 128-wide K group per row; ``sw`` the scale of the tile's
128 × 128 weight block, ``BLOCK_N | 128``), as DeepSeek-V3 / DeepGEMM promote; ``MX``: ``tl.dot_scaled`` with the E8M0
scale tiles of A ``[BLOCK_M, BLOCK_K / 32]`` and W ``[BLOCK_N, BLOCK_K / 32]`` (block-scaled tcgen05 on sm_100, emulated
by Triton elsewhere; masked scales read 127, never the NaN 255); on sm_100 with tiles of whole 128 × 4 scale chunks
(``SW_TMA``: ``_mx_scales_tma``) W's scale tiles come by TMA from a host descriptor over a copy of ``GemmScales.w`` /
``w2`` in tcgen05's scale-factor layout (``_mx_scale_chunks``), and a dense A's (``SA_TMA``) from one over a copy of
``GemmScales.a`` / ``a2`` per M tile of the schedule (``_mx_tile_scales``: an M tile starts at any expert offset), each
by one launch of ``scale_chunks_kernel`` per GEMM; the block-scaled MMA copies them from shared to tensor memory without
registers (``bench.audit``, the 128 × 128 down GEMM: 257 -> 180 loop instructions); a gathered A's (its tokens') stay
pointer loads; ``ROWWISE``: a plain E4M3 MMA, the accumulator scaled by ``sa[:, None] · sw[None, :]`` after the loop,
column slice by column slice in every epilogue (``_rowwise_slice``: A's row scales loaded once per tile, each slice's
column scales only for that slice, so that they never all sit beside the accumulator; the pair's second product in
its own accumulator, scaled by its own slice by slice and added). On sm_90 E4M3 wgmma reads K-major tiles only: weights
K-contiguous (a ``wᵀ`` view of ``[E, N, K]`` storage) run pipelined, N-contiguous ones wait wgmma to zero each step
(``bench.audit``). sm_80 has no E4M3 MMA.

**FP8 weight gradients** (``wgrad_kernel``'s ``FP8``: ``Fp8Mode``, ``wgrad(..., scales=WgradScales)``): dense E4M3
A and B quantized along the rows (``fp8.quantize_rows``: one scale per column and group of ``G`` rows of one
expert, groups from each expert's first row; ``group_offsets[e]`` expert e's first group), so the K step from row
``r0`` reads the scales of the groups ``group_offsets[e] + (r0 - start) // G``: ``BLOCKWISE`` (G = 128, ``BLOCK_K |
128``) promotes each step's MMA (a fresh accumulator) with the step's group scales, ``acc += p · sa[:, None] ·
sb[None, :]`` (DeepSeek-V3); ``MX`` (G = 32) runs ``tl.dot_scaled`` with the step's ``BLOCK_K / 32`` E8M0 scale
columns (groups past the expert's end, whose rows are zeros, read its last group's scales: never another
expert's);
``ROWWISE`` (one group per expert) a plain E4M3 ``tl.dot``, the scales applied once after the loop.

The launchers choose the config and the grid and launch; the ops validate the operands (``ops._checks``) and the
backend allocates (``backends.triton``). Limits: fp32 / fp16 / bf16 operands of one dtype, or E4M3 with scales,
fp32 accumulation, output in the input dtype (FP8: out's); blocked layouts need ``B`` a power of two ``≥ BLOCK_K``;
int32 indices with 64-bit address arithmetic.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..activations import activate, activate_and_grad, kernel_code
from ..config import FLOAT_DTYPES, INDEX_DTYPES
from ..fp8 import E4M3, Recipe, recipe
from ..validation import check_dtype, check_same_device, check_tensor, choice, positive_int
from ._common import DOTS_IEEE, DOTS_UPCAST, aligned16, capability, dot_mode, interpreting, scratch_allocator
from .layouts import BLOCK_SIZES, GPU_BLOCK_SIZES, Rows, Schedule, row_offsets, row_start, tile_start
from .quantize import bf16_to_fp32, quantize_row_groups

__all__ = [
    "BLOCK_SIZES",
    "GPU_BLOCK_SIZES",
    "Epilogue",
    "WeightLoad",
    "Fp8Mode",
    "GemmScales",
    "WgradScales",
    "FP8_RECIPES",
    "EPILOGUE_QUANT",
    "GemmConfig",
    "gemm_config",
    "wgrad_config",
    "BackwardEpilogue",
    "TMA_WEIGHTS",
    "persistent_programs",
    "mx_chunk_tiles",
    "fp8_rows_warp_specialized",
    "row_gather_step",
    "gemm",
    "wgrad",
    "gemm_kernel",
    "wgrad_kernel",
    "scale_chunks_kernel",
]


class Epilogue(enum.IntEnum):
    """``gemm_kernel``'s ``EPILOGUE`` (module docstring)."""

    PLAIN = 0  # out = acc
    FORWARD = 1  # h [, g], a = act(h) [· g]
    BACKWARD = 2  # dh [, dg], aw, the top-k weight gradient's dots


class WeightLoad(enum.IntEnum):
    """``gemm_kernel``'s ``W_TMA``: how the weight tiles come in, its ``A_TMA``: how gathered A rows do
    (``POINTERS`` or ``GATHER4``); ``wgrad_kernel``'s ``A_TMA`` / ``B_TMA``: how a dense row operand ``[rows, cols]``
    does (``TMA_T``: over its transposed storage ``[cols, rows]``, K-major). ``GATHER4`` is Blackwell's TMA row
    gather (sm_100: ``tl.tensor_descriptor.gather``, one ``[1, BLOCK_K]`` box per row); a row index of -1 (a spare
    row, or a row past the expert's end) reads zeros, as the masked loads do."""

    POINTERS = 0  # pointer loads, any strides
    TMA = 1  # a tensor descriptor over [E, K, N] (N contiguous)
    TMA_T = 2  # a tensor descriptor over the transposed storage [E, N, K] (a wᵀ view)
    GATHER4 = 3  # gathered rows: a host descriptor over the token rows [T, K], block [1, BLOCK_K], TMA gather4


class Fp8Mode(enum.IntEnum):
    """``gemm_kernel``'s and ``wgrad_kernel``'s ``FP8``: the operands are E4M3 with the scales of a recipe
    (``blocksparse_moe.fp8``), fp32 accumulation."""

    NONE = 0  # 16- or 32-bit operands, no scales
    BLOCKWISE = 1  # fp32 scales: A per row and 128 of K, W per 128 × 128 block; applied per K group in the loop
    MX = 2  # E8M0 (uint8) scales: A per row and 32 of K, W per column and 32 of K; ``tl.dot_scaled``
    ROWWISE = 3  # fp32 scales: A per row, W per column; applied to the accumulator after the loop

    def recipe(self) -> Recipe:
        """The ``fp8`` recipe whose scales the mode reads (``NONE``: none, a ``ValueError``)."""
        if self == Fp8Mode.NONE:
            raise ValueError("Fp8Mode.NONE has no FP8 recipe")
        return FP8_RECIPES[self]


@dataclass(frozen=True)
class GemmScales:
    """The scales of ``gemm``'s E4M3 operands (``fp8.quantize``'s layouts, any strides): ``a [rows of a.tensor
    (tokens when gathered), nK]`` and the weights' ``w [E, nK, nN]`` for ``w [E, K, N]`` (blockwise ``[E, cdiv(K,
    128), cdiv(N, 128)]``, mx ``[E, cdiv(K, 32), N]``, rowwise ``[E, 1, N]``; a transposed weight view's scales are
    the same transposed view); ``w2`` the GLU gate's or the pair's second weight's, ``a2`` the pair's second A's."""

    mode: Fp8Mode
    a: torch.Tensor
    w: torch.Tensor
    w2: torch.Tensor | None = None
    a2: torch.Tensor | None = None


@dataclass(frozen=True)
class WgradScales:
    """The scales of ``wgrad``'s E4M3 operands, both quantized along the rows (``fp8.quantize_rows``: per column,
    per group of one expert's rows): ``a [groups + 1, M]``, ``b [groups + 1, N]`` (``b2`` likewise) and
    ``group_offsets [E + 1]`` int32, the first group of each expert (``fp8.group_offsets``)."""

    mode: Fp8Mode
    a: torch.Tensor
    b: torch.Tensor
    group_offsets: torch.Tensor
    b2: torch.Tensor | None = None


# the modes as the kernels read them (a @triton.jit function reads only constexpr globals)
_PLAIN = tl.constexpr(Epilogue.PLAIN)
_FORWARD = tl.constexpr(Epilogue.FORWARD)
_BACKWARD = tl.constexpr(Epilogue.BACKWARD)
_TMA = tl.constexpr(WeightLoad.TMA)
_TMA_T = tl.constexpr(WeightLoad.TMA_T)
_GATHER4 = tl.constexpr(WeightLoad.GATHER4)
_NO_FP8 = tl.constexpr(Fp8Mode.NONE)
_BLOCKWISE = tl.constexpr(Fp8Mode.BLOCKWISE)
_MX = tl.constexpr(Fp8Mode.MX)
_ROWWISE = tl.constexpr(Fp8Mode.ROWWISE)
_DOTS_UPCAST = tl.constexpr(DOTS_UPCAST)
_DOTS_IEEE = tl.constexpr(DOTS_IEEE)
# the recipe of each FP8 mode (``fp8``: its groups and scale dtype)
FP8_RECIPES: dict[Fp8Mode, Recipe] = {
    Fp8Mode.BLOCKWISE: recipe("blockwise"),
    Fp8Mode.MX: recipe("mxfp8"),
    Fp8Mode.ROWWISE: recipe("rowwise"),
}
# elements of the reduced dimension per scale: gemm_kernel's K, wgrad_kernel's rows (128 blockwise, 32 mx)
_BLOCKWISE_GROUP = tl.constexpr(FP8_RECIPES[Fp8Mode.BLOCKWISE].group)
_MX_GROUP = tl.constexpr(FP8_RECIPES[Fp8Mode.MX].group)
# the scale-factor chunk of block-scaled tcgen05 MMAs: 128 rows (W's columns, A's rows) x 4 MX groups, 512 bytes laid
# out as [32, 4, 4] (row 32·i + j, group q at byte 16·j + 4·i + q): _mx_scale_chunks, SW_TMA / SA_TMA
_MX_CHUNK_ROWS = tl.constexpr(128)
_MX_CHUNK_GROUPS = tl.constexpr(4)
# the FP8 modes whose forward epilogue can write ``a`` quantized (``gemm(..., act_scales=)``, ``QUANT_A``): groups of
# columns that whole tiles hold (MX: 32; the FP8 GLU tiles are 32 or 64 wide). Not BLOCKWISE: its 128-column groups
# need 128-wide GLU tiles (two 128 x 128 accumulators and the promotion's step result spill: backends.triton_fp8);
# not ROWWISE: a row's one scale spans every N tile
EPILOGUE_QUANT: tuple[Fp8Mode, ...] = (Fp8Mode.MX,)


@triton.jit
def _grouped_order(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Triton's grouped program order: ``GROUP_M`` consecutive M tiles sweep the N tiles together."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _load_w(w_ptr, w_desc, w_off, w_mask, e, k0, n0, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, W_TMA: tl.constexpr):
    """The ``BLOCK_K × BLOCK_N`` weight tile at ``(k0, n0)`` of expert ``e`` (``W_TMA``, a ``WeightLoad``): pointer
    loads, or TMA through a host tensor descriptor over ``[E, K, N]`` (``TMA``) or over the transposed storage
    ``[E, N, K]`` (``TMA_T``; the tile is transposed in shared memory, which the MMA reads as is). TMA fills what lies
    past K or N with zeros."""
    if W_TMA == _TMA:
        w = w_desc.load([e, k0, n0]).reshape(BLOCK_K, BLOCK_N)
    elif W_TMA == _TMA_T:
        w = w_desc.load([e, n0, k0]).reshape(BLOCK_N, BLOCK_K).trans()
    else:
        w = tl.load(w_ptr + w_off, mask=w_mask, other=0.0)
    return w


@triton.jit
def _dot(a, b, acc, DOTS: tl.constexpr):
    """``acc + a @ b`` as ``DOTS`` says (``kernels._common.dot_mode``): fp32 operands at IEEE precision where
    PyTorch's fp32 matmul setting asks for it, else the tensor cores' native input type (fp32 as TF32)."""
    if DOTS == _DOTS_IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _mma(a, w, acc, DOTS: tl.constexpr, SWAP_AB: tl.constexpr):
    """One K step of ``gemm_kernel``'s main loop (``FP8`` none): ``acc + a @ w`` (``acc [BLOCK_M, BLOCK_N]``), or with
    ``SWAP_AB`` the transposed product ``acc + wᵀ @ aᵀ`` (``acc [BLOCK_N, BLOCK_M]``): the weight's columns are the
    MMA's M and the tile's few rows its N, so that wgmma / tcgen05 (M >= 64) take tiles of 16 or 32 rows
    (``_gemm_tile`` transposes the accumulator back once, after the K loop)."""
    if SWAP_AB:
        return _dot(w.trans(), a.trans(), acc, DOTS)
    else:
        return _dot(a, w, acc, DOTS)


@triton.jit
def _scale_chunks(desc, outer, chunk, t, ROWS: tl.constexpr, SG: tl.constexpr):
    """The E8M0 scale tile ``[ROWS, SG]`` of K step ``t`` (``SG`` groups of 32 per step) through ``desc``, a host
    descriptor over tcgen05's scale-factor chunks ``[outer, rows / 128, groups / 4, 2, 256]``
    (``_mx_scale_chunks``): the ``ROWS / 128 × SG / 4`` chunks at ``[outer, chunk, t · SG / 4]``, reshaped to rows ×
    groups (sm_100's block-scaled MMA copies them from shared to tensor memory without registers)."""
    CR: tl.constexpr = ROWS // _MX_CHUNK_ROWS
    CK: tl.constexpr = SG // _MX_CHUNK_GROUPS
    s = desc.load([outer, chunk, t * CK, 0, 0])
    return s.reshape(CR, CK, 32, 4, _MX_CHUNK_GROUPS).trans(0, 3, 2, 1, 4).reshape(ROWS, SG)


@triton.jit
def _fp8_dot(acc, a, w, sa_ptr, sa_rows, s_sak, sa_desc, m_tile, sw_ptr, sw_cols, s_swk, sw_desc, e, n0, row_ok, n_ok,
             t, k_groups, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr, SA_TMA: tl.constexpr,
             SW_TMA: tl.constexpr, SWAP_AB: tl.constexpr):  # fmt: skip
    """One K step ``acc += A_t @ W_t`` of E4M3 tiles with their scales (``FP8``, an ``Fp8Mode``) at step ``t``:

    - ``BLOCKWISE``: the step lies in K group ``t·BLOCK_K // 128`` (``BLOCK_K | 128``); its MMA into a fresh
      accumulator, promoted as ``acc += p · (sa · sw)[:, None]`` (``sa``: the rows' scales of the group, masked: 0;
      ``sw``: the scale of the tile's 128 × 128 weight block, one scalar as ``BLOCK_N | 128``, at ``sw_cols``): one
      FFMA per element and step;
    - ``MX``: ``tl.dot_scaled`` with the E8M0 scale tiles ``[BLOCK_M, BLOCK_K // 32]`` of A and ``[BLOCK_N,
      BLOCK_K // 32]`` of W (``sw_cols``: W's column offsets of the scales); masked scales read 127 (2^0: finite, as
      the masked operands are 0; ``k_groups``: the K groups of 32); with ``SW_TMA`` W's scale tile comes through
      the host descriptor ``sw_desc`` over the tcgen05 chunks of expert ``e`` from column ``n0``, with ``SA_TMA``
      A's through ``sa_desc`` over those of M tile ``m_tile`` (``_scale_chunks``: the padding reads 127, past the
      chunks 0, 2^-127 on the zero columns / K steps TMA fills: finite);
    - ``ROWWISE`` (and ``NONE``): a plain ``tl.dot`` (the scales are applied after the loop, by the epilogues
      column slice by column slice: ``_rowwise_slice``).

    ``SWAP_AB`` (``MX`` only): ``acc`` transposed, ``accᵀ += W_tᵀ @ A_tᵀ``: ``tl.dot_scaled`` with W as the left
    operand, its scales first."""
    if FP8 == _BLOCKWISE:
        group = t // (_BLOCKWISE_GROUP // BLOCK_K)  # BLOCK_K | 128: t itself at the aligned configs' BLOCK_K = 128
        sa = tl.load(sa_ptr + sa_rows + tl.cast(group, tl.int64) * s_sak, mask=row_ok, other=0.0)
        sw = tl.load(sw_ptr + tl.cast(group, tl.int64) * s_swk + sw_cols)
        acc += tl.dot(a, w) * (sa * sw)[:, None]
    elif FP8 == _MX:
        SG: tl.constexpr = BLOCK_K // _MX_GROUP  # scale groups per step
        g = t * SG + tl.arange(0, SG)
        g_ok = g < k_groups
        g64 = g.to(tl.int64)
        if SA_TMA:
            sa = _scale_chunks(sa_desc, m_tile, 0, t, a.shape[0], SG)
        else:
            sa = tl.load(sa_ptr + sa_rows[:, None] + (g64 * s_sak)[None, :], mask=row_ok[:, None] & g_ok[None, :],
                         other=127)  # fmt: skip
        if SW_TMA:
            sw = _scale_chunks(sw_desc, e, n0 // _MX_CHUNK_ROWS, t, BLOCK_N, SG)
        else:
            sw = tl.load(sw_ptr + sw_cols[:, None] + (g64 * s_swk)[None, :], mask=n_ok[:, None] & g_ok[None, :],
                         other=127)  # fmt: skip
        if SWAP_AB:
            acc = tl.dot_scaled(w.trans(), sw, "e4m3", a.trans(), sa, "e4m3", acc)
        else:
            acc = tl.dot_scaled(a, sa, "e4m3", w, sw, "e4m3", acc)
    else:
        acc = tl.dot(a, w, acc)
    return acc


@triton.jit
def _rowwise_slice(x, sa, sw_ptr, s_swn, cols, n0, N, used):
    """``FP8`` ``ROWWISE``: the column slice ``x [BLOCK_M, len(cols)]`` of an accumulator (the tile's columns
    ``cols``, from ``n0``) scaled as ``x · sa[:, None] · sw[None, :]``: ``sa`` its rows' scales (A's, loaded once
    per tile), ``sw`` its columns' (W's, the expert's, at ``sw_ptr``, columns ``s_swn`` apart; loaded here, so that
    only one slice's column scales are live; 0 past N and in the zeroing tiles, not ``used``)."""
    cols_ok = tl.where(used, n0 + cols < N, False)  # (tl.where: the interpreter rejects `mask & used`)
    sw = tl.load(sw_ptr + (n0 + cols).to(tl.int64) * s_swn, mask=cols_ok, other=0.0)
    return x * sa[:, None] * sw[None, :]


@triton.jit
def _mainloop(
    acc,
    acc2,
    a_ptr,
    a_rows,
    a_desc,
    a_idx,
    s_acb,
    s_ac,
    w_ptr,
    w2_ptr,
    w_desc,
    w2_desc,
    e,
    n0,
    s_wk,
    s_wn,
    s_w2k,
    s_w2n,
    offs_n,
    n_ok,
    row_ok,
    k_steps,
    K,
    sa_ptr,
    sa_rows,
    s_sak,
    sw_ptr,
    sw_cols,
    s_swk,
    sw2_ptr,
    sw2_cols,
    s_sw2k,
    sw_desc,
    sw2_desc,
    sa_desc,
    m_tile,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LB_A: tl.constexpr,
    DUAL: tl.constexpr,
    W_TMA: tl.constexpr,
    WARP_SPEC: tl.constexpr,
    DOTS: tl.constexpr,
    FP8: tl.constexpr,
    A_TMA: tl.constexpr,
    SA_TMA: tl.constexpr,
    SW_TMA: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    """``acc += A[rows, :K] @ W[:K, cols]`` (and ``acc2 += A @ W2`` when ``DUAL``), ``BLOCK_K`` at a time over
    ``k_steps`` steps. ``a_rows``: the tile's row offsets into A (``A_TMA`` ``GATHER4``: its rows ``a_idx`` of the
    descriptor ``a_desc``, -1 for none, gathered by TMA); ``w_ptr`` / ``w2_ptr``: the expert's weights, each
    read with its own strides (``s_wk, s_wn`` / ``s_w2k, s_w2n``), or their descriptors ``w_desc`` / ``w2_desc``
    with ``W_TMA``, at expert ``e``, columns from ``n0``. ``WARP_SPEC``: the loop's TMA weight loads in a producer
    partition of warps, the MMA and the row copies in the consumer (``tl.range(..., warp_specialize=True)``).
    ``FP8`` (``Fp8Mode``, E4M3 operands): the scales of A (``sa_ptr + sa_rows``, K groups ``s_sak`` apart) and of W /
    W2 (the expert's, ``sw_cols`` / ``sw2_cols`` the tile's column offsets, K groups ``s_swk`` / ``s_sw2k`` apart)
    are applied in each step (``_fp8_dot``; ``SW_TMA``: W's / W2's MX scales through ``sw_desc`` / ``sw2_desc``,
    ``SA_TMA``: A's through ``sa_desc`` at M tile ``m_tile``); unused otherwise. ``SWAP_AB``: the accumulators
    transposed, ``accᵀ += Wᵀ @ Aᵀ`` (``_mma``; ``_fp8_dot``: MX)."""
    offs_k = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + a_rows[:, None] + (offs_k.to(tl.int64) * s_ac)[None, :]
    w_tile = offs_k.to(tl.int64)[:, None] * s_wk + offs_n.to(tl.int64)[None, :] * s_wn
    w2_tile = offs_k.to(tl.int64)[:, None] * s_w2k + offs_n.to(tl.int64)[None, :] * s_w2n
    k_groups = tl.cdiv(K, _MX_GROUP)  # FP8 MX: the K groups of the scales (masks)
    for t in tl.range(0, k_steps, warp_specialize=WARP_SPEC):
        k_ok = (t * BLOCK_K + offs_k) < K
        if A_TMA == _GATHER4:
            a = a_desc.gather(a_idx, t * BLOCK_K)
        elif A_TMA == _TMA:  # dense rows from the tile's first, a_idx (past the expert's end: never stored)
            a = a_desc.load([a_idx, t * BLOCK_K])
        else:
            a_off = tile_start(t, s_acb, s_ac, BLOCK_K, LB_A)
            a = tl.load(a_tile + a_off, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_off = tl.cast(t, tl.int64) * (BLOCK_K * s_wk) + w_tile
        w_mask = k_ok[:, None] & n_ok[None, :]
        w = _load_w(w_ptr, w_desc, w_off, w_mask, e, t * BLOCK_K, n0, BLOCK_K, BLOCK_N, W_TMA)
        if DOTS == _DOTS_UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        if FP8 == _NO_FP8:
            acc = _mma(a, w, acc, DOTS, SWAP_AB)
        else:
            acc = _fp8_dot(
                acc, a, w, sa_ptr, sa_rows, s_sak, sa_desc, m_tile, sw_ptr, sw_cols, s_swk, sw_desc, e, n0, row_ok,
                n_ok, t, k_groups, BLOCK_K, BLOCK_N, FP8, SA_TMA, SW_TMA, SWAP_AB,
            )  # fmt: skip
        if DUAL:
            w2_off = tl.cast(t, tl.int64) * (BLOCK_K * s_w2k) + w2_tile
            w2 = _load_w(w2_ptr, w2_desc, w2_off, w_mask, e, t * BLOCK_K, n0, BLOCK_K, BLOCK_N, W_TMA)
            if DOTS == _DOTS_UPCAST:
                w2 = w2.to(tl.float32)
            if FP8 == _NO_FP8:
                acc2 = _mma(a, w2, acc2, DOTS, SWAP_AB)
            else:
                acc2 = _fp8_dot(
                    acc2, a, w2, sa_ptr, sa_rows, s_sak, sa_desc, m_tile, sw2_ptr, sw2_cols, s_sw2k, sw2_desc, e, n0,
                    row_ok, n_ok, t, k_groups, BLOCK_K, BLOCK_N, FP8, SA_TMA, SW_TMA, SWAP_AB,
                )  # fmt: skip
    return acc, acc2


@triton.jit
def _store_plain(acc, out_ptr, o_off, store):
    """``EPILOGUE`` ``PLAIN``: ``out = acc`` in out's dtype."""
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=store)


@triton.jit
def _rowwise_plain_epilogue(
    acc, acc_b, out_ptr, o_rows, o_col0, s_oc, row_ok, n0, N, N_STORE, sa, sa2, sw_ptr, s_swn, sw2_ptr, s_sw2n, used,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EPI_N: tl.constexpr, PAIR: tl.constexpr,
):  # fmt: skip
    """``EPILOGUE`` ``PLAIN`` with ``FP8`` ``ROWWISE``: ``out = acc`` scaled (``_rowwise_slice``: ``sa`` and W's
    scales at ``sw_ptr``), with ``PAIR`` plus the second product (``acc_b``, its own accumulator) scaled by its own
    (``sa2``, W2's at ``sw2_ptr``), in ``BLOCK_N / EPI_N`` (a power of two, at most 16) column slices of ``EPI_N``
    (``_column_slices``): the products of scaling the whole accumulators after the loop, with only one slice's
    column scales live at a time."""
    parts = _column_slices(acc, BLOCK_M, BLOCK_N, EPI_N)
    parts_b = _column_slices(acc_b, BLOCK_M, BLOCK_N, EPI_N)  # PAIR only; unused (and removed) otherwise
    for j in tl.static_range(BLOCK_N // EPI_N):
        cols = j * EPI_N + tl.arange(0, EPI_N)
        x = _rowwise_slice(parts[j], sa, sw_ptr, s_swn, cols, n0, N, used)
        if PAIR:
            x += _rowwise_slice(parts_b[j], sa2, sw2_ptr, s_sw2n, cols, n0, N, used)
        o_off = o_rows[:, None] + (o_col0 + cols.to(tl.int64) * s_oc)[None, :]
        _store_plain(x, out_ptr, o_off, row_ok[:, None] & (n0 + cols < N_STORE)[None, :])


@triton.jit
def _forward_epilogue(acc, acc2, h_ptr, g_ptr, o_off, store, GLU: tl.constexpr, ACT: tl.constexpr):
    """``EPILOGUE`` ``FORWARD``: stores ``h = acc``, with ``GLU`` ``g = acc2``, and returns ``a = act(h) [· g]``
    computed from the rounded h and g (as the backward recomputes it), rounded to h's dtype."""
    dtype = h_ptr.dtype.element_ty
    h = acc.to(dtype)
    tl.store(h_ptr + o_off, h, mask=store)
    act = activate(h.to(tl.float32), ACT)
    if GLU:
        g = acc2.to(dtype)
        tl.store(g_ptr + o_off, g, mask=store)
        act = act * g.to(tl.float32)
    return act.to(dtype)


@triton.jit
def _column_slices(x, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr, SLICE: tl.constexpr):
    """``x [BLOCK_M, WIDTH]`` as its ``WIDTH / SLICE`` (a power of two, at most 16) column slices of ``SLICE``
    columns, in order (``_halves`` applied level by level: no data movement on an MMA accumulator)."""
    tl.static_assert(SLICE <= WIDTH and (WIDTH // SLICE) * SLICE == WIDTH and WIDTH // SLICE <= 16,
                     "WIDTH: at most 16 slices of SLICE columns")  # fmt: skip
    parts = (x,)
    for level in tl.static_range(4):  # halve every slice while it is wider than SLICE
        if (WIDTH >> level) > SLICE:
            halves = ()
            for i in tl.static_range(1 << level):
                halves = halves + _halves(parts[i], BLOCK_M, WIDTH >> level)
            parts = halves
    return parts


@triton.jit
def _sliced_forward_epilogue(
    acc, acc2, h_ptr, g_ptr, a_ptr, o_rows, o_col0, s_oc, row_ok, n0, N, N_STORE, sa, sw_ptr, s_swn, sw2_ptr, s_sw2n,
    used, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EPI_N: tl.constexpr, GLU: tl.constexpr, ACT: tl.constexpr,
    ROWWISE: tl.constexpr,
):  # fmt: skip
    """``EPILOGUE`` ``FORWARD`` (``QUANT_A`` none) in ``BLOCK_N / EPI_N`` (a power of two, at most 16) column slices
    of ``EPI_N`` (``_column_slices`` of both accumulators, as the backward epilogue): ``_forward_epilogue`` stores the
    slice's h [, g] and its ``a`` is stored, so that only one slice's h, g and a are live beside the accumulators
    (``EPI_N = BLOCK_N``: the whole tile at once). ``ROWWISE`` (``FP8``): each slice scaled first by its rows' and
    columns' scales (``_rowwise_slice``: A's ``sa``; W's / W2's, the expert's, at ``sw_ptr`` / ``sw2_ptr``, columns
    ``s_swn`` / ``s_sw2n`` apart), the same products as scaling the whole accumulators after the loop, without
    bringing them to registers at once."""
    hs = _column_slices(acc, BLOCK_M, BLOCK_N, EPI_N)
    gs = _column_slices(acc2, BLOCK_M, BLOCK_N, EPI_N)  # GLU only; unused (and removed) otherwise
    for j in tl.static_range(BLOCK_N // EPI_N):
        cols = j * EPI_N + tl.arange(0, EPI_N)
        o_off = o_rows[:, None] + (o_col0 + cols.to(tl.int64) * s_oc)[None, :]
        store = row_ok[:, None] & (n0 + cols < N_STORE)[None, :]
        h, g = hs[j], gs[j]
        if ROWWISE:
            h = _rowwise_slice(h, sa, sw_ptr, s_swn, cols, n0, N, used)
            if GLU:
                g = _rowwise_slice(g, sa, sw2_ptr, s_sw2n, cols, n0, N, used)
        a = _forward_epilogue(h, g, h_ptr, g_ptr, o_off, store, GLU, ACT)
        tl.store(a_ptr + o_off, a, mask=store)


@triton.jit
def _quantized_forward_epilogue(
    acc, acc2, h_ptr, g_ptr, q_ptr, sq_ptr, o_rows, o_col0, s_oc, rows, row_ok, n0, N, s_sqr, s_sqc,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GLU: tl.constexpr, ACT: tl.constexpr, MODE: tl.constexpr,
):  # fmt: skip
    """``EPILOGUE`` ``FORWARD`` with ``QUANT_A`` (``MODE``: MX, ``EPILOGUE_QUANT``), one group of 32 columns at a
    time (``_column_slices`` of the accumulators: ``32 | BLOCK_N``): ``_forward_epilogue`` stores the group's h [, g]
    and gives its ``a`` in h's dtype, stored as E4M3 bits with one E8M0 scale per row (``sq [row, column group]``),
    bit for bit ``kernels.quantize.quantize(a, (1, 32))`` of the ``a`` the epilogue writes otherwise: a widened to
    fp32 exactly (bf16 by its bits), the columns past N absent (0), then ``quantize_row_groups``."""
    tl.static_assert(MODE == _MX, "QUANT_A: MX only (EPILOGUE_QUANT)")
    GROUP: tl.constexpr = _MX_GROUP
    hs = _column_slices(acc, BLOCK_M, BLOCK_N, GROUP)
    gs = _column_slices(acc2, BLOCK_M, BLOCK_N, GROUP)
    for j in tl.static_range(BLOCK_N // GROUP):
        cols = j * GROUP + tl.arange(0, GROUP)
        valid = row_ok[:, None] & (n0 + cols < N)[None, :]
        o_off = o_rows[:, None] + (o_col0 + cols.to(tl.int64) * s_oc)[None, :]
        a = _forward_epilogue(hs[j], gs[j], h_ptr, g_ptr, o_off, valid, GLU, ACT)
        if a.dtype == tl.bfloat16:
            v = bf16_to_fp32(a.to(tl.int16, bitcast=True))
        else:
            v = a.to(tl.float32)
        bits, scale = quantize_row_groups(tl.where(valid, v, 0.0), True)
        tl.store(q_ptr + o_off, bits, mask=valid)
        s_off = rows.to(tl.int64)[:, None] * s_sqr + tl.cast(n0 // GROUP + j, tl.int64) * s_sqc
        group_ok = tl.where(n0 + j * GROUP < N, row_ok, False)  # (the interpreter rejects `row_ok & scalar`)
        tl.store(sq_ptr + s_off, scale, mask=group_ok[:, None])


@triton.jit
def _halves(x, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """Columns ``[0, WIDTH/2)`` and ``[WIDTH/2, WIDTH)`` of ``x [BLOCK_M, WIDTH]`` (no data movement on an MMA
    accumulator: the split column bit indexes each thread's registers)."""
    return tl.split(x.reshape(BLOCK_M, 2, WIDTH // 2).permute(0, 2, 1))


@triton.jit
def _backward_slice(
    G, j, dh_ptr, dg_ptr, aw_ptr, h_ptr, g_ptr, wr, o_rows, o_col0, s_oc, row_ok, n0, N, N_STORE,
    GLU: tl.constexpr, ACT: tl.constexpr, EPI_N: tl.constexpr,
):  # fmt: skip
    """The backward epilogue on column slice ``j`` (``EPI_N`` columns from ``n0 + j·EPI_N``) of the tile, ``G`` its
    columns of the accumulator: loads h [, g] there, stores dh [, dg] and aw, returns ``Σ G·a`` over the slice."""
    dtype = dh_ptr.dtype.element_ty
    cols = j * EPI_N + tl.arange(0, EPI_N)
    o_off = o_rows[:, None] + (o_col0 + cols.to(tl.int64) * s_oc)[None, :]
    valid = row_ok[:, None] & (n0 + cols < N)[None, :]
    store = row_ok[:, None] & (n0 + cols < N_STORE)[None, :]
    h = tl.load(h_ptr + o_off, mask=valid, other=0.0).to(tl.float32)
    act, dact = activate_and_grad(h, ACT)
    Gw = G * wr[:, None]
    dh = Gw * dact
    if GLU:
        g = tl.load(g_ptr + o_off, mask=valid, other=0.0).to(tl.float32)
        tl.store(dg_ptr + o_off, (Gw * act).to(dtype), mask=store)
        dh = dh * g
        act = act * g
    tl.store(dh_ptr + o_off, dh.to(dtype), mask=store)
    tl.store(aw_ptr + o_off, (act * wr[:, None]).to(dtype), mask=store)
    return tl.sum(tl.where(valid, G * act, 0.0), axis=1)


@triton.jit
def _backward_epilogue(
    acc, dh_ptr, dg_ptr, aw_ptr, h_ptr, g_ptr, row_asg_ptr, weights_ptr, dots_ptr, o_rows, o_col0, s_oc, rows,
    row_ok, n0, pid_n, R, N, N_STORE, sa, sw_ptr, s_swn, used, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EPI_N: tl.constexpr, GLU: tl.constexpr, ACT: tl.constexpr, ROWWISE: tl.constexpr,
):  # fmt: skip
    """``EPILOGUE`` ``BACKWARD``, ``acc = G = dout[token] @ w2ᵀ``: with ``w`` the row's top-k weight and ``a``
    recomputed from the saved ``h`` [, ``g``], stores ``dh = w·G·[g·]act'(h)``, (``GLU``) ``dg = w·G·act(h)``,
    ``aw = w·a`` and this N tile's ``dots[pid_n, row] = Σ G·a``. Processed in ``BLOCK_N / EPI_N`` (a power of two,
    at most 16) column slices of the accumulator (``_backward_slice``), so that only one slice of h, g and the
    results is live beside the accumulator; ``ROWWISE`` (``FP8``): each slice of G scaled first (``_rowwise_slice``:
    A's ``sa``, W's at ``sw_ptr``)."""
    asg = tl.load(row_asg_ptr + rows, mask=row_ok, other=-1)
    wr = tl.load(weights_ptr + tl.maximum(asg, 0).to(tl.int64), mask=asg >= 0, other=0.0).to(tl.float32)
    parts = _column_slices(acc, BLOCK_M, BLOCK_N, EPI_N)
    dots = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j in tl.static_range(BLOCK_N // EPI_N):
        G = parts[j]
        if ROWWISE:
            G = _rowwise_slice(G, sa, sw_ptr, s_swn, j * EPI_N + tl.arange(0, EPI_N), n0, N, used)
        dots += _backward_slice(
            G, j, dh_ptr, dg_ptr, aw_ptr, h_ptr, g_ptr, wr, o_rows, o_col0, s_oc, row_ok, n0, N, N_STORE, GLU,
            ACT, EPI_N,
        )  # fmt: skip
    tl.store(dots_ptr + pid_n.to(tl.int64) * R + rows, dots, mask=row_ok)


@triton.jit
def _gemm_tile(
    tile, a_ptr, w_ptr, a2_ptr, w2_ptr, w_desc, w2_desc, a_desc, a2_desc, sw_desc, sw2_desc, sa_desc, sa2_desc, out_ptr,
    out2_ptr, out3_ptr, h_ptr, g_ptr, row_src_ptr, row_asg_ptr, weights_ptr, dots_ptr, offsets_ptr, tile_offsets_ptr,
    tile_expert_ptr, sa_ptr, sa2_ptr, sw_ptr, sw2_ptr, sq_ptr, R, N, N_STORE, K, E, num_m_tiles, s_arb, s_ar, s_acb,
    s_ac, s_we, s_wk, s_wn, s_w2e, s_w2k, s_w2n, s_orb, s_or, s_ocb, s_oc, s_sar, s_sak, s_swe, s_swk, s_swn, s_sw2e,
    s_sw2k, s_sw2n, s_sqr, s_sqc,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EPI_N: tl.constexpr, GROUP_M: tl.constexpr,
    LB_A: tl.constexpr, LB_O: tl.constexpr, GATHER: tl.constexpr, GLU: tl.constexpr, PAIR: tl.constexpr,
    EPILOGUE: tl.constexpr, ACT: tl.constexpr, W_TMA: tl.constexpr, WARP_SPEC: tl.constexpr, DOTS: tl.constexpr,
    FP8: tl.constexpr, QUANT_A: tl.constexpr, A_TMA: tl.constexpr, SW_TMA: tl.constexpr, SA_TMA: tl.constexpr,
    SWAP_AB: tl.constexpr,
):  # fmt: skip
    """Output tile ``tile`` (in the grouped order) of ``gemm_kernel``: ``BLOCK_M × BLOCK_N`` of expert e's rows times
    ``W[e]``, the expert read from ``tile_expert``. ``FP8``: the scales' offsets of the tile (A's rows: the tokens
    when gathered; W's columns: their 128-column block for ``BLOCKWISE``), outside the K loop. ``SWAP_AB``: the
    K loops accumulate the tile transposed (``_mma``), transposed back once before the epilogue."""
    DUAL: tl.constexpr = GLU and EPILOGUE == _FORWARD  # the gate's accumulator (the backward reads the saved g)
    num_n = tl.cdiv(N_STORE, BLOCK_N)
    pid_m, pid_n = _grouped_order(tile, num_m_tiles, num_n, GROUP_M)
    e = tl.load(tile_expert_ptr + pid_m)  # E: a tile zeroing rows past offsets[E], the same start formula
    used = e < E
    start = tl.load(offsets_ptr + e) + (pid_m - tl.load(tile_offsets_ptr + e)) * BLOCK_M
    end = tl.load(offsets_ptr + e + 1, mask=used, other=R)
    k_steps = tl.where(used, tl.cdiv(K, BLOCK_K), 0)  # zeroing tiles skip the main loop
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N

    if GATHER:
        src = tl.load(row_src_ptr + rows, mask=row_ok, other=-1)
        a_idx = src  # A_TMA GATHER4: the rows TMA gathers (-1: zeros)
        a_ok = row_ok & (src >= 0)
        a_rows = tl.maximum(src, 0).to(tl.int64) * s_ar
        sa_rows = tl.maximum(src, 0).to(tl.int64) * s_sar  # FP8: the token's scales
    else:
        a_idx = rows  # unused
        if A_TMA == _TMA:  # dense rows by TMA from the tile's first
            a_idx = start
        a_ok = row_ok
        a_rows = row_offsets(rows, s_arb, s_ar, LB_A)
        sa_rows = rows.to(tl.int64) * s_sar  # FP8: A dense (never blocked)
    w_base = e.to(tl.int64) * s_we
    w2_base = e.to(tl.int64) * s_w2e
    n0 = pid_n * BLOCK_N
    if FP8 == _BLOCKWISE:  # the tile's columns lie in one 128-column block of W's scales: a scalar offset
        tl.static_assert(_BLOCKWISE_GROUP % BLOCK_N == 0, "FP8 BLOCKWISE: BLOCK_N must divide 128")
        sw_cols = tl.cast(n0 // _BLOCKWISE_GROUP, tl.int64) * s_swn
        sw2_cols = tl.cast(n0 // _BLOCKWISE_GROUP, tl.int64) * s_sw2n
    else:
        sw_cols = offs_n.to(tl.int64) * s_swn
        sw2_cols = offs_n.to(tl.int64) * s_sw2n
    sw_e = sw_ptr + e.to(tl.int64) * s_swe
    sw2_e = sw2_ptr + e.to(tl.int64) * s_sw2e
    tl.static_assert(not SWAP_AB or FP8 == _NO_FP8 or FP8 == _MX, "SWAP_AB: 16-/32-bit operands or MX")  # noqa: SIM109
    ACC_M: tl.constexpr = BLOCK_N if SWAP_AB else BLOCK_M  # the MMA's M: the weight's columns when swapped
    ACC_N: tl.constexpr = BLOCK_M if SWAP_AB else BLOCK_N
    acc = tl.zeros((ACC_M, ACC_N), dtype=tl.float32)
    acc2 = tl.zeros((ACC_M, ACC_N), dtype=tl.float32)  # GLU only; unused (and removed) otherwise
    acc, acc2 = _mainloop(
        acc, acc2, a_ptr, a_rows, a_desc, a_idx, s_acb, s_ac, w_ptr + w_base, w2_ptr + w2_base, w_desc, w2_desc, e, n0,
        s_wk, s_wn, s_w2k, s_w2n, offs_n, n_ok, a_ok, k_steps, K, sa_ptr, sa_rows, s_sak, sw_e, sw_cols, s_swk, sw2_e,
        sw2_cols, s_sw2k, sw_desc, sw2_desc, sa_desc, pid_m, BLOCK_K, BLOCK_N, LB_A, DUAL, W_TMA, WARP_SPEC, DOTS, FP8,
        A_TMA, SA_TMA, SW_TMA, SWAP_AB,
    )  # fmt: skip
    if PAIR:
        acc_b = acc
        if FP8 == _ROWWISE:  # the second product's scales differ: its own accumulator
            acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        tl.static_assert(A_TMA != _GATHER4, "A_TMA GATHER4: gathered rows, never a pair's")
        acc_b, acc2 = _mainloop(
            acc_b, acc2, a2_ptr, a_rows, a2_desc, a_idx, s_acb, s_ac, w2_ptr + w2_base, w2_ptr, w2_desc, w2_desc, e, n0,
            s_w2k, s_w2n, s_w2k, s_w2n, offs_n, n_ok, a_ok, k_steps, K, sa2_ptr, sa_rows, s_sak, sw2_e, sw2_cols,
            s_sw2k, sw2_e, sw2_cols, s_sw2k, sw2_desc, sw2_desc, sa2_desc, pid_m, BLOCK_K, BLOCK_N, LB_A, False, W_TMA,
            WARP_SPEC, DOTS, FP8, A_TMA, SA_TMA, SW_TMA, SWAP_AB,
        )  # fmt: skip
        if FP8 != _ROWWISE:
            acc = acc_b
    else:
        acc_b = acc  # unused
    if SWAP_AB:  # the tile's orientation again: one layout conversion per tile, after the K loops
        acc = acc.trans()
        acc2 = acc2.trans()
        acc_b = acc_b.trans()
    # FP8 ROWWISE: the epilogues scale the accumulators column slice by column slice (_rowwise_slice), each slice
    # loading its columns' scales; the rows' (A's, the pair's A2's) here, once; the zeroing tiles (e = E) read none
    # (tl.where: the interpreter rejects `mask & used`)
    ROWWISE: tl.constexpr = FP8 == _ROWWISE
    sa = tl.zeros((BLOCK_M,), dtype=tl.float32)  # ROWWISE only; unused otherwise
    sa2 = sa
    if ROWWISE:
        scaled_rows = tl.where(used, a_ok, False)
        sa = tl.load(sa_ptr + sa_rows, mask=scaled_rows, other=0.0)
        if PAIR:
            sa2 = tl.load(sa2_ptr + sa_rows, mask=scaled_rows, other=0.0)

    o_rows = row_offsets(rows, s_orb, s_or, LB_O)
    o_col0 = tile_start(pid_n, s_ocb, s_oc, BLOCK_N, LB_O)
    if EPILOGUE == _BACKWARD:
        _backward_epilogue(
            acc, out_ptr, out2_ptr, out3_ptr, h_ptr, g_ptr, row_asg_ptr, weights_ptr, dots_ptr, o_rows, o_col0,
            s_oc, rows, row_ok, n0, pid_n, R, N, N_STORE, sa, sw_e, s_swn, used, BLOCK_M, BLOCK_N, EPI_N, GLU, ACT,
            ROWWISE,
        )  # fmt: skip
    elif EPILOGUE == _PLAIN and ROWWISE:
        _rowwise_plain_epilogue(
            acc, acc_b, out_ptr, o_rows, o_col0, s_oc, row_ok, n0, N, N_STORE, sa, sa2, sw_e, s_swn, sw2_e, s_sw2n,
            used, BLOCK_M, BLOCK_N, EPI_N, PAIR,
        )  # fmt: skip
    elif EPILOGUE == _PLAIN:
        o_off = o_rows[:, None] + (o_col0 + tl.arange(0, BLOCK_N).to(tl.int64) * s_oc)[None, :]
        _store_plain(acc, out_ptr, o_off, row_ok[:, None] & (offs_n < N_STORE)[None, :])
    elif QUANT_A == _NO_FP8:
        _sliced_forward_epilogue(
            acc, acc2, out_ptr, out2_ptr, out3_ptr, o_rows, o_col0, s_oc, row_ok, n0, N, N_STORE, sa, sw_e, s_swn,
            sw2_e, s_sw2n, used, BLOCK_M, BLOCK_N, EPI_N, GLU, ACT, ROWWISE,
        )  # fmt: skip
    else:
        tl.static_assert(not ROWWISE, "QUANT_A: MX only (EPILOGUE_QUANT)")
        _quantized_forward_epilogue(
            acc, acc2, out_ptr, out2_ptr, out3_ptr, sq_ptr, o_rows, o_col0, s_oc, rows, row_ok, n0, N, s_sqr, s_sqc,
            BLOCK_M, BLOCK_N, GLU, ACT, QUANT_A,
        )  # fmt: skip


@triton.jit
def gemm_kernel(
    a_ptr,  # A [T, K] gathered through row_src (GATHER), or [R, K] in a row layout
    w_ptr,  # [E, K, N] any strides
    a2_ptr,  # PAIR: the second A, in A's row layout (unused otherwise)
    w2_ptr,  # GLU: the gate weight; PAIR: the second weight; [E, K, N] any strides (unused otherwise)
    w_desc,  # W_TMA: host tensor descriptor of w ([E, K, N], or [E, N, K] for W_TMA 2); None otherwise
    w2_desc,  # W_TMA and GLU / PAIR: descriptor of w2; None otherwise
    a_desc,  # A_TMA GATHER4: host tensor descriptor of A [T, K], block [1, BLOCK_K]; TMA (FP8, A dense): of A
    # [R, K], block [BLOCK_M, BLOCK_K]; None otherwise
    a2_desc,  # A_TMA TMA and PAIR: that of the second A; None otherwise
    sw_desc,  # SW_TMA: host descriptor of W's MX scales in tcgen05 chunks (_mx_scale_chunks); None otherwise
    sw2_desc,  # SW_TMA and GLU / PAIR: that of W2's scales; None otherwise
    sa_desc,  # SA_TMA: host descriptor of A's MX scales per M tile in tcgen05 chunks (_mx_tile_scales); None otherwise
    sa2_desc,  # SA_TMA and PAIR: that of the second A's scales; None otherwise
    out_ptr,  # [R, N] row layout: the result (PLAIN), h (FORWARD), dh (BACKWARD)
    out2_ptr,  # GLU: g (FORWARD), dg (BACKWARD)
    out3_ptr,  # a = act(h) [· g] (FORWARD; QUANT_A: its E4M3 bits, uint8), aw = w·a (BACKWARD)
    h_ptr,  # BACKWARD: the saved h, in out's row layout
    g_ptr,  # BACKWARD, GLU: the saved g
    row_src_ptr,  # [R] int32 token of each row, -1 for none (GATHER)
    row_asg_ptr,  # [R] int32 assignment of each row, -1 for none (BACKWARD: its top-k weight)
    weights_ptr,  # [T·k] top-k weights, flat (BACKWARD)
    dots_ptr,  # [cdiv(N_STORE, BLOCK_N), R] fp32 (BACKWARD): Σ over the tile's columns of G·a
    offsets_ptr,  # [E+1] int32 expert row offsets
    tile_offsets_ptr,  # [E+1] int32 prefix sum of the experts' M tiles
    tile_expert_ptr,  # [num_m_tiles] int32 expert of each M tile, E for a tile zeroing rows past offsets[E]
    sa_ptr,  # FP8: A's scales [rows of A (tokens when GATHER), K groups] (GemmScales.a; unused otherwise)
    sa2_ptr,  # FP8 and PAIR: the second A's scales, with sa's strides
    sw_ptr,  # FP8: W's scales [E, K groups, N groups]
    sw2_ptr,  # FP8 and GLU / PAIR: W2's scales [E, K groups, N groups]
    sq_ptr,  # QUANT_A: a's scales [R, cdiv(N, group)] (unused otherwise)
    R,
    N,
    N_STORE,  # columns written: N, or for a blocked out the whole last column block (zeros past N)
    K,
    E,
    num_m_tiles,  # M tiles in the grid (an upper bound of tile_offsets[E] + the zeroing tiles)
    s_arb,
    s_ar,
    s_acb,
    s_ac,
    s_we,
    s_wk,
    s_wn,
    s_w2e,
    s_w2k,
    s_w2n,
    s_orb,
    s_or,
    s_ocb,
    s_oc,
    s_sar,  # FP8: strides of sa (and sa2): row, K group
    s_sak,
    s_swe,  # FP8: strides of sw: expert, K group, N group
    s_swk,
    s_swn,
    s_sw2e,  # FP8: strides of sw2
    s_sw2k,
    s_sw2n,
    s_sqr,  # QUANT_A: strides of sq: row, column group
    s_sqc,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EPI_N: tl.constexpr,  # FORWARD (QUANT_A none), BACKWARD, PLAIN with FP8 ROWWISE: the epilogue's column slice
    # (BLOCK_N / EPI_N <= 16)
    GROUP_M: tl.constexpr,
    LB_A: tl.constexpr,  # log2 of A's layout block (any value for dense / gathered A)
    LB_O: tl.constexpr,  # log2 of out's layout block
    GATHER: tl.constexpr,
    GLU: tl.constexpr,
    PAIR: tl.constexpr,
    EPILOGUE: tl.constexpr,  # Epilogue: PLAIN, FORWARD, BACKWARD
    ACT: tl.constexpr,  # activations.kernel_code (EPILOGUE FORWARD, BACKWARD)
    W_TMA: tl.constexpr,  # WeightLoad: POINTERS, TMA over [E, K, N], TMA_T over the transposed storage [E, N, K]
    WARP_SPEC: tl.constexpr,  # sm_100 with TMA weights: the K loop warp-specialized (producer / consumer warps)
    DOTS: tl.constexpr,
    PERSISTENT: tl.constexpr,  # loop over the tiles (a grid of fewer programs); else one tile per program
    FP8: tl.constexpr,  # Fp8Mode: NONE, or E4M3 A and W with the scales of BLOCKWISE, MX, ROWWISE
    QUANT_A: tl.constexpr,  # Fp8Mode (EPILOGUE_QUANT): FORWARD's a as E4M3 with this mode's scales; NONE: out's dtype
    A_TMA: tl.constexpr,  # WeightLoad: POINTERS, or (GATHER, sm_100) GATHER4: A's rows gathered by TMA from a_desc
    SW_TMA: tl.constexpr,  # FP8 MX (sm_100): W's (and W2's) scales by TMA from sw_desc / sw2_desc; else pointer loads
    SA_TMA: tl.constexpr,  # FP8 MX (sm_100), A dense: A's (and A2's) scales by TMA from sa_desc / sa2_desc
    SWAP_AB: tl.constexpr,  # the tile computed transposed, accᵀ = Wᵀ · Aᵀ (small M tiles: wgmma / tcgen05 M >= 64)
):
    """``BLOCK_M × BLOCK_N`` tiles of expert e's rows times ``W[e]`` (``_gemm_tile``), in the grouped order.
    ``PERSISTENT``: program p runs the tiles p, p + P, p + 2P, ... (P programs); else the tile ``program_id``. See
    the module docstring."""
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), num_m_tiles * tl.cdiv(N_STORE, BLOCK_N), tl.num_programs(0)):
            _gemm_tile(
                tile, a_ptr, w_ptr, a2_ptr, w2_ptr, w_desc, w2_desc, a_desc, a2_desc, sw_desc, sw2_desc, sa_desc,
                sa2_desc, out_ptr, out2_ptr, out3_ptr, h_ptr, g_ptr, row_src_ptr, row_asg_ptr, weights_ptr, dots_ptr,
                offsets_ptr, tile_offsets_ptr, tile_expert_ptr, sa_ptr, sa2_ptr, sw_ptr, sw2_ptr, sq_ptr, R, N, N_STORE,
                K, E, num_m_tiles, s_arb, s_ar, s_acb, s_ac, s_we, s_wk, s_wn, s_w2e, s_w2k, s_w2n, s_orb, s_or, s_ocb,
                s_oc, s_sar, s_sak, s_swe, s_swk, s_swn, s_sw2e, s_sw2k, s_sw2n, s_sqr, s_sqc, BLOCK_M, BLOCK_N,
                BLOCK_K, EPI_N, GROUP_M, LB_A, LB_O, GATHER, GLU, PAIR, EPILOGUE, ACT, W_TMA, WARP_SPEC, DOTS, FP8,
                QUANT_A, A_TMA, SW_TMA, SA_TMA, SWAP_AB,
            )  # fmt: skip
    else:
        _gemm_tile(
            tl.program_id(0), a_ptr, w_ptr, a2_ptr, w2_ptr, w_desc, w2_desc, a_desc, a2_desc, sw_desc, sw2_desc,
            sa_desc, sa2_desc, out_ptr, out2_ptr, out3_ptr, h_ptr, g_ptr, row_src_ptr, row_asg_ptr, weights_ptr,
            dots_ptr, offsets_ptr, tile_offsets_ptr, tile_expert_ptr, sa_ptr, sa2_ptr, sw_ptr, sw2_ptr, sq_ptr, R, N,
            N_STORE, K, E, num_m_tiles, s_arb, s_ar, s_acb, s_ac, s_we, s_wk, s_wn, s_w2e, s_w2k, s_w2n, s_orb, s_or,
            s_ocb, s_oc, s_sar, s_sak, s_swe, s_swk, s_swn, s_sw2e, s_sw2k, s_sw2n, s_sqr, s_sqc, BLOCK_M, BLOCK_N,
            BLOCK_K, EPI_N, GROUP_M, LB_A, LB_O, GATHER, GLU, PAIR, EPILOGUE, ACT, W_TMA, WARP_SPEC, DOTS, FP8, QUANT_A,
            A_TMA, SW_TMA, SA_TMA, SWAP_AB,
        )  # fmt: skip


@triton.jit
def wgrad_kernel(
    a_ptr,  # [rows, M] gathered through row_src (A_GATHER) or a row layout
    b_ptr,  # [rows, N] gathered through row_src (B_GATHER) or a row layout
    b2_ptr,  # DUAL: a second B in b's row layout and strides, its result in out2 (unused otherwise)
    out_ptr,  # [E, M, N] any strides
    out2_ptr,  # DUAL: [E, M, N] with out's strides
    offsets_ptr,  # [E+1] int32 expert row offsets
    row_src_ptr,  # [R] int32 token of each row, -1 for none (A_GATHER or B_GATHER)
    sa_ptr,  # FP8: [groups + 1, M] A's scales, one row per group of one expert's rows (unused otherwise)
    sb_ptr,  # FP8: [groups + 1, N] B's scales
    sb2_ptr,  # FP8 and DUAL: B2's scales, with sb's strides
    group_offsets_ptr,  # FP8: [E+1] int32 / int64 the first group of each expert
    M,
    N,
    s_arb,
    s_ar,
    s_acb,
    s_ac,
    s_brb,
    s_br,
    s_bcb,
    s_bc,
    s_oe,
    s_om,
    s_on,
    s_sag,  # FP8: the scale strides: A's per group, per column; B's (and B2's)
    s_sac,
    s_sbg,
    s_sbc,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    LB_A: tl.constexpr,
    LB_B: tl.constexpr,
    A_GATHER: tl.constexpr,
    B_GATHER: tl.constexpr,
    DUAL: tl.constexpr,
    A_TMA: tl.constexpr,  # WeightLoad: A dense, 16-byte aligned: TMA over [rows, M] (TMA) or its storage [M, rows]
    B_TMA: tl.constexpr,  # B (and B2) likewise
    DOTS: tl.constexpr,
    FP8: tl.constexpr,  # Fp8Mode: E4M3 A and B (dense) with the scales of their row groups
):
    """``out[e] = A[rows of e]ᵀ @ B[rows of e]`` (``DUAL``: or ``out2[e]`` with B2), one ``BLOCK_M × BLOCK_N`` tile,
    reduced over expert e's rows ``BLOCK_K`` at a time; experts without rows get zeros. ``DUAL`` doubles the N tiles:
    the second half computes ``out2`` (one full-width accumulator per program, next to the program of the same A
    tile in the grouped order, which shares it in L2). Blocked layouts need expert row offsets that are multiples of
    ``BLOCK_K`` (the block-padded ones are). ``A_TMA`` / ``B_TMA``: the dense operand's tiles come through a
    tensor descriptor built on the device over its rows ``[0, end)`` (TMA fills the rows past the expert's end
    with zeros, as the masks of the pointer loads do); the gathered operand stays on asynchronous copies (TMA's
    row gather costs sm_100 more loop instructions here: docs/audit.md)."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_b = tiles_n * 2 if DUAL else tiles_n  # N tiles of out, then (DUAL) those of out2
    pid = tl.program_id(0)
    e = pid // (tiles_m * tiles_b)
    pid_m, pid_n = _grouped_order(pid % (tiles_m * tiles_b), tiles_m, tiles_b, GROUP_M)
    if DUAL:  # noqa: SIM102 (a constexpr branch around a runtime one)
        if pid_n >= tiles_n:
            pid_n -= tiles_n
            b_ptr = b2_ptr
            sb_ptr = sb2_ptr
            out_ptr = out2_ptr
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_cols = tile_start(pid_m, s_acb, s_ac, BLOCK_M, LB_A) + tl.arange(0, BLOCK_M).to(tl.int64) * s_ac  # A's columns
    b_cols = tile_start(pid_n, s_bcb, s_bc, BLOCK_N, LB_B) + tl.arange(0, BLOCK_N).to(tl.int64) * s_bc
    offs_k = tl.arange(0, BLOCK_K)
    k64 = offs_k.to(tl.int64)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    if A_TMA == _TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[end, M], strides=[s_ar, 1], block_shape=[BLOCK_K, BLOCK_M])
    elif A_TMA == _TMA_T:  # K-major: the rows contiguous
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, end], strides=[s_ac, 1], block_shape=[BLOCK_M, BLOCK_K])
    if B_TMA == _TMA:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[end, N], strides=[s_br, 1], block_shape=[BLOCK_K, BLOCK_N])
    elif B_TMA == _TMA_T:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, end], strides=[s_bc, 1], block_shape=[BLOCK_N, BLOCK_K])
    if FP8 != 0:  # expert e's first row group; step r0 covers the rows r0 - start ... of its groups
        g0 = tl.load(group_offsets_ptr + e)
    if FP8 == _MX:
        SUB: tl.constexpr = BLOCK_K // _MX_GROUP
        tl.static_assert(SUB * _MX_GROUP == BLOCK_K, "FP8 MX: BLOCK_K a multiple of 32")
        offs_g = tl.arange(0, SUB)
        g_last = g0 + (end - start - 1) // _MX_GROUP  # the expert's last group
        # the scales of the columns past M / N read the last column's (results there are not stored): the loop's
        # scale loads take no mask (sm_100: 355 -> 189 instructions per K step)
        sa_cols = tl.minimum(offs_m, M - 1).to(tl.int64) * s_sac
        sb_cols = tl.minimum(offs_n, N - 1).to(tl.int64) * s_sbc
    elif FP8 != 0:  # (masked loads here: unmasked blockwise scale loads cost sm_100 spills)
        sa_cols = offs_m.to(tl.int64) * s_sac
        sb_cols = offs_n.to(tl.int64) * s_sbc
    if FP8 == _BLOCKWISE:
        tl.static_assert(_BLOCKWISE_GROUP % BLOCK_K == 0, "FP8 BLOCKWISE: BLOCK_K divides 128")
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + offs_k
        r_ok = rows < end
        if A_GATHER or B_GATHER:
            src = tl.load(row_src_ptr + rows, mask=r_ok, other=-1)
            src_ok = r_ok & (src >= 0)
            src_off = tl.maximum(src, 0).to(tl.int64)
        if A_GATHER:
            a_rows = src_off * s_ar
            a_ok = src_ok
        else:  # r0 starts a BLOCK_K step inside one layout block (expert offsets of blocked layouts are multiples of B)
            a_rows = row_start(r0, s_arb, s_ar, LB_A) + k64 * s_ar
            a_ok = r_ok
        if B_GATHER:
            b_rows = src_off * s_br
            b_ok = src_ok
        else:
            b_rows = row_start(r0, s_brb, s_br, LB_B) + k64 * s_br
            b_ok = r_ok
        if A_TMA == _TMA:
            a = a_desc.load([r0, pid_m * BLOCK_M]).trans()
        elif A_TMA == _TMA_T:
            a = a_desc.load([pid_m * BLOCK_M, r0])
        else:
            a = tl.load(a_ptr + a_rows[None, :] + a_cols[:, None], mask=m_ok[:, None] & a_ok[None, :], other=0.0)
        if B_TMA == _TMA:
            b = b_desc.load([r0, pid_n * BLOCK_N])
        elif B_TMA == _TMA_T:
            b = b_desc.load([pid_n * BLOCK_N, r0]).trans()
        else:
            b = tl.load(b_ptr + b_rows[:, None] + b_cols[None, :], mask=b_ok[:, None] & n_ok[None, :], other=0.0)
        if DOTS == _DOTS_UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if FP8 == _BLOCKWISE:  # the step's group: its product promoted with the group's scales (DeepSeek-V3)
            g = (g0 + (r0 - start) // _BLOCKWISE_GROUP).to(tl.int64)
            sa = tl.load(sa_ptr + g * s_sag + sa_cols, mask=m_ok, other=0.0)
            sb = tl.load(sb_ptr + g * s_sbg + sb_cols, mask=n_ok, other=0.0)
            acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
        elif FP8 == _MX:  # the step's SUB groups; those past the expert's end (zero rows) read its last group's
            g = tl.minimum(g0 + (r0 - start) // _MX_GROUP + offs_g, g_last).to(tl.int64)
            sa = tl.load(sa_ptr + g[None, :] * s_sag + sa_cols[:, None])
            sb = tl.load(sb_ptr + g[None, :] * s_sbg + sb_cols[:, None])
            acc = tl.dot_scaled(a, sa, "e4m3", b, sb, "e4m3", acc)
        else:
            acc = _dot(a, b, acc, DOTS)
    if FP8 == _ROWWISE:  # one group per expert (none read for an expert without rows): its scales applied once
        has_rows = tl.full((), 1, tl.int1) & (start < end)  # (the interpreter rejects a mask `m_ok & (start < end)`)
        sa = tl.load(sa_ptr + g0.to(tl.int64) * s_sag + sa_cols, mask=m_ok & has_rows, other=0.0)
        sb = tl.load(sb_ptr + g0.to(tl.int64) * s_sbg + sb_cols, mask=n_ok & has_rows, other=0.0)
        acc = acc * sa[:, None] * sb[None, :]
    o_off = e.to(tl.int64) * s_oe + offs_m.to(tl.int64)[:, None] * s_om + offs_n.to(tl.int64)[None, :] * s_on
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def scale_chunks_kernel(
    s_ptr,  # E8M0 scales (uint8): W's [E, G, N] (rows: N), or (TILES) a dense A's [R, G]; any strides
    out_ptr,  # [outer, chunks, cdiv(G, 4), 512] uint8, contiguous: tcgen05's scale-factor chunks
    offsets_ptr,  # TILES: [E+1] int32 expert row offsets (unused otherwise)
    tile_offsets_ptr,  # TILES: [E+1] int32 prefix sum of the experts' M tiles
    tile_expert_ptr,  # TILES: [outer] int32 expert of each M tile, E for a zeroing tile
    rows,  # W: N (TILES: unused)
    G,  # scale groups along K
    E,
    chunks,  # chunks of 128 rows per outer index: cdiv(N, 128), or BLOCK_M / 128
    g_chunks,  # cdiv(G, 4)
    s_so,  # W: expert stride (TILES: unused)
    s_sr,  # row stride (W: along N)
    s_sg,  # group stride
    BLOCK_M: tl.constexpr,  # TILES: the schedule's M tile
    TILES: tl.constexpr,  # A per M tile of the schedule (outer: the tile); else W per expert (outer: the expert)
):
    """One 512-byte chunk per program, ``(outer, chunk, group chunk)`` in ``out``'s order: the scales of its 128 rows
    × 4 groups, row ``32·i + j`` and group ``q`` at byte ``16·j + 4·i + q`` (``_MX_CHUNK_ROWS``), 127 (2^0) past the
    rows and groups. Rows of W: ``128·chunk + r`` of expert ``outer``, up to ``rows``; of a dense A (``TILES``): M
    tile ``outer``'s rows from its start (``_gemm_tile``'s formula) up to its expert's end, none for a zeroing
    tile."""
    pid = tl.program_id(0)
    outer = pid // (chunks * g_chunks)
    chunk = (pid // g_chunks) % chunks
    b = pid % g_chunks
    r = tl.arange(0, _MX_CHUNK_ROWS)
    q = tl.arange(0, _MX_CHUNK_GROUPS)
    if TILES:
        e = tl.load(tile_expert_ptr + outer)
        start = tl.load(offsets_ptr + e) + (outer - tl.load(tile_offsets_ptr + e)) * BLOCK_M
        end = tl.load(offsets_ptr + e + 1, mask=e < E, other=0)  # a zeroing tile (e = E): no rows
        row = start + chunk * _MX_CHUNK_ROWS + r
        row_ok = row < end
        base = s_ptr
    else:
        row = chunk * _MX_CHUNK_ROWS + r
        row_ok = row < rows
        base = s_ptr + outer.to(tl.int64) * s_so
    g = b * _MX_CHUNK_GROUPS + q
    src = base + row.to(tl.int64)[:, None] * s_sr + g.to(tl.int64)[None, :] * s_sg
    v = tl.load(src, mask=row_ok[:, None] & (g < G)[None, :], other=127)
    byte = ((r % 32) * 16 + (r // 32) * _MX_CHUNK_GROUPS)[:, None] + q[None, :]
    tl.store(out_ptr + pid.to(tl.int64) * (_MX_CHUNK_ROWS * _MX_CHUNK_GROUPS) + byte, v)


# ----------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class GemmConfig:
    """Output tile ``block_m × block_n``, reduction step ``block_k``, M tiles per group of the grouped order,
    launch options, and the forward (``QUANT_A`` none), backward and FP8 rowwise plain epilogues' column slice
    ``epilogue_n`` (``block_n`` / 1 to 16)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    epilogue_n: int | None = None  # None: block_n (one slice)
    swap_ab: bool = False  # gemm_kernel's SWAP_AB: the tile computed transposed (the weight's columns as the MMA's M)
    programs_per_sm: int = 2  # a persistent grid's programs per SM: the CTAs per SM its build holds (bench.audit)

    @property
    def epi_n(self) -> int:
        """``gemm_kernel``'s ``EPI_N``."""
        return min(self.epilogue_n or self.block_n, self.block_n)


_HALF = (torch.float16, torch.bfloat16)
_ROW_TMA = (*_HALF, torch.float8_e4m3fn)  # wgrad_kernel's dense row operands through TMA (_row_tma)


def _clamp(cfg: GemmConfig, m: int | None = None, n: int | None = None, k: int | None = None) -> GemmConfig:
    """Tiles along a blocked dimension stay inside one layout block (``m`` / ``n`` / ``k``: that block, or None)."""
    return replace(
        cfg,
        block_m=min(cfg.block_m, m or cfg.block_m),
        block_n=min(cfg.block_n, n or cfg.block_n),
        block_k=min(cfg.block_k, k or cfg.block_k),
    )


def gemm_config(
    dtype: torch.dtype,
    block_m: int,
    *,
    epilogue: int = Epilogue.PLAIN,
    glu: bool = False,
    pair: bool = False,
    aligned: bool = True,
    out_block: int | None = None,
    a_block: int | None = None,
    capability: int | None = None,
    fp8: Fp8Mode = Fp8Mode.NONE,
    dense_rows: bool = False,
) -> GemmConfig:
    """The ``gemm_kernel`` config for M tiles of ``block_m`` rows (the caller's tile schedule) on a device of compute
    ``capability`` (``major * 10 + minor``; None, off CUDA: the sm_90 config). ``dense_rows``: A's rows dense, not
    gathered (FP8: through TMA, ``_dense_a_tma``).

    sm_90: ``block_m`` rows on ``block_m / 16`` warps (a warpgroup per 64 rows: wgmma), K step 64 for 16-bit types
    (32 for fp32), 3 stages of 128×64 + 64×128 16-bit tiles (96 KB of shared memory) and at most ~128 registers, so
    two programs fit one SM. The GLU forward keeps two accumulators (``block_n`` 64, sm_100's 128 below: one A tile
    feeds ``w1`` and ``w3``); the backward epilogue holds h, g and four results per element, so it runs full-width
    tiles (``block_n`` 128) and processes the accumulator in column slices of 8 (``epilogue_n``: ≤ 128 registers on
    sm_90 with every activation; slices of 16 or 32 take 135-148, a whole 128-column tile ~250 and spills).
    Unaligned operands (scalar loads staged in registers) take a K step of 32 and at most 64 columns, 32 where a
    tile keeps two accumulators or two pipelines (GLU, the dgrad pair) or the backward epilogue: wider ones spill on
    sm_80, sm_100 or sm_120; fp32 tiles take at most 64 columns, the pair 32 (16 unaligned), on 8 warps (sm_120's
    ptxas spills the transposed-weight and pair fp32 builds otherwise). ``out_block`` / ``a_block``: the block size
    of a blocked out / A (a tile never straddles a block). sm_100 (tcgen05: the accumulator lives in tensor memory)
    runs the aligned 16-bit 128-row tiles on 4 warps: on 8 the warps issue the loop's loads and barriers twice over,
    1.1-1.4 issue clocks per MMA clock (``bench.audit``'s issue ratio), 0.62-0.66 on 4; there the backward epilogue
    takes slices of 16 columns (88-159 registers; in slices of 8 ptxas spills the gelu epilogue, 255 registers and
    80 B), and the GLU forward 128 columns per weight (two 128×128 accumulators, 256 of tensor memory's 512 columns:
    issue ratio 0.39 where two 128×64 ones took 0.75-0.81, 85 FLOP per byte of operand tiles where they read 64),
    its epilogue in slices of 32 columns (98 registers with silu, 127 with gelu; slices of 16: 66-74 registers and
    0.41; of 64: 211-238; the whole tile at once spills 40-808 B) over 2 stages (99 KB of shared memory: 2 CTAs per
    SM; 3 stages take 148 KB, 1 CTA per SM; persistent it took 151-168 registers, 0.42, and spilled 16 B with gelu).
    Its rows come by TMA's row gather there (``_gather_load``): by asynchronous copies (``TMA_ROWS`` off, a
    column-strided A) 2 stages wait to zero every K step.
    Swapped operands (``swap_ab``, ``gemm_kernel``'s ``SWAP_AB``: ``accᵀ = Wᵀ · Aᵀ``, the weight's columns as the
    MMA's M, the tile's rows its N) for the grouped layouts' aligned 16-bit tiles under 64 rows on sm_90 and sm_100
    (Triton runs M < 64 on mma.sync: wgmma / tcgen05 now) and of 64 rows on sm_100 (a tcgen05 M = 64 does half an
    M = 128 one's work), on twice the columns (256; the GLU forward 128 per weight; the backward epilogue in 16
    slices of 16): issue ratio at 32 rows 1.01-1.22 -> 0.55-0.66 on sm_90 (HGMMA.64x32, 2 CTAs per SM), 1.62-1.95
    -> 0.89-1.28 on sm_100; at 64 rows on sm_100 0.92-1.20 -> 0.46-0.69, the one-tile-per-program GLU forward and
    backward epilogue over 2 stages (83 KB: 2 CTAs per SM; the warp-specialized loops keep 3, 124 KB, 1 CTA per SM,
    persistent: with 2 their row copies wait to zero every K step). At 128 columns sm_90's issue ratio stayed 0.93-1.11
    and sm_100's warp-specialized loops got worse (1.72 -> 2.36). Not for blocked layouts (the tile stays inside a
    block) nor fp32; FP8: ``_fp8_config`` (docs/audit.md, "Swapped operands").
    One small config when interpreting (16 columns, the forward epilogue in two slices of 8, so that every
    interpreter test of the forward runs the sliced epilogue; the backward epilogue's 64 columns wide in eight
    slices, fewer in narrower blocks). Checked by ``python -m bench.audit``.
    """
    backward = epilogue == Epilogue.BACKWARD
    if interpreting():
        cfg = GemmConfig(block_m, 64 if backward else 16, 16, 2, 4, 1, 8)  # the epilogues in slices of 8
        if fp8 != Fp8Mode.NONE:  # MX: a K step of whole groups of 32; the forward epilogue's a in whole groups
            cfg = replace(cfg, block_k=32, block_n=32 if epilogue == Epilogue.FORWARD else cfg.block_n)
    elif fp8 != Fp8Mode.NONE:
        cfg = _fp8_config(block_m, fp8, backward=backward, glu=glu, pair=pair, aligned=aligned, capability=capability,
                          dense_rows=dense_rows)  # fmt: skip
    else:
        block_k = 32 if dtype == torch.float32 or not aligned else 64
        block_n = 64 if glu and not backward else 128
        if not aligned:  # 64-row forward-epilogue tiles too: at 64 columns sm_80 spills (128 rows: sm_100 at 32)
            block_n = 32 if (glu or pair or backward or (epilogue == Epilogue.FORWARD and block_m < 128)) else 64
        tcgen05_4 = block_m >= 128 and _blackwell(capability) and aligned and dtype in _HALF
        warps = 8 if block_m >= 128 and not tcgen05_4 else 4
        if dtype == torch.float32:  # 4-byte tiles: at most 64 columns, 8 warps (sm_120 / sm_80 spill otherwise)
            # the pair reads each weight with its own strides: at 64 columns sm_120's ptxas spills it
            block_n, warps = min(block_n, (32 if aligned else 16) if pair else 64), 8
        epilogue_n = (16 if tcgen05_4 else 8) if backward else None
        stages = 3
        if tcgen05_4 and glu and epilogue == Epilogue.FORWARD:  # two 128x128 accumulators: 256 tensor-memory columns
            block_n, epilogue_n, stages = 128, 32, 2
        # swapped operands (the weight's columns as the MMA's M) for the grouped layouts' small M tiles
        swap = aligned and dtype in _HALF and out_block is None and a_block is None and _swap_ab(block_m, capability)
        if swap:  # twice the columns: the MMA's M (64 x 256 x 64 tiles would need 120 KB of shared memory in 3 stages)
            block_n *= 2
            epilogue_n = 16 if backward else epilogue_n  # 16 slices of 16 columns
            if block_m == 64 and (backward or (glu and epilogue == Epilogue.FORWARD)):
                stages = 2  # one tile per program (rows by TMA's row gather): 83 KB, 2 CTAs per SM
        # sm_100's swapped 64-row tiles over 3 stages (the warp-specialized, persistent loops): 124 KB, 1 CTA per SM
        per_sm = 1 if swap and block_m == 64 and stages == 3 and _blackwell(capability) else 2
        cfg = GemmConfig(block_m, block_n, block_k, 8, warps, stages, epilogue_n, swap, per_sm)
    return _clamp(cfg, n=out_block, k=a_block)


def _fp8_config(
    block_m: int,
    fp8: Fp8Mode,
    *,
    backward: bool,
    glu: bool,
    pair: bool,
    aligned: bool,
    capability: int | None,
    dense_rows: bool = False,
) -> GemmConfig:
    """``gemm_config`` for E4M3 operands on a GPU (``bench.audit`` builds each): 1-byte tiles of 128 × 128 (16 KB
    each: a 3-stage pipeline in 96 KB) with a K step of 128 (one blockwise group, four MX groups), the GLU forward's
    two accumulators on 64 columns (sm_100's MX and rowwise 128 below), the backward epilogue in column slices as for
    16-bit types.

    - MX off sm_100 (no block-scaled MMA there: Triton upcasts both tiles to bf16 in registers) takes a K step of 64
      (at 128 ptxas spilled 4-84 B on sm_90), 32 for sm_120's backward epilogue (8 B at 64);
    - rowwise scales the accumulators after the loop in the epilogue's column slices (``_rowwise_slice``: each
      slice's column scales, one fp32 per column of the thread's accumulator fragment, loaded only for it): the down
      GEMM, the up-projection without GLU and the pair in slices of 16 columns (``epilogue_n``), the backward
      epilogue in its 8 (sm_100: 16). sm_90's 128-row builds (``bench.audit``, 2026-12-06): down 134 -> 101
      registers, backward 148 -> 113, 1 -> 2 CTAs per SM (99 KB of shared memory), issue ratio 0.48 as before
      (slices of 8: 101 too, of 32 106, of 64 128; the whole tile 136). The pair keeps two accumulators in
      registers (128 per thread at 128 × 128 on 8 warps: 171 registers, 1 CTA per SM), so on sm_90 it runs 128 × 64
      tiles with 256-deep K steps in 2 stages (``_rowwise_wide_k``), its dense dh / dg rows through TMA
      (``_dense_a_tma``): 98 registers, 2 CTAs per SM, issue ratio 0.41 (by cp.async at 128 × 64 × 128: 112
      registers but 0.96; in 2 stages the row copies wait to zero every K step);
    - sm_100 runs 128-row tiles on 4 warps (the accumulator in tensor memory) except where blockwise promotes each
      step's product in registers: the GLU forward, the backward epilogue and the pair (on 8 warps the blockwise down
      GEMM issues 1.10 clocks per MMA clock against 0.66 on 4, the MX backward 1.78 against 1.12). Rowwise's backward
      and pair came to registers whole after the loop and spilled 64-736 B on 4 warps; scaled slice by slice they
      fit: the backward 156 registers (gelu 202), 2 CTAs per SM, issue ratio 0.66 (8 warps: 174 -> 56 registers,
      1.05); the pair at 128 columns 244 registers, 2 CTAs per SM, 0.67 (8 warps and 64 columns: 200 registers, 1
      CTA per SM, 2.12; 216 B of spills at 128);
    - sm_100's aligned 128-row MX and rowwise GLU forward run 128 columns per weight (two 128×128 accumulators in
      tensor memory, 256 of its 512 columns), the epilogue in slices of 32 columns (``epilogue_n``; rowwise scales
      each slice; MX's ``QUANT_A`` quantizes group by group anyway), 3 stages, 2-3 CTAs per SM: MX 150 registers, 2
      buffers of 48 KB (102 KB; the weights' scales by TMA, ``mx_chunk_tiles``), issue ratio 0.69 where 128×64
      tiles took 1.50; rowwise K steps of 64 (at 128 it took 3 buffers, 148 KB: 1 CTA per SM), 168 registers (196
      with its row scales loaded per slice), 75 KB, 0.66 where 128×64 tiles took 0.86 (171 FLOP per operand byte,
      128 at 64 columns; with 2 stages the gathered rows' copies wait to zero every K step). Not blockwise (both
      products promoted in registers: on 8 warps 244 B of spills, 1 CTA per SM, 1.56);
    - sm_120 (mma.sync: accumulators and operand fragments in registers) runs 64 columns: at 128 it spilled 8-104 B;
    - unaligned operands (1-byte scalar loads staged in registers) take 32 × 32 steps: at a K step of 64 and 64
      columns every recipe spilled (4-1408 B) on sm_90 / sm_100 / sm_120;
    - the up-projection without GLU (``moe_mlp(..., glu=False)``) takes the down GEMM's tiles with the forward
      epilogue (mxfp8: ``QUANT_A``), warp-specialized on sm_100 (one accumulator): ``bench.audit`` (2026-12-06, its
      ``up`` / ``up,aq`` builds) 94-235 registers, no spill, 1-3 CTAs per SM; sm_90 rowwise 64 / 128 rows 94 / 107
      registers, issue 0.47 / 0.48; sm_100 128 rows issue 0.67 (rowwise), 0.71 (blockwise), 0.89 (mxfp8, its
      gathered A's scales: waived); mxfp8's 64-row tile on sm_100 (swapped, a quantized in the epilogue, 3 stages)
      168 registers, no spill (the 388 / 440 B of spills an earlier ad hoc build reported do not reproduce at
      643ed59), issue 1.70.

    ``block_m``: 64 or 128 rows on a GPU (the FP8 MLP's tiles, ``backends.triton.FP8_MIN_BLOCK_M``: under 64 rows
    Triton runs the E4M3 dot on fp16 mma.sync on sm_90 / sm_100), 16 when interpreting.

    The blockwise tiles stay 128 wide on sm_90: at 64 columns their per-step overhead gives 0.9-1.3 issue clocks per
    MMA clock, 0.47-0.8 at 128.

    Rowwise's 64-row tiles on sm_100 take their rows through TMA (dense: 2D boxes; gathered: TMA's row gather)
    outside the warp-specialized loop, in 2 stages: 256-deep K steps, and the GLU forward 128 columns of two
    accumulators in tensor memory (the epilogue in 32-column slices: 196 registers) in 128-deep ones; issue ratio
    1.00-1.38 -> 0.44-0.66 (M = 64 MMAs do half the work per step under the same loop; ``bench.audit`` 2026-12-07;
    the GLU forward at 64 columns: 1.14, 0.88 at 256-deep steps). With 2 stages gathered rows by cp.async wait to
    zero every step; warp-specialized, the rows' TMA moves to the producer and ptxas drops Triton's register split
    (255 registers).

    sm_100's aligned 64-row MX tiles of 128 columns (not the GLU forward's 64) are computed transposed
    (``swap_ab``: the weight's columns as the block-scaled MMA's M = 128): native ``UTCQMMA`` where Triton emulated
    the M = 64 ``tl.dot_scaled`` in bf16 (``UTCHMMA`` after converting both tiles in registers), 228-496 loop
    instructions per K step where the emulation took 288-1360, 2-4 CTAs per SM. Swapped, the GLU forward's 64 columns
    stay emulated (128 spilled 684 B), blockwise spilled (336-1748 B: each step's transposed product promoted in
    registers) and rowwise gained nothing (measured before its column-sliced scaling: 1.00-2.11 issue clocks per MMA
    clock as unswapped; at twice the columns it spilled or fell to 1 CTA/SM): not taken."""
    # blockwise promotes each K step's product in registers (the GLU forward, the backward epilogue, the pair: 8 warps)
    registers = fp8 == Fp8Mode.BLOCKWISE and (backward or pair or glu)
    tcgen05_4 = block_m >= 128 and _blackwell(capability) and aligned and not registers
    warps = 8 if block_m >= 128 and not tcgen05_4 else 4
    glu_forward = glu and not backward
    # sm_100's MX / rowwise GLU forward: two 128x128 accumulators in tensor memory, the epilogue in 32-column slices;
    # rowwise's 64-row tiles too (two 64x128 accumulators, the rows by TMA's row gather, 2 stages below)
    rowwise_glu64 = glu_forward and aligned and fp8 == Fp8Mode.ROWWISE and block_m == 64 and _blackwell(capability)
    wide_glu = (glu_forward and tcgen05_4 and fp8 in (Fp8Mode.MX, Fp8Mode.ROWWISE)) or rowwise_glu64
    block_n = 64 if (glu_forward and not wide_glu) or capability == 120 else 128
    block_k = 128
    if wide_glu and fp8 == Fp8Mode.ROWWISE and not rowwise_glu64:  # 3 buffers of 128-deep steps: 148 KB, 1 CTA/SM
        block_k = 64
    if fp8 == Fp8Mode.MX and not _blackwell(capability):
        block_k = 32 if capability == 120 and backward else 64
    if not aligned:
        block_n, block_k = 32, 32
    epi = None  # the whole tile at once
    if backward:
        epi = 16 if tcgen05_4 else 8
    elif wide_glu:
        epi = 32
    elif fp8 == Fp8Mode.ROWWISE and not glu_forward:  # the down GEMM, the up-projection without GLU, the pair
        epi = 16
    # sm_100's 64-row MX tiles computed transposed: the block-scaled tcgen05 MMA needs M = 128 (the weight's columns;
    # not the GLU forward's 64: still emulated swapped, and at 128 columns it spilled 684 B)
    swap = fp8 == Fp8Mode.MX and aligned and block_m == 64 and _blackwell(capability) and block_n == 128
    stages = 2 if rowwise_glu64 else 3  # (2 buffers of 40 KB: 2 CTAs per SM)
    wide_k = aligned and not glu_forward and _rowwise_wide_k(block_m, capability, pair, dense_rows, backward)
    if fp8 == Fp8Mode.ROWWISE and wide_k:
        # rows through TMA: 256-deep K steps in 2 stages of 48 KB, the bytes in flight of 3 of 128
        block_k, stages = 256, 2
        if not _blackwell(capability):  # sm_90's pair: its two accumulators at 64 columns, 2 CTAs per SM
            block_n = 64
    return GemmConfig(block_m, block_n, block_k, 8, warps, stages, epi, swap)


def _rowwise_wide_k(block_m: int, capability: int | None, pair: bool, dense_rows: bool, backward: bool) -> bool:
    """Whether ``_fp8_config`` gives a rowwise FP8 GEMM (not the GLU forward) 256-deep K steps, its rows through TMA:
    the dgrad pair's 128-row tiles on sm_90 (dense rows, 2D TMA: sm_90 has no row gather), every 64-row tile on
    sm_100 (dense rows, or gathered through TMA's row gather)."""
    hopper = capability is None or capability // 10 == 9
    return (hopper and pair and dense_rows and not backward and block_m == 128) or (
        _blackwell(capability) and block_m == 64
    )


def _swap_ab(block_m: int, capability: int | None) -> bool:
    """``GemmConfig.swap_ab`` of the grouped layouts' aligned 16-bit tiles of ``block_m`` rows: under 64 rows on sm_90
    and sm_100, 64 rows on sm_100 (``gemm_config``'s measurements)."""
    hopper = capability is None or capability // 10 == 9
    return (hopper and block_m < 64) or (_blackwell(capability) and block_m <= 64)


def _blackwell(capability: int | None) -> bool:
    """sm_100 / sm_103 (tcgen05 MMA); not sm_120, whose matmuls are mma.sync."""
    return capability is not None and capability // 10 == 10


def wgrad_config(
    dtype: torch.dtype,
    *,
    gather: bool = False,
    aligned: bool = True,
    a_block: int | None = None,
    b_block: int | None = None,
    capability: int | None = None,
    fp8: Fp8Mode = Fp8Mode.NONE,
) -> GemmConfig:
    """The ``wgrad_kernel`` config: 128×128 tiles of ``dw[e]`` on 8 warps (a dual launch too: one product per
    program, ``HGMMA.64x128`` where two 128×64 accumulators ran ``64x64`` MMAs at the same operand intensity), 64
    rows per step for 16-bit types (32 for fp32 or unaligned operands; unaligned tiles half as wide: scalar loads
    staged in registers spill on sm_80 otherwise). A gathered operand loads its ``row_src`` entries in the loop: 5
    stages give that index load a stage of its own and keep 3 buffers of data in flight (with 3 stages the data loads
    wait to zero every step). ``a_block`` / ``b_block``: the block size of a blocked A / B (A's columns are the
    tile's M, B's its N; the rows step stays inside a block). ``capability``: the device's (``major * 10 + minor``;
    None, off CUDA: sm_90). On sm_90 and sm_100 (asynchronous MMA: wgmma, tcgen05) the aligned 16-bit 128×128 tiles
    run on 4 warps: on 8 every warp issues its share of the row loads and barriers, 0.77 (sm_90) and 1.6 (sm_100)
    issue clocks per MMA clock (``bench.audit``'s issue ratio), 0.58 and 1.3 on 4 (200-240 registers, 2 CTAs/SM).

    ``fp8`` (E4M3 operands, dense): K steps of 128 rows (the blockwise group; four MX groups; 128 bytes per row as
    the 16-bit types' 64), 32 unaligned; 3 stages of 128×128 E4M3 tiles (96 KB of shared memory, 2 CTAs/SM) on 4
    warps where the MMA is asynchronous. 128×64 tiles for ``BLOCKWISE`` (each step's product is promoted into the
    accumulator: two fp32 tiles live; 128×128 spills on 4 warps) and for ``MX`` on sm_90 (no block-scaled MMA:
    Triton converts the tiles to bf16 in registers; 128×128 spills). ``bench.audit`` (docs/audit.md, "FP8 weight
    gradients"). When interpreting, K steps of 64 (two MX groups, half a blockwise group)."""
    if interpreting():
        cfg = GemmConfig(16, 16, 16 if fp8 == Fp8Mode.NONE else 64, 2, 4, 1)
    elif fp8 != Fp8Mode.NONE:
        hopper = capability is None or capability // 10 == 9
        block_n = 64 if fp8 == Fp8Mode.BLOCKWISE or (fp8 == Fp8Mode.MX and hopper) or not aligned else 128
        cfg = GemmConfig(128, block_n, 128 if aligned else 32, 8, 8, 3)
    else:
        block_k = 32 if dtype == torch.float32 or not aligned else 64
        block_n = 128 if aligned else 64
        cfg = GemmConfig(128, block_n, block_k, 8, 8, 5 if gather else 3)
    rows_block = min(a_block or 1 << 30, b_block or 1 << 30)
    cfg = _clamp(cfg, a_block, b_block, rows_block)
    if not interpreting() and cfg.block_m * cfg.block_n <= 64 * 64:
        cfg = replace(cfg, num_warps=4)
    async_mma = capability is None or capability // 10 in (9, 10)
    four_warps = cfg.block_m * cfg.block_n >= (128 * 64 if fp8 != Fp8Mode.NONE else 128 * 128)
    if not interpreting() and async_mma and aligned and (dtype in _HALF or fp8 != Fp8Mode.NONE) and four_warps:
        cfg = replace(cfg, num_warps=4)
    return cfg


@dataclass(frozen=True)
class BackwardEpilogue:
    """The extra operands of the backward epilogue (module docstring, ``Epilogue.BACKWARD``)."""

    h: torch.Tensor  # the saved h, in out's layout
    g: torch.Tensor | None  # the saved g (GLU)
    row_asg: torch.Tensor  # [R] int32 assignment of each row, -1 for none
    weights: torch.Tensor  # [T·k] top-k weights, flat


# ----------------------------------------------------------------------------------------------- launchers

TMA_WEIGHTS = True  # load the weights through TMA where operands allow (tests switch it off to cover the pointers)
TMA_ROWS = True  # load row operands through TMA where they allow: wgrad_kernel's dense ones, gemm's gathered A (sm_100)
TMA_SCALES = True  # gemm's MX weight scales through TMA in tcgen05's chunks where tiles allow (sm_100: _mx_scales_tma)


INTERPRETER_PROGRAMS = 3  # persistent programs when interpreting: fewer than most tests' tiles, so the loop runs


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(device: torch.device, tiles: int, per_sm: int) -> int:
    """The programs of a persistent grid over ``tiles`` tiles: ``per_sm`` per SM on a CUDA device (the config's
    ``programs_per_sm``: as many as its build keeps resident; a host query of the device's properties, cached; no
    sync), ``INTERPRETER_PROGRAMS`` when interpreting; one per tile elsewhere (the meta tensors of ``bench.model``);
    never more than the tiles."""
    if interpreting():
        programs = INTERPRETER_PROGRAMS
    elif device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        programs = per_sm * _sm_count(index)
    else:
        programs = tiles
    return min(programs, tiles)


def _tma_device(device: torch.device) -> bool:
    """TMA is there: Hopper or newer, or the interpreter."""
    return interpreting() or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9)


def _sm100(device: torch.device) -> bool:
    """A datacenter Blackwell device (compute capability 10.x: sm_100 / sm_103); never when interpreting, nor on
    meta tensors (``bench.model``)."""
    return not interpreting() and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 10


def _warp_specialize(device: torch.device) -> bool:
    """``gemm_kernel`` warp-specializes its K loop on sm_100 (tcgen05) only."""
    return _sm100(device)


def _gather4_device(device: torch.device) -> bool:
    """Blackwell's TMA row gather (``gather4``) is there: sm_100 (not sm_90, which has none, nor sm_120; the tests
    force it under the interpreter)."""
    return _sm100(device)


def _scale_tma_device(device: torch.device) -> bool:
    """Block-scaled tcgen05 MMAs read their scale factors from tensor memory, copied there from shared memory as
    TMA brought them in the chunk layout (``SW_TMA``): sm_100 (the tests force it under the interpreter)."""
    return _sm100(device)


def mx_chunk_tiles(cfg: GemmConfig) -> bool:
    """The config's tiles hold whole scale chunks of tcgen05 (``_mx_scale_chunks``): 128-row tiles (the
    block-scaled MMA's M; sm_100's swapped 64-row ones read theirs by pointers), ``BLOCK_N`` and ``BLOCK_K / 32``
    multiples of 128 and 4 (``SW_TMA``'s tiles; ``specs`` builds them)."""
    chunk_k = int(_MX_CHUNK_GROUPS) * FP8_RECIPES[Fp8Mode.MX].group
    rows = int(_MX_CHUNK_ROWS)
    return cfg.block_m % rows == 0 and cfg.block_n % rows == 0 and cfg.block_k % chunk_k == 0


def _mx_scales_tma(fp8: Fp8Mode, cfg: GemmConfig, K: int, device: torch.device) -> bool:
    """``gemm_kernel``'s ``SW_TMA``: the MX weight scales through TMA in tcgen05's chunks (``_mx_scale_chunks``) on
    sm_100 (``_scale_tma_device``, ``TMA_SCALES``) for tiles of whole chunks (``mx_chunk_tiles``) and K > 0; with a
    dense A its scales too (``SA_TMA``, ``_mx_tile_scales``; ``gemm`` decides)."""
    return TMA_SCALES and fp8 == Fp8Mode.MX and mx_chunk_tiles(cfg) and K > 0 and _scale_tma_device(device)


def _mx_scale_chunks(s: torch.Tensor) -> torch.Tensor:
    """MX weight scales ``s [E, G, N]`` (uint8 E8M0, any strides: ``GemmScales.w``) in the scale-factor layout of
    block-scaled tcgen05 MMAs, ``[E, cdiv(N, 128), cdiv(G, 4), 2, 256]`` contiguous: per expert, the chunks of 128
    columns × 4 groups, each 512 bytes holding column ``128·c + 32·i + j``, group ``4·b + q`` at byte ``16·j +
    4·i + q`` (``_MX_CHUNK_ROWS``); padded with 127 (2^0) past N and G. One launch of ``scale_chunks_kernel``, no
    synchronization."""
    E, G, N = s.shape
    return _launch_scale_chunks(s, E, -(-N // int(_MX_CHUNK_ROWS)), G, (s.stride(0), s.stride(2), s.stride(1)), rows=N)


def _mx_tile_scales(s: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """A dense A's MX scales ``s [R, G]`` (one row per A row, any strides: ``GemmScales.a``) per M tile of
    ``schedule``, in tcgen05's chunks (``_mx_scale_chunks``): ``[max_m_tiles, block_m / 128, cdiv(G, 4), 2, 256]``,
    tile m holding the scales of its rows ``start .. start + block_m`` (``_gemm_tile``'s formula; 127 for rows past
    the expert's end and in the tiles zeroing the rows past ``offsets[E]``). One launch of ``scale_chunks_kernel``,
    no synchronization."""
    chunks = schedule.block_m // int(_MX_CHUNK_ROWS)
    return _launch_scale_chunks(s, schedule.max_m_tiles, chunks, s.shape[1], (0, *s.stride()), schedule=schedule)


def _launch_scale_chunks(
    s: torch.Tensor,
    outer: int,
    chunks: int,
    G: int,
    strides: tuple[int, int, int],
    *,
    rows: int = 0,
    schedule: Schedule | None = None,
) -> torch.Tensor:
    """Launch ``scale_chunks_kernel``: ``outer`` experts (W's ``rows`` rows) or, with ``schedule``, M tiles (a dense
    A's), ``chunks`` chunks of 128 rows each, ``G`` groups; ``strides``: the scales' (outer, row, group) strides.
    Grid: one program per chunk, ``outer · chunks · cdiv(G, 4)``."""
    g_chunks = -(-G // int(_MX_CHUNK_GROUPS))
    size = int(_MX_CHUNK_ROWS) * int(_MX_CHUNK_GROUPS)
    out = torch.empty(outer, chunks, g_chunks, 2, size // 2, dtype=torch.uint8, device=s.device)
    if out.numel() == 0:
        return out
    tiles = schedule is not None
    maps = (schedule.offsets, schedule.tile_offsets, schedule.tile_expert) if tiles else (out,) * 3  # unused: W's
    scale_chunks_kernel[(outer * chunks * g_chunks,)](
        s, out, *maps, rows, G, maps[0].shape[0] - 1 if tiles else 0, chunks, g_chunks, *strides,
        BLOCK_M=schedule.block_m if tiles else int(_MX_CHUNK_ROWS), TILES=tiles,
    )  # fmt: skip
    return out


def _mx_scales_descriptor(chunks: torch.Tensor, block_rows: int, block_k: int) -> TensorDescriptor:
    """Host descriptor over scale chunks ``[outer, rows / 128, groups / 4, 2, 256]`` (``_mx_scale_chunks``), one
    tile's chunks per box: ``[1, block_rows / 128, block_k / 128, 2, 256]``."""
    box_k = block_k // (int(_MX_CHUNK_GROUPS) * FP8_RECIPES[Fp8Mode.MX].group)
    return TensorDescriptor.from_tensor(chunks, [1, block_rows // int(_MX_CHUNK_ROWS), box_k, *chunks.shape[3:]])


def _gather_load(r: Rows) -> WeightLoad:
    """How ``gemm_kernel`` reads a gathered A ``r`` (``A_TMA``): ``GATHER4``, TMA's row gather from a host descriptor
    over the token rows ``[T, K]``, on sm_100 (``_gather4_device``, ``TMA_ROWS``) for non-empty 16-bit or E4M3 rows
    with a 16-byte aligned base, unit column stride and a 16-byte multiple row stride (TMA's rules); else
    ``POINTERS`` (asynchronous copies). The caller asks only for aligned configs (K steps 16-byte aligned) without
    warp specialization (there the gather moves into the producer partition and ptxas drops Triton's register split:
    255 registers; docs/audit.md)."""
    t = r.tensor
    if not TMA_ROWS or not r.gathered or t.dtype not in _ROW_TMA or t.numel() == 0 or not _gather4_device(t.device):
        return WeightLoad.POINTERS
    if t.data_ptr() % 16 or t.stride(1) != 1 or t.stride(0) * t.element_size() % 16:
        return WeightLoad.POINTERS
    return WeightLoad.GATHER4


def _dense_a_tma(fp8: Fp8Mode, aligned: bool, a: Rows, a2: Rows | None) -> bool:
    """Whether ``gemm_kernel`` reads an FP8 A (and the pair's A2) through TMA (``A_TMA`` ``TMA``): aligned E4M3
    tiles of dense rows (``_row_tma``: not gathered, 16-byte aligned rows, on Hopper or newer), each M tile's rows
    from its first (those past its expert's end load other rows, or TMA's zeros past A's, and are never stored)."""
    if fp8 == Fp8Mode.NONE or not aligned:
        return False
    return all(_row_tma(r) == WeightLoad.TMA for r in (a, a2) if r is not None)


def row_gather_step(fp8: Fp8Mode, cfg: GemmConfig) -> bool:
    """Whether ``cfg``'s K step takes gathered rows by TMA's row gather (``GATHER4``, where ``_gather_load`` allows):
    16-bit rows at any, E4M3 rows at 128 or more (at 64 the per-step index work cost sm_100's rowwise GLU forward
    0.66 -> 0.73 issue clocks per MMA clock, ``bench.audit``)."""
    return fp8 == Fp8Mode.NONE or cfg.block_k >= 128


def fp8_rows_warp_specialized(fp8: Fp8Mode, cfg: GemmConfig, gathered: bool) -> bool:
    """Whether an FP8 GEMM that sm_100 would warp-specialize keeps that loop (its rows by cp.async) rather than take
    its rows through TMA without it (dense: ``_dense_a_tma``; gathered: TMA's row gather, ``GATHER4``), measured by
    ``bench.audit`` (2026-12-07, sm_100, issue ratio with -> without): blockwise keeps it (its 128-row down GEMM
    spilled 108 B without, the up-projection 192 B), and so do MX's swapped 64-row tiles (1.31 -> 1.49) and its
    gathered rows (the up-projection 0.89 -> 0.93: its tokens' scales by pointer loads either way); rowwise (dense
    rows: 0.62 -> 0.37 at 128 rows, 1.00 -> 0.44 at 64 with 256-deep K steps; gathered: 0.67 -> 0.61, 1.03 -> 0.66)
    and MX's dense 128-row tiles (0.70 -> 0.53) leave it."""
    if fp8 == Fp8Mode.MX:
        return cfg.swap_ab or gathered
    return fp8 != Fp8Mode.ROWWISE


def _tma_mode(w: torch.Tensor) -> WeightLoad:
    """How ``gemm_kernel`` can read weights ``w [E, K, N]``: ``TMA`` (N contiguous) or ``TMA_T`` (K contiguous, a
    transposed view) for 16-bit and E4M3 weights (tf32 wgmma reads only K-major tiles: an fp32 tile from TMA is
    waited to zero) on Hopper or newer (or the interpreter) with a 16-byte aligned base and 16-byte multiples for the
    other strides (TMA's rules); else ``POINTERS``."""
    if not TMA_WEIGHTS or w.dtype not in (*_HALF, E4M3) or not _tma_device(w.device):
        return WeightLoad.POINTERS
    size = w.element_size()
    if w.stride(2) == 1:
        mode, other = WeightLoad.TMA, (w.stride(0), w.stride(1))
    elif w.stride(1) == 1:
        mode, other = WeightLoad.TMA_T, (w.stride(0), w.stride(2))
    else:
        return WeightLoad.POINTERS
    if w.data_ptr() % 16 or any(v * size % 16 for v in other):
        return WeightLoad.POINTERS
    return mode


def _row_tma(r: Rows, row_align: int = 1) -> WeightLoad:
    """How ``wgrad_kernel`` reads the row operand ``r`` (``A_TMA`` / ``B_TMA``), on Hopper or newer (``TMA_ROWS``),
    for a dense, not gathered, 16-bit or E4M3 operand with a 16-byte aligned base: ``TMA`` over ``[rows, cols]``
    with unit column stride and a 16-byte multiple row stride; ``TMA_T`` over the transposed storage ``[cols, rows]``
    of an E4M3 operand stored K-major (unit row stride, a 16-byte multiple column stride) whose expert row offsets are
    multiples of ``row_align`` = 16 or more (each K step starts 16-byte aligned along the storage's rows: sm_90's
    E4M3 wgmma reads K-major shared tiles only and transposes MN-major ones through registers every step); else
    ``POINTERS``."""
    t = r.tensor
    if not TMA_ROWS or r.block is not None or r.gathered or t.dtype not in _ROW_TMA or not _tma_device(t.device):
        return WeightLoad.POINTERS
    if t.data_ptr() % 16:
        return WeightLoad.POINTERS
    if t.stride(1) == 1 and t.stride(0) * t.element_size() % 16 == 0:
        return WeightLoad.TMA
    if t.dtype == torch.float8_e4m3fn and t.stride(0) == 1 and t.stride(1) % 16 == 0 and row_align % 16 == 0:
        return WeightLoad.TMA_T
    return WeightLoad.POINTERS


def _descriptor(w: torch.Tensor, mode: WeightLoad, block_k: int, block_n: int) -> TensorDescriptor:
    """Host tensor descriptor of ``w`` for ``mode``: over ``[E, K, N]`` (``TMA``) or the storage ``[E, N, K]``."""
    if mode == WeightLoad.TMA:
        return TensorDescriptor.from_tensor(w, [1, block_k, block_n])
    return TensorDescriptor.from_tensor(w.transpose(1, 2), [1, block_n, block_k])


def _fp8_mode(
    a: Rows,
    w: torch.Tensor,
    out: Rows,
    gate: torch.Tensor | None,
    pair: tuple[Rows, torch.Tensor] | None,
    scales: GemmScales | None,
) -> Fp8Mode:
    """``gemm``'s FP8 mode, once what the kernel relies on is checked: E4M3 operands exactly when ``scales`` is
    given (``TypeError`` otherwise), a dense or gathered A (``ValueError`` for a blocked one), a float output, and
    each scale in its mode's dtype (``TypeError``) and ``fp8.quantize``'s shape (``ValueError``): ``a [rows of
    a.tensor, cdiv(K, group)]`` (one column for ``ROWWISE``), ``w [E, cdiv(K, group), cdiv(N, across)]``
    (``Recipe.weight_block(0)``), ``w2`` for the gate or the pair's weight, ``a2`` for the pair's A (with ``a``'s
    strides), neither otherwise; all on A's device."""
    operands = {"a": a.tensor, "w": w}
    if gate is not None:
        operands["gate"] = gate
    if pair is not None:
        operands["pair's a2"], operands["pair's w2"] = pair[0].tensor, pair[1]
    if scales is None:
        fp8 = [name for name, t in operands.items() if t.dtype == E4M3]
        if fp8:
            raise TypeError(f"gemm: E4M3 operands ({', '.join(fp8)}) need their scales, got scales=None")
        return Fp8Mode.NONE
    if not isinstance(scales, GemmScales):
        raise TypeError(f"gemm: scales must be a GemmScales or None, got {type(scales).__name__}")
    mode = scales.mode
    if not isinstance(mode, Fp8Mode) or mode == Fp8Mode.NONE:
        raise ValueError(f"gemm: scales.mode must be Fp8Mode.BLOCKWISE, MX or ROWWISE, got {mode!r}")
    for name, t in operands.items():
        check_dtype(f"gemm: {name} (FP8)", t, (E4M3,))
    check_dtype("gemm: out (FP8)", out.tensor, FLOAT_DTYPES)
    if a.block is not None:
        raise ValueError(f"gemm: an FP8 a must be dense or gathered, got a blocked layout (block {a.block})")
    rcp = mode.recipe()
    E, K, N = w.shape
    k_groups = -(-K // (rcp.group or max(K, 1)))
    w_shape = (E, k_groups, -(-N // rcp.weight_across))
    second = gate is not None or pair is not None
    expected = {
        "a": (scales.a, "[rows, K groups]", (a.tensor.shape[0], k_groups)),
        "w": (scales.w, "[E, K groups, N groups]", w_shape),
        "w2": (scales.w2, "[E, K groups, N groups]", w_shape if second else None),
        "a2": (scales.a2, "[rows, K groups]", (a.tensor.shape[0], k_groups) if pair is not None else None),
    }
    for name, (t, dims, shape) in expected.items():
        if shape is None:
            if t is not None:
                needs = "a pair" if name == "a2" else "a gate or a pair"
                raise ValueError(f"gemm: scales.{name} must be None without {needs}, got a tensor of shape "
                                 f"{tuple(t.shape)}")  # fmt: skip
            continue
        if t is None:
            raise ValueError(f"gemm: scales.{name} is needed ({rcp.name} scales {dims} = {shape}), got None")
        check_tensor(f"gemm: scales.{name} ({rcp.name})", t, dims, shape)
        check_dtype(f"gemm: scales.{name} ({rcp.name})", t, (rcp.scale_dtype,))
    check_same_device(a=a.tensor, **{f"scales.{name}": t for name, (t, _, _) in expected.items()})
    if pair is not None and scales.a2.stride() != scales.a.stride():
        raise ValueError(f"gemm: scales.a2 must share scales.a's strides, got {scales.a2.stride()} and "
                         f"{scales.a.stride()}")  # fmt: skip
    return mode


def _quant_a_mode(
    out: Rows,
    act_out: torch.Tensor | None,
    act_scales: torch.Tensor | None,
    backward: BackwardEpilogue | None,
    fp8: Fp8Mode,
) -> Fp8Mode:
    """``gemm``'s ``QUANT_A``: ``NONE`` without ``act_scales``; with them, the GEMM's FP8 mode once what the kernel
    relies on is checked: the forward epilogue (``act_out`` given, no ``backward``) of an FP8 GEMM whose mode is in
    ``EPILOGUE_QUANT`` over a dense out, ``act_out`` E4M3 in out's shape and strides, ``act_scales`` the
    ``kernels.quantize.quantize(a, (1, group))`` scales ``[R, cdiv(N, group)]`` in the recipe's dtype; TypeError for
    types and dtypes, ValueError for values and shapes."""
    if act_scales is None:
        if act_out is not None and act_out.dtype == E4M3:
            raise TypeError("gemm: an E4M3 act_out (a quantized in the forward epilogue) needs act_scales, got None")
        return Fp8Mode.NONE
    if act_out is None or backward is not None:
        raise ValueError(f"gemm: act_scales applies to the forward epilogue (act_out given, backward None), got "
                         f"act_out {'None' if act_out is None else 'given'} and backward "
                         f"{'None' if backward is None else 'given'}")  # fmt: skip
    if fp8 not in EPILOGUE_QUANT:
        names = ", ".join(m.recipe().name for m in EPILOGUE_QUANT)
        raise ValueError(f"gemm: a quantized in the forward epilogue (act_scales) needs an FP8 GEMM of recipe "
                         f"{names}, got {'no FP8' if fp8 == Fp8Mode.NONE else fp8.recipe().name}")  # fmt: skip
    if out.block is not None:
        raise ValueError(f"gemm: a quantized in the forward epilogue needs a dense out, got a blocked layout (block "
                         f"{out.block})")  # fmt: skip
    check_tensor("gemm: act_out (quantized a)", act_out, "[R, N]", tuple(out.tensor.shape))
    check_dtype("gemm: act_out (quantized a)", act_out, (E4M3,))
    if act_out.stride() != out.tensor.stride():
        raise ValueError(f"gemm: act_out (quantized a) must share out's strides {out.tensor.stride()}, got "
                         f"{act_out.stride()}")  # fmt: skip
    rcp = fp8.recipe()
    shape = rcp.act_scale_shape(out.rows, out.cols)
    check_tensor(f"gemm: act_scales ({rcp.name})", act_scales, "[R, cdiv(N, group)]", shape)
    check_dtype(f"gemm: act_scales ({rcp.name})", act_scales, (rcp.scale_dtype,))
    check_same_device(out=out.tensor, act_out=act_out, act_scales=act_scales)
    return fp8


def _check_e4m3_device(op: str, t: torch.Tensor) -> None:
    """E4M3 MMAs are there: compute capability 8.9 or newer (or not CUDA: the interpreter), else a ``ValueError``
    naming ``op`` (Triton does not compile E4M3 ``tl.dot`` for sm_80)."""
    cc = capability(t)
    if cc is not None and cc < 89:
        raise ValueError(f"{op}: FP8 operands need E4M3 MMAs (compute capability 8.9 or newer), got a device of "
                         f"compute capability {cc // 10}.{cc % 10}")  # fmt: skip


def gemm(
    a: Rows,
    w: torch.Tensor,
    out: Rows,
    schedule: Schedule,
    *,
    row_src: torch.Tensor | None = None,
    pair: tuple[Rows, torch.Tensor] | None = None,
    gate: torch.Tensor | None = None,
    gate_out: torch.Tensor | None = None,
    act_out: torch.Tensor | None = None,
    act_scales: torch.Tensor | None = None,
    activation: str = "identity",
    backward: BackwardEpilogue | None = None,
    scales: GemmScales | None = None,
) -> torch.Tensor | None:
    """Launch ``gemm_kernel``: ``out[rows of e] = a[rows of e] @ w[e]`` (w ``[E, K, N]``, any strides) over
    ``schedule``; rows past ``offsets[E]`` are zeroed. Operands are validated by the caller, except FP8's (below).

    - ``row_src`` with a gathered ``a``: the token of each row (-1: a zero row);
    - ``pair = (a2, w2)``: ``out = a @ w + a2 @ w2`` (``a2`` in ``a``'s layout; ``w2`` any strides);
    - forward epilogue (``act_out`` given): ``out = h``, ``gate_out = g`` (GLU: ``gate`` is the gate weight),
      ``act_out = act(h) [· g]``; with ``act_scales`` (an FP8 GEMM whose mode is in ``EPILOGUE_QUANT``, a dense
      out), ``act_out`` E4M3 (out's shape and strides) and ``act_scales [R, cdiv(N, group)]``: that ``a`` (rounded to
      out's dtype) quantized as ``kernels.quantize.quantize(a, (1, group))`` would, bit for bit (checked here:
      ``_quant_a_mode``);
    - ``backward``: the backward epilogue; ``out = dh``, ``gate_out = dg`` (GLU), ``act_out = aw``; returns the
      fp32 ``dots [N tiles, R]`` (Σ over each tile's columns of ``G·a``; their sum over N tiles is the top-k weight
      gradient of each row);
    - ``scales``: E4M3 ``a`` (dense or gathered), ``w`` (``gate``, the pair's) with the scales of ``scales.mode``
      (``GemmScales``, checked here: ``_fp8_mode``); the output in ``out``'s dtype (bf16 / fp16 / fp32).

    Outputs in ``out``'s layout share its strides. Grid: ``(persistent_programs(device, tiles,
    cfg.programs_per_sm),)`` (persistent: sm_100 with TMA weights, or interpreting) or ``(tiles,)``, ``tiles =
    max_m_tiles · cdiv(padded cols, block_n)``.
    """
    N, K, E = w.shape[2], a.cols, w.shape[0]
    epilogue = Epilogue.PLAIN
    if backward is not None:
        epilogue = Epilogue.BACKWARD
    elif act_out is not None:
        epilogue = Epilogue.FORWARD
    glu = gate is not None or (backward is not None and backward.g is not None)
    dtype = a.tensor.dtype
    a2, w2 = pair if pair is not None else (a, gate if gate is not None else w)
    fp8 = _fp8_mode(a, w, out, gate, pair, scales)
    quant_a = _quant_a_mode(out, act_out, act_scales, backward, fp8)
    if fp8 != Fp8Mode.NONE:
        _check_e4m3_device("gemm", a.tensor)
    aligned = aligned16((a.tensor, w, w2, out.tensor), (K, N), (*a.strides, *w.stride(), *w2.stride(), *out.strides))
    cfg = gemm_config(
        dtype, schedule.block_m, epilogue=epilogue, glu=glu, pair=pair is not None, aligned=aligned,
        out_block=out.block, a_block=a.block, capability=capability(a.tensor), fp8=fp8, dense_rows=not a.gathered,
    )  # fmt: skip
    if quant_a != Fp8Mode.NONE and cfg.block_n % quant_a.recipe().group:  # the configs' invariant (gemm_config)
        raise AssertionError(f"gemm: a quantized in the epilogue needs tiles of whole {quant_a.recipe().group}-column "
                             f"groups, got a config of {cfg.block_n} columns")  # fmt: skip
    n_store = out.padded_cols
    num_n = triton.cdiv(n_store, cfg.block_n)
    dots = None
    if backward is not None:
        dots = torch.empty(num_n, out.rows, dtype=torch.float32, device=out.tensor.device)
    if schedule.max_m_tiles * num_n == 0:
        return dots
    if a2.strides != a.strides or a2.log_block != a.log_block:
        raise ValueError(f"gemm: the pair's second operand must share the first's row layout, got strides "
                         f"{a2.strides} and {a.strides}")  # fmt: skip
    tma = _tma_mode(w) if aligned else WeightLoad.POINTERS
    if _tma_mode(w2) != tma:  # the second weight (GLU gate, pair) must load the same way
        tma = WeightLoad.POINTERS
    w_desc = w2_desc = None
    if tma != WeightLoad.POINTERS:
        w_desc = _descriptor(w, tma, cfg.block_k, cfg.block_n)
        w2_desc = _descriptor(w2, tma, cfg.block_k, cfg.block_n) if (gate is not None or pair is not None) else None
    bwd = backward or BackwardEpilogue(out.tensor, None, schedule.offsets, out.tensor)
    off = schedule.offsets
    tiles = schedule.max_m_tiles * num_n
    # the backward epilogue and the GLU forward (two accumulators) stay one tile per program: warp-specialized on
    # sm_100's 4 warps they spill (48-116 B, bench.audit); persistent, sm_100's 128-wide GLU forward measured worse
    # (gemm_config)
    two_acc = epilogue == Epilogue.BACKWARD or (glu and epilogue == Epilogue.FORWARD)
    two_acc = two_acc or (pair is not None and fp8 in (Fp8Mode.BLOCKWISE, Fp8Mode.ROWWISE))  # FP8: 4-warp ws spilled
    dense_tma = _dense_a_tma(fp8, aligned, a, a2 if pair is not None else None)
    gather4 = aligned and pair is None and row_gather_step(fp8, cfg) and _gather_load(a) == WeightLoad.GATHER4
    warp_spec = tma != WeightLoad.POINTERS and not two_acc and _warp_specialize(w.device)
    # FP8 rows through TMA in a loop that is not warp-specialized (warp-specialized, the rows' TMA moves into the
    # producer partition and ptxas drops Triton's register split: 255 registers), where that measured leaner
    # (fp8_rows_warp_specialized); the others keep warp specialization and load their rows by cp.async there
    if warp_spec and fp8 != Fp8Mode.NONE and (dense_tma or gather4):
        warp_spec = fp8_rows_warp_specialized(fp8, cfg, a.gathered)
    persistent = interpreting() or warp_spec  # elsewhere the tile loop costs registers: sm_90 1 CTA/SM, spills
    a_tma = WeightLoad.GATHER4 if gather4 and not warp_spec else WeightLoad.POINTERS
    a_desc = TensorDescriptor.from_tensor(a.tensor, [1, cfg.block_k]) if a_tma == WeightLoad.GATHER4 else None
    a2_desc = None
    if dense_tma and not warp_spec:
        a_tma = WeightLoad.TMA
        a_desc = TensorDescriptor.from_tensor(a.tensor, [cfg.block_m, cfg.block_k])
        if pair is not None:
            a2_desc = TensorDescriptor.from_tensor(a2.tensor, [cfg.block_m, cfg.block_k])
    sw_tma = _mx_scales_tma(fp8, cfg, K, w.device)
    sa_tma = sw_tma and not a.gathered and a.rows > 0  # dense A: its scales per M tile (gathered: the tokens')
    sw_desc = sw2_desc = sa_desc = sa2_desc = None
    if sw_tma:
        sw_desc = _mx_scales_descriptor(_mx_scale_chunks(scales.w), cfg.block_n, cfg.block_k)
        if scales.w2 is not None:
            sw2_desc = _mx_scales_descriptor(_mx_scale_chunks(scales.w2), cfg.block_n, cfg.block_k)
    if sa_tma:
        sa_desc = _mx_scales_descriptor(_mx_tile_scales(scales.a, schedule), cfg.block_m, cfg.block_k)
        if scales.a2 is not None:
            sa2_desc = _mx_scales_descriptor(_mx_tile_scales(scales.a2, schedule), cfg.block_m, cfg.block_k)
    sa, sw = (scales.a, scales.w) if scales is not None else (off[None], off[None, None])  # unused without FP8
    sa2 = scales.a2 if scales is not None and scales.a2 is not None else sa
    sw2 = scales.w2 if scales is not None and scales.w2 is not None else sw
    sq = act_scales if act_scales is not None else sa  # unused without QUANT_A
    if act_out is not None and quant_a != Fp8Mode.NONE:
        act_out = act_out.view(torch.uint8)  # the epilogue stores E4M3 bits
    gemm_kernel[(persistent_programs(out.tensor.device, tiles, cfg.programs_per_sm) if persistent else tiles,)](
        a.tensor, w, a2.tensor, w2, w_desc, w2_desc, a_desc, a2_desc, sw_desc, sw2_desc, sa_desc, sa2_desc, out.tensor,
        out.tensor if gate_out is None else gate_out, out.tensor if act_out is None else act_out, bwd.h,
        bwd.h if bwd.g is None else bwd.g,
        off if row_src is None else row_src, bwd.row_asg, bwd.weights, out.tensor if dots is None else dots, off,
        schedule.tile_offsets, schedule.tile_expert, sa, sa2, sw, sw2, sq,
        out.rows, N, n_store, K, E, schedule.max_m_tiles,
        *a.strides, *w.stride(), *w2.stride(), *out.strides, *sa.stride(), *sw.stride(), *sw2.stride(),
        *sq.stride(),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EPI_N=cfg.epi_n, GROUP_M=cfg.group_m,
        LB_A=a.log_block, LB_O=out.log_block, GATHER=a.gathered, GLU=glu, PAIR=pair is not None, EPILOGUE=int(epilogue),
        ACT=kernel_code(activation), W_TMA=int(tma), WARP_SPEC=warp_spec,
        DOTS=dot_mode(dtype), PERSISTENT=persistent, FP8=int(fp8), QUANT_A=int(quant_a), A_TMA=int(a_tma),
        SW_TMA=sw_tma, SA_TMA=sa_tma, SWAP_AB=cfg.swap_ab, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return dots


def _check_wgrad_scales(a: Rows, b: Rows, b2: Rows | None, E: int, scales: WgradScales | None) -> Fp8Mode:
    """The FP8 mode of a ``wgrad`` launch once its operands and ``scales`` fit ``wgrad_kernel``: E4M3 operands come
    with scales and dense rows, on a device with E4M3 MMAs (sm_89 or newer); each scale is ``fp8.quantize_rows``'
    ``[rows // group + E + 1, C]`` (``[E + 1, C]`` rowwise) in the recipe's dtype. TypeError for types and dtypes,
    ValueError for values and shapes."""
    operands = {"a": a, "b": b, "b2": b2}
    if scales is None:
        for name, r in operands.items():
            if r is not None and r.tensor.dtype == torch.float8_e4m3fn:
                raise TypeError(f"wgrad: the E4M3 operand {name} needs scales (a WgradScales), got scales=None")
        return Fp8Mode.NONE
    if not isinstance(scales, WgradScales):
        raise TypeError(f"wgrad: scales must be a WgradScales or None, got {type(scales).__name__}")
    modes = (Fp8Mode.BLOCKWISE, Fp8Mode.MX, Fp8Mode.ROWWISE)
    mode = Fp8Mode(choice("wgrad: scales.mode", scales.mode, modes))
    _check_e4m3_device("wgrad", a.tensor)
    if (scales.b2 is None) != (b2 is None):
        given = {True: "None", False: "a tensor"}
        raise ValueError(f"wgrad: scales.b2 must be given exactly when b2 is, got b2 {given[b2 is None]} and "
                         f"scales.b2 {given[scales.b2 is None]}")  # fmt: skip
    group, scale_dtype = FP8_RECIPES[mode].group, FP8_RECIPES[mode].scale_dtype
    for name, r in operands.items():
        if r is None:
            continue
        check_dtype(f"wgrad: {name} (FP8)", r.tensor, (torch.float8_e4m3fn,))
        if r.gathered or r.block is not None:
            layout = "gathered" if r.gathered else f"blocked (block {r.block})"
            raise ValueError(f"wgrad: the FP8 operand {name} must be dense rows (the backend materializes it in "
                             f"expert order), got {layout} rows")  # fmt: skip
        groups = E if group is None else r.rows // group + E
        scale = check_tensor(f"wgrad: scales.{name}", getattr(scales, name), "[groups + 1, cols]", (groups + 1, r.cols))
        check_dtype(f"wgrad: scales.{name} ({mode.name})", scale, (scale_dtype,))
    if b2 is not None and scales.b2.stride() != scales.b.stride():
        raise ValueError(f"wgrad: scales.b2 must share scales.b's strides, got {scales.b2.stride()} and "
                         f"{scales.b.stride()}")  # fmt: skip
    check_tensor("wgrad: scales.group_offsets", scales.group_offsets, "[E + 1]", (E + 1,))
    check_dtype("wgrad: scales.group_offsets", scales.group_offsets, INDEX_DTYPES)
    check_same_device(a=a.tensor, scales_a=scales.a, scales_b=scales.b, scales_b2=scales.b2,
                      group_offsets=scales.group_offsets)  # fmt: skip
    return mode


def wgrad(
    a: Rows,
    b: Rows,
    out: torch.Tensor,
    offsets: torch.Tensor,
    *,
    row_src: torch.Tensor | None = None,
    b2: Rows | None = None,
    out2: torch.Tensor | None = None,
    scales: WgradScales | None = None,
    row_align: int = 1,
) -> None:
    """Launch ``wgrad_kernel``: ``out[e] = a[rows of e]ᵀ @ b[rows of e]`` (out ``[E, M, N]``, any strides; ``b2`` /
    ``out2``: a second product over the same A tiles); ``row_src`` for a gathered ``a`` or ``b``. Blocked layouts
    need block-padded ``offsets``. Operands are validated by the caller, the FP8 ``scales`` here: E4M3 dense ``a``,
    ``b`` (``b2``) quantized along the rows (``fp8.quantize_rows``, ``WgradScales``), out in its own dtype.
    ``row_align``: the caller's promise that every expert row offset is a multiple of it (block-padded offsets): 16
    or more lets K-major E4M3 operands load through TMA (``_row_tma``). Grid: ``(E · tiles_m · tiles_n,)``."""
    E, M, N = out.shape
    positive_int("wgrad: row_align", row_align)
    fp8_mode = _check_wgrad_scales(a, b, b2, E, scales)
    gather = a.gathered or b.gathered
    aligned = aligned16((a.tensor, b.tensor, out), (M, N), (*a.strides, *b.strides, *out.stride()))
    cfg = wgrad_config(a.tensor.dtype, gather=gather, aligned=aligned, a_block=a.block, b_block=b.block,
                       capability=capability(a.tensor), fp8=fp8_mode)  # fmt: skip
    if b2 is not None and (b2.strides != b.strides or b2.log_block != b.log_block or out2.stride() != out.stride()):
        raise ValueError(f"wgrad: b2 and out2 must share b's and out's layouts, got strides {b2.strides} and "
                         f"{b.strides}, {out2.stride()} and {out.stride()}")  # fmt: skip
    grid = E * triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n) * (1 if b2 is None else 2)
    if grid == 0:
        return
    a_tma = _row_tma(a, row_align) if aligned else WeightLoad.POINTERS
    b_tma = _row_tma(b, row_align) if aligned else WeightLoad.POINTERS
    if b2 is not None and _row_tma(b2, row_align) != b_tma:  # B2 loads as B does
        b_tma = WeightLoad.POINTERS
    if (a_tma or b_tma) and not interpreting():
        scratch_allocator()  # the descriptors built on the device need Triton's launch-time scratch memory
    if scales is None:  # FP8 NONE: the scale arguments are unused
        sa = sb = sb2 = out
        group_offsets, scale_strides = offsets, (0, 0, 0, 0)
    else:
        sa, sb, sb2 = scales.a, scales.b, scales.b if scales.b2 is None else scales.b2
        group_offsets, scale_strides = scales.group_offsets, (*sa.stride(), *sb.stride())
    wgrad_kernel[(grid,)](
        a.tensor, b.tensor, b.tensor if b2 is None else b2.tensor, out, out if out2 is None else out2,
        offsets, offsets if row_src is None else row_src, sa, sb, sb2, group_offsets,
        M, N, *a.strides, *b.strides, *out.stride(), *scale_strides,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, LB_A=a.log_block,
        LB_B=b.log_block, A_GATHER=a.gathered, B_GATHER=b.gathered, DUAL=b2 is not None, A_TMA=int(a_tma),
        B_TMA=int(b_tma),
        DOTS=dot_mode(a.tensor.dtype), FP8=int(fp8_mode), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
