"""The PyTorch backend: every op contract (``ops/``) in plain PyTorch, the same math as the Triton backend.

It is the CPU path (when Triton's interpreter is off), the float64 path, and the reference the kernels are tested
against. Two primitives carry everything: ``_expert_mm`` (each expert's rows times its weight) and
``_expert_wgrad`` (each expert's weight gradient); block-sparse operands are viewed as the dense ``[P, F]`` rows of
their block-diagonal topology, gathered operands are indexed by ``row_src``. Arithmetic is fp32 (float64 for
float64 inputs) with results rounded to the input dtype where the kernels round.

Schedules: on CPU in eager mode reading the routing offsets on the host is free, so the primitives run the
fastest host primitive available there (``host_primitive``): one ``torch._grouped_mm`` call where that op runs on the
device (a probe of availability, once per device type, never a timing) and the operands meet its stride rule, else
a loop over the experts (one ``torch.mm`` each, into the result); both compute each expert's rows with the same
matrix products (bit for bit). On GPU and under ``torch.compile`` they run a sync-free schedule (one batched matmul
over tiles of 64 rows, each tile with a copy of its expert's weight).
"""

from __future__ import annotations

from functools import cache

import torch

from ..activations import act_backward, get_activation
from ..fp8 import REFERENCE, Quantizer
from ..routing import Topology
from . import torch_fp8
from .common import OPS, MlpRouting, combine_dots

__all__ = ["host_loop_ok", "host_primitive", "grouped_mm_available", "fp8_quantizer", *OPS]


def fp8_quantizer() -> Quantizer:
    """The quantizer of this backend's FP8 emulation (``torch_fp8``, ``strategies.fp8``): ``fp8``'s reference."""
    return REFERENCE


_TILE = 64  # rows per tile of the sync-free schedule


def _acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the accumulation dtype: float64 stays, everything else becomes fp32."""
    return t if t.dtype == torch.float64 else t.float()


def _out(result: torch.Tensor, out: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    result = result.to(dtype)
    return result if out is None else out.copy_(result)


def host_loop_ok(t: torch.Tensor) -> bool:
    """CPU eager: the primitives may read the offsets on the host (free there) and loop over experts."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


# ----------------------------------------------------------------------------------------------- primitives


def _expert_ranges(o: list[int]) -> list[tuple[int, int, int]]:
    return [(e, o[e], o[e + 1]) for e in range(len(o) - 1) if o[e + 1] > o[e]]


@cache
def grouped_mm_available(device_type: str) -> bool:
    """Whether ``torch._grouped_mm`` runs on ``device_type`` in both forms the primitives use (rows × a weight per
    group, and the per-group ``aᵀ @ b``), checked once against ``torch.mm`` on a tiny problem (a probe of
    availability: nothing is timed)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    a = torch.arange(64 * 16, dtype=torch.float32, device=device_type).view(64, 16) % 7 - 3
    w = torch.arange(2 * 16 * 16, dtype=torch.float32, device=device_type).view(2, 16, 16) % 5 - 2
    offs = torch.tensor([16, 64], dtype=torch.int32, device=device_type)
    try:
        y = torch._grouped_mm(a, w, offs=offs)
        g = torch._grouped_mm(a.t(), a, offs=offs)
    except (RuntimeError, NotImplementedError):
        return False
    want_y = torch.cat([a[:16] @ w[0], a[16:] @ w[1]])
    want_g = torch.stack([a[:16].t() @ a[:16], a[16:].t() @ a[16:]])
    return torch.equal(y, want_y) and torch.equal(g, want_g)


def host_primitive(device: torch.device) -> str:
    """The expert-GEMM primitive of the CPU-eager path on ``device`` for fp32 operands: ``"torch._grouped_mm"`` when
    the probe passes there, else ``"torch.mm loop"`` (also for operands ``torch._grouped_mm`` does not take)."""
    return "torch._grouped_mm" if grouped_mm_available(device.type) else "torch.mm loop"


def _grouped_mm_takes(cols: int, *operands: torch.Tensor) -> bool:
    """``torch._grouped_mm``'s operand rule: fp32 / 16-bit matrices (the last two dimensions of each operand) with
    one unit stride and the other a multiple of 16 bytes, and a result ``cols`` wide in multiples of 16 bytes;
    float64 and other strides take the loop."""
    t = operands[0]
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not grouped_mm_available(t.device.type):
        return False
    unit = 16 // t.element_size()

    def fits(rows_stride: int, cols_stride: int) -> bool:
        other = rows_stride if cols_stride == 1 else cols_stride if rows_stride == 1 else 0
        return other > 0 and other % unit == 0

    return cols % unit == 0 and all(fits(*o.stride()[-2:]) for o in operands)


def _tiles(offsets: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sync-free schedule: per tile of ``_TILE`` rows its expert ``[M]`` and its rows ``[M, _TILE]`` (``rows``
    where there is none); tiles never cross experts. No host sync."""
    E = offsets.shape[0] - 1
    off = offsets.long()
    counts = off[1:] - off[:-1]
    tiles = torch.cat([off.new_zeros(1), ((counts + _TILE - 1) // _TILE).cumsum(0)])
    m = torch.arange(min(-(-rows // _TILE) + E, rows), device=offsets.device)
    e = (torch.searchsorted(tiles, m, right=True) - 1).clamp(max=E - 1)
    r = (off[e] + (m - tiles[e]) * _TILE)[:, None] + torch.arange(_TILE, device=offsets.device)
    ok = (m < tiles[E])[:, None] & (r < off[e + 1][:, None])
    return e, torch.where(ok, r, rows)


def _expert_mm(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``out[rows of e] = a[rows of e] @ w[e]``, zero rows past ``offsets[E]``; in ``a``'s (accumulation) dtype."""
    R, N = a.shape[0], w.shape[2]
    w = w.to(a.dtype)
    if host_loop_ok(a):
        o = offsets.tolist()
        if _grouped_mm_takes(N, a, w):
            out = torch._grouped_mm(a, w, offs=offsets[1:].to(torch.int32))
        else:
            out = a.new_empty(R, N)
            for e, lo, hi in _expert_ranges(o):
                torch.mm(a[lo:hi], w[e], out=out[lo:hi])
        out[o[-1] :].zero_()  # rows past offsets[E]: no expert writes them
        return out
    e, rows = _tiles(offsets, R)
    padded = torch.cat([a, a.new_zeros(1, a.shape[1])])
    tiles = torch.bmm(padded[rows], w[e])
    out = a.new_zeros(R + 1, N)  # row R: where the tiles' missing rows land, dropped
    return out.index_copy_(0, rows.reshape(-1), tiles.reshape(-1, N))[:R]


def _expert_wgrad(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``out[e] = a[rows of e]ᵀ @ b[rows of e]`` ``[E, M, N]`` (zeros for experts without rows)."""
    E, R = offsets.shape[0] - 1, a.shape[0]
    b = b.to(a.dtype)
    if host_loop_ok(a):
        if _grouped_mm_takes(b.shape[1], a.T, b):
            return torch._grouped_mm(a.T, b, offs=offsets[1:].to(torch.int32))  # experts without rows: zeros
        out = a.new_zeros(E, a.shape[1], b.shape[1])
        for e, lo, hi in _expert_ranges(offsets.tolist()):
            torch.mm(a[lo:hi].T, b[lo:hi], out=out[e])
        return out
    e, rows = _tiles(offsets, R)
    pa = torch.cat([a, a.new_zeros(1, a.shape[1])])
    pb = torch.cat([b, b.new_zeros(1, b.shape[1])])
    tiles = torch.bmm(pa[rows].transpose(1, 2), pb[rows])
    return a.new_zeros(E, a.shape[1], b.shape[1]).index_add_(0, e, tiles)


def _gathered(x: torch.Tensor, row_src: torch.Tensor | None) -> torch.Tensor:
    """``x[row_src]`` in the accumulation dtype, zero rows where ``row_src`` is -1 (``x`` itself when None)."""
    if row_src is None:
        return _acc(x)
    src = row_src.long()
    if host_loop_ok(x) and not bool((src < 0).any()):  # CPU eager: no zero row to append (the common case)
        return _acc(x).index_select(0, src)
    padded = torch.cat([_acc(x), _acc(x).new_zeros(1, x.shape[1])])
    return padded[torch.where(src >= 0, src, x.shape[0])]


def _block_rows(data: torch.Tensor, block_size: int, cols: int) -> torch.Tensor:
    """Block data ``[R_b·nb, B, B]`` of the block-diagonal topology as its dense rows ``[R_b·B, cols]``, in its
    dtype (a strided view of one copy)."""
    B = block_size
    nb = -(-cols // B)
    R_b = data.shape[0] // nb if nb else 0
    return data.view(R_b, nb, B, B).permute(0, 2, 1, 3).reshape(R_b * B, nb * B)[:, :cols]


def _to_rows(data: torch.Tensor, block_size: int, cols: int) -> torch.Tensor:
    """``_block_rows`` in the accumulation dtype."""
    return _acc(_block_rows(data, block_size, cols))


def _to_blocks(rows: torch.Tensor, block_size: int) -> torch.Tensor:
    """Dense rows ``[R_b·B, F]`` as the block data of the block-diagonal topology (columns past F zero)."""
    B = block_size
    nb = -(-rows.shape[1] // B)
    R_b = rows.shape[0] // B
    full = torch.nn.functional.pad(rows, (0, nb * B - rows.shape[1]))
    return full.view(R_b, B, nb, B).permute(0, 2, 1, 3).reshape(R_b * nb, B, B)


# ----------------------------------------------------------------------------------------------- block-sparse


def sdd(a: torch.Tensor, w: torch.Tensor, topo: Topology, out: torch.Tensor | None = None) -> torch.Tensor:
    """``S = a @ w`` at the blocks of ``topo`` → data ``[nnz_max, B, B]`` (unused slots, padding columns zero)."""
    rows = _expert_mm(_acc(a), w, topo.padded_offsets)
    return _out(_to_blocks(rows, topo.block_size), out, a.dtype)


def sdd_wgrad(a: torch.Tensor, data: torch.Tensor, topo: Topology, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[e] = a[rows of e]ᵀ @ S[rows of e]`` → ``[E, K, F]``."""
    S = _to_rows(data, topo.block_size, topo.ffn_size)
    return _out(_expert_wgrad(_acc(a), S, topo.padded_offsets), out, a.dtype)


def dsd(data: torch.Tensor, topo: Topology, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``y = S @ w`` → ``[P, N]``."""
    return _out(_expert_mm(_to_rows(data, topo.block_size, topo.ffn_size), w, topo.padded_offsets), out, data.dtype)


def dsd_t(data: torch.Tensor, topo: Topology, a: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``g = Sᵀ @ a`` → ``[E, F, N]``."""
    S = _to_rows(data, topo.block_size, topo.ffn_size)
    return _out(_expert_wgrad(S, a, topo.padded_offsets), out, data.dtype)


def dds(a: torch.Tensor, data: torch.Tensor, topo: Topology, out: torch.Tensor | None = None) -> torch.Tensor:
    """``c = a @ S`` → ``[M, E, F]``."""
    S = _to_rows(data, topo.block_size, topo.ffn_size)
    return _out(_expert_wgrad(S, a.t(), topo.padded_offsets).permute(2, 0, 1), out, data.dtype)


def dds_t(g: torch.Tensor, data: torch.Tensor, topo: Topology, out: torch.Tensor | None = None) -> torch.Tensor:
    """``c = g @ Sᵀ`` → ``[M, P]``."""
    S = _to_rows(data, topo.block_size, topo.ffn_size)
    return _out(_expert_mm(S, g.permute(1, 2, 0), topo.padded_offsets).t(), out, data.dtype)


# ----------------------------------------------------------------------------------------------- grouped


def grouped_mm(x, w, offsets, row_src=None, out=None) -> torch.Tensor:
    """``y[i] = x[src(i)] @ w[e]`` for expert-sorted rows (rows ``≥ offsets[E]`` zero) → ``[R, N]``."""
    return _out(_expert_mm(_gathered(x, row_src), w, offsets), out, x.dtype)


def grouped_mm_wgrad(x, dy, offsets, row_src=None, out=None) -> torch.Tensor:
    """``dw[e] = x[src(rows of e)]ᵀ @ dy[rows of e]`` → ``[E, K, N]``."""
    return _out(_expert_wgrad(_gathered(x, row_src), dy, offsets), out, x.dtype)


# ----------------------------------------------------------------------------------------------- permute


def _with_zero_row(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the accumulation dtype with a zero row appended (the target of index -1)."""
    return torch.cat([_acc(t), _acc(t).new_zeros(1, t.shape[1])])


def _rows_of_assignments(b: torch.Tensor, assignment_row: torch.Tensor) -> torch.Tensor:
    """``[T, k, d]``: row ``assignment_row[t, j]`` of b, zero where it is -1 (a new tensor, the caller's to modify)."""
    r = assignment_row.long()
    if host_loop_ok(b) and not bool((r < 0).any()):  # CPU eager: no zero row to append (the common case)
        return _acc(b.index_select(0, r.reshape(-1))).view(*r.shape, b.shape[1])
    idx = torch.where(r >= 0, r, b.shape[0]).reshape(-1)
    return _with_zero_row(b).index_select(0, idx).view(*r.shape, b.shape[1])


def gather_rows(x, row_assignment, assignment_row, weights=None, out=None) -> torch.Tensor:
    """``out[i] = weights.flat[a] · x[a // k]``, ``a = row_assignment[i]`` (zero where -1) → ``[R, d]``."""
    T, k = assignment_row.shape
    a = row_assignment.long()
    valid = a >= 0
    rows = _with_zero_row(x).index_select(0, torch.where(valid, a // k, T))
    if weights is not None:
        w = torch.cat([_acc(weights).reshape(-1), _acc(weights).new_zeros(1)])
        rows = rows * w.index_select(0, torch.where(valid, a, T * k))[:, None].to(rows.dtype)
    return _out(rows, out, x.dtype)


def scatter_rows(y, row_assignment, assignment_row, weights=None, out=None) -> torch.Tensor:
    """``out[t] = Σ_j weights[t, j] · y[assignment_row[t, j]]`` (skipping -1) → ``[T, d]``."""
    rows = _rows_of_assignments(y, assignment_row)
    if weights is not None:
        rows.mul_(_acc(weights)[..., None].to(rows.dtype))
    return _out(rows.sum(1), out, y.dtype)


def weights_grad(a, b, assignment_row, dtype=None, out=None) -> torch.Tensor:
    """``dw[t, j] = <a[t], b[assignment_row[t, j]]>`` (0 where -1) → ``[T, k]``."""
    dots = (_rows_of_assignments(b, assignment_row) * _acc(a)[:, None, :]).sum(-1)
    return _out(dots, out, dtype or a.dtype)


# ----------------------------------------------------------------------------------------------- fused MLP


def _layout(rows: torch.Tensor, routing: MlpRouting) -> torch.Tensor:
    """Dense intermediate rows ``[R, F]`` in the strategy's layout."""
    return _to_blocks(rows, routing.block_size) if routing.blocked else rows


def _rows(t: torch.Tensor, routing: MlpRouting, cols: int) -> torch.Tensor:
    """An intermediate in the strategy's layout as dense rows ``[R, F]`` (accumulation dtype)."""
    return _to_rows(t, routing.block_size, cols) if routing.blocked else _acc(t)


def _row_weights(weights: torch.Tensor, routing: MlpRouting, dtype: torch.dtype) -> torch.Tensor:
    """The top-k weight of each row ``[R, 1]`` in ``dtype`` (0 for rows of no assignment)."""
    flat = torch.cat([weights.reshape(-1), weights.new_zeros(1)]).to(dtype)
    asg = routing.row_asg.long()
    return flat[torch.where(asg >= 0, asg, flat.shape[0] - 1)][:, None]


def mlp_forward(
    x,
    weights,
    w1,
    w2,
    w3,
    routing: MlpRouting,
    activation: str,
    fp8: str | None = None,
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
):
    """``out [T, d]``, the ``h``, ``g`` backward needs (``MlpRouting.intermediate_shape``) and None; with an ``fp8``
    recipe, its emulation (``torch_fp8``; ``scales``: w1, w2, w3 are prequantized E4M3 with these scales), whose
    last result is the E4M3 x and its scales, which backward reads instead of x (``fp8_cache_x``)."""
    if fp8:
        return torch_fp8.mlp_forward(x, weights, w1, w2, w3, routing, activation, fp8, scales=scales)
    dtype = x.dtype
    xs = _gathered(x, routing.row_src)
    h = _expert_mm(xs, w1, routing.offsets).to(dtype)
    g = None if w3 is None else _expert_mm(xs, w3, routing.offsets).to(dtype)
    a = get_activation(activation)(_acc(h))
    if g is not None:
        a = a * _acc(g) if a is h else a.mul_(_acc(g))  # identity: a is h itself, which is returned
    y = _expert_mm(_acc(a.to(dtype)), w2, routing.offsets).to(dtype)
    out = scatter_rows(y, routing.row_asg, routing.assignment_row, weights)
    return out, _layout(h, routing), None if g is None else _layout(g, routing), None


def mlp_backward(
    dout, x, weights, w1, w2, w3, h, g, routing: MlpRouting, activation: str, needs, fp8=None, x_scale=None
):
    """Gradients of ``mlp_forward`` for ``(x, weights, w1, w2, w3)`` where ``needs`` says so, else None; with an
    ``fp8`` recipe, its emulation (``torch_fp8``: with ``x_scale``, x is the forward's E4M3 x and ``x_scale`` its
    scales; without, x itself).

    Over the ``[R, f]`` rows, in the accumulation dtype: ``G = dout[token] @ w2ᵀ``; ``dW2 = aᵀ @ (w·dout[token])``
    (the gathered dout weighted in place); the top-k weight gradient ``<G, a>`` (``a`` multiplied in place); then
    ``G`` weighted in place, ``dg = w·G·act(h)`` in ``act(h)``'s buffer and ``dh = w·G·g·act'(h)`` in ``G``'s
    (``act_backward``: one fused pass). No buffer beyond ``G``, ``act(h)`` and ``a``: a large one would cost page
    faults on every call on CPU."""
    if fp8:
        return torch_fp8.mlp_backward(dout, x, x_scale, weights, w1, w2, w3, h, g, routing, activation, needs, fp8)
    need_x, need_weights, need_w1, need_w2, need_w3 = needs
    dtype, F = x.dtype, w1.shape[2]
    douts = _gathered(dout, routing.row_src)
    G = _expert_mm(douts, w2.transpose(1, 2), routing.offsets)  # dout[token] @ w2ᵀ, unweighted
    hr = _rows(h, routing, F)
    gr = None if g is None else _rows(g, routing, F)
    act = get_activation(activation)(hr)  # hr itself for the identity: never written
    a = act if gr is None else act * gr  # act(h) [· g]
    wr = _row_weights(_acc(weights), routing, G.dtype)
    dw2 = _expert_wgrad(_acc(a.to(dtype)), douts.mul_(wr), routing.offsets).to(dtype) if need_w2 else None
    dweights = None
    if need_weights:
        dots = (a * G if a is hr else a.mul_(G)).sum(1)  # the identity without GLU: a is h itself
        dweights = combine_dots(dots[None], routing.assignment_row, weights.dtype)
    G.mul_(wr)
    dg = None if gr is None else act * G if act is hr else act.mul_(G)
    dh = act_backward(G if gr is None else G.mul_(gr), hr, activation)
    dh, dg = dh.to(dtype), None if dg is None else dg.to(dtype)
    dx = None
    if need_x:
        dxs = _expert_mm(_acc(dh), w1.transpose(1, 2), routing.offsets)
        if dg is not None:
            dxs.add_(_expert_mm(_acc(dg), w3.transpose(1, 2), routing.offsets))
        dx = scatter_rows(dxs.to(dtype), routing.row_asg, routing.assignment_row)
    dw1 = dw3 = None
    if need_w1 or need_w3:
        xs = _gathered(x, routing.row_src)
        dw1 = _expert_wgrad(xs, _acc(dh), routing.offsets).to(dtype)
        dw3 = None if dg is None else _expert_wgrad(xs, _acc(dg), routing.offsets).to(dtype)
    return dx, dweights, dw1, dw2, dw3
