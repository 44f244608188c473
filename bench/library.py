"""The library's choice tables the bench CLIs check their flags against.

Read here, in one place, so that a table moving inside ``blocksparse_moe`` is one edit in ``bench``.
"""

from __future__ import annotations

from blocksparse_moe.options import BLOCK_SIZES, GPU_BLOCK_SIZES, IMPLS

__all__ = ["BLOCK_SIZES", "GPU_BLOCK_SIZES", "DROPLESS_IMPLS"]

# what expert parallelism runs on the local experts: every strategy but "padded" (its capacity is per rank)
DROPLESS_IMPLS = tuple(i for i in IMPLS if i != "padded")
