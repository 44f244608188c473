"""Row layouts and the tile schedule of the expert GEMMs (``expert_gemm``): where each row-indexed element lives,
and which expert's rows each M tile of ``gemm_kernel`` covers. Host descriptions (``Rows``, ``Schedule``) and the
device address helpers the kernels share.

**Row layouts.** The MoE intermediates live in *expert-sorted rows*: rows ``offsets[e] .. offsets[e+1]`` belong to
expert e (``routing.RoutingPlan``: the unpadded offsets for the grouped strategy, the block-padded ones for the
block-sparse strategy). A row-indexed operand is read in one of three ways:

- *gathered*: row p is row ``row_src[p]`` of a token-ordered ``[T, K]`` tensor (-1: a zero row);
- *dense*: a ``[R, K]`` matrix with arbitrary strides;
- *blocked*: the blocks ``[nnz_max, B, B]`` of the block-diagonal topology (``routing.Topology``): block row r holds
  the ``nb`` blocks ``r·nb .. r·nb + nb - 1`` of its expert, so element (p, k) sits in slot ``(p >> LB)·nb +
  (k >> LB)`` at ``((p & (B-1)), (k & (B-1)))``, ``LB = log2 B``.

Dense and blocked layouts are one formula with four strides (row block, row, column block, column) and the
constexpr ``LB``: ``(p >> LB)·s_rb + (p & (B-1))·s_r + (k >> LB)·s_cb + (k & (B-1))·s_c``, where a dense
matrix has ``s_rb = B·s_r`` and ``s_cb = B·s_c``.

**Tile schedule** (no host sync): ``tile_offsets [E+1]`` = prefix sum of ``ceil(n_e / BLOCK_M)`` (for blocked
layouts, ``BLOCK_M = B`` and ``tile_offsets = padded_offsets / B``) and the tile -> expert map ``tile_expert
[max_m_tiles]`` (``searchsorted``), both computed on the device and sized from shape bounds. M tile m belongs to
expert ``tile_expert[m]``, the largest e with ``tile_offsets[e] <= m`` (an empty expert owns no tile); tiles past
``tile_offsets[E]`` map to E and write zeros over the rows ``≥ offsets[E]`` (padding rows, invalid assignments).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = [
    "DENSE_LOG_BLOCK",
    "BLOCK_SIZES",
    "GPU_BLOCK_SIZES",
    "Rows",
    "Schedule",
    "row_offsets",
    "row_start",
    "tile_start",
]

DENSE_LOG_BLOCK = 7  # dense layouts are described with blocks of 128 rows / columns: every tile size divides it
# Block sizes of blocked layouts: powers of two from the smallest tile (16, tl.dot's minimum) to the largest (128);
# 16 and 32 keep interpreter tests small. On a GPU the Triton backend takes GPU_BLOCK_SIZES only (a wgmma / tcgen05
# tile, the configs bench.audit builds): a 16- or 32-row block bounds its tiles to mma.sync (backends.triton).
BLOCK_SIZES = (16, 32, 64, 128)
GPU_BLOCK_SIZES = tuple(b for b in BLOCK_SIZES if b >= 64)


@dataclass(frozen=True)
class Rows:
    """A row-indexed operand or result: ``tensor`` read as ``[rows, cols]`` in a row layout (module docstring).

    ``strides``: (row block, row, column block, column) in elements; ``log_block``: LB; ``block``: B of a blocked
    layout (None: dense); ``gathered``: row p is row ``row_src[p]`` of the ``[T, cols]`` ``tensor``."""

    tensor: torch.Tensor
    rows: int
    cols: int
    strides: tuple[int, int, int, int]
    log_block: int
    block: int | None = None
    gathered: bool = False

    @classmethod
    def dense(cls, t: torch.Tensor, gathered: bool = False) -> Rows:
        """A ``[rows, cols]`` matrix with any strides (``gathered``: the token rows ``row_src`` points into)."""
        s0, s1 = t.stride()
        b = 1 << DENSE_LOG_BLOCK
        return cls(t, t.shape[0], t.shape[1], (b * s0, s0, b * s1, s1), DENSE_LOG_BLOCK, None, gathered)

    @classmethod
    def blocked(cls, data: torch.Tensor, blocks_per_expert: int, cols: int) -> Rows:
        """Block data ``[max_block_rows·nb, B, B]`` of the block-diagonal topology, read as ``[max_block_rows·B,
        cols]`` (``cols = F``; the columns of the last block past F are padding)."""
        sb, si, sj = data.stride()
        B = data.shape[1]
        rows = data.shape[0] // blocks_per_expert * B if blocks_per_expert else 0
        return cls(data, rows, cols, (blocks_per_expert * sb, si, sb, sj), B.bit_length() - 1, B)

    @property
    def padded_cols(self) -> int:
        """Columns a result in this layout is written over: ``cols``, or all columns of the last block."""
        return self.cols if self.block is None else -(-self.cols // self.block) * self.block


@dataclass(frozen=True)
class Schedule:
    """The M tiles of ``gemm_kernel`` over expert-sorted rows: expert e's rows ``offsets[e] .. offsets[e+1]`` in
    tiles of ``block_m``; ``tile_offsets`` their prefix sum, ``tile_expert`` the expert of each tile (E: a tile
    zeroing rows past ``offsets[E]``), both on the device; ``max_m_tiles`` the bound the grid and the map are sized
    from."""

    offsets: torch.Tensor  # [E+1] int32
    tile_offsets: torch.Tensor  # [E+1] int32
    tile_expert: torch.Tensor  # [max_m_tiles] int32 in [0, E]
    block_m: int
    max_m_tiles: int

    @classmethod
    def build(cls, offsets: torch.Tensor, rows: int, block_m: int, *, padded: bool = False) -> Schedule:
        """The schedule of ``rows`` expert-sorted rows. ``padded``: every expert's row count is a multiple of
        ``block_m`` (block-padded offsets), so the tiles are ``offsets / block_m`` exactly. No host sync."""
        if padded:
            tile_offsets = offsets // block_m
        else:
            tiles = (offsets[1:] - offsets[:-1] + block_m - 1) // block_m
            tile_offsets = torch.cat([offsets.new_zeros(1), tiles.cumsum(0).to(offsets.dtype)])
        max_m_tiles = cls.max_tiles(rows, offsets.shape[0] - 1, block_m, padded)
        tiles = torch.arange(max_m_tiles, dtype=offsets.dtype, device=offsets.device)
        # the number of e in 1..E with tile_offsets[e] <= m: the largest such e, as tile_offsets[0] = 0 <= m
        tile_expert = torch.searchsorted(tile_offsets[1:], tiles, right=True, out_int32=True)
        return cls(offsets, tile_offsets, tile_expert, block_m, max_m_tiles)

    @staticmethod
    def max_tiles(rows: int, num_experts: int, block_m: int, padded: bool) -> int:
        """The grid's bound of M tiles: ``rows / block_m`` for block-padded rows; otherwise ``Σ_e ceil(n_e / m) ≤
        cdiv(R, m) + E`` tiles of rows plus those zeroing the rows ``≥ offsets[E]``, each with at least one row."""
        if padded:
            return rows // block_m
        return min(triton.cdiv(rows, block_m) + num_experts, rows)


# ----------------------------------------------------------------------------------------------- device helpers


@triton.jit
def row_offsets(p, s_rb, s_r, LB: tl.constexpr):
    """Row part of a row-layout address (int64) for a vector of rows ``p``: ``(p >> LB)·s_rb + (p & (2^LB - 1))·s_r``
    (computed once per tile, outside the main loop)."""
    p64 = p.to(tl.int64)
    return (p64 >> LB) * s_rb + (p64 & ((1 << LB) - 1)) * s_r


@triton.jit
def row_start(r, s_rb, s_r, LB: tl.constexpr):
    """Row part (int64) of a row-layout address at a scalar row ``r``: ``(r >> LB)·s_rb + (r & (2^LB - 1))·s_r``."""
    r64 = tl.cast(r, tl.int64)
    return (r64 >> LB) * s_rb + (r64 & ((1 << LB) - 1)) * s_r


@triton.jit
def tile_start(i, s_blk, s, BLOCK: tl.constexpr, LB: tl.constexpr):
    """Offset (int64) of tile ``i`` of ``BLOCK`` consecutive indices along a row-layout dimension with blocks of
    ``2^LB`` (``BLOCK`` divides ``2^LB``, so a tile never straddles a layout block; or, in a dense layout, whose
    blocks follow each other (``s_blk = 2^LB · s``), a multiple of it: the swapped tiles' 256 columns). Written with
    ``//`` and ``%`` by the constexpr tiles per block and products of strides, so that the compiler proves the tile's
    alignment (vector loads, asynchronous copies): shifts and masks would hide it."""
    i64 = tl.cast(i, tl.int64)
    if BLOCK > (1 << LB):  # whole blocks per tile (dense layouts only: blocked ones clamp their tiles to the block)
        start = i64 * (BLOCK >> LB) * s_blk
    else:
        SUB: tl.constexpr = (1 << LB) // BLOCK
        start = (i64 // SUB) * s_blk + (i64 % SUB) * (BLOCK * s)
    return start
