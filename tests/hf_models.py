"""Tiny random Hugging Face MoE models (transformers >= 5), shared by the integration tests: one per experts layout
the integration handles. Each entry builds a config; transformers is imported when one is built."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64)


def _tf() -> Any:
    import transformers

    return transformers


CONFIGS: dict[str, Callable[[], Any]] = {
    # gated, concatenated gate/up, [E, 2F, d] weights, softmax top-2 renormalised
    "mixtral": lambda: _tf().MixtralConfig(
        **TINY, intermediate_size=24, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2
    ),
    # odd expert count (E = 5) and a moe width (20) that is not a multiple of anything useful (a partial 32 group)
    "qwen3_moe": lambda: _tf().Qwen3MoeConfig(
        **TINY,
        intermediate_size=24,
        moe_intermediate_size=20,
        num_key_value_heads=1,
        num_experts=5,
        num_experts_per_tok=2,
        head_dim=16,
    ),
    # k = 3 of 6 experts, un-normalised top-k weights
    "olmoe": lambda: _tf().OlmoeConfig(
        **TINY, intermediate_size=24, num_key_value_heads=2, num_experts=6, num_experts_per_tok=3
    ),
    # transposed [E, d, 2F] weights, interleaved gate/up, biases, custom clamped _apply_gate
    "gpt_oss": lambda: _tf().GptOssConfig(
        **TINY,
        intermediate_size=24,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        head_dim=16,
        layer_types=["full_attention"],
    ),
    # sigmoid router with groups, a shared expert beside the routed ones, k = 3 of 6, moe width 10
    "deepseek_v3": lambda: _tf().DeepseekV3Config(
        **TINY,
        intermediate_size=24,
        moe_intermediate_size=10,
        n_routed_experts=6,
        n_shared_experts=1,
        num_experts_per_tok=3,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=0,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        num_key_value_heads=2,
    ),
}
