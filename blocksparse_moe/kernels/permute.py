"""Gather token rows into expert order and scatter them back with the top-k weights (deterministic, no atomics).

Design origin: MegaBlocks' gather/scatter (``padded_gather`` / ``padded_scatter``), restated over two index maps so
that one pair of kernels serves the unpadded (grouped) and the block-padded (block-sparse) layouts alike.

Glossary (T tokens, k choices per token, A = T·k assignments, R sorted rows, d features):

- ``row_assignment [R]`` int32: sorted row → assignment ``a`` (token ``a // k``, rank ``a % k``); ``-1`` for
  padding rows and invalid assignments.
- ``assignment_row [T, k]`` int32: assignment → sorted row; ``-1`` for invalid assignments.
- ``weights [T, k]`` (optional): top-k weights, any float dtype (fp32 router weights with bf16 activations).

Kernels and grids (sized from shapes, never from device data):

- ``_gather_kernel``: ``out[i] = weights.flat[a] · x[a // k]`` (zero where ``a = -1``); grid
  ``(cdiv(R, BLOCK_ROWS), cdiv(d, BLOCK_D))``.
- ``_scatter_kernel``: ``out[t] = Σ_j weights[t, j] · y[assignment_row[t, j]]`` over ``j = 0 .. k-1`` in order,
  skipping ``-1``, fp32 accumulation; grid ``(cdiv(T, BLOCK_ROWS), cdiv(d, BLOCK_D))``.
- ``_weights_grad_kernel``: ``dw[t, j] = <a[t], b[assignment_row[t, j]]>`` (0 for ``-1``), fp32 accumulation;
  grid ``(cdiv(A, BLOCK_ROWS),)``. The gradient of the top-k weights in both ops: gather uses
  ``(a, b) = (x, dout)``, scatter ``(dout, y)``.

``gather_rows`` and ``scatter_rows`` are adjoint: each one's input gradient is the other with the same weights.
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
    check_float,
    check_grid_y,
    check_index,
    check_out,
    check_same_device,
    check_sizes,
    check_tensor,
    copy_to_out,
    interpreting,
    kernel_signature,
    out_or_empty,
    triton_type,
)

__all__ = [
    "PermuteConfig",
    "permute_config",
    "compile_specs",
    "gather_rows",
    "scatter_rows",
    "weights_grad",
    "gather_rows_shape",
    "scatter_rows_shape",
    "weights_grad_shape",
    "gather_rows_torch",
    "scatter_rows_torch",
    "weights_grad_torch",
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
def _gather_kernel(
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
def _scatter_kernel(
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
def _weights_grad_kernel(
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


# ----------------------------------------------------------------------------------------------- compile audit

_INDEX_POINTERS = dict.fromkeys(("row_assignment_ptr", "assignment_row_ptr"), INDEX_DTYPE)


def _aligned(kernel) -> tuple[str, ...]:
    """The feature size d and the row strides of the [rows, d] operands: multiples of 16 for realistic d (the
    strides of the [T, k] weights and maps are k, not listed)."""
    rows = {_gather_kernel: ("stride_xt", "stride_or"), _scatter_kernel: ("stride_yr", "stride_ot")}
    return ("d", *rows.get(kernel, ("stride_at", "stride_br")))


def _spec(name: str, kernel, dtype: torch.dtype, weights_dtype: torch.dtype, constexprs: dict) -> CompileSpec:
    """Data pointers typed by ``dtype``, ``weights_ptr`` / ``out_ptr`` of the weight gradient by ``weights_dtype``,
    index pointers ``*i32``, ints ``i32``; unit feature strides specialised as the JIT does. One config serves
    aligned and unaligned operands (built in both variants)."""
    cfg = permute_config()
    unit = {s: 1 for s in kernel.arg_names if s.endswith("d") and s.startswith("stride_")}
    constexprs = {**constexprs, **unit, "BLOCK_ROWS": cfg.block_rows, "BLOCK_D": cfg.block_d}
    weights_pointers = ("weights_ptr", "out_ptr") if kernel is _weights_grad_kernel else ("weights_ptr",)
    pointer_dtypes = {**_INDEX_POINTERS, **dict.fromkeys(weights_pointers, weights_dtype)}
    signature = kernel_signature(kernel, constexprs, dtype, pointer_dtypes)
    return CompileSpec(
        name, kernel, signature, constexprs, cfg.num_warps, num_stages=1, is_matmul=False, aligned=_aligned(kernel)
    )


def compile_specs() -> list[CompileSpec]:
    """Every configuration the GPU path can pick: data dtype × weights (same dtype or fp32, or none)."""
    specs = []
    for dtype in DTYPES:
        for wdt in dict.fromkeys((dtype, torch.float32)):
            tag = f"{triton_type(dtype)},w={triton_type(wdt)}"
            for kernel, name in ((_gather_kernel, "gather_rows"), (_scatter_kernel, "scatter_rows")):
                specs.append(_spec(f"{name}[{tag}]", kernel, dtype, wdt, dict(HAS_WEIGHTS=True)))
            specs.append(_spec(f"weights_grad[{tag}]", _weights_grad_kernel, dtype, wdt, {}))
        for kernel, name in ((_gather_kernel, "gather_rows"), (_scatter_kernel, "scatter_rows")):
            specs.append(_spec(f"{name}[{triton_type(dtype)}]", kernel, dtype, dtype, dict(HAS_WEIGHTS=False)))
    return specs


# ----------------------------------------------------------------------------------------------- validation


def _check_maps(row_assignment: torch.Tensor, assignment_row: torch.Tensor, weights: torch.Tensor | None) -> None:
    """The two index maps (int32, 1-D and 2-D) and the optional weights ``[T, k]``."""
    check_tensor("row_assignment", row_assignment, "[R]", (None,))
    check_tensor("assignment_row", assignment_row, "[T, k]", (None, None))
    check_index("row_assignment", row_assignment)
    check_index("assignment_row", assignment_row)
    if assignment_row.shape[1] < 1:
        raise ValueError(f"assignment_row must have k >= 1 columns, got shape {tuple(assignment_row.shape)}")
    check_sizes(R=row_assignment.shape[0], assignments=assignment_row.numel())
    if weights is not None:
        check_tensor("weights", weights, "[T, k]", tuple(assignment_row.shape))
        check_float("weights", weights)


def _rows_shape(
    name: str,
    data: torch.Tensor,
    row_assignment: torch.Tensor,
    assignment_row: torch.Tensor,
    weights: torch.Tensor | None,
    out: torch.Tensor | None,
    gather: bool,
) -> tuple[int, int]:
    """The operands of a gather (``data [T, d]`` → ``[R, d]``) or a scatter (``data [R, d]`` → ``[T, d]``);
    returns the output shape."""
    _check_maps(row_assignment, assignment_row, weights)
    T, R = assignment_row.shape[0], row_assignment.shape[0]
    rows, out_rows, dims = (T, R, "[T, d]") if gather else (R, T, "[R, d]")
    check_tensor(name, data, dims, (rows, None))
    check_float(name, data)
    shape = (out_rows, data.shape[1])
    check_out(out, shape, data.dtype)
    maps = dict(row_assignment=row_assignment, assignment_row=assignment_row)
    check_same_device(**{name: data}, **maps, weights=weights, out=out)
    return shape


def gather_rows_shape(
    x: torch.Tensor,
    row_assignment: torch.Tensor,
    assignment_row: torch.Tensor,
    weights: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[int, int]:
    """Validate ``gather_rows``'s operands; returns the output shape ``(R, d)``."""
    return _rows_shape("x", x, row_assignment, assignment_row, weights, out, gather=True)


def scatter_rows_shape(
    y: torch.Tensor,
    row_assignment: torch.Tensor,
    assignment_row: torch.Tensor,
    weights: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[int, int]:
    """Validate ``scatter_rows``'s operands; returns the output shape ``(T, d)``."""
    return _rows_shape("y", y, row_assignment, assignment_row, weights, out, gather=False)


def weights_grad_shape(
    a: torch.Tensor,
    b: torch.Tensor,
    assignment_row: torch.Tensor,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> tuple[int, int]:
    """Validate ``weights_grad``'s operands; returns the output shape ``(T, k)``."""
    check_tensor("assignment_row", assignment_row, "[T, k]", (None, None))
    check_index("assignment_row", assignment_row)
    check_tensor("a", a, "[T, d]", (assignment_row.shape[0], None))
    check_tensor("b", b, "[R, d]", (None, a.shape[1]))
    check_float("a", a)
    if b.dtype != a.dtype:
        raise TypeError(f"a and b must have one dtype, got a {a.dtype}, b {b.dtype}")
    if dtype is not None and dtype not in DTYPES:
        raise TypeError(f"dtype must be one of {DTYPES}, got {dtype}")
    shape = tuple(assignment_row.shape)
    check_out(out, shape, dtype or a.dtype)
    check_same_device(a=a, b=b, assignment_row=assignment_row, out=out)
    return shape


def _check_index_values(row_assignment: torch.Tensor | None, assignment_row: torch.Tensor, R: int) -> None:
    """On CPU (free to read) the interpreter's out-of-bounds accesses corrupt the heap: check the index ranges."""
    if assignment_row.device.type != "cpu":
        return
    A = assignment_row.numel()
    if A and not bool(((assignment_row >= -1) & (assignment_row < R)).all()):
        raise ValueError(f"assignment_row must hold rows in [-1, {R}), got values outside that range")
    ra = row_assignment
    if ra is not None and ra.numel() and not bool(((ra >= -1) & (ra < A)).all()):
        raise ValueError(f"row_assignment must hold assignments in [-1, {A}), got values outside that range")


def _grid_d(rows: int, d: int, cfg: PermuteConfig) -> tuple[int, int]:
    grid = (triton.cdiv(rows, cfg.block_rows), triton.cdiv(d, cfg.block_d))
    return check_grid_y(grid, "the feature size d", d, cfg.block_d)


# ----------------------------------------------------------------------------------------------- launchers


def _launch_rows(
    data: torch.Tensor,
    row_assignment: torch.Tensor,
    assignment_row: torch.Tensor,
    weights: torch.Tensor | None,
    out: torch.Tensor | None,
    shape: tuple[int, int],
    gather: bool,
) -> torch.Tensor:
    """Run the gather (x → sorted rows) or scatter (sorted rows → tokens) kernel into ``out`` or a new tensor."""
    _check_index_values(row_assignment, assignment_row, row_assignment.shape[0])
    out = out_or_empty(out, shape, data)
    if out.numel() == 0:
        return out
    cfg = permute_config()
    w = data if weights is None else weights  # a placeholder pointer when there are no weights
    w_strides = w.stride() if weights is not None else (0, 0)
    if gather:  # reads each output row's assignment
        kernel, index, index_strides = _gather_kernel, row_assignment, ()
    else:  # reads each token's k rows
        kernel, index, index_strides = _scatter_kernel, assignment_row, assignment_row.stride()
    kernel[_grid_d(*shape, cfg)](
        data, out, index, w, shape[0], shape[1], assignment_row.shape[1],
        *data.stride(), *out.stride(), *index_strides, *w_strides,
        HAS_WEIGHTS=weights is not None, BLOCK_ROWS=cfg.block_rows, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
    )  # fmt: skip
    return out


def gather_rows(
    x: torch.Tensor,
    row_assignment: torch.Tensor,
    assignment_row: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[i] = weights.flat[a] · x[a // k]`` with ``a = row_assignment[i]`` (zero row where ``a = -1``):
    x ``[T, d]`` → ``[R, d]`` in x's dtype. ``weights=None`` means 1; ``out`` (optional) receives the result."""
    shape = gather_rows_shape(x, row_assignment, assignment_row, weights, out)
    if resolve_backend(x.device, backend) == "torch":
        return copy_to_out(gather_rows_torch(x, row_assignment, assignment_row, weights), out)
    return _launch_rows(x, row_assignment, assignment_row, weights, out, shape, gather=True)


def scatter_rows(
    y: torch.Tensor,
    row_assignment: torch.Tensor,
    assignment_row: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[t] = Σ_j weights[t, j] · y[assignment_row[t, j]]`` skipping ``-1``, j in order, fp32 accumulation:
    y ``[R, d]`` → ``[T, d]`` in y's dtype. Deterministic (no atomics). ``weights=None`` means 1."""
    shape = scatter_rows_shape(y, row_assignment, assignment_row, weights, out)
    if resolve_backend(y.device, backend) == "torch":
        return copy_to_out(scatter_rows_torch(y, row_assignment, assignment_row, weights), out)
    return _launch_rows(y, row_assignment, assignment_row, weights, out, shape, gather=False)


def weights_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    assignment_row: torch.Tensor,
    dtype: torch.dtype | None = None,
    *,
    backend: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dw[t, j] = <a[t], b[assignment_row[t, j]]>`` (0 where the row is ``-1``), fp32 accumulation:
    a ``[T, d]``, b ``[R, d]`` → ``[T, k]`` in ``dtype`` (default a's). The top-k weights' gradient."""
    dtype = dtype or a.dtype
    shape = weights_grad_shape(a, b, assignment_row, dtype, out)
    if resolve_backend(a.device, backend) == "torch":
        return copy_to_out(weights_grad_torch(a, b, assignment_row, dtype), out)
    _check_index_values(None, assignment_row, b.shape[0])
    out = out_or_empty(out, shape, a, dtype)
    if out.numel() == 0:
        return out
    cfg = permute_config()
    _weights_grad_kernel[(triton.cdiv(out.numel(), cfg.block_rows),)](
        a, b, out, assignment_row, out.numel(), a.shape[1], shape[1],
        *a.stride(), *b.stride(), *out.stride(), *assignment_row.stride(),
        BLOCK_ROWS=cfg.block_rows, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------- torch


def gather_rows_torch(
    x: torch.Tensor, row_assignment: torch.Tensor, assignment_row: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """PyTorch ``gather_rows`` (same contract): index_select with a zero row appended for ``a = -1``."""
    T, k = assignment_row.shape
    a = row_assignment.long()
    valid = a >= 0
    rows = _with_zero_row(x).index_select(0, torch.where(valid, a // k, T))
    if weights is not None:
        w = torch.cat([weights.float().reshape(-1), weights.new_zeros(1).float()])
        rows = rows * w.index_select(0, torch.where(valid, a, T * k))[:, None]
    return rows.to(x.dtype)


def _with_zero_row(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 with a zero row appended (the target of index -1)."""
    return torch.cat([t.float(), t.new_zeros(1, t.shape[1]).float()])


def _rows_of_assignments(b: torch.Tensor, assignment_row: torch.Tensor) -> torch.Tensor:
    """fp32 ``[T, k, d]``: row ``assignment_row[t, j]`` of b, zero where it is -1."""
    r = assignment_row.long()
    idx = torch.where(r >= 0, r, b.shape[0]).reshape(-1)
    return _with_zero_row(b).index_select(0, idx).view(*r.shape, b.shape[1])


def scatter_rows_torch(
    y: torch.Tensor, row_assignment: torch.Tensor, assignment_row: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """PyTorch ``scatter_rows``: gather the k rows of each token, weight, sum over j in fp32."""
    rows = _rows_of_assignments(y, assignment_row)
    if weights is not None:
        rows = rows * weights.float()[..., None]
    return rows.sum(1).to(y.dtype)


def weights_grad_torch(
    a: torch.Tensor, b: torch.Tensor, assignment_row: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """PyTorch ``weights_grad``: ``<a[t], b[assignment_row[t, j]]>`` in fp32, zero where the row is -1."""
    return (_rows_of_assignments(b, assignment_row) * a.float()[:, None, :]).sum(-1).to(dtype or a.dtype)
