"""One small forward + backward per strategy on CUDA, for ``compute-sanitizer --tool memcheck`` (bench/gpu_check.sh):
bf16 SwiGLU with odd sizes, an empty expert, and unchecked invalid expert ids (-1, E, E+5), which must contribute
zero without any out-of-bounds access. Exits 1 if an output is not finite or an invalid id leaked into it.

Usage: compute-sanitizer --tool memcheck --error-exitcode 3 python -m bench.sanitize
"""

from __future__ import annotations

import sys

import torch

import blocksparse_moe as bsm

STRATEGIES = (("blocksparse", {"block_size": 64}), ("blocksparse", {"block_size": 128}), ("grouped", {}),
              ("padded", {"capacity_factor": 1.0}), ("reference", {}))  # fmt: skip


def main() -> int:
    if not torch.cuda.is_available():
        print("bench.sanitize: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    T, d, f, E, k = 301, 136, 200, 6, 2  # odd token count, f not a multiple of the block size
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(T, d, device=dev, dtype=dt)
    idx = torch.randint(0, E - 1, (T, k), device=dev)  # expert E-1 gets nothing
    idx[0, 0], idx[5, 1], idx[9, 0] = -1, E, E + 5  # invalid ids, unchecked
    weights = torch.rand(T, k, device=dev)
    w1, w3 = (torch.randn(E, d, f, device=dev, dtype=dt) / d**0.5 for _ in range(2))
    w2 = torch.randn(E, f, d, device=dev, dtype=dt) / f**0.5
    failed = 0
    for impl, options in STRATEGIES:
        leaves = [t.clone().requires_grad_() for t in (x, weights, w1, w2, w3)]
        out = bsm.moe_mlp(leaves[0], idx, *leaves[1:4], leaves[4], activation="silu", impl=impl, check=False,
                          **options)  # fmt: skip
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(t.grad).all()) for t in leaves)
        invalid_grad = leaves[1].grad[0, 0].abs().item() + leaves[1].grad[5, 1].abs().item()
        ok = finite and invalid_grad == 0
        failed += not ok
        print(f"{impl} {options}: finite={finite} invalid-id weight grad={invalid_grad:.3g} {'ok' if ok else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
