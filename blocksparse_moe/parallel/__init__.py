"""Scale-out: expert parallelism over torch.distributed (``all_to_all_single`` with uneven splits).

``expert_parallel(layer, group)`` spreads a ``dMoE`` / ``PaddedMoE``'s experts over a process group;
``expert_parallel_moe_mlp`` is the functional form; ``shard_experts`` / ``gather_experts`` convert checkpoints.
"""

from .expert_parallel import expert_parallel, expert_parallel_moe_mlp, gather_experts, shard_experts

__all__ = ["expert_parallel", "expert_parallel_moe_mlp", "shard_experts", "gather_experts"]
