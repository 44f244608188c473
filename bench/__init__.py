"""Benchmarks for blocksparse_moe: ``python -m bench`` (strategies × token sweep), ``python -m bench.train`` (a small
MoE language model trained end to end: dropless vs padded vs dense), ``python -m bench.audit`` (ahead-of-time
compile audit of the Triton kernels), ``python -m bench.model`` (whole-layer roofline estimate from the recorded
launch list), ``bench/gpu_check.sh`` (one-shot GPU run)."""
