"""Record the launch list of one MoE MLP forward + backward from the real launchers, without a GPU.

The layer runs on ``meta`` tensors (shapes, dtypes and strides, no data) through the public ``moe_mlp``; three
things stand in for the GPU:

- the Triton launch (``kernel[grid](...)``, i.e. ``JITFunction.run``) records the kernel's name, its grid and its
  arguments by name (tensors as shape / stride / dtype, tensor descriptors as their tensor and block shape) and
  runs nothing;
- the package's custom ops (``bsm::*``) run their real implementation (on meta tensors a custom op would run its
  fake), with the ``backend`` argument set to ``"triton"``: the launchers see what they see on CUDA;
- a ``TorchDispatchMode`` counts every eager aten op (outside and inside the custom ops) with the bytes it reads
  and writes and the dtype of what it creates; the library GEMMs of ``ATEN_GEMMS`` (``torch._grouped_mm``, the
  baseline strategy's) are recorded as launches instead, their operands as ``mat_a`` / ``mat_b`` / ``out``.

What stays as on the CPU: ``TRITON_INTERPRET`` must be off (the launchers pick their GPU configs); the launchers'
compute-capability queries see ``capability`` (patched: ``torch.cuda.get_device_capability``, and
``expert_gemm.capability``, which answers None for a tensor off CUDA); meta tensors are never ``cuda`` tensors,
so a launcher that asks ``tensor.device.type == "cuda"`` (the TMA weight loads) takes its non-CUDA branch; the
routing runs its PyTorch implementation (meta tensors): its eager ops are recorded under the pseudo-op ``ROUTING``
(listed, not costed), and the launches of the compiled extension that builds the plan on CUDA instead
(``ROUTING_STEPS``, one kernel each, ``csrc/routing.h``) are recorded after it, with the plan's bytes.
A host synchronisation on the GPU path (``.item()``, ``.tolist()``, ``nonzero``) fails here: meta tensors have no
data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor

from blocksparse_moe.config import interpreting
from blocksparse_moe.kernels import expert_gemm
from blocksparse_moe.routing import pytorch as routing_torch

__all__ = [
    "TensorInfo",
    "Launch",
    "EagerOp",
    "Recording",
    "ATOMIC_OPS",
    "ATEN_GEMMS",
    "ROUTING",
    "ROUTING_STEPS",
    "record",
]


@dataclass(frozen=True)
class TensorInfo:
    """A tensor argument of a launch: what the launcher handed the kernel."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    block_shape: tuple[int, ...] | None = None  # a TMA tensor descriptor's block

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @classmethod
    def of(cls, t: torch.Tensor, block_shape: tuple[int, ...] | None = None) -> TensorInfo:
        return cls(tuple(t.shape), tuple(t.stride()), t.dtype, block_shape)


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel[grid](**args)``; ``phase`` is ``"forward"`` or ``"backward"``, ``op`` the custom
    op it ran inside (``None``: outside every op). A library GEMM (``ATEN_GEMMS``) or a routing extension step
    (``routing::<step>``) has no grid (``()``): its cost function states what it assumes."""

    kernel: str
    grid: tuple[int, ...]
    args: dict[str, Any]
    phase: str
    op: str | None

    @property
    def ctas(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n


@dataclass(frozen=True)
class EagerOp:
    """One eager aten op: a kernel of its own on the GPU (``kernel``: bytes read and written), or an allocation
    (``bytes`` 0); the dtype and size of what it creates; ``atomics``: the elements it adds atomically (``ATOMIC_OPS``:
    one per source element)."""

    name: str
    kernel: bool
    phase: str
    op: str | None
    bytes: int
    out_dtype: torch.dtype | None
    out_bytes: int
    atomics: int = 0


@dataclass
class Recording:
    launches: list[Launch] = field(default_factory=list)
    eager: list[EagerOp] = field(default_factory=list)
    phase: str = "forward"
    ops: list[str] = field(default_factory=list)  # the stack of custom ops being run

    @property
    def op(self) -> str | None:
        return self.ops[-1] if self.ops else None


def _info(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorInfo.of(value)
    if isinstance(value, TensorDescriptor):
        return TensorInfo.of(value.base, tuple(value.block_shape))
    return value


# Ops that allocate and launch nothing, and ops that neither allocate nor launch (metadata).
_ALLOCATIONS = {
    "aten::empty.memory_format",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::new_empty",
    "aten::new_empty_strided",
}
_NO_KERNEL = _ALLOCATIONS | {
    "aten::detach",
    "aten::promote_types",
    "aten::scalar_tensor",
    "aten::lift_fresh",
    "aten::_local_scalar_dense",
}


# Eager ops whose CUDA kernel adds each element of a source into its destination with an atomic (index_add's and
# scatter_add's indexed accumulation), by the name of that source argument.
ATOMIC_OPS = {"aten::index_add": "source", "aten::index_add_": "source", "aten::scatter_add": "src",
              "aten::scatter_add_": "src"}  # fmt: skip
# Library GEMMs recorded as launches (costed by bench.model.roofline), not as eager ops.
ATEN_GEMMS = ("aten::_grouped_mm",)
# The routing: the pseudo-op its PyTorch implementation's eager ops run under here, and the kernels the compiled
# extension launches for it on CUDA (csrc/routing.h's plan_routing, one grid-stride kernel per step).
ROUTING = "routing (PyTorch implementation)"
ROUTING_STEPS = ("Init", "Keys", "TileScan", "Counts", "Offsets", "Place")


def _launches_kernel(func: torch._ops.OpOverload) -> bool:
    """Whether an aten op runs a kernel of its own: not a view or an allocation, not a composite (its parts are
    counted)."""
    name = func.name()
    if name in _NO_KERNEL or func.is_view:
        return False
    return not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeImplicitAutograd")


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for t in tree:
            yield from _tensors(t)
    elif isinstance(tree, dict):
        for t in tree.values():
            yield from _tensors(t)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Mode(TorchDispatchMode):
    """Counts eager ops; runs the ``bsm::`` custom ops' real implementation on the Triton backend."""

    def __init__(self, rec: Recording) -> None:
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = func.name()
        if func.namespace == "bsm":
            names = [a.name for a in func._schema.arguments]
            args = list(args)
            if "backend" in names:
                i = names.index("backend")
                if i < len(args):
                    args[i] = "triton"
                else:
                    kwargs["backend"] = "triton"
            self.rec.ops.append(name)
            try:
                with self:
                    return OPDEFS[name.split(".")[0]]._init_fn(*args, **kwargs)
            finally:
                self.rec.ops.pop()
        out = func(*args, **kwargs)
        if name in ATEN_GEMMS:
            mat_a, mat_b = args[:2]
            operands = {"mat_a": TensorInfo.of(mat_a), "mat_b": TensorInfo.of(mat_b), "out": TensorInfo.of(out)}
            self.rec.launches.append(Launch(name, (), operands, self.rec.phase, self.rec.op))
            return out
        kernel = _launches_kernel(func)
        if kernel or name in _ALLOCATIONS:
            # a factory from an input (``new_zeros``, ``ones_like``) reads only its metadata
            reads = not (name.startswith("aten::new_") or "_like" in name)
            inputs = {id(t): _nbytes(t) if reads else 0 for t in _tensors((args, kwargs))}
            outputs = list(_tensors(out))
            moved = sum(inputs.values()) + sum(_nbytes(t) for t in outputs if id(t) not in inputs) if kernel else 0
            dtype = outputs[0].dtype if outputs else None
            created = sum(_nbytes(t) for t in outputs)
            atomics = 0
            if name in ATOMIC_OPS:
                names = [a.name for a in func._schema.arguments]
                i = names.index(ATOMIC_OPS[name])
                atomics = (args[i] if i < len(args) else kwargs[ATOMIC_OPS[name]]).numel()
            self.rec.eager.append(EagerOp(name, kernel, self.rec.phase, self.rec.op, moved, dtype, created, atomics))
        return out


@contextlib.contextmanager
def _patched(rec: Recording, capability: tuple[int, int]) -> Iterator[None]:
    """Triton launches recorded instead of run; ``torch.cuda.get_device_capability`` and the GEMM launchers' config
    query (``expert_gemm.capability``: None for meta tensors otherwise, i.e. sm_90's configs on every GPU) answering
    ``capability``; the routing's PyTorch implementation run under ``ROUTING``, followed by the extension's
    launches."""

    def run(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        bound = {names[i]: _info(a) for i, a in enumerate(args)}
        bound.update({k: _info(v) for k, v in kwargs.items()})
        g = grid(bound) if callable(grid) else grid
        g = tuple(int(v) for v in g)
        rec.launches.append(Launch(self.fn.__name__, g, bound, rec.phase, rec.op))

    def plan_buffers(top_k_index: torch.Tensor, sizes: Any) -> dict[str, torch.Tensor]:
        rec.ops.append(ROUTING)
        try:
            buffers = saved_plan(top_k_index, sizes)
        finally:
            rec.ops.pop()
        moved = _nbytes(top_k_index) + sum(_nbytes(t) for t in buffers.values())  # read the ids, write the plan
        for step in ROUTING_STEPS:
            share = {"bytes": moved // len(ROUTING_STEPS)}
            rec.launches.append(Launch(f"routing::{step}", (), share, rec.phase, rec.op))
        return buffers

    saved_run, saved_cc, saved_plan = JITFunction.run, torch.cuda.get_device_capability, routing_torch.plan_buffers
    saved_gemm_cc = expert_gemm.capability
    JITFunction.run = run
    torch.cuda.get_device_capability = lambda *a, **k: capability
    expert_gemm.capability = lambda t: capability[0] * 10 + capability[1]
    routing_torch.plan_buffers = plan_buffers
    try:
        yield
    finally:
        JITFunction.run, torch.cuda.get_device_capability = saved_run, saved_cc
        expert_gemm.capability = saved_gemm_cc
        routing_torch.plan_buffers = saved_plan


def record(
    layer: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor], capability: tuple[int, int] = (9, 0)
) -> Recording:
    """Run ``layer(**inputs)`` forward and backward (a random ``dout``, every floating input requiring grad) on meta
    tensors, and return its launches and eager ops. ``inputs`` must be meta tensors."""
    if interpreting():
        raise RuntimeError("bench.model records the GPU launch list: unset TRITON_INTERPRET (the launchers pick "
                           "interpreter configs under it)")  # fmt: skip
    if any(t.device.type != "meta" for t in inputs.values()):
        raise ValueError("bench.model runs the layer on meta tensors; got inputs on "
                         f"{sorted({str(t.device) for t in inputs.values()})}")  # fmt: skip
    rec = Recording()
    leaves = {k: t.requires_grad_() if t.is_floating_point() else t for k, t in inputs.items()}
    with _patched(rec, capability), _Mode(rec):
        out = layer(**leaves)
        dout = torch.empty_like(out)  # the gradient the next layer hands in (an allocation: not counted)
        rec.phase = "backward"
        out.backward(dout)
    return rec
