"""Block-sparse matmuls over the expert topology: SDD, DSD and DSDᵀ (DDS and DDSᵀ are DSD launches on views), and
DSD / DSDᵀ with the expert activation (and GLU gate) fused into the prologue (``dsd_act``, ``dsd_t_act``).

Design origin: MegaBlocks (Gale et al., 2022, §5) and its stk library: one kernel per product shape, the
transpose of the sparse operand read through precomputed column-major metadata (no re-sort, no copy). Unlike stk:
int32 indices with 64-bit address arithmetic, every tile masked (the expert width F, K and N are arbitrary), and
dense operands are arbitrary strided views (a weight and its transpose are the same storage).

Limits: block size B in {16, 32, 64, 128} (64 and 128 are the GPU sizes; 16 and 32 keep interpreter tests small);
fp32 / fp16 / bf16 operands, all of one dtype, fp32 accumulation, output in the input dtype; grid axis 1 (the
N tiles) at most 65535.

Glossary (``routing.Topology``; P = max_block_rows·B rows, nb = ceil(F / B) column blocks per expert):

- ``data [nnz_max, B, B]``: the blocks of S; slot b is used when ``b < nnz = row_offsets[max_block_rows]``.
- ``row_indices [nnz_max]`` / ``column_indices [nnz_max]``: block row / block column of slot b (-1 unused).
  Block column c is column block ``c % nb`` of expert ``c // nb``; its columns ``≥ F`` are padding.
- ``row_offsets [max_block_rows + 1]``: row r owns slots ``row_offsets[r] .. row_offsets[r + 1]``.
- ``column_offsets_t [E·nb + 1]``, ``row_indices_t [nnz_max]``, ``block_offsets_t [nnz_max]``: the same blocks in
  column-major order: column c owns positions ``column_offsets_t[c] ..``; position t is slot ``block_offsets_t[t]``
  in block row ``row_indices_t[t]``.

Grids (sized from shapes, never from device data):

- ``_sdd_kernel``: ``(nnz_max,)``, one program per slot; slots ``≥ nnz`` write zeros.
- ``_dsd_kernel`` (S @ w): ``(max_block_rows, cdiv(N, BLOCK_N))``; rows without blocks write zeros.
- ``_dsd_kernel`` (Sᵀ @ a, ``TRANS_S``): ``(E·nb, cdiv(N, BLOCK_N))``; columns without blocks write zeros.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._backend import resolve_backend
from ..routing import INDEX_DTYPE, Topology
from ._common import (
    DTYPES,
    CompileSpec,
    aligned16,
    check_grid_y,
    check_index,
    check_out,
    check_same_device,
    check_tensor,
    copy_to_out,
    host_loop_ok,
    interpreting,
    kernel_signature,
    out_or_empty,
    triton_type,
    upcast_dots,
)

__all__ = [
    "TileConfig",
    "sdd_configs",
    "dsd_configs",
    "dsd_act_configs",
    "compile_specs",
    "sdd",
    "dsd",
    "dsd_t",
    "dsd_act",
    "dsd_t_act",
    "ACT_CODES",
    "act_torch",
    "dds",
    "dds_t",
    "sdd_shape",
    "dsd_shape",
    "dsd_t_shape",
    "dsd_act_shape",
    "dsd_t_act_shape",
    "dds_shape",
    "dds_t_shape",
    "sdd_torch",
    "dsd_torch",
    "dsd_t_torch",
    "dds_torch",
    "dds_t_torch",
]

BLOCK_SIZES = (16, 32, 64, 128)


# ----------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class TileConfig:
    """Tile shape and launch options of one kernel configuration (``block_n`` unused by SDD)."""

    block_k: int
    block_n: int
    num_warps: int
    num_stages: int


# Under the interpreter: small tiles, so that tests cross several K steps per block and several N tiles.
_INTERPRET_CONFIG = TileConfig(block_k=16, block_n=32, num_warps=4, num_stages=1)


def _gpu_table(block_n: int, warps_64: int, stages_64: int) -> dict[tuple[int, torch.dtype], TileConfig]:
    """Configs for sm_90: B×BLOCK_K tiles feed wgmma (one warpgroup per 64 rows), fp32 takes half the K depth.

    Checked with the ahead-of-time compile audit (``python -m bench.audit``: HGMMA, no spills on sm_80 / sm_90).
    """
    table = {}
    for dtype in DTYPES:
        k16 = 32 if dtype == torch.float32 else 64
        stages = 3 if dtype == torch.float32 else stages_64
        table[(128, dtype)] = TileConfig(block_k=k16, block_n=block_n, num_warps=8, num_stages=3)
        table[(64, dtype)] = TileConfig(block_k=k16, block_n=block_n, num_warps=warps_64, num_stages=stages)
        table[(32, dtype)] = TileConfig(block_k=32, block_n=min(block_n, 64), num_warps=4, num_stages=3)
        table[(16, dtype)] = TileConfig(block_k=16, block_n=min(block_n, 64), num_warps=4, num_stages=3)
    return table


_HALF = (torch.float16, torch.bfloat16)


@functools.cache
def sdd_configs(aligned: bool = True) -> dict[tuple[int, torch.dtype], TileConfig]:
    """The SDD config the GPU path picks for each (block size, dtype); the interpreter pins one config.

    ``aligned``: operands 16-byte aligned with sizes / strides multiples of 16 (``_aligned16``: vector loads
    pipelined through shared memory). Otherwise 16-bit types at B = 64 and 128 take a K step of 32: scalar loads
    are staged in registers, and at 64 the transposed-weight layout spills (B = 128) or sits at 255 registers.
    """
    table = _gpu_table(block_n=0, warps_64=4, stages_64=4)
    if not aligned:
        for dt in _HALF:
            table[(128, dt)] = TileConfig(block_k=32, block_n=0, num_warps=8, num_stages=3)
            table[(64, dt)] = TileConfig(block_k=32, block_n=0, num_warps=4, num_stages=4)
    return table


@functools.cache
def dsd_configs(aligned: bool = True) -> dict[tuple[int, torch.dtype], TileConfig]:
    """The DSD config (both ``TRANS_S`` variants) for each (block size, dtype); the interpreter pins one.

    B = 64 takes 8 warps: with 4, DSDᵀ's 64×128 tile spills when strides are not multiples of 16. Unaligned
    operands (see ``sdd_configs``) of 16-bit types take a K step of 32, and 64 columns at B = 128: the
    transposed layouts (``dds``, ``dds_t``, ``dsd`` of ``wᵀ``) spill otherwise.
    """
    table = _gpu_table(block_n=128, warps_64=8, stages_64=3)
    if not aligned:
        for dt in _HALF:
            table[(128, dt)] = TileConfig(block_k=32, block_n=64, num_warps=8, num_stages=3)
            table[(64, dt)] = TileConfig(block_k=32, block_n=128, num_warps=8, num_stages=3)
    return table


@functools.cache
def dsd_act_configs(aligned: bool = True, trans_s: bool = False) -> dict[tuple[int, torch.dtype], TileConfig]:
    """The config of the fused-activation DSD (``trans_s``: its Sᵀ form): ``dsd_configs``, except that 16-bit
    types at B = 128 take a K step of 32 (at 64, gelu's fp32 prologue spills on sm_80), and the unaligned fp32 S
    form at B = 128 takes 64 columns (the GLU gate's scalar loads spill on sm_80 otherwise)."""
    table = dict(dsd_configs(aligned))
    if aligned:
        for dt in _HALF:
            table[(128, dt)] = TileConfig(block_k=32, block_n=128, num_warps=8, num_stages=3)
    elif not trans_s:
        table[(128, torch.float32)] = TileConfig(block_k=32, block_n=64, num_warps=8, num_stages=3)
    return table


def _pick(table: dict[tuple[int, torch.dtype], TileConfig], block_size: int, dtype: torch.dtype) -> TileConfig:
    return _INTERPRET_CONFIG if interpreting() else table[(block_size, dtype)]


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _sdd_kernel(
    a_ptr,  # [P, K] dense
    w_ptr,  # [E, K, F] expert weights
    out_ptr,  # [nnz_max, B, B] block data
    row_indices_ptr,  # [nnz_max] int32
    column_indices_ptr,  # [nnz_max] int32
    row_offsets_ptr,  # [max_block_rows + 1] int32; the last entry is nnz
    K,
    F,
    max_block_rows,
    blocks_per_expert,
    stride_am,
    stride_ak,
    stride_we,
    stride_wk,
    stride_wf,
    stride_ob,
    stride_om,
    stride_on,
    B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``out[b] = a[rows of b] @ w[e, :, columns of b]``; grid ``(nnz_max,)``."""
    b = tl.program_id(0)
    nnz = tl.load(row_offsets_ptr + max_block_rows)
    r = tl.maximum(tl.load(row_indices_ptr + b), 0)  # -1 in unused slots
    c = tl.maximum(tl.load(column_indices_ptr + b), 0)
    e = (c // blocks_per_expert).to(tl.int64)
    f = (c % blocks_per_expert) * B + tl.arange(0, B)
    f_ok = f < F
    rows = r.to(tl.int64) * B + tl.arange(0, B)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((B, B), dtype=tl.float32)
    k_end = tl.where(b < nnz, K, 0)  # unused slots skip the loop and store zeros
    for k0 in range(0, k_end, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        k64 = k.to(tl.int64)
        x = tl.load(a_ptr + rows[:, None] * stride_am + k64[None, :] * stride_ak, mask=k_ok[None, :], other=0.0)
        y = tl.load(
            w_ptr + e * stride_we + k64[:, None] * stride_wk + f.to(tl.int64)[None, :] * stride_wf,
            mask=k_ok[:, None] & f_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, y, acc)
    offs = tl.arange(0, B).to(tl.int64)
    out = out_ptr + b.to(tl.int64) * stride_ob + offs[:, None] * stride_om + offs[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty))  # b < nnz_max: the whole block is in bounds


# The activations ``_dsd_kernel`` applies to S (``reference.ACTIVATIONS`` names, and "none" for plain GLU).
ACT_CODES = {"none": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "silu": 4}


@triton.jit
def _activate(h, ACT: tl.constexpr):
    """``ACT_CODES`` activation of fp32 ``h``: gelu(erf), gelu(tanh) = h·σ(2u), relu, silu."""
    if ACT == 1:
        h = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 2:
        h = h * tl.sigmoid(1.5957691216057308 * (h + 0.044715 * h * h * h))
    elif ACT == 3:
        h = tl.maximum(h, 0.0)
    elif ACT == 4:
        h = h * tl.sigmoid(h)
    return h


@triton.jit
def _dsd_kernel(
    data_ptr,  # [nnz_max, B, B] block data
    x_ptr,  # S @ w: w [E, F, N];  Sᵀ @ a: a [P, N] (stride_xe unused)
    out_ptr,  # S @ w: y [P, N] (stride_oe unused);  Sᵀ @ a: g [E, F, N]
    offsets_ptr,  # S: row_offsets [max_block_rows + 1];  Sᵀ: column_offsets_t [E·nb + 1]
    indices_ptr,  # S: column_indices [nnz_max];  Sᵀ: row_indices_t [nnz_max]
    block_offsets_ptr,  # Sᵀ: block_offsets_t [nnz_max] (unused for S)
    gate_ptr,  # GLU: the gate blocks g [nnz_max, B, B] (unused otherwise)
    N,
    F,
    blocks_per_expert,
    stride_db,
    stride_dm,
    stride_dn,
    stride_gb,
    stride_gm,
    stride_gn,
    stride_xe,
    stride_xm,
    stride_xn,
    stride_oe,
    stride_om,
    stride_on,
    B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TRANS_S: tl.constexpr,
    UPCAST: tl.constexpr,
    ACT: tl.constexpr = 0,
    GLU: tl.constexpr = False,
):
    """One B×BLOCK_N output tile of ``S @ w`` (block row ``pid 0``) or ``Sᵀ @ a`` (block column ``pid 0``).

    The reduction walks the row's (column's) blocks, ``B // BLOCK_K`` steps each, in one flat loop. With ``ACT``
    (an ``ACT_CODES`` value) and / or ``GLU``, S is ``act(data) [* gate]``, applied in fp32 to each tile as loaded.
    """
    pid = tl.program_id(0)
    offs_i = tl.arange(0, B)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    n64 = offs_n.to(tl.int64)
    i64 = offs_i.to(tl.int64)
    STEPS: tl.constexpr = B // BLOCK_K
    start = tl.load(offsets_ptr + pid)
    end = tl.load(offsets_ptr + pid + 1)
    acc = tl.zeros((B, BLOCK_N), dtype=tl.float32)
    for t in range(start * STEPS, end * STEPS):
        s = t // STEPS
        k = (t % STEPS) * BLOCK_K + offs_k
        k64 = k.to(tl.int64)
        idx = tl.load(indices_ptr + s)
        if TRANS_S:
            # Sᵀ tile [B, BLOCK_K] = data[b, k, :]ᵀ, in bounds (k < B); columns of S past F reach only masked
            # output rows. Rows of a: block row idx < max_block_rows, in bounds.
            b = tl.load(block_offsets_ptr + s).to(tl.int64)
            d = tl.load(data_ptr + b * stride_db + k64[None, :] * stride_dm + i64[:, None] * stride_dn)
            if GLU:
                gate = tl.load(gate_ptr + b * stride_gb + k64[None, :] * stride_gm + i64[:, None] * stride_gn)
            rows = idx.to(tl.int64) * B + k64
            x = tl.load(x_ptr + rows[:, None] * stride_xm + n64[None, :] * stride_xn, mask=n_ok[None, :], other=0.0)
        else:
            # S tile [B, BLOCK_K] = data[s, :, k]; columns past F are ignored (masked on both operands).
            e = (idx // blocks_per_expert).to(tl.int64)
            f = (idx % blocks_per_expert) * B + k
            f_ok = f < F
            d = tl.load(
                data_ptr + s.to(tl.int64) * stride_db + i64[:, None] * stride_dm + k64[None, :] * stride_dn,
                mask=f_ok[None, :],
                other=0.0,
            )
            if GLU:
                gate = tl.load(
                    gate_ptr + s.to(tl.int64) * stride_gb + i64[:, None] * stride_gm + k64[None, :] * stride_gn,
                    mask=f_ok[None, :],
                    other=0.0,
                )
            x = tl.load(
                x_ptr + e * stride_xe + f.to(tl.int64)[:, None] * stride_xm + n64[None, :] * stride_xn,
                mask=f_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
        if ACT != 0 or GLU:
            d = _activate(d.to(tl.float32), ACT)
            if GLU:
                d = d * gate.to(tl.float32)
            d = d.to(data_ptr.dtype.element_ty)
        if UPCAST:
            d = d.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(d, x, acc)
    if TRANS_S:
        e_out = (pid // blocks_per_expert).to(tl.int64)
        f_out = (pid % blocks_per_expert) * B + offs_i
        out = out_ptr + e_out * stride_oe + f_out.to(tl.int64)[:, None] * stride_om + n64[None, :] * stride_on
        mask = (f_out < F)[:, None] & n_ok[None, :]
    else:
        rows_out = pid.to(tl.int64) * B + i64  # pid < max_block_rows: rows in bounds
        out = out_ptr + rows_out[:, None] * stride_om + n64[None, :] * stride_on
        mask = n_ok[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------- compile audit

_INDEX_POINTERS = dict.fromkeys(
    ("row_indices_ptr", "column_indices_ptr", "row_offsets_ptr", "offsets_ptr", "indices_ptr", "block_offsets_ptr"),
    INDEX_DTYPE,
)


# Sizes and strides that realistic shapes (K, F, N multiples of 16) make multiples of 16 (the unit ones excepted).
_SDD_ALIGNED = ("K", "F", "stride_am", "stride_ak", "stride_we", "stride_wk", "stride_wf", "stride_ob", "stride_om")
_DSD_ALIGNED = ("N", "F", "stride_db", "stride_dm", "stride_gb", "stride_gm", "stride_xe", "stride_xm", "stride_xn",
                "stride_oe", "stride_om", "stride_on")  # fmt: skip

# The operand layouts the ops run (forward, and the transposed views of the backward): (tag, unit strides).
_SDD_LAYOUTS = (("", ("stride_ak", "stride_wf", "stride_on")), (",wT", ("stride_ak", "stride_wk", "stride_on")),
                (",aT", ("stride_am", "stride_wf", "stride_on")))  # fmt: skip
_DSD_LAYOUTS = (
    ("dsd", False, ("stride_dn", "stride_xn", "stride_on")),
    ("dsd", False, ("stride_dn", "stride_xm", "stride_on")),  # dsd(dS, wᵀ)
    ("dds_t", False, ("stride_dn", "stride_xm", "stride_om")),  # (S @ gᵀ)ᵀ
    ("dsd_t", True, ("stride_dn", "stride_xn", "stride_on")),
    ("dds", True, ("stride_dn", "stride_xm", "stride_om")),  # (Sᵀ @ aᵀ)ᵀ
)


def _spec(
    name: str,
    kernel,
    dtype: torch.dtype,
    cfg: TileConfig,
    constexprs: dict,
    unit_strides: tuple[str, ...],
    aligned: tuple[str, ...],
    variants: tuple[str, ...],
) -> CompileSpec:
    """Pointers typed by dtype (``*i32`` for the index tensors), ints ``i32``; ``unit_strides`` specialised to 1
    as the JIT does for contiguous operands; ``aligned`` less the unit strides. Blocks of 16 / 32 rows are too
    short for wgmma (64-row tiles)."""
    constexprs = {**constexprs, **dict.fromkeys(unit_strides, 1)}
    signature = kernel_signature(kernel, constexprs, dtype, _INDEX_POINTERS)
    aligned = tuple(a for a in aligned if a not in unit_strides)
    B = constexprs["B"]
    return CompileSpec(
        name, kernel, signature, constexprs, cfg.num_warps, cfg.num_stages, B >= 64, aligned=aligned, variants=variants
    )


def _with_variants(configs) -> list[tuple[int, torch.dtype, TileConfig, tuple[str, ...]]]:
    """(B, dtype, config, audit variants) of a table function: one config for both variants, or the aligned one
    and the unaligned fallback, which also serves partly aligned operands (built in both variants, the two ends)."""
    out = []
    for (B, dtype), fast in configs(aligned=True).items():
        fallback = configs(aligned=False)[(B, dtype)]
        if fast == fallback:
            out.append((B, dtype, fast, ("unaligned", "aligned")))
        else:
            out += [(B, dtype, fast, ("aligned",)), (B, dtype, fallback, ("unaligned", "aligned"))]
    return out


def compile_specs() -> list[CompileSpec]:
    """Every configuration the GPU path can pick: dtype × block size × (aligned config, unaligned fallback) ×
    kernel variant × the operand layouts the ops run."""
    specs = []
    for B, dtype, cfg, variants in _with_variants(sdd_configs):
        constexprs = dict(B=B, BLOCK_K=cfg.block_k, UPCAST=False)
        for tag, unit in _SDD_LAYOUTS:
            name = f"sdd[{triton_type(dtype)}{tag},B={B},K={cfg.block_k}]"
            specs.append(_spec(name, _sdd_kernel, dtype, cfg, constexprs, unit, _SDD_ALIGNED, variants))
    for B, dtype, cfg, variants in _with_variants(dsd_configs):
        for op, trans, unit in _DSD_LAYOUTS:
            constexprs = dict(B=B, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, TRANS_S=trans, UPCAST=False, ACT=0,
                              GLU=False)  # fmt: skip
            tag = ",xT" if op == "dsd" and "stride_xm" in unit else ""
            name = f"{op}[{triton_type(dtype)}{tag},B={B},K={cfg.block_k},N={cfg.block_n}]"
            unit_strides = (*unit, "stride_gn")  # the gate pointer is the data's when there is no GLU
            specs.append(_spec(name, _dsd_kernel, dtype, cfg, constexprs, unit_strides, _DSD_ALIGNED, variants))
    # the fused activation (one, silu, stands for all: same loads, a few more fp32 ops): dsd_act's forward layout
    # and the Sᵀ layout of its weight gradient, with and without the GLU gate; B = 64 and 128 (the GPU sizes)
    for op, trans, unit, configs in (
        ("dsd_act", False, _DSD_LAYOUTS[0][2], dsd_act_configs),
        ("dsd_t_act", True, _DSD_LAYOUTS[3][2], functools.partial(dsd_act_configs, trans_s=True)),
    ):
        for B, dtype, cfg, variants in _with_variants(configs):
            if B < 64:
                continue
            for glu in (False, True):
                constexprs = dict(B=B, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, TRANS_S=trans, UPCAST=False,
                                  ACT=ACT_CODES["silu"], GLU=glu)  # fmt: skip
                name = f"{op}[{triton_type(dtype)},silu{',glu' if glu else ''},B={B},K={cfg.block_k},N={cfg.block_n}]"
                unit_strides = (*unit, "stride_gn")
                specs.append(_spec(name, _dsd_kernel, dtype, cfg, constexprs, unit_strides, _DSD_ALIGNED, variants))
    return specs


# ----------------------------------------------------------------------------------------------- validation


def _check_topology(topo: Topology) -> None:
    if not isinstance(topo, Topology):
        raise TypeError(f"topo must be a blocksparse_moe.routing.Topology, got {type(topo).__name__}")
    B, E, F, nb = topo.block_size, topo.num_experts, topo.ffn_size, topo.blocks_per_expert
    if nb != -(-F // B):
        raise ValueError(f"topo.blocks_per_expert must be ceil(ffn_size / block_size) = {-(-F // B)}, got {nb}")
    nnz_max, rows = topo.nnz_max, topo.max_block_rows
    expected = {
        "row_indices": nnz_max,
        "column_indices": nnz_max,
        "row_offsets": rows + 1,
        "row_indices_t": nnz_max,
        "column_indices_t": nnz_max,
        "column_offsets_t": E * nb + 1,
        "block_offsets_t": nnz_max,
    }
    for name, length in expected.items():
        t = getattr(topo, name)
        if t.shape != (length,):
            raise ValueError(f"topo.{name} must have shape ({length},), got {tuple(t.shape)}")
        check_index(f"topo.{name}", t)


def _check_operands(topo: Topology, out: torch.Tensor | None, out_shape: tuple[int, ...], **tensors: torch.Tensor):
    """Common dtype (fp32/fp16/bf16) and device of the operands, the topology and ``out``; returns the dtype."""
    dtypes = {name: t.dtype for name, t in tensors.items()}
    dtype = next(iter(dtypes.values()))
    if dtype not in DTYPES or len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{n} {d}" for n, d in dtypes.items())
        raise TypeError(f"expected operands of one dtype among {DTYPES}, got {listing}")
    check_same_device(**tensors, row_indices=topo.row_indices, out=out)
    check_out(out, out_shape, dtype, "the operands' dtype")
    return dtype


def _check_block_size(topo: Topology) -> None:
    """Triton-only limits: tile sizes, and int32 block-step counters (``nnz_max · B``)."""
    if topo.block_size not in BLOCK_SIZES:
        raise ValueError(f"the triton backend needs block_size in {BLOCK_SIZES}, got {topo.block_size}")
    if topo.nnz_max * topo.block_size >= 2**31:
        raise ValueError(f"the triton backend needs nnz_max · block_size < 2**31, got {topo.nnz_max * topo.block_size}")


def _check_data(data: torch.Tensor, topo: Topology) -> None:
    _check_topology(topo)
    B = topo.block_size
    check_tensor("data", data, "[nnz_max, B, B]", (topo.nnz_max, B, B))


# Shape functions: validate an op's operands (and ``out``) and return its output shape (fake impls use them too).


def sdd_shape(a: torch.Tensor, w: torch.Tensor, topo: Topology, out: torch.Tensor | None = None) -> tuple[int, ...]:
    _check_topology(topo)
    check_tensor("a", a, "[P, K]", (topo.num_rows, None))
    check_tensor("w", w, "[E, K, F]", (topo.num_experts, a.shape[1], topo.ffn_size))
    shape = (topo.nnz_max, topo.block_size, topo.block_size)
    _check_operands(topo, out, shape, a=a, w=w)
    return shape


def dsd_shape(data: torch.Tensor, topo: Topology, w: torch.Tensor, out: torch.Tensor | None = None) -> tuple[int, ...]:
    _check_data(data, topo)
    check_tensor("w", w, "[E, F, N]", (topo.num_experts, topo.ffn_size, None))
    shape = (topo.num_rows, w.shape[2])
    _check_operands(topo, out, shape, data=data, w=w)
    return shape


def dsd_t_shape(
    data: torch.Tensor, topo: Topology, a: torch.Tensor, out: torch.Tensor | None = None
) -> tuple[int, ...]:
    _check_data(data, topo)
    check_tensor("a", a, "[P, N]", (topo.num_rows, None))
    shape = (topo.num_experts, topo.ffn_size, a.shape[1])
    _check_operands(topo, out, shape, data=data, a=a)
    return shape


def _check_act(h: torch.Tensor, g: torch.Tensor | None, topo: Topology, activation: str) -> dict:
    """Validates ``activation`` and the gate ``g`` (shaped like ``h``); the operands to check for dtype / device."""
    if activation not in ACT_CODES:
        raise ValueError(f"activation must be one of {sorted(ACT_CODES)}, got {activation!r}")
    _check_data(h, topo)
    if g is None:
        return {"h": h}
    check_tensor("g", g, "[nnz_max, B, B]", tuple(h.shape))
    return {"h": h, "g": g}


def dsd_act_shape(
    h: torch.Tensor,
    g: torch.Tensor | None,
    topo: Topology,
    w: torch.Tensor,
    activation: str,
    out: torch.Tensor | None = None,
) -> tuple[int, ...]:
    operands = _check_act(h, g, topo, activation)
    check_tensor("w", w, "[E, F, N]", (topo.num_experts, topo.ffn_size, None))
    shape = (topo.num_rows, w.shape[2])
    _check_operands(topo, out, shape, **operands, w=w)
    return shape


def dsd_t_act_shape(
    h: torch.Tensor,
    g: torch.Tensor | None,
    topo: Topology,
    a: torch.Tensor,
    activation: str,
    out: torch.Tensor | None = None,
) -> tuple[int, ...]:
    operands = _check_act(h, g, topo, activation)
    check_tensor("a", a, "[P, N]", (topo.num_rows, None))
    shape = (topo.num_experts, topo.ffn_size, a.shape[1])
    _check_operands(topo, out, shape, **operands, a=a)
    return shape


def dds_shape(a: torch.Tensor, data: torch.Tensor, topo: Topology, out: torch.Tensor | None = None) -> tuple[int, ...]:
    _check_data(data, topo)
    check_tensor("a", a, "[M, P]", (None, topo.num_rows))
    shape = (a.shape[0], topo.num_experts, topo.ffn_size)
    _check_operands(topo, out, shape, a=a, data=data)
    return shape


def dds_t_shape(
    g: torch.Tensor, data: torch.Tensor, topo: Topology, out: torch.Tensor | None = None
) -> tuple[int, ...]:
    _check_data(data, topo)
    check_tensor("g", g, "[M, E, F]", (None, topo.num_experts, topo.ffn_size))
    shape = (g.shape[0], topo.num_rows)
    _check_operands(topo, out, shape, g=g, data=data)
    return shape


# ----------------------------------------------------------------------------------------------- launchers


def sdd(
    a: torch.Tensor, w: torch.Tensor, topo: Topology, *, backend: str | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``S = a @ w`` at the blocks of ``topo``: a ``[P, K]``, w ``[E, K, F]`` → data ``[nnz_max, B, B]``.

    Slots ``≥ nnz`` and the columns ``≥ F`` of each expert's last block are zero. ``out`` (optional) receives it.
    """
    out_shape = sdd_shape(a, w, topo, out)
    B, F, K, dtype = topo.block_size, topo.ffn_size, a.shape[1], a.dtype
    if resolve_backend(a.device, backend) == "torch":
        return copy_to_out(sdd_torch(a, w, topo), out)
    _check_block_size(topo)
    out = out_or_empty(out, out_shape, a)
    if topo.nnz_max == 0:
        return out
    indices = (topo.row_indices, topo.column_indices, topo.row_offsets)
    aligned = aligned16((a, w, out, *indices), (K, F), (*a.stride(), *w.stride(), *out.stride()))
    cfg = _pick(sdd_configs(aligned), B, dtype)
    _sdd_kernel[(topo.nnz_max,)](
        a, w, out, topo.row_indices, topo.column_indices, topo.row_offsets,
        K, F, topo.max_block_rows, topo.blocks_per_expert,
        *a.stride(), *w.stride(), *out.stride(),
        B=B, BLOCK_K=cfg.block_k, UPCAST=upcast_dots(dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def _launch_dsd(
    data: torch.Tensor,
    topo: Topology,
    x: torch.Tensor,
    out: torch.Tensor,
    x_strides: tuple[int, int, int],
    out_strides: tuple[int, int, int],
    N: int,
    trans_s: bool,
    activation: str = "none",
    gate: torch.Tensor | None = None,
) -> None:
    """``out = S @ x`` (x ``[E, F, N]``, out ``[P, N]``) or ``out = Sᵀ @ x`` (x ``[P, N]``, out ``[E, F, N]``)
    given as storage and strides (the 2-D side's as ``(0, rows, columns)``), so that views need no copy.
    S is ``activation(data) [* gate]`` (``ACT_CODES``), applied in the kernel's prologue."""
    _check_block_size(topo)
    if trans_s:
        offsets, indices = topo.column_offsets_t, topo.row_indices_t
    else:
        offsets, indices = topo.row_offsets, topo.column_indices
    glu = gate is not None
    gate = data if gate is None else gate
    tensors = (data, gate, x, out, offsets, indices, topo.block_offsets_t)
    strides = (*data.stride(), *gate.stride(), *x_strides, *out_strides)
    aligned = aligned16(tensors, (N, topo.ffn_size), strides)
    table = dsd_act_configs(aligned, trans_s) if activation != "none" or glu else dsd_configs(aligned)
    cfg = _pick(table, topo.block_size, data.dtype)
    grid = (topo.num_experts * topo.blocks_per_expert if trans_s else topo.max_block_rows, triton.cdiv(N, cfg.block_n))
    check_grid_y(grid, "N (the dense columns)", N, cfg.block_n)
    if grid[0] * grid[1] == 0:
        return
    _dsd_kernel[grid](
        data, x, out, offsets, indices, topo.block_offsets_t, gate,
        N, topo.ffn_size, topo.blocks_per_expert, *strides,
        B=topo.block_size, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, TRANS_S=trans_s, UPCAST=upcast_dots(data.dtype),
        ACT=ACT_CODES[activation], GLU=glu, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def dsd(
    data: torch.Tensor, topo: Topology, w: torch.Tensor, *, backend: str | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``y = S @ w``: w ``[E, F, N]`` → ``[P, N]``; rows with no blocks are zero."""
    out_shape = dsd_shape(data, topo, w, out)
    if resolve_backend(data.device, backend) == "torch":
        return copy_to_out(dsd_torch(data, topo, w), out)
    out = out_or_empty(out, out_shape, data)
    _launch_dsd(data, topo, w, out, w.stride(), (0, *out.stride()), w.shape[2], trans_s=False)
    return out


def dsd_t(
    data: torch.Tensor, topo: Topology, a: torch.Tensor, *, backend: str | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``g = Sᵀ @ a``: a ``[P, N]`` → ``[E, F, N]``; experts with no rows give zeros."""
    out_shape = dsd_t_shape(data, topo, a, out)
    if resolve_backend(data.device, backend) == "torch":
        return copy_to_out(dsd_t_torch(data, topo, a), out)
    out = out_or_empty(out, out_shape, data)
    _launch_dsd(data, topo, a, out, (0, *a.stride()), out.stride(), a.shape[1], trans_s=True)
    return out


def dsd_act(
    h: torch.Tensor,
    g: torch.Tensor | None,
    topo: Topology,
    w: torch.Tensor,
    activation: str,
    *,
    backend: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = (act(h) [* g]) @ w`` with S's blocks ``h`` (and GLU gate ``g``): w ``[E, F, N]`` → ``[P, N]``.

    ``activation`` is an ``ACT_CODES`` name; it is applied in fp32 to each block as the kernel loads it, so the
    activated blocks never exist in memory. Columns ``≥ F`` of ``h`` and ``g`` are ignored.
    """
    out_shape = dsd_act_shape(h, g, topo, w, activation, out)
    if resolve_backend(h.device, backend) == "torch":
        return copy_to_out(dsd_torch(act_torch(h, g, activation), topo, w), out)
    out = out_or_empty(out, out_shape, h)
    _launch_dsd(h, topo, w, out, w.stride(), (0, *out.stride()), w.shape[2], False, activation, g)
    return out


def dsd_t_act(
    h: torch.Tensor,
    g: torch.Tensor | None,
    topo: Topology,
    a: torch.Tensor,
    activation: str,
    *,
    backend: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(act(h) [* g])ᵀ @ a``: a ``[P, N]`` → ``[E, F, N]`` (``dsd_act``'s weight gradient), fused like it."""
    out_shape = dsd_t_act_shape(h, g, topo, a, activation, out)
    if resolve_backend(h.device, backend) == "torch":
        return copy_to_out(dsd_t_torch(act_torch(h, g, activation), topo, a), out)
    out = out_or_empty(out, out_shape, h)
    _launch_dsd(h, topo, a, out, (0, *a.stride()), out.stride(), a.shape[1], True, activation, g)
    return out


def dds(
    a: torch.Tensor, data: torch.Tensor, topo: Topology, *, backend: str | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``c = a @ S``: a ``[M, P]`` → ``[M, E, F]``, computed as ``(Sᵀ @ aᵀ)ᵀ`` on strided views."""
    out_shape = dds_shape(a, data, topo, out)
    if resolve_backend(data.device, backend) == "torch":
        return copy_to_out(dds_torch(a, data, topo), out)
    out = out_or_empty(out, out_shape, data)
    s = out.stride()
    _launch_dsd(data, topo, a, out, (0, a.stride(1), a.stride(0)), (s[1], s[2], s[0]), a.shape[0], trans_s=True)
    return out


def dds_t(
    g: torch.Tensor, data: torch.Tensor, topo: Topology, *, backend: str | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``c = g @ Sᵀ``: g ``[M, E, F]`` → ``[M, P]``, computed as ``(S @ gᵀ)ᵀ`` with gᵀ the ``[E, F, M]`` view."""
    out_shape = dds_t_shape(g, data, topo, out)
    if resolve_backend(data.device, backend) == "torch":
        return copy_to_out(dds_t_torch(g, data, topo), out)
    out = out_or_empty(out, out_shape, data)
    s = g.stride()
    _launch_dsd(data, topo, g, out, (s[1], s[2], s[0]), (0, out.stride(1), out.stride(0)), g.shape[0], trans_s=False)
    return out


# ----------------------------------------------------------------------------------------------- torch


def _slots(topo: Topology) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per slot: used (``b < nnz``, on the device), block row, block column (0 where unused), column validity."""
    nnz_max, B = topo.nnz_max, topo.block_size
    device = topo.row_indices.device
    used = torch.arange(nnz_max, device=device) < topo.nnz
    r = topo.row_indices.clamp(min=0).long()
    c = topo.column_indices.clamp(min=0).long()
    f = (c % topo.blocks_per_expert * B)[:, None] + torch.arange(B, device=device)
    return used, r, c, f < topo.ffn_size


def _expert_blocks(x: torch.Tensor, topo: Topology) -> torch.Tensor:
    """``[E, F, N]`` → fp32 ``[E·nb, B, N]``, rows past F zero."""
    E, F, N = x.shape
    nb, B = topo.blocks_per_expert, topo.block_size
    return torch.nn.functional.pad(x.float(), (0, 0, 0, nb * B - F)).reshape(E * nb, B, N)


def _expert_ranges(topo: Topology) -> list[tuple[int, int, int]]:
    """CPU eager: ``(expert, first block row, block rows)`` of each expert with rows, read on the host."""
    nb = topo.blocks_per_expert
    co = topo.column_offsets_t.tolist()  # expert e's first block column starts at nb·rbo[e], holds nrows(e)
    ranges = [(e, co[e * nb] // nb, co[e * nb + 1] - co[e * nb]) for e in range(topo.num_experts)]
    return [(e, r0, n) for e, r0, n in ranges if n > 0]


def _expert_matrix(data: torch.Tensor, topo: Topology, r0: int, n: int) -> torch.Tensor:
    """The dense fp32 ``[n·B, F]`` slab of ``S`` held by block rows ``r0 .. r0+n`` (one expert's)."""
    nb, B = topo.blocks_per_expert, topo.block_size
    slab = data[r0 * nb : (r0 + n) * nb].float().reshape(n, nb, B, B).permute(0, 2, 1, 3)
    return slab.reshape(n * B, nb * B)[:, : topo.ffn_size]


def sdd_torch(a: torch.Tensor, w: torch.Tensor, topo: Topology) -> torch.Tensor:
    """PyTorch ``sdd`` (same contract): gather each slot's rows and weight columns, one batched matmul (on CPU
    eager, one dense matmul per expert)."""
    if host_loop_ok(a):
        nb, B, F = topo.blocks_per_expert, topo.block_size, topo.ffn_size
        out = torch.zeros(topo.nnz_max, B, B, dtype=torch.float32)
        for e, r0, n in _expert_ranges(topo):
            h = torch.nn.functional.pad(a[r0 * B : (r0 + n) * B].float() @ w[e].float(), (0, nb * B - F))
            out[r0 * nb : (r0 + n) * nb] = h.reshape(n, B, nb, B).transpose(1, 2).reshape(n * nb, B, B)
        return out.to(a.dtype)
    used, r, c, _ = _slots(topo)
    R, B, K = topo.max_block_rows, topo.block_size, a.shape[1]
    blocks = torch.bmm(a.float().reshape(R, B, K)[r], _expert_blocks(w.transpose(1, 2), topo)[c].transpose(1, 2))
    return torch.where(used[:, None, None], blocks, 0.0).to(a.dtype)


def act_torch(h: torch.Tensor, g: torch.Tensor | None, activation: str) -> torch.Tensor:
    """``act(h) [* g]`` in fp32, rounded to ``h.dtype`` (what the fused kernels feed their dots)."""
    a = h.float()
    if activation != "none":
        a = _TORCH_ACTS[activation](a)
    return (a if g is None else a * g.float()).to(h.dtype)


_TORCH_ACTS = {
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": functools.partial(torch.nn.functional.gelu, approximate="tanh"),
    "relu": torch.nn.functional.relu,
    "silu": torch.nn.functional.silu,
}


def dsd_torch(data: torch.Tensor, topo: Topology, w: torch.Tensor) -> torch.Tensor:
    """PyTorch ``dsd``: each used slot's block times its expert rows, summed into its block row."""
    if host_loop_ok(data):
        B = topo.block_size
        y = torch.zeros(topo.num_rows, w.shape[2], dtype=torch.float32)
        for e, r0, n in _expert_ranges(topo):
            y[r0 * B : (r0 + n) * B] = _expert_matrix(data, topo, r0, n) @ w[e].float()
        return y.to(data.dtype)
    used, r, c, col_ok = _slots(topo)
    R, B, N = topo.max_block_rows, topo.block_size, w.shape[2]
    d = torch.where(used[:, None, None] & col_ok[:, None, :], data.float(), 0.0)
    y = torch.zeros(R, B, N, dtype=torch.float32, device=data.device)
    y.index_add_(0, r, torch.bmm(d, _expert_blocks(w, topo)[c]))
    return y.reshape(R * B, N).to(data.dtype)


def dsd_t_torch(data: torch.Tensor, topo: Topology, a: torch.Tensor) -> torch.Tensor:
    """PyTorch ``dsd_t``: each used slot's transposed block times its rows of ``a``, summed into its column."""
    if host_loop_ok(data):
        B = topo.block_size
        g = torch.zeros(topo.num_experts, topo.ffn_size, a.shape[1], dtype=torch.float32)
        for e, r0, n in _expert_ranges(topo):
            g[e] = _expert_matrix(data, topo, r0, n).T @ a[r0 * B : (r0 + n) * B].float()
        return g.to(data.dtype)
    used, r, c, _ = _slots(topo)
    R, B, N = topo.max_block_rows, topo.block_size, a.shape[1]
    E, F, nb = topo.num_experts, topo.ffn_size, topo.blocks_per_expert
    d = torch.where(used[:, None, None], data.float(), 0.0)
    g = torch.zeros(E * nb, B, N, dtype=torch.float32, device=data.device)
    g.index_add_(0, c, torch.bmm(d.transpose(1, 2), a.float().reshape(R, B, N)[r]))
    return g.reshape(E, nb * B, N)[:, :F].to(data.dtype).contiguous()


def dds_torch(a: torch.Tensor, data: torch.Tensor, topo: Topology) -> torch.Tensor:
    """PyTorch ``dds``: ``(Sᵀ @ aᵀ)ᵀ``."""
    return dsd_t_torch(data, topo, a.t()).permute(2, 0, 1).contiguous()


def dds_t_torch(g: torch.Tensor, data: torch.Tensor, topo: Topology) -> torch.Tensor:
    """PyTorch ``dds_t``: ``(S @ gᵀ)ᵀ``."""
    return dsd_torch(data, topo, g.permute(1, 2, 0)).t().contiguous()
