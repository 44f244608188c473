"""The dropless strategies: every assignment is computed, in the rows of a routing plan's expert-sorted layout.

Each strategy is the same pipeline: plan the routing (``plan_routing``: the unpadded layout for ``block_size = 1``,
else the block-padded one), apply each token's experts to its rows of that layout, and combine them back per token,
``out[t] = Σ_j weights[t, j] · y[row(t, j)]``. Each returns ``(out, plan)``.

- ``grouped``: unpadded rows; a named activation runs the fused expert MLP (``ops.mlp``: the activation in the
  up-projection's epilogue, the top-k weight gradient in the backward epilogue, nothing but x, h, g saved); a
  callable one runs op by op (``grouped_mm`` with the gather fused, the activation, ``grouped_mm``, ``combine``).
- ``blocksparse`` (MegaBlocks): block-padded rows; the fused expert MLP (SDD with the GLU pair and the activation in
  its epilogue, then DSD) for a named activation; otherwise gather, ``sdd``, the activation on the blocks, ``dsd``,
  ``combine``.
- ``grouped_custom``: unpadded rows, a row-wise ``activation`` (it sees whole rows, which the block layout does not
  give it) and optional biases and post-expert map (``functional.custom_moe_mlp``).

Ids were checked (or deliberately not) by the caller; invalid ones have no row and contribute zero. ``weights`` are
the combine weights, already in ``common.combine_dtype(x.dtype)``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from ..activations import Activation
from ..ops.blocksparse import dsd, sdd
from ..ops.grouped import grouped_mm
from ..ops.mlp import expert_mlp, mlp_routing
from ..ops.permute import gather_rows, scatter_rows
from ..routing import RoutingPlan, plan_routing
from . import fp8 as fp8_gemms
from .common import activate_then

__all__ = ["grouped", "blocksparse", "grouped_custom", "combine", "default_block_size"]


def default_block_size(device: torch.device) -> int:
    """``blocksparse``'s block size when none is given: 128 on CUDA, 64 elsewhere."""
    return 128 if device.type == "cuda" else 64


def combine(y: torch.Tensor, plan: RoutingPlan, weights: torch.Tensor, backend: str) -> torch.Tensor:
    """``out[t] = Σ_j weights[t, j] · y[row(t, j)]`` for expert-output rows ``y`` in the plan's layout (unpadded for
    ``block_size = 1``, else block-padded), deterministic."""
    if plan.block_size == 1:
        return scatter_rows(y, plan.row_assignment, plan.assignment_row, weights, backend=backend)
    return scatter_rows(y, plan.padded_row_assignment, plan.padded_assignment_row, weights, backend=backend)


def _grouped_mm(
    backend: str, fp8: str | None, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None
) -> Callable[..., torch.Tensor]:
    """``grouped_mm(x, w, offsets, row_assignment, assignment_row)`` on ``backend``, FP8 with an ``fp8`` recipe
    (``x_fp8``: x's E4M3 copy, ``strategies.fp8.quantize_operand``, kept for backward instead of x)."""
    if fp8 is None:
        return partial(grouped_mm, backend=backend)
    return partial(fp8_gemms.grouped_mm, backend=backend, fp8=fp8, x_fp8=x_fp8)


def _up_mm(x: torch.Tensor, backend: str, fp8: str | None, fp8_cache_x: bool) -> Callable[..., torch.Tensor]:
    """``_grouped_mm`` for the up-projections of x: with ``fp8`` and ``fp8_cache_x`` they share one E4M3 copy of x,
    kept for backward instead of x (``MoEOptions.fp8_cache_x``)."""
    cached = fp8 is not None and fp8_cache_x
    return _grouped_mm(backend, fp8, fp8_gemms.quantize_operand(x, fp8, backend) if cached else None)


def grouped(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None,
    *,
    activation: str | Activation,
    recompute: bool,
    backend: str,
    fp8: str | None = None,
    weight_scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    fp8_cache_x: bool = True,
) -> tuple[torch.Tensor, RoutingPlan]:
    """Unpadded sorted rows: the fused expert MLP for a named activation; otherwise fused-gather ``grouped_mm``
    with w1 (and w3), the activation, ``grouped_mm`` with w2, combine. With an ``fp8`` recipe every GEMM is FP8
    (the fused MLP: ``backends.triton_fp8`` / ``backends.torch_fp8``; op by op: ``strategies.fp8``, emulated).
    ``weight_scales``: prequantized E4M3 weights (the fused MLP only); ``fp8_cache_x``: keep the E4M3 x for backward,
    or x (``MoEOptions.fp8_cache_x``)."""
    plan = plan_routing(top_k_index, w1.shape[0], block_size=1, check=False)
    if isinstance(activation, str):
        routing = mlp_routing(plan)
        return expert_mlp(x, weights, w1, w2, w3, routing, activation, backend, fp8, weight_scales, fp8_cache_x), plan
    rows, inv = plan.row_assignment, plan.assignment_row
    up, mm = _up_mm(x, backend, fp8, fp8_cache_x), _grouped_mm(backend, fp8)
    h = up(x, w1, plan.offsets, rows, inv)
    g = None if w3 is None else up(x, w3, plan.offsets, rows, inv)
    y = activate_then(lambda a: mm(a, w2, plan.offsets, None, None), activation, h, g, recompute)
    return combine(y, plan, weights, backend), plan


def blocksparse(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None,
    *,
    activation: str | Activation,
    block_size: int,
    recompute: bool,
    backend: str,
    fp8: str | None = None,
    weight_scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    fp8_cache_x: bool = True,
) -> tuple[torch.Tensor, RoutingPlan]:
    """Block-padded sorted rows (block size ``block_size``, the topology of ``w1``'s width): the fused expert MLP
    for a named activation (MegaBlocks' SDD with the GLU pair and the activation in its epilogue, then DSD; FP8
    GEMMs with an ``fp8`` recipe; ``weight_scales``: prequantized E4M3 weights; ``fp8_cache_x`` as in ``grouped``);
    otherwise gather, ``sdd`` with w1
    (and w3), the activation on the blocks, ``dsd`` with w2, combine (no ``fp8``)."""
    plan = plan_routing(top_k_index, w1.shape[0], block_size=block_size, check=False)
    if isinstance(activation, str):
        routing = mlp_routing(plan)
        return expert_mlp(x, weights, w1, w2, w3, routing, activation, backend, fp8, weight_scales, fp8_cache_x), plan
    topo = plan.topology(w1.shape[2])
    xs = gather_rows(x, plan.padded_row_assignment, plan.padded_assignment_row, backend=backend)
    h = sdd(xs, w1, topo, backend=backend)
    g = None if w3 is None else sdd(xs, w3, topo, backend=backend)
    y = activate_then(lambda a: dsd(a, topo, w2, backend=backend), activation, h, g, recompute)
    return combine(y, plan, weights, backend), plan


def grouped_custom(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    weights: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    *,
    activation: Callable[[torch.Tensor], torch.Tensor],
    up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    post: Callable[[torch.Tensor], torch.Tensor] | None,
    backend: str,
    fp8: str | None = None,
    fp8_cache_x: bool = True,
) -> tuple[torch.Tensor, RoutingPlan]:
    """Unpadded sorted rows: ``post(activation(x @ up[e] + up_bias[e]) @ down[e] + down_bias[e])`` with a row-wise
    ``activation``, combine; the two GEMMs in FP8 with an ``fp8`` recipe (``strategies.fp8``; ``fp8_cache_x``: the
    up-projection keeps x's E4M3 copy for backward, or x)."""
    plan = plan_routing(top_k_index, up.shape[0], block_size=1, check=False)
    if up_bias is not None or down_bias is not None:  # expert of each sorted row (rows past offsets[E]: clamped)
        rows = torch.arange(plan.row_assignment.numel(), device=x.device, dtype=plan.offsets.dtype)
        row_expert = torch.searchsorted(plan.offsets[1:], rows, right=True).clamp(max=up.shape[0] - 1)
    mm = _grouped_mm(backend, fp8)
    h = _up_mm(x, backend, fp8, fp8_cache_x)(x, up, plan.offsets, plan.row_assignment, plan.assignment_row)
    if up_bias is not None:
        h = h + up_bias[row_expert]
    a = activation(h)
    _check_rows("activation", h, a, down.shape[1], "down's rows h")
    y = mm(a.to(x.dtype), down, plan.offsets, None, None)
    if down_bias is not None:
        y = y + down_bias[row_expert]
    if post is not None:
        y, before = post(y), y
        _check_rows("post", before, y, x.shape[1], "the hidden size d")
    return combine(y, plan, weights, backend), plan


def _check_rows(name: str, rows: torch.Tensor, result: object, width: int, what: str) -> None:
    """A user map of rows ``[R, *]`` returned a tensor ``[R, width]``; otherwise a ``ValueError`` naming it."""
    shape = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
    if not isinstance(result, torch.Tensor) or result.dim() != 2 or result.shape != (rows.shape[0], width):
        raise ValueError(
            f"{name} must map rows [R, {rows.shape[1]}] to [R, {width}] ({what}), got {tuple(rows.shape)} -> {shape}"
        )
