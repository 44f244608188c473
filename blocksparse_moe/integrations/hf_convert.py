"""Hugging Face MoE blocks to this library's layers and back, and sparse upcycling of a dense HF MLP.

How an HF experts module's weights map onto ``moe_mlp``'s ``w1 [E, d, f]``, ``w2 [E, f, d]``, ``w3 [E, d, f]``
(views, ``moe_mlp_weights``) lives here, and the conversions are copies through those same views, so the two
directions cannot disagree:

- ``from_hf(block)``: a sparse MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, or Switch
  Transformers' sparse MLP) -> an equivalent ``dMoE`` (Switch: ``PaddedMoE``) holding copies of its weights;
- ``to_hf(layer, block)``: the layer's weights written back into the block (in place);
- ``upcycle(mlp, num_experts, top_k)``: a ``dMoE`` whose every expert is a copy of a dense gated MLP (Llama, Qwen2,
  Mistral: ``gate_proj`` / ``up_proj`` / ``down_proj``), equal to it at initialisation.

transformers (>= 5) is needed only to build the HF modules; nothing here imports it at module level.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import positive_int

__all__ = ["moe_mlp_weights", "from_hf", "to_hf", "upcycle"]


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
    w1, w3 = gate_up.split(gate_up.shape[2] // 2, dim=2)  # one split: its backward is one cat, not two scatters
    return w1, w2, w3, activation


# The sparse MoE blocks whose router this module reproduces, by class name: a block of another class with the same
# attribute names may route differently (gpt-oss: softmax after the top-k, a router bias), so it is refused.
_ROUTED_BLOCKS = {
    "MixtralSparseMoeBlock": "softmax",  # softmax, top-k always renormalised
    "Qwen2MoeSparseMoeBlock": "softmax",  # softmax, renormalised when norm_topk_prob; sigmoid-gated shared expert
    "Qwen3MoeSparseMoeBlock": "softmax",  # softmax, renormalised when norm_topk_prob
    "OlmoeSparseMoeBlock": "softmax",
    "DeepseekV3MoE": "deepseek",  # sigmoid + e_score_correction_bias, groups, routed_scaling_factor, shared experts
}


def _router_options(block: nn.Module) -> dict:
    """``TopKRouter`` options that reproduce the block's router."""
    gate = block.gate
    if _ROUTED_BLOCKS[type(block).__name__] == "softmax":
        return dict(
            score="softmax",
            normalize=bool(getattr(gate, "norm_topk_prob", True)),  # Mixtral's router has no flag: always
            jitter_eps=getattr(block, "jitter_noise", 0.0) or None,
        )
    groups = gate.num_group > 1
    return dict(
        score="sigmoid",
        normalize=bool(gate.norm_topk_prob),
        expert_bias=True,
        num_expert_groups=gate.num_group if groups else None,
        topk_groups=gate.topk_group if groups else None,
        scaling_factor=float(gate.routed_scaling_factor),
    )


def _shared_mlp(block: nn.Module) -> nn.Module | None:
    """The block's dense shared expert (Qwen2-MoE's ``shared_expert``; DeepSeek's several ``shared_experts`` are
    one wider MLP), or None."""
    shared = getattr(block, "shared_experts", None)
    return shared if shared is not None else getattr(block, "shared_expert", None)


def _dense_weights(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """``(gate [f, d], up [f, d], down [d, f], activation)`` of a dense HF gated MLP (``gate_proj`` / ``up_proj``
    / ``down_proj``, no biases, a named activation)."""
    projections = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, nn.Linear) for p in projections):
        raise TypeError(
            f"expected a gated MLP with nn.Linear gate_proj, up_proj and down_proj (Llama, Qwen2, Mistral), got "
            f"{type(mlp).__name__}"
        )
    if any(p.bias is not None for p in projections):
        raise ValueError(f"expected projections without bias, got biases in {type(mlp).__name__}")
    activation = _activation_name(getattr(mlp, "act_fn", None))
    if activation is None:
        raise ValueError(
            f"expected act_fn one of moe_mlp's named activations, got {getattr(mlp, 'act_fn', None)!r} in "
            f"{type(mlp).__name__}"
        )
    gate, up, down = (p.weight for p in projections)
    return gate, up, down, activation


def _layer_pairs(layer: nn.Module, block: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(layer tensor, block tensor view)`` pairs of equal shape: what ``from_hf`` copies one way and ``to_hf``
    the other."""
    w1, w2, w3, _ = moe_mlp_weights(block.experts)
    pairs = [
        (layer.router.weight, block.gate.weight),
        (layer.experts.w1, w1),
        (layer.experts.w2, w2),
        (layer.experts.w3, w3),
    ]
    if layer.router.expert_bias is not None:
        pairs.append((layer.router.expert_bias, block.gate.e_score_correction_bias))
    shared = _shared_mlp(block)
    if shared is not None:
        gate, up, down, _ = _dense_weights(shared)
        # the layer's shared expert computes down(act(up(x)) * gate(x)): its "up" is HF's activated gate_proj
        pairs += [(layer.shared_expert.up.weight, gate), (layer.shared_expert.gate.weight, up)]
        pairs.append((layer.shared_expert.down.weight, down))
        gate_proj = getattr(block, "shared_expert_gate", None)  # Qwen2-MoE: sigmoid(x · w) scales the shared expert
        if gate_proj is not None:
            pairs.append((layer.shared_expert_gate.weight, gate_proj.weight))
    for ours, theirs in pairs:
        if ours.shape != theirs.shape:
            raise ValueError(
                f"layer and block must have the same sizes, got {tuple(ours.shape)} in the layer where the block "
                f"has {tuple(theirs.shape)} (a sharded or differently built layer?)"
            )
    return pairs


def from_hf(block: nn.Module, **layer_options) -> nn.Module:
    """An equivalent layer holding copies of an HF sparse MoE block's weights (a new module: training one does not
    change the other).

    - Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: ``dMoE`` with softmax routing (renormalised as the block: always for
      Mixtral, ``norm_topk_prob`` otherwise); Qwen2-MoE's shared expert with its sigmoid gate
      (``shared_expert_gate=True``);
    - DeepSeek-V3: ``dMoE`` with sigmoid scores, ``expert_bias`` (a copy of ``e_score_correction_bias``), group-limited
      routing (``n_group`` / ``topk_group``), ``scaling_factor=routed_scaling_factor`` and its shared experts as
      one wider dense shared expert;
    - Switch Transformers' ``SwitchTransformersSparseMLP``: ``PaddedMoE`` (see ``_from_switch``).

    Its forward equals the block's (outputs; ``layer.router(x)[0]`` equals the block's router logits) in float32;
    the router runs in float32 whatever the experts' dtype. ``layer_options`` go to the layer's constructor
    (``impl``, ``block_size``, ``load_balancing_weight`` (default 0 here: HF computes its balancing loss at the model
    level, from the router logits), ...). Differences in training: Mixtral's ``router_jitter_noise`` (0 in the
    released configs) multiplies the experts' input as well, here the router's only; the Switch experts' dropout is
    not reproduced.
    """
    if getattr(getattr(block, "router", None), "expert_capacity", None) is not None:
        return _from_switch(block, **layer_options)
    family = _ROUTED_BLOCKS.get(type(block).__name__)
    weights = moe_mlp_weights(block.experts) if family is not None else None
    if weights is None:
        raise TypeError(
            "block must be the sparse MoE block of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 (with standard "
            f"experts: default gate, no bias) or a SwitchTransformersSparseMLP, got {type(block).__name__}"
        )
    from ..layers.moe import dMoE

    w1, _, _, activation = weights
    gate = block.gate
    shared = _shared_mlp(block)
    if shared is not None and _dense_weights(shared)[3] != activation:
        raise ValueError("the shared expert must use the routed experts' activation, got a different one")
    layer = dMoE(
        w1.shape[1],
        w1.shape[2],
        gate.num_experts,
        gate.top_k,
        activation=activation,
        glu=True,
        shared_expert_size=shared.gate_proj.out_features if shared is not None else None,
        shared_expert_gate=getattr(block, "shared_expert_gate", None) is not None,
        **{"load_balancing_weight": 0.0, **_router_options(block), **layer_options},
    )
    layer = layer.to(device=w1.device, dtype=w1.dtype)
    layer.router.to(dtype=gate.weight.dtype)
    with torch.no_grad():
        for ours, theirs in _layer_pairs(layer, block):
            ours.copy_(theirs)
    return layer


def to_hf(layer: nn.Module, block: nn.Module) -> nn.Module:
    """Write ``layer``'s weights (router, expert bias, experts, shared expert) into ``block`` in place, the inverse
    of ``from_hf`` for the same families (Switch: the router and experts); returns ``block``. Not for prequantized
    FP8 experts (``MoEExperts.quantize_fp8_``: no master weights to write; a ``ValueError``)."""
    prequantized = getattr(getattr(layer, "experts", None), "prequantized", None)
    if prequantized is not None:
        raise ValueError(
            f"to_hf writes master weights; layer's experts hold prequantized FP8 weights (recipe {prequantized!r})"
        )
    if getattr(getattr(block, "router", None), "expert_capacity", None) is not None:
        pairs = _switch_pairs(layer, block)
    elif type(block).__name__ in _ROUTED_BLOCKS and moe_mlp_weights(block.experts) is not None:
        pairs = _layer_pairs(layer, block)
    else:
        raise TypeError(f"block must be a block that from_hf converts, got {type(block).__name__}")
    with torch.no_grad():
        for ours, theirs in pairs:
            theirs.copy_(ours)
    return block


def upcycle(mlp: nn.Module, num_experts: int, top_k: int, *, router_std: float = 0.02, **layer_options) -> nn.Module:
    """Sparse upcycling (Komatsuzaki et al. 2023): a ``dMoE`` of ``num_experts`` copies of a dense gated HF MLP
    (``gate_proj`` / ``up_proj`` / ``down_proj``: Llama, Qwen2, Mistral), ``top_k`` of them per token.

    The combine weights are renormalised over the chosen experts (``normalize=True``, also at ``top_k = 1``, where
    the router then gets no gradient from the task loss until the experts differ), so every token's output equals the
    dense MLP's at initialisation, whatever the router. The router weight is drawn from ``N(0, router_std²)`` (0.02:
    the HF models' ``initializer_range``); the experts then diverge through training. ``layer_options`` go to
    ``dMoE`` (``impl``, ``load_balancing_weight``, router options such as ``score``; ``normalize=False`` or a
    ``scaling_factor`` other than 1 would break the equality and are refused).
    """
    positive_int("num_experts", num_experts)
    positive_int("top_k", top_k)
    gate, up, down, activation = _dense_weights(mlp)
    allowed = {"normalize": True, "scaling_factor": 1.0, "glu": None, "activation": None}
    for name, value in allowed.items():
        if name in layer_options and layer_options[name] != value:
            raise ValueError(
                f"upcycle sets {name} itself (the experts copy the dense MLP), got {name}={layer_options[name]!r}"
            )
    from ..layers.moe import dMoE

    f, d = gate.shape
    layer = dMoE(d, f, num_experts, top_k, activation=activation, glu=True, normalize=True, **layer_options)
    layer = layer.to(device=gate.device, dtype=gate.dtype)
    with torch.no_grad():
        layer.router.weight.normal_(0.0, router_std)
        layer.experts.w1.copy_(gate.t().expand_as(layer.experts.w1))
        layer.experts.w3.copy_(up.t().expand_as(layer.experts.w3))
        layer.experts.w2.copy_(down.t().expand_as(layer.experts.w2))
    return layer


def _switch_pairs(layer: nn.Module, block: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    experts = block.experts
    pairs = [(layer.router.weight, block.router.classifier.weight)]
    for e in range(block.router.num_experts):
        expert = experts[f"expert_{e}"]
        pairs += [(layer.experts.w1[e], expert.wi.weight.t()), (layer.experts.w2[e], expert.wo.weight.t())]
    return pairs


def _from_switch(module: nn.Module, **layer_options) -> nn.Module:
    """Convert a ``SwitchTransformersSparseMLP`` into an equivalent ``PaddedMoE`` holding copies of its weights.

    Switch routes each token to its top-1 expert (softmax in the router's dtype, weight = that probability, no
    renormalisation), gives every sequence ``expert_capacity`` slots per expert in token order, and drops the
    overflow: that is ``PaddedMoE(top_k=1, capacity=expert_capacity, num_groups="sequence", glu=False)`` with the
    expert's own activation. The weights are copied into the ``[E, d, f]`` / ``[E, f, d]`` layout (a new module
    that owns its parameters; the two do not share storage). The experts' dropout is not reproduced, so outputs
    match in eval mode.
    """
    from ..layers.moe import PaddedMoE

    router, experts = module.router, getattr(module, "experts", None)
    if experts is None:
        raise TypeError(f"expected a SwitchTransformersSparseMLP (router + experts), got {type(module).__name__}")
    if router.classifier.bias is not None:
        raise ValueError("router_bias=True is not supported: TopKRouter has no bias, got a router with a bias")
    first = experts["expert_0"]
    d, f = first.wi.in_features, first.wi.out_features
    moe = PaddedMoE(
        d,
        f,
        router.num_experts,
        top_k=1,
        capacity=int(router.expert_capacity),
        num_groups="sequence",
        activation=first.act,
        glu=False,
        **{
            "load_balancing_weight": 0.0,
            "normalize": False,
            "jitter_eps": router.jitter_noise or None,
            "router_dtype": router.dtype,
            **layer_options,
        },
    )
    moe = moe.to(device=router.classifier.weight.device, dtype=first.wi.weight.dtype)
    with torch.no_grad():
        for ours, theirs in _switch_pairs(moe, module):
            ours.copy_(theirs)
    return moe
