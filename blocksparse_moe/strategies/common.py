"""What every strategy shares: the autocast of the operands, the dtype of the combine weights, and the checkpoint
policy of ``recompute_activation``."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..activations import Activation
from ..config import AUTOCAST_DTYPES

__all__ = ["autocast_cast", "autocast_operands", "up_operand_is", "combine_dtype", "activate_then"]


def autocast_cast(t: object) -> torch.dtype | None:
    """The dtype ``autocast_operands`` casts ``t`` to: the autocast dtype when ``torch.autocast`` is on for ``t``'s
    device and ``t`` is a floating tensor of an autocast-eligible dtype other than it; None where ``t`` stays as it
    is (``t`` itself is then the tensor the experts compute with)."""
    if not isinstance(t, torch.Tensor) or t.dtype not in AUTOCAST_DTYPES:
        return None
    device = t.device.type
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return None
    dtype = torch.get_autocast_dtype(device)
    return None if dtype == t.dtype else dtype


def up_operand_is(x: torch.Tensor, impl: str) -> bool:
    """Whether the experts' up-projections compute with ``x`` itself under strategy ``impl`` (an ``IMPLS`` name):
    no autocast copy (``autocast_cast``), and not ``"padded"``, whose operand is its capacity buffers, a copy. Where
    something else keeps ``x`` for backward, the FP8 paths then keep it too rather than an E4M3 copy
    (``MoEOptions.fp8_cache_x``)."""
    return impl != "padded" and autocast_cast(x) is None


def autocast_operands(x: torch.Tensor, *weights: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``(x, *weights)``, cast to the autocast dtype when ``torch.autocast`` is on for x's device (floating tensors of
    the autocast-eligible dtypes only; float64 and non-tensors unchanged), else as given (``autocast_cast``)."""

    def cast(t):
        dtype = autocast_cast(t)
        return t if dtype is None else t.to(dtype)

    return (cast(x), *(cast(w) for w in weights))


def combine_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the top-k combine weights are used in for tokens of ``dtype``: fp32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _save_matmul_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing: keep GEMM outputs, recompute everything else (the activation)."""
    if op == torch.ops.aten.bmm.default or op.namespace == "bsm":
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def activate_then(
    second: Callable[[torch.Tensor], torch.Tensor],
    act: Activation,
    h: torch.Tensor,
    g: torch.Tensor | None,
    recompute: bool,
) -> torch.Tensor:
    """``second(act(h) [* g])``; with ``recompute`` the activation output is rebuilt in backward, not saved."""

    def region(h: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        a = act(h)
        return second(a if g is None else a * g)

    if not recompute:
        return region(h, g)
    return checkpoint(
        region,
        h,
        g,
        use_reentrant=False,
        context_fn=partial(create_selective_checkpoint_contexts, _save_matmul_outputs),
    )
