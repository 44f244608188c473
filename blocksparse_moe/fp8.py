"""FP8 (E4M3) recipes of the expert MLP: the recipe table, the reference quantization (PyTorch, on the device, no
host sync), the per-step cache of quantized weights, and prequantized weights for inference (``prequantize``: the
E4M3 weights and scales a checkpoint stores, which ``moe_mlp(..., weight_scales=)`` reads; ``check_weight_scales``).

A recipe says how a GEMM operand becomes E4M3 values ``q`` and scales ``s`` (``operand ≈ q · s``, one scale per
group of elements):

| recipe | activations, output gradients | weights | scale |
|---|---|---|---|
| ``"blockwise"`` (DeepSeek-V3) | 1×128 along the reduced dimension | 128×128 blocks | fp32 ``amax / 448`` |
| ``"mxfp8"`` (OCP MX) | 1×32 along the reduced dimension | 32×1 along the reduced dimension | E8M0 (uint8) |
| ``"rowwise"`` (torchao) | one per row (the whole reduced dimension) | one per output channel | fp32 ``amax / 448`` |

"The reduced dimension" is the GEMM's K: for ``x @ w1`` it is d (x per token row, w1 per column); for the dgrad
``dout @ w2ᵀ`` it is d again (w2 is then quantized along its columns: a different layout for ``"mxfp8"`` and
``"rowwise"``, the same blocks for ``"blockwise"``); for a weight gradient ``aᵀ @ b`` it is the tokens, and both
operands are quantized in groups of rows of one expert (``quantize_rows``: groups start at each expert's first row).

The arithmetic, exactly (the Triton kernels of ``kernels.quantize`` reproduce it bit for bit):

- ``amax`` = max |v| over the group's elements in fp32 (bf16 / fp16 inputs are converted exactly). A partial group
  (the size not a multiple of the group) takes the elements present: as if padded with zeros.
- fp32 scale: ``s = amax / 448`` (IEEE division, round to nearest even). E8M0 scale: the biased exponent
  ``b = min(e + (m != 0), 254)`` of ``r = amax / 448`` (``e`` its 8-bit exponent field, ``m`` its mantissa), so
  ``s = 2^(b - 127) ≥ r``: ``2^ceil(log2 r)`` for normal ``r``, nothing saturates; ``b = 0`` (``s = 2^-127``) for an
  all-zero group; ``b = 255`` (E8M0's NaN) when ``amax`` is inf or NaN. Stored as uint8, as ``tl.dot_scaled`` takes
  them.
- ``q = e4m3(clamp(v / s', -448, 448))``: IEEE division by ``s' = s`` (``s' = 1`` where an fp32 scale is 0, an
  all-zero group: q = 0, no NaN), the clamp keeps NaN, the cast rounds to nearest even (E4M3 subnormals down to
  2^-9 included, nothing flushed). Denormal inputs are values like any other: a group of denormals gets a denormal
  (fp32) or ``2^-126`` / ``2^-127`` (E8M0) scale and quantizes without flushing to zero where the scale allows.
- Dequantized: ``q · s`` in fp32.
- inf / NaN: no error and no host check (that would sync). A NaN or an inf in a group makes its ``amax`` NaN / inf,
  hence its scale NaN / inf (E8M0: 255) and every dequantized value of the group NaN: the GEMMs reading the group
  give NaN where an unquantized GEMM would give NaN or inf.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .validation import check_float, check_tensor, choice

__all__ = [
    "RECIPES",
    "Recipe",
    "recipe",
    "check_recipe",
    "E4M3_MAX",
    "scale_of",
    "quantize",
    "dequantize",
    "fake_quantize",
    "quantize_rows",
    "fake_quantize_rows",
    "fake_quantize_dual",
    "row_groups",
    "group_offsets",
    "padded_offsets",
    "padded_rows",
    "pad_rows",
    "scale_value",
    "Quantizer",
    "REFERENCE",
    "weight",
    "quantized_weight",
    "weight_cache_clear",
    "prequantize",
    "check_weight_scales",
    "uncast",
    "check_loaded_dtypes",
]

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


@dataclass(frozen=True)
class Recipe:
    """One FP8 recipe (the table of the module docstring)."""

    name: str
    group: int | None  # elements per scale along the reduced dimension (None: the whole dimension, one per row)
    weight_across: int  # a weight scale also covers this many elements across the reduced dimension (128: blocks)
    scale_dtype: torch.dtype  # torch.float32, or torch.uint8 for E8M0 biased exponents

    def act_block(self) -> tuple[int | None, int | None]:
        """Group shape ``(rows, cols)`` of an operand reduced along its columns (one scale per row slice)."""
        return 1, self.group

    def act_scale_shape(self, rows: int, cols: int) -> tuple[int, int]:
        """The scales' shape of an operand ``[rows, cols]`` quantized along its columns (``act_block``, as
        ``quantize`` gives them): one per row and group, a partial group counting as one."""
        return rows, (1 if self.group is None else -(-cols // self.group))

    def weight_block(self, reduced: int) -> tuple[int | None, int | None]:
        """Group shape ``(rows, cols)`` of a weight ``[K, N]`` reduced along dimension ``reduced`` (0: K, as in
        ``x @ w``; 1: N, as in ``dy @ wᵀ``)."""
        return (self.group, self.weight_across) if reduced == 0 else (self.weight_across, self.group)

    def weight_scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The scales' shape of a weight ``[E, K, N]`` quantized along K (``weight_block(0)``, as ``quantize``
        gives them): one per group, a partial group counting as one."""
        E, K, N = shape
        br, bc = self.weight_block(0)
        return E, (1 if br is None else -(-K // br)), (1 if bc is None else -(-N // bc))


_RECIPES = {
    "blockwise": Recipe("blockwise", 128, 128, torch.float32),
    "mxfp8": Recipe("mxfp8", 32, 1, torch.uint8),
    "rowwise": Recipe("rowwise", None, 1, torch.float32),
}
RECIPES: tuple[str, ...] = tuple(_RECIPES)


def check_recipe(name: str, value: object) -> str | None:
    """``value`` when it is None or a name of ``RECIPES``; else a ``ValueError`` (``TypeError`` for a non-string)
    naming the argument ``name``."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be None or one of {RECIPES}, got {type(value).__name__} {value!r}")
    return choice(name, value, RECIPES)


def recipe(name: str) -> Recipe:
    """The ``Recipe`` called ``name`` (one of ``RECIPES``)."""
    return _RECIPES[check_recipe("fp8", name)]


# ----------------------------------------------------------------------------------------------- reference


def scale_of(amax: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """The stored scale of groups with maxima ``amax`` (fp32): ``amax / 448`` in fp32, or the E8M0 biased exponent
    (uint8) of the smallest power of two ``≥ amax / 448`` (module docstring)."""
    r = amax / E4M3_MAX
    if scale_dtype == torch.float32:
        return r
    bits = r.view(torch.int32)
    exponent, mantissa = (bits >> 23) & 0xFF, bits & 0x7FFFFF
    biased = torch.where(exponent == 255, 255, (exponent + (mantissa != 0).int()).clamp(max=254))
    return biased.to(torch.uint8)


def scale_value(scale: torch.Tensor) -> torch.Tensor:
    """A stored scale as the fp32 value it stands for (E8M0: ``2^(b - 127)``, NaN for 255)."""
    if scale.dtype == torch.float32:
        return scale
    b = scale.int()
    normal = (b << 23).view(torch.float32)  # b in [1, 254]
    value = torch.where(b == 0, torch.tensor(2.0**-127, device=scale.device), normal)
    return torch.where(b == 255, torch.nan, value)


def _groups(t: torch.Tensor, block: tuple[int | None, int | None]) -> tuple[torch.Tensor, int, int]:
    """``t [..., R, C]`` zero-padded to whole groups and viewed ``[..., R/br, br, C/bc, bc]``; returns it and
    ``(br, bc)`` with None replaced by the whole dimension."""
    R, C = t.shape[-2:]
    br, bc = (max(R, 1) if block[0] is None else block[0]), (max(C, 1) if block[1] is None else block[1])
    nr, nc = -(-R // br), -(-C // bc)
    padded = torch.nn.functional.pad(t, (0, nc * bc - C, 0, nr * br - R))
    return padded.view(*t.shape[:-2], nr, br, nc, bc), br, bc


def _expand(scale: torch.Tensor, br: int, bc: int, R: int, C: int) -> torch.Tensor:
    """Per-group values ``[..., R/br, C/bc]`` repeated over their groups ``[..., R, C]``."""
    return scale.repeat_interleave(br, -2).repeat_interleave(bc, -1)[..., :R, :C]


def _divisor(scale: torch.Tensor) -> torch.Tensor:
    """The fp32 value ``v`` is divided by: the scale's value, 1 where an fp32 scale is 0 (an all-zero group)."""
    value = scale_value(scale)
    return torch.where(value == 0, 1.0, value) if scale.dtype == torch.float32 else value


def _cast(v: torch.Tensor) -> torch.Tensor:
    """``e4m3(clamp(v, -448, 448))``; NaN stays NaN."""
    return torch.where(v > E4M3_MAX, E4M3_MAX, torch.where(v < -E4M3_MAX, -E4M3_MAX, v)).to(E4M3)


def quantize(
    t: torch.Tensor, block: tuple[int | None, int | None], scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``t [..., R, C]`` (any float dtype) → ``(q, scale)``: q E4M3 ``[..., R, C]``, scale ``[..., ceil(R / br),
    ceil(C / bc)]`` (fp32, or uint8 E8M0) for groups ``block = (br, bc)`` (None: the whole dimension). The
    module docstring gives the arithmetic; on the device, no host sync."""
    v = t.float()
    R, C = v.shape[-2:]
    grouped, br, bc = _groups(v.abs(), block)
    empty = grouped.new_zeros(grouped.shape[:-3] + grouped.shape[-2:-1])  # no element: amax 0
    amax = grouped.amax(dim=(-3, -1)) if grouped.numel() else empty
    scale = scale_of(amax, scale_dtype)
    return _cast(v / _expand(_divisor(scale), br, bc, R, C)), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int | None, int | None]) -> torch.Tensor:
    """``q · s`` in fp32 (``quantize``'s inverse up to its rounding)."""
    R, C = q.shape[-2:]
    br, bc = (max(R, 1) if block[0] is None else block[0]), (max(C, 1) if block[1] is None else block[1])
    return q.float() * _expand(scale_value(scale), br, bc, R, C)


def fake_quantize(
    t: torch.Tensor, block: tuple[int | None, int | None], scale_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``dequantize(quantize(t))``: the fp32 values an FP8 GEMM multiplies (its scales applied)."""
    return dequantize(*quantize(t, block, scale_dtype), block)


def group_offsets(offsets: torch.Tensor, group: int | None) -> torch.Tensor:
    """The first row group of each expert (and the total, last) for a reduction over expert-sorted rows in groups
    of ``group`` rows of one expert (None: one group per expert): ``[E + 1]`` int64, on the device."""
    E = offsets.shape[0] - 1
    if group is None:
        return torch.arange(E + 1, device=offsets.device)
    off = offsets.long()
    counts = off[1:] - off[:-1]
    return torch.cat([off.new_zeros(1), ((counts + group - 1) // group).cumsum(0)])


def padded_offsets(offsets: torch.Tensor, align: int) -> torch.Tensor:
    """Expert offsets ``[E + 1]`` with each expert's rows padded to a multiple of ``align``: the exclusive cumsum of
    ``ceil(count_e / align) · align``, on the device (no host sync), in ``offsets``' dtype. With ``align`` a divisor
    of the row group (16 | 32 | 128), the padded rows keep every group of ``row_groups`` / ``group_offsets``: an
    expert's groups cover the same rows, the last one followed by zero rows."""
    counts = offsets[1:] - offsets[:-1]
    return torch.cat([offsets.new_zeros(1), ((counts + align - 1) // align * align).cumsum(0).to(offsets.dtype)])


def padded_rows(rows: int, experts: int, align: int) -> int:
    """Rows of a buffer holding ``rows`` expert-sorted rows in ``padded_offsets``' layout, from shapes alone: the
    bound ``rows + (align - 1) · experts``, rounded up to a multiple of ``align``."""
    return -(-(rows + (align - 1) * experts) // align) * align


def pad_rows(t: torch.Tensor, offsets: torch.Tensor, align: int) -> torch.Tensor:
    """Expert-sorted rows ``t [R, C]`` in the padded layout ``[padded_rows(R, E, align), C]``: expert e's rows from
    ``padded_offsets(offsets, align)[e]`` on, the rows past ``offsets[E]`` (no expert) from its last entry on, zeros
    elsewhere. The reference of the layout ``kernels.quantize`` writes for ``align > 1`` (on the device, no host
    sync)."""
    R, E = t.shape[0], offsets.shape[0] - 1
    off, padded = offsets.long(), padded_offsets(offsets, align).long()
    r = torch.arange(R, device=t.device)
    e = torch.searchsorted(off[1:], r, right=True)  # E: past the experts
    out = t.new_zeros(padded_rows(R, E, align), t.shape[1])
    return out.index_copy_(0, r - off[e] + padded[e], t)


def row_groups(offsets: torch.Tensor, rows: int, group: int | None) -> tuple[torch.Tensor, int]:
    """Group id of each of ``rows`` expert-sorted rows for a reduction over the rows: groups of ``group`` rows
    (None: all of an expert's rows) starting at each expert's first row ``offsets[e]`` (``group_offsets``); rows at
    or past ``offsets[E]`` get the group ``n`` (none). Returns ``(ids [rows] int64, n)``, ``n`` a bound from
    shapes."""
    E = offsets.shape[0] - 1
    off = offsets.long()
    r = torch.arange(rows, device=offsets.device)
    e = (torch.searchsorted(off[1:], r, right=True)).clamp(max=E - 1)
    first = group_offsets(offsets, group)
    if group is None:
        n, within = E, r.new_zeros(rows)
    else:
        n, within = rows // group + E, (r - off[e]) // group
    ids = torch.where(r < off[E], first[e] + within, n)
    return ids, n


def quantize_rows(
    t: torch.Tensor, offsets: torch.Tensor, group: int | None, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``t [R, C]`` expert-sorted rows quantized for a reduction over the rows (a weight gradient's operand): one
    scale per column and group of rows of one expert (``row_groups``). Returns ``(q [R, C] E4M3, scale [n + 1, C],
    ids [R])``; rows past ``offsets[E]`` use the last scale row (their own group). Same arithmetic as
    ``quantize``."""
    v = t.float()
    ids, n = row_groups(offsets, v.shape[0], group)
    index = ids[:, None].expand_as(v)
    amax = v.new_zeros(n + 1, v.shape[1]).scatter_reduce(0, index, v.abs(), "amax")
    scale = scale_of(amax, scale_dtype)
    return _cast(v / _divisor(scale)[ids]), scale, ids


def fake_quantize_rows(
    t: torch.Tensor, offsets: torch.Tensor, group: int | None, scale_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``quantize_rows`` dequantized (fp32)."""
    q, scale, ids = quantize_rows(t, offsets, group, scale_dtype)
    return q.float() * scale_value(scale)[ids]


def fake_quantize_dual(
    t: torch.Tensor, offsets: torch.Tensor, group: int | None, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both layouts of expert-sorted rows that feed a GEMM reducing over their columns and a weight gradient (dh,
    dg): ``(fake_quantize(t, (1, group)), fake_quantize_rows(t, offsets, group))``."""
    return fake_quantize(t, (1, group), scale_dtype), fake_quantize_rows(t, offsets, group, scale_dtype)


@dataclass(frozen=True)
class Quantizer:
    """The quantizations an FP8 path calls: ``quantize(t, block, scale_dtype)`` as ``quantize`` (E4M3 and
    scales, for the kernels and the weight cache), and the fake ones of the emulation (``backends.torch_fp8``,
    ``strategies.fp8``): ``blocks(t, block, scale_dtype)`` as ``fake_quantize``, ``rows(t, offsets, group,
    scale_dtype)`` as ``fake_quantize_rows`` and ``dual(t, offsets, group, scale_dtype)`` as ``fake_quantize_dual``.
    ``REFERENCE`` is this module's, ``kernels.quantize.QUANTIZER`` the Triton kernels' (``dual``: one kernel writing
    both layouts)."""

    quantize: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    blocks: Callable[..., torch.Tensor]
    rows: Callable[..., torch.Tensor]
    dual: Callable[..., tuple[torch.Tensor, torch.Tensor]]


REFERENCE = Quantizer(quantize, fake_quantize, fake_quantize_rows, fake_quantize_dual)


# ----------------------------------------------------------------------------------------------- weight cache

# parameter identity -> (weakref, _version, {(view, recipe, reduced dimension): (E4M3 weight, scales)})
_CACHE: dict[int, tuple[weakref.ref, int, dict]] = {}


def weight_cache_clear() -> None:
    """Drop every cached quantized weight."""
    _CACHE.clear()


def _cacheable(w: torch.Tensor) -> bool:
    graph = torch.is_grad_enabled() and w.requires_grad  # the result would hold a graph
    return not (torch.compiler.is_compiling() or w.is_inference() or w.device.type == "meta" or graph)


def _k_major(q: torch.Tensor, reduced: int) -> torch.Tensor:
    """``q [E, K, N]`` with dimension ``1 + reduced`` contiguous: itself when stored so, else a copy."""
    if q.stride(1 + reduced) == 1:
        return q
    return q.contiguous() if reduced else q.transpose(1, 2).contiguous().transpose(1, 2)


def quantized_weight(
    w: torch.Tensor,
    rcp: Recipe,
    reduced: int,
    quantizer: Callable = quantize,
    *,
    k_major: bool = False,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert weights ``w [E, K, N]`` quantized for a reduction along dimension ``reduced`` (0: K, 1: N) with
    recipe ``rcp`` (groups ``rcp.weight_block(reduced)``): ``(q E4M3 [E, K, N], scale)``, what the FP8 kernels
    read. ``quantizer(t, block, scale_dtype)`` is ``quantize`` or its Triton twin (``kernels.quantize``).
    ``k_major``: q stored with the reduced dimension contiguous (sm_90's E4M3 wgmma reads K-major tiles only; the
    copy is made once, in the cache).

    Cached per parameter (the tensor owning the storage, by identity) and its version counter (``_version``, which
    every in-place update bumps): a weight is quantized once per optimizer step for all the GEMMs that read it in
    that layout (forward and backward; without ``k_major``, ``"blockwise"``'s square blocks serve both layouts; with
    it, each reduced dimension has its own contiguous copy). The cache holds the E4M3
    values and their scales: 1 byte per element per layout (up to two layouts), plus the scales. Not cached while
    ``torch.compile`` traces (the quantization is then part of the graph), for inference tensors (no version
    counter), on meta, or where autograd would record the quantization.

    ``scale`` given: ``w`` is prequantized (E4M3, ``prequantize``) and ``(w, scale)`` is returned as it is (for
    ``reduced = 0`` only; with ``k_major``, a K-major copy of ``w`` at each call unless ``w`` is stored K-major, as
    ``prequantize`` stores it)."""
    if scale is not None:
        if reduced != 0:
            raise ValueError(f"prequantized weights serve the forward GEMMs (reduced=0) only, got reduced={reduced}")
        return (_k_major(w, 0) if k_major else w), scale
    block = rcp.weight_block(reduced)

    def make() -> tuple[torch.Tensor, torch.Tensor]:
        q, s = quantizer(w, block, rcp.scale_dtype)
        return (_k_major(q, reduced) if k_major else q), s

    if not _cacheable(w):
        return make()
    base = w if w._base is None else w._base
    key = id(base)
    entry = _CACHE.get(key)
    if entry is None or entry[0]() is not base or entry[1] != base._version:
        entry = (weakref.ref(base, lambda _: _CACHE.pop(key, None)), base._version, {})
        _CACHE[key] = entry
    layout = 1 + reduced if k_major else None  # the contiguous dimension asked for (square blocks: one scale layout)
    view = (w.storage_offset(), tuple(w.shape), w.stride(), w.dtype, block, rcp.scale_dtype, quantizer, layout)
    cached = entry[2].get(view)
    if cached is None:
        cached = entry[2][view] = make()
    return cached


def weight(
    w: torch.Tensor, rcp: Recipe, reduced: int, quantizer: Callable = quantize, *, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``quantized_weight`` dequantized (fp32): the values an FP8 GEMM multiplies, for the emulation (the
    dequantization runs at each call; the cache keeps the E4M3 copy). ``scale``: ``w`` is prequantized, as in
    ``quantized_weight``. Returned contiguous (row-major) whatever ``w``'s layout: the emulation's matmuls then sum
    in one order for the same values, so prequantized weights (stored K-major) give bit for bit what the in-op
    quantization of their master weights gives, however those were stored (row-major, or K-major as Hugging Face's
    ``[E, out, in]`` weights are)."""
    q, s = quantized_weight(w, rcp, reduced, quantizer, scale=scale)
    return dequantize(q, s, rcp.weight_block(reduced)).contiguous()


# ----------------------------------------------------------------------------------------------- prequantized


def prequantize(w: torch.Tensor, fp8: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert weights ``w [E, K, N]`` (float) as an inference checkpoint stores them for recipe ``fp8``: ``(q,
    scale)``, q E4M3 ``[E, K, N]`` stored K-major (``q.stride(1) == 1``, the layout the FP8 kernels read) and the
    scales ``[E, ...]`` (``Recipe.weight_scale_shape``, fp32 or uint8 E8M0). The same quantization as the in-op
    path (``quantized_weight(w, recipe, 0, k_major=True)``: the same values and scales), not cached, no autograd.
    ``moe_mlp(..., q1, q2, q3, fp8=fp8, weight_scales=(s1, s2, s3))`` reads them."""
    rcp = recipe(fp8)
    check_tensor("w", w, "[E, K, N]", (None, None, None))
    check_float("w", w)
    q, s = quantize(w.detach(), rcp.weight_block(0), rcp.scale_dtype)
    return _k_major(q, 0), s


def check_weight_scales(
    fp8: str | None,
    weight_scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None,
) -> bool:
    """Whether the expert weights are prequantized (E4M3 with ``weight_scales = (s1, s2, s3)``, ``s3`` None when
    ``w3`` is, as ``prequantize`` gives them for recipe ``fp8``); a ``TypeError`` / ``ValueError`` naming the
    argument otherwise: scales without E4M3 weights or without ``fp8``, E4M3 weights without scales, scales of
    another recipe (dtype or shape), on another device. Shapes of the weights themselves are the caller's."""
    named = {"w1": w1, "w2": w2, "w3": w3}
    e4m3 = [name for name, w in named.items() if isinstance(w, torch.Tensor) and w.dtype == E4M3]
    if weight_scales is None:
        if e4m3:
            raise TypeError(
                f"{', '.join(e4m3)} {'is' if len(e4m3) == 1 else 'are'} float8_e4m3fn: prequantized expert weights "
                f"need their scales, weight_scales=(s1, s2, s3) from fp8.prequantize, and fp8=their recipe"
            )
        return False
    if not isinstance(weight_scales, (tuple, list)) or len(weight_scales) != 3:
        raise TypeError(f"weight_scales must be a tuple (s1, s2, s3) (s3 None without w3), got {weight_scales!r}")
    if fp8 is None:
        raise ValueError(f"weight_scales need fp8=the weights' recipe (one of {RECIPES}), got fp8=None")
    rcp = recipe(fp8)
    for i, ((name, w), s) in enumerate(zip(named.items(), weight_scales)):
        sname = f"weight_scales[{i}] ({name}'s scales)"
        if w is None:
            if s is not None:
                raise ValueError(f"{sname} must be None without {name}, got a tensor")
            continue
        if not isinstance(w, torch.Tensor) or w.dtype != E4M3:
            got = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
            raise TypeError(f"{name} must be float8_e4m3fn with weight_scales (fp8.prequantize), got {got}")
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{sname} must be a torch.Tensor, got {type(s).__name__}")
        if s.dtype != rcp.scale_dtype:
            raise TypeError(
                f"{sname} must be {rcp.scale_dtype} for recipe {fp8!r} (fp8.prequantize({name}, {fp8!r})), got "
                f"{s.dtype}"
            )
        want = rcp.weight_scale_shape(tuple(w.shape)) if w.dim() == 3 else None
        if want is not None and tuple(s.shape) != want:
            raise ValueError(
                f"{sname} must have shape {want} for recipe {fp8!r} and {name} {tuple(w.shape)} "
                f"(fp8.prequantize({name}, {fp8!r})), got {tuple(s.shape)}"
            )
        if s.device != w.device:
            raise ValueError(f"{sname} must be on {name}'s device {w.device}, got {s.device}")
    return True


def uncast(fn: Callable[[torch.Tensor], torch.Tensor], keep: Iterable[torch.Tensor | None]) -> Callable:
    """``fn`` of ``nn.Module._apply`` (``.to``, ``.cuda``, ``.half``, ...) for a module holding prequantized weights:
    the tensors of ``keep`` (by identity: the E4M3 weights and their scales) move to ``fn``'s device without a cast,
    so a dtype cast of the model (``model.to(torch.bfloat16)``) leaves them as they are (their dtypes are the
    recipe's); every other tensor goes through ``fn``."""
    mine = {id(t) for t in keep if t is not None}

    def move(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in mine:
            return fn(t)
        return t.to(fn(t.new_empty(0, dtype=torch.uint8)).device)  # fn's device; an integer probe: no cast

    return move


def check_loaded_dtypes(
    fp8: str, tensors: dict[str, torch.Tensor | None], state_dict: dict, prefix: str, errors: list[str]
) -> None:
    """For ``_load_from_state_dict`` of a module holding prequantized weights of recipe ``fp8``: an entry of
    ``errors`` for each of its ``tensors`` (by name) whose checkpoint entry ``state_dict[prefix + name]`` has another
    dtype (a checkpoint of another recipe, or of unquantized weights), which ``load_state_dict`` would otherwise cast
    silently."""
    for name, mine in tensors.items():
        theirs = state_dict.get(prefix + name)
        if mine is not None and isinstance(theirs, torch.Tensor) and theirs.dtype != mine.dtype:
            errors.append(
                f"{prefix}{name}: the experts hold FP8 weights of recipe {fp8!r} ({mine.dtype}), the checkpoint has "
                f"{theirs.dtype} (another recipe, or unquantized weights)"
            )
