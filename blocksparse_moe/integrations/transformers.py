"""Hugging Face transformers integration (transformers >= 5; an optional dependency imported only here).

``register()`` adds ``"blocksparse_moe"`` to ``transformers.integrations.moe.ExpertsInterface``; then
``model.set_experts_implementation("blocksparse_moe")`` (or ``from_pretrained(...,
experts_implementation="blocksparse_moe")``) runs every MoE model whose experts module uses that interface
(Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, gpt-oss, ...) through ``functional``'s one dropless core:

- a **standard** experts module (the default gate ``act(gate) * up`` over concatenated gate/up columns, or no gate;
  no biases, no post-expert norm; ``act_fn`` one of ``moe_mlp``'s named activations) is ``moe_mlp`` over views of
  its weights (``moe_mlp_weights``) with the registered ``MoEOptions``: ``impl="auto"`` is the block-sparse
  strategy on CUDA (the activation applied in the up-projection's epilogue) and the grouped one elsewhere;
- any other (a custom ``_apply_gate`` such as gpt-oss's clamped SwiGLU over interleaved columns, biases, a
  post-expert norm, an unknown activation) is ``custom_moe_mlp``: the grouped strategy with the module's own gate
  applied to whole rows (the registered options' ``backend`` and ``check``).

Weights are used in place (views: transposed or not, gradients flow to the model's parameters).

``from_hf(module)`` converts a ``SwitchTransformersSparseMLP`` (top-1, per-sequence expert capacity) into an
equivalent :class:`~blocksparse_moe.layers.moe.PaddedMoE` that holds copies of its weights (a new module; training
one does not change the other).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import custom_moe_mlp, moe_mlp
from ..options import MoEOptions, options_from

NAME = "blocksparse_moe"

__all__ = ["NAME", "register", "experts_forward", "moe_mlp_weights", "from_hf"]


def _activation_name(act_fn: object) -> str | None:
    """The ``moe_mlp`` name of a Hugging Face / torch activation, or None when it is not one of them."""
    if act_fn in (F.silu, F.relu, F.gelu):
        return {F.silu: "silu", F.relu: "relu", F.gelu: "gelu"}[act_fn]
    if isinstance(act_fn, nn.SiLU):
        return "silu"
    if isinstance(act_fn, nn.ReLU):
        return "relu"
    if isinstance(act_fn, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act_fn.approximate)
    try:
        from transformers import activations as hf
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    if type(act_fn) is getattr(hf, "SiLUActivation", None):
        return "silu"
    inner = getattr(act_fn, "act", None)  # GELUActivation / GELUTanh hold the function they apply
    if type(act_fn) is getattr(hf, "GELUActivation", None) and inner is F.gelu:
        return "gelu"
    if (
        type(act_fn) is getattr(hf, "GELUTanh", None)
        and isinstance(inner, partial)
        and inner.func is F.gelu
        and inner.keywords == {"approximate": "tanh"}
    ):
        return "gelu_tanh"
    return None


def _has_default_gate(module: nn.Module) -> bool:
    """Whether the module gates with transformers' default ``act(gate) * up`` over concatenated halves."""
    from transformers.integrations import moe as hf_moe

    default = getattr(hf_moe, "_default_apply_gate", None)
    return (
        default is not None
        and getattr(type(module), "_apply_gate", None) is default
        and "_apply_gate" not in vars(module)
        and getattr(module, "is_concatenated", True)
    )


def _in_out(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A projection weight as ``[E, in, out]`` (a view)."""
    return weight if module.is_transposed else weight.transpose(1, 2)


def moe_mlp_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, str] | None:
    """``(w1, w2, w3, activation)`` for ``moe_mlp`` (views of the module's weights) when the experts module is
    standard: the default gate (or none), no bias, no post-expert norm, a named activation. None otherwise."""
    if getattr(module, "has_bias", False) or getattr(module, "has_post_expert_norm", False):
        return None
    activation = _activation_name(getattr(module, "act_fn", None))
    if activation is None:
        return None
    w2 = _in_out(module, module.down_proj)  # [E, F, d]
    if not module.has_gate:
        return _in_out(module, module.up_proj), w2, None, activation
    if not _has_default_gate(module):
        return None
    gate_up = _in_out(module, module.gate_up_proj)  # [E, d, 2F]: gate columns first, then up
    f = gate_up.shape[2] // 2
    return gate_up[..., :f], w2, gate_up[..., f:], activation


def experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    options: MoEOptions | None = None,
    impl: str = "auto",
    block_size: int | None = None,
) -> torch.Tensor:
    """``ExpertsInterface`` entry: ``self`` is the model's experts module, ``hidden_states`` ``[T, d]``.

    ``options`` (default ``MoEOptions()``; ``impl`` / ``block_size`` are a convenience that builds them) are
    ``moe_mlp``'s for standard modules; the others run ``custom_moe_mlp`` with their ``backend`` and ``check``.
    Expert-parallel sentinels (ids >= E, under HF's own expert parallelism) contribute zero."""
    options = options_from(options, impl=impl, block_size=block_size)
    if getattr(self, "_is_expert_parallel", False):
        options = replace(options, check=False)
    weights = moe_mlp_weights(self)
    if weights is not None:
        w1, w2, w3, activation = weights
        x = hidden_states.to(w1.dtype)
        out = moe_mlp(x, top_k_index, top_k_weights, w1, w2, w3, activation=activation, options=options)
        return out.to(hidden_states.dtype)
    has_bias = getattr(self, "has_bias", False)
    up_name = "gate_up_proj" if self.has_gate else "up_proj"
    up = _in_out(self, getattr(self, up_name))
    out = custom_moe_mlp(
        hidden_states.to(up.dtype),
        top_k_index,
        top_k_weights,
        up,
        _in_out(self, self.down_proj),
        activation=self._apply_gate if self.has_gate else self.act_fn,
        up_bias=getattr(self, f"{up_name}_bias") if has_bias else None,
        down_bias=self.down_proj_bias if has_bias else None,
        post=self.post_expert_norm if getattr(self, "has_post_expert_norm", False) else None,
        backend=options.backend,
        check=options.check,
    )
    return out.to(hidden_states.dtype)


def register(
    name: str = NAME, *, options: MoEOptions | None = None, impl: str = "auto", block_size: int | None = None
) -> None:
    """Register ``name`` (default ``"blocksparse_moe"``) in transformers' ``ExpertsInterface`` (idempotent) with
    ``options`` for ``experts_forward``; ``impl`` / ``block_size`` are a convenience that builds them. The options
    are validated here, not at the first forward."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    options = options_from(options, impl=impl, block_size=block_size)
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "blocksparse_moe.integrations.transformers needs transformers >= 5 with "
            f"transformers.integrations.moe.ExpertsInterface (pip install 'blocksparse_moe[hf]'): {exc}"
        ) from exc
    if options == MoEOptions():
        ExpertsInterface.register(name, experts_forward)
    else:
        ExpertsInterface.register(name, partial(experts_forward, options=options))


def from_hf(module: nn.Module):
    """Convert a ``SwitchTransformersSparseMLP`` into an equivalent :class:`PaddedMoE` holding copies of its weights.

    Switch routes each token to its top-1 expert (softmax in the router's dtype, weight = that probability, no
    renormalisation), gives every sequence ``expert_capacity`` slots per expert in token order, and drops the
    overflow: that is ``PaddedMoE(top_k=1, capacity=expert_capacity, num_groups="sequence", glu=False)`` with the
    expert's own activation. The weights are copied into the ``[E, d, f]`` / ``[E, f, d]`` layout (a new module
    that owns its parameters; the two do not share storage). The experts' dropout is not reproduced, so outputs
    match in eval mode.
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
            moe.experts.w1[e].copy_(expert.wi.weight.t())
            moe.experts.w2[e].copy_(expert.wo.weight.t())
    return moe
