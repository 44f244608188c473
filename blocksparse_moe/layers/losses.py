"""Router auxiliary losses: Switch/GShard load balancing (per micro-batch, or over the global batch of a process
group), DeepSeek-V3's per-sequence balance loss and the ST-MoE router z-loss. Pure functions of tensors."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..config import INDEX_DTYPES
from ..validation import check_tensor, positive_int

__all__ = ["load_balancing_loss", "sequence_balance_loss", "router_z_loss"]


def _check_index(top_k_index: torch.Tensor) -> None:
    if top_k_index.dtype not in INDEX_DTYPES:
        raise TypeError(f"top_k_index must be int32 or int64, got {top_k_index.dtype}")


def _expert_counts(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``counts [..., E]`` fp32: how many of each row's assignments ``top_k_index [..., n]`` go to each expert."""
    index = top_k_index.long()
    counts = torch.zeros(*index.shape[:-1], num_experts, dtype=torch.float32, device=index.device)
    return counts.scatter_add_(-1, index, torch.ones_like(index, dtype=torch.float32))


def load_balancing_loss(
    router_probs: torch.Tensor, top_k_index: torch.Tensor, num_experts: int, *, group=None
) -> torch.Tensor:
    """``E · Σ_e f_e · P_e`` (Switch Transformer eq. 4, over all top-k assignments).

    ``f_e`` is the fraction of the ``T·k`` assignments sent to expert ``e`` (not differentiable) and ``P_e`` the
    mean router probability of ``e``. Equals 1 under perfect balance. Returns an fp32 scalar; 0 when ``T = 0``.

    With a process ``group``, ``f`` is the global batch's: the counts (and the number of assignments) are summed
    over the group's ranks (one ``all_reduce``, every rank must call it), while ``P`` stays this rank's, so the
    gradient is local (the global-batch balance loss of Qwen's "Demons in the detail"; a rank with no tokens
    contributes counts and a zero loss).
    """
    positive_int("num_experts", num_experts)
    if router_probs.dim() != 2 or router_probs.shape[1] != num_experts:
        raise ValueError(f"router_probs must be [T, E={num_experts}], got shape {tuple(router_probs.shape)}")
    T = router_probs.shape[0]
    if top_k_index.dim() != 2 or top_k_index.shape[0] != T:
        raise ValueError(f"top_k_index must be [T={T}, k], got shape {tuple(top_k_index.shape)}")
    _check_index(top_k_index)
    counts = _expert_counts(top_k_index.reshape(1, -1), num_experts)[0]
    if group is not None:
        total = torch.cat([counts, counts.new_full((1,), top_k_index.numel())])
        dist.all_reduce(total, group=group)
        counts, assignments = total[:-1], total[-1:]
    elif top_k_index.numel() == 0:
        return router_probs.float().sum() * 0.0
    else:
        assignments = top_k_index.numel()
    if T == 0:
        return router_probs.float().sum() * 0.0
    fraction = counts / assignments
    mean_prob = router_probs.float().mean(0)
    return num_experts * (fraction * mean_prob).sum()


def sequence_balance_loss(
    router_scores: torch.Tensor, top_k_index: torch.Tensor, num_experts: int, *, seq_len: int | None = None
) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss (its eq. 17-20), averaged over the sequences.

    Per sequence of ``S`` tokens: ``E · Σ_e f_e · P_e`` with ``f_e`` the fraction of the sequence's ``S·k``
    assignments sent to ``e`` and ``P_e`` the sequence's mean of the scores normalised over the experts
    (``s / Σ_e s``: the sigmoid scores of DeepSeek-V3; softmax probabilities are already normalised). 1 under
    perfect balance within every sequence. fp32 scalar; 0 when there are no tokens.

    The sequences come from the shapes: ``router_scores [B, S, E]`` with ``top_k_index [B, S, k]``, or the flat
    ``[T, E]`` / ``[T, k]`` of the layers with ``seq_len`` (``T`` a multiple of it, sequences consecutive).
    """
    positive_int("num_experts", num_experts)
    if seq_len is not None:
        positive_int("seq_len", seq_len)
        check_tensor("router_scores", router_scores, "[T, E]", (None, num_experts))
        if router_scores.shape[0] % seq_len:
            raise ValueError(
                f"seq_len must divide the number of tokens T={router_scores.shape[0]} of router_scores, got {seq_len}"
            )
        B = router_scores.shape[0] // seq_len
        check_tensor("top_k_index", top_k_index, "[T, k]", (router_scores.shape[0], None))
        router_scores = router_scores.reshape(B, seq_len, num_experts)
        top_k_index = top_k_index.reshape(B, seq_len, top_k_index.shape[1])
    else:
        check_tensor("router_scores", router_scores, "[B, S, E] (or [T, E] with seq_len)", (None, None, num_experts))
        check_tensor("top_k_index", top_k_index, "[B, S, k]", tuple(router_scores.shape[:2]) + (None,))
    _check_index(top_k_index)
    B, S, k = top_k_index.shape
    if B * S * k == 0:
        return router_scores.float().sum() * 0.0
    fraction = _expert_counts(top_k_index.reshape(B, S * k), num_experts) / (S * k)  # [B, E]
    scores = router_scores.float()
    mean_prob = (scores / scores.sum(-1, keepdim=True)).mean(1)  # [B, E]
    return num_experts * (fraction * mean_prob).sum(-1).mean()


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of ``logsumexp(logits)²`` (fp32 scalar; 0 when there are no tokens)."""
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got shape {tuple(router_logits.shape)}")
    if router_logits.shape[0] == 0:
        return router_logits.float().sum() * 0.0
    return torch.logsumexp(router_logits.float(), dim=-1).square().mean()
