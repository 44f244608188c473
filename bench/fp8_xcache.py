"""``python -m bench.fp8_xcache``: what saving x in FP8 for backward costs the weight gradients (issue 17).

The FP8 expert MLP saves the up-projection's E4M3 x (per token along d) instead of x, and its dW1 / dW3 read x
requantized from it along each expert's tokens (``backends.torch_fp8``). This measures, per recipe, the SQNR of dW1,
dW3 and of all the gradients (dx, dweights, dW1, dW2, dW3 together) against the unquantized MLP, with x's
weight-gradient operand quantized from the bf16 x (as before the cache) and from the FP8 x. Everything in float64:
the quantized math of ``fp8`` (``fake_quantize``: the same scales and roundings as the kernels), a SwiGLU MLP per
expert, inputs rounded to bf16 first.

``--memory`` measures the other side instead: the bytes autograd keeps per token (``bench.memory``) for one ``dMoE``
layer and for its router, per dtype and per ``MoEOptions.fp8_cache_x`` (PyTorch backend, grouped).
"""

from __future__ import annotations

import argparse
import math

import torch

import blocksparse_moe as bsm
from blocksparse_moe import fp8

from .memory import saved_for_backward

__all__ = ["gradients", "sqnr", "saved_bytes", "main"]


def sqnr(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """``10·log10(Σ ref² / Σ (actual - ref)²)`` in dB."""
    noise = (actual - reference).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(reference.pow(2).sum().item() / noise)


def gradients(x, idx, weights, w1, w2, w3, dout, recipe: str | None, cached: bool) -> dict[str, torch.Tensor]:
    """float64 gradients of the SwiGLU MLP for ``(x, weights, w1, w2, w3)`` with every GEMM operand quantized as
    ``backends.torch_fp8`` documents (``recipe`` None: unquantized); ``cached``: x's weight-gradient operand from
    the quantized x (the saved FP8 x), else from x itself."""
    if recipe is None:
        q = lambda t, block: t  # noqa: E731
        act_block = rows = wb0 = wb1 = None
    else:
        r = fp8.recipe(recipe)
        q = lambda t, block: fp8.fake_quantize(t, block, r.scale_dtype).double()  # noqa: E731
        act_block, rows, wb0, wb1 = r.act_block(), (r.group, 1), r.weight_block(0), r.weight_block(1)
    T, k = idx.shape
    xq, dq = q(x, act_block), q(dout, act_block)
    dx, dweights = torch.zeros_like(x), torch.zeros(T, k, dtype=torch.float64)
    dw1, dw2, dw3 = (torch.zeros_like(w) for w in (w1, w2, w3))
    for e in range(w1.shape[0]):
        asg = (idx.reshape(-1) == e).nonzero().flatten()  # this expert's assignments, in order
        tok, wr = asg // k, weights.reshape(-1)[asg][:, None]
        h, g = xq[tok] @ q(w1[e], wb0), xq[tok] @ q(w3[e], wb0)
        G = dq[tok] @ q(w2[e], wb1).T
        sig = torch.sigmoid(h)
        act, dact = h * sig, sig * (1 + h * (1 - sig))
        dweights.view(-1)[asg] = (G * act * g).sum(1)
        dh, dg = G * wr * dact * g, G * wr * act
        dx.index_add_(0, tok, q(dh, act_block) @ q(w1[e], wb1).T + q(dg, act_block) @ q(w3[e], wb1).T)
        dw2[e] = q(act * g * wr, rows).T @ q(dout[tok], rows)
        xr = q((xq if cached else x)[tok], rows)
        dw1[e], dw3[e] = xr.T @ q(dh, rows), xr.T @ q(dg, rows)
    return {"dx": dx, "dweights": dweights, "dw1": dw1, "dw2": dw2, "dw3": dw3}


def saved_bytes(
    T: int, d: int, f: int, E: int, k: int, dtype: torch.dtype, recipe: str | None, cache_x: bool | None, seed: int = 0
) -> tuple[float, float]:
    """Bytes per token autograd keeps for one forward of a SwiGLU ``dMoE`` (training mode, grouped, PyTorch
    backend, ``fp8=recipe``, ``fp8_cache_x=cache_x``) and of its router alone, parameters apart
    (``bench.memory.saved_for_backward``)."""
    torch.manual_seed(seed)
    options = bsm.MoEOptions(impl="grouped", backend="torch", fp8=recipe, fp8_cache_x=cache_x)
    layer = bsm.dMoE(d, f, E, k, options=options).to(dtype)
    x = torch.randn(T, d, dtype=dtype, requires_grad=True)
    params = list(layer.parameters())
    _, whole = saved_for_backward(lambda: layer(x), params)
    _, router = saved_for_backward(lambda: layer.router(x), params)
    return whole.activation_bytes / T, router.activation_bytes / T


def _memory(T: int, d: int, f: int, E: int, k: int) -> None:
    print(f"saved B/token, dMoE (SwiGLU, grouped, PyTorch backend, training), T={T} d={d} f={f} E={E} k={k}")
    print("| dtype | fp8 | fp8_cache_x | dMoE layer | its router |\n|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        for recipe, cache_x in ((None, None), *((r, c) for r in fp8.RECIPES for c in (None, True, False))):
            layer, router = saved_bytes(T, d, f, E, k, dtype, recipe, cache_x)
            name = str(dtype).removeprefix("torch.")
            print(f"| {name} | {recipe} | {cache_x if recipe else ''} | {layer:.0f} | {router:.0f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fp8_xcache", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory", action="store_true", help="the saved bytes per token of a dMoE layer instead")
    a = p.parse_args(argv)
    T, d, f, E, k = a.tokens, a.hidden, a.ffn, a.experts, a.top_k
    if a.memory:
        return _memory(T, d, f, E, k)
    g = torch.Generator().manual_seed(a.seed)

    def bf16(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).bfloat16().double()

    x, dout = bf16(T, d), bf16(T, d)
    idx = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k]  # k distinct experts per token, uniformly
    weights = torch.rand(T, k, generator=g).double()
    w1, w3, w2 = bf16(E, d, f, scale=d**-0.5), bf16(E, d, f, scale=d**-0.5), bf16(E, f, d, scale=f**-0.5)
    problem = (x, idx, weights, w1, w2, w3, dout)
    exact = gradients(*problem, None, False)
    every = torch.cat([t.flatten() for t in exact.values()])
    print(f"SQNR dB vs the unquantized float64 gradients, T={T} d={d} f={f} E={E} k={k} (SwiGLU, seed {a.seed})")
    print("| recipe | x for dW1 / dW3 | dW1 | dW3 | all gradients |\n|---|---|---|---|---|")
    for recipe in fp8.RECIPES:
        for cached in (False, True):
            got = gradients(*problem, recipe, cached)
            every_got = torch.cat([t.flatten() for t in got.values()])
            source = "the FP8 x, requantized" if cached else "x (bf16)"
            dw1, dw3 = sqnr(got["dw1"], exact["dw1"]), sqnr(got["dw3"], exact["dw3"])
            print(f"| {recipe} | {source} | {dw1:.2f} | {dw3:.2f} | {sqnr(every_got, every):.2f} |")


if __name__ == "__main__":
    main()
