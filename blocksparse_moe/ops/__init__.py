"""Differentiable ops (``torch.library`` custom ops + autograd) over the Triton kernels.

Block-sparse (over a routing ``Topology``): ``sdd``, ``dsd``, ``dsd_t``, ``dds``, ``dds_t``, ``dsd_act``.
Grouped: ``grouped_mm``. Permutation: ``gather_rows``, ``scatter_rows``. Contracts: docs/architecture.md.
"""

from .blocksparse import dds, dds_t, dsd, dsd_act, dsd_t, sdd
from .grouped import grouped_mm
from .permute import gather_rows, scatter_rows

__all__ = ["sdd", "dsd", "dsd_t", "dds", "dds_t", "dsd_act", "grouped_mm", "gather_rows", "scatter_rows"]
