"""MoE layers: routers, losses, dMoE and PaddedMoE."""
