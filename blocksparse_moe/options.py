"""``MoEOptions``: the options of a MoE MLP, written once, validated once, passed whole.

``moe_mlp``, ``MoEExperts``, the layers, ``parallel`` and ``integrations.transformers.register`` all take one
``MoEOptions`` (torchtitan's ``MoEArgs``); their keyword arguments of the same names are a convenience that builds
one (``options_from``). A new option is a new field here, with its check in ``__post_init__``.

The fields are what a caller chooses about *how* the experts run; what they compute (weights, activation, routing)
is given with the data. The strategy names are ``IMPLS``; ``resolve_impl`` says what ``"auto"`` stands for.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .config import BACKENDS
from .fp8 import check_recipe
from .kernels.expert_gemm import BLOCK_SIZES, GPU_BLOCK_SIZES
from .validation import boolean, choice, non_negative_int, non_negative_number, positive_int

__all__ = ["IMPLS", "DROP_POLICIES", "BLOCK_SIZES", "GPU_BLOCK_SIZES", "MoEOptions", "options_from", "resolve_impl"]

IMPLS = ("auto", "blocksparse", "grouped", "padded", "reference")
DROP_POLICIES = ("position", "probs")


@dataclass(frozen=True)
class MoEOptions:
    """How ``moe_mlp`` runs the experts (validated at construction; every check names its field).

    Attributes:
        impl: the strategy: ``"blocksparse"``, ``"grouped"``, ``"padded"``, ``"reference"`` or ``"auto"``
            (``"grouped"``, or ``"blocksparse"`` when a ``block_size`` is given; ``resolve_impl``).
        block_size: ``"blocksparse"`` block size, one of ``BLOCK_SIZES`` (16, 32, 64, 128: the Triton kernels'
            tiles; the torch backend takes the same set; on a GPU the Triton backend takes ``GPU_BLOCK_SIZES``, 64 and
            128, and raises a ValueError for 16 and 32, the interpreter tests' sizes); None: 128 on CUDA, 64
            elsewhere. Only with ``impl`` ``"blocksparse"`` or
            ``"auto"`` (which it makes ``"blocksparse"``).
        capacity_factor, capacity, num_groups: ``"padded"`` only. Tokens form ``num_groups`` equal contiguous
            groups; each expert has ``capacity`` slots per group, default ``ceil(capacity_factor · (T / G) · k /
            E)`` with ``capacity_factor`` (finite, >= 0) 1.0. At most one of ``capacity`` and ``capacity_factor``.
        drop_policy: ``"padded"`` only: which assignments of a group claim an expert's slots when it has more than
            ``capacity``: ``"position"`` (every first choice before any second one, then token order: GShard) or
            ``"probs"`` (the largest combine weights first, ties in position order; Megatron's ``probs``).
        recompute_activation: do not keep the activation output for backward; recompute it from the saved
            pre-activation (MegaBlocks' memory-optimised MLP).
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or None (env ``BSM_BACKEND``): the kernels that run the
            ``"blocksparse"`` / ``"grouped"`` ops (``config.resolve_backend``).
        check: validate expert ids (one host sync on GPU); None: on CPU always, on CUDA with ``BSM_CHECK=1``;
            never while ``torch.compile`` traces or on the meta device (``config.check_enabled``).
        fp8: None (the GEMMs in the operands' dtype) or an FP8 recipe of ``fp8.RECIPES``: ``"blockwise"``,
            ``"mxfp8"``, ``"rowwise"``: every expert GEMM, forward and backward, multiplies E4M3 operands with the
            recipe's scales (``blocksparse_moe.fp8``); inputs and parameters keep their dtype. The Triton
            backend's fused MLP runs FP8 tensor-core kernels (``backends.triton_fp8``); the PyTorch backend and the
            op-composing paths (padded, custom, a callable activation) emulate them (``backends.torch_fp8``). With
            a callable activation: ``"grouped"`` or ``"padded"`` only.
        fp8_cache_x: with an ``fp8`` recipe, what the up-projections keep of x for the weight gradients dW1 / dW3
            (every FP8 path: the fused expert MLP, the op-by-op ones, ``"padded"``'s capacity buffers, which are a
            copy of x nothing else keeps). True: the forward's E4M3 x and its scales
            (``d`` bytes plus the scales per token; dW1 / dW3 requantize it along the tokens), which saves memory
            where the op holds x's only reference (``2·d`` bytes per token in bf16 otherwise). False: x itself,
            quantized along the tokens in backward (as ``fp8=None`` keeps it), which saves memory where something
            else keeps that same x for backward anyway (a router's linear over it: the FP8 copy would add ``d``
            bytes plus the scales per token). None (default): True for ``moe_mlp``; ``dMoE`` / ``PaddedMoE`` and
            the Hugging Face integration choose per call, False where their router keeps the x the experts compute
            with (``TopKRouter.saves_input``; an HF gate linear; ``strategies.common.up_operand_is``), True
            otherwise. Only with ``fp8``.

    Symbolic sizes (``torch.compile(dynamic=True)``) pass the checks.
    """

    impl: str = "auto"
    block_size: int | None = None
    capacity_factor: float | None = None
    capacity: int | None = None
    num_groups: int = 1
    drop_policy: str = "position"
    recompute_activation: bool = False
    backend: str | None = None
    check: bool | None = None
    fp8: str | None = None
    fp8_cache_x: bool | None = None

    def __post_init__(self) -> None:
        choice("impl", self.impl, IMPLS)
        check_recipe("fp8", self.fp8)
        if self.fp8 is not None and self.impl == "reference":
            raise ValueError("fp8 applies to impl 'auto', 'blocksparse', 'grouped' and 'padded', got impl='reference'")
        if self.fp8_cache_x is not None:
            boolean("fp8_cache_x", self.fp8_cache_x)
            if self.fp8 is None:
                raise ValueError(
                    f"fp8_cache_x applies with an fp8 recipe, got fp8_cache_x={self.fp8_cache_x} and fp8=None"
                )
        boolean("recompute_activation", self.recompute_activation)
        if self.backend is not None:
            choice("backend", self.backend, BACKENDS)
        if self.check is not None:
            boolean("check", self.check)
        if self.block_size is not None:
            choice("block_size", self.block_size, BLOCK_SIZES)
            if self.impl not in ("auto", "blocksparse"):
                raise ValueError(
                    f"block_size applies to impl='blocksparse' (or 'auto'), got block_size={self.block_size} "
                    f"with impl={self.impl!r}"
                )
        positive_int("num_groups", self.num_groups)
        choice("drop_policy", self.drop_policy, DROP_POLICIES)
        if self.drop_policy != "position" and self.impl != "padded":
            raise ValueError(
                f"drop_policy applies to impl='padded' only ({self.impl!r} drops nothing), got "
                f"drop_policy={self.drop_policy!r}"
            )
        if self.capacity is not None:
            non_negative_int("capacity", self.capacity)
        if self.capacity_factor is not None:
            non_negative_number("capacity_factor", self.capacity_factor)
        if self.capacity is not None and self.capacity_factor is not None:
            raise ValueError(
                f"give capacity or capacity_factor, not both; got capacity={self.capacity}, "
                f"capacity_factor={self.capacity_factor}"
            )
        if self.impl != "padded" and (
            self.capacity_factor is not None or self.capacity is not None or self.num_groups != 1
        ):
            raise ValueError(
                f"capacity_factor, capacity and num_groups apply to impl='padded' only ({self.impl!r} drops nothing), "
                f"got capacity_factor={self.capacity_factor}, capacity={self.capacity}, num_groups={self.num_groups}"
            )


_DEFAULTS = {f.name: f.default for f in fields(MoEOptions)}


def _is_default(value: object, default: object) -> bool:
    return value is default or (type(value) is type(default) and value == default)


def options_from(options: MoEOptions | None = None, **keywords: object) -> MoEOptions:
    """``options``, or a ``MoEOptions`` built from ``keywords`` (``MoEOptions``' fields) when it is None. Giving
    both ``options`` and a keyword that differs from its default is a ``ValueError`` (which would win is unclear)."""
    if options is None:
        return MoEOptions(**keywords)
    if not isinstance(options, MoEOptions):
        raise TypeError(f"options must be a MoEOptions or None, got {type(options).__name__}")
    given = [name for name, value in keywords.items() if not _is_default(value, _DEFAULTS[name])]
    if given:
        raise ValueError(f"give options=MoEOptions(...) or the keyword options, not both; got options and {given}")
    return options


def resolve_impl(impl: str, block_size: int | None = None) -> str:
    """The strategy ``impl`` stands for: ``"auto"`` is ``"grouped"`` (the fused expert MLP over unpadded rows), or
    ``"blocksparse"`` when a ``block_size`` is given (a block size asks for the block-sparse layout).

    Grouped is measured faster than block-sparse at both reference shapes (one H100, bf16 SwiGLU fwd+bwd, 2026-12-06,
    ``bench/results/``: Mixtral 76.1 vs 81.0 ms, fine-grained experts 18.2 vs 19.0 ms), and ``bench.model`` has it
    faster wherever block padding matters (decode: 64 tokens, k = 8 of 128 experts give block-sparse 16,768 rows
    for 512 assignments) and tied elsewhere; so the choice needs no shapes, and no device data (no sync)."""
    choice("impl", impl, IMPLS)
    if impl != "auto":
        return impl
    return "grouped" if block_size is None else "blocksparse"
