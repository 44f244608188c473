"""Validation of every op's operands, once, before either backend runs (and in the fake impls, for their shapes).

Each ``*_shape`` function checks types, shapes, dtypes and devices and returns the output shape; errors name the
operand, the expected and the received value. Index *values* (offsets, row maps) are data: they are checked where
reading them is free, on CPU (the interpreter's out-of-bounds accesses would corrupt the host heap); on GPU the
kernels mask every access and never read or write out of bounds.
"""

from __future__ import annotations

import torch

from ..activations import check_name
from ..backends.common import MlpRouting
from ..config import FLOAT_DTYPES
from ..routing import INDEX_DTYPE, Topology
from ..validation import MAX_INDEX, check_float, check_same_device, check_sizes, check_tensor

__all__ = [
    "FLOAT_DTYPES",
    "MAX_INDEX",
    "check_tensor",
    "check_float",
    "check_index",
    "check_same_device",
    "check_out",
    "check_topology",
    "sdd_shape",
    "dsd_shape",
    "dsd_t_shape",
    "dds_shape",
    "dds_t_shape",
    "sdd_wgrad_shape",
    "grouped_mm_shape",
    "grouped_mm_wgrad_shape",
    "gather_rows_shape",
    "scatter_rows_shape",
    "weights_grad_shape",
    "expert_mlp_shape",
    "check_offsets",
    "check_row_maps",
]


def check_index(name: str, t: torch.Tensor) -> None:
    if t.dtype != INDEX_DTYPE:
        raise TypeError(f"{name} must be {INDEX_DTYPE}, got {t.dtype}")


def check_out(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """The optional ``out`` has the output's shape and dtype."""
    if out is not None:
        check_tensor("out", out, "the output", shape)
        if out.dtype != dtype:
            raise TypeError(f"out must have dtype {dtype}, got {out.dtype}")


def _same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    dtype = next(iter(dtypes.values()))
    if dtype not in FLOAT_DTYPES or len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{n} {d}" for n, d in dtypes.items())
        raise TypeError(f"expected operands of one dtype among {FLOAT_DTYPES}, got {listing}")
    return dtype


# ----------------------------------------------------------------------------------------------- block-sparse


def check_topology(topo: object) -> Topology:
    if not isinstance(topo, Topology):
        raise TypeError(f"topo must be a blocksparse_moe.routing.Topology, got {type(topo).__name__}")
    B, E, F = topo.block_size, topo.num_experts, topo.ffn_size
    if B < 1 or B & (B - 1):
        raise ValueError(f"topo.block_size must be a power of two, got {B}")
    if E < 1 or F < 1 or topo.max_block_rows < 0:
        raise ValueError(
            f"topo needs num_experts >= 1, ffn_size >= 1, max_block_rows >= 0, got {E}, {F}, {topo.max_block_rows}"
        )
    check_tensor("topo.padded_offsets", topo.padded_offsets, "[E+1]", (E + 1,))
    check_index("topo.padded_offsets", topo.padded_offsets)
    check_sizes(rows=topo.num_rows, nnz_max=topo.nnz_max)
    check_offsets(topo.padded_offsets, topo.num_rows, multiple=B, name="topo.padded_offsets")
    return topo


def _operands(topo: Topology, out: torch.Tensor | None, shape: tuple[int, ...], **tensors: torch.Tensor):
    dtype = _same_dtype(**tensors)
    check_same_device(**tensors, padded_offsets=topo.padded_offsets, out=out)
    check_out(out, shape, dtype)
    return shape


def _data(data: torch.Tensor, topo: Topology, name: str = "data") -> None:
    check_topology(topo)
    B = topo.block_size
    check_tensor(name, data, "[nnz_max, B, B]", (topo.nnz_max, B, B))


def sdd_shape(a: torch.Tensor, w: torch.Tensor, topo: Topology, out: torch.Tensor | None = None) -> tuple[int, ...]:
    check_topology(topo)
    check_tensor("a", a, "[P, K]", (topo.num_rows, None))
    check_tensor("w", w, "[E, K, F]", (topo.num_experts, a.shape[1], topo.ffn_size))
    B = topo.block_size
    return _operands(topo, out, (topo.nnz_max, B, B), a=a, w=w)


def sdd_wgrad_shape(
    a: torch.Tensor, data: torch.Tensor, topo: Topology, out: torch.Tensor | None = None
) -> tuple[int, ...]:
    _data(data, topo)
    check_tensor("a", a, "[P, K]", (topo.num_rows, None))
    return _operands(topo, out, (topo.num_experts, a.shape[1], topo.ffn_size), a=a, data=data)


def dsd_shape(data: torch.Tensor, topo: Topology, w: torch.Tensor, out: torch.Tensor | None = None) -> tuple[int, ...]:
    _data(data, topo)
    check_tensor("w", w, "[E, F, N]", (topo.num_experts, topo.ffn_size, None))
    return _operands(topo, out, (topo.num_rows, w.shape[2]), data=data, w=w)


def dsd_t_shape(
    data: torch.Tensor, topo: Topology, a: torch.Tensor, out: torch.Tensor | None = None
) -> tuple[int, ...]:
    _data(data, topo)
    check_tensor("a", a, "[P, N]", (topo.num_rows, None))
    return _operands(topo, out, (topo.num_experts, topo.ffn_size, a.shape[1]), data=data, a=a)


def dds_shape(a: torch.Tensor, data: torch.Tensor, topo: Topology, out: torch.Tensor | None = None) -> tuple[int, ...]:
    _data(data, topo)
    check_tensor("a", a, "[M, P]", (None, topo.num_rows))
    return _operands(topo, out, (a.shape[0], topo.num_experts, topo.ffn_size), a=a, data=data)


def dds_t_shape(
    g: torch.Tensor, data: torch.Tensor, topo: Topology, out: torch.Tensor | None = None
) -> tuple[int, ...]:
    _data(data, topo)
    check_tensor("g", g, "[M, E, F]", (None, topo.num_experts, topo.ffn_size))
    return _operands(topo, out, (g.shape[0], topo.num_rows), g=g, data=data)


# ----------------------------------------------------------------------------------------------- index values


def _readable(t: torch.Tensor) -> bool:
    """Index values are checked where reading them is free: plain CPU tensors (not the fake or functional tensors of
    ``torch.compile`` tracing, which hold no data)."""
    return type(t) is torch.Tensor and t.device.type == "cpu" and not torch.compiler.is_compiling()


def check_offsets(offsets: torch.Tensor, rows: int, multiple: int = 1, name: str = "offsets") -> None:
    """``offsets [E+1]`` rise from 0 to at most ``rows`` (in steps of ``multiple``)."""
    if not _readable(offsets):
        return
    o = offsets.long()
    if int(o[0]) != 0 or bool((o[1:] < o[:-1]).any()) or int(o[-1]) > rows or bool((o % multiple).any()):
        where = f" in multiples of {multiple}" if multiple > 1 else ""
        raise ValueError(f"{name} must rise from 0 to at most {rows}{where}, got {offsets.tolist()}")


def check_row_maps(
    row_assignment: torch.Tensor | None, assignment_row: torch.Tensor | None, rows: int, assignments: int
) -> None:
    """``row_assignment`` holds assignments in ``[-1, A)`` and ``assignment_row`` rows in ``[-1, R)``."""
    for name, t, bound, what in (
        ("row_assignment", row_assignment, assignments, "assignments"),
        ("assignment_row", assignment_row, rows, "rows"),
    ):
        if t is not None and _readable(t) and t.numel() and not bool(((t >= -1) & (t < bound)).all()):
            raise ValueError(f"{name} must hold {what} in [-1, {bound}), got values outside it")


# ----------------------------------------------------------------------------------------------- grouped


def _maps(row_assignment: torch.Tensor, assignment_row: torch.Tensor) -> None:
    check_tensor("row_assignment", row_assignment, "[R]", (None,))
    check_tensor("assignment_row", assignment_row, "[T, k]", (None, None))
    check_index("row_assignment", row_assignment)
    check_index("assignment_row", assignment_row)
    if assignment_row.shape[1] < 1:
        raise ValueError(f"assignment_row must have k >= 1 columns, got shape {tuple(assignment_row.shape)}")
    check_sizes(R=row_assignment.shape[0], assignments=assignment_row.numel())


def grouped_mm_shape(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    row_assignment: torch.Tensor | None = None,
    assignment_row: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[int, int]:
    """``grouped_mm``'s operands; returns ``(R, N)``."""
    if (row_assignment is None) != (assignment_row is None):
        raise ValueError(
            "row_assignment and assignment_row must be given together (fused gather) or both be None, got "
            f"row_assignment {'None' if row_assignment is None else 'a tensor'}, "
            f"assignment_row {'None' if assignment_row is None else 'a tensor'}"
        )
    check_tensor("offsets", offsets, "[E+1]", (None,))
    check_index("offsets", offsets)
    if offsets.shape[0] < 2:
        raise ValueError(f"offsets must have E+1 >= 2 entries, got shape {tuple(offsets.shape)}")
    E = offsets.shape[0] - 1
    if row_assignment is not None:
        _maps(row_assignment, assignment_row)
        check_tensor("x", x, "[T, K]", (assignment_row.shape[0], None))
        R = row_assignment.shape[0]
    else:
        check_tensor("x", x, "[R, K]", (None, None))
        R = x.shape[0]
    check_float("x", x)
    check_tensor("w", w, "[E, K, N]", (E, x.shape[1], None))
    if w.dtype != x.dtype:
        raise TypeError(f"w must have x's dtype {x.dtype}, got {w.dtype}")
    check_sizes(R=R, K=x.shape[1], N=w.shape[2])
    shape = (R, w.shape[2])
    check_out(out, shape, x.dtype)
    check_same_device(x=x, w=w, offsets=offsets, row_assignment=row_assignment, assignment_row=assignment_row, out=out)
    check_offsets(offsets, R)
    if row_assignment is not None:
        check_row_maps(row_assignment, assignment_row, R, assignment_row.numel())
    return shape


def grouped_mm_wgrad_shape(
    x: torch.Tensor,
    dy: torch.Tensor,
    offsets: torch.Tensor,
    row_assignment: torch.Tensor | None = None,
    k: int = 1,
    out: torch.Tensor | None = None,
) -> tuple[int, int, int]:
    """``grouped_mm_wgrad``'s operands; returns ``(E, K, N)``."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (choices per token) must be a positive int, got {k!r}")
    check_tensor("offsets", offsets, "[E+1]", (None,))
    check_index("offsets", offsets)
    if offsets.shape[0] < 2:
        raise ValueError(f"offsets must have E+1 >= 2 entries, got shape {tuple(offsets.shape)}")
    check_tensor("x", x, "[T or R, K]", (None, None))
    check_float("x", x)
    R = x.shape[0] if row_assignment is None else row_assignment.shape[0]
    if row_assignment is not None:
        check_tensor("row_assignment", row_assignment, "[R]", (None,))
        check_index("row_assignment", row_assignment)
    check_tensor("dy", dy, "[R, N]", (R, None))
    if dy.dtype != x.dtype:
        raise TypeError(f"dy must have x's dtype {x.dtype}, got {dy.dtype}")
    E = offsets.shape[0] - 1
    check_sizes(R=R, K=x.shape[1], N=dy.shape[1], E=E)
    shape = (E, x.shape[1], dy.shape[1])
    check_out(out, shape, x.dtype)
    check_same_device(x=x, dy=dy, offsets=offsets, row_assignment=row_assignment, out=out)
    check_offsets(offsets, R)
    if row_assignment is not None:
        check_row_maps(row_assignment, None, R, x.shape[0] * k)
    return shape


# ----------------------------------------------------------------------------------------------- permute


def _rows_shape(name, data, row_assignment, assignment_row, weights, out, gather: bool) -> tuple[int, int]:
    _maps(row_assignment, assignment_row)
    if weights is not None:
        check_tensor("weights", weights, "[T, k]", tuple(assignment_row.shape))
        check_float("weights", weights)
    T, R = assignment_row.shape[0], row_assignment.shape[0]
    rows, out_rows, dims = (T, R, "[T, d]") if gather else (R, T, "[R, d]")
    check_tensor(name, data, dims, (rows, None))
    check_float(name, data)
    shape = (out_rows, data.shape[1])
    check_out(out, shape, data.dtype)
    check_same_device(
        **{name: data}, row_assignment=row_assignment, assignment_row=assignment_row, weights=weights, out=out
    )
    check_row_maps(row_assignment, assignment_row, R, assignment_row.numel())
    return shape


def gather_rows_shape(x, row_assignment, assignment_row, weights=None, out=None) -> tuple[int, int]:
    """``gather_rows``'s operands; returns ``(R, d)``."""
    return _rows_shape("x", x, row_assignment, assignment_row, weights, out, gather=True)


def scatter_rows_shape(y, row_assignment, assignment_row, weights=None, out=None) -> tuple[int, int]:
    """``scatter_rows``'s operands; returns ``(T, d)``."""
    return _rows_shape("y", y, row_assignment, assignment_row, weights, out, gather=False)


def weights_grad_shape(a, b, assignment_row, dtype=None, out=None) -> tuple[int, int]:
    """``weights_grad``'s operands; returns ``(T, k)``."""
    check_tensor("assignment_row", assignment_row, "[T, k]", (None, None))
    check_index("assignment_row", assignment_row)
    check_tensor("a", a, "[T, d]", (assignment_row.shape[0], None))
    check_tensor("b", b, "[R, d]", (None, a.shape[1]))
    check_float("a", a)
    if b.dtype != a.dtype:
        raise TypeError(f"a and b must have one dtype, got a {a.dtype}, b {b.dtype}")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    shape = tuple(assignment_row.shape)
    check_out(out, shape, dtype or a.dtype)
    check_same_device(a=a, b=b, assignment_row=assignment_row, out=out)
    check_row_maps(None, assignment_row, b.shape[0], assignment_row.numel())
    return shape


# ----------------------------------------------------------------------------------------------- fused MLP


def check_mlp_routing(routing: object) -> MlpRouting:
    """An ``MlpRouting``: int32 offsets ``[E+1]``, row maps ``[R]``, ``assignment_row [T, k]``, a power-of-two
    block size dividing R; index values in range where reading them is free."""
    if not isinstance(routing, MlpRouting):
        raise TypeError(f"routing must be a blocksparse_moe.backends.common.MlpRouting, got {type(routing).__name__}")
    B = routing.block_size
    if isinstance(B, bool) or not isinstance(B, int) or B < 1 or B & (B - 1):
        raise ValueError(f"routing.block_size must be a power of two (1: unpadded rows), got {B!r}")
    check_tensor("routing.offsets", routing.offsets, "[E+1]", (None,))
    if routing.offsets.shape[0] < 2:
        raise ValueError(f"routing.offsets must have E+1 >= 2 entries, got shape {tuple(routing.offsets.shape)}")
    check_tensor("routing.row_src", routing.row_src, "[R]", (None,))
    R = routing.rows
    check_tensor("routing.row_asg", routing.row_asg, "[R]", (R,))
    check_tensor("routing.assignment_row", routing.assignment_row, "[T, k]", (None, None))
    for name in ("offsets", "row_src", "row_asg", "assignment_row"):
        check_index(f"routing.{name}", getattr(routing, name))
    if R % B:
        raise ValueError(f"routing's rows must be a multiple of its block size {B}, got {R}")
    T, k = routing.assignment_row.shape
    check_sizes(R=R, assignments=T * k)
    check_offsets(routing.offsets, R, multiple=B, name="routing.offsets")
    check_row_maps(routing.row_asg, routing.assignment_row, R, T * k)
    if _readable(routing.row_src) and R and not bool(((routing.row_src >= -1) & (routing.row_src < T)).all()):
        raise ValueError(f"routing.row_src must hold tokens in [-1, {T}), got values outside it")
    return routing


def expert_mlp_shape(
    x: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None,
    routing: MlpRouting,
    activation: str,
    prequantized: bool = False,
) -> tuple[int, int]:
    """``expert_mlp``'s operands (x ``[T, d]``, weights ``[T, k]``, w1 / w3 ``[E, d, f]``, w2 ``[E, f, d]``, T, k
    and E those of ``routing``; the weights in x's dtype, or E4M3 when ``prequantized``); returns ``(T, d)``."""
    check_mlp_routing(routing)
    check_name(activation)
    T, k = routing.assignment_row.shape
    E = routing.num_experts
    check_tensor("x", x, "[T, d]", (T, None))
    check_float("x", x)
    check_tensor("weights", weights, "[T, k]", (T, k))
    check_float("weights", weights)
    d = x.shape[1]
    check_tensor("w1", w1, "[E, d, f]", (E, d, None))
    f = w1.shape[2]
    if w3 is not None:
        check_tensor("w3", w3, "[E, d, f] (w1's shape)", (E, d, f))
    check_tensor("w2", w2, "[E, f, d]", (E, f, d))
    for name, w in (("w1", w1), ("w2", w2), ("w3", w3)):
        if w is not None and not prequantized and w.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {w.dtype}")
    check_sizes(T=T, d=d, f=f)
    check_same_device(
        x=x, weights=weights, w1=w1, w2=w2, w3=w3, offsets=routing.offsets, row_src=routing.row_src,
        row_asg=routing.row_asg, assignment_row=routing.assignment_row,
    )  # fmt: skip
    return (T, d)
