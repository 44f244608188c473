"""What both backends share: the contract they implement (``Backend``, a ``typing.Protocol``, and ``OPS``, its
method names), the routing data of the fused expert MLP (``MlpRouting``) and the reduction of its top-k weight
gradient."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..routing import Topology

__all__ = ["Backend", "OPS", "MLP_OPS", "MlpRouting", "combine_dots"]

Tensor = torch.Tensor


@dataclass(frozen=True)
class MlpRouting:
    """The row layout of one fused expert-MLP call (``ops.mlp``): expert-sorted rows, the unpadded ones of the
    grouped strategy (``block_size == 1``, as ``RoutingPlan``: intermediates are dense ``[R, F]``) or the
    block-padded ones of the block-sparse strategy (``block_size = B > 1``: intermediates are the blocks
    ``[R / B · nb, B, B]`` of the block-diagonal topology). All tensors int32 on one device. How a backend tiles
    these rows is its own choice (``backends.triton``)."""

    offsets: torch.Tensor  # [E+1] expert row offsets (block-padded for block_size > 1)
    row_src: torch.Tensor  # [R] token of each row, -1 for none (padding, invalid assignment)
    row_asg: torch.Tensor  # [R] assignment of each row, -1 for none
    assignment_row: torch.Tensor  # [T, k] row of each assignment, -1 for an invalid one
    block_size: int  # B of the blocked layout, 1 for unpadded rows

    @property
    def rows(self) -> int:
        return self.row_src.shape[0]

    @property
    def num_experts(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def blocked(self) -> bool:
        """Block-padded rows and blocked intermediates (the block-sparse strategy)."""
        return self.block_size > 1

    def intermediate_shape(self, ffn_size: int) -> tuple[int, ...]:
        """Shape of ``h``, ``g`` and the other ``[rows, F]`` intermediates in this strategy's layout."""
        if self.blocked:
            B = self.block_size
            return (self.rows // B * -(-ffn_size // B), B, B)
        return (self.rows, ffn_size)


class Backend(Protocol):
    """The op contract every backend module implements (``backends.triton``, ``backends.torch``), one function per
    op of ``ops/`` (the fused MLP as its forward and backward). Operands arrive validated (``ops._checks``);
    ``out``, where taken, receives the result. ``fp8`` (the fused MLP): None, or a recipe of ``fp8.RECIPES`` whose
    FP8 GEMMs run instead (``backends.torch_fp8``); ``scales`` (``mlp_forward``): w1, w2, w3 are prequantized E4M3
    weights with these scales (``fp8.prequantize``), read instead of quantizing them."""

    def sdd(self, a: Tensor, w: Tensor, topo: Topology, out: Tensor | None = None) -> Tensor: ...

    def sdd_wgrad(self, a: Tensor, data: Tensor, topo: Topology, out: Tensor | None = None) -> Tensor: ...

    def dsd(self, data: Tensor, topo: Topology, w: Tensor, out: Tensor | None = None) -> Tensor: ...

    def dsd_t(self, data: Tensor, topo: Topology, a: Tensor, out: Tensor | None = None) -> Tensor: ...

    def dds(self, a: Tensor, data: Tensor, topo: Topology, out: Tensor | None = None) -> Tensor: ...

    def dds_t(self, g: Tensor, data: Tensor, topo: Topology, out: Tensor | None = None) -> Tensor: ...

    def grouped_mm(
        self, x: Tensor, w: Tensor, offsets: Tensor, row_src: Tensor | None = None, out: Tensor | None = None
    ) -> Tensor: ...

    def grouped_mm_wgrad(
        self, x: Tensor, dy: Tensor, offsets: Tensor, row_src: Tensor | None = None, out: Tensor | None = None
    ) -> Tensor: ...

    def gather_rows(
        self,
        x: Tensor,
        row_assignment: Tensor,
        assignment_row: Tensor,
        weights: Tensor | None = None,
        out: Tensor | None = None,
    ) -> Tensor: ...

    def scatter_rows(
        self,
        y: Tensor,
        row_assignment: Tensor,
        assignment_row: Tensor,
        weights: Tensor | None = None,
        out: Tensor | None = None,
    ) -> Tensor: ...

    def weights_grad(
        self,
        a: Tensor,
        b: Tensor,
        assignment_row: Tensor,
        dtype: torch.dtype | None = None,
        out: Tensor | None = None,
    ) -> Tensor: ...

    def mlp_forward(
        self,
        x: Tensor,
        weights: Tensor,
        w1: Tensor,
        w2: Tensor,
        w3: Tensor | None,
        routing: MlpRouting,
        activation: str,
        fp8: str | None = None,
        scales: tuple[Tensor, Tensor, Tensor | None] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None, tuple[Tensor, Tensor] | None]: ...

    def mlp_backward(
        self,
        dout: Tensor,
        x: Tensor,
        weights: Tensor,
        w1: Tensor,
        w2: Tensor,
        w3: Tensor | None,
        h: Tensor,
        g: Tensor | None,
        routing: MlpRouting,
        activation: str,
        needs: tuple[bool, bool, bool, bool, bool],
        fp8: str | None = None,
        x_scale: Tensor | None = None,
    ) -> tuple[Tensor | None, ...]: ...


OPS: tuple[str, ...] = tuple(name for name in vars(Backend) if not name.startswith("_"))  # in declaration order
MLP_OPS = ("mlp_forward", "mlp_backward")  # the two halves of the one public op ``ops.mlp.expert_mlp``


def combine_dots(dots: torch.Tensor, assignment_row: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``dweights[t, j] = Σ_tiles dots[tile, assignment_row[t, j]]`` (0 where the row is -1): the top-k weight
    gradient from the per-tile row dot products of the backward epilogue (a deterministic sum)."""
    per_row = torch.cat([dots.sum(0), dots.new_zeros(1)])
    rows = assignment_row.long()
    return per_row[torch.where(rows >= 0, rows, per_row.shape[0] - 1)].to(dtype)
