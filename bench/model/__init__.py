"""``python -m bench.model``: a whole-layer roofline of one MoE MLP forward + backward, without a GPU.

The launch list comes from the real launchers (``record``: the layer runs on meta tensors through ``moe_mlp``, the
Triton launches are recorded instead of run, eager ops counted); each launch is costed by a per-kernel roofline
(``roofline``: FLOPs executed and useful, HBM and L2 bytes, CTAs per SM, an efficiency model stated in the output's
header), and the layer's estimate is the sum. Usage::

    python -m bench.model --shape mixtral|fine|decode --impl blocksparse|grouped|torch_grouped_mm --gpu h100|h200|b200

``torch_grouped_mm`` is the baseline the targets compare with (``bench.strategies.grouped_mm_mlp``, torchtitan's
sort + one ``torch._grouped_mm`` per matmul + eager elementwise ops): its ``_grouped_mm`` calls are recorded as
library GEMMs (the efficiency model states their tiles), everything else as eager ops. The summary of each of our
strategies gives its speedup over that baseline.

The last line reads ``<shape> <impl> <gpu>: <ms> ms, <TFLOP/s> TFLOP/s, <pct>% of dense (estimate)``; ``--json``
writes the launch list and the totals. It is an estimate: ``bench/gpu_check.sh`` prints it beside the measured
numbers, so that a GPU corrects the model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import torch

from .record import ROUTING, EagerOp, Launch, Recording, record
from .roofline import GPUS, SHAPES, Cost, Gpu, LayerShape, balanced_rows, eager_time, launch_cost

__all__ = [
    "IMPLS",
    "OURS",
    "BASELINE",
    "BLOCK_SIZE",
    "Estimate",
    "estimate",
    "speedup_vs_baseline",
    "layer_inputs",
    "auto_impl",
    "padding_ratio",
]

OURS = ("blocksparse", "grouped")  # the library's dropless strategies (moe_mlp's impl)
BASELINE = "torch_grouped_mm"  # bench.strategies.grouped_mm_mlp: what the speedup targets compare with
IMPLS = (*OURS, BASELINE)
BLOCK_SIZE = 128  # the block-sparse strategy's block size on CUDA


@dataclass(frozen=True)
class Estimate:
    """The model of one layer: every launch with its cost, the eager ops, and the totals."""

    shape: LayerShape
    impl: str
    gpu: Gpu
    launches: list[tuple[Launch, Cost]]
    eager: list[EagerOp]
    dtype: torch.dtype = torch.bfloat16

    @property
    def eager_kernels(self) -> list[EagerOp]:
        """The eager ops that launch a kernel on CUDA (not the routing's PyTorch implementation: the extension's
        launches stand for it)."""
        return [op for op in self.eager if op.kernel and op.op != ROUTING]

    @property
    def routing_ops(self) -> list[EagerOp]:
        """The kernels of the routing's PyTorch implementation, which builds the plan on meta tensors here."""
        return [op for op in self.eager if op.kernel and op.op == ROUTING]

    def phase_seconds(self, phase: str) -> float:
        """The estimate of the ``"forward"`` or the ``"backward"`` launches and eager ops."""
        launches = sum(c.seconds for la, c in self.launches if la.phase == phase)
        return launches + sum(eager_time(op, self.gpu) for op in self.eager_kernels if op.phase == phase)

    @property
    def seconds(self) -> float:
        return self.phase_seconds("forward") + self.phase_seconds("backward")

    @property
    def useful_flops(self) -> int:
        return sum(c.useful_flops for _, c in self.launches)

    @property
    def executed_flops(self) -> int:
        return sum(c.executed_flops for _, c in self.launches)

    @property
    def tflops(self) -> float:
        """Useful TFLOP/s: the shape's analytic FLOPs over the estimated time."""
        return self.shape.useful_flops() / self.seconds / 1e12

    @property
    def dense_pct(self) -> float:
        return 100 * self.tflops / self.gpu.dense_tflops

    def closing_line(self) -> str:
        return (
            f"{self.shape.name} {self.impl} {self.gpu.name}: {self.seconds * 1e3:.3f} ms, {self.tflops:.0f} TFLOP/s, "
            f"{self.dense_pct:.1f}% of dense (estimate)"
        )


def padding_ratio(shape: LayerShape) -> float:
    """The block-sparse strategy's rows (the sync-free bound of block-padded rows) over the assignments."""
    from blocksparse_moe.routing.spec import max_block_rows

    A = shape.assignments
    return max_block_rows(A, shape.experts, BLOCK_SIZE) * BLOCK_SIZE / A


def auto_impl(shape: LayerShape) -> str:
    """What ``impl="auto"`` runs for ``shape`` on CUDA (``options.resolve_impl``)."""
    from blocksparse_moe.options import resolve_impl

    A, E = shape.assignments, shape.experts
    return resolve_impl("auto", torch.device("cuda"), assignments=A, experts=E, block_size=BLOCK_SIZE)


def layer_inputs(
    shape: LayerShape, dtype: torch.dtype = torch.bfloat16, column_major: bool = False
) -> dict[str, torch.Tensor]:
    """The layer's operands on the meta device: x ``[T, d]``, the router's ``[T, k]`` choices and weights (fp32),
    SwiGLU experts ``w1``, ``w3`` ``[E, d, f]`` and ``w2`` ``[E, f, d]`` (``column_major``: each ``[E, K, N]``
    weight stored with K contiguous, as ``bench.strategies`` hands ``torch._grouped_mm`` its weights on CUDA)."""
    T, d, f, E, k = shape.tokens, shape.hidden, shape.ffn, shape.experts, shape.top_k
    meta = torch.device("meta")

    def weight(K: int, N: int) -> torch.Tensor:
        if column_major:
            return torch.empty(E, N, K, dtype=dtype, device=meta).transpose(1, 2)
        return torch.empty(E, K, N, dtype=dtype, device=meta)

    return {
        "x": torch.empty(T, d, dtype=dtype, device=meta),
        "top_k_index": torch.empty(T, k, dtype=torch.int64, device=meta),
        "top_k_weights": torch.empty(T, k, dtype=torch.float32, device=meta),
        "w1": weight(d, f),
        "w2": weight(f, d),
        "w3": weight(d, f),
    }


def _layer(impl: str):
    if impl == BASELINE:
        from bench.strategies import grouped_mm_mlp

        def baseline(**inputs: torch.Tensor) -> torch.Tensor:
            return grouped_mm_mlp(**inputs, activation="silu")

        return baseline

    from blocksparse_moe import moe_mlp

    options = {"block_size": BLOCK_SIZE} if impl == "blocksparse" else {}

    def layer(**inputs: torch.Tensor) -> torch.Tensor:
        # backend="torch" lets meta tensors through the front door; the recorder runs the custom ops on "triton"
        return moe_mlp(**inputs, activation="silu", impl=impl, backend="torch", **options)

    return layer


def estimate(
    shape: LayerShape | str,
    impl: str,
    gpu: Gpu | str,
    tokens: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Estimate:
    """Record one forward + backward of ``shape`` (``tokens`` overrides its T) in ``dtype`` with strategy ``impl``
    as the launchers run it on ``gpu``, and cost every launch (balanced routing)."""
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    gpu = GPUS[gpu] if isinstance(gpu, str) else gpu
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == BASELINE and dtype != torch.bfloat16:
        raise ValueError(f"impl={BASELINE!r} is modelled in bfloat16 only (torch._grouped_mm's CUDA kernel), got "
                         f"{dtype}")  # fmt: skip
    if tokens is not None:
        shape = replace(shape, tokens=tokens)
    return _estimate(shape, impl, gpu, dtype)


@cache
def _estimate(shape: LayerShape, impl: str, gpu: Gpu, dtype: torch.dtype) -> Estimate:
    rec: Recording = record(_layer(impl), layer_inputs(shape, dtype, column_major=impl == BASELINE), gpu.capability)
    useful_rows = balanced_rows(shape.assignments, shape.experts)
    rows = [-(-n // BLOCK_SIZE) * BLOCK_SIZE for n in useful_rows] if impl == "blocksparse" else useful_rows
    costs = [(launch, launch_cost(launch, gpu, rows, useful_rows)) for launch in rec.launches]
    return Estimate(shape, impl, gpu, costs, rec.eager, dtype)


def speedup_vs_baseline(est: Estimate) -> float:
    """How many times faster ``est`` is than the ``torch_grouped_mm`` baseline on the same layer and GPU (the issue's
    target: >= 1.3)."""
    return estimate(est.shape, BASELINE, est.gpu, dtype=est.dtype).seconds / est.seconds
