"""The front door: ``moe_mlp`` (the expert MLPs of a Mixture-of-Experts layer, given the router's choices) and
``custom_moe_mlp`` (experts whose gate is not an elementwise activation, or with biases: the Hugging Face
integration). They validate their inputs, resolve the options (``options.MoEOptions``) and call one strategy by name
(``strategies``):

- ``"blocksparse"`` (MegaBlocks, dropless): ``strategies.dropless.blocksparse``, the block-padded expert-sorted
  layout; SDD with ``w1`` and ``w3`` and the activation in its epilogue (the gather fused into its loads), then DSD
  with ``w2`` (``ops.mlp``); a callable activation runs op by op (gather, ``sdd``, the activation, ``dsd``).
- ``"grouped"`` (dropless): ``strategies.dropless.grouped``, the unpadded expert-sorted layout; the same fused expert
  MLP as grouped GEMMs; a callable activation runs op by op (``grouped_mm`` with the gather fused, the activation,
  ``grouped_mm``).
- ``"padded"`` (GShard / NLLB baseline, drops): ``strategies.padded.padded``, ``[E, G·C, d]`` capacity buffers and
  ``torch.bmm``.
- ``"reference"``: a plain PyTorch loop over experts (``reference.expert_loop_moe_mlp``).

``custom_moe_mlp`` runs ``strategies.dropless.grouped_custom``.

Combine weights (one policy on every path, expert parallelism included): the top-k weights are used in
``combine_dtype(x.dtype)`` (fp32, or float64 for float64 tokens) and each token's weighted sum is accumulated in that
dtype, then rounded once to ``x.dtype``, under autocast too.

Expert ids outside ``[0, E)``: a ``ValueError`` when checked (``check``, default: on CPU always, on CUDA with
``BSM_CHECK=1``, never under ``torch.compile`` or on the meta device); unchecked, such an assignment contributes
zero and touches no memory out of bounds, whatever the strategy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .activations import Activation, get_activation
from .config import FLOAT_DTYPES, INDEX_DTYPES, check_enabled, resolve_backend
from .fp8 import check_weight_scales
from .options import MoEOptions, options_from, resolve_impl
from .reference import expert_loop_moe_mlp
from .strategies import (
    autocast_operands,
    blocksparse,
    combine_dtype,
    default_block_size,
    grouped,
    grouped_custom,
    padded,
    padded_capacity,
)
from .validation import (
    boolean,
    check_dtype,
    check_expert_ids,
    check_float,
    check_no_grad,
    check_same_device,
    check_tensor,
)

__all__ = ["moe_mlp", "custom_moe_mlp", "MoEStats"]


@dataclass(frozen=True)
class MoEStats:
    """What one ``moe_mlp`` call did. Tensors stay on the device (reading them syncs; building them does not)."""

    impl: str  # the strategy that ran ("auto" resolved)
    capacity: int | None  # slots per expert per group (padded only)
    dropped: torch.Tensor  # [] int64: valid assignments over capacity (always 0 for dropless impls)
    # FLOPs of the expert GEMMs as executed, padding included: padded, every slot of every expert and group;
    # blocksparse, the block-padded rows times the block-padded width ceil(f / B)·B; reference, every expert on
    # every token; grouped, the useful FLOPs
    executed_flops: int | torch.Tensor
    useful_flops: int  # 2·T·k·d·f per GEMM: the FLOPs a perfect dropless kernel executes


def moe_mlp(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None = None,
    *,
    activation: str | Activation = "gelu",
    options: MoEOptions | None = None,
    impl: str = "auto",
    capacity_factor: float | None = None,
    capacity: int | None = None,
    num_groups: int = 1,
    block_size: int | None = None,
    recompute_activation: bool = False,
    backend: str | None = None,
    check: bool | None = None,
    fp8: str | None = None,
    weight_scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, MoEStats]:
    """Mixture-of-Experts MLP: ``out[t] = Σ_j top_k_weights[t, j] · expert_{top_k_index[t, j]}(x[t])``.

    Expert ``e`` is ``act(x @ w1[e]) @ w2[e]``, or with ``w3`` (GLU) ``(act(x @ w1[e]) * (x @ w3[e])) @ w2[e]``.
    Differentiable w.r.t. ``x``, ``w1``, ``w2``, ``w3`` and ``top_k_weights``; inputs are never modified;
    weights may be strided views (e.g. transposes). Duplicate experts in a row each count.

    Args:
        x: ``[T, d]`` float tokens.
        top_k_index: ``[T, k]`` int32/int64 expert ids in ``[0, E)``.
        top_k_weights: ``[T, k]`` float combine weights, used in ``combine_dtype(x.dtype)`` (fp32 for 16- and
            32-bit tokens) on every strategy.
        w1, w3: ``[E, d, f]``; w2: ``[E, f, d]``; same dtype and device as ``x`` (float8_e4m3fn with
            ``weight_scales``).
        activation: ``"gelu"``, ``"gelu_tanh"``, ``"relu"``, ``"silu"`` or a callable (elementwise).
        options: how the experts run (``MoEOptions``: strategy ``impl``, ``block_size``, the ``"padded"`` capacity
            options ``capacity_factor`` / ``capacity`` / ``num_groups``, ``recompute_activation``, ``backend``,
            ``check``, the FP8 recipe ``fp8`` and what its backward keeps of x, ``fp8_cache_x``; see its docstring).
            Default ``MoEOptions()``: ``"grouped"`` (``"blocksparse"`` with a ``block_size``;
            ``options.resolve_impl``), ids checked on CPU, no FP8.
        impl, capacity_factor, capacity, num_groups, block_size, recompute_activation, backend, check, fp8: a
            convenience: the fields of a ``MoEOptions`` built from them when ``options`` is None (with ``options``
            they must keep their defaults). ``recompute_activation`` changes nothing for the fused expert MLP (a
            named activation on ``"blocksparse"`` / ``"grouped"``): it applies the activation in the
            up-projection's epilogue and never stores its output.
        weight_scales: ``(s1, s2, s3)`` (``s3`` None without ``w3``): w1, w2, w3 are prequantized FP8 weights,
            float8_e4m3fn with these scales, as ``fp8.prequantize(w, recipe)`` gives them for the recipe ``fp8``
            (required). Inference only: the fused expert MLP (``"grouped"`` / ``"blocksparse"``, a named
            activation) reads them as they are; nothing may require grad while grad mode is on (a ``ValueError``;
            run under ``torch.inference_mode()``). Equal bit for bit to the ``fp8`` forward of the weights they
            were quantized from.
        return_stats: also return a ``MoEStats``.

    Under ``torch.autocast`` the expert GEMMs run in the autocast dtype, as ``nn.Linear`` does: x and the expert
    weights are cast to it (differentiably: fp32 parameters get fp32 gradients); the combine weights are not.

    Returns:
        ``[T, d]`` in ``x.dtype`` (the autocast dtype under autocast; empty when ``T = 0``), and the ``MoEStats``
        when ``return_stats``.
    """
    options = options_from(
        options,
        impl=impl,
        block_size=block_size,
        capacity_factor=capacity_factor,
        capacity=capacity,
        num_groups=num_groups,
        recompute_activation=recompute_activation,
        backend=backend,
        check=check,
        fp8=fp8,
    )
    boolean("return_stats", return_stats)
    x, w1, w2, w3 = autocast_operands(x, w1, w2, w3)
    prequantized = check_weight_scales(options.fp8, weight_scales, w1, w2, w3)
    T, d, k, E, f = _validate(x, top_k_index, top_k_weights, w1, w2, w3, prequantized)
    act = get_activation(activation)  # validates the name
    B = default_block_size(x.device) if options.block_size is None else options.block_size
    impl = resolve_impl(options.impl, options.block_size)
    if prequantized:
        if impl not in ("grouped", "blocksparse") or not isinstance(activation, str):
            raise ValueError(
                f"prequantized FP8 weights (weight_scales) run on the fused expert MLP: impl 'grouped' or "
                f"'blocksparse' with a named activation, got impl={impl!r} and activation={activation!r}"
            )
        s1, s2, s3 = weight_scales
        check_no_grad(
            "moe_mlp with prequantized FP8 weights (weight_scales)", x=x, top_k_weights=top_k_weights, w1=w1, w2=w2,
            w3=w3, s1=s1, s2=s2, s3=s3,
        )  # fmt: skip
    if options.fp8 is not None and impl == "blocksparse" and not isinstance(activation, str):
        raise ValueError(
            f"fp8 with a callable activation runs on impl 'grouped' or 'padded' (the block-sparse op-by-op path has "
            f"no FP8 GEMMs), got fp8={options.fp8!r}, impl='blocksparse' and {activation!r}"
        )
    backend = resolve_backend(x.device, options.backend, x.dtype)
    recompute = options.recompute_activation
    fp8_cache_x = options.fp8_cache_x is not False  # None: True (what else keeps x is the caller's to say)
    capacity = None
    if impl == "padded":
        capacity = padded_capacity(
            T,
            k,
            E,
            capacity_factor=options.capacity_factor,
            capacity=options.capacity,
            num_groups=options.num_groups,
        )
    if check_enabled(x.device, options.check):
        check_expert_ids(top_k_index, E)

    weights = top_k_weights.to(combine_dtype(x.dtype))
    nmm = 2 if w3 is None else 3
    useful = 2 * T * k * d * f * nmm
    dropped = torch.zeros((), dtype=torch.int64, device=x.device)
    executed: int | torch.Tensor = useful
    if T == 0 and prequantized:
        out = x.new_empty(x.shape)
        executed = 0
    elif impl == "reference" or (T == 0 and impl in ("blocksparse", "grouped")):
        out = expert_loop_moe_mlp(x, top_k_index, weights, w1, w2, w3, activation)
        executed = E * T * 2 * d * f * nmm if impl == "reference" else 0
    elif impl == "padded":
        out, dropped = padded(
            x,
            top_k_index,
            weights,
            w1,
            w2,
            w3,
            activation=act,
            capacity=capacity,
            num_groups=options.num_groups,
            recompute=recompute,
            drop_policy=options.drop_policy,
            fp8=options.fp8,
            fp8_cache_x=fp8_cache_x,
        )
        executed = E * capacity * options.num_groups * 2 * d * f * nmm
    elif impl == "grouped":
        out, _ = grouped(
            x, top_k_index, weights, w1, w2, w3, activation=activation, recompute=recompute, backend=backend,
            fp8=options.fp8, weight_scales=weight_scales, fp8_cache_x=fp8_cache_x,
        )  # fmt: skip
    else:
        out, plan = blocksparse(
            x,
            top_k_index,
            weights,
            w1,
            w2,
            w3,
            activation=activation,
            block_size=B,
            recompute=recompute,
            backend=backend,
            fp8=options.fp8,
            weight_scales=weight_scales,
            fp8_cache_x=fp8_cache_x,
        )
        padded_width = plan.topology(f).blocks_per_expert * B  # the last column block of an expert is computed whole
        executed = plan.padded_offsets[-1].to(torch.int64) * (2 * d * padded_width * nmm)
    if return_stats:
        return out, MoEStats(impl, capacity, dropped, executed, useful)
    return out


def custom_moe_mlp(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    *,
    activation: Callable[[torch.Tensor], torch.Tensor],
    up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    post: Callable[[torch.Tensor], torch.Tensor] | None = None,
    backend: str | None = None,
    check: bool | None = None,
    fp8: str | None = None,
    fp8_cache_x: bool | None = None,
) -> torch.Tensor:
    """MoE MLP for experts outside ``moe_mlp``'s elementwise form, by the grouped strategy of the same core:
    ``expert_e(x) = post(activation(x @ up[e] + up_bias[e]) @ down[e] + down_bias[e])``.

    ``activation`` maps whole rows ``[R, u]`` to ``[R, h]`` and may change the width: a gate over concatenated or
    interleaved gate/up columns (Hugging Face's ``_apply_gate``, gpt-oss's clamped SwiGLU) or a plain activation
    (``u = h``). ``post`` (optional) maps the ``[R, d]`` expert outputs row by row (a post-expert norm).

    Args:
        x: ``[T, d]`` tokens; top_k_index, top_k_weights: ``[T, k]`` as in ``moe_mlp`` (same combine policy).
        up: ``[E, d, u]``; down: ``[E, h, d]`` (strided views welcome); same dtype and device as ``x``.
        up_bias: ``[E, u]``; down_bias: ``[E, d]`` (optional).
        backend, check, fp8, fp8_cache_x: as in ``moe_mlp`` (``MoEOptions``' fields; ``fp8``: the up and down GEMMs,
            forward and backward, in FP8 by that recipe, emulated: ``strategies.fp8.grouped_mm``; the biases, the gate
            and ``post`` unquantized; ``fp8_cache_x``: what the up-projection keeps of x, None: its E4M3 copy).

    Returns ``[T, d]`` in ``x.dtype`` (the autocast dtype under autocast, as in ``moe_mlp``); differentiable in
    ``x``, the weights, the biases and ``top_k_weights``.
    """
    if not callable(activation):
        raise TypeError(f"activation must be a callable mapping rows [R, u] -> [R, h], got {activation!r}")
    if post is not None and not callable(post):
        raise TypeError(f"post must be None or a callable mapping rows [R, d] -> [R, d], got {post!r}")
    options = MoEOptions(impl="grouped", backend=backend, check=check, fp8=fp8, fp8_cache_x=fp8_cache_x)
    x, up, down, up_bias, down_bias = autocast_operands(x, up, down, up_bias, down_bias)
    T, d, k = _validate_routing(x, top_k_index, top_k_weights, up=up, down=down, up_bias=up_bias, down_bias=down_bias)
    check_tensor("up", up, "[E, d, u]", (None, d, None))
    E, _, u = up.shape
    check_tensor("down", down, "[E, h, d]", (E, None, d))
    if E < 1 or u < 1 or down.shape[1] < 1:
        raise ValueError(f"up and down need E, u, h >= 1, got {tuple(up.shape)} and {tuple(down.shape)}")
    if up_bias is not None:
        check_tensor("up_bias", up_bias, "[E, u]", (E, u))
    if down_bias is not None:
        check_tensor("down_bias", down_bias, "[E, d]", (E, d))
    backend = resolve_backend(x.device, options.backend, x.dtype)
    if check_enabled(x.device, options.check):
        check_expert_ids(top_k_index, E)
    weights = top_k_weights.to(combine_dtype(x.dtype))
    out, _ = grouped_custom(
        x,
        top_k_index,
        weights,
        up,
        down,
        activation=activation,
        up_bias=up_bias,
        down_bias=down_bias,
        post=post,
        backend=backend,
        fp8=options.fp8,
        fp8_cache_x=options.fp8_cache_x is not False,
    )
    return out


# ----------------------------------------------------------------------------------------------- validation


def _validate_routing(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    prequantized: bool = False,
    **weights: torch.Tensor | None,
) -> tuple[int, int, int]:
    """Types, devices (of the routing tensors and ``weights``) and shapes of x and the routing, the weights in x's
    dtype (unless ``prequantized``: E4M3, ``fp8.check_weight_scales``); returns T, d, k."""
    named = dict(x=x, top_k_index=top_k_index, top_k_weights=top_k_weights, **weights)
    named = {name: t for name, t in named.items() if t is not None}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_same_device(**named)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [tokens, hidden], got shape {tuple(x.shape)}")
    check_float("x", x)
    T, d = x.shape
    check_dtype("top_k_index", top_k_index, INDEX_DTYPES)
    if top_k_index.dim() != 2 or top_k_index.shape[0] != T or top_k_index.shape[1] < 1:
        raise ValueError(f"top_k_index must be [T={T}, k>=1], got shape {tuple(top_k_index.shape)}")
    check_dtype("top_k_weights", top_k_weights, FLOAT_DTYPES)
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(
            f"top_k_weights must have top_k_index's shape {tuple(top_k_index.shape)}, got {tuple(top_k_weights.shape)}"
        )
    for name, t in weights.items():
        if t is not None and not prequantized and t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    return T, d, top_k_index.shape[1]


def _validate(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None,
    prequantized: bool = False,
) -> tuple[int, int, int, int, int]:
    T, d, k = _validate_routing(x, top_k_index, top_k_weights, prequantized=prequantized, w1=w1, w2=w2, w3=w3)
    if w1.dim() != 3 or w1.shape[1] != d or w1.shape[0] < 1 or w1.shape[2] < 1:
        raise ValueError(f"w1 must be [E, d={d}, f] with E, f >= 1, got shape {tuple(w1.shape)}")
    E, _, f = w1.shape
    check_tensor("w2", w2, "[E, f, d]", (E, f, d))
    if w3 is not None:
        check_tensor("w3", w3, "[E, d, f] (w1's shape)", (E, d, f))
    return T, d, k, E, f
