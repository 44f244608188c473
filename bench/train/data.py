"""The corpus: CPython's documentation topics (``pydoc_data.topics``), as bytes, with a fixed train/val split.

The 79 topics (~465 KB of English prose about Python) are joined in sorted key order and encoded as UTF-8; the
model reads bytes (vocabulary 256), so no tokenizer is needed. The last ``val_fraction`` of the bytes is the
validation split, the rest the training split: the split never depends on a seed. Training batches are random
windows (a ``torch.Generator`` the caller owns and checkpoints); validation uses fixed, evenly spaced windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Corpus", "load_corpus", "sample_batch", "validation_batches"]

VOCAB = 256


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor  # [N_train] uint8
    val: torch.Tensor  # [N_val] uint8
    source: str


def load_corpus(val_fraction: float = 0.1) -> Corpus:
    """The documentation topics as bytes, split into train (first ``1 - val_fraction``) and validation."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)
    split = int(len(data) * (1 - val_fraction))
    return Corpus(data[:split], data[split:], f"pydoc_data.topics ({len(topics)} topics, {len(data)} bytes)")


def _windows(data: torch.Tensor, offsets: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``[B, S]`` and next-byte targets ``[B, S]`` (int64) of the windows starting at ``offsets``."""
    chunk = data[offsets.unsqueeze(1) + torch.arange(seq_len + 1)].long()
    return chunk[:, :-1], chunk[:, 1:]


def sample_batch(
    data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``seq_len + 1`` bytes (CPU tensors)."""
    if len(data) < seq_len + 2:
        raise ValueError(f"the split must hold more than seq_len + 1 = {seq_len + 1} bytes, got {len(data)}")
    offsets = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
    return _windows(data, offsets, seq_len)


def validation_batches(
    data: torch.Tensor, batch_size: int, seq_len: int, num_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``num_batches`` fixed batches of windows spread evenly over ``data`` (the same for every run)."""
    if len(data) < seq_len + 2:
        raise ValueError(f"the split must hold more than seq_len + 1 = {seq_len + 1} bytes, got {len(data)}")
    offsets = torch.linspace(0, len(data) - seq_len - 1, batch_size * num_batches).long()
    return [_windows(data, o, seq_len) for o in offsets.view(num_batches, batch_size)]
