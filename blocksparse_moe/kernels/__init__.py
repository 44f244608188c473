"""Triton kernels and their launchers (config, grid, launch); the ops validate the operands (``ops/``) and the
Triton backend allocates (``backends/triton.py``). Row layouts and the tile schedule: ``layouts``; the compile-audit
specs: ``specs``. No autograd here: see ``ops/``."""
