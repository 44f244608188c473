"""MoE layers: ``dMoE`` (dropless, MegaBlocks-style) and ``PaddedMoE`` (the GShard capacity baseline).

Both hold the expert weights as ``w1 [E, d, f]``, ``w2 [E, f, d]`` and, for GLU experts, ``w3 [E, d, f]``
(same names, so one's ``state_dict`` loads into the other), a ``TopKRouter`` and an optional dense shared expert,
and return ``(y, aux_loss)`` with ``aux_loss = load_balancing_weight · load_balancing_loss + z_loss_weight ·
router_z_loss``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..functional import IMPLS, moe_mlp
from ..reference import get_activation
from .losses import load_balancing_loss, router_z_loss
from .router import TopKRouter

__all__ = ["dMoE", "PaddedMoE"]


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class _DenseMLP(nn.Module):
    """The shared expert: ``down(act(up(x)) [* gate(x)])`` (DeepSeek-MoE), ``nn.Linear`` initialisation."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation, glu: bool) -> None:
        super().__init__()
        self.activation = get_activation(activation)
        self.up = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.gate = nn.Linear(hidden_size, ffn_hidden_size, bias=False) if glu else None
        self.down = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.activation(self.up(x))
        if self.gate is not None:
            h = h * self.gate(x)
        return self.down(h)


class dMoE(nn.Module):  # noqa: N801 (MegaBlocks' name)
    """Dropless MoE layer: ``forward(x [..., d]) -> (y [..., d], aux_loss [] fp32)``.

    Args:
        hidden_size, ffn_hidden_size, num_experts, top_k: d, f, E, k.
        activation, impl, block_size, recompute_activation: passed to ``moe_mlp``.
        glu: GLU experts (``w3``), ``act(x @ w1) * (x @ w3) @ w2``.
        load_balancing_weight, z_loss_weight: coefficients of the auxiliary losses.
        shared_expert_size: width of a dense shared expert added to the output (DeepSeek-MoE); None for none.
        expert_parallel_group: a process group; this rank then holds only experts ``[r·E/W, (r+1)·E/W)`` and
            calls ``parallel.expert_parallel.expert_parallel_moe_mlp`` (a collective: every rank calls forward).
        router_kw: ``TopKRouter`` options (score, normalize, jitter_eps, noisy_gating, random_second, router_dtype).

    Expert weights are initialised per expert like a dense MLP: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_experts: int,
        top_k: int = 2,
        *,
        activation="silu",
        glu: bool = True,
        impl: str = "auto",
        load_balancing_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        recompute_activation: bool = False,
        shared_expert_size: int | None = None,
        block_size: int | None = None,
        expert_parallel_group=None,
        **router_kw,
    ) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("ffn_hidden_size", ffn_hidden_size)):
            _positive_int(name, value)
        if shared_expert_size is not None:
            _positive_int("shared_expert_size", shared_expert_size)
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        get_activation(activation)  # validates the name
        if expert_parallel_group is not None and recompute_activation:
            raise ValueError("recompute_activation is not supported with expert_parallel_group")
        self.router = TopKRouter(hidden_size, num_experts, top_k, **router_kw)
        self.hidden_size, self.ffn_hidden_size = hidden_size, ffn_hidden_size
        self.num_experts, self.top_k = num_experts, top_k
        self.activation, self.recompute_activation = activation, recompute_activation
        self.load_balancing_weight, self.z_loss_weight = load_balancing_weight, z_loss_weight
        self.expert_parallel_group = expert_parallel_group
        self._mlp_options: dict = dict(impl=impl, block_size=block_size)

        local_experts = num_experts
        if expert_parallel_group is not None:
            import torch.distributed as dist

            world = dist.get_world_size(expert_parallel_group)
            if num_experts % world:
                raise ValueError(
                    f"num_experts must be divisible by the expert-parallel group size {world}, got {num_experts}"
                )
            local_experts = num_experts // world
        d, f = hidden_size, ffn_hidden_size
        self.w1 = nn.Parameter(torch.empty(local_experts, d, f))
        self.w2 = nn.Parameter(torch.empty(local_experts, f, d))
        self.w3 = nn.Parameter(torch.empty(local_experts, d, f)) if glu else None
        self.shared_expert = (
            _DenseMLP(d, shared_expert_size, activation, glu) if shared_expert_size is not None else None
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Expert weights ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``: fan_in d for ``w1``/``w3``, f for ``w2``."""
        for w in (self.w1, self.w2, self.w3):
            if w is not None:
                bound = 1 / math.sqrt(w.shape[1])
                w.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be [..., hidden_size={self.hidden_size}], got shape {tuple(x.shape)}")
        flat = x.reshape(-1, self.hidden_size)
        logits, top_k_weights, top_k_index = self.router(flat)
        if self.expert_parallel_group is not None:
            from ..parallel.expert_parallel import expert_parallel_moe_mlp

            out = expert_parallel_moe_mlp(
                flat,
                top_k_index,
                top_k_weights.to(flat.dtype),
                self.w1,
                self.w2,
                self.w3,
                group=self.expert_parallel_group,
                num_experts=self.num_experts,
                activation=self.activation,
                impl=self._mlp_options["impl"],
                block_size=self._mlp_options["block_size"],
            )
        else:
            options = self._mlp_options
            if options.get("num_groups") == "sequence":  # one capacity group per sequence of x [..., S, d]
                options = {**options, "num_groups": flat.shape[0] // x.shape[-2] if x.dim() > 2 else 1}
            out = moe_mlp(
                flat,
                top_k_index,
                top_k_weights,
                self.w1,
                self.w2,
                self.w3,
                activation=self.activation,
                recompute_activation=self.recompute_activation,
                **options,
            )
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        aux = self.load_balancing_weight * load_balancing_loss(
            self.router.scores(logits), top_k_index, self.num_experts
        ) + self.z_loss_weight * router_z_loss(logits)
        return out.view(x.shape), aux

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, ffn_hidden_size={self.ffn_hidden_size}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}, glu={self.w3 is not None}, {self._mlp_options}"
        )


class PaddedMoE(dMoE):
    """The GShard capacity baseline: ``dMoE`` with ``moe_mlp(impl="padded")``; same weights, same outputs
    when nothing is dropped. ``capacity_factor`` and ``num_groups`` as in ``moe_mlp``; ``num_groups="sequence"``
    gives each sequence of an input ``[..., S, d]`` its own capacity (Switch Transformers, GShard groups);
    ``capacity`` fixes the per-group capacity instead of deriving it from ``capacity_factor``."""

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_experts: int,
        top_k: int = 2,
        *,
        capacity_factor: float | None = 1.25,
        capacity: int | None = None,
        num_groups: int | str = 1,
        activation="silu",
        glu: bool = True,
        load_balancing_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        recompute_activation: bool = False,
        shared_expert_size: int | None = None,
        **router_kw,
    ) -> None:
        if capacity is not None:
            if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
                raise ValueError(f"capacity must be a non-negative int or None, got {capacity!r}")
            capacity_factor = None
        elif isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) or capacity_factor < 0:
            raise ValueError(f"capacity_factor must be a non-negative number, got {capacity_factor!r}")
        if num_groups != "sequence":
            _positive_int("num_groups", num_groups)
        super().__init__(
            hidden_size,
            ffn_hidden_size,
            num_experts,
            top_k,
            activation=activation,
            glu=glu,
            impl="padded",
            load_balancing_weight=load_balancing_weight,
            z_loss_weight=z_loss_weight,
            recompute_activation=recompute_activation,
            shared_expert_size=shared_expert_size,
            **router_kw,
        )
        self._mlp_options = dict(
            impl="padded", capacity_factor=capacity_factor, capacity=capacity, num_groups=num_groups
        )
