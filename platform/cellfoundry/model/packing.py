"""Sequence packing: several cells share one row, so padding costs (almost) no compute.

:func:`pack` takes a padded batch from :class:`~cellfoundry.model.MaskingCollator`, drops
the padding and packs the sequences into as few rows as fit ``row_length`` (first-fit
decreasing). Positions restart at 0 for each sequence, and an attention mask keeps the
sequences of a row from seeing each other, so ``BertForMaskedLM`` gives the same logits,
loss and hidden states as on the padded batch (tested). Two masks:

- ``attention="flex"`` (the fast path): a FlexAttention ``BlockMask`` built from each
  token's sequence id (a document mask), for a model switched to
  ``attn_implementation="flex_attention"`` (:func:`use_flex_attention`). FlexAttention is
  block-sparse: 128 x 128 tiles where no query may see any key are skipped, so attention
  costs about the sum over sequences of length**2, not rows x width**2. Chosen over
  variable-length flash attention (``flash_attn_varlen_func``) because it needs no extra
  package (it is part of torch, compiled by Inductor for CUDA and CPU alike), keeps the
  checkpoints plain ``BertForMaskedLM`` (transformers' BERT takes a ``BlockMask`` as its
  attention mask), and runs, so is tested, on CPU.
- ``attention="dense"``: a block-diagonal boolean mask ``(rows, 1, L, L)`` for SDPA (no
  FlexAttention needed; attention still spans whole rows).

Everything else (embeddings, Q/K/V and output projections, feed-forward blocks, MLM head)
runs on real tokens only, plus the tail of each row. :meth:`Packing.unpack` puts per-token
outputs (hidden states, logits) back into the padded layout, so pooling and losses that
expect ``(batch, length, ...)`` work unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from cellfoundry.model.masking import IGNORE_INDEX

__all__ = ["FLEX_BLOCK", "Packing", "first_fit_decreasing", "pack", "pack_batch",
           "use_flex_attention"]  # fmt: skip

FLEX_BLOCK = 128
"""FlexAttention's tile size: flex rows are padded to a multiple of it."""


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins whose lengths sum to at most ``capacity``: longest items
    first, each into the first bin with room. Within a bin, items keep that order."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and lengths.max() > capacity:
        raise ValueError(f"an item of length {lengths.max()} exceeds the row length {capacity}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        for b, free in enumerate(room):
            if free >= n:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


@dataclass(frozen=True)
class Packing:
    """Where each packed token came from: ``segment[r, j]`` is the source row of packed
    position ``(r, j)`` (-1 for padding) and ``position[r, j]`` its position in that row."""

    segment: torch.Tensor
    """(R, W) long: source row index, -1 = padding."""
    position: torch.Tensor
    """(R, W) long: position within the source row."""
    batch_size: int
    length: int
    """Width of the padded batch that was packed."""

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token outputs ``(R, W, *rest)`` back to the padded layout ``(B, L, *rest)``
        (zeros where the padded batch had padding)."""
        real = self.segment >= 0
        out = x.new_zeros((self.batch_size, self.length, *x.shape[2:]))
        out[self.segment[real], self.position[real]] = x[real.to(x.device)]
        return out

    def block_mask(self) -> Any:
        """The FlexAttention document mask: a query sees the keys of its own sequence only;
        padding sees nothing (FlexAttention returns zeros for such rows)."""
        from torch.nn.attention.flex_attention import create_block_mask

        segment = self.segment

        def same_sequence(b: Any, h: Any, q: Any, kv: Any) -> Any:
            return (segment[b, q] == segment[b, kv]) & (segment[b, q] >= 0)

        rows, width = segment.shape
        # compiled mask building avoids materialising rows x width**2 booleans on GPU
        return create_block_mask(
            same_sequence, rows, None, width, width, device=segment.device,
            BLOCK_SIZE=FLEX_BLOCK, _compile=segment.is_cuda,
        )  # fmt: skip


def pack(
    batch: Mapping[str, torch.Tensor],
    *,
    row_length: int | None = None,
    attention: Literal["dense", "flex"] = "dense",
    pad_to_multiple_of: int | None = 8,
    pad_id: int = 0,
) -> tuple[dict[str, torch.Tensor], Packing]:
    """Pack the rows of a padded batch; returns the model's keyword arguments and the
    :class:`Packing` that maps outputs back.

    ``batch``: ``input_ids`` and ``attention_mask`` (B, L) with right padding, optional
    ``labels`` (B, L). ``row_length`` (default L) bounds the tokens per packed row.
    Returns ``input_ids``, ``position_ids``, ``labels`` (if given) of shape (R, W) with
    R <= B, and ``attention_mask``: a bool (R, 1, W, W) block-diagonal mask (``dense``; W
    <= row_length, a multiple of ``pad_to_multiple_of``) or a FlexAttention ``BlockMask``
    (``flex``; W a multiple of :data:`FLEX_BLOCK`, rows of up to ``row_length`` tokens).
    Padding carries label -100.
    """
    input_ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    lengths = mask.sum(dim=1)  # (B,)
    arange = torch.arange(mask.shape[1], device=mask.device)
    if not torch.equal(mask, arange < lengths[:, None]):
        raise ValueError("pack needs right-padded rows (attention_mask 1...1 0...0)")
    row_length = int(row_length or input_ids.shape[1])
    bins = first_fit_decreasing(lengths.tolist(), row_length)
    width = max(1, max(int(lengths[b].sum()) for b in bins))
    multiple = FLEX_BLOCK if attention == "flex" else pad_to_multiple_of
    if multiple:
        width = -(-width // multiple) * multiple
        if attention == "dense":
            width = min(row_length, width)
    device = input_ids.device
    n_rows = len(bins)
    segment = torch.full((n_rows, width), -1, dtype=torch.long)
    position = torch.zeros((n_rows, width), dtype=torch.long)
    for r, rows in enumerate(bins):
        at = 0
        for i in rows:
            n = int(lengths[i])
            segment[r, at : at + n] = i
            position[r, at : at + n] = torch.arange(n)
            at += n
    segment, position = segment.to(device), position.to(device)
    real = segment >= 0
    src = (segment.clamp(min=0), position)
    out_ids = torch.where(real, input_ids[src], torch.full_like(segment, pad_id)).to(
        input_ids.dtype
    )
    out = {"input_ids": out_ids, "position_ids": position}
    labels = batch.get("labels")
    if labels is not None:
        out["labels"] = torch.where(real, labels[src], torch.full_like(segment, IGNORE_INDEX))
    packing = Packing(segment, position, int(input_ids.shape[0]), int(input_ids.shape[1]))
    if attention == "flex":
        out["attention_mask"] = packing.block_mask()
    elif attention == "dense":
        same = segment[:, :, None] == segment[:, None, :]  # (R, W, W)
        attend = same & real[:, :, None] & real[:, None, :]
        # padding attends to itself, so no query row is empty (SDPA would give NaN)
        attend |= torch.eye(width, dtype=torch.bool, device=device)
        out["attention_mask"] = attend[:, None]
    else:
        raise ValueError(f"attention must be 'dense' or 'flex', not {attention!r}")
    return out, packing


def pack_batch(
    batch: Mapping[str, torch.Tensor],
    *,
    row_length: int | None = None,
    pad_to_multiple_of: int | None = 8,
    pad_id: int = 0,
) -> dict[str, torch.Tensor]:
    """:func:`pack` with the dense block-diagonal mask; the model's keyword arguments only."""
    return pack(batch, row_length=row_length, pad_to_multiple_of=pad_to_multiple_of, pad_id=pad_id)[
        0
    ]


@contextlib.contextmanager
def use_flex_attention(model: Any) -> Iterator[Any]:
    """Run ``model`` (a transformers BERT) with FlexAttention inside the block, for packed
    batches built with ``attention="flex"``; its previous attention implementation is put
    back afterwards. The weights are untouched: the checkpoint stays a plain
    ``BertForMaskedLM``."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("flex_attention")
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
