"""Differentiable ops (``torch.library`` custom ops + autograd). Each validates its operands once (``_checks``),
resolves the backend once (``config.resolve_backend``) and runs ``backends.triton`` or ``backends.torch``.

Block-sparse (over a routing ``Topology``): ``sdd``, ``sdd_wgrad``, ``dsd``, ``dsd_t``, ``dds``, ``dds_t``.
Grouped: ``grouped_mm``, ``grouped_mm_wgrad``. Permutation: ``gather_rows``, ``scatter_rows``, ``weights_grad``.
The fused expert MLP of both strategies: ``expert_mlp`` over ``mlp_routing(plan)``. Contracts: docs/architecture.md.
"""

from ..backends.common import MLP_OPS, OPS

# re-exported under __all__, which is derived from the backend contract below
from .blocksparse import dds, dds_t, dsd, dsd_t, sdd, sdd_wgrad  # noqa: F401
from .grouped import grouped_mm, grouped_mm_wgrad  # noqa: F401
from .mlp import expert_mlp, mlp_routing  # noqa: F401
from .permute import gather_rows, scatter_rows, weights_grad  # noqa: F401

# one public op per backend op (``backends.common.Backend``), the fused MLP's two halves behind ``expert_mlp``
__all__ = [*(name for name in OPS if name not in MLP_OPS), "expert_mlp", "mlp_routing"]
