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
    host sync, traceable by ``torch.compile``. Computes in ``x.dtype``.
    """
    act = get_activation(activation)
    E = w1.shape[0]
    # combine[t, e] = Σ_j top_k_weights[t, j] · [top_k_index[t, j] == e]  (duplicates add up)
    combine = x.new_zeros(x.shape[0], E).scatter_add(1, top_k_index.long(), top_k_weights.to(x.dtype))
    out = x.new_zeros(x.shape[0], w2.shape[2])
    for e in range(E):
        h = act(x @ w1[e])
        if w3 is not None:
            h = h * (x @ w3[e])
        out = out + combine[:, e : e + 1] * (h @ w2[e])
    return out
