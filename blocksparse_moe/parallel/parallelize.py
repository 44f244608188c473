"""``parallelize_moe(model, mesh)``: expert parallelism composed with FSDP2 on a 2-D ``DeviceMesh``, torchtitan's
layout for MoE models.

The mesh has two dimensions, ``("dp_shard", "ep")`` in that order (either may have size 1); ``ep`` is the inner
one, so an expert-parallel group is ``ep`` consecutive ranks (one node, where the all-to-all is cheapest). Four
ranks as ``dp_shard=2 × ep=2``, E = 8 experts ``e0..e7``::

                      ep = 0              ep = 1
                 ┌──────────────────┬──────────────────┐
    dp_shard = 0 │ rank 0           │ rank 1           │   experts: e0-e3 on ep 0, e4-e7 on ep 1 (Shard(0) on
                 │ e0 e1 (of e0-e3) │ e4 e5 (of e4-e7) │   "ep"), each ep shard split again over "dp_shard"
                 ├──────────────────┼──────────────────┤   (FSDP2): rank 0 stores e0 e1, rank 2 e2 e3, ...
    dp_shard = 1 │ rank 2           │ rank 3           │
                 │ e2 e3 (of e0-e3) │ e6 e7 (of e4-e7) │   everything else (router, shared expert, attention,
                 └──────────────────┴──────────────────┘   embeddings): FSDP2 over all 4 ranks (flattened mesh)

Forward of one MoE layer on rank 0: FSDP all-gathers e0-e3 over its ``dp_shard`` column (ranks 0, 2), the router
picks experts for rank 0's tokens, the all-to-all over its ``ep`` row (ranks 0, 1) sends each row to the rank
holding its expert, the local experts run, the all-to-all returns the results. Every rank is a data-parallel rank:
each has its own tokens.

Gradients are those of the mean loss over the global batch, as in one process, when each rank's loss is its share
``Σ_{own tokens} loss / N_global · W`` (the local mean when the ranks hold equal batches): FSDP averages the
non-expert gradients over all ``W`` ranks; an expert shard's gradient already sums the contributions of its ``ep``
row's tokens (the all-to-all's backward), so its reduce-scatter over ``dp_shard`` divides by ``W`` as well. The
load-balancing loss, not linear in the batch, counts its expert fractions over every rank's tokens (each layer's
``balance_group``): with equal batches the mean of the ranks' losses is the global batch's.
"""

from __future__ import annotations

import dataclasses

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ..layers.moe import MoELayer
from .expert_parallel import expert_parallel

__all__ = ["MESH_DIMS", "parallelize_moe"]

MESH_DIMS = ("dp_shard", "ep")  # the mesh dimension names parallelize_moe expects, outer first


def parallelize_moe(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
    capacity_per_rank: int | None = None,
    num_chunks: int = 1,
) -> nn.Module:
    """Expert parallelism on ``mesh["ep"]`` for every ``dMoE`` / ``PaddedMoE`` in ``model``, FSDP2 for their experts
    on ``mesh["dp_shard"]``, and FSDP2 for the rest of the model (each MoE layer, then the whole model) on both
    dimensions flattened; returns ``model``, changed in place. Build the optimizer afterwards.

    Args:
        model: a module holding at least one ``dMoE`` / ``PaddedMoE`` (the model itself may be one), not yet sharded.
        mesh: a 2-D ``DeviceMesh`` with dimensions ``("dp_shard", "ep")`` (either may have size 1); the layers'
            expert counts must be divisible by ``mesh["ep"].size()``.
        mp_policy: FSDP2's mixed precision for every shard (e.g. bf16 parameters, fp32 gradient reduction). The
            experts do not cast their inputs (the router's fp32 combine weights stay fp32, as on one device).
        reshard_after_forward: passed to every ``fully_shard``.
        capacity_per_rank, num_chunks: ``expert_parallel``'s sync-free bound (``None``: the exact exchange, one
            host sync) and pipelined token chunks.

    The model's parameters become DTensors (expert weights ``[E, ., .]`` on the whole mesh, the others on the
    flattened one), so ``torch.distributed.checkpoint`` saves and reloads the model at any other layout. Each rank's
    loss must be its share of the global mean (see the module docstring). Each layer's load-balancing loss counts
    its expert fractions over every rank's tokens (``balance_group``), so with equal batches the mean of the ranks'
    auxiliary losses is the single-process loss of the global batch. Collective (all ranks call it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a DeviceMesh, got {type(mesh).__name__}")
    if mesh.mesh_dim_names != MESH_DIMS:
        raise ValueError(f"mesh must be 2-D with dimensions named {MESH_DIMS}, got {mesh.mesh_dim_names}")
    if mp_policy is not None and not isinstance(mp_policy, MixedPrecisionPolicy):
        raise TypeError(f"mp_policy must be a MixedPrecisionPolicy or None, got {type(mp_policy).__name__}")
    if not isinstance(reshard_after_forward, bool):
        raise TypeError(f"reshard_after_forward must be a bool, got {reshard_after_forward!r}")
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]  # dMoE, PaddedMoE
    if not layers:
        raise ValueError(f"model holds no dMoE or PaddedMoE to parallelise (a {type(model).__name__})")
    policy = mp_policy or MixedPrecisionPolicy()
    everywhere = mesh._flatten("_".join(MESH_DIMS))  # every rank: the data-parallel group of the non-expert weights
    for layer in layers:
        expert_parallel(layer, mesh["ep"], capacity_per_rank=capacity_per_rank, num_chunks=num_chunks)
        layer.balance_group = everywhere.get_group()  # the balance loss's expert fractions: the global batch's
        experts = fully_shard(
            layer.experts,
            mesh=mesh["dp_shard"],
            reshard_after_forward=reshard_after_forward,
            mp_policy=dataclasses.replace(policy, cast_forward_inputs=False),
        )
        # the gradient already sums over the ep row (all-to-all backward): divide by every rank, not by dp_shard.
        # With a reduction, sums and an explicit division (gloo has no pre-multiplied sum); without one (dp_shard
        # = 1), FSDP divides once on its own (forcing sums there would divide twice, torch 2.13)
        experts.set_gradient_divide_factor(float(mesh.size()))
        experts.set_force_sum_reduction_for_comms(mesh["dp_shard"].size() > 1)
        if layer is not model:
            fully_shard(layer, mesh=everywhere, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(model, mesh=everywhere, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    return model
