"""Router auxiliary losses: Switch/GShard load balancing and the ST-MoE router z-loss. Pure functions."""

from __future__ import annotations

import torch

__all__ = ["load_balancing_loss", "router_z_loss"]


def load_balancing_loss(router_probs: torch.Tensor, top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``E · Σ_e f_e · P_e`` (Switch Transformer eq. 4, over all top-k assignments).

    ``f_e`` is the fraction of the ``T·k`` assignments sent to expert ``e`` (not differentiable) and ``P_e`` the
    mean router probability of ``e``. Equals 1 under perfect balance. Returns an fp32 scalar; 0 when ``T = 0``.
    """
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if router_probs.dim() != 2 or router_probs.shape[1] != num_experts:
        raise ValueError(f"router_probs must be [T, E={num_experts}], got shape {tuple(router_probs.shape)}")
    if top_k_index.dim() != 2 or top_k_index.shape[0] != router_probs.shape[0]:
        raise ValueError(f"top_k_index must be [T={router_probs.shape[0]}, k], got shape {tuple(top_k_index.shape)}")
    if top_k_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"top_k_index must be int32 or int64, got {top_k_index.dtype}")
    if top_k_index.numel() == 0:
        return router_probs.float().sum() * 0.0
    flat = top_k_index.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.float32, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
    fraction = counts / flat.numel()
    mean_prob = router_probs.float().mean(0)
    return num_experts * (fraction * mean_prob).sum()


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of ``logsumexp(logits)²`` (fp32 scalar; 0 when there are no tokens)."""
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got shape {tuple(router_logits.shape)}")
    if router_logits.shape[0] == 0:
        return router_logits.float().sum() * 0.0
    return torch.logsumexp(router_logits.float(), dim=-1).square().mean()
