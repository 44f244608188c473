"""MoE layers: ``dMoE`` (dropless, MegaBlocks-style) and ``PaddedMoE`` (the GShard capacity baseline), and
``MoEExperts``, the routed experts both hold.

A layer is ``TopKRouter`` → ``MoEExperts`` (``moe_mlp`` over the expert weights ``w1 [E, d, f]``, ``w2 [E, f, d]``
and, for GLU experts, ``w3 [E, d, f]``) → plus an optional dense shared expert, and returns ``(y, aux_loss)`` with
``aux_loss = load_balancing_weight · load_balancing_loss + z_loss_weight · router_z_loss``. The parameter names
are the same in both layers (``router.weight``, ``experts.w1``, ...), so one's ``state_dict`` loads into the other.

The layers are single-device and know nothing of ranks: ``blocksparse_moe.parallel.expert_parallel(layer, group)``
shards ``layer.experts`` over a process group and wraps its forward in the dispatch and combine exchanges.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from ..activations import Activation, get_activation
from ..functional import check_options, moe_mlp
from ..validation import boolean, non_negative_number
from .losses import load_balancing_loss, router_z_loss
from .router import TopKRouter

__all__ = ["MoEExperts", "dMoE", "PaddedMoE", "freeze"]


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _loss_weight(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")


class MoEExperts(nn.Module):
    """The routed experts of a MoE layer: ``forward(x [T, d], top_k_index [T, k], top_k_weights [T, k],
    **options) -> [T, d]`` is ``moe_mlp`` over this module's weights with its options (keyword ``options``, e.g.
    ``num_groups``, override them for one call).

    Args:
        num_experts, hidden_size, ffn_hidden_size: E, d, f.
        glu: GLU experts (``w3``): ``(act(x @ w1) * (x @ w3)) @ w2``.
        activation, impl, block_size, recompute_activation, capacity_factor, capacity, num_groups: ``moe_mlp``'s
            options, validated here (the capacity options need ``impl="padded"``, ``block_size`` a blocksparse
            impl).

    Expert ids index this module's experts ``[0, num_experts)``. Initialisation per expert as a dense MLP:
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ffn_hidden_size: int,
        *,
        glu: bool = True,
        activation: str | Activation = "silu",
        impl: str = "auto",
        block_size: int | None = None,
        recompute_activation: bool = False,
        capacity_factor: float | None = None,
        capacity: int | None = None,
        num_groups: int = 1,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_experts", num_experts),
            ("hidden_size", hidden_size),
            ("ffn_hidden_size", ffn_hidden_size),
        ):
            _positive_int(name, value)
        if not isinstance(glu, bool):
            raise TypeError(f"glu must be a bool, got {glu!r}")
        get_activation(activation)  # validates the name
        options = dict(
            impl=impl,
            block_size=block_size,
            recompute_activation=recompute_activation,
            capacity_factor=capacity_factor,
            capacity=capacity,
            num_groups=num_groups,
        )
        check_options(**options)
        self.options: dict = {"activation": activation, **options}
        d, f = hidden_size, ffn_hidden_size
        self.w1 = nn.Parameter(torch.empty(num_experts, d, f))
        self.w2 = nn.Parameter(torch.empty(num_experts, f, d))
        self.w3 = nn.Parameter(torch.empty(num_experts, d, f)) if glu else None
        self.reset_parameters()

    @property
    def num_experts(self) -> int:
        """Experts held by this module (after ``expert_parallel``: this rank's share)."""
        return self.w1.shape[0]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Expert weights ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``: fan_in d for ``w1``/``w3``, f for ``w2``."""
        for w in (self.w1, self.w2, self.w3):
            if w is not None:
                bound = 1 / math.sqrt(w.shape[1])
                w.uniform_(-bound, bound)

    def forward(
        self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, **options
    ) -> torch.Tensor:
        return moe_mlp(x, top_k_index, top_k_weights, self.w1, self.w2, self.w3, **{**self.options, **options})

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v is not None)
        d, f = self.w1.shape[1:]
        return f"num_experts={self.num_experts}, hidden_size={d}, ffn_hidden_size={f}, {options}"


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


def _dropout_after(act: Activation, p: float, h: torch.Tensor) -> torch.Tensor:
    """``dropout(act(h))``: in the GLU product ``act(h) * g`` the same as dropout on the product."""
    return torch.nn.functional.dropout(act(h), p, training=True)


class dMoE(nn.Module):  # noqa: N801 (MegaBlocks' name)
    """Dropless MoE layer: ``forward(x [..., d]) -> (y [..., d], aux_loss [] fp32)``.

    Args:
        hidden_size, ffn_hidden_size, num_experts, top_k: d, f, E, k.
        activation, impl, block_size, recompute_activation: passed to ``moe_mlp`` (validated here: ``block_size``
            one of 16, 32, 64, 128 and only with ``impl`` ``"blocksparse"`` or ``"auto"``).
        glu: GLU experts (``w3``), ``act(x @ w1) * (x @ w3) @ w2``.
        load_balancing_weight, z_loss_weight: coefficients of the auxiliary losses (finite, >= 0).
        shared_expert_size: width of a dense shared expert added to the output (DeepSeek-MoE; several shared
            experts are one wider MLP); None for none.
        shared_expert_gate: scale the shared expert's output by ``sigmoid(x · w)`` per token, ``w`` a learned
            ``[1, d]`` projection (``shared_expert_gate.weight``; Qwen2-MoE). Needs ``shared_expert_size``.
        expert_dropout: dropout probability on the expert intermediate ``act(x @ w1) [* (x @ w3)]``, in training
            only (ST-MoE's fine-tuning recipe). In training it runs ``moe_mlp`` with a callable activation, so the
            op-by-op pipeline instead of the fused expert MLP.
        router_kw: ``TopKRouter`` options (score, normalize, jitter_eps, noisy_gating, random_second, router_dtype).
            ``normalize`` defaults to ``top_k > 1``: at k = 1 a renormalised weight is p/p = 1, which would leave
            the router without a gradient from the task loss (Switch multiplies by the raw probability).

    Expert parallelism: ``blocksparse_moe.parallel.expert_parallel(layer, group)`` (the layer stays single-device).
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_experts: int,
        top_k: int = 2,
        *,
        activation: str | Activation = "silu",
        glu: bool = True,
        impl: str = "auto",
        load_balancing_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        recompute_activation: bool = False,
        shared_expert_size: int | None = None,
        shared_expert_gate: bool = False,
        expert_dropout: float = 0.0,
        block_size: int | None = None,
        **router_kw,
    ) -> None:
        self._build(
            hidden_size,
            ffn_hidden_size,
            num_experts,
            top_k,
            dict(impl=impl, block_size=block_size, recompute_activation=recompute_activation),
            activation=activation,
            glu=glu,
            load_balancing_weight=load_balancing_weight,
            z_loss_weight=z_loss_weight,
            shared_expert_size=shared_expert_size,
            shared_expert_gate=shared_expert_gate,
            expert_dropout=expert_dropout,
            router_kw=router_kw,
        )

    def _build(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_experts: int,
        top_k: int,
        options: dict,
        *,
        activation,
        glu: bool,
        load_balancing_weight: float,
        z_loss_weight: float,
        shared_expert_size: int | None,
        shared_expert_gate: bool,
        expert_dropout: float,
        router_kw: dict,
    ) -> None:
        """The constructor both layers share: validate, then router, experts (``MoEExperts(**options)``), shared
        expert."""
        nn.Module.__init__(self)
        if "expert_parallel_group" in router_kw:
            raise TypeError(
                "expert_parallel_group is no longer a layer option: build the layer, then apply "
                "blocksparse_moe.parallel.expert_parallel(layer, group)"
            )
        for name, value in (("hidden_size", hidden_size), ("ffn_hidden_size", ffn_hidden_size)):
            _positive_int(name, value)
        if shared_expert_size is not None:
            _positive_int("shared_expert_size", shared_expert_size)
        _loss_weight("load_balancing_weight", load_balancing_weight)
        _loss_weight("z_loss_weight", z_loss_weight)
        boolean("shared_expert_gate", shared_expert_gate)
        if shared_expert_gate and shared_expert_size is None:
            raise ValueError("shared_expert_gate=True needs a shared expert, got shared_expert_size=None")
        if not non_negative_number("expert_dropout", expert_dropout) < 1:
            raise ValueError(f"expert_dropout must be in [0, 1), got {expert_dropout!r}")
        self.router = TopKRouter(hidden_size, num_experts, top_k, **router_kw)
        self.experts = MoEExperts(num_experts, hidden_size, ffn_hidden_size, glu=glu, activation=activation, **options)
        self.shared_expert = (
            _DenseMLP(hidden_size, shared_expert_size, activation, glu) if shared_expert_size is not None else None
        )
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if shared_expert_gate else None
        self.expert_dropout = float(expert_dropout)
        self.hidden_size, self.ffn_hidden_size = hidden_size, ffn_hidden_size
        self.num_experts, self.top_k = num_experts, top_k
        self.load_balancing_weight, self.z_loss_weight = load_balancing_weight, z_loss_weight

    def reset_parameters(self) -> None:
        """Re-initialise the expert weights (see ``MoEExperts.reset_parameters``)."""
        self.experts.reset_parameters()

    def _call_options(self, x: torch.Tensor, num_tokens: int) -> dict:
        """Per-call ``moe_mlp`` options derived from the input's shape (none for the dropless layer)."""
        return {}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be [..., hidden_size={self.hidden_size}], got shape {tuple(x.shape)}")
        flat = x.reshape(-1, self.hidden_size)
        logits, top_k_weights, top_k_index = self.router(flat)
        options = self._call_options(x, flat.shape[0])
        if self.training and self.expert_dropout:
            act = get_activation(self.experts.options["activation"])
            options["activation"] = partial(_dropout_after, act, self.expert_dropout)
        out = self.experts(flat, top_k_index, top_k_weights, **options)
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        aux = self.load_balancing_weight * load_balancing_loss(
            self.router.scores(logits), top_k_index, self.num_experts
        ) + self.z_loss_weight * router_z_loss(logits)
        return out.view(x.shape), aux

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, ffn_hidden_size={self.ffn_hidden_size}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}"
        )


class PaddedMoE(dMoE):
    """The GShard capacity baseline: ``dMoE`` with ``moe_mlp(impl="padded")``; same weights, same outputs
    when nothing is dropped. ``capacity_factor`` (finite, >= 0) and ``num_groups`` as in ``moe_mlp``;
    ``num_groups="sequence"`` gives each sequence of an input ``[..., S, d]`` its own capacity (Switch
    Transformers, GShard groups; one group for a 2-D input or no tokens); ``capacity`` fixes the per-group capacity
    instead of deriving it from ``capacity_factor``. Under ``parallel.expert_parallel`` each rank's tokens keep
    their own capacity (GShard's per-device groups)."""

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
        activation: str | Activation = "silu",
        glu: bool = True,
        load_balancing_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        recompute_activation: bool = False,
        shared_expert_size: int | None = None,
        shared_expert_gate: bool = False,
        expert_dropout: float = 0.0,
        **router_kw,
    ) -> None:
        if capacity is not None:
            capacity_factor = None
        if num_groups != "sequence":
            _positive_int("num_groups", num_groups)
        options = dict(
            impl="padded",
            capacity_factor=capacity_factor,
            capacity=capacity,
            num_groups=1 if num_groups == "sequence" else num_groups,
            recompute_activation=recompute_activation,
        )
        self._build(
            hidden_size,
            ffn_hidden_size,
            num_experts,
            top_k,
            options,
            activation=activation,
            glu=glu,
            load_balancing_weight=load_balancing_weight,
            z_loss_weight=z_loss_weight,
            shared_expert_size=shared_expert_size,
            shared_expert_gate=shared_expert_gate,
            expert_dropout=expert_dropout,
            router_kw=router_kw,
        )
        self.num_groups = num_groups

    def _call_options(self, x: torch.Tensor, num_tokens: int) -> dict:
        if self.num_groups != "sequence":
            return {}
        # one capacity group per sequence of x [..., S, d]; a 2-D input, or no tokens at all, is one group
        return {"num_groups": num_tokens // x.shape[-2] if x.dim() > 2 and num_tokens else 1}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_groups={self.num_groups!r}"


def freeze(
    layer: nn.Module, *, experts: bool | None = None, router: bool | None = None, shared: bool | None = None
) -> nn.Module:
    """Freeze (``True``) or unfreeze (``False``) parts of every ``dMoE`` / ``PaddedMoE`` in ``layer`` (a layer or a
    model), for the fine-tuning recipes (ST-MoE: freeze the experts, or everything else); ``None`` leaves a part as
    it is. ``experts``: the routed experts' weights; ``router``: the router's parameters (its expert bias is a
    buffer, moved by ``update_expert_bias`` only); ``shared``: the shared expert and its gate. Sets
    ``requires_grad``; returns ``layer``."""
    if not isinstance(layer, nn.Module):
        raise TypeError(f"layer must be a torch.nn.Module, got {type(layer).__name__}")
    parts = {"experts": experts, "router": router, "shared": shared}
    for name, value in parts.items():
        if value is not None:
            boolean(name, value)
    layers = [m for m in layer.modules() if isinstance(m, dMoE)]
    if not layers:
        raise ValueError(f"layer must be or hold a dMoE or PaddedMoE, got none in {type(layer).__name__}")
    for moe in layers:
        modules = {
            "experts": [moe.experts],
            "router": [moe.router],
            "shared": [moe.shared_expert, moe.shared_expert_gate],
        }
        for name, value in parts.items():
            if value is None:
                continue
            for module in modules[name]:
                if module is not None:
                    module.requires_grad_(not value)
    return layer
