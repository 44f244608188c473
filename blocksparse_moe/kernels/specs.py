"""Every kernel configuration the GPU path can pick, as ``CompileSpec``s for the ahead-of-time compile audit
(``python -m bench.audit``): the launchers' configs (``expert_gemm.gemm_config`` / ``wgrad_config``,
``permute.permute_config``) crossed with the operand layouts the ops run.

Layouts decide which stride the JIT specialises to 1 (a contiguous operand) and so the loads the compiler emits:
each use below lists its unit strides. Row operands always have unit column stride (the Triton backend copies a
transposed view first: wgmma takes a transposed A only through registers, which serialises the main loop); weights
come in either orientation (``wT``: ``dy @ wᵀ``) and stay views. Coverage, and what is left out on purpose:

- dtypes: bf16 and fp32 for every use; fp16 for the main GEMM shapes only (its builds are the bf16 builds with
  another MMA type: the same tiles, registers and pipeline); the architectures per dtype: ``_dtype_archs``;
- the fast config of 16-bit operands is built ``aligned`` (the launcher picks it only for 16-byte aligned operands
  whose sizes and strides are multiples of 16, ``aligned16``), its fallback ``unaligned`` (odd shapes; partly
  aligned operands lie between the two);
- the fused epilogues with silu; the GLU epilogues (forward and backward, dense and blocked) once more with gelu
  (bf16, 128-row tiles, the fast config): its erf is the heaviest epilogue (the other activations stay within a few
  registers of silu: ``_GLU_ACTIVATIONS``);
- block sizes 64 and 128 (``GPU_BLOCK_SIZES``: on a GPU the Triton backend refuses 16 and 32, the interpreter
  tests' sizes, ``backends.triton._block_size``); the grouped (unpadded) M tiles 32, 64 and 128
  (``backends.triton._grouped_block_m``: on a GPU at least ``MIN_BLOCK_M`` = 32 rows, 32 for experts with a few
  rows each, as in decode: not ``is_matmul``, which asks for an M tile of 64 rows; sm_90 and sm_100 run them
  swapped, the rows as the MMA's N: ``_AUDITED_M``); tests/test_audit.py checks that these hold every 16-bit tile
  the launchers pick;
- FP8 (issue 17): ``gemm_kernel``'s and ``wgrad_kernel``'s E4M3 builds, each recipe with each GEMM of the FP8 MLP
  (``_FP8_USES``, ``_FP8_TWINS``), on the architectures with E4M3 MMAs (sm_90, sm_100, sm_120), with the waivers
  measured from their SASS (docs/audit.md); the FP8 MLP's grouped M tiles are 64 and 128 rows (never 16 or 32:
  ``backends.triton.FP8_MIN_BLOCK_M``, where E4M3 MMAs run).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..activations import kernel_code
from ..fp8 import RECIPES
from ..fp8 import recipe as recipe_of
from ._common import DOTS_IEEE, DOTS_NATIVE
from .expert_gemm import (
    EPILOGUE_QUANT,
    FP8_RECIPES,
    Epilogue,
    Fp8Mode,
    WeightLoad,
    fp8_rows_warp_specialized,
    gemm_config,
    gemm_kernel,
    mx_chunk_tiles,
    row_gather_step,
    scale_chunks_kernel,
    wgrad_config,
    wgrad_kernel,
)
from .layouts import BLOCK_SIZES, DENSE_LOG_BLOCK, GPU_BLOCK_SIZES
from .permute import gather_kernel, permute_config, scatter_kernel, weights_grad_kernel
from .quantize import quantize_config, quantize_dual_kernel, quantize_kernel

__all__ = ["CompileSpec", "compile_specs", "kernel_signature", "triton_type"]

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
                 torch.int16: "i16", torch.int64: "i64", torch.uint8: "u8", torch.float8_e4m3fn: "fp8e4nv"}  # fmt: skip


def triton_type(dtype: torch.dtype) -> str:
    """Triton's name of ``dtype`` (``"bf16"``, ``"i32"``, ...), as in signatures and spec names."""
    return _TRITON_TYPES[dtype]


def kernel_signature(
    kernel, constexprs: dict[str, Any], dtype: torch.dtype, pointer_dtypes: dict[str, torch.dtype]
) -> dict[str, str]:
    """``CompileSpec.signature`` of ``kernel``: ``constexpr`` for the arguments in ``constexprs``; pointers
    (``*_ptr``) typed by ``pointer_dtypes`` where listed, else by ``dtype``; other arguments ``i32``."""
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = f"*{triton_type(pointer_dtypes.get(arg, dtype))}"
        else:
            signature[arg] = "i32"
    return signature


@dataclass(frozen=True)
class CompileSpec:
    """One kernel configuration the GPU path can pick, for the ahead-of-time compile audit (bench/audit/).

    ``signature`` maps every non-constexpr argument name to a Triton type string (``"*fp16"``, ``"i32"``,
    ...); ``constexprs`` maps every ``tl.constexpr`` argument to its value.

    The JIT specialises pointers and integers that are multiples of 16 (``tt.divisibility`` 16): vector loads,
    a pipelined K loop. The audit builds each spec in the ``variants`` it lists: ``"unaligned"`` (no
    divisibility, as odd shapes run) and ``"aligned"`` (every pointer and the integer arguments named in
    ``aligned`` divisible by 16, as realistic shapes run). A config the launcher picks only for aligned
    (unaligned) operands lists only that variant.

    ``is_matmul`` marks a tensor-core matmul tile (M tile >= 64 rows, as wgmma and tcgen05 need): its builds must
    use the architecture's MMA (HGMMA on sm_90, tcgen05 ``UTC*MMA`` on sm_100 unless ``tcgen05_ok`` is False,
    HMMA on sm_80 / sm_120). ``expect_pipelined``: the main (MMA) loop must keep its loads in flight, never waiting
    its cp.async copies or wgmma to zero inside the loop. See docs/audit.md.

    The per-FLOP checks (issue ratio, operand intensity, CTAs per SM) apply to the aligned build of a ``per_flop``
    spec (a config the launchers pick at large, realistic shapes); ``serves`` says which shapes get it,
    ``operand_bytes`` is what one main-loop iteration reads (its distinct operand tiles), ``min_intensity`` the
    intensity floor (FLOP per operand byte; None: exempt, for small-M tiles), ``persistent`` a kernel whose programs
    loop over tiles (one CTA per SM suffices; its build must hold the ``programs_per_sm`` its launcher starts per
    SM, else they run in waves), ``waivers`` the ``(check or "check@cc", reason)`` pairs the audit
    reports without failing on, for this config only.
    """

    name: str  # e.g. "sdd[bf16,B=128,K=64]"
    kernel: Any  # the @triton.jit function
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    is_matmul: bool = True  # a tensor-core tile: HGMMA on sm_90, tcgen05 on sm_100, HMMA on sm_80 / sm_120
    aligned: tuple[str, ...] = ()  # integer arguments (sizes, strides) that realistic shapes make multiples of 16
    variants: tuple[str, ...] = ("unaligned", "aligned")
    tcgen05_ok: bool = True  # with is_matmul: sm_100 builds must use tcgen05 MMA (Triton 3.9: every M tile >= 64)
    expect_pipelined: bool = True  # the MMA loop must not wait its async loads / wgmma to zero each iteration
    archs: tuple[int, ...] | None = None  # the compute capabilities the launcher picks this config for (None: all)
    persistent: bool = False  # programs loop over the tiles (a grid of about one wave): 1 CTA/SM is no loss
    programs_per_sm: int = 2  # persistent: the programs per SM its launcher starts, which its build must keep resident
    serves: str = ""  # the shapes the launchers pick this config for
    per_flop: bool = False  # picked at large shapes: the per-FLOP checks apply to its aligned build
    operand_bytes: int | None = None  # bytes of the distinct operand tiles one main-loop iteration reads
    min_intensity: float | None = 64.0  # FLOP per operand byte at least; None: exempt (small-M tiles)
    waivers: tuple[tuple[str, str], ...] = ()  # (check or "check@cc", reason): reported, not failed, here

    @property
    def fp8(self) -> bool:
        """An E4M3 operand in the signature (``*fp8e4nv``): the audit's ``fp8mma`` check applies to a matmul."""
        return any(t == "*fp8e4nv" for t in self.signature.values())

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in ("unaligned", "aligned")]
        if unknown or not self.variants:
            raise ValueError(f"{self.name}: variants must be 'unaligned' and/or 'aligned', got {self.variants}")
        not_int = [a for a in self.aligned if not self.signature.get(a, "").startswith(("i", "u"))]
        if not_int:
            raise ValueError(f"{self.name}: aligned must name integer arguments of the signature, got {not_int}")
        bad = [w for w in self.waivers if len(w) != 2 or not all(isinstance(v, str) and v for v in w)]
        if bad:
            raise ValueError(f"{self.name}: waivers must be (check, reason) pairs of non-empty strings, got {bad}")


_INDEX = dict.fromkeys(
    (
        "offsets_ptr",
        "tile_offsets_ptr",
        "tile_expert_ptr",
        "row_src_ptr",
        "row_asg_ptr",
        "row_assignment_ptr",
        "assignment_row_ptr",
    ),
    torch.int32,
)
_FP32 = dict.fromkeys(("weights_ptr", "dots_ptr"), torch.float32)

# Integer arguments that realistic shapes make multiples of 16 (sizes and strides; never row or expert counts).
_GEMM_ALIGNED = ("N", "N_STORE", "K", "s_arb", "s_ar", "s_acb", "s_ac", "s_we", "s_wk", "s_wn", "s_w2e", "s_w2k",
                 "s_w2n", "s_orb", "s_or", "s_ocb", "s_oc")  # fmt: skip
_WGRAD_ALIGNED = ("M", "N", "s_arb", "s_ar", "s_acb", "s_ac", "s_brb", "s_br", "s_bcb", "s_bc", "s_oe", "s_om", "s_on")

_HALF = (torch.float16, torch.bfloat16)


_ARCHS = (80, 90, 100, 120)  # the compute capabilities the configs are listed for (``bench.audit``'s targets)
_TMA_ARCHS = (90, 100, 120)  # where the launchers load through TMA (``expert_gemm._tma_mode``, ``_row_tma``)
_NO_WS_TMA_ARCHS = (90, 120)  # gemm_kernel's TMA builds without warp specialization (sm_100's: ``_warp_specialize``)
_GATHER4_ARCHS = (100,)  # where gemm gathers 16-bit token rows through TMA (``expert_gemm._gather_load``)
_SCALE_TMA_ARCHS = (100,)  # where gemm reads MX scales through TMA in tcgen05's chunks (``_mx_scales_tma``)
# gemm_kernel's MX scales by pointers (SW_TMA: the weights', SA_TMA: a dense A's)
_NO_SCALE_TMA = {"SW_TMA": False, "sw_desc": None, "sw2_desc": None, "SA_TMA": False, "sa_desc": None, "sa2_desc": None}


def _spec(
    name, kernel, dtype, cfg, constexprs, unit, aligned, variants, pointer_dtypes, archs=None, **audit
) -> CompileSpec:
    constexprs = {**constexprs, **dict.fromkeys(unit, 1)}
    signature = kernel_signature(kernel, constexprs, dtype, pointer_dtypes)
    aligned = tuple(a for a in aligned if a not in unit and a in signature and not a.endswith("_desc"))
    matmul = constexprs["BLOCK_M"] >= 64
    return CompileSpec(
        name, kernel, signature, constexprs, cfg.num_warps, cfg.num_stages, matmul, aligned=aligned,
        variants=variants, archs=archs, persistent=bool(constexprs.get("PERSISTENT")),
        programs_per_sm=getattr(cfg, "programs_per_sm", 2), **audit,
    )  # fmt: skip


# The M tile (token rows) the schedules use at large shapes: the grouped GEMMs' tile when experts get at least that
# many rows (``backends.triton._grouped_block_m``) and the default block size; smaller M tiles serve small T / decode.
_LARGE_M = max(BLOCK_SIZES)
_MIN_INTENSITY = 64.0  # FLOP per byte of operand tiles (issue 16: ~64 FLOP per L2 byte caps a kernel near 640 TFLOP/s)
_MIN_INTENSITY_BWD = 48.0  # the backward epilogue's (its h / g / dout loads come on top)

# Per-FLOP checks the kernels cannot pass without a structural change: reported, not failed, for these configs only
# (``CompileSpec.waivers``); each names why and what it would take.
_WAIVE_FP32 = (
    "fp32 (tf32) tiles: 4-byte operands at <= 64 columns and a K step of 32 (wider fp32 tiles spill on sm_80 / "
    "sm_120), a quarter of a 16-bit K step's MMA work over as many load instructions; left to do: per-architecture "
    "fp32 tiles"
)
_WAIVE_B64 = (
    "block_size=64: the blocks bound the tile to 64 rows or columns (the default block_size=128 gets 128-wide tiles); "
    "a tile over several blocks is a kernel change"
)
_WAIVE_SMALL_M_100 = (
    "FP8 64-row tiles (small T) on sm_100, blockwise and mxfp8: blockwise runs tcgen05 M = 64 MMAs, half an M = 128 "
    "one's work under the same loop, and promotes each step's product in registers (1.11-1.67 issue clocks per MMA "
    "clock); swapped (SWAP_AB, as the 16-bit tiles and mxfp8's: the weight's columns as M) it spilled 336-1748 B "
    "(each step's transposed product promoted in registers). mxfp8's 128-column tiles swapped run native block-scaled "
    "MMAs (UTCQMMA, at the 8-bit rate) where Triton emulated M = 64 in bf16: 1.59-1.73 at that rate, fewer loop "
    "instructions than the emulation (204-228 per K step against 288-1360); its GLU forward (64 columns: still "
    "emulated swapped) stays as it was (3.57). Rowwise's 64-row tiles pass (their rows through TMA, 256-deep K steps "
    "or 128 GLU columns in 2 stages: 0.44-0.66)"
)
_WAIVE_DECODE = (
    "tiles under 64 rows (decode: experts of at most 32 rows) on sm_100: computed transposed (SWAP_AB: 256 weight "
    "columns as tcgen05's M, the tile's rows its N) where they ran mma.sync (32 rows: 1.62-1.95 -> 0.89 with the "
    "backward epilogue, 1.20 GLU forward, 1.23-1.28 in the warp-specialized loop, whose consumer warp issues the "
    "row copies; sm_90 passes: 0.55-0.66); the GEMM is bound by streaming the expert's weights (2 FLOP per weight "
    "element and row: at most 32 FLOP per byte), not by the issue rate"
)
_WAIVE_FP8_GLU_100 = (
    "blockwise FP8 GLU forward on sm_100: two 128x64 accumulators per A tile on 8 warps (both products promoted in "
    "registers every K step), 16 tcgen05 MMAs of N = 64 per K step, 1.85 issue clocks per MMA clock; 128x128 tiles "
    "with the epilogue in 32-column slices spill there (255 registers, 244 B, 1 CTA/SM, 1.56); mxfp8 and rowwise run "
    "128x128 there (0.69 / 0.66, no waiver)"
)
_WAIVE_WGRAD_100 = (
    "weight gradient on sm_100: the gathered operand by cp.async from every thread, its row indices and 64-bit row "
    "addresses each K step (issue 16 item 2: 1.0-1.3 issue clocks per MMA clock on 4 warps); TMA's row gather "
    "measured worse (issue 16 item 5: 250 -> 312 loop instructions, the indices moved to uniform registers per 4 rows)"
)


def _audit_fields(dtype, cfg, variants, shapes: str, operand_bytes: int, *, backward=False, fp8_glu=False, wgrad=False,
                  blocked_64=False, fp8_small_m=True) -> dict:  # fmt: skip
    """``CompileSpec``'s per-FLOP fields of a launcher config: what it serves (``shapes`` and the alignment its
    variants run), the per-FLOP checks on its aligned build, the intensity floor (exempt below ``_LARGE_M`` rows),
    and the waivers that apply to it (``fp8_small_m``: an FP8 recipe whose 64-row tiles are waived on sm_100)."""
    alignment = {("aligned",): "aligned", ("unaligned",): "unaligned fallback"}.get(variants, "any alignment")
    small_m = cfg.block_m < _LARGE_M
    floor = None if small_m else _MIN_INTENSITY_BWD if backward else _MIN_INTENSITY
    waivers = []
    if dtype == torch.float32:
        waivers += [("issue", _WAIVE_FP32), ("intensity", _WAIVE_FP32)]
    elif blocked_64:
        waivers += [("issue", _WAIVE_B64), ("intensity", _WAIVE_B64)]
    elif wgrad:
        waivers.append(("issue@100", _WAIVE_WGRAD_100))
    elif cfg.block_m < 64:
        waivers.append(("issue@100", _WAIVE_DECODE))
    elif small_m and dtype == torch.float8_e4m3fn and fp8_small_m:  # (16-bit 64-row tiles pass: swapped operands)
        waivers.append(("issue@100", _WAIVE_SMALL_M_100))
    elif fp8_glu and cfg.block_n < 128:  # blockwise's GLU forward, 64 columns (sm_100's MX / rowwise: 128, passing)
        waivers.append(("issue@100", _WAIVE_FP8_GLU_100))
    return dict(
        serves=f"{shapes}, {alignment}", per_flop="aligned" in variants, operand_bytes=operand_bytes,
        min_intensity=floor, waivers=tuple(waivers) if "aligned" in variants else (),
    )  # fmt: skip


def _weight_loads(dtype, cfg, mode: WeightLoad, two: bool) -> tuple[dict, dict[str, str]]:
    """The ``W_TMA`` constexprs and, with TMA, the descriptor arguments' signature types (``w2_desc`` only when the
    kernel reads a second weight: the GLU gate, or the dgrad pair's w3ᵀ)."""
    if mode == WeightLoad.POINTERS:
        return {"W_TMA": int(mode), "w_desc": None, "w2_desc": None}, {}
    block = [1, cfg.block_k, cfg.block_n] if mode == WeightLoad.TMA else [1, cfg.block_n, cfg.block_k]
    desc = f"tensordesc<{triton_type(dtype)}[{','.join(map(str, block))}]>"
    constexprs = {"W_TMA": int(mode)} if two else {"W_TMA": int(mode), "w2_desc": None}
    return constexprs, {"w_desc": desc, **({"w2_desc": desc} if two else {})}


def _gather_loads(dtype, variants, archs, gathered: bool) -> list[tuple[bool, tuple[int, ...]]]:
    """``(gather4, archs)``: the architectures of a ``gemm_kernel`` build whose gathered A comes through TMA's row
    gather (aligned 16-bit or E4M3 builds of a gathered use without warp specialization, on ``_GATHER4_ARCHS``; the
    caller asks for E4M3 ones at K steps of 128 or more) and the others."""
    g4 = tuple(cc for cc in archs if cc in _GATHER4_ARCHS) if (
        gathered and variants == ("aligned",) and dtype in (*_HALF, torch.float8_e4m3fn)) else ()  # fmt: skip
    rest = tuple(cc for cc in archs if cc not in g4)
    return [(load, a) for load, a in ((True, g4), (False, rest)) if a]


def _rows_desc(dtype, cols: int, rows: int = 1) -> str:
    """The signature type of a row operand's host descriptor (``a_desc``, ``a2_desc``): ``rows`` rows of ``cols``
    columns per box (gathered rows: one; FP8 dense rows: an M tile)."""
    return f"tensordesc<{triton_type(dtype)}[{rows},{cols}]>"


def _variants(
    configs, arch_list=_ARCHS, dtype: torch.dtype | None = None
) -> list[tuple[Any, tuple[str, ...], tuple[int, ...] | None, str]]:
    """``(config, variants, archs, tag)`` for a config function of ``aligned`` and ``capability``: per architecture
    one config for both variants, or the fast one aligned and the fallback unaligned; architectures that get the same
    config share one entry (``archs`` None: every one). ``tag``: ``",swap"`` for a swapped config (``swap_ab``), then
    ``",w=<warps>"`` where one variant has several such configs across the architectures (their names would clash
    otherwise). ``arch_list``: the
    architectures to list.

    An fp32 (TF32 / IEEE) config that serves both alignments is built unaligned only: fp32 operands always load
    through pointers (no TMA), so the two builds are the same code but for vectorised loads, and the unaligned one
    holds the more registers (139 of the 161 fp32 pairs of the audit at 7d5619f, none spilling): the spill and
    pipeline checks judge the worse of the two (CI time: 104 builds fewer)."""
    shared = ("unaligned",) if dtype == torch.float32 else ("unaligned", "aligned")
    out: dict[tuple[Any, tuple[str, ...]], list[int]] = {}
    for cc in arch_list:
        fast, fallback = configs(aligned=True, capability=cc), configs(aligned=False, capability=cc)
        pairs = [(fast, shared)] if fast == fallback else [(fast, ("aligned",)), (fallback, ("unaligned",))]
        for key in pairs:
            out.setdefault(key, []).append(cc)
    many = {(v, c.swap_ab) for (c, v) in out if sum(1 for (d, w) in out if (w, d.swap_ab) == (v, c.swap_ab)) > 1}
    return [
        (
            cfg,
            variants,
            None if tuple(archs) == _ARCHS else tuple(archs),
            (",swap" if cfg.swap_ab else "") + (f",w={cfg.num_warps}" if (variants, cfg.swap_ab) in many else ""),
        )
        for (cfg, variants), archs in out.items()
    ]


# ----------------------------------------------------------------------------------------------- gemm


@dataclass(frozen=True)
class _GemmUse:
    """One way the ops run ``gemm_kernel``: its epilogue and operand layouts."""

    tag: str
    epilogue: Epilogue = Epilogue.PLAIN
    glu: bool = False
    pair: bool = False  # acc = a @ w + a2 @ w2 (the dgrad of the GLU pair)
    gather: bool = False  # A's rows gathered through row_src
    a_blocked: bool = False  # A in the blocked layout (else dense)
    out_blocked: bool = False  # out in the blocked layout (else dense)
    w_t: bool = False  # the weight a transposed view (unit stride along K: wᵀ in the backward)

    @property
    def unit(self) -> tuple[str, ...]:
        """The strides the JIT specialises to 1: A's and out's columns, and w's and w2's N (or K for transposed
        views; w2 is w itself where the kernel reads no second weight)."""
        return ("s_ac", "s_wk" if self.w_t else "s_wn", "s_w2k" if self.w_t else "s_w2n", "s_oc")

    @property
    def blocked(self) -> bool:
        return self.a_blocked or self.out_blocked


_GEMM_USES = (
    _GemmUse("grouped_mm"),
    _GemmUse("grouped_mm,gather", gather=True),
    _GemmUse("grouped_mm,wT", w_t=True),  # dy @ wᵀ
    _GemmUse("up,glu", epilogue=Epilogue.FORWARD, glu=True, gather=True),
    _GemmUse("up", epilogue=Epilogue.FORWARD, gather=True),
    _GemmUse("down_bwd,glu", epilogue=Epilogue.BACKWARD, glu=True, gather=True, w_t=True),  # dout @ w2ᵀ
    _GemmUse("down_bwd", epilogue=Epilogue.BACKWARD, gather=True, w_t=True),
    _GemmUse("dgrad_pair", pair=True, w_t=True),  # dh @ w1ᵀ + dg @ w3ᵀ
    _GemmUse("sdd", out_blocked=True),
    _GemmUse("sdd,wT", out_blocked=True, w_t=True),
    _GemmUse("dsd", a_blocked=True),
    _GemmUse("dsd,wT", a_blocked=True, w_t=True),  # also dds_t: (S @ gᵀ)ᵀ
    _GemmUse("up,glu,B", epilogue=Epilogue.FORWARD, glu=True, gather=True, out_blocked=True),
    _GemmUse("up,B", epilogue=Epilogue.FORWARD, gather=True, out_blocked=True),
    _GemmUse("down,B", a_blocked=True),
    _GemmUse("down_bwd,glu,B", epilogue=Epilogue.BACKWARD, glu=True, gather=True, out_blocked=True, w_t=True),
    _GemmUse("down_bwd,B", epilogue=Epilogue.BACKWARD, gather=True, out_blocked=True, w_t=True),
    _GemmUse("dgrad_pair,B", pair=True, a_blocked=True, w_t=True),
)
_MAIN_USES = ("grouped_mm", "up,glu", "down_bwd,glu", "up,glu,B", "dsd")  # also built in fp16
# fp16 builds take bf16's configs (gemm_config / wgrad_config treat the 16-bit types alike) and compile to the same
# code but for the MMA's type and the epilogue's conversions: of the 188 fp16 builds of the full audit at eb8aabe
# (sm_80 / 90 / 100 / 120), 170 matched their bf16 twin in registers, spills, shared memory, buffers, loop instructions
# and operand intensity, 18 differed by at most 6 registers, none spilled. They are built for sm_90 (H100 / H200,
# where fp16 models run); bf16 covers the other three. fp32 (TF32 / IEEE) builds for sm_80, sm_90 and sm_100: sm_120's
# fp32 code has sm_80's structure (mma.sync fed by cp.async, pointer loads), audited there. The GLU epilogues are
# built with silu (every config) and gelu (the heaviest, erf: 159-220 registers on sm_100 where silu holds 112-154,
# at 8bd41ea); identity, relu and gelu_tanh held at most 9 registers more than silu there, none spilling, and are not
# built. CI time: these three rules took the audit from 1658 to 1466 builds.
# The grouped M tiles a GPU runs (``backends.triton._grouped_block_m``: at least ``MIN_BLOCK_M`` = 32 rows; 16 only
# when interpreting). 16-row tiles were dropped there (docs/audit.md): swapped (sm_90, sm_100: SWAP_AB) a 16-row tile
# ran its 32-row twin's loop with MMAs of N = 16, half the work per K step, issue 1.09-1.30 on sm_90, 1.72-2.53 on
# sm_100 (the gate 0.75; 32 rows 0.55-0.66 and 0.89-1.28), for no time gained in a GEMM bound by the weights' reads.
_AUDITED_M = tuple(m for m in BLOCK_SIZES if m >= 32)
_FP16_ARCHS = (90,)
_FP32_ARCHS = (80, 90, 100)
_GLU_ACTIVATIONS = ("silu", "gelu")


def _dtype_archs(dtype: torch.dtype) -> tuple[int, ...]:
    """The architectures the gemm / wgrad specs of ``dtype`` are built for (the comment above)."""
    return {torch.float16: _FP16_ARCHS, torch.float32: _FP32_ARCHS}.get(dtype, _ARCHS)


def _gemm_specs() -> list[CompileSpec]:
    specs = []
    for use in _GEMM_USES:
        for dtype in (torch.bfloat16, torch.float32, torch.float16):
            if dtype == torch.float16 and use.tag not in _MAIN_USES:
                continue
            for block_m in GPU_BLOCK_SIZES if use.blocked else _AUDITED_M:  # blocked: B; grouped: rows per expert
                B = block_m if use.blocked else None

                def configs(aligned, capability, dtype=dtype, block_m=block_m, B=B, use=use):
                    return gemm_config(dtype, block_m, epilogue=use.epilogue, glu=use.glu, pair=use.pair,
                                       aligned=aligned, out_block=B if use.out_blocked else None,
                                       a_block=B if use.a_blocked else None, capability=capability)  # fmt: skip

                lb_block = (B or 0).bit_length() - 1 if use.blocked else DENSE_LOG_BLOCK
                shapes = f"blocksparse B={B}" if use.blocked else (
                    "grouped, large T" if block_m >= _LARGE_M else "grouped, small T / decode")  # fmt: skip
                activations = ("silu",) if use.epilogue else ("identity",)
                if use.glu and use.epilogue and dtype == torch.bfloat16 and block_m == 128:
                    activations = _GLU_ACTIVATIONS  # gelu too: bf16, GLU, 128-row tiles, fast config
                for cfg, variants, cfg_archs, warps_tag in _variants(configs, _dtype_archs(dtype), dtype):
                    # one K step: an A tile and a weight tile (two with the GLU's gate; the pair runs two K loops)
                    two_w = use.glu and use.epilogue == Epilogue.FORWARD
                    tiles = cfg.block_m * cfg.block_k + (1 + two_w) * cfg.block_k * cfg.block_n
                    audit = _audit_fields(dtype, cfg, variants, shapes, tiles * dtype.itemsize,
                                          backward=use.epilogue == Epilogue.BACKWARD,
                                          blocked_64=use.blocked and B < _LARGE_M)  # fmt: skip
                    for act in activations if variants == ("aligned",) else activations[:1]:
                        base = dict(
                            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EPI_N=cfg.epi_n,
                            GROUP_M=cfg.group_m, LB_A=lb_block if use.a_blocked else DENSE_LOG_BLOCK,
                            LB_O=lb_block if use.out_blocked else DENSE_LOG_BLOCK, GATHER=use.gather, GLU=use.glu,
                            PAIR=use.pair, EPILOGUE=int(use.epilogue), ACT=kernel_code(act), DOTS=DOTS_NATIVE,
                            FP8=int(Fp8Mode.NONE), QUANT_A=int(Fp8Mode.NONE), SWAP_AB=cfg.swap_ab, **_NO_SCALE_TMA,
                        )  # fmt: skip
                        act_tag = f",{act}" if use.epilogue else ""
                        size = f"B={B}" if use.blocked else f"M={cfg.block_m}"
                        name = f"gemm[{use.tag}{act_tag},{triton_type(dtype)},{size},N={cfg.block_n},K={cfg.block_k}"
                        name += warps_tag
                        # the fast 16-bit config loads the weights through TMA on sm_90 and newer (on sm_100 in a
                        # warp-specialized K loop, persistent), pointers on sm_80
                        tma = WeightLoad.TMA_T if use.w_t else WeightLoad.TMA
                        fast = variants == ("aligned",) and dtype != torch.float32  # fp32 weights: pointer loads
                        pointers = WeightLoad.POINTERS
                        tma_builds = ((tma, False, _NO_WS_TMA_ARCHS), (tma, True, (100,)), (pointers, False, (80,)))
                        if use.epilogue == Epilogue.BACKWARD or two_w:  # one tile per program (the launcher's rule)
                            tma_builds = ((tma, False, _TMA_ARCHS), (pointers, False, (80,)))
                        for mode, ws, mode_archs in tma_builds if fast else ((pointers, False, _ARCHS),):
                            mode_archs = tuple(cc for cc in mode_archs if cc in (cfg_archs or _ARCHS))
                            # gathered rows through TMA's row gather on sm_100, except in the warp-specialized loop
                            for gather4, archs in _gather_loads(dtype, variants, mode_archs, use.gather and not ws):
                                archs = None if archs == _ARCHS else archs
                                two = (use.glu and use.epilogue == 1) or use.pair
                                constexprs, descs = _weight_loads(dtype, cfg, mode, two=two)
                                # sm_100's TMA builds loop over their tiles (``PERSISTENT``), the others one tile each
                                constexprs = {**base, **constexprs, "WARP_SPEC": ws, "PERSISTENT": ws,
                                              "A_TMA": int(WeightLoad.GATHER4 if gather4 else pointers)}  # fmt: skip
                                if gather4:
                                    descs["a_desc"] = _rows_desc(dtype, cfg.block_k)
                                else:
                                    constexprs["a_desc"] = None
                                constexprs["a2_desc"] = None  # (FP8 dense rows only)
                                tag = (",tma,ws" if ws else ",tma" if mode else "") + (",gather4" if gather4 else "")
                                spec = _spec(f"{name}{tag}]", gemm_kernel, dtype, cfg, constexprs,
                                             use.unit,
                                             _GEMM_ALIGNED, variants, {**_INDEX, **_FP32}, archs, **audit)  # fmt: skip
                                spec.signature.update(descs)
                                specs.append(spec)
    return specs


# The GEMMs of the FP8 expert MLP (issue 17, ``backends.triton_fp8``): E4M3 operands, bf16 results, the weights
# K-contiguous (``w_t``: quantized into [E, N, K] storage, read through its transposed view): E4M3 wgmma reads only
# K-major tiles, and an N-major weight (TMA over [E, K, N]) waits wgmma to zero every K step on sm_90 (measured:
# ``gsb0 0`` in the rowwise down GEMM's loop, issue ratio 0.93 against 0.47 K-major)
_FP8_USES = {
    # x[token] @ (w1, w3); the modes of EPILOGUE_QUANT (mxfp8) write a in E4M3 with its scales: "up,glu,aq" (QUANT_A)
    "up,glu": _GemmUse("up,glu", epilogue=Epilogue.FORWARD, glu=True, gather=True, w_t=True),
    # x[token] @ w1 without GLU (a non-gated activation: moe_mlp(..., glu=False)); mxfp8: "up,aq"
    "up": _GemmUse("up", epilogue=Epilogue.FORWARD, gather=True, w_t=True),
    "down": _GemmUse("down", w_t=True),  # a @ w2 (a dense: an FP8 A is never blocked)
    "down_bwd,glu": _GemmUse("down_bwd,glu", epilogue=Epilogue.BACKWARD, glu=True, gather=True, w_t=True),
    "dgrad_pair": _GemmUse("dgrad_pair", pair=True, w_t=True),  # dh @ w1ᵀ + dg @ w3ᵀ
}
# The FP8 MLP's launches built as their twins' (not built themselves: CI time), by (use, variant): the same
# ``gemm_config`` tile (warps, stages; rowwise's up-projection without GLU its own epilogue slices), K loop and MMA as
# the twin's, the GLU gate's part of the epilogue left out (one accumulator fewer in the up-projection's). Built once
# (bench.audit, Triton 3.9, 2026-12-06, sm_90 / sm_100 / sm_120, 64- and 128-row tiles, every recipe): the backward
# epilogue without GLU (``moe_mlp(..., glu=False)``'s dout @ w2ᵀ, 36 builds) held its twin's loop instructions,
# MMA and CTAs per SM and at most its registers (blockwise sm_90 M=128: 176 against 174), no spill; the unaligned
# up-projection without GLU (18 builds) 110-212 registers against its twin's 168-255, no spill, the twin's MMA.
# tests/test_audit.py checks that the specs hold every FP8 config the launchers pick, through these twins.
_FP8_TWINS = {
    ("down_bwd", "aligned"): "down_bwd,glu",
    ("down_bwd", "unaligned"): "down_bwd,glu",
    ("up", "unaligned"): "up,glu",
}
# E4M3 MMAs (sm_89 and newer): sm_80 has none, Triton 3.9 rejects fp8e4nv there ("type fp8e4nv not supported in
# this architecture"), and the launchers refuse FP8 operands there; the FP8 quantize kernels serve only these too
_FP8_ARCHS = (90, 100, 120)
# What the FP8 recipes cost that their arithmetic imposes, measured from the SASS of the builds below (bench.audit,
# Triton 3.9; issue ratios at the E4M3 FMA rate, MX on sm_90 at bf16's)
_WAIVE_FP8_BLOCKWISE = (
    "blockwise FP8 (DeepSeek-V3's promotion): each K step's MMA result is scaled by its group's scales and added to "
    "the fp32 accumulator in registers, so the loop waits for its MMA every step (sm_90: WARPGROUP.DEPBAR.LE gsb0, "
    "0x0 after 1 of 4 QGMMA; sm_100: the tcgen05 result loaded to registers), holds a second accumulator (174-223 "
    "registers at 128 rows on 8 warps: 1 CTA/SM) and issues an FFMA per element and step (sm_90 0.80-0.98, sm_100 "
    "1.35-1.38 issue clocks per MMA clock); deferred promotion (step t-1's product promoted after step t's MMA is "
    "issued, tried 2026-12-06) does not help: Triton 3.9 still waits each wgmma to zero right after it (its pipeliner "
    "keeps a wgmma in flight only where the next MMA takes the result as its accumulator) and the third accumulator "
    "costs registers (sm_90 128x128 down: 178 -> 240, issue 0.81 -> 1.06; sm_100's warp-specialized down spills "
    "72 B); DeepGEMM hides the promotion behind a second consumer warpgroup (warp specialization: left to do)"
)
_WAIVE_FP8_MX_90 = (
    "MX on sm_90: Hopper has no block-scaled MMA; Triton emulates tl.dot_scaled by upcasting both E4M3 tiles to bf16 "
    "with their E8M0 scales in registers and runs HGMMA (no QGMMA), waiting wgmma to zero every step (1.64-2.50 "
    "issue clocks per MMA clock at the bf16 rate; 176-252 registers, 1 CTA/SM at 128 rows): MX is native on sm_100, "
    "Hopper takes blockwise or rowwise"
)
_WAIVE_FP8_MX_100 = (
    "MX on sm_100 with gathered A rows (block-scaled tcgen05: UTCQMMA with two scale-factor tensor-memory operands, "
    "4 per 128-deep K step): the weights' E8M0 scales come by TMA in tcgen05's chunk layout (SW_TMA), A's (its "
    "tokens') by pointer loads every K step, copied to tensor memory through registers: the backward epilogue's "
    "238 loop instructions on 4 warps with its rows by TMA's row gather, 0.93 issue clocks per MMA clock (264 and "
    "1.03 with its rows by cp.async; 287 and 1.12 with the weights' scales by pointers "
    "too; a dense A's scales by TMA as well, SA_TMA: the down GEMM 180 and 0.70); A's through TMA after a gather "
    "pass per M tile measured 0.90 there but 102 KB of shared memory instead of 68 (3 -> 2 CTAs/SM): not taken"
)
_WAIVE_FP8_MX_100_SMALL_M = (
    "MX with 64-row tiles on sm_100, not swapped (the GLU forward's 64 columns, the unaligned fallback's 32): the "
    "block-scaled tcgen05 MMA needs M = 128; Triton emulates tl.dot_scaled in bf16 there (UTCHMMA)"
)


def _fp8_waivers(mode: Fp8Mode, use: _GemmUse, cfg) -> tuple[tuple[str, str], ...]:
    """The waivers of an FP8 build of ``gemm_kernel`` with config ``cfg`` (the reasons above, each where its builds
    were measured)."""
    block_m = cfg.block_m
    if mode == Fp8Mode.BLOCKWISE:
        return tuple((check, _WAIVE_FP8_BLOCKWISE) for check in
                     ("pipeline@90", "issue@90", "occupancy@90", "issue@100", "occupancy@100"))  # fmt: skip
    if mode == Fp8Mode.MX:
        waivers = tuple(
            (check, _WAIVE_FP8_MX_90) for check in ("mma@90", "fp8mma@90", "pipeline@90", "issue@90", "occupancy@90")
        )
        # (sm_100's swapped 64-row tiles: native block-scaled MMAs of M = 128)
        emulated = block_m < _LARGE_M and not cfg.swap_ab
        small = tuple((c, _WAIVE_FP8_MX_100_SMALL_M) for c in ("mma@100", "fp8mma@100")) if emulated else ()
        # a dense A's scales come by TMA too; the GLU forward's 128x128 tiles pass with the gathered A's by pointers
        glu_forward = use.glu and use.epilogue == Epilogue.FORWARD
        gathered = (("issue@100", _WAIVE_FP8_MX_100),) if use.gather and not glu_forward else ()
        return (*waivers, *gathered, *small)
    return ()  # ROWWISE


def _scale_loads(mode: Fp8Mode, cfg, variants, archs) -> list[tuple[bool, tuple[int, ...]]]:
    """``(SW_TMA, archs)``: the architectures of an FP8 ``gemm_kernel`` build whose MX scales come through TMA in
    tcgen05's chunks (the aligned builds of whole-chunk tiles, ``expert_gemm.mx_chunk_tiles``, on
    ``_SCALE_TMA_ARCHS``: ``_scale_tma_loads``) and the others."""
    tma = mode == Fp8Mode.MX and variants == ("aligned",) and mx_chunk_tiles(cfg)
    chunks = tuple(cc for cc in archs if cc in _SCALE_TMA_ARCHS) if tma else ()
    rest = tuple(cc for cc in archs if cc not in chunks)
    return [(load, a) for load, a in ((True, chunks), (False, rest)) if a]


def _scales_desc(block_rows: int, block_k: int) -> str:
    """The signature type of an MX scales' host descriptor (``sw_desc``, ``sa_desc``): a tile's tcgen05 chunks of 128
    rows (W's columns, A's rows) x 4 groups of 32."""
    return f"tensordesc<u8[1,{block_rows // 128},{block_k // 128},2,256]>"


def _scale_tma_loads(cfg, use: _GemmUse, two: bool) -> tuple[dict, dict[str, str]]:
    """The constexprs and the descriptor arguments' signature types of an MX build whose scales come through TMA in
    tcgen05's chunks (``expert_gemm.gemm``'s rule): the weight's (``SW_TMA``; ``two``: the GLU gate's or the pair's
    second weight's too) and a dense A's (``SA_TMA``; the pair's second A's too); a gathered A's stay pointer
    loads."""
    w_desc, a_desc = _scales_desc(cfg.block_n, cfg.block_k), _scales_desc(cfg.block_m, cfg.block_k)
    dense = not use.gather
    descs = {"sw_desc": w_desc, "sw2_desc": w_desc if two else None, "sa_desc": a_desc if dense else None,
             "sa2_desc": a_desc if dense and use.pair else None}  # fmt: skip
    constexprs = {"SW_TMA": True, "SA_TMA": dense, **{name: None for name, d in descs.items() if d is None}}
    return constexprs, {name: d for name, d in descs.items() if d is not None}


def _scale_chunks_specs() -> list[CompileSpec]:
    """``scale_chunks_kernel`` (``gemm``'s MX scales in tcgen05's chunks, on ``_SCALE_TMA_ARCHS``): W's per expert
    and a dense A's per M tile of 128 rows."""
    specs = []
    for tiles, what in ((False, "w"), (True, "a")):
        constexprs = {"BLOCK_M": 128, "TILES": tiles}
        pointers = {**_INDEX, "s_ptr": torch.uint8, "out_ptr": torch.uint8}
        signature = kernel_signature(scale_chunks_kernel, constexprs, torch.uint8, pointers)
        specs.append(CompileSpec(f"scale_chunks[{what}]", scale_chunks_kernel, signature, constexprs, 4, num_stages=1,
                                 is_matmul=False, expect_pipelined=False, archs=_SCALE_TMA_ARCHS,
                                 serves="MX scales by TMA (SW_TMA / SA_TMA), every shape"))  # fmt: skip
    return specs


def _gemm_fp8_specs() -> list[CompileSpec]:
    """``gemm_kernel``'s FP8 builds: each recipe (``Fp8Mode``) with each GEMM of the FP8 MLP (``_FP8_USES``; the
    launches of ``_FP8_TWINS`` as their twins), the configs ``gemm_config(fp8=...)`` picks for the M tiles the FP8
    MLP runs (128 and 64 rows: ``backends.triton._grouped_block_m(..., fp8=True)``, at least ``FP8_MIN_BLOCK_M``),
    the weights through TMA where the launcher takes it."""
    specs = []
    dtype, out = torch.float8_e4m3fn, torch.bfloat16
    for mode in (Fp8Mode.BLOCKWISE, Fp8Mode.MX, Fp8Mode.ROWWISE):
        scale = mode.recipe().scale_dtype
        pointers = {**_INDEX, **_FP32, **dict.fromkeys(("out_ptr", "out2_ptr", "out3_ptr", "h_ptr", "g_ptr"), out),
                    **dict.fromkeys(("sa_ptr", "sa2_ptr", "sw_ptr", "sw2_ptr", "sq_ptr"), scale)}  # fmt: skip
        for use in _FP8_USES.values():
            # the up-projection writes a as E4M3 (its bits) and scales where the mode allows (backends.triton_fp8)
            quant_a = mode if use.epilogue == Epilogue.FORWARD and mode in EPILOGUE_QUANT else Fp8Mode.NONE
            use_pointers = {**pointers, "out3_ptr": torch.uint8} if quant_a else pointers
            for block_m in (64, 128):

                def configs(aligned, capability, block_m=block_m, use=use, mode=mode):
                    return gemm_config(dtype, block_m, epilogue=use.epilogue, glu=use.glu, pair=use.pair,
                                       aligned=aligned, capability=capability, fp8=mode,
                                       dense_rows=not use.gather)  # fmt: skip

                shapes = "FP8 grouped, large T" if block_m >= _LARGE_M else "FP8 grouped, small T / decode"
                act = "silu" if use.epilogue else "identity"
                two_w = use.glu and use.epilogue == Epilogue.FORWARD
                # scales unit-strided: A's along K, W's along N (K for the transposed views)
                unit = (*use.unit, "s_sak", "s_swk" if use.w_t else "s_swn", "s_sw2k" if use.w_t else "s_sw2n")
                unit += ("s_sqc",) if quant_a else ()  # a's scales: contiguous rows
                for cfg, variants, cfg_archs, warps_tag in _variants(configs, _FP8_ARCHS):
                    if all((use.tag, variant) in _FP8_TWINS for variant in variants):
                        continue
                    tiles = cfg.block_m * cfg.block_k + (1 + two_w) * cfg.block_k * cfg.block_n
                    audit = _audit_fields(dtype, cfg, variants, shapes, tiles * dtype.itemsize,
                                          backward=use.epilogue == Epilogue.BACKWARD,
                                          fp8_glu=two_w and mode == Fp8Mode.BLOCKWISE,
                                          fp8_small_m=mode != Fp8Mode.ROWWISE)  # fmt: skip
                    if "aligned" in variants:
                        audit["waivers"] += _fp8_waivers(mode, use, cfg)
                    elif mode == Fp8Mode.MX:  # the fallback tiles: Triton's dot_scaled emulation where it emulates
                        audit["waivers"] += (("fp8mma@90", _WAIVE_FP8_MX_90),) + (
                            (("fp8mma@100", _WAIVE_FP8_MX_100_SMALL_M),) if cfg.block_m < _LARGE_M else ()
                        )
                    base = dict(
                        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EPI_N=cfg.epi_n,
                        GROUP_M=cfg.group_m, LB_A=DENSE_LOG_BLOCK, LB_O=DENSE_LOG_BLOCK, GATHER=use.gather,
                        GLU=use.glu, PAIR=use.pair, EPILOGUE=int(use.epilogue), ACT=kernel_code(act), DOTS=DOTS_NATIVE,
                        FP8=int(mode), QUANT_A=int(quant_a), SWAP_AB=cfg.swap_ab, **_NO_SCALE_TMA,
                    )  # fmt: skip
                    use_tag = f"{use.tag},aq" if quant_a else use.tag  # aq: a quantized in the epilogue
                    name = f"gemm_fp8[{mode.recipe().name},{use_tag},M={cfg.block_m},N={cfg.block_n},K={cfg.block_k}"
                    name += warps_tag
                    tma = WeightLoad.TMA_T if use.w_t else WeightLoad.TMA
                    builds = ((tma, False, (90, 120)), (tma, True, (100,)))  # the launcher's rule (see _gemm_specs)
                    # sm_100: rows through TMA (dense; gathered: TMA's row gather at K steps of 128 or more) outside
                    # the warp-specialized loop, where expert_gemm.fp8_rows_warp_specialized says so
                    rows_tma = not use.gather or row_gather_step(mode, cfg)
                    leave_ws = rows_tma and not fp8_rows_warp_specialized(mode, cfg, use.gather)
                    if use.epilogue == Epilogue.BACKWARD or two_w or (use.pair and mode != Fp8Mode.MX) or leave_ws:
                        builds = ((tma, False, _FP8_ARCHS),)
                    if variants != ("aligned",):
                        builds = ((WeightLoad.POINTERS, False, _FP8_ARCHS),)
                    for load, ws, load_archs in builds:
                        archs = tuple(cc for cc in load_archs if cc in (cfg_archs or _FP8_ARCHS))
                        two = two_w or use.pair
                        g4 = use.gather and bool(load) and not ws and row_gather_step(mode, cfg)
                        for gather4, sw_tma, sw_archs in [
                            (gather4, sw_tma, sw_archs)
                            for gather4, g_archs in _gather_loads(dtype, variants, archs, g4)
                            for sw_tma, sw_archs in _scale_loads(mode, cfg, variants, g_archs)
                        ]:
                            constexprs, descs = _weight_loads(dtype, cfg, load, two=two)
                            constexprs = {
                                **base,
                                **constexprs,
                                "WARP_SPEC": ws,
                                "PERSISTENT": ws,
                                "A_TMA": int(WeightLoad.POINTERS),
                                "a_desc": None,
                                "a2_desc": None,
                            }  # gathered FP8 rows (and the unaligned fallback's): cp.async, but sm_100's by gather4
                            if gather4:
                                constexprs["A_TMA"] = int(WeightLoad.GATHER4)
                                del constexprs["a_desc"]
                                descs["a_desc"] = _rows_desc(dtype, cfg.block_k)
                            elif load and not use.gather and not ws:  # dense rows through TMA (_dense_a_tma)
                                constexprs["A_TMA"] = int(WeightLoad.TMA)
                                for d in ("a_desc", "a2_desc") if use.pair else ("a_desc",):
                                    del constexprs[d]
                                    descs[d] = _rows_desc(dtype, cfg.block_k, cfg.block_m)
                            if sw_tma:
                                scale_constexprs, scale_descs = _scale_tma_loads(cfg, use, two)
                                constexprs = {k: v for k, v in constexprs.items() if k not in scale_descs}
                                constexprs.update(scale_constexprs)
                                descs.update(scale_descs)
                            scale_tag = (",sw_tma" if use.gather else ",s_tma") if sw_tma else ""  # s: both
                            tag = (",tma,ws" if ws else ",tma" if load else "") + (",gather4" if gather4 else "")
                            tag += scale_tag
                            spec = _spec(f"{name}{tag}]", gemm_kernel, dtype, cfg, constexprs, unit, _GEMM_ALIGNED,
                                         variants, use_pointers, sw_archs, **audit)  # fmt: skip
                            spec.signature.update(descs)
                            specs.append(spec)
    return specs


# ----------------------------------------------------------------------------------------------- wgrad


@dataclass(frozen=True)
class _WgradUse:
    """One way the ops run ``wgrad_kernel``: which operand is gathered or blocked, and the output's layout."""

    tag: str
    a_gather: bool = False
    b_gather: bool = False
    dual: bool = False  # a second B over the same A tiles (dw1 and dw3 in one launch)
    a_blocked: bool = False
    b_blocked: bool = False
    out_t: bool = False  # the result written transposed (unit stride along M: dds)

    @property
    def unit(self) -> tuple[str, ...]:
        return ("s_ac", "s_bc", "s_om" if self.out_t else "s_on")

    @property
    def blocked(self) -> bool:
        return self.a_blocked or self.b_blocked


_WGRAD_USES = (
    _WgradUse("grouped_wgrad", a_gather=True),  # x[token]ᵀ @ dy
    _WgradUse("grouped_wgrad,dense"),
    _WgradUse("w13", a_gather=True, dual=True),  # x[token]ᵀ @ (dh, dg)
    _WgradUse("w2", b_gather=True),  # awᵀ @ dout[token]
    _WgradUse("w13,B", a_gather=True, dual=True, b_blocked=True),
    _WgradUse("w2,B", b_gather=True, a_blocked=True),
    _WgradUse("dsd_t", a_blocked=True),  # Sᵀ @ a
    _WgradUse("dds", a_blocked=True, out_t=True),  # (Sᵀ @ aᵀ)ᵀ, aᵀ copied to rows
    _WgradUse("sdd_wgrad", b_blocked=True),  # aᵀ @ S
)
_MAIN_WGRAD = ("grouped_wgrad", "w13,B")


def _wgrad_specs() -> list[CompileSpec]:
    specs = []
    for use in _WGRAD_USES:
        for dtype in (torch.bfloat16, torch.float32, torch.float16):
            if dtype == torch.float16 and use.tag not in _MAIN_WGRAD:
                continue
            for B in GPU_BLOCK_SIZES if use.blocked else (None,):

                def configs(aligned, capability, dtype=dtype, B=B, use=use):
                    return wgrad_config(dtype, gather=use.a_gather or use.b_gather, aligned=aligned,
                                        a_block=B if use.a_blocked else None,
                                        b_block=B if use.b_blocked else None, capability=capability)  # fmt: skip

                lb = (B or 0).bit_length() - 1 if use.blocked else DENSE_LOG_BLOCK
                shapes = f"blocksparse B={B}" if use.blocked else "grouped, every T"
                for cfg, variants, archs, warps_tag in _variants(configs, _dtype_archs(dtype), dtype):
                    tiles = cfg.block_k * (cfg.block_m + cfg.block_n)
                    audit = _audit_fields(dtype, cfg, variants, shapes, tiles * dtype.itemsize, wgrad=True,
                                          blocked_64=use.blocked and B < _LARGE_M)  # fmt: skip
                    constexprs = dict(
                        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                        LB_A=lb if use.a_blocked else DENSE_LOG_BLOCK, LB_B=lb if use.b_blocked else DENSE_LOG_BLOCK,
                        A_GATHER=use.a_gather, B_GATHER=use.b_gather, DUAL=use.dual, DOTS=DOTS_NATIVE,
                        FP8=int(Fp8Mode.NONE),
                    )  # fmt: skip
                    size = f"B={B}," if use.blocked else ""
                    tiles = f"M={cfg.block_m},N={cfg.block_n},K={cfg.block_k}"
                    name = f"wgrad[{use.tag},{triton_type(dtype)},{size}{tiles}{warps_tag}"
                    # the fast 16-bit config reads its dense row operands through TMA on sm_90 and newer
                    a_tma, b_tma = not (use.a_gather or use.a_blocked), not (use.b_gather or use.b_blocked)
                    fast = variants == ("aligned",) and dtype != torch.float32 and (a_tma or b_tma)
                    builds = (
                        [((a_tma, b_tma), _TMA_ARCHS), ((False, False), (80,))] if fast else [((False,) * 2, _ARCHS)]
                    )
                    for (a_t, b_t), mode_archs in builds:
                        build_archs = tuple(cc for cc in mode_archs if cc in (archs or _ARCHS))
                        if not build_archs:
                            continue
                        tma = ",tma" if a_t or b_t else ""
                        specs.append(
                            _spec(
                                f"{name}{tma}]",
                                wgrad_kernel,
                                dtype,
                                cfg,
                                {**constexprs, "A_TMA": a_t, "B_TMA": b_t},
                                use.unit,
                                _WGRAD_ALIGNED,
                                variants,
                                _INDEX,
                                None if build_archs == _ARCHS else build_archs,
                                **audit,
                            )  # fmt: skip
                        )
    return specs


# ----------------------------------------------------------------------------------------------- wgrad, FP8

# wgrad_kernel's FP8 uses (issue 17): both operands E4M3, quantized along the rows and materialized dense in expert
# order by the backend (``WgradScales``): dW2 = awᵀ @ dout, and dW1, dW3 = xᵀ @ (dh, dg) in one DUAL launch.
_FP8_WGRAD_USES = (_WgradUse("fp8,w2"), _WgradUse("fp8,w13", dual=True))
_FP8_WGRAD_ALIGNED = (*_WGRAD_ALIGNED, "s_sag", "s_sbg")
_WAIVE_FP8_MN_90 = (
    "FP8 weight gradient on sm_90: E4M3 wgmma (QGMMA) reads K-major shared tiles only, and a weight gradient's row "
    "operands [rows, C] are MN-major (the reduction runs over the rows): Triton copies each K step's tiles through "
    "registers into K-major buffers (LDS, PRMT, STS in the loop: 547 instructions per 128-row step, rowwise) and "
    "waits the QGMMA to zero before reusing them; the K-major layout (the ',kmajor' specs: rows contiguous, TMA over "
    "the transposed storage, expert row offsets multiples of 16) passes"
)
_WAIVE_FP8_WGRAD_BLOCKWISE = (
    "FP8 blockwise promotion (DeepSeek-V3): each 128-row step's product is scaled into the fp32 accumulator, which "
    "needs the MMA's result every step (sm_90: QGMMA waited to zero; 1.07 issue clocks per MMA clock with K-major "
    "operands) and an FMUL + FFMA per accumulator element per step (sm_100: the product leaves tensor memory; 2 "
    "CUDA-core ops per element take as long as its 128 E4M3 FMAs at 8192 / clock / SM: issue >= 1 by arithmetic, "
    "1.8 measured); deferred promotion (the previous step's product promoted after this step's MMA is issued, tried "
    "2026-12-06) leaves the QGMMA waited to zero (Triton 3.9: ttng.warp_group_dot_wait {pendings = 0} right after the "
    "dot) and spills (sm_90 K-major: 172 -> 255 registers, 16-28 B spilled, issue 1.07 -> 1.37)"
)
_WAIVE_FP8_WGRAD_MX_90 = (
    "MX on sm_90: Hopper has no block-scaled MMA; Triton emulates tl.dot_scaled by converting the E4M3 tiles to bf16 "
    "and applying the E8M0 scales in registers every step, then HGMMA.64x64x16.F32.BF16 from registers, waited to zero "
    "(1092 instructions per 128-row step); native on sm_100 (UTCQMMA with tensor-memory scale factors)"
)
# (mode, K-major operands) -> waivers; the MN-major row operands' sm_90 waivers go with the layout
_FP8_WGRAD_WAIVERS = {
    (Fp8Mode.ROWWISE, False): (("pipeline@90", _WAIVE_FP8_MN_90), ("issue@90", _WAIVE_FP8_MN_90)),
    (Fp8Mode.ROWWISE, True): (),
    (Fp8Mode.BLOCKWISE, False): (
        ("pipeline@90", _WAIVE_FP8_WGRAD_BLOCKWISE),
        ("issue@90", _WAIVE_FP8_MN_90),
        ("issue@100", _WAIVE_FP8_WGRAD_BLOCKWISE),
    ),
    (Fp8Mode.BLOCKWISE, True): (
        ("pipeline@90", _WAIVE_FP8_WGRAD_BLOCKWISE),
        ("issue@90", _WAIVE_FP8_WGRAD_BLOCKWISE),
        ("issue@100", _WAIVE_FP8_WGRAD_BLOCKWISE),
    ),
    **{
        (Fp8Mode.MX, k_major): (
            ("fp8mma@90", _WAIVE_FP8_WGRAD_MX_90),
            ("pipeline@90", _WAIVE_FP8_WGRAD_MX_90),
            ("issue@90", _WAIVE_FP8_WGRAD_MX_90),
        )
        for k_major in (False, True)
    },
}


def _fp8_wgrad_specs() -> list[CompileSpec]:
    """``wgrad_kernel`` with ``FP8`` for each recipe and use: dense E4M3 rows (aligned: through TMA, as stored or,
    K-major, over the transposed storage), scales ``[groups + 1, C]`` with unit column stride, bf16 out."""
    specs = []
    e4m3 = torch.float8_e4m3fn
    for mode, rcp in FP8_RECIPES.items():
        name = rcp.name
        scales = dict.fromkeys(("sa_ptr", "sb_ptr", "sb2_ptr"), rcp.scale_dtype)
        pointers = {**_INDEX, **dict.fromkeys(("out_ptr", "out2_ptr"), torch.bfloat16), **scales,
                    "group_offsets_ptr": torch.int64}  # fmt: skip
        for use in _FP8_WGRAD_USES:

            def configs(aligned, capability, mode=mode):
                return wgrad_config(e4m3, aligned=aligned, capability=capability, fp8=mode)

            for cfg, variants, archs, warps_tag in _variants(configs):
                build_archs = tuple(cc for cc in _FP8_ARCHS if cc in (archs or _ARCHS))
                if not build_archs:
                    continue
                tiles = cfg.block_k * (cfg.block_m + cfg.block_n)  # E4M3: one byte per element
                constexprs = dict(
                    BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                    LB_A=DENSE_LOG_BLOCK, LB_B=DENSE_LOG_BLOCK, A_GATHER=False, B_GATHER=False, DUAL=use.dual,
                    DOTS=DOTS_NATIVE, FP8=int(mode),
                )  # fmt: skip
                label = f"wgrad[{use.tag},{name},M={cfg.block_m},N={cfg.block_n},K={cfg.block_k}{warps_tag}"
                fast = variants == ("aligned",)  # the fast config: TMA rows (on every FP8 architecture)
                # the rows as stored ([R, C], unit column stride), and (fast config) K-major ([C, R] storage, unit
                # row stride, 16-aligned expert offsets: TMA_T)
                for k_major in (False, True) if fast else (False,):
                    loads = WeightLoad.TMA_T if k_major else WeightLoad.TMA if fast else WeightLoad.POINTERS
                    unit = ("s_ar", "s_br") if k_major else ("s_ac", "s_bc")
                    audit = _audit_fields(e4m3, cfg, variants, f"FP8 {name}, grouped, every T", tiles)
                    # the E4M3 MMA's waiver holds for every variant, the others for the per-FLOP (aligned) builds
                    audit["waivers"] += tuple(
                        w for w in _FP8_WGRAD_WAIVERS[mode, k_major] if fast or w[0].startswith("fp8mma")
                    )
                    tag = {WeightLoad.TMA_T: ",kmajor,tma", WeightLoad.TMA: ",tma", WeightLoad.POINTERS: ""}[loads]
                    specs.append(
                        _spec(
                            f"{label}{tag}]",
                            wgrad_kernel,
                            e4m3,
                            cfg,
                            {**constexprs, "A_TMA": int(loads), "B_TMA": int(loads)},
                            (*unit, "s_om" if use.out_t else "s_on", "s_sac", "s_sbc"),
                            _FP8_WGRAD_ALIGNED,
                            variants,
                            pointers,
                            build_archs,
                            **audit,
                        )  # fmt: skip
                    )
    return specs


# ----------------------------------------------------------------------------------------------- permute


def _permute_specs() -> list[CompileSpec]:
    """Data dtype × weights (same dtype or fp32, or none); one config serves aligned and unaligned operands."""
    cfg = permute_config()
    aligned_rows = {gather_kernel: ("stride_xt", "stride_or"), scatter_kernel: ("stride_yr", "stride_ot")}
    specs = []
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        for wdt in dict.fromkeys((dtype, torch.float32)):
            for kernel, name, weighted in (
                (gather_kernel, "gather_rows", True),
                (scatter_kernel, "scatter_rows", True),
                (weights_grad_kernel, "weights_grad", None),
            ):
                constexprs = {"BLOCK_ROWS": cfg.block_rows, "BLOCK_D": cfg.block_d}
                if weighted is not None:
                    constexprs["HAS_WEIGHTS"] = True
                unit = {s: 1 for s in kernel.arg_names if s.endswith("d") and s.startswith("stride_")}
                weights = ("weights_ptr", "out_ptr") if kernel is weights_grad_kernel else ("weights_ptr",)
                pointer_dtypes = {**_INDEX, **dict.fromkeys(weights, wdt)}
                signature = kernel_signature(kernel, {**constexprs, **unit}, dtype, pointer_dtypes)
                aligned = ("d", *aligned_rows.get(kernel, ("stride_at", "stride_br")))
                specs.append(
                    CompileSpec(
                        f"{name}[{triton_type(dtype)},w={triton_type(wdt)}]",
                        kernel,
                        signature,
                        {**constexprs, **unit},
                        cfg.num_warps,
                        num_stages=1,
                        is_matmul=False,
                        aligned=aligned,
                        expect_pipelined=False,
                        serves="permutes, every shape",
                    )  # fmt: skip
                )
    return specs


# ----------------------------------------------------------------------------------------------- quantize


def _quantize_specs() -> list[CompileSpec]:
    """Each FP8 recipe's quantizations (``kernels.quantize``): activations along K, weights reduced along K and
    along N, and the weight-gradient operands (row groups of one expert, ``bounds``; ``rows_padded``: written into
    16-row-padded expert segments, the grouped strategy's, ``Q_BOUNDS``); bf16 (read as int16 bits) and fp32 inputs
    with unit column stride, and for the weight-gradient operands token rows read through ``row_src`` (``ROW_SRC``:
    x and dout, ``quantize_rows(..., row_src=)``), E4M3 inputs with their scales along the columns only so
    (``SRC_SCALE``: the saved FP8 x, ``quantize_rows(..., dequantize=, row_src=)``). A group of the whole dimension
    (``"rowwise"``) is built at the tiles realistic sizes (>= 128) pick."""
    specs = []
    for recipe in RECIPES:
        r = recipe_of(recipe)
        uses = {"act": r.act_block(), "w_k": r.weight_block(0), "w_n": r.weight_block(1), "rows": None,
                "rows_padded": None}  # fmt: skip
        for use, block in uses.items():
            bounds = block is None
            GR, GC = (4096, 1) if bounds else tuple(4096 if g is None else g for g in block)
            dtypes = (torch.bfloat16, torch.float32, *((torch.float8_e4m3fn,) if bounds else ()))
            for dtype, row_src in itertools.product(dtypes, (False, True) if bounds else (False,)):
                e4m3 = dtype == torch.float8_e4m3fn  # with its scales (the saved FP8 x: 1 fp32, 2 E8M0)
                if e4m3 and not row_src:  # the saved FP8 x is always read through row_src (triton_fp8.mlp_backward)
                    continue
                src = (2 if r.scale_dtype == torch.uint8 else 1) if e4m3 else 0
                TR, TC, num_warps = quantize_config((GR, GC), e4m3)
                constexprs = {"REDUCE_ROWS": bounds or GR > 1, "REDUCE_COLS": GC > 1, "ROW_BOUNDS": bounds,
                              "Q_BOUNDS": use == "rows_padded", "E8M0": r.scale_dtype == torch.uint8,
                              "BF16_BITS": dtype == torch.bfloat16, "SRC_SCALE": src, "ROW_SRC": row_src, "TR": TR,
                              "TC": TC, "s_tc": 1}  # fmt: skip
                if not bounds:  # q row-major (the weight gradients' operands may be column-major: transposed=)
                    constexprs["s_qc"] = 1
                t_dtype = torch.int16 if dtype == torch.bfloat16 else torch.uint8 if e4m3 else dtype
                pointers = {"t_ptr": t_dtype, "q_ptr": torch.uint8, "s_ptr": r.scale_dtype, "bounds_ptr": torch.int64,
                            "q_bounds_ptr": torch.int64, "src_s_ptr": r.scale_dtype,
                            "row_src_ptr": torch.int32 if row_src else torch.int64}  # fmt: skip
                signature = kernel_signature(quantize_kernel, constexprs, dtype, pointers)
                # the group sizes the kernel reads (GR, GC: 128 or 32, or a whole row of d; SG: the input's scale
                # groups) are multiples of 16 at realistic sizes, as C and the row strides (q's: C, row-major), and
                # the JIT marks them too
                groups = ("GR",) * (GR > 1 and not bounds) + ("GC",) * (GC > 1) + ("SG",) * bool(src)
                groups += () if bounds else ("s_qr",)
                specs.append(
                    CompileSpec(
                        f"quantize[{recipe},{use},{triton_type(dtype)}{',row_src' if row_src else ''}]",
                        quantize_kernel,
                        signature,
                        constexprs,
                        num_warps,
                        num_stages=1,
                        is_matmul=False,
                        aligned=("C", "s_tb", "s_tr", *groups),
                        expect_pipelined=False,
                        serves="FP8 quantization, every shape",
                        archs=_FP8_ARCHS,
                    )  # fmt: skip
                )
        if r.group is not None:  # rowwise: quantize_dual runs the two launchers
            specs += _quantize_dual_specs(recipe)
    return specs


def _quantize_dual_specs(recipe: str) -> list[CompileSpec]:
    """The one-pass quantization of dh / dg in both layouts (``quantize_dual``'s tiles), bf16 and fp32, the column
    layout over the rows as they are (block-sparse) or padded (grouped, ``Q_BOUNDS``)."""
    r, specs = recipe_of(recipe), []
    for dtype, padded in itertools.product((torch.bfloat16, torch.float32), (False, True)):
        constexprs = {"Q_BOUNDS": padded, "E8M0": r.scale_dtype == torch.uint8, "BF16_BITS": dtype == torch.bfloat16,
                      "TR": 2048 // r.group, "TG": r.group, "s_tc": 1}  # fmt: skip
        pointers = {"t_ptr": torch.int16 if dtype == torch.bfloat16 else dtype, "qr_ptr": torch.uint8,
                    "qc_ptr": torch.uint8, "sr_ptr": r.scale_dtype, "sc_ptr": r.scale_dtype,
                    "bounds_ptr": torch.int64, "q_bounds_ptr": torch.int64}  # fmt: skip
        signature = kernel_signature(quantize_dual_kernel, constexprs, dtype, pointers)
        name = f"quantize_dual[{recipe},{triton_type(dtype)}{',padded' if padded else ''}]"
        specs.append(
            CompileSpec(
                name,
                quantize_dual_kernel,
                signature,
                constexprs,
                4,
                num_stages=1,
                is_matmul=False,
                aligned=("C", "s_tr", "G"),  # G: the group (128 or 32 columns), a multiple of 16 as C
                expect_pipelined=False,
                serves="FP8 quantization of dh / dg (both layouts), every shape",
                archs=_FP8_ARCHS,
            )  # fmt: skip
        )
    return specs


# fp32 dots at IEEE precision (``DOTS_IEEE``, PyTorch's default for fp32 matmuls; ``kernels._common.dot_mode``): no
# tensor core takes IEEE fp32, so these loops run FFMA. The fp32 specs above are the TF32 builds (PyTorch's
# ``fp32_precision = "tf32"``); the IEEE twin of each large-T fp32 config is built here to prove it compiles without
# spills on sm_90 and sm_100 (the fused MLP's GEMMs), with the MMA and per-FLOP checks off.
_IEEE_USES = ("gemm[up,glu,", "gemm[down_bwd,glu,", "gemm[dgrad_pair,", "wgrad[w13,fp32", "wgrad[w2,fp32")


# measured (Triton 3.9): the backward epilogue's 128x64 IEEE build spills 28 B on sm_100 (128 registers); its loop is
# FFMA-bound, so the spill costs nothing measurable next to it
_IEEE_WAIVERS = (("spill@100", "IEEE fp32: an FFMA-bound loop (no tensor core takes IEEE fp32); 28 B of spill"),)


def _ieee_specs(specs: list[CompileSpec]) -> list[CompileSpec]:
    twins = []
    for spec in specs:
        if ",fp32," in spec.name and spec.name.startswith(_IEEE_USES) and "M=128" in spec.name:
            twins.append(
                replace(
                    spec, name=spec.name[:-1] + ",ieee]", constexprs={**spec.constexprs, "DOTS": DOTS_IEEE},
                    is_matmul=False, per_flop=False, expect_pipelined=False, waivers=_IEEE_WAIVERS, archs=(90, 100),
                )
            )  # fmt: skip
    return twins


def compile_specs() -> list[CompileSpec]:
    """The GEMM, weight-gradient, permute, FP8 quantize and MX scale-chunk configurations the GPU path can pick
    (module docstring)."""
    plain = _gemm_specs() + _wgrad_specs()
    fp8 = _gemm_fp8_specs() + _fp8_wgrad_specs() + _quantize_specs() + _scale_chunks_specs()
    return plain + _ieee_specs(plain) + fp8 + _permute_specs()
