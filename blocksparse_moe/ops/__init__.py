"""Differentiable ops (``torch.library`` custom ops + autograd). Each validates its operands once (``_checks``),
resolves the backend once (``config.resolve_backend``) and runs ``backends.triton`` or ``backends.torch``.

Block-sparse (over a routing ``Topology``): ``sdd``, ``sdd_wgrad``, ``dsd``, ``dsd_t``, ``dds``, ``dds_t``.
Grouped: ``grouped_mm``, ``grouped_mm_wgrad``. Permutation: ``gather_rows``, ``scatter_rows``, ``weights_grad``.
The fused expert MLP of both strategies: ``mlp.expert_mlp``. Contracts: docs/architecture.md.
"""

from .blocksparse import dds, dds_t, dsd, dsd_t, sdd, sdd_wgrad
from .grouped import grouped_mm, grouped_mm_wgrad
from .permute import gather_rows, scatter_rows, weights_grad

__all__ = [
    "sdd",
    "sdd_wgrad",
    "dsd",
    "dsd_t",
    "dds",
    "dds_t",
    "grouped_mm",
    "grouped_mm_wgrad",
    "gather_rows",
    "scatter_rows",
    "weights_grad",
]
