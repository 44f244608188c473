"""Hugging Face transformers integration (transformers >= 5; an optional dependency imported only here).

``register()`` adds ``"blocksparse_moe"`` to ``transformers.integrations.moe.ExpertsInterface``; then
``model.set_experts_implementation("blocksparse_moe")`` (or ``from_pretrained(...,
experts_implementation="blocksparse_moe")``) runs every MoE model whose experts module uses that interface
(Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, gpt-oss, ...) through ``functional``'s one dropless core:

- a **standard** experts module (the default gate ``act(gate) * up`` over concatenated gate/up columns, or no gate;
  no biases, no post-expert norm; ``act_fn`` one of ``moe_mlp``'s named activations) is ``moe_mlp`` over views of
  its weights (``moe_mlp_weights``): ``impl="auto"`` is the block-sparse strategy on CUDA (the activation fused
  into the second GEMM) and the grouped one elsewhere;
- any other (a custom ``_apply_gate`` such as gpt-oss's clamped SwiGLU over interleaved columns, biases, a
  post-expert norm, an unknown activation) is ``custom_moe_mlp``: the grouped strategy with the module's own gate
  applied to whole rows.

Weights are used in place (views: transposed or not, gradients flow to the model's parameters).

Conversion both ways (``from_hf``, ``to_hf``) and sparse upcycling (``upcycle``) are in ``hf_convert`` (with the
mapping of HF expert weights onto ``moe_mlp``'s, ``moe_mlp_weights``), re-exported here.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ..functional import custom_moe_mlp, moe_mlp
from .hf_convert import _activation_name, _in_out, from_hf, moe_mlp_weights, to_hf, upcycle  # noqa: F401

NAME = "blocksparse_moe"

__all__ = ["NAME", "register", "experts_forward", "moe_mlp_weights", "from_hf", "to_hf", "upcycle"]


def experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    impl: str = "auto",
    block_size: int | None = None,
) -> torch.Tensor:
    """``ExpertsInterface`` entry: ``self`` is the model's experts module, ``hidden_states`` ``[T, d]``.

    ``impl`` / ``block_size`` apply to standard modules (``moe_mlp``'s options); the others run
    ``custom_moe_mlp``. Expert-parallel sentinels (ids >= E, under HF's own expert parallelism) contribute zero."""
    check = False if getattr(self, "_is_expert_parallel", False) else None
    weights = moe_mlp_weights(self)
    if weights is not None:
        w1, w2, w3, activation = weights
        x = hidden_states.to(w1.dtype)
        out = moe_mlp(
            x,
            top_k_index,
            top_k_weights,
            w1,
            w2,
            w3,
            activation=activation,
            impl=impl,
            block_size=block_size,
            check=check,
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
        check=check,
    )
    return out.to(hidden_states.dtype)


def register(name: str = NAME, *, impl: str = "auto", block_size: int | None = None) -> None:
    """Register ``name`` (default ``"blocksparse_moe"``) in transformers' ``ExpertsInterface`` (idempotent);
    ``impl`` / ``block_size`` go to ``experts_forward``."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "blocksparse_moe.integrations.transformers needs transformers >= 5 with "
            f"transformers.integrations.moe.ExpertsInterface (pip install 'blocksparse_moe[hf]'): {exc}"
        ) from exc
    if impl == "auto" and block_size is None:
        ExpertsInterface.register(name, experts_forward)
    else:
        ExpertsInterface.register(name, partial(experts_forward, impl=impl, block_size=block_size))
