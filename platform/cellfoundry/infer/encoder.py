"""The BERT encoder run only up to the layer an embedding needs, on length-sorted batches.

No MLM head and no layer after the chosen one is run. Cells are padded per batch to the
longest cell of the batch (rounded up to a multiple of 8 unless all have one length), after
sorting by length, so a batch wastes almost no padding. Works with any ``transformers`` BERT (``BertForMaskedLM``,
``BertModel``, sequence classifiers, 8-bit/4-bit loads): its ``base_model`` is used.

``packed=True`` is the padding-free path (the default on GPU): each batch's cells are packed
into rows of up to ``row_tokens`` tokens (:func:`cellfoundry.model.packing.pack`) and run
with FlexAttention and a document mask, so no cell attends to another and compute follows
real tokens; the hidden states are unpacked into the padded layout, so pooling is the same.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import transformers

logger = logging.getLogger(__name__)

PAD_MULTIPLE = 8


def resolve_layer(layer: int, num_layers: int) -> int:
    """Number of encoder layers to run for ``layer`` (Python indexing of the layer outputs:
    -1 the last layer, -2 the second-to-last, 0 the first)."""
    if not -num_layers <= layer < num_layers:
        raise ValueError(
            f"layer {layer} does not exist in a {num_layers}-layer model; use -1 (last), "
            f"-2 (second-to-last, the default) or 0..{num_layers - 1}"
        )
    return layer % num_layers + 1


@dataclass
class EncodedBatch:
    """Hidden states of one padded batch: ``hidden`` (rows, width, hidden) and ``ids``
    (rows, width) on the model's device; ``index`` the positions of its rows in the input
    sequence list; ``lengths`` their real lengths (padding lies after them)."""

    index: np.ndarray
    lengths: np.ndarray
    hidden: torch.Tensor
    ids: torch.Tensor


PACKED_ROW_TOKENS = 8192
"""Tokens per packed row (several cells; each row is one FlexAttention sequence)."""


class TruncatedEncoder:
    """Embeddings + the first ``n_layers`` encoder layers of a BERT, in inference mode;
    ``packed``: the padding-free FlexAttention path (see the module docstring)."""

    def __init__(
        self,
        model: transformers.PreTrainedModel,
        n_layers: int,
        *,
        compile: bool = False,
        packed: bool = False,
        row_tokens: int = PACKED_ROW_TOKENS,
    ) -> None:
        base = getattr(model, "base_model", model)
        if not hasattr(base, "embeddings") or not hasattr(base, "encoder"):
            raise TypeError(
                f"{type(model).__name__} is not a BERT-like model (no embeddings/encoder); "
                "pass a transformers BERT such as BertForMaskedLM"
            )
        if packed:
            # the same weights, FlexAttention for the layers (a BlockMask as attention mask)
            model.set_attn_implementation("flex_attention")
        self.packed, self.row_tokens = packed, row_tokens
        self.base = base.eval()
        layers = list(base.encoder.layer[:n_layers])
        if compile:  # dynamic shapes: batch widths vary with cell lengths
            layers = [torch.compile(layer, dynamic=True) for layer in layers]
        self.layers = layers
        self.n_layers = n_layers
        self.pad_id = int(base.config.pad_token_id or 0)
        self.device = next(base.parameters()).device

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(rows, width) ids and 0/1 mask -> (rows, width, hidden) output of the last layer run
        (zeros at padding on the packed path)."""
        if self.packed:
            return self._packed(input_ids, attention_mask)
        hidden = self.base.embeddings(input_ids=input_ids)
        mask = _attention_mask(self.base, attention_mask, hidden)
        return self._layers(hidden, mask)

    def _layers(self, hidden: torch.Tensor, mask: object) -> torch.Tensor:
        for layer in self.layers:
            out = layer(hidden, mask)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def _packed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from cellfoundry.model.packing import pack

        row = max(self.row_tokens, int(input_ids.shape[1]))
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        packed, packing = pack(batch, row_length=row, attention="flex", pad_id=self.pad_id)
        hidden = self.base.embeddings(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"]
        )
        return packing.unpack(self._layers(hidden, packed["attention_mask"]))

    def batches(
        self, seqs: Sequence[np.ndarray], *, batch_size: int, max_tokens: int | None = None
    ) -> Iterator[EncodedBatch]:
        """Encode ``seqs`` (token id arrays) in batches of similar length: at most
        ``batch_size`` rows and, with ``max_tokens``, at most that many padded tokens."""
        for index in length_batches([len(s) for s in seqs], batch_size, max_tokens):
            lengths = np.array([len(seqs[i]) for i in index], dtype=np.int64)
            ids, mask = pad_batch([seqs[i] for i in index], self.pad_id)
            ids = ids.to(self.device, non_blocking=True)
            mask = mask.to(self.device, non_blocking=True)
            yield EncodedBatch(index, lengths, self(ids, mask), ids)


def _parameters(fn: Callable[..., object]) -> frozenset[str]:
    """Names of ``fn``'s parameters (microseconds: negligible beside a forward pass)."""
    return frozenset(inspect.signature(fn).parameters)


def _attention_mask(base: torch.nn.Module, mask: torch.Tensor, hidden: torch.Tensor) -> object:
    """The mask the model's attention implementation expects (built by transformers)."""
    create = getattr(base, "_create_attention_masks", None)
    if create is not None:
        # A private method whose arguments change between releases (5.25 added a required
        # position_ids): pass what this one takes, position_ids as the model would (None).
        kwargs: dict[str, object] = {
            "attention_mask": mask,
            "encoder_attention_mask": None,
            "embedding_output": hidden,
            "encoder_hidden_states": None,
            "cache": None,
        }
        if "position_ids" in _parameters(create):
            kwargs["position_ids"] = None
        mask, _ = create(**kwargs)
        return mask
    # older transformers: additive 4-D mask
    return base.get_extended_attention_mask(mask, mask.shape, dtype=hidden.dtype)


def length_batches(
    lengths: Sequence[int], batch_size: int, max_tokens: int | None = None
) -> list[np.ndarray]:
    """Indices grouped into batches after a stable sort by length (longest first)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    lens = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lens, kind="stable")
    out, start = [], 0
    while start < len(order):
        rows = batch_size
        if max_tokens is not None:
            width = -(-int(lens[order[start]]) // PAD_MULTIPLE) * PAD_MULTIPLE
            rows = max(1, min(batch_size, max_tokens // max(width, 1)))
        out.append(order[start : start + rows])
        start += rows
    return out


def pad_batch(seqs: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded int64 ids and a 0/1 attention mask. Rows of unequal length are padded to
    a multiple of 8 (tensor cores); rows of one length are not padded at all, so the mask is
    all ones and SDPA may use its fastest (mask-free, flash) kernel, as in a deletion screen
    where every perturbed copy of a cell has the same length."""
    lengths = {len(s) for s in seqs}
    width = max(lengths)
    if len(lengths) > 1:
        width = -(-width // PAD_MULTIPLE) * PAD_MULTIPLE
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = s
        mask[r, : len(s)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)
