"""Hugging Face transformers' own experts implementations beside ours: the ``hf_experts`` rows of ``python -m bench``.

One ``MixtralExperts`` module (transformers' layout: ``gate_up_proj [E, 2f, d]``, ``down_proj [E, d, f]``) holds the
problem's weights; each row runs it through one ``ExpertsInterface`` implementation — transformers' ``eager``
(its per-expert loop), ``grouped_mm`` and ``batched_mm`` (skipped where its per-assignment weight copies would
exceed ``BATCHED_MM_MAX_BYTES``), and ``blocksparse_moe`` (this package, registered by
``integrations.transformers.register``) — so every row computes the same layer from the same parameters, forward
and backward (x, the top-k weights and both weight tensors require grad). Gated (GLU) problems only; skipped with a
note when transformers is not installed.

With FP8 recipes (``python -m bench --fp8 RECIPE``), one more row per recipe serves a copy of the module with
prequantized FP8 experts (``integrations.transformers.quantize_experts_fp8_``, before timing) through ours, forward
only: ``hf:blocksparse_moe+fp8:<recipe>:prequant`` (``strategies.prequant_case_name``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from .problems import Problem
from .strategies import Case, prequant_case_name

__all__ = ["IMPLEMENTATIONS", "BASELINE", "hf_cases"]

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")  # transformers' own; ours is added under its NAME
BASELINE = "hf:grouped_mm"  # transformers' fastest on CPU: the row the others' speedup is measured against
BATCHED_MM_MAX_BYTES = 2**30  # batched_mm copies its expert's weights for every assignment: skipped above this


def _as_reference(f: int) -> Callable[[tuple], tuple]:
    """Gradients ``(x, weights, gate_up_proj, down_proj)`` in the reference's order ``(x, weights, w1, w2, w3)``."""

    def convert(grads: tuple) -> tuple:
        dx, dweights, dgate_up, ddown = grads
        return dx, dweights, dgate_up[:, :f].transpose(1, 2), ddown.transpose(1, 2), dgate_up[:, f:].transpose(1, 2)

    return convert


def hf_cases(p: Problem, useful: int, skipped: list[str], fp8: tuple[str, ...] = ()) -> list[Case]:
    """One case per experts implementation (``hf:<name>``) and one per FP8 recipe of ``fp8`` on prequantized
    weights, or none (with the reason in ``skipped``)."""
    s = p.shape
    if p.w3 is None:
        skipped.append("hf_experts: transformers' Mixtral experts are gated; this problem has no GLU")
        return []
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        from blocksparse_moe.integrations import transformers as bsm_hf
    except ImportError as e:
        skipped.append(f"hf_experts: transformers not importable ({e})")
        return []
    bsm_hf.register()
    config = MixtralConfig(
        hidden_size=s.hidden,
        intermediate_size=s.ffn,
        num_local_experts=s.experts,
        num_experts_per_tok=s.top_k,
        hidden_act=s.activation,
    )
    module = MixtralExperts(config).to(device=p.x.device, dtype=p.x.dtype)
    with torch.no_grad():
        module.gate_up_proj.copy_(torch.cat([p.w1, p.w3], dim=2).transpose(1, 2))
        module.down_proj.copy_(p.w2.transpose(1, 2))
    parameters = [module.gate_up_proj, module.down_proj]
    index = p.top_k_index.long()
    cases = []
    names = list(IMPLEMENTATIONS)
    copies = s.assignments * 3 * s.hidden * s.ffn * p.x.element_size()
    if copies > BATCHED_MM_MAX_BYTES:
        skipped.append(f"hf:batched_mm: its per-assignment weight copies take {copies / 2**30:.1f} GiB "
                       f"(> {BATCHED_MM_MAX_BYTES / 2**30:g} GiB)")  # fmt: skip
        names.remove("batched_mm")
    for name in (*names, bsm_hf.NAME):

        def forward(name: str = name) -> torch.Tensor:
            module.config._experts_implementation = name
            return module(p.x, index, p.top_k_weights)

        inputs = [p.x, p.top_k_weights, *parameters]
        case = Case(f"hf:{name}", forward, inputs, useful, useful, parameters=parameters)
        case.grads_as_reference = _as_reference(s.ffn)
        cases.append(case)
    for recipe in fp8:
        quantized = copy.deepcopy(module).eval()
        bsm_hf.quantize_experts_fp8_(quantized, recipe)
        quantized.config._experts_implementation = bsm_hf.NAME

        def forward(quantized: torch.nn.Module = quantized) -> torch.Tensor:
            with torch.no_grad():
                return quantized(p.x, index, p.top_k_weights)

        buffers = list(quantized.buffers())
        case = Case(prequant_case_name(f"hf:{bsm_hf.NAME}", recipe), forward, [p.x, p.top_k_weights], useful, useful,
                    fp8=recipe, parameters=buffers)  # fmt: skip
        case.notes.append("inference: experts prequantized (quantize_experts_fp8_), forward only")
        cases.append(case)
    return cases
