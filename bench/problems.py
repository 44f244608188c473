"""Benchmark problems: shapes, routing distributions and fresh random inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Shape", "Problem", "parse_routing", "make_routing", "make_problem"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Shape:
    """One MoE MLP layer and one batch: T tokens of width d, E experts of width f, top-k routing."""

    tokens: int
    hidden: int
    ffn: int
    experts: int
    top_k: int
    glu: bool
    activation: str
    routing: str  # "uniform" | "zipf:S" | "one-hot"

    @property
    def assignments(self) -> int:
        return self.tokens * self.top_k


@dataclass
class Problem:
    """Inputs of one benchmark case; the float tensors are leaves that require grad."""

    shape: Shape
    x: torch.Tensor  # [T, d]
    top_k_index: torch.Tensor  # [T, k] int32
    top_k_weights: torch.Tensor  # [T, k]
    w1: torch.Tensor  # [E, d, f]
    w2: torch.Tensor  # [E, f, d]
    w3: torch.Tensor | None  # [E, d, f] (GLU)
    tokens_per_expert: list[int]  # host copy of the routing histogram (for FLOP and drop accounting)

    @property
    def inputs(self) -> list[torch.Tensor]:
        """Differentiable inputs, in the order gradients are taken."""
        ts = [self.x, self.top_k_weights, self.w1, self.w2]
        return ts if self.w3 is None else [*ts, self.w3]


def parse_routing(spec: str) -> tuple[str, float]:
    """``"uniform"``, ``"one-hot"`` or ``"zipf:S"`` (S > 0) -> (kind, exponent)."""
    if spec in ("uniform", "one-hot"):
        return spec, 0.0
    kind, _, value = spec.partition(":")
    if kind == "zipf":
        try:
            s = float(value)
        except ValueError:
            s = -1.0
        if s > 0 and math.isfinite(s):
            return kind, s
    raise ValueError(f"routing must be 'uniform', 'one-hot' or 'zipf:S' with S > 0, got {spec!r}")


def make_routing(spec: str, tokens: int, experts: int, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """``[T, k]`` int32 distinct expert ids per token (CPU).

    uniform: each token's k experts uniformly at random; zipf:S: expert e is chosen with probability ∝
    ``1/(e+1)^S`` (k distinct, Gumbel top-k); one-hot: every token goes to experts ``0..k-1``.
    """
    kind, s = parse_routing(spec)
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k must be in [1, experts={experts}], got {top_k}")
    if kind == "one-hot":
        return torch.arange(top_k, dtype=torch.int32).expand(tokens, top_k).contiguous()
    logits = torch.zeros(experts)
    if kind == "zipf":
        logits = -s * torch.log(torch.arange(1, experts + 1, dtype=torch.float32))
    u = torch.rand(tokens, experts, generator=generator).clamp_(1e-20, 1.0)
    gumbel = -torch.log(-torch.log(u))
    return (logits + gumbel).topk(top_k, dim=1).indices.to(torch.int32)


def make_problem(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Problem:
    """Fresh random inputs (normal, scaled so activations stay O(1)); softmax combine weights."""
    g = torch.Generator().manual_seed(seed)
    T, d, f, E, k = shape.tokens, shape.hidden, shape.ffn, shape.experts, shape.top_k
    index = make_routing(shape.routing, T, E, k, g)
    counts = torch.bincount(index.reshape(-1).long(), minlength=E).tolist()

    def leaf(*size: int, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*size, generator=g) * scale
        return t.to(device=device, dtype=dtype).requires_grad_()

    weights = torch.softmax(torch.randn(T, k, generator=g), dim=1).to(device=device, dtype=dtype).requires_grad_()
    return Problem(
        shape=shape,
        x=leaf(T, d),
        top_k_index=index.to(device),
        top_k_weights=weights,
        w1=leaf(E, d, f, scale=d**-0.5),
        w2=leaf(E, f, d, scale=f**-0.5),
        w3=leaf(E, d, f, scale=d**-0.5) if shape.glu else None,
        tokens_per_expert=counts,
    )
