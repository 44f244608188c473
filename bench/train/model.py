"""A small decoder-only byte-level transformer whose FFN blocks are the library's MoE layers, or a dense FFN.

Pre-norm blocks: ``x + attn(rms(x))`` (causal ``F.scaled_dot_product_attention``), then ``x + ffn(rms(x))``;
learned positions; the output head is tied to the byte embedding. The FFN of every block is one of

- ``dmoe[:IMPL]``: ``bsm.dMoE`` (dropless; IMPL ``auto`` | ``blocksparse`` | ``grouped``), softmax router with the
  load-balancing and z-loss,
- ``dmoe[:IMPL]+deepseek``: the same with DeepSeek-V3's routing: sigmoid scores renormalised over the chosen
  experts, group-limited (groups of 2 experts, half of them allowed, at least enough for k), an expert bias updated
  after every optimizer step (``bsm.update_expert_bias``, auxiliary-loss-free balancing: no balancing or z-loss) and
  one shared expert of width ``f`` (so ``f`` more active FFN width per token than ``dmoe``),
- ``padded@CF``: ``bsm.PaddedMoE`` with ``capacity_factor=CF`` (one capacity group per batch),
- any of the MoE configs with ``+fp8=RECIPE`` (``blockwise`` | ``mxfp8`` | ``rowwise``): its expert GEMMs in FP8
  (``MoEOptions.fp8``; emulated in this release),
- ``dense``: a SwiGLU MLP of width ``k·f``: the same active parameters per token as the MoE layers (whose
  experts are SwiGLU MLPs of width ``f``, ``k`` of them per token; the router's ``d·E`` not counted).

Under autocast (bf16 on GPU) the MoE layers run their experts in the autocast dtype, as an ``nn.Linear`` runs
(``moe_mlp`` casts x and the expert weights; gradients reach the fp32 weights), while the router stays in fp32.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import blocksparse_moe as bsm

from .data import VOCAB

__all__ = ["ROUTERS", "ModelSize", "FFNSpec", "ByteLM", "build_model", "deepseek_options"]


@dataclass(frozen=True)
class ModelSize:
    d_model: int
    n_layers: int
    n_heads: int
    seq_len: int
    ffn: int  # f, the expert width (the dense FFN is k·f wide)
    experts: int
    top_k: int

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model must be divisible by n_heads, got {self.d_model} and {self.n_heads}")
        if self.top_k > self.experts:
            raise ValueError(f"top_k must be <= experts, got top_k={self.top_k} with experts={self.experts}")


_SPEC = re.compile(
    r"^(?:(dense)|dmoe(?::(auto|blocksparse|grouped))?(\+deepseek)?|padded@([0-9.eE+-]+?))"
    r"(?:\+fp8=(" + "|".join(bsm.fp8.RECIPES) + r"))?$"
)
ROUTERS = ("softmax", "deepseek")


@dataclass(frozen=True)
class FFNSpec:
    """Which FFN the blocks use: ``kind`` ``"dmoe"`` (with ``impl`` and ``router``), ``"padded"`` (with
    ``capacity_factor``), or ``"dense"``. ``name`` is the spelling ``parse`` reads."""

    kind: str
    impl: str = "auto"
    capacity_factor: float | None = None
    router: str = "softmax"  # one of ROUTERS (dmoe only)
    fp8: str | None = None  # an FP8 recipe of the experts' GEMMs (MoE configs only)

    @classmethod
    def parse(cls, text: str) -> FFNSpec:
        match = _SPEC.match(text)
        cf = None
        if match and match.group(4) is not None:
            try:
                cf = float(match.group(4))
            except ValueError:
                match = None
        if (
            match is None
            or (cf is not None and not (cf > 0 and math.isfinite(cf)))
            or (match.group(1) and match.group(5))
        ):
            raise ValueError(
                f"an FFN config must be 'dmoe', 'dmoe:IMPL' (IMPL auto|blocksparse|grouped), either with "
                f"'+deepseek', 'padded@CF' (CF > 0), each optionally with '+fp8=RECIPE' (RECIPE "
                f"{'|'.join(bsm.fp8.RECIPES)}), or 'dense', got {text!r}"
            )
        fp8 = match.group(5)
        if match.group(1):
            return cls("dense")
        if cf is not None:
            return cls("padded", impl="padded", capacity_factor=cf, fp8=fp8)
        return cls("dmoe", impl=match.group(2) or "auto", router="deepseek" if match.group(3) else "softmax", fp8=fp8)

    @property
    def name(self) -> str:
        if self.kind == "dense":
            return "dense"
        suffix = "" if self.fp8 is None else f"+fp8={self.fp8}"
        if self.kind == "padded":
            return f"padded@{self.capacity_factor:g}{suffix}"
        name = "dmoe" if self.impl == "auto" else f"dmoe:{self.impl}"
        return (name if self.router == "softmax" else f"{name}+{self.router}") + suffix

    @property
    def is_moe(self) -> bool:
        return self.kind != "dense"


class DenseFFN(nn.Module):
    """SwiGLU MLP ``down(silu(up(x)) * gate(x))``, ``nn.Linear`` initialisation (as the MoE experts')."""

    def __init__(self, d: int, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, width, bias=False)
        self.gate = nn.Linear(d, width, bias=False)
        self.down = nn.Linear(width, d, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.down(F.silu(self.up(x)) * self.gate(x)), x.new_zeros((), dtype=torch.float32)


class Block(nn.Module):
    def __init__(self, size: ModelSize, ffn: nn.Module) -> None:
        super().__init__()
        d = size.d_model
        self.n_heads = size.n_heads
        self.attn_norm = nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.ffn_norm = nn.RMSNorm(d)
        self.ffn = ffn

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(B, S, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, S, d))
        y, aux = self.ffn(self.ffn_norm(x))
        return x + y, aux


class ByteLM(nn.Module):
    """``forward(bytes [B, S] int64) -> (logits [B, S, 256], aux_loss [] fp32: the MoE layers' sum)``."""

    def __init__(self, size: ModelSize, ffns: list[nn.Module]) -> None:
        super().__init__()
        self.size = size
        self.embed = nn.Embedding(VOCAB, size.d_model)
        self.pos = nn.Embedding(size.seq_len, size.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(size, ffn) for ffn in ffns)
        self.norm = nn.RMSNorm(size.d_model)

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        S = idx.shape[1]
        if self.size.seq_len < S:
            raise ValueError(f"sequences must be at most seq_len={self.size.seq_len} bytes, got {S}")
        x = self.embed(idx) + self.pos.weight[:S]
        aux = x.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            x, block_aux = block(x)
            aux = aux + block_aux
        return F.linear(self.norm(x), self.embed.weight), aux

    def ffns(self) -> list[nn.Module]:
        """The FFN of each block, in order (``bsm.dMoE`` / ``bsm.PaddedMoE`` or ``DenseFFN``)."""
        return [block.ffn for block in self.blocks]


def deepseek_options(size: ModelSize) -> dict:
    """``dMoE`` options of the ``+deepseek`` configs (see the module docstring)."""
    groups = size.experts // 2 if size.experts % 2 == 0 and size.experts >= 4 else None
    options = dict(
        score="sigmoid",
        normalize=True,
        expert_bias=True,
        shared_expert_size=size.ffn,
        load_balancing_weight=0.0,
        z_loss_weight=0.0,
    )
    if groups is not None:  # half the groups, and at least the k / 2 groups that k experts need
        options.update(num_expert_groups=groups, topk_groups=max(groups // 2, -(-size.top_k // 2)))
    return options


def build_model(
    size: ModelSize,
    spec: FFNSpec,
    *,
    load_balancing_weight: float = 0.01,
    z_loss_weight: float = 1e-3,
    block_size: int | None = None,
) -> ByteLM:
    """The LM with ``spec``'s FFN in every block. Call under a fixed ``torch.manual_seed``: dMoE and PaddedMoE
    then get identical weights (same constructor order), so they compute the same function when nothing drops."""

    def ffn() -> nn.Module:
        d, f, E, k = size.d_model, size.ffn, size.experts, size.top_k
        common = dict(activation="silu", glu=True, load_balancing_weight=load_balancing_weight, fp8=spec.fp8)
        if spec.kind == "dense":
            return DenseFFN(d, k * f)
        if spec.kind == "padded":
            return bsm.PaddedMoE(
                d, f, E, k, capacity_factor=spec.capacity_factor, z_loss_weight=z_loss_weight, **common
            )
        options = dict(block_size=block_size) if block_size is not None and spec.impl != "grouped" else {}
        if spec.router == "deepseek":
            return bsm.dMoE(d, f, E, k, impl=spec.impl, **{**common, **options, **deepseek_options(size)})
        return bsm.dMoE(d, f, E, k, impl=spec.impl, z_loss_weight=z_loss_weight, **common, **options)

    return ByteLM(size, [ffn() for _ in range(size.n_layers)])
