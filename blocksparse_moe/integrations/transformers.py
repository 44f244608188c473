"""Hugging Face transformers integration (transformers >= 5; an optional dependency imported only here).

``register()`` adds ``"blocksparse_moe"`` to ``transformers.integrations.moe.ExpertsInterface``; then
``model.set_experts_implementation("blocksparse_moe")`` (or ``from_pretrained(...,
experts_implementation="blocksparse_moe")``) runs every MoE model whose experts module uses that interface
(Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, gpt-oss, ...) on this package's routing plan, fused-gather grouped GEMM
and deterministic weighted scatter. The module's own layout flags are honoured: gated or not, concatenated or
interleaved gate/up (the module's ``_apply_gate`` splits it), transposed or not, with or without bias, and its
``act_fn`` / ``_apply_gate`` (applied unfused, so custom gates such as gpt-oss's clamped SwiGLU work unchanged).

``from_hf(module)`` converts a ``SwitchTransformersSparseMLP`` (top-1, per-sequence expert capacity) into an
equivalent :class:`~blocksparse_moe.layers.moe.PaddedMoE` that shares its weights.
"""

from __future__ import annotations

import torch

from ..ops.grouped import grouped_mm
from ..ops.permute import scatter_rows
from ..routing import plan_routing

NAME = "blocksparse_moe"

__all__ = ["NAME", "register", "experts_forward", "from_hf"]


def experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """``ExpertsInterface`` entry: ``self`` is the model's experts module, ``hidden_states`` ``[T, d]``."""
    num_experts = self.num_experts
    # Expert-parallel sentinels (ids >= E) are excluded from the plan and contribute zero.
    plan = plan_routing(
        top_k_index, num_experts, block_size=1, check=False if getattr(self, "_is_expert_parallel", False) else None
    )
    has_bias = getattr(self, "has_bias", False)
    if has_bias:
        rows = torch.arange(plan.row_assignment.numel(), device=hidden_states.device, dtype=plan.offsets.dtype)
        row_expert = (torch.searchsorted(plan.offsets[1:], rows, right=True)).clamp(max=num_experts - 1)

    def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gather: bool) -> torch.Tensor:
        w = weight if self.is_transposed else weight.transpose(1, 2)  # -> [E, in, out], a view
        if gather:
            y = grouped_mm(x, w, plan.offsets, plan.row_assignment, plan.assignment_row)
        else:
            y = grouped_mm(x, w, plan.offsets)
        return y + bias[row_expert] if bias is not None else y

    if self.has_gate:
        h = project(hidden_states, self.gate_up_proj, self.gate_up_proj_bias if has_bias else None, gather=True)
        h = self._apply_gate(h)
    else:
        h = project(hidden_states, self.up_proj, self.up_proj_bias if has_bias else None, gather=True)
        h = self.act_fn(h)
    y = project(h.to(hidden_states.dtype), self.down_proj, self.down_proj_bias if has_bias else None, gather=False)
    if getattr(self, "has_post_expert_norm", False):
        y = self.post_expert_norm(y)
    out = scatter_rows(y, plan.row_assignment, plan.assignment_row, top_k_weights.to(y.dtype))
    return out.to(hidden_states.dtype)


def register() -> None:
    """Register ``"blocksparse_moe"`` in transformers' ``ExpertsInterface`` (idempotent)."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "blocksparse_moe.integrations.transformers needs transformers >= 5 with "
            f"transformers.integrations.moe.ExpertsInterface (pip install 'blocksparse_moe[hf]'): {exc}"
        ) from exc
    ExpertsInterface.register(NAME, experts_forward)


def from_hf(module: torch.nn.Module):
    """Convert a ``SwitchTransformersSparseMLP`` into an equivalent :class:`PaddedMoE`.

    Switch routes each token to its top-1 expert (softmax in the router's dtype, weight = that probability, no
    renormalisation), gives every sequence ``expert_capacity`` slots per expert in token order, and drops the
    overflow: that is ``PaddedMoE(top_k=1, capacity=expert_capacity, num_groups="sequence", glu=False)`` with the
    expert's own activation. The weights are copied into the ``[E, d, f]`` / ``[E, f, d]`` layout (a new module
    that owns its parameters). The experts' dropout is not reproduced, so outputs match in eval mode.
    """
    from ..layers.moe import PaddedMoE

    router, experts = getattr(module, "router", None), getattr(module, "experts", None)
    if router is None or experts is None or not hasattr(router, "expert_capacity"):
        raise TypeError(f"expected a SwitchTransformersSparseMLP (router + experts), got {type(module).__name__}")
    if router.classifier.bias is not None:
        raise ValueError("router_bias=True is not supported: TopKRouter has no bias, got a router with a bias")
    num_experts = router.num_experts
    first = experts["expert_0"]
    d, f = first.wi.in_features, first.wi.out_features
    moe = PaddedMoE(
        d,
        f,
        num_experts,
        top_k=1,
        capacity=int(router.expert_capacity),
        num_groups="sequence",
        activation=first.act,
        glu=False,
        load_balancing_weight=0.0,
        normalize=False,
        jitter_eps=router.jitter_noise or None,
        router_dtype=router.dtype,
    )
    weight = router.classifier.weight
    moe = moe.to(device=weight.device, dtype=first.wi.weight.dtype)
    with torch.no_grad():
        moe.router.weight.copy_(weight)
        for e in range(num_experts):
            expert = experts[f"expert_{e}"]
            moe.w1[e].copy_(expert.wi.weight.t())
            moe.w2[e].copy_(expert.wo.weight.t())
    return moe
