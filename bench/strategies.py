"""The MoE MLP strategies the benchmark compares, each built on one ``Problem``.

Ours (``blocksparse_moe.moe_mlp``): ``blocksparse``, ``grouped``, ``padded`` (one case per capacity factor),
``reference`` (the library's expert loop: every expert on every token). Baselines: ``loop`` (Hugging Face eager
style: per-expert ``torch.where``, host-syncs), ``torch_grouped_mm`` (torchtitan style: sort, offsets,
``torch._grouped_mm`` per matmul; backward n/a wherever it raises), ``megablocks`` / ``scattermoe`` (when
installed, CUDA only), ``hf_experts`` (transformers' own experts implementations and ours through its
``ExpertsInterface``, when transformers is installed: ``bench.hf_experts``), and ``dense``: plain GEMMs of the same
useful FLOPs, the machine's ceiling.

FP8 rows (``fp8``: recipes of ``blocksparse_moe.fp8.RECIPES``): each dropless strategy asked for (``blocksparse``,
``grouped``) once more per recipe, ``moe_mlp(..., fp8=recipe)``, named ``fp8_case_name(strategy, recipe)``
(``"grouped+fp8:blockwise"``), and once more with the weights prequantized (``fp8.prequantize``, before timing:
serving with FP8 weights from a checkpoint), forward only (inference, no graph), named
``prequant_case_name(strategy, recipe)`` (``"grouped+fp8:blockwise:prequant"``; ``hf_experts`` gets the same row
for transformers' experts module, ``bench.hf_experts``). On CPU the PyTorch backend's emulation runs
(``backends.torch_fp8``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from blocksparse_moe.activations import check_name, get_activation
from blocksparse_moe.fp8 import check_recipe, prequantize

from . import flops
from .problems import Problem

__all__ = [
    "STRATEGIES",
    "FP8_STRATEGIES",
    "Case",
    "build_cases",
    "fp8_case_name",
    "prequant_case_name",
    "loop_moe_mlp",
    "grouped_mm_mlp",
    "grouped_mm_moe_mlp",
]

STRATEGIES = (
    "blocksparse",
    "grouped",
    "padded",
    "reference",
    "loop",
    "torch_grouped_mm",
    "megablocks",
    "scattermoe",
    "hf_experts",
    "dense",
)
FP8_STRATEGIES = ("blocksparse", "grouped")  # the strategies the bench also runs with fp8=RECIPE


@dataclass
class Case:
    """One timed row: a forward closure, the tensors to differentiate, and its FLOP accounting."""

    name: str
    forward: Callable[[], torch.Tensor]
    inputs: list[torch.Tensor]
    useful_flops: int  # forward FLOPs of the work actually delivered
    executed_flops: int | None  # forward FLOPs executed, padding included (None: unknown)
    comparable: bool = True  # output should match the reference
    fp8: str | None = None  # the FP8 recipe of moe_mlp (None: the GEMMs in the inputs' dtype)
    capacity_factor: float | None = None
    capacity: int | None = None
    dropped_fraction: float | None = 0.0  # None: not applicable (dense)
    notes: list[str] = field(default_factory=list)
    parameters: list[torch.Tensor] = field(default_factory=list)  # weights: saved-for-backward bytes apart
    # the gradients of ``inputs`` in the reference's order (x, weights, w1, w2, w3), when the inputs differ
    grads_as_reference: Callable[[tuple], tuple] | None = None


def _act(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The library's activation of that name (``blocksparse_moe.activations``: one table everywhere)."""
    return get_activation(check_name(name))


def loop_moe_mlp(p: Problem, x: torch.Tensor, w1, w2, w3, weights) -> torch.Tensor:
    """Per-expert loop over the tokens routed to each expert (``torch.where``: one host sync per expert)."""
    act = _act(p.shape.activation)
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        token, rank = torch.where(p.top_k_index == e)
        if token.numel() == 0:
            continue
        xe = x.index_select(0, token)
        h = act(xe @ w1[e])
        if w3 is not None:
            h = h * (xe @ w3[e])
        out = out.index_add(0, token, (h @ w2[e]) * weights[token, rank].unsqueeze(1))
    return out


def grouped_mm_mlp(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """torchtitan-style dropless MLP: stable sort by expert, offsets, one ``torch._grouped_mm`` per matmul (no host
    sync: ``bench.model`` records it on meta tensors as the ``torch_grouped_mm`` strategy)."""
    act = _act(activation)
    k, E = top_k_index.shape[1], w1.shape[0]
    flat = top_k_index.reshape(-1).long()
    order = flat.argsort(stable=True)
    token = order // k
    counts = torch.zeros(E, dtype=torch.int32, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32)
    )
    offs = counts.cumsum(0, dtype=torch.int32)
    xs = x.index_select(0, token)
    h = act(torch._grouped_mm(xs, w1, offs=offs))
    if w3 is not None:
        h = h * torch._grouped_mm(xs, w3, offs=offs)
    y = torch._grouped_mm(h, w2, offs=offs) * top_k_weights.reshape(-1)[order].unsqueeze(1)
    return torch.zeros_like(x).index_add(0, token, y)


def grouped_mm_moe_mlp(p: Problem, w1, w2, w3) -> torch.Tensor:
    """``grouped_mm_mlp`` on ``p``'s tokens and routing."""
    return grouped_mm_mlp(p.x, p.top_k_index, p.top_k_weights, w1, w2, w3, p.shape.activation)


def fp8_case_name(strategy: str, recipe: str) -> str:
    """The row name of ``strategy`` run with ``fp8=recipe``."""
    return f"{strategy}+fp8:{recipe}"


def prequant_case_name(strategy: str, recipe: str) -> str:
    """The row name of ``strategy`` run with ``fp8=recipe`` on prequantized weights (forward only)."""
    return f"{fp8_case_name(strategy, recipe)}:prequant"


def _column_major(w: torch.Tensor) -> torch.Tensor:
    """Same values, last two dims stored transposed (the layout ``torch._grouped_mm`` wants for ``mat_b`` on GPU)."""
    return w.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()


def build_cases(
    p: Problem,
    names: list[str],
    capacity_factors: list[float],
    block_size: int,
    reference_max_waste: float,
    fp8: tuple[str, ...] = (),
) -> tuple[list[Case], list[str]]:
    """The cases to time for ``names`` (a subset of ``STRATEGIES``), and those of ``FP8_STRATEGIES`` among them once
    more per recipe of ``fp8`` (right after the strategy's own row); returns (cases, notes on skipped ones)."""
    unknown = sorted(set(names) - set(STRATEGIES))
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; expected a subset of {list(STRATEGIES)}")
    for recipe in fp8:
        check_recipe("fp8", recipe)
    s = p.shape
    useful = flops.useful_flops(s.assignments, s.hidden, s.ffn, s.glu)
    w = (p.w1, p.w2, p.w3)
    weights = [t for t in w if t is not None]
    cases: list[Case] = []
    skipped: list[str] = []
    cuda = p.x.device.type == "cuda"

    ours = [n for n in names if n in ("blocksparse", "grouped", "padded", "reference")]
    moe_mlp = None
    if ours:
        try:
            from blocksparse_moe.functional import moe_mlp
        except ImportError as e:
            skipped.append(f"{', '.join(ours)}: blocksparse_moe.functional not importable ({e})")
            names = [n for n in names if n not in ours]

    def ours_case(impl: str, **kw) -> Callable[[], torch.Tensor]:
        return lambda: moe_mlp(p.x, p.top_k_index, p.top_k_weights, *w, activation=s.activation, impl=impl, **kw)

    def prequant_case(impl: str, recipe: str, executed: int, **kw) -> Case:
        """``impl`` with ``fp8=recipe`` on the weights prequantized here (not timed), under ``torch.no_grad()``."""
        quantized = [None if t is None else prequantize(t, recipe) for t in w]
        q = [None if qs is None else qs[0] for qs in quantized]
        scales = tuple(None if qs is None else qs[1] for qs in quantized)

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return moe_mlp(p.x, p.top_k_index, p.top_k_weights, *q, activation=s.activation, impl=impl, fp8=recipe,
                               weight_scales=scales, **kw)  # fmt: skip

        parameters = [t for t in (*q, *scales) if t is not None]
        case = Case(prequant_case_name(impl, recipe), forward, p.inputs, useful, executed, fp8=recipe,
                    parameters=parameters)  # fmt: skip
        case.notes.append("inference: E4M3 weights prequantized (fp8.prequantize), forward only")
        return case

    for name in names:
        if name in FP8_STRATEGIES:
            kw, executed = {}, useful
            if name == "blocksparse":
                kw = {"block_size": block_size}
                executed = flops.blocksparse_executed_flops(p.tokens_per_expert, block_size, s.hidden, s.ffn, s.glu)
            cases.append(Case(name, ours_case(name, **kw), p.inputs, useful, executed, parameters=weights))
            for recipe in fp8:
                forward = ours_case(name, fp8=recipe, **kw)
                cases.append(Case(fp8_case_name(name, recipe), forward, p.inputs, useful, executed, fp8=recipe,
                                  parameters=weights))  # fmt: skip
                cases.append(prequant_case(name, recipe, executed, **kw))
        elif name == "padded":
            for cf in capacity_factors:
                cap = flops.capacity(s.tokens, s.top_k, s.experts, cf)
                dropped = flops.dropped_assignments([p.tokens_per_expert], cap)
                kept = s.assignments - dropped
                case = Case(
                    f"padded@{cf:g}",
                    ours_case(name, capacity=cap),
                    p.inputs,
                    flops.useful_flops(kept, s.hidden, s.ffn, s.glu),
                    flops.padded_executed_flops(s.experts, cap, 1, s.hidden, s.ffn, s.glu),
                    comparable=dropped == 0,
                    capacity_factor=cf,
                    capacity=cap,
                    dropped_fraction=dropped / s.assignments if s.assignments else 0.0,
                    parameters=weights,
                )
                _cross_check_drops(case, moe_mlp, p, cap, dropped)
                cases.append(case)
        elif name == "reference":
            waste = s.experts / s.top_k
            if waste > reference_max_waste:
                skipped.append(
                    f"reference: runs every expert on every token ({waste:g}x the useful FLOPs > "
                    f"--reference-max-waste {reference_max_waste:g})"
                )
                continue
            executed = flops.useful_flops(s.tokens * s.experts, s.hidden, s.ffn, s.glu)
            cases.append(Case(name, ours_case(name), p.inputs, useful, executed, parameters=weights))
        elif name == "loop":
            forward = lambda: loop_moe_mlp(p, p.x, *w, p.top_k_weights)
            cases.append(Case(name, forward, p.inputs, useful, useful, parameters=weights))
        elif name == "torch_grouped_mm":
            if not hasattr(torch, "_grouped_mm"):
                skipped.append(f"torch_grouped_mm: torch {torch.__version__} has no torch._grouped_mm")
                continue
            gw = tuple(None if t is None else _column_major(t) for t in w) if cuda else w
            inputs = [p.x, p.top_k_weights, *(t for t in gw if t is not None)]
            gws = [t for t in gw if t is not None]
            cases.append(Case(name, lambda gw=gw: grouped_mm_moe_mlp(p, *gw), inputs, useful, useful, parameters=gws))
        elif name == "megablocks":
            case = _megablocks_case(p, useful, skipped)
            if case is not None:
                cases.append(case)
        elif name == "scattermoe":
            case = _scattermoe_case(p, useful, skipped)
            if case is not None:
                cases.append(case)
        elif name == "hf_experts":
            from .hf_experts import hf_cases

            cases += hf_cases(p, useful, skipped, fp8)
        elif name == "dense":
            cases.append(_dense_case(p, useful))
    return cases, skipped


def _cross_check_drops(case: Case, moe_mlp, p: Problem, cap: int, dropped: int) -> None:
    """Compare the bench's drop count with ``moe_mlp``'s own stats (one sync; setup, not timed)."""
    with torch.no_grad():
        _, stats = moe_mlp(
            p.x,
            p.top_k_index,
            p.top_k_weights,
            p.w1,
            p.w2,
            p.w3,
            activation=p.shape.activation,
            impl="padded",
            capacity=cap,
            return_stats=True,
        )
    if int(stats.dropped) != dropped:
        case.notes.append(f"moe_mlp reports {int(stats.dropped)} dropped assignments, bench counts {dropped}")


def _dense_case(p: Problem, useful: int) -> Case:
    """``[T·k, d] @ [d, f·(2|1)]`` then ``[T·k, f] @ [f, d]``: exactly the useful FLOPs, no routing."""
    s = p.shape
    g = torch.Generator().manual_seed(1)
    opts = dict(device=p.x.device, dtype=p.x.dtype)
    a = torch.randn(s.assignments, s.hidden, generator=g).to(**opts).requires_grad_()
    w13 = (torch.randn(s.hidden, s.ffn * (2 if s.glu else 1), generator=g) * s.hidden**-0.5).to(**opts)
    w2 = (torch.randn(s.ffn, s.hidden, generator=g) * s.ffn**-0.5).to(**opts)
    w13.requires_grad_()
    w2.requires_grad_()
    forward = lambda: (a @ w13)[:, : s.ffn] @ w2
    return Case(
        "dense", forward, [a, w13, w2], useful, useful, comparable=False, dropped_fraction=None, parameters=[w13, w2]
    )


def _megablocks_case(p: Problem, useful: int, skipped: list[str]) -> Case | None:
    if importlib.util.find_spec("megablocks") is None:
        skipped.append("megablocks: not installed")
        return None
    if p.x.device.type != "cuda":
        skipped.append("megablocks: CUDA only")
        return None
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import dMoE

    s = p.shape
    args = Arguments(
        hidden_size=s.hidden,
        ffn_hidden_size=s.ffn,
        moe_num_experts=s.experts,
        moe_top_k=s.top_k,
        mlp_type="glu" if s.glu else "mlp",
        mlp_impl="sparse",
        activation_fn=_act(s.activation),
        bf16=p.x.dtype == torch.bfloat16,
        fp16=p.x.dtype == torch.float16,
        device=p.x.device,
    )
    layer = dMoE(args)
    x = p.x.detach().view(s.tokens, 1, s.hidden).requires_grad_()
    params = list(layer.parameters())
    case = Case("megablocks", lambda: layer(x)[0], [x, *params], useful, None, comparable=False, parameters=params)
    case.notes.append("MegaBlocks dMoE with its own router and weights (routing differs from the benchmark's)")
    return case


def _scattermoe_case(p: Problem, useful: int, skipped: list[str]) -> Case | None:
    if importlib.util.find_spec("scattermoe") is None:
        skipped.append("scattermoe: not installed")
        return None
    if p.x.device.type != "cuda":
        skipped.append("scattermoe: CUDA only")
        return None
    from scattermoe.mlp import GLUMLP, MLP

    s = p.shape
    act = {"gelu": torch.nn.GELU(), "relu": torch.nn.ReLU(), "silu": torch.nn.SiLU()}[s.activation]
    cls = GLUMLP if s.glu else MLP
    mod = cls(input_size=s.hidden, hidden_size=s.ffn, num_experts=s.experts, top_k=s.top_k, activation=act)
    mod = mod.to(device=p.x.device, dtype=p.x.dtype)
    index = p.top_k_index.long()
    case = Case(
        "scattermoe",
        lambda: mod(p.x, p.top_k_weights, index),
        [p.x, p.top_k_weights, *mod.parameters()],
        useful,
        useful,
        comparable=False,
        parameters=list(mod.parameters()),
    )
    case.notes.append("ScatterMoE with its own weights (same routing)")
    return case
