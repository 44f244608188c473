"""blocksparse_moe: dropless Mixture-of-Experts kernels (block-sparse and grouped GEMMs in Triton).

Importing the package loads no kernels and queries no device; names resolve on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "plan_routing": "routing",
    "RoutingPlan": "routing",
    "Topology": "routing",
    "moe_mlp": "functional",
    "custom_moe_mlp": "functional",
    "MoEStats": "functional",
    "MoEOptions": "options",
    "per_token_moe_mlp": "reference",
    "TopKRouter": "layers.router",
    "update_expert_bias": "layers.router",
    "load_balancing_loss": "layers.losses",
    "router_z_loss": "layers.losses",
    "sequence_balance_loss": "layers.losses",
    "dMoE": "layers.moe",
    "PaddedMoE": "layers.moe",
    "MoEExperts": "layers.moe",
    "MoELayer": "layers.moe",
    "freeze": "layers.moe",
    "expert_parallel": "parallel.expert_parallel",
    "parallelize_moe": "parallel.parallelize",
}

__all__ = sorted(_EXPORTS) + ["ops", "integrations", "fp8", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .functional import MoEStats, custom_moe_mlp, moe_mlp  # noqa: F401
    from .layers.losses import load_balancing_loss, router_z_loss, sequence_balance_loss  # noqa: F401
    from .layers.moe import MoEExperts, MoELayer, PaddedMoE, dMoE, freeze  # noqa: F401
    from .layers.router import TopKRouter, update_expert_bias  # noqa: F401
    from .options import MoEOptions  # noqa: F401
    from .parallel.expert_parallel import expert_parallel  # noqa: F401
    from .parallel.parallelize import parallelize_moe  # noqa: F401
    from .reference import per_token_moe_mlp  # noqa: F401
    from .routing import RoutingPlan, Topology, plan_routing  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in ("ops", "integrations", "kernels", "layers", "parallel", "strategies", "fp8"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'blocksparse_moe' has no attribute {name!r}")
