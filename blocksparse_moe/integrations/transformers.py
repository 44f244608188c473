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

Conversion both ways (``from_hf``, ``to_hf``) and sparse upcycling (``upcycle``) are in ``hf_convert`` (with the
mapping of HF expert weights onto ``moe_mlp``'s, ``moe_mlp_weights``), re-exported here.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
from torch import nn

from ..functional import custom_moe_mlp, moe_mlp
from ..options import MoEOptions, options_from
from .hf_convert import _activation_name, _in_out, from_hf, moe_mlp_weights, to_hf, upcycle  # noqa: F401

NAME = "blocksparse_moe"

__all__ = ["NAME", "register", "experts_forward", "moe_mlp_weights", "from_hf", "to_hf", "upcycle"]


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
    are ``moe_mlp``'s for standard modules; the others run ``custom_moe_mlp`` with their ``backend``, ``check`` and
    ``fp8``.
    Expert-parallel sentinels (ids >= E, under HF's own expert parallelism) contribute zero."""
    options = options_from(options, impl=impl, block_size=block_size, fp8=fp8)
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
        fp8=options.fp8,
    )
    return out.to(hidden_states.dtype)


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
