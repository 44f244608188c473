"""Hugging Face transformers integration (transformers >= 5; an optional dependency imported only here).

``register()`` adds ``"blocksparse_moe"`` to ``transformers.integrations.moe.ExpertsInterface``; then
``model.set_experts_implementation("blocksparse_moe")`` (or ``from_pretrained(...,
experts_implementation="blocksparse_moe")``) runs every MoE model whose experts module uses that interface
(Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, gpt-oss, ...) through ``functional``'s one dropless core:

- a **standard** experts module (the default gate ``act(gate) * up`` over concatenated gate/up columns, or no gate;
  no biases, no post-expert norm; ``act_fn`` one of ``moe_mlp``'s named activations) is ``moe_mlp`` over views of
  its weights (``moe_mlp_weights``) with the registered ``MoEOptions``: ``impl="auto"`` is the grouped
  strategy (the block-sparse one with a ``block_size``, ``options.resolve_impl``), the activation applied in the
  up-projection's epilogue;
- any other (a custom ``_apply_gate`` such as gpt-oss's clamped SwiGLU over interleaved columns, biases, a
  post-expert norm, an unknown activation) is ``custom_moe_mlp``: the grouped strategy with the module's own gate
  applied to whole rows (the registered options' ``backend`` and ``check``).

Weights are used in place (views: transposed or not, gradients flow to the model's parameters).

For serving, ``quantize_experts_fp8_(model, fp8)`` replaces the weights of every (standard) experts module by
prequantized FP8 buffers (E4M3 plus scales, ``fp8.prequantize``: about 1 byte per weight in the ``state_dict``);
``experts_forward`` then runs ``moe_mlp(..., weight_scales=)`` on them, bit for bit the ``register(fp8=recipe)``
forward of the weights they came from (inference only).

Conversion both ways (``from_hf``, ``to_hf``) and sparse upcycling (``upcycle``) are in ``hf_convert`` (with the
mapping of HF expert weights onto ``moe_mlp``'s, ``moe_mlp_weights``), re-exported here.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
from torch import nn

from ..fp8 import RECIPES, check_loaded_dtypes, check_recipe, prequantize, uncast
from ..functional import custom_moe_mlp, moe_mlp
from ..options import MoEOptions, options_from
from ..strategies.common import up_operand_is
from .hf_convert import _activation_name, _in_out, from_hf, moe_mlp_weights, to_hf, upcycle  # noqa: F401

NAME = "blocksparse_moe"

__all__ = [
    "NAME",
    "register",
    "experts_forward",
    "quantize_experts_fp8_",
    "moe_mlp_weights",
    "from_hf",
    "to_hf",
    "upcycle",
]


def experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    options: MoEOptions | None = None,
    impl: str = "auto",
    block_size: int | None = None,
    fp8: str | None = None,
) -> torch.Tensor:
    """``ExpertsInterface`` entry: ``self`` is the model's experts module, ``hidden_states`` ``[T, d]``.

    ``options`` (default ``MoEOptions()``; ``impl`` / ``block_size`` / ``fp8`` are a convenience that builds them)
    are ``moe_mlp``'s for standard modules; the others run ``custom_moe_mlp`` with their ``backend``, ``check``,
    ``fp8`` and ``fp8_cache_x`` (None: False where the experts compute with ``hidden_states`` itself, which the
    model's gate linear keeps for backward, ``_gate_keeps``; give True for a gate that keeps a copy of its own, such
    as DeepSeek-V3's fp32 one). A module prequantized by ``quantize_experts_fp8_`` runs on its FP8 weights (the options'
    ``fp8`` None or the module's recipe; inference only) in ``hidden_states``' dtype.
    Expert-parallel sentinels (ids >= E, under HF's own expert parallelism) contribute zero."""
    options = options_from(options, impl=impl, block_size=block_size, fp8=fp8)
    if getattr(self, "_is_expert_parallel", False):
        options = replace(options, check=False)
    weights = moe_mlp_weights(self)
    if options.fp8 is not None and options.fp8_cache_x is None:  # custom_moe_mlp: the grouped strategy
        impl = options.impl if weights is not None else "grouped"
        options = replace(options, fp8_cache_x=not _gate_keeps(self, hidden_states, impl))
    if weights is not None:
        w1, w2, w3, activation = weights
        scales = None
        if isinstance(self, _PrequantizedExperts):
            if options.fp8 not in (None, self.prequantized):
                raise ValueError(
                    f"the experts hold prequantized FP8 weights of recipe {self.prequantized!r} "
                    f"(quantize_experts_fp8_): the registered fp8 option must be None or {self.prequantized!r}, got "
                    f"fp8={options.fp8!r}"
                )
            options, scales = replace(options, fp8=self.prequantized), self.weight_scales()
        x = hidden_states if scales is not None else hidden_states.to(w1.dtype)  # E4M3 weights take any float x
        out = moe_mlp(
            x, top_k_index, top_k_weights, w1, w2, w3, activation=activation, options=options, weight_scales=scales
        )
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
        fp8=options.fp8,
        fp8_cache_x=options.fp8_cache_x,
    )
    return out.to(hidden_states.dtype)


def _gate_keeps(experts: nn.Module, hidden_states: torch.Tensor, impl: str) -> bool:
    """Whether the model's gate linear keeps the very x the experts compute with for its weight gradient (then the
    experts keep x rather than an FP8 copy: ``MoEOptions.fp8_cache_x``): grad on, ``experts_forward``'s cast to the
    expert weights' dtype a no-op, and strategy ``impl`` computing with x itself (``up_operand_is``)."""
    up = experts.gate_up_proj if experts.has_gate else experts.up_proj
    return torch.is_grad_enabled() and up.dtype == hidden_states.dtype and up_operand_is(hidden_states, impl)


def register(
    name: str = NAME,
    *,
    options: MoEOptions | None = None,
    impl: str = "auto",
    block_size: int | None = None,
    fp8: str | None = None,
) -> None:
    """Register ``name`` (default ``"blocksparse_moe"``) in transformers' ``ExpertsInterface`` (idempotent) with
    ``options`` for ``experts_forward``; ``impl`` / ``block_size`` / ``fp8`` (an FP8 recipe of the experts' GEMMs,
    ``MoEOptions.fp8``) are a convenience that builds them. The options are validated here, not at the first
    forward."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    options = options_from(options, impl=impl, block_size=block_size, fp8=fp8)
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


class _PrequantizedExperts(nn.Module):
    """Placed before an HF experts module's class by ``quantize_experts_fp8_`` (one class per experts class, as
    ``fully_shard`` does): its weights ``gate_up_proj`` (or ``up_proj``) and ``down_proj`` are E4M3 buffers of the
    same names, shapes and layout (stored K-major for ``moe_mlp_weights``' views), ``<name>_scale`` their scales
    (``fp8.prequantize`` of those views: ``gate_up_proj_scale [2, E, ...]`` those of the gate half, then the up
    half), ``prequantized`` their recipe."""

    prequantized: str
    _experts_class: type  # the experts class this one prefixes

    def _fp8_tensors(self) -> dict[str, torch.Tensor]:
        up = "gate_up_proj" if self.has_gate else "up_proj"
        return {n: self.get_buffer(n) for n in (up, f"{up}_scale", "down_proj", "down_proj_scale")}

    def weight_scales(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``moe_mlp``'s ``weight_scales`` ``(s1, s2, s3)`` for the views ``moe_mlp_weights`` gives."""
        s1, s3 = self.gate_up_proj_scale.unbind(0) if self.has_gate else (self.up_proj_scale, None)
        return s1, self.down_proj_scale, s3

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module``'s, the FP8 weights and scales moved but never cast (``fp8.uncast``)."""
        return super()._apply(uncast(fn, self._fp8_tensors().values()), recurse)

    def __reduce_ex__(self, protocol):
        """Pickled (``torch.save(model)``, ``copy.deepcopy``) as the experts class it prefixes and the state: the
        generated class has no importable name, ``_prequantized_class`` makes it again on load."""
        return _restore_prequantized, (self._experts_class, self.__getstate__())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        """``nn.Module``'s, refusing checkpoint entries of another dtype (another recipe, unquantized weights)."""
        check_loaded_dtypes(self.prequantized, self._fp8_tensors(), state_dict, prefix, errors)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)


_CLASSES: dict[type, type] = {}


def _prequantized_class(cls: type) -> type:
    """The class of a prequantized ``cls`` module: ``_PrequantizedExperts`` placed before it, one per class."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Prequantized{cls.__name__}", (_PrequantizedExperts, cls), {"_experts_class": cls})
    return _CLASSES[cls]


def _restore_prequantized(cls: type, state: dict) -> nn.Module:
    """Unpickles a prequantized ``cls`` module (``_PrequantizedExperts.__reduce_ex__``)."""
    module = object.__new__(_prequantized_class(cls))
    module.__setstate__(state)
    return module


def _is_experts(module: nn.Module) -> bool:
    """Whether ``module`` is an experts module of transformers' ``ExpertsInterface`` (``use_experts_implementation``
    sets these flags)."""
    return all(hasattr(module, a) for a in ("has_gate", "is_transposed", "down_proj"))


@torch.no_grad()
def quantize_experts_fp8_(model: nn.Module, fp8: str) -> int:
    """Replace the expert weights of every experts module in ``model`` (transformers' ``ExpertsInterface`` modules:
    Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, ...) by prequantized FP8 weights of recipe ``fp8`` (``fp8.RECIPES``),
    for inference; returns the number of modules quantized (0: the model has no experts module).

    Each module's ``gate_up_proj`` (or ``up_proj``) and ``down_proj`` parameters become E4M3 buffers of the same
    names and shapes, with ``<name>_scale`` buffers holding their scales (``fp8.prequantize`` of ``moe_mlp_weights``'
    views ``w1``, ``w3``, ``w2``: exactly the quantization ``register(fp8=...)`` applies at each call): the
    ``state_dict`` holds about 1 byte per weight, and loads (``torch.save`` / ``torch.load``) into a model on which
    this was called, bit for bit; an entry of another dtype (another recipe, unquantized weights) is an error naming
    the key. ``module.prequantized`` names the recipe. ``experts_forward`` then runs ``moe_mlp(...,
    weight_scales=)`` on them: registered options with ``fp8`` None or this recipe (another is an error), impl
    ``"auto"``, ``"grouped"`` or ``"blocksparse"``, nothing requiring grad (run under ``torch.inference_mode()``).
    ``model.to(dtype)`` (``.half()``, ...) casts everything else and leaves the FP8 buffers as they are (their
    dtypes are the recipe's); ``.to(device)`` moves them.

    Errors (nothing is changed then): ``fp8`` not a recipe; a module already quantized (a second call); a module
    that is not ``moe_mlp``'s standard form (``moe_mlp_weights`` None: a custom gate such as gpt-oss's, biases, a
    post-expert norm, an unknown activation: they run ``custom_moe_mlp``, which has no prequantized path); a module
    in training mode whose weights require grad (call ``model.eval()`` or ``requires_grad_(False)`` first); a
    module under transformers' own expert parallelism."""
    rcp = check_recipe("fp8", fp8)
    if rcp is None:
        raise ValueError(f"fp8 must be one of {RECIPES}, got None")
    experts = [(name, m) for name, m in model.named_modules() if _is_experts(m)]
    for name, m in experts:
        where = f"experts module {name or type(m).__name__!r} ({type(m).__name__})"
        if isinstance(m, _PrequantizedExperts):
            raise ValueError(f"{where} already holds prequantized FP8 weights (recipe {m.prequantized!r})")
        if moe_mlp_weights(m) is None:
            raise ValueError(
                f"{where} is not moe_mlp's standard form (a custom gate, biases, a post-expert norm or an unknown "
                f"activation): it runs custom_moe_mlp, which has no prequantized FP8 path"
            )
        if m.training and any(p.requires_grad for p in m.parameters()):
            raise ValueError(
                f"{where} is in training mode with weights requiring grad: prequantized FP8 weights are for inference "
                f"(call model.eval() or requires_grad_(False) first)"
            )
        if getattr(m, "_is_expert_parallel", False):
            raise ValueError(f"{where} is sharded by transformers' expert parallelism: prequantization does not shard")
    for _, m in experts:
        _quantize(m, rcp)
    return len(experts)


def _quantize(module: nn.Module, fp8: str) -> None:
    """One experts module's weights as E4M3 buffers + scales (``quantize_experts_fp8_``), its class prefixed."""
    w1, w2, w3, _ = moe_mlp_weights(module)
    (q1, s1), (q2, s2) = prequantize(w1, fp8), prequantize(w2, fp8)
    if w3 is None:
        up, up_scale = q1, s1
    else:  # [E, d, 2F], the gate columns then the up columns, K-major (each half a K-major view, as prequantize's)
        q3, s3 = prequantize(w3, fp8)
        up, up_scale = torch.cat([q1.transpose(1, 2), q3.transpose(1, 2)], 1).transpose(1, 2), torch.stack([s1, s3])
    for name, q, s in (("gate_up_proj" if w3 is not None else "up_proj", up, up_scale), ("down_proj", q2, s2)):
        delattr(module, name)
        module.register_buffer(name, q if module.is_transposed else q.transpose(1, 2))  # [E, in, out] or [E, out, in]
        module.register_buffer(f"{name}_scale", s)
    module.__class__ = _prequantized_class(type(module))
    module.prequantized = fp8
