"""Reference MoE MLPs in plain PyTorch: the per-token loop the tests compare against, and the expert loop
behind ``moe_mlp(impl="reference")``.

Expert ``e`` maps a token ``x`` to ``act(x @ w1[e]) @ w2[e]``, or with ``w3`` (GLU)
``(act(x @ w1[e]) * (x @ w3[e])) @ w2[e]``; the MoE output is ``out[t] = Σ_j top_k_weights[t, j] ·
expert_{top_k_index[t, j]}(x[t])``.
"""

from __future__ import annotations

import torch

from .activations import ACTIVATIONS, Activation, get_activation

__all__ = ["ACTIVATIONS", "Activation", "get_activation", "per_token_moe_mlp", "expert_loop_moe_mlp"]


def per_token_moe_mlp(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None = None,
    activation: str | Activation = "gelu",
) -> torch.Tensor:
    """Float64 loop over tokens and their choices (slow, obviously correct; differentiable). Returns float64."""
    act = get_activation(activation)
    x, top_k_weights, w1, w2 = x.double(), top_k_weights.double(), w1.double(), w2.double()
    w3 = None if w3 is None else w3.double()
    rows = []
    for t in range(x.shape[0]):
        acc = x.new_zeros(w2.shape[2])
        for j in range(top_k_index.shape[1]):
            e = int(top_k_index[t, j])
            h = act(x[t] @ w1[e])
            if w3 is not None:
                h = h * (x[t] @ w3[e])
            acc = acc + top_k_weights[t, j] * (h @ w2[e])
        rows.append(acc)
    return torch.stack(rows) if rows else x.new_zeros(0, w2.shape[2])


def expert_loop_moe_mlp(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None = None,
    activation: str | Activation = "gelu",
) -> torch.Tensor:
    """Loop over experts, each applied densely to all tokens and masked by its combine weights.

    Runs every expert on every token (``E×`` the useful FLOPs) so that nothing depends on device data: no
    host sync, traceable by ``torch.compile``. Computes in ``x.dtype`` and combines in ``top_k_weights``' dtype
    (at least fp32), rounding once to ``x.dtype``. A token's output depends only on the experts it chose: the others
    see a zero row and their outputs are selected away (never multiplied by a zero weight, so an inf or NaN in an
    unchosen expert stays out). Ids outside ``[0, E)`` choose nothing (contribute zero; no indexing by them).
    """
    act = get_activation(activation)
    E = w1.shape[0]
    wdtype = torch.promote_types(top_k_weights.dtype, torch.float32)
    # hit[t, j, e] = [top_k_index[t, j] == e]: an invalid id hits no expert; duplicates add up in combine
    hit = top_k_index.unsqueeze(-1) == torch.arange(E, device=top_k_index.device)
    combine = torch.where(hit, top_k_weights.to(wdtype).unsqueeze(-1), 0).sum(1)  # [T, E]
    chosen = hit.any(1)  # [T, E]
    out = x.new_zeros(x.shape[0], w2.shape[2], dtype=wdtype)
    for e in range(E):
        mask = chosen[:, e : e + 1]
        xe = torch.where(mask, x, 0)
        h = act(xe @ w1[e])
        if w3 is not None:
            h = h * (xe @ w3[e])
        out = out + torch.where(mask, combine[:, e : e + 1] * (h @ w2[e]).to(wdtype), 0)
    return out.to(x.dtype)
