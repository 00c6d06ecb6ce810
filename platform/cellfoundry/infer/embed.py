"""Cell and contextual gene embeddings from a chosen layer (no Ray here).

:class:`Embedder` loads a model once (or takes an already-loaded one, e.g. 8-bit or bf16
from Ray Serve), runs the encoder only up to the chosen layer, and pools:

- cell embeddings: the ``<cls>`` token's state, or the mean over gene tokens (``<cls>``,
  ``<eos>`` and padding excluded);
- contextual gene embeddings: each gene token's state in its cell.

Layers are indexed like Python lists of layer outputs: -1 the last, -2 the second-to-last
(the default, as in the Geneformer seeds), 0 the first; ``Embedder.emb_layer`` is the same
layer in Geneformer's convention (``emb_layer``: 0 the last, -1 the second-to-last).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import transformers

from cellfoundry.infer.encoder import EncodedBatch, TruncatedEncoder, resolve_layer

logger = logging.getLogger(__name__)

Pooling = Literal["mean", "cls"]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA, fp32 on CPU; bf16/fp16 asked for on CPU become fp32 (warning)."""
    if dtype not in (*_DTYPES, "auto"):
        raise ValueError(f"dtype {dtype!r}: use auto, fp32, bf16 or fp16")
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu" and dtype != "fp32":
        warnings.warn(
            f"dtype {dtype} on CPU is slow and inexact there; using fp32", UserWarning, stacklevel=3
        )
        return torch.float32
    return _DTYPES[dtype]


class Embedder:
    """A model loaded once, embedding cells (token id arrays as tokenized, with ``<cls>`` /
    ``<eos>`` in the V2 layout or none in V1).

    ``model``: a model directory or a model artifact's URI (loaded with
    ``cellfoundry.model.load_model``, a URI from this machine's cache copy) or a loaded
    ``transformers`` BERT (used as is: its device and dtype are kept). ``token_dictionary``
    defaults to the one saved in the model directory (or beside ``model.name_or_path``).
    ``batch_size``: cells per forward pass; ``max_tokens``: also cap padded tokens per pass.
    ``packed``: the padding-free FlexAttention path (same embeddings, compute on real tokens
    only; it switches the model to FlexAttention); None: on when the Embedder loads the model
    itself onto a GPU (on CPU, FlexAttention compiles slowly and padding is cheap next to the
    matmuls; a model passed in is left as it is, since others may share it).
    """

    def __init__(
        self,
        model: str | Path | transformers.PreTrainedModel,
        *,
        layer: int = -2,
        pooling: Pooling = "mean",
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 32,
        max_tokens: int | None = None,
        token_dictionary: Mapping[str, int] | None = None,
        compile: bool = False,
        packed: bool | None = None,
    ) -> None:
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling {pooling!r}: use 'mean' or 'cls'")
        owned = isinstance(model, (str, Path))
        if owned:
            from cellfoundry.model import load_model
            from cellfoundry.model.checkpoint import local_dir

            directory = local_dir(model)  # a URI: copied whole into the local cache once
            dev = resolve_device(device)
            model = load_model(directory).to(dev, dtype=resolve_dtype(dtype, dev))
        else:
            directory = Path(str(getattr(model, "name_or_path", "") or "."))
            if device != "auto" and not getattr(model, "is_quantized", False):
                model = model.to(resolve_device(device))
        if token_dictionary is None and directory.is_dir():
            from cellfoundry.model import load_token_dictionary_for

            token_dictionary = load_token_dictionary_for(directory)
        if token_dictionary is None:
            raise ValueError(
                f"no token dictionary for the model ({directory}): pass token_dictionary= "
                "(e.g. the Geneformer dictionary of the model's version)"
            )
        self.model = model.eval()
        self.token_dictionary = dict(token_dictionary)
        config = model.config
        self.n_layers = resolve_layer(layer, config.num_hidden_layers)
        self.layer, self.pooling = layer, pooling
        # Geneformer's emb_layer of the same layer (0 the last, -1 the second-to-last)
        self.emb_layer = self.n_layers - int(config.num_hidden_layers)
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.max_length = int(config.max_position_embeddings)
        self.vocab_size = int(config.vocab_size)
        self.hidden_size = int(config.hidden_size)
        self.pad_id = int(self.token_dictionary.get("<pad>", config.pad_token_id or 0))
        self.cls_id = self.token_dictionary.get("<cls>")
        self.eos_id = self.token_dictionary.get("<eos>")
        self.special_ids = [i for i in (self.pad_id, self.cls_id, self.eos_id) if i is not None]
        if pooling == "cls" and self.cls_id is None:
            raise ValueError(
                "pooling 'cls' needs a <cls> token, and this model's dictionary has none (a V1 "
                "model): use pooling 'mean'"
            )
        on_gpu = next(model.parameters()).device.type == "cuda"
        self.packed = (owned and on_gpu) if packed is None else packed
        self.encoder = TruncatedEncoder(model, self.n_layers, compile=compile, packed=self.packed)
        self.device = self.encoder.device

    # ---------------------------------------------------------------- inputs
    def prepare(self, cell: np.ndarray) -> np.ndarray:
        """A cell's ids as int64, cut to the model's input size (keeping ``<eos>``)."""
        ids = np.asarray(cell, dtype=np.int64)
        if ids.ndim != 1 or len(ids) == 0:
            raise ValueError("each cell must be a non-empty 1-D array of token ids")
        if ids.max() >= self.vocab_size or ids.min() < 0:
            raise ValueError(
                f"token id {int(ids.max())} is outside the model's vocabulary ({self.vocab_size}); "
                "tokenize with the model's own token dictionary"
            )
        if len(ids) > self.max_length:
            if self.eos_id is not None and ids[-1] == self.eos_id:
                ids = np.concatenate([ids[: self.max_length - 1], ids[-1:]])
            else:
                ids = ids[: self.max_length]
        return ids

    def is_gene(self, ids: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """True where ``ids`` are gene tokens (not ``<pad>``, ``<cls>`` or ``<eos>``)."""
        mask = ids != self.special_ids[0]
        for s in self.special_ids[1:]:
            mask = mask & (ids != s)
        return mask

    def encode(self, seqs: Sequence[np.ndarray]) -> Iterator[EncodedBatch]:
        """Length-sorted forward passes over prepared sequences (see :meth:`prepare`)."""
        return self.encoder.batches(seqs, batch_size=self.batch_size, max_tokens=self.max_tokens)

    # ---------------------------------------------------------------- pooling
    def pool(self, batch: EncodedBatch) -> torch.Tensor:
        """(rows, hidden) float32 cell embeddings of an encoded batch."""
        hidden = batch.hidden.float()
        if self.pooling == "cls":
            if not bool((batch.ids[:, 0] == self.cls_id).all()):
                raise ValueError("pooling 'cls': every cell must start with <cls>; use 'mean'")
            return hidden[:, 0]
        mask = self.is_gene(batch.ids).unsqueeze(-1).to(hidden.dtype)  # (rows, width, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def embed_cells(self, cells: Sequence[np.ndarray]) -> np.ndarray:
        """(n_cells, hidden) float32 cell embeddings, in input order."""
        seqs = [self.prepare(c) for c in cells]
        out = np.zeros((len(seqs), self.hidden_size), dtype=np.float32)
        for batch in self.encode(seqs):
            out[batch.index] = self.pool(batch).cpu().numpy()
        return out

    def embed_genes(self, cells: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per cell, in input order: (gene token ids (n_genes,) int32, their contextual
        embeddings (n_genes, hidden) float32), in the cell's rank order."""
        genes = self.embed(cells, genes=True)[1]
        assert genes is not None
        return genes

    def embed(
        self, cells: Sequence[np.ndarray], *, genes: bool = False
    ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]] | None]:
        """Cell embeddings and, with ``genes``, per-cell gene embeddings from the same passes."""
        seqs = [self.prepare(c) for c in cells]
        cell_out = np.zeros((len(seqs), self.hidden_size), dtype=np.float32)
        gene_out: list = [None] * len(seqs) if genes else []
        for batch in self.encode(seqs):
            cell_out[batch.index] = self.pool(batch).cpu().numpy()
            if genes:
                hidden = batch.hidden.float().cpu().numpy()
                for r, i in enumerate(batch.index):
                    keep = np.asarray(self.is_gene(seqs[i]))
                    gene_out[i] = (seqs[i][keep].astype(np.int32), hidden[r, : len(seqs[i])][keep])
        return cell_out, (gene_out if genes else None)
