"""Variable-length grouped GEMM over expert-sorted rows (optionally gathering x on the fly) and its variable-K
weight-gradient form.

Design origin: the grouped GEMMs of MegaBlocks' ``gg`` / ``torch._grouped_mm`` and scattermoe's fused gather: the
input is read through ``row_assignment`` so it is never copied into expert order. Tile scheduling needs no host
sync: a device-side prefix sum of M tiles per expert, and each program binary-searches it for its expert.

Limits: fp32 / fp16 / bf16, x and w of one dtype, fp32 accumulation, output in the input dtype; int32 indices
(R, K, N < 2**31), 64-bit address arithmetic; grid axis 1 (N tiles; wgrad: experts) at most 65535.

Glossary (E experts, R sorted rows, T tokens, k choices per token):

- ``offsets [E+1]`` int32: expert e owns sorted rows ``offsets[e] .. offsets[e+1]``; rows ``≥ offsets[E]``
  (invalid assignments) belong to no expert and their outputs are zero.
- ``row_assignment [R]`` int32 (fused gather): sorted row i reads x row ``row_assignment[i] // k``.
- ``tile_offsets [E+1]`` int32: ``cumsum(ceil(n_e / BLOCK_M))``, computed on the device.

Grids (sized from shapes, never from device data):

- ``_grouped_mm_kernel``: ``(min(cdiv(R, BLOCK_M) + E, R), cdiv(N, BLOCK_N))``. Program m < ``tile_offsets[E]``
  computes its expert's tile; the others zero the rows ``≥ offsets[E]``, one tile each (nothing left: all masked).
- ``_grouped_wgrad_kernel``: ``(cdiv(K, BLOCK_M)·cdiv(N, BLOCK_N), E)``: ``dw[e] = X[rows of e]ᵀ @ dY[rows of e]``,
  the reduction runs over the expert's rows (zero rows: zeros).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._backend import resolve_backend
from ..routing import INDEX_DTYPE
from ._common import (
    DTYPES,
    CompileSpec,
    aligned16,
    check_float,
    check_grid_y,
    check_index,
    check_out,
    check_same_device,
    check_sizes,
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
    "GemmConfig",
    "grouped_mm_config",
    "grouped_wgrad_config",
    "compile_specs",
    "grouped_mm",
    "grouped_mm_wgrad",
    "grouped_mm_shape",
    "grouped_mm_wgrad_shape",
    "grouped_mm_torch",
    "grouped_mm_wgrad_torch",
    "tile_offsets",
]

# ----------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class GemmConfig:
    """Output tile (``block_m × block_n``), reduction step ``block_k`` and launch options."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Under the interpreter: small tiles, so that tests cross several M, N and K tiles.
_INTERPRET_CONFIG = GemmConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1)


def grouped_mm_config(dtype: torch.dtype, aligned: bool = True) -> GemmConfig:
    """sm_90: 128×128 tiles on two warpgroups (wgmma), K step 64 for 16-bit types (32 for fp32, half the bytes
    per stage); one config pinned when interpreting.

    ``aligned``: every operand 16-byte aligned and its sizes / strides multiples of 16 (``_aligned16``), so the
    JIT's build vectorises the loads and pipelines them through shared memory. Otherwise 16-bit types take a K
    step of 16: scalar loads are staged in registers, and at 64 the ``wᵀ`` layout spills (255 registers).
    """
    if interpreting():
        return _INTERPRET_CONFIG
    if dtype == torch.float32:
        return GemmConfig(block_m=128, block_n=128, block_k=32, num_warps=8, num_stages=3)
    if not aligned:
        return GemmConfig(block_m=128, block_n=128, block_k=16, num_warps=8, num_stages=3)
    return GemmConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4)


def grouped_wgrad_config(dtype: torch.dtype) -> GemmConfig:
    """Variable-K weight gradient: ``block_m × block_n`` tile of ``dw[e]`` (K × N), ``block_k`` rows per step.

    One config for aligned and unaligned operands (neither spills)."""
    return grouped_mm_config(dtype)


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _grouped_mm_kernel(
    x_ptr,  # [T, K] (gathered through row_assignment) or [R, K]
    w_ptr,  # [E, K, N] any strides
    out_ptr,  # [R, N]
    offsets_ptr,  # [E+1] int32
    tile_offsets_ptr,  # [E+1] int32
    row_assignment_ptr,  # [R] int32 (unused unless GATHER)
    R,
    N,
    K,
    E,
    top_k,
    search_steps,  # E.bit_length(): enough halvings of [0, E)
    stride_xm,
    stride_xk,
    stride_we,
    stride_wk,
    stride_wn,
    stride_om,
    stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GATHER: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One BLOCK_M × BLOCK_N tile of ``out``: ``x[src(rows)] @ w[e]`` for expert e's rows, or zeros past them."""
    pid_m = tl.program_id(0)
    used_tiles = tl.load(tile_offsets_ptr + E)
    # Largest e in [0, E) with tile_offsets[e] <= pid_m: the expert whose tiles contain pid_m (empty experts have
    # tile_offsets[e] == tile_offsets[e + 1] and lose to the next one).
    lo = 0
    hi = E
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        go = tl.load(tile_offsets_ptr + mid) <= pid_m
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    # Past the experts' tiles, programs zero the rows >= offsets[E], one tile each, and skip the K loop.
    used = pid_m < used_tiles
    start = tl.where(
        used,
        tl.load(offsets_ptr + lo) + (pid_m - tl.load(tile_offsets_ptr + lo)) * BLOCK_M,
        tl.load(offsets_ptr + E) + (pid_m - used_tiles) * BLOCK_M,
    )
    end = tl.where(used, tl.load(offsets_ptr + lo + 1), R)
    k_end = tl.where(used, K, 0)
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    if GATHER:
        src = tl.load(row_assignment_ptr + rows, mask=row_ok, other=0) // top_k
    else:
        src = rows
    src = tl.where(row_ok, src, 0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    n64 = offs_n.to(tl.int64)
    w_base = w_ptr + lo.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        k64 = k.to(tl.int64)
        a = tl.load(
            x_ptr + src[:, None] * stride_xm + k64[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        b = tl.load(
            w_base + k64[:, None] * stride_wk + n64[None, :] * stride_wn, mask=k_ok[:, None] & n_ok[None, :], other=0.0
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + n64[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _grouped_wgrad_kernel(
    x_ptr,  # [T, K] (gathered through row_assignment) or [R, K]
    dy_ptr,  # [R, N]
    out_ptr,  # [E, K, N]
    offsets_ptr,  # [E+1] int32
    row_assignment_ptr,  # [R] int32 (unused unless GATHER)
    K,
    N,
    top_k,
    stride_xm,
    stride_xk,
    stride_dm,
    stride_dn,
    stride_oe,
    stride_ok,
    stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GATHER: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One BLOCK_M × BLOCK_N tile of ``dw[e]`` (e = pid 1), reduced over expert e's rows BLOCK_K at a time."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    e = tl.program_id(1)
    offs_m = (tl.program_id(0) // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)  # columns of x (K)
    offs_n = (tl.program_id(0) % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < K
    n_ok = offs_n < N
    m64 = offs_m.to(tl.int64)
    n64 = offs_n.to(tl.int64)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        row_ok = rows < end
        if GATHER:
            src = tl.load(row_assignment_ptr + rows, mask=row_ok, other=0) // top_k
        else:
            src = rows
        src = tl.where(row_ok, src, 0).to(tl.int64)
        a = tl.load(
            x_ptr + src[None, :] * stride_xm + m64[:, None] * stride_xk, mask=m_ok[:, None] & row_ok[None, :], other=0.0
        )
        b = tl.load(
            dy_ptr + rows.to(tl.int64)[:, None] * stride_dm + n64[None, :] * stride_dn,
            mask=row_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
    out = out_ptr + e.to(tl.int64) * stride_oe + m64[:, None] * stride_ok + n64[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------- compile audit

_INDEX_POINTERS = dict.fromkeys(("offsets_ptr", "tile_offsets_ptr", "row_assignment_ptr"), INDEX_DTYPE)


# Sizes and strides that realistic shapes (K, N multiples of 16) make multiples of 16; R, E, top_k are free.
_MM_ALIGNED = ("N", "K", "stride_xm", "stride_we", "stride_wk", "stride_wn", "stride_om")
_WGRAD_ALIGNED = ("K", "N", "stride_xm", "stride_dm", "stride_oe", "stride_ok")


def _spec(
    name: str,
    kernel,
    dtype: torch.dtype,
    cfg: GemmConfig,
    constexprs: dict,
    unit: tuple[str, ...],
    aligned: tuple[str, ...],
    variants: tuple[str, ...] = ("unaligned", "aligned"),
) -> CompileSpec:
    """Pointers typed by dtype (``*i32`` for the index tensors), ints ``i32``; ``unit`` strides specialised to 1
    as the JIT does for contiguous operands; ``aligned`` less the unit strides."""
    constexprs = {
        **constexprs,
        **dict.fromkeys(unit, 1),
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_K": cfg.block_k,
        "UPCAST": False,
    }
    signature = kernel_signature(kernel, constexprs, dtype, _INDEX_POINTERS)
    aligned = tuple(a for a in aligned if a not in unit)
    return CompileSpec(
        name, kernel, signature, constexprs, cfg.num_warps, cfg.num_stages, True, aligned=aligned, variants=variants
    )


def _mm_configs(dtype: torch.dtype) -> list[tuple[GemmConfig, tuple[str, ...]]]:
    """The ``grouped_mm`` configs of ``dtype`` with the audit variants each runs as: one config for both, or the
    aligned one and the unaligned fallback, which also serves partly aligned operands (built in both variants,
    the two ends of that range)."""
    fast, fallback = grouped_mm_config(dtype), grouped_mm_config(dtype, aligned=False)
    if fast == fallback:
        return [(fast, ("unaligned", "aligned"))]
    return [(fast, ("aligned",)), (fallback, ("unaligned", "aligned"))]


def compile_specs() -> list[CompileSpec]:
    """Every configuration the GPU path can pick: dtype × gather × (aligned config, unaligned fallback), with the
    weights both row-major (``x @ w``) and transposed (``dy @ wᵀ`` in the backward); contiguous x / dy rows."""
    specs = []
    for dtype in DTYPES:
        tag = triton_type(dtype)
        for gather in (False, True):
            g, ce = (",gather" if gather else ""), dict(GATHER=gather)
            for cfg, variants in _mm_configs(dtype):
                for w_unit, w_tag in (("stride_wn", ""), ("stride_wk", ",wT")):
                    name = f"grouped_mm[{tag}{g}{w_tag},K={cfg.block_k}]"
                    unit = ("stride_xk", w_unit, "stride_on")
                    specs.append(_spec(name, _grouped_mm_kernel, dtype, cfg, ce, unit, _MM_ALIGNED, variants))
            wcfg = grouped_wgrad_config(dtype)
            name = f"grouped_wgrad[{tag}{g},K={wcfg.block_k}]"
            unit = ("stride_xk", "stride_dn", "stride_on")
            specs.append(_spec(name, _grouped_wgrad_kernel, dtype, wcfg, ce, unit, _WGRAD_ALIGNED))
    return specs


# ----------------------------------------------------------------------------------------------- validation


def _check_rows(
    x: torch.Tensor, offsets: torch.Tensor, row_assignment: torch.Tensor | None, tokens: int | None
) -> tuple[int, int]:
    """x ``[*, K]``, ``offsets [E+1]``, the optional ``row_assignment [R]``; returns ``(E, R)``."""
    check_tensor("offsets", offsets, "[E+1]", (None,))
    check_index("offsets", offsets)
    if offsets.shape[0] < 2:
        raise ValueError(f"offsets must have E+1 >= 2 entries, got shape {tuple(offsets.shape)}")
    check_tensor("x", x, "[T or R, K]", (tokens, None))
    check_float("x", x)
    if row_assignment is None:
        return offsets.shape[0] - 1, x.shape[0]
    check_tensor("row_assignment", row_assignment, "[R]", (None,))
    check_index("row_assignment", row_assignment)
    return offsets.shape[0] - 1, row_assignment.shape[0]


def grouped_mm_shape(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    row_assignment: torch.Tensor | None = None,
    assignment_row: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[int, int]:
    """Validate ``grouped_mm``'s operands; returns the output shape ``(R, N)``."""
    if (row_assignment is None) != (assignment_row is None):
        raise ValueError(
            "row_assignment and assignment_row must be given together (fused gather) or both be None, got "
            f"row_assignment {'None' if row_assignment is None else 'a tensor'}, "
            f"assignment_row {'None' if assignment_row is None else 'a tensor'}"
        )
    tokens = None
    if assignment_row is not None:
        check_tensor("assignment_row", assignment_row, "[T, k]", (None, None))
        check_index("assignment_row", assignment_row)
        if assignment_row.shape[1] < 1:
            raise ValueError(f"assignment_row must have k >= 1 columns, got shape {tuple(assignment_row.shape)}")
        tokens = assignment_row.shape[0]
    E, R = _check_rows(x, offsets, row_assignment, tokens)
    check_tensor("w", w, "[E, K, N]", (E, x.shape[1], None))
    if w.dtype != x.dtype:
        raise TypeError(f"w must have x's dtype {x.dtype}, got {w.dtype}")
    check_sizes(R=R, K=x.shape[1], N=w.shape[2])
    shape = (R, w.shape[2])
    check_out(out, shape, x.dtype)
    check_same_device(x=x, w=w, offsets=offsets, row_assignment=row_assignment, assignment_row=assignment_row, out=out)
    return shape


def grouped_mm_wgrad_shape(
    x: torch.Tensor,
    dy: torch.Tensor,
    offsets: torch.Tensor,
    row_assignment: torch.Tensor | None = None,
    k: int = 1,
    out: torch.Tensor | None = None,
) -> tuple[int, int, int]:
    """Validate ``grouped_mm_wgrad``'s operands; returns the output shape ``(E, K, N)``."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k (choices per token) must be a positive int, got {k!r}")
    E, R = _check_rows(x, offsets, row_assignment, None)
    check_tensor("dy", dy, "[R, N]", (R, None))
    if dy.dtype != x.dtype:
        raise TypeError(f"dy must have x's dtype {x.dtype}, got {dy.dtype}")
    check_sizes(R=R, K=x.shape[1], N=dy.shape[1], E=E)
    shape = (E, x.shape[1], dy.shape[1])
    check_out(out, shape, x.dtype)
    check_same_device(x=x, dy=dy, offsets=offsets, row_assignment=row_assignment, out=out)
    return shape


def _check_index_values(
    offsets: torch.Tensor, row_assignment: torch.Tensor | None, R: int, assignments: int | None
) -> None:
    """On CPU (free to read) the interpreter's out-of-bounds accesses corrupt the heap: check the index ranges."""
    if offsets.device.type != "cpu":
        return
    if int(offsets[0]) != 0 or bool((offsets[1:] < offsets[:-1]).any()) or int(offsets[-1]) > R:
        raise ValueError(f"offsets must rise from 0 to at most R = {R}, got {offsets.tolist()}")
    if row_assignment is not None and R:
        used = row_assignment[: int(offsets[-1])]
        if bool(((used < 0) | (used >= assignments)).any()):
            raise ValueError(f"row_assignment must hold assignments in [0, {assignments}) for rows < offsets[E]")


def tile_offsets(offsets: torch.Tensor, block_m: int) -> torch.Tensor:
    """``[E+1]`` int32 prefix sum of ``ceil(n_e / block_m)`` M tiles per expert, on the device (no sync)."""
    tiles = (offsets[1:] - offsets[:-1] + block_m - 1) // block_m
    return torch.cat([offsets.new_zeros(1), tiles.cumsum(0).to(offsets.dtype)])


# ----------------------------------------------------------------------------------------------- launchers


def grouped_mm(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    row_assignment: torch.Tensor | None = None,
    assignment_row: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[i] = x[src(i)] @ w[e]`` for the expert-sorted rows ``offsets[e] ≤ i < offsets[e+1]``; rows
    ``≥ offsets[E]`` are zero. ``src(i) = row_assignment[i] // k`` with the fused gather (k =
    ``assignment_row.shape[1]``), else ``i``. x ``[T or R, K]``, w ``[E, K, N]`` (any strides) → ``[R, N]``."""
    shape = grouped_mm_shape(x, w, offsets, row_assignment, assignment_row, out)
    if resolve_backend(x.device, backend) == "torch":
        return copy_to_out(grouped_mm_torch(x, w, offsets, row_assignment, assignment_row), out)
    gather = row_assignment is not None
    R, N = shape
    E, K = w.shape[0], x.shape[1]
    top_k = assignment_row.shape[1] if gather else 1
    _check_index_values(offsets, row_assignment, R, assignment_row.numel() if gather else None)
    out = out_or_empty(out, shape, x)
    if out.numel() == 0:
        return out
    tensors = (x, w, out, offsets) + ((row_assignment,) if gather else ())
    aligned = aligned16(tensors, (N, K), (*x.stride(), *w.stride(), *out.stride()))
    cfg = grouped_mm_config(x.dtype, aligned)
    grid = (min(triton.cdiv(R, cfg.block_m) + E, R), triton.cdiv(N, cfg.block_n))
    check_grid_y(grid, "N", N, cfg.block_n)
    _grouped_mm_kernel[grid](
        x, w, out, offsets, tile_offsets(offsets, cfg.block_m), row_assignment if gather else offsets,
        R, N, K, E, top_k, E.bit_length(),
        *x.stride(), *w.stride(), *out.stride(),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GATHER=gather, UPCAST=upcast_dots(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def grouped_mm_wgrad(
    x: torch.Tensor,
    dy: torch.Tensor,
    offsets: torch.Tensor,
    row_assignment: torch.Tensor | None = None,
    k: int = 1,
    *,
    backend: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dw[e] = x[src(rows of e)]ᵀ @ dy[rows of e]``: the weight gradient of ``grouped_mm``. x ``[T or R, K]``,
    dy ``[R, N]`` → ``[E, K, N]``; experts with no rows get zeros. ``k`` is the gather's choices per token."""
    shape = grouped_mm_wgrad_shape(x, dy, offsets, row_assignment, k, out)
    if resolve_backend(x.device, backend) == "torch":
        return copy_to_out(grouped_mm_wgrad_torch(x, dy, offsets, row_assignment, k), out)
    E, K, N = shape
    gather = row_assignment is not None
    _check_index_values(offsets, row_assignment, dy.shape[0], x.shape[0] * k if gather else None)
    out = out_or_empty(out, shape, x)
    if out.numel() == 0:
        return out
    cfg = grouped_wgrad_config(x.dtype)
    grid = (triton.cdiv(K, cfg.block_m) * triton.cdiv(N, cfg.block_n), E)
    check_grid_y(grid, "the number of experts", E)
    _grouped_wgrad_kernel[grid](
        x, dy, out, offsets, row_assignment if gather else offsets,
        K, N, k,
        *x.stride(), *dy.stride(), *out.stride(),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GATHER=gather, UPCAST=upcast_dots(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------- torch

_TORCH_BLOCK_M = 64


def _tiles(
    offsets: torch.Tensor, row_assignment: torch.Tensor | None, k: int, R: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's schedule as tensors: per M tile its expert ``[M]``, and per tile row ``[M, BLOCK_M]`` the
    sorted row (``R`` where none) and the source row of x (0 where none). No host sync."""
    E, bm = offsets.shape[0] - 1, _TORCH_BLOCK_M
    tiles = tile_offsets(offsets, bm).long()
    m = torch.arange(min(-(-R // bm) + E, R), device=offsets.device)
    e = (torch.searchsorted(tiles, m, right=True) - 1).clamp(max=E - 1)
    off = offsets.long()
    rows = (off[e] + (m - tiles[e]) * bm)[:, None] + torch.arange(bm, device=offsets.device)
    ok = (m < tiles[E])[:, None] & (rows < off[e + 1][:, None])
    rows = torch.where(ok, rows, R)
    if row_assignment is None:
        src = torch.where(ok, rows, 0)
    else:
        src = torch.cat([row_assignment.long(), row_assignment.new_zeros(1).long()])[rows].clamp(min=0) // k
    return e, rows, src


def _expert_ranges(offsets: torch.Tensor) -> list[tuple[int, int, int]]:
    o = offsets.tolist()
    return [(e, o[e], o[e + 1]) for e in range(len(o) - 1) if o[e + 1] > o[e]]


def _sources(row_assignment: torch.Tensor | None, k: int, lo: int, hi: int) -> torch.Tensor | slice:
    return slice(lo, hi) if row_assignment is None else row_assignment[lo:hi].long() // k


def grouped_mm_torch(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    row_assignment: torch.Tensor | None = None,
    assignment_row: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch ``grouped_mm`` (same contract and schedule): one fp32 bmm over the M tiles, no host sync (each tile
    takes a copy of its expert's weight: ``(cdiv(R, 64) + E)·K·N`` floats)."""
    R = x.shape[0] if row_assignment is None else row_assignment.shape[0]
    k = 1 if assignment_row is None else assignment_row.shape[1]
    if host_loop_ok(x):
        out = torch.zeros(R, w.shape[2], dtype=torch.float32)
        for e, lo, hi in _expert_ranges(offsets):
            out[lo:hi] = x[_sources(row_assignment, k, lo, hi)].float() @ w[e].float()
        return out.to(x.dtype)
    e, rows, src = _tiles(offsets, row_assignment, k, R)
    x_rows = torch.cat([x.float(), x.new_zeros(1, x.shape[1]).float()])
    tiles = torch.bmm(x_rows[torch.where(rows < R, src, x.shape[0])], w.float()[e])
    out = torch.zeros(R + 1, w.shape[2], dtype=torch.float32, device=x.device)  # row R: discarded
    out.index_copy_(0, rows.reshape(-1), tiles.reshape(-1, w.shape[2]))
    return out[:R].to(x.dtype)


def grouped_mm_wgrad_torch(
    x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, row_assignment: torch.Tensor | None = None, k: int = 1
) -> torch.Tensor:
    """PyTorch ``grouped_mm_wgrad``: per M tile ``x_tileᵀ @ dy_tile`` in fp32, summed into its expert."""
    R, E = dy.shape[0], offsets.shape[0] - 1
    if host_loop_ok(x):
        dw = torch.zeros(E, x.shape[1], dy.shape[1], dtype=torch.float32)
        for e, lo, hi in _expert_ranges(offsets):
            dw[e] = x[_sources(row_assignment, k, lo, hi)].float().T @ dy[lo:hi].float()
        return dw.to(x.dtype)
    e, rows, src = _tiles(offsets, row_assignment, k, R)
    x_rows = torch.cat([x.float(), x.new_zeros(1, x.shape[1]).float()])
    dy_rows = torch.cat([dy.float(), dy.new_zeros(1, dy.shape[1]).float()])
    tiles = torch.bmm(x_rows[torch.where(rows < R, src, x.shape[0])].transpose(1, 2), dy_rows[rows])
    dw = torch.zeros(E, x.shape[1], dy.shape[1], dtype=torch.float32, device=x.device)
    return dw.index_add_(0, e, tiles).to(x.dtype)
