"""The strategies ``moe_mlp`` runs (``impl=``), one module each, below the front door (``functional``):

- ``dropless``: ``grouped``, ``blocksparse`` (MegaBlocks) and ``grouped_custom`` (``custom_moe_mlp``): plan the
  routing, run the experts on the plan's expert-sorted rows, combine per token;
- ``padded``: the GShard capacity baseline (``padded_capacity``, ``padded_slots``, ``padded``), which ``parallel``
  also uses for its per-rank capacity;
- ``common``: what they share (``autocast_operands``, ``combine_dtype``, ``activate_then``);
- ``fp8``: the FP8 GEMMs (emulated) of the paths that compose ops: the padded ``bmm``, ``grouped_mm``.

The ``"reference"`` strategy is ``reference.expert_loop_moe_mlp``.
"""

from .common import activate_then, autocast_operands, combine_dtype
from .dropless import blocksparse, combine, default_block_size, grouped, grouped_custom
from .padded import padded, padded_capacity, padded_slots

__all__ = [
    "activate_then",
    "autocast_operands",
    "combine_dtype",
    "blocksparse",
    "combine",
    "default_block_size",
    "grouped",
    "grouped_custom",
    "padded",
    "padded_capacity",
    "padded_slots",
]
