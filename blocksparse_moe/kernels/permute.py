"""Gather token rows into expert order and scatter them back with the top-k weights (deterministic, no atomics).

Design origin: MegaBlocks' gather/scatter (``padded_gather`` / ``padded_scatter``), restated over two index maps so
that one pair of kernels serves the unpadded (grouped) and the block-padded (block-sparse) layouts alike.

Glossary (T tokens, k choices per token, A = T·k assignments, R sorted rows, d features):

- ``row_assignment [R]`` int32: sorted row → assignment ``a`` (token ``a // k``, rank ``a % k``); ``-1`` for
  padding rows and invalid assignments.
- ``assignment_row [T, k]`` int32: assignment → sorted row; ``-1`` for invalid assignments.
- ``weights [T, k]`` (optional): top-k weights, any float dtype (fp32 router weights with bf16 activations).

Kernels and grids (sized from shapes, never from device data):

- ``gather_kernel``: ``out[i] = weights.flat[a] · x[a // k]`` (zero where ``a = -1``); grid
  ``(cdiv(R, BLOCK_ROWS), cdiv(d, BLOCK_D))``.
- ``scatter_kernel``: ``out[t] = Σ_j weights[t, j] · y[assignment_row[t, j]]`` over ``j = 0 .. k-1`` in order,
  skipping ``-1``, fp32 accumulation; grid ``(cdiv(T, BLOCK_ROWS), cdiv(d, BLOCK_D))``.
- ``weights_grad_kernel``: ``dw[t, j] = <a[t], b[assignment_row[t, j]]>`` (0 for ``-1``), fp32 accumulation;
  grid ``(cdiv(A, BLOCK_ROWS),)``. The gradient of the top-k weights in both ops: gather uses
  ``(a, b) = (x, dout)``, scatter ``(dout, y)``.

``gather_rows`` and ``scatter_rows`` are adjoint: each one's input gradient is the other with the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import check_grid_y, interpreting

__all__ = [
    "PermuteConfig",
    "permute_config",
    "gather",
    "scatter",
    "weights_grad",
    "gather_kernel",
    "scatter_kernel",
    "weights_grad_kernel",
]

# ----------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class PermuteConfig:
    """Rows (or assignments) × features per program, and warps."""

    block_rows: int
    block_d: int
    num_warps: int


# Under the interpreter: small tiles, so that tests cross several row and feature tiles.
_INTERPRET_CONFIG = PermuteConfig(block_rows=4, block_d=16, num_warps=4)


def permute_config() -> PermuteConfig:
    """The config every permute kernel uses: 4 rows × 512 features (16-byte vectors per thread at 8 warps on
    bf16); one config pinned when interpreting."""
    return _INTERPRET_CONFIG if interpreting() else PermuteConfig(block_rows=4, block_d=512, num_warps=8)


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def gather_kernel(
    x_ptr,  # [T, d]
    out_ptr,  # [R, d]
    row_assignment_ptr,  # [R] int32
    weights_ptr,  # [T, k] (unused unless HAS_WEIGHTS)
    R,
    d,
    top_k,
    stride_xt,
    stride_xd,
    stride_or,
    stride_od,
    stride_wt,
    stride_wj,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One BLOCK_ROWS × BLOCK_D tile of ``out``; rows whose assignment is -1 are zero."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < R
    col_ok = cols < d
    a = tl.load(row_assignment_ptr + rows, mask=row_ok, other=-1)
    valid = a >= 0
    a = tl.maximum(a, 0)
    t = (a // top_k).to(tl.int64)
    c64 = cols.to(tl.int64)
    x = tl.load(
        x_ptr + t[:, None] * stride_xt + c64[None, :] * stride_xd, mask=valid[:, None] & col_ok[None, :], other=0.0
    ).to(tl.float32)
    if HAS_WEIGHTS:
        j = (a % top_k).to(tl.int64)
        w = tl.load(weights_ptr + t * stride_wt + j * stride_wj, mask=valid, other=0.0).to(tl.float32)
        x = x * w[:, None]
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_or + c64[None, :] * stride_od
    tl.store(out, x.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def scatter_kernel(
    y_ptr,  # [R, d]
    out_ptr,  # [T, d]
    assignment_row_ptr,  # [T, k] int32
    weights_ptr,  # [T, k] (unused unless HAS_WEIGHTS)
    T,
    d,
    top_k,
    stride_yr,
    stride_yd,
    stride_ot,
    stride_od,
    stride_at,
    stride_aj,
    stride_wt,
    stride_wj,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One BLOCK_ROWS × BLOCK_D tile of ``out``: the k contributions summed in order j = 0 .. k-1."""
    tokens = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tok_ok = tokens < T
    col_ok = cols < d
    t64 = tokens.to(tl.int64)
    c64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_ROWS, BLOCK_D), dtype=tl.float32)
    for j in range(0, top_k):
        r = tl.load(assignment_row_ptr + t64 * stride_at + j * stride_aj, mask=tok_ok, other=-1)
        valid = r >= 0
        y = tl.load(
            y_ptr + tl.maximum(r, 0).to(tl.int64)[:, None] * stride_yr + c64[None, :] * stride_yd,
            mask=valid[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + t64 * stride_wt + j * stride_wj, mask=valid, other=0.0).to(tl.float32)
            y = y * w[:, None]
        acc += y
    out = out_ptr + t64[:, None] * stride_ot + c64[None, :] * stride_od
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tok_ok[:, None] & col_ok[None, :])


@triton.jit
def weights_grad_kernel(
    a_ptr,  # [T, d]
    b_ptr,  # [R, d]
    out_ptr,  # [T, k]
    assignment_row_ptr,  # [T, k] int32
    A,
    d,
    top_k,
    stride_at,
    stride_ad,
    stride_br,
    stride_bd,
    stride_ot,
    stride_oj,
    stride_rt,
    stride_rj,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``BLOCK_ROWS`` assignments: ``<a[t], b[assignment_row[t, j]]>`` over all d, fp32 accumulation."""
    asg = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    asg_ok = asg < A
    t = (asg // top_k).to(tl.int64)
    j = (asg % top_k).to(tl.int64)
    r = tl.load(assignment_row_ptr + t * stride_rt + j * stride_rj, mask=asg_ok, other=-1)
    valid = r >= 0
    r = tl.maximum(r, 0).to(tl.int64)
    acc = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = valid[:, None] & (cols < d)[None, :]
        c64 = cols.to(tl.int64)
        u = tl.load(a_ptr + t[:, None] * stride_at + c64[None, :] * stride_ad, mask=mask, other=0.0)
        v = tl.load(b_ptr + r[:, None] * stride_br + c64[None, :] * stride_bd, mask=mask, other=0.0)
        acc += tl.sum(u.to(tl.float32) * v.to(tl.float32), axis=1)
    tl.store(out_ptr + t * stride_ot + j * stride_oj, acc.to(out_ptr.dtype.element_ty), mask=asg_ok)


# ----------------------------------------------------------------------------------------------- launchers


def _grid_d(rows: int, d: int, cfg: PermuteConfig) -> tuple[int, int]:
    grid = (triton.cdiv(rows, cfg.block_rows), triton.cdiv(d, cfg.block_d))
    return check_grid_y(grid, "the feature size d", d, cfg.block_d)


def gather(
    x: torch.Tensor, row_assignment: torch.Tensor, top_k: int, weights: torch.Tensor | None, out: torch.Tensor
) -> None:
    """Launch ``gather_kernel``: ``out[i] = weights.flat[a] · x[a // top_k]``, ``a = row_assignment[i]`` (zero
    where -1); operands validated by the caller."""
    if out.numel() == 0:
        return
    cfg = permute_config()
    w = x if weights is None else weights  # a placeholder pointer when there are no weights
    gather_kernel[_grid_d(*out.shape, cfg)](
        x, out, row_assignment, w, out.shape[0], out.shape[1], top_k,
        *x.stride(), *out.stride(), *(w.stride() if weights is not None else (0, 0)),
        HAS_WEIGHTS=weights is not None, BLOCK_ROWS=cfg.block_rows, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
    )  # fmt: skip


def scatter(y: torch.Tensor, assignment_row: torch.Tensor, weights: torch.Tensor | None, out: torch.Tensor) -> None:
    """Launch ``scatter_kernel``: ``out[t] = Σ_j weights[t, j] · y[assignment_row[t, j]]`` (skipping -1, j in
    order); operands validated by the caller."""
    if out.numel() == 0:
        return
    cfg = permute_config()
    w = y if weights is None else weights
    scatter_kernel[_grid_d(*out.shape, cfg)](
        y, out, assignment_row, w, out.shape[0], out.shape[1], assignment_row.shape[1],
        *y.stride(), *out.stride(), *assignment_row.stride(), *(w.stride() if weights is not None else (0, 0)),
        HAS_WEIGHTS=weights is not None, BLOCK_ROWS=cfg.block_rows, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
    )  # fmt: skip


def weights_grad(a: torch.Tensor, b: torch.Tensor, assignment_row: torch.Tensor, out: torch.Tensor) -> None:
    """Launch ``weights_grad_kernel``: ``out[t, j] = <a[t], b[assignment_row[t, j]]>`` (0 where -1); operands
    validated by the caller."""
    if out.numel() == 0:
        return
    cfg = permute_config()
    weights_grad_kernel[(triton.cdiv(out.numel(), cfg.block_rows),)](
        a, b, out, assignment_row, out.numel(), a.shape[1], out.shape[1],
        *a.stride(), *b.stride(), *out.stride(), *assignment_row.stride(),
        BLOCK_ROWS=cfg.block_rows, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
    )  # fmt: skip
