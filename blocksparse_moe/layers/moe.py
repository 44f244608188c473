"""MoE layers: ``dMoE`` (dropless, MegaBlocks-style) and ``PaddedMoE`` (the GShard capacity baseline), both a
``MoELayer`` (their shared base: router, experts, shared expert, losses), and ``MoEExperts``, the routed experts
they hold.

A layer is ``TopKRouter`` → ``MoEExperts`` (``moe_mlp`` over the expert weights ``w1 [E, d, f]``, ``w2 [E, f, d]``
and, for GLU experts, ``w3 [E, d, f]``, with the layer's ``MoEOptions``) → plus an optional dense shared expert, and
returns ``(y, aux_loss)`` with ``aux_loss = load_balancing_weight · load_balancing_loss + z_loss_weight ·
router_z_loss``. ``dMoE`` and ``PaddedMoE`` differ only in the options they build (``PaddedMoE``: ``impl="padded"``
and its capacity) and in ``PaddedMoE``'s per-sequence capacity groups. The parameter names are the same in both
layers (``router.weight``, ``experts.w1``, ...), so one's ``state_dict`` loads into the other.

The layers are single-device and know nothing of ranks: ``blocksparse_moe.parallel.expert_parallel(layer, group)``
shards ``layer.experts`` over a process group and wraps its forward in the dispatch and combine exchanges.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from functools import partial
from typing import Any

import torch
from torch import nn

from ..activations import Activation, get_activation
from ..fp8 import RECIPES, check_loaded_dtypes, check_recipe, prequantize, uncast
from ..functional import moe_mlp
from ..options import MoEOptions, options_from
from ..strategies.common import up_operand_is
from ..validation import boolean, non_negative_number, positive_int
from .losses import load_balancing_loss, router_z_loss, sequence_balance_loss
from .router import TopKRouter

__all__ = ["MoEExperts", "MoELayer", "dMoE", "PaddedMoE", "freeze"]


class MoEExperts(nn.Module):
    """The routed experts of a MoE layer: ``forward(x [T, d], top_k_index [T, k], top_k_weights [T, k], *,
    return_stats=False, activation=None, **overrides) -> [T, d]`` is ``moe_mlp`` over this module's weights with
    its ``activation`` and ``options`` (``activation``, and keyword ``overrides``, ``MoEOptions`` fields such as
    ``num_groups``, replace them for one call).

    Args:
        num_experts, hidden_size, ffn_hidden_size: E, d, f.
        glu: GLU experts (``w3``): ``(act(x @ w1) * (x @ w3)) @ w2``.
        activation: ``moe_mlp``'s activation (a name or an elementwise callable).
        options: the ``MoEOptions`` of every call; ``option_keywords`` (``MoEOptions`` fields: ``impl``,
            ``block_size``, ...) build one when it is None.

    Expert ids index this module's experts ``[0, num_experts)``. Initialisation per expert as a dense MLP:
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``. For inference, ``quantize_fp8_`` replaces the weights by prequantized
    FP8 buffers (1 byte per weight; ``prequantized`` names their recipe, None before).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ffn_hidden_size: int,
        *,
        glu: bool = True,
        activation: str | Activation = "silu",
        options: MoEOptions | None = None,
        **option_keywords: Any,
    ) -> None:
        super().__init__()
        positive_int("num_experts", num_experts)
        positive_int("hidden_size", hidden_size)
        positive_int("ffn_hidden_size", ffn_hidden_size)
        boolean("glu", glu)
        get_activation(activation)  # validates the name
        self.activation = activation
        self.options = options_from(options, **option_keywords)
        d, f = hidden_size, ffn_hidden_size
        self.w1 = nn.Parameter(torch.empty(num_experts, d, f))
        self.w2 = nn.Parameter(torch.empty(num_experts, f, d))
        self.w3 = nn.Parameter(torch.empty(num_experts, d, f)) if glu else None
        self.prequantized: str | None = None  # the FP8 recipe of prequantized weights (quantize_fp8_)
        self.reset_parameters()

    @property
    def num_experts(self) -> int:
        """Experts held by this module (after ``expert_parallel``: this rank's share)."""
        return self.w1.shape[0]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Expert weights ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``: fan_in d for ``w1``/``w3``, f for ``w2``."""
        if self.prequantized is not None:
            raise ValueError(
                f"the experts hold prequantized FP8 weights (recipe {self.prequantized!r}), not parameters to "
                f"initialise; got reset_parameters() after quantize_fp8_"
            )
        for w in (self.w1, self.w2, self.w3):
            if w is not None:
                bound = 1 / math.sqrt(w.shape[1])
                w.uniform_(-bound, bound)

    def forward(
        self,
        x: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        *,
        return_stats: bool = False,
        activation: str | Activation | None = None,
        **overrides: Any,
    ) -> torch.Tensor:
        options = replace(self.options, **overrides) if overrides else self.options
        scales = None
        if self.prequantized is not None:
            if options.fp8 != self.prequantized:
                raise ValueError(
                    f"the experts hold prequantized FP8 weights of recipe {self.prequantized!r}: the fp8 option must "
                    f"be {self.prequantized!r}, got fp8={options.fp8!r}"
                )
            scales = (self.w1_scale, self.w2_scale, self.w3_scale)
        return moe_mlp(
            x,
            top_k_index,
            top_k_weights,
            self.w1,
            self.w2,
            self.w3,
            activation=self.activation if activation is None else activation,
            options=options,
            weight_scales=scales,
            return_stats=return_stats,
        )

    @torch.no_grad()
    def quantize_fp8_(self, fp8: str | None = None) -> MoEExperts:
        """Replace the expert weights by prequantized FP8 buffers, for inference: ``w1``, ``w2``, ``w3`` become E4M3
        buffers of the same names and shapes (stored K-major) and ``w1_scale``, ``w2_scale``, ``w3_scale`` hold
        their scales (``fp8.prequantize``: the quantization the in-op FP8 path applies), so the ``state_dict``
        holds about 1 byte per weight, and ``load_state_dict`` of such a checkpoint into a module on which this was
        called restores them (a checkpoint of another recipe or of unquantized weights is an error naming the key).
        ``forward`` then reads them as they are (bit for bit the ``fp8`` forward of the weights they came from;
        inference only: nothing may require grad, run under ``torch.inference_mode()``).

        ``fp8``: the recipe (``fp8.RECIPES``), default the ``fp8`` option; the option is set to it when None and
        must equal it otherwise; the strategy must be ``"auto"``, ``"grouped"`` or ``"blocksparse"`` (the fused
        expert MLP). Returns ``self``."""
        rcp = check_recipe("fp8", self.options.fp8 if fp8 is None else fp8)
        if rcp is None:
            raise ValueError(f"quantize_fp8_ needs a recipe (one of {RECIPES}): fp8=, or the experts' fp8 option")
        if self.options.fp8 not in (None, rcp):
            raise ValueError(f"fp8 must be the experts' fp8 option {self.options.fp8!r}, got {rcp!r}")
        if self.options.impl not in ("auto", "grouped", "blocksparse"):
            raise ValueError(
                f"prequantized FP8 weights run on the fused expert MLP: impl 'auto', 'grouped' or 'blocksparse', "
                f"got impl={self.options.impl!r}"
            )
        if self.prequantized is not None:
            raise ValueError(f"the experts' weights are already prequantized (recipe {self.prequantized!r})")
        options = replace(self.options, fp8=rcp)
        for name in ("w1", "w2", "w3"):
            w = getattr(self, name)
            q, s = (None, None) if w is None else prequantize(w, rcp)
            if w is not None:
                delattr(self, name)
            self.register_buffer(name, q)
            self.register_buffer(f"{name}_scale", s)
        self.options, self.prequantized = options, rcp
        return self

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module``'s (``.to``, ``.cuda``, ``.half``, ...), moving prequantized buffers without casting them
        (``fp8.uncast``): a dtype cast of the model leaves the E4M3 weights and their scales as they are."""
        if self.prequantized is None:
            return super()._apply(fn, recurse)
        return super()._apply(uncast(fn, self._buffers.values()), recurse)  # the FP8 weights and scales only

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        """``nn.Module``'s, refusing a checkpoint whose expert weights are not stored as this module's are
        (prequantized of one recipe, or parameters), which ``load_state_dict`` would otherwise cast silently."""
        if self.prequantized is None:
            if prefix + "w1_scale" in state_dict:
                errors.append(
                    f"{prefix}w1_scale: the checkpoint holds prequantized FP8 experts; call "
                    f"quantize_fp8_(recipe) on the module before load_state_dict"
                )
        else:
            names = ("w1", "w2", "w3", "w1_scale", "w2_scale", "w3_scale")
            check_loaded_dtypes(self.prequantized, {n: getattr(self, n) for n in names}, state_dict, prefix, errors)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in asdict(self.options).items() if v is not None)
        d, f = self.w1.shape[1:]
        return (
            f"num_experts={self.num_experts}, hidden_size={d}, ffn_hidden_size={f}, activation={self.activation!r}, "
            f"{options}"
        )


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


class MoELayer(nn.Module):
    """A MoE layer: ``forward(x [..., d]) -> (y [..., d], aux_loss [] fp32)``: ``TopKRouter`` → ``MoEExperts`` with
    ``options`` → plus an optional dense shared expert. ``dMoE`` and ``PaddedMoE`` are this layer with the options
    of their strategy.

    Args:
        hidden_size, ffn_hidden_size, num_experts, top_k: d, f, E, k.
        options: the experts' ``MoEOptions`` (default ``MoEOptions()``: ``impl="auto"``). With an ``fp8`` recipe
            and ``fp8_cache_x`` None, each forward has the experts keep x itself for backward where the router keeps
            that same x and they compute with it (``TopKRouter.saves_input``, ``strategies.common.up_operand_is``: no
            autocast copy, not ``"padded"``'s capacity buffers), else its FP8 copy.
        activation: the experts' activation (a name or an elementwise callable), also the shared expert's.
        glu: GLU experts (``w3``), ``act(x @ w1) * (x @ w3) @ w2``.
        load_balancing_weight, z_loss_weight: coefficients of the auxiliary losses (finite, >= 0).
        shared_expert_size: width of a dense shared expert added to the output (DeepSeek-MoE; several shared
            experts are one wider MLP); None for none.
        shared_expert_gate: scale the shared expert's output by ``sigmoid(x · w)`` per token, ``w`` a learned
            ``[1, d]`` projection (``shared_expert_gate.weight``; Qwen2-MoE). Needs ``shared_expert_size``.
        expert_dropout: dropout probability on the expert intermediate ``act(x @ w1) [* (x @ w3)]``, in training
            only (ST-MoE's fine-tuning recipe). In training the experts then run ``moe_mlp`` with a callable
            activation: the op-by-op pipeline instead of the fused expert MLP.
        sequence_balance_weight: coefficient of DeepSeek-V3's per-sequence balance loss (``sequence_balance_loss``
            over the sequences of an input ``[..., S, d]``; a 2-D input is one sequence), added to ``aux_loss``.
        router_kw: ``TopKRouter`` options (score, normalize, jitter_eps, noisy_gating, random_second, expert_bias,
            num_expert_groups, topk_groups, scaling_factor, router_dtype).
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
        options: MoEOptions | None = None,
        activation: str | Activation = "silu",
        glu: bool = True,
        load_balancing_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        sequence_balance_weight: float = 0.0,
        shared_expert_size: int | None = None,
        shared_expert_gate: bool = False,
        expert_dropout: float = 0.0,
        **router_kw: Any,
    ) -> None:
        super().__init__()
        if "expert_parallel_group" in router_kw:
            raise TypeError(
                "expert_parallel_group is no longer a layer option: build the layer, then apply "
                "blocksparse_moe.parallel.expert_parallel(layer, group)"
            )
        positive_int("hidden_size", hidden_size)
        positive_int("ffn_hidden_size", ffn_hidden_size)
        positive_int("num_experts", num_experts)
        positive_int("top_k", top_k)
        if shared_expert_size is not None:
            positive_int("shared_expert_size", shared_expert_size)
        non_negative_number("load_balancing_weight", load_balancing_weight)
        non_negative_number("z_loss_weight", z_loss_weight)
        non_negative_number("sequence_balance_weight", sequence_balance_weight)
        boolean("shared_expert_gate", shared_expert_gate)
        if shared_expert_gate and shared_expert_size is None:
            raise ValueError("shared_expert_gate=True needs a shared expert, got shared_expert_size=None")
        if not non_negative_number("expert_dropout", expert_dropout) < 1:
            raise ValueError(f"expert_dropout must be in [0, 1), got {expert_dropout!r}")
        options = options_from(options)
        self.router = TopKRouter(hidden_size, num_experts, top_k, **router_kw)
        self.experts = MoEExperts(
            num_experts, hidden_size, ffn_hidden_size, glu=glu, activation=activation, options=options
        )
        self.shared_expert = (
            _DenseMLP(hidden_size, shared_expert_size, activation, glu) if shared_expert_size is not None else None
        )
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if shared_expert_gate else None
        self.expert_dropout = float(expert_dropout)
        self.sequence_balance_weight = sequence_balance_weight
        self.hidden_size, self.ffn_hidden_size = hidden_size, ffn_hidden_size
        self.num_experts, self.top_k = num_experts, top_k
        self.load_balancing_weight, self.z_loss_weight = load_balancing_weight, z_loss_weight
        # the process group whose tokens form the batch of the load-balancing loss's expert fractions (one all_reduce
        # of E + 1 counts, no host sync); None: this process's tokens. parallelize_moe sets it to every rank.
        self.balance_group = None

    @property
    def options(self) -> MoEOptions:
        """The experts' ``MoEOptions``."""
        return self.experts.options

    def reset_parameters(self) -> None:
        """Re-initialise the expert weights (see ``MoEExperts.reset_parameters``)."""
        self.experts.reset_parameters()

    def _overrides(self, x: torch.Tensor, num_tokens: int) -> dict:
        """Per-call ``MoEOptions`` fields derived from the input's shape (none here; ``PaddedMoE``'s sequence
        groups)."""
        return {}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor [..., hidden_size={self.hidden_size}], got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be [..., hidden_size={self.hidden_size}], got shape {tuple(x.shape)}")
        flat = x.reshape(-1, self.hidden_size)
        logits, top_k_weights, top_k_index = self.router(flat)
        activation = None
        if self.training and self.expert_dropout:
            activation = partial(_dropout_after, get_activation(self.experts.activation), self.expert_dropout)
        overrides = self._overrides(x, flat.shape[0])
        if self.options.fp8 is not None and self.options.fp8_cache_x is None:
            # the experts keep x itself where the router keeps it anyway and they compute with it (no autocast copy,
            # no capacity buffers), else its FP8 copy (MoEOptions.fp8_cache_x)
            keeps = self.router.saves_input() and up_operand_is(flat, self.options.impl)
            overrides["fp8_cache_x"] = not keeps
        out = self.experts(flat, top_k_index, top_k_weights, activation=activation, **overrides)
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        scores = self.router.scores(logits)
        aux = self.z_loss_weight * router_z_loss(logits)
        if self.load_balancing_weight:
            aux = aux + self.load_balancing_weight * load_balancing_loss(
                scores, top_k_index, self.num_experts, group=self.balance_group
            )
        if self.sequence_balance_weight:
            seq_len = x.shape[-2] if x.dim() > 2 and flat.shape[0] else max(flat.shape[0], 1)
            aux = aux + self.sequence_balance_weight * sequence_balance_loss(
                scores, top_k_index, self.num_experts, seq_len=seq_len
            )
        return out.view(x.shape), aux

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, ffn_hidden_size={self.ffn_hidden_size}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}"
        )


class dMoE(MoELayer):  # noqa: N801 (MegaBlocks' name)
    """Dropless MoE layer: ``MoELayer`` with ``options`` (default ``impl="auto"``: ``"grouped"``, or
    ``"blocksparse"`` with a ``block_size``; ``options.resolve_impl``).

    Args:
        hidden_size, ffn_hidden_size, num_experts, top_k: d, f, E, k.
        options: the experts' ``MoEOptions``; or the convenience keywords ``impl``, ``block_size``,
            ``recompute_activation``, ``fp8`` (``MoEOptions`` fields) build it.
        layer_kw: ``MoELayer``'s (``activation``, ``glu``, ``load_balancing_weight``, ``z_loss_weight``,
            ``shared_expert_size``) and the router's options.
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_experts: int,
        top_k: int = 2,
        *,
        options: MoEOptions | None = None,
        impl: str = "auto",
        block_size: int | None = None,
        recompute_activation: bool = False,
        fp8: str | None = None,
        **layer_kw: Any,
    ) -> None:
        options = options_from(
            options, impl=impl, block_size=block_size, recompute_activation=recompute_activation, fp8=fp8
        )
        super().__init__(hidden_size, ffn_hidden_size, num_experts, top_k, options=options, **layer_kw)


class PaddedMoE(MoELayer):
    """The GShard capacity baseline: ``MoELayer`` with ``moe_mlp(impl="padded")``; same weights as ``dMoE``, same
    outputs when nothing is dropped. ``capacity_factor`` (finite, >= 0) and ``num_groups`` as in ``MoEOptions``;
    ``num_groups="sequence"`` gives each sequence of an input ``[..., S, d]`` its own capacity (Switch
    Transformers, GShard groups; one group for a 2-D input or no tokens); ``capacity`` fixes the per-group capacity
    instead of deriving it from ``capacity_factor``. Under ``parallel.expert_parallel`` each rank's tokens keep
    their own capacity (GShard's per-device groups).

    Args:
        hidden_size, ffn_hidden_size, num_experts, top_k: d, f, E, k.
        options: the experts' ``MoEOptions`` (``impl="padded"``); or the convenience keywords ``capacity_factor``,
            ``capacity``, ``num_groups`` (an int or ``"sequence"``), ``drop_policy`` (``"position"`` or
            ``"probs"``: which assignments keep the slots), ``recompute_activation``, ``fp8`` (the three bmm in
            FP8, emulated) build it.
        layer_kw: ``MoELayer``'s and the router's options.
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_experts: int,
        top_k: int = 2,
        *,
        options: MoEOptions | None = None,
        capacity_factor: float | None = 1.25,
        capacity: int | None = None,
        num_groups: int | str = 1,
        drop_policy: str = "position",
        recompute_activation: bool = False,
        fp8: str | None = None,
        **layer_kw: Any,
    ) -> None:
        sequence = num_groups == "sequence"
        if options is None:
            options = MoEOptions(
                impl="padded",
                capacity_factor=None if capacity is not None else capacity_factor,
                capacity=capacity,
                num_groups=1 if sequence else num_groups,
                drop_policy=drop_policy,
                recompute_activation=recompute_activation,
                fp8=fp8,
            )
        else:
            given = capacity_factor != 1.25 or capacity is not None or num_groups not in (1, "sequence")
            if given or recompute_activation or drop_policy != "position" or fp8 is not None:
                raise ValueError(
                    "give options=MoEOptions(...) or the keywords capacity_factor, capacity, num_groups (except "
                    "'sequence'), drop_policy, recompute_activation, fp8, not both"
                )
            if options.impl != "padded":
                raise ValueError(f"PaddedMoE needs options with impl='padded', got impl={options.impl!r}")
        super().__init__(hidden_size, ffn_hidden_size, num_experts, top_k, options=options, **layer_kw)
        self.num_groups = num_groups

    def _overrides(self, x: torch.Tensor, num_tokens: int) -> dict:
        if self.num_groups != "sequence":
            return {}
        # one capacity group per sequence of x [..., S, d]; a 2-D input, or no tokens at all, is one group
        return {"num_groups": num_tokens // x.shape[-2] if x.dim() > 2 and num_tokens else 1}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_groups={self.num_groups!r}"


def freeze(
    layer: nn.Module, *, experts: bool | None = None, router: bool | None = None, shared: bool | None = None
) -> nn.Module:
    """Freeze (``True``) or unfreeze (``False``) parts of every ``MoELayer`` (``dMoE``, ``PaddedMoE``) in
    ``layer`` (a layer or a model), for the fine-tuning recipes (ST-MoE: freeze the experts, or everything else);
    ``None`` leaves a part as it is. ``experts``: the routed experts' weights; ``router``: the router's parameters
    (its expert bias is a buffer, moved by ``update_expert_bias`` only); ``shared``: the shared expert and its
    gate. Sets ``requires_grad``; returns ``layer``."""
    if not isinstance(layer, nn.Module):
        raise TypeError(f"layer must be a torch.nn.Module, got {type(layer).__name__}")
    parts = {"experts": experts, "router": router, "shared": shared}
    for name, value in parts.items():
        if value is not None:
            boolean(name, value)
    layers = [m for m in layer.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError(f"layer must be or hold a dMoE or PaddedMoE, got none in {type(layer).__name__}")
    for moe in layers:
        shared_modules = [moe.shared_expert, moe.shared_expert_gate]
        modules = {"experts": [moe.experts], "router": [moe.router], "shared": shared_modules}
        for name, value in parts.items():
            for module in modules[name] if value is not None else ():
                if module is not None:
                    module.requires_grad_(not value)
    return layer
