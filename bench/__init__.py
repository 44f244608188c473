"""Benchmarks for blocksparse_moe: ``python -m bench`` (strategies × token sweep), ``python -m bench.audit``
(ahead-of-time compile audit of the Triton kernels), ``bench/gpu_check.sh`` (one-shot GPU run)."""
