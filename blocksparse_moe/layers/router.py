"""Top-k token-choice router (Switch / GShard / Mixtral / Shazeer / DeepSeek-V3 variants) and the auxiliary-loss-free
balancing update of its expert bias (DeepSeek-V3)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..validation import boolean, choice, non_negative_number, positive_int

__all__ = ["TopKRouter", "update_expert_bias"]

SCORES = ("softmax", "sigmoid")


def _autocast_off(device_type: str):
    """A region where autocast is off for ``device_type`` (a no-op where autocast does not exist or is off)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


class _Linear(torch.autograd.Function):
    """``F.linear(x.to(dtype), w.to(dtype))`` that keeps ``x`` itself for backward, not its ``dtype`` copy: the cast
    is redone in backward (an fp32 router over bf16 tokens saves 2 bytes per element instead of 4, and the same
    storage as whatever else keeps x, the experts' MLP included). The numbers are autograd's of the same two ops bit
    for bit: ``dx = (dy @ w32).to(x.dtype)``, ``dw = (dyᵀ @ x32).to(w.dtype)``. Each operand is saved only where the
    other's gradient needs it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.dtypes = (x.dtype, w.dtype, dtype)
        need_x, need_w = ctx.needs_input_grad[:2]
        ctx.save_for_backward(x if need_w else None, w if need_x else None)
        return F.linear(x.to(dtype), w.to(dtype))

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, w = ctx.saved_tensors
        x_dtype, w_dtype, dtype = ctx.dtypes
        dx = dw = None
        with _autocast_off(dy.device.type):
            if ctx.needs_input_grad[0]:
                dx = dy.mm(w.to(dtype)).to(x_dtype)
            if ctx.needs_input_grad[1]:
                dw = dy.t().mm(x.to(dtype)).to(w_dtype)
        return dx, dw, None  # None for dtype


class TopKRouter(nn.Module):
    """Linear router choosing ``top_k`` of ``num_experts`` experts per token.

    Args:
        score: ``"softmax"`` over experts, or an independent ``"sigmoid"`` per expert (DeepSeek-V3).
        normalize: renormalise the top-k scores to sum to 1 over the selected experts (Mixtral; DeepSeek-V3 with
            sigmoid scores). Default: ``top_k > 1``; at k = 1 the renormalised weight is p/p = 1, which gives the
            router no gradient from the task loss (Switch keeps p).
        jitter_eps: training only, multiply the router input by ``U(1 - eps, 1 + eps)`` (Switch).
        noisy_gating: training only, add ``N(0, 1) · softplus(x @ w_noise)`` to the logits, with ``w_noise`` a
            learned projection initialised to zero (Shazeer et al. 2017, noisy top-k gating).
        random_second: training only, ``top_k = 2``: keep the second expert with probability
            ``min(1, 2 · p2 / p1)``, else give it weight 0 (GShard).
        expert_bias: a per-expert bias *buffer* ``expert_bias [E]`` (fp32, zeros) added to the scores for the
            choice of experts only; the combine weights come from the unbiased scores (DeepSeek-V3's
            auxiliary-loss-free balancing). In training the router counts the tokens sent to each expert in the
            buffer ``tokens_per_expert [E]`` (int64, on the device, no host sync; not saved in the state_dict);
            ``update_expert_bias`` turns the counts into a bias update and resets them.
        num_expert_groups, topk_groups: group-limited routing (DeepSeek-V3's ``n_group`` / ``topk_group``): the
            experts form ``num_expert_groups`` equal groups of consecutive ids, each group is scored by the sum of
            its two best (biased) scores (its best one when a group holds one expert), and every token picks its
            ``top_k`` experts inside its ``topk_groups`` best groups only. Both or neither.
        scaling_factor: the combine weights are multiplied by this (DeepSeek-V3's ``routed_scaling_factor``),
            after the renormalisation.
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
        expert_bias: bool = False,
        num_expert_groups: int | None = None,
        topk_groups: int | None = None,
        scaling_factor: float = 1.0,
        router_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_experts", num_experts), ("top_k", top_k)):
            positive_int(name, value)
        if top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts={num_experts}, got {top_k}")
        choice("score", score, SCORES)
        if normalize is None:
            normalize = top_k > 1
        boolean("normalize", normalize)
        if jitter_eps is not None and (non_negative_number("jitter_eps", jitter_eps) >= 1):
            raise ValueError(f"jitter_eps must be None or a number in [0, 1), got {jitter_eps!r}")
        boolean("noisy_gating", noisy_gating)
        boolean("random_second", random_second)
        if random_second and top_k != 2:
            raise ValueError(f"random_second needs top_k=2, got top_k={top_k}")
        boolean("expert_bias", expert_bias)
        self._check_groups(num_experts, top_k, num_expert_groups, topk_groups)
        if non_negative_number("scaling_factor", scaling_factor) == 0:
            raise ValueError(f"scaling_factor must be a finite positive number, got {scaling_factor!r}")
        if not isinstance(router_dtype, torch.dtype) or not router_dtype.is_floating_point:
            raise TypeError(f"router_dtype must be a floating torch.dtype, got {router_dtype!r}")
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.score, self.normalize, self.jitter_eps = score, normalize, jitter_eps
        self.random_second, self.router_dtype = random_second, router_dtype
        self.num_expert_groups, self.topk_groups = num_expert_groups, topk_groups
        self.scaling_factor = float(scaling_factor)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's default
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, hidden_size)) if noisy_gating else None
        self.register_buffer("expert_bias", torch.zeros(num_experts) if expert_bias else None)
        self.register_buffer(
            "tokens_per_expert", torch.zeros(num_experts, dtype=torch.int64) if expert_bias else None, persistent=False
        )

    @staticmethod
    def _check_groups(num_experts: int, top_k: int, num_groups: object, topk_groups: object) -> None:
        if (num_groups is None) != (topk_groups is None):
            raise ValueError(
                f"num_expert_groups and topk_groups must be given together, got num_expert_groups={num_groups!r}, "
                f"topk_groups={topk_groups!r}"
            )
        if num_groups is None:
            return
        positive_int("num_expert_groups", num_groups)
        positive_int("topk_groups", topk_groups)
        if num_experts % num_groups:
            raise ValueError(
                f"num_expert_groups must divide num_experts={num_experts}, got num_expert_groups={num_groups}"
            )
        if topk_groups > num_groups:
            raise ValueError(f"topk_groups must be <= num_expert_groups={num_groups}, got {topk_groups}")
        if top_k > topk_groups * (num_experts // num_groups):
            raise ValueError(
                f"topk_groups={topk_groups} groups of {num_experts // num_groups} experts hold fewer than "
                f"top_k={top_k} experts: topk_groups must be at least {-(-top_k // (num_experts // num_groups))}"
            )

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Router probabilities ``[T, E]`` from the logits (softmax or sigmoid)."""
        return logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()

    def _apply(self, fn, recurse: bool = True):
        """``module.to(dtype)`` / ``.half()`` keep ``expert_bias`` in fp32: its updates (``rate`` ~1e-3) would vanish
        in a 16-bit bias of magnitude ~1."""
        super()._apply(fn, recurse)
        if self.expert_bias is not None and self.expert_bias.dtype != torch.float32:
            self.expert_bias = self.expert_bias.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"x must be [T, hidden_size={self.hidden_size}], got shape {tuple(x.shape)}")
        with _autocast_off(x.device.type):
            return self._route(x)

    def _choice_scores(self, probs: torch.Tensor) -> torch.Tensor:
        """The scores the experts are chosen by: ``probs`` plus the expert bias, outside the chosen groups -inf."""
        choice_scores = probs if self.expert_bias is None else probs + self.expert_bias.to(probs.dtype)
        if self.num_expert_groups is None:
            return choice_scores
        grouped = choice_scores.unflatten(-1, (self.num_expert_groups, -1))  # [T, G, E / G]
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # [T, G]
        top_groups = group_scores.topk(self.topk_groups, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(-2)

    def saves_input(self) -> bool:
        """Whether a forward called now keeps its input ``x`` itself for backward (its weight gradients' operand,
        ``_Linear``): grad mode on, a router weight requiring grad, and no jitter (in training with ``jitter_eps`` it
        keeps the jittered copy instead). ``MoELayer`` lets the experts keep that x rather than an FP8 copy of it."""
        jittered = self.training and bool(self.jitter_eps)
        weights = [self.weight] + ([self.noise_weight] if self.training and self.noise_weight is not None else [])
        return torch.is_grad_enabled() and not jittered and any(w.requires_grad for w in weights)

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = x  # the linears' input, kept for backward in its own dtype (_Linear); with jitter a new fp32 tensor
        if self.training and self.jitter_eps:
            h = x.to(self.router_dtype)
            h = h * torch.empty_like(h).uniform_(1 - self.jitter_eps, 1 + self.jitter_eps)
        logits = _Linear.apply(h, self.weight, self.router_dtype)
        if self.training and self.noise_weight is not None:
            noise_std = F.softplus(_Linear.apply(h, self.noise_weight, self.router_dtype))
            logits = logits + torch.randn_like(logits) * noise_std
        probs = self.scores(logits)
        choice_scores = self._choice_scores(probs)
        top_choice, top_k_index = choice_scores.topk(self.top_k, dim=-1)
        # the combine weights come from the unbiased scores: topk's own values where there is no bias, else a gather
        top_probs = top_choice if self.expert_bias is None else probs.gather(1, top_k_index)
        # + 1e-20: sigmoid scores can all underflow (DeepSeek-V3's guard); below half an ulp of any softmax top-k sum
        top_k_weights = top_probs / (top_probs.sum(-1, keepdim=True) + 1e-20) if self.normalize else top_probs
        if self.training and self.random_second:
            p1, p2 = top_probs.detach().unbind(-1)
            keep = torch.rand_like(p2) < (2 * p2 / p1).clamp(max=1)
            top_k_weights = torch.stack([top_k_weights[:, 0], top_k_weights[:, 1] * keep], dim=-1)
        if self.scaling_factor != 1.0:
            top_k_weights = top_k_weights * self.scaling_factor
        if self.training and self.tokens_per_expert is not None:
            flat = top_k_index.detach().reshape(-1)
            self.tokens_per_expert.scatter_add_(0, flat, torch.ones_like(flat))
        return logits, top_k_weights, top_k_index

    def extra_repr(self) -> str:
        extra = "".join(
            f", {name}={value!r}"
            for name, value, default in (
                ("expert_bias", self.expert_bias is not None, False),
                ("num_expert_groups", self.num_expert_groups, None),
                ("topk_groups", self.topk_groups, None),
                ("scaling_factor", self.scaling_factor, 1.0),
            )
            if value != default
        )
        return (
            f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"score={self.score!r}, normalize={self.normalize}, router_dtype={self.router_dtype}{extra}"
        )


@torch.no_grad()
def update_expert_bias(layer_or_model: nn.Module, rate: float = 1e-3, group=None) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing step for every ``TopKRouter(expert_bias=True)`` in
    ``layer_or_model``: ``expert_bias += rate · sign(mean load - load)`` (an overloaded expert's bias falls, an
    underloaded one's rises), the update re-centred to mean 0 (so the bias keeps its mean), then the counts reset.

    ``load`` is the router's ``tokens_per_expert``, counted in training since the last update; with a process
    ``group`` the counts of all routers are summed over its ranks first (one ``all_reduce``: pass the group that
    spans the data- and expert-parallel ranks, so every rank applies the same update). Call it after each optimizer
    step, e.g. ``optimizer.register_step_post_hook(lambda *_: update_expert_bias(model))``. No host sync.
    """
    if not isinstance(layer_or_model, nn.Module):
        raise TypeError(f"layer_or_model must be a torch.nn.Module, got {type(layer_or_model).__name__}")
    non_negative_number("rate", rate)
    routers = [m for m in layer_or_model.modules() if isinstance(m, TopKRouter) and m.expert_bias is not None]
    if not routers:
        raise ValueError(
            f"layer_or_model must hold a TopKRouter with expert_bias=True, got none in {type(layer_or_model).__name__}"
        )
    loads = [r.tokens_per_expert for r in routers]
    if group is not None:
        flat = torch.cat(loads)
        dist.all_reduce(flat, group=group)
        loads = flat.split([r.num_experts for r in routers])
    for router, load in zip(routers, loads):
        load = load.float()
        delta = torch.sign(load.mean() - load) * rate
        router.expert_bias.add_(delta - delta.mean())
        router.tokens_per_expert.zero_()
