"""Scale-out over torch.distributed.

``expert_parallel(layer, mesh)`` spreads a ``dMoE`` / ``PaddedMoE``'s experts over a 1-D ``DeviceMesh`` (weights
become DTensors ``Shard(0)``) or a process group (plain shards), exchanging rows with ``all_to_all_single``;
``parallelize_moe(model, mesh)`` composes it with FSDP2 on a ``("dp_shard", "ep")`` mesh;
``save_checkpoint`` / ``load_checkpoint`` write and read DCP checkpoints that reload at any layout;
``expert_parallel_moe_mlp`` is the functional form; ``shard_experts`` / ``gather_experts`` convert single-device
checkpoints for non-DCP users.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .expert_parallel import expert_parallel, expert_parallel_moe_mlp, gather_experts, shard_experts
from .parallelize import parallelize_moe

__all__ = [
    "expert_parallel",
    "expert_parallel_moe_mlp",
    "parallelize_moe",
    "save_checkpoint",
    "load_checkpoint",
    "shard_experts",
    "gather_experts",
]
