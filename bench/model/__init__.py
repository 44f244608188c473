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

``--fp8 RECIPE`` (``blocksparse_moe.fp8.RECIPES``) records the layer with ``moe_mlp(fp8=RECIPE)``: the Triton
backend's FP8 path, whose FP8 launches (``gemm_kernel`` / ``wgrad_kernel`` with ``FP8`` = ``Fp8Mode``, E4M3
operands, the quantize passes) the roofline costs by the FP8 model printed in the header (``roofline.FP8_MODEL``).
A recording without FP8 GEMM launches (the backend running the PyTorch emulation) is an error, not an estimate.

The last line reads ``<shape> <impl> <gpu>: <ms> ms, <TFLOP/s> TFLOP/s, <pct>% of dense (estimate)`` (with FP8:
``<shape> <impl> <gpu> fp8=<recipe>: ... <pct>% of FP8 dense (estimate)``); ``--json`` writes the launch list and
the totals. It is an estimate: ``bench/gpu_check.sh`` prints it beside the measured
numbers (``bench.model.compare``), so that a GPU corrects the model: ``bench.model.calibrate`` fits the constants of
the header's calibration to such a run (the H100's of 2026-12-06 are the ones in ``roofline.GPUS``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import torch

from blocksparse_moe.fp8 import check_recipe

from .record import ROUTING, EagerOp, Launch, Recording, record
from .roofline import GPUS, QUANTIZE_KERNELS, SHAPES, Cost, Gpu, LayerShape, balanced_rows, eager_time, launch_cost

__all__ = [
    "IMPLS",
    "OURS",
    "BASELINE",
    "BLOCK_SIZE",
    "Estimate",
    "estimate",
    "speedup_vs_baseline",
    "layer_inputs",
    "padding_ratio",
    "fp8_launches",
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
    fp8: str | None = None  # the FP8 recipe of moe_mlp (None: the GEMMs in dtype)

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
    def dense_tflops(self) -> float:
        """The dense rate "% of dense" refers to: the GPU's bf16 figure, times its E4M3 rate with FP8."""
        return self.gpu.dense_tflops * (self.gpu.fp8_rate if self.fp8 else 1.0)

    @property
    def dense_pct(self) -> float:
        return 100 * self.tflops / self.dense_tflops

    def closing_line(self) -> str:
        name, dense = f"{self.shape.name} {self.impl} {self.gpu.name}", "dense"
        if self.fp8:
            name, dense = f"{name} fp8={self.fp8}", "FP8 dense"
        return (
            f"{name}: {self.seconds * 1e3:.3f} ms, {self.tflops:.0f} TFLOP/s, {self.dense_pct:.1f}% of {dense} "
            "(estimate)"
        )


def padding_ratio(shape: LayerShape) -> float:
    """The block-sparse strategy's rows (the sync-free bound of block-padded rows) over the assignments."""
    from blocksparse_moe.routing.spec import max_block_rows

    A = shape.assignments
    return max_block_rows(A, shape.experts, BLOCK_SIZE) * BLOCK_SIZE / A


def layer_inputs(
    shape: LayerShape, dtype: torch.dtype = torch.bfloat16, column_major: bool = False
) -> dict[str, torch.Tensor]:
    """The layer's operands on the meta device: x ``[T, d]``, the router's ``[T, k]`` choices and weights (in
    ``dtype``, as ``bench.problems`` times them and as the baseline's ``index_add`` requires), SwiGLU experts ``w1``,
    ``w3`` ``[E, d, f]`` and ``w2`` ``[E, f, d]`` (``column_major``: each ``[E, K, N]`` weight stored with K
    contiguous, as ``bench.strategies`` hands ``torch._grouped_mm`` its weights on CUDA)."""
    T, d, f, E, k = shape.tokens, shape.hidden, shape.ffn, shape.experts, shape.top_k
    meta = torch.device("meta")

    def weight(K: int, N: int) -> torch.Tensor:
        if column_major:
            return torch.empty(E, N, K, dtype=dtype, device=meta).transpose(1, 2)
        return torch.empty(E, K, N, dtype=dtype, device=meta)

    return {
        "x": torch.empty(T, d, dtype=dtype, device=meta),
        "top_k_index": torch.empty(T, k, dtype=torch.int64, device=meta),
        "top_k_weights": torch.empty(T, k, dtype=dtype, device=meta),
        "w1": weight(d, f),
        "w2": weight(f, d),
        "w3": weight(d, f),
    }


def fp8_launches(launches: list[Launch]) -> list[Launch]:
    """The FP8 GEMM launches among ``launches``: ``gemm_kernel`` / ``wgrad_kernel`` with a nonzero ``FP8``."""
    return [la for la in launches if la.kernel in ("gemm_kernel", "wgrad_kernel") and la.args.get("FP8", 0)]


def _layer(impl: str, fp8: str | None = None):
    if impl == BASELINE:
        from bench.strategies import grouped_mm_mlp

        def baseline(**inputs: torch.Tensor) -> torch.Tensor:
            return grouped_mm_mlp(**inputs, activation="silu")

        return baseline

    from blocksparse_moe import moe_mlp

    options = {"block_size": BLOCK_SIZE} if impl == "blocksparse" else {}
    options["fp8"] = fp8

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
    fp8: str | None = None,
) -> Estimate:
    """Record one forward + backward of ``shape`` (``tokens`` overrides its T) in ``dtype`` with strategy ``impl``
    (and ``moe_mlp``'s ``fp8`` recipe) as the launchers run it on ``gpu``, and cost every launch (balanced routing).
    With ``fp8``, a recording without FP8 GEMM launches (``fp8_launches``: the backend ran the PyTorch emulation,
    whose matmuls are eager ops) is a RuntimeError rather than a wrong estimate."""
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    gpu = GPUS[gpu] if isinstance(gpu, str) else gpu
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == BASELINE and dtype != torch.bfloat16:
        raise ValueError(f"impl={BASELINE!r} is modelled in bfloat16 only (torch._grouped_mm's CUDA kernel), got "
                         f"{dtype}")  # fmt: skip
    if fp8 is not None:
        check_recipe("fp8", fp8)
        if impl not in OURS:
            raise ValueError(f"fp8 applies to impl {OURS}, got impl={impl!r} with fp8={fp8!r}")
    if tokens is not None:
        shape = replace(shape, tokens=tokens)
    return _estimate(shape, impl, gpu, dtype, fp8)


@cache
def _recording(shape: LayerShape, impl: str, capability: tuple[int, int], dtype: torch.dtype, fp8: str | None
               ) -> Recording:  # fmt: skip
    """The launch list of one layer as the launchers pick it for ``capability`` (what the GPU's costs do not change)."""
    inputs = layer_inputs(shape, dtype, column_major=impl == BASELINE)
    rec = record(_layer(impl, fp8), inputs, capability)
    if fp8 is not None and not fp8_launches(rec.launches):
        quantize = sum(1 for la in rec.launches if la.kernel in QUANTIZE_KERNELS)
        raise RuntimeError(
            f"bench.model fp8={fp8!r}: no FP8 kernels launched (no gemm_kernel / wgrad_kernel with FP8 != 0; "
            f"{quantize} quantize launches): the Triton backend ran the PyTorch emulation of FP8, whose matmuls are "
            "eager ops, so there is no FP8 estimate to give until its FP8 path (backends/triton_fp8.py) launches "
            "the FP8 kernels"
        )
    return rec


@cache
def _estimate(shape: LayerShape, impl: str, gpu: Gpu, dtype: torch.dtype, fp8: str | None) -> Estimate:
    rec = _recording(shape, impl, gpu.capability, dtype, fp8)
    useful_rows = balanced_rows(shape.assignments, shape.experts)
    rows = [-(-n // BLOCK_SIZE) * BLOCK_SIZE for n in useful_rows] if impl == "blocksparse" else useful_rows
    costs = [(launch, launch_cost(launch, gpu, rows, useful_rows)) for launch in rec.launches]
    return Estimate(shape, impl, gpu, costs, rec.eager, dtype, fp8)


def speedup_vs_baseline(est: Estimate) -> float:
    """How many times faster ``est`` is than the ``torch_grouped_mm`` baseline on the same layer and GPU (the issue's
    target: >= 1.3)."""
    return estimate(est.shape, BASELINE, est.gpu, dtype=est.dtype).seconds / est.seconds
