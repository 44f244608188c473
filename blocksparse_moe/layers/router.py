"""Top-k token-choice router (Switch / GShard / Mixtral / Shazeer variants)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TopKRouter"]

SCORES = ("softmax", "sigmoid")


def _autocast_off(device_type: str):
    """A region where autocast is off for ``device_type`` (a no-op where autocast does not exist or is off)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


class TopKRouter(nn.Module):
    """Linear router choosing ``top_k`` of ``num_experts`` experts per token.

    Args:
        score: ``"softmax"`` over experts, or an independent ``"sigmoid"`` per expert (DeepSeek-V3).
        normalize: renormalise the top-k scores to sum to 1 (Mixtral). Default: ``top_k > 1``; at k = 1 the
            renormalised weight is p/p = 1, which gives the router no gradient from the task loss (Switch keeps p).
        jitter_eps: training only, multiply the router input by ``U(1 - eps, 1 + eps)`` (Switch).
        noisy_gating: training only, add ``N(0, 1) · softplus(x @ w_noise)`` to the logits, with ``w_noise`` a
            learned projection initialised to zero (Shazeer et al. 2017, noisy top-k gating).
        random_second: training only, ``top_k = 2``: keep the second expert with probability
            ``min(1, 2 · p2 / p1)``, else give it weight 0 (GShard).
        router_dtype: the router's math runs in this dtype whatever the input dtype and the autocast state (Switch
            selective precision: autocast is switched off inside the router).

    ``forward(x [T, d])`` returns ``(logits [T, E], top_k_weights [T, k], top_k_index [T, k] int64)``, logits
    and weights in ``router_dtype``; ``scores(logits)`` gives the router probabilities (for the balancing loss).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        score: str = "softmax",
        normalize: bool | None = None,
        jitter_eps: float | None = None,
        noisy_gating: bool = False,
        random_second: bool = False,
        router_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_experts", num_experts), ("top_k", top_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts={num_experts}, got {top_k}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if jitter_eps is not None and not 0 <= jitter_eps < 1:
            raise ValueError(f"jitter_eps must be None or in [0, 1), got {jitter_eps!r}")
        if normalize is None:
            normalize = top_k > 1
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool or None, got {normalize!r}")
        if random_second and top_k != 2:
            raise ValueError(f"random_second needs top_k=2, got top_k={top_k}")
        if not isinstance(router_dtype, torch.dtype) or not router_dtype.is_floating_point:
            raise TypeError(f"router_dtype must be a floating torch.dtype, got {router_dtype!r}")
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.score, self.normalize, self.jitter_eps = score, normalize, jitter_eps
        self.random_second, self.router_dtype = random_second, router_dtype
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's default
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, hidden_size)) if noisy_gating else None

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Router probabilities ``[T, E]`` from the logits (softmax or sigmoid)."""
        return logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"x must be [T, hidden_size={self.hidden_size}], got shape {tuple(x.shape)}")
        with _autocast_off(x.device.type):
            return self._route(x)

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = x.to(self.router_dtype)
        if self.training and self.jitter_eps:
            h = h * torch.empty_like(h).uniform_(1 - self.jitter_eps, 1 + self.jitter_eps)
        logits = F.linear(h, self.weight.to(self.router_dtype))
        if self.training and self.noise_weight is not None:
            noise_std = F.softplus(F.linear(h, self.noise_weight.to(self.router_dtype)))
            logits = logits + torch.randn_like(logits) * noise_std
        probs = self.scores(logits)
        top_probs, top_k_index = probs.topk(self.top_k, dim=-1)
        top_k_weights = top_probs / top_probs.sum(-1, keepdim=True) if self.normalize else top_probs
        if self.training and self.random_second:
            p1, p2 = top_probs.detach().unbind(-1)
            keep = torch.rand_like(p2) < (2 * p2 / p1).clamp(max=1)
            top_k_weights = torch.stack([top_k_weights[:, 0], top_k_weights[:, 1] * keep], dim=-1)
        return logits, top_k_weights, top_k_index

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"score={self.score!r}, normalize={self.normalize}, router_dtype={self.router_dtype}"
        )
