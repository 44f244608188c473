"""Scale-out: expert parallelism over torch.distributed (``all_to_all_single`` with uneven splits)."""

from .expert_parallel import expert_parallel_moe_mlp, gather_experts, shard_experts

__all__ = ["expert_parallel_moe_mlp", "shard_experts", "gather_experts"]
