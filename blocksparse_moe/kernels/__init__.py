"""Triton kernels and their launchers (validation, allocation, grid). No autograd here: see ``ops/``."""
