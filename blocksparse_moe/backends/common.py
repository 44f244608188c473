"""What both backends share: the routing data of the fused expert MLP, and the reduction of its top-k weight
gradient."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MlpRouting", "combine_dots"]


@dataclass(frozen=True)
class MlpRouting:
    """The routing of one fused expert-MLP call (``ops.mlp``), in the layout of its strategy.

    Rows are expert-sorted: the unpadded ones of the grouped strategy (``block_size == 0``: intermediates are dense
    ``[R, F]``) or the block-padded ones of the block-sparse strategy (``block_size = B``: intermediates are the
    blocks ``[R / B · nb, B, B]`` of the block-diagonal topology). All tensors int32 on one device.
    """

    offsets: torch.Tensor  # [E+1] expert row offsets (block-padded for block_size > 0)
    tile_offsets: torch.Tensor  # [E+1] prefix sum of ceil(rows of e / block_m), computed once per call
    row_src: torch.Tensor  # [R] token of each row, -1 for none (padding, invalid assignment)
    row_asg: torch.Tensor  # [R] assignment of each row, -1 for none
    assignment_row: torch.Tensor  # [T, k] row of each assignment, -1 for an invalid one
    block_size: int  # B of the blocked layout, 0 for dense rows
    block_m: int  # rows per M tile of the kernels (B for the blocked layout)

    @property
    def rows(self) -> int:
        return self.row_src.shape[0]

    def intermediate_shape(self, ffn_size: int) -> tuple[int, ...]:
        """Shape of ``h``, ``g`` and the other ``[rows, F]`` intermediates in this strategy's layout."""
        if self.block_size:
            B = self.block_size
            return (self.rows // B * -(-ffn_size // B), B, B)
        return (self.rows, ffn_size)


def combine_dots(dots: torch.Tensor, assignment_row: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``dweights[t, j] = Σ_tiles dots[tile, assignment_row[t, j]]`` (0 where the row is -1): the top-k weight
    gradient from the per-tile row dot products of the backward epilogue (a deterministic sum)."""
    per_row = torch.cat([dots.sum(0), dots.new_zeros(1)])
    rows = assignment_row.long()
    return per_row[torch.where(rows >= 0, rows, per_row.shape[0] - 1)].to(dtype)
