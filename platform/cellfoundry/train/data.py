"""Pretraining data: token shards in memory, and each rank's masked micro-batches.

Everything a micro-batch holds (which cells, which positions are masked and what replaces
them) is a pure function of ``(seed, epoch, micro-batch index, rank)``, so a run resumed
from a checkpoint sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from cellfoundry.config.train import DataConfig
from cellfoundry.genes.vocab import load_token_dictionary
from cellfoundry.model import LengthGroupedBatches, MaskingCollator

logger = logging.getLogger(__name__)

TOKEN_DICTIONARY_FILE = "token_dictionary.json"


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that depends only on ``seed`` and ``keys`` (e.g. purpose, rank, step)."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


def resolve_token_dictionary(data: DataConfig) -> tuple[Path, dict[str, int]]:
    """The token dictionary file of ``data`` and its contents (validated).

    ``data.token_dictionary`` may be a file or a folder (a ``vocabulary`` artifact, or a
    Geneformer dictionary folder with ``token_dictionary*.json``/``.pkl``); by default the
    ``vocabulary`` artifact beside the tokenized one is used.
    """
    given = data.token_dictionary
    if given is None:
        path = Path(data.tokenized).parent / "vocabulary" / TOKEN_DICTIONARY_FILE
        if not path.is_file():
            raise ValueError(
                f"data.token_dictionary is not set and {path} does not exist; set it to the "
                "vocabulary artifact or dictionary folder the tokens were made with "
                '(e.g. "{shared}/geneformer/v2")'
            )
        return path, load_token_dictionary(path)
    path = Path(given)
    if path.is_dir():
        candidates = [path / TOKEN_DICTIONARY_FILE]
        candidates += sorted(path.glob("token_dictionary*.json")) + sorted(
            path.glob("token_dictionary*.pkl")
        )
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise ValueError(
                f"data.token_dictionary: {path} holds no token_dictionary*.json or .pkl"
            )
        path = found[0]
    elif not path.is_file():
        raise ValueError(f"data.token_dictionary: {path} does not exist; pass a file or folder")
    return path, load_token_dictionary(path)


@dataclass(frozen=True)
class TokenCorpus:
    """All cells of a tokenized artifact as one flat array (CSR layout)."""

    offsets: np.ndarray
    """int64 [n_cells + 1]: cell i is ``tokens[offsets[i]:offsets[i + 1]]``."""
    tokens: np.ndarray
    """int32 [n_tokens]."""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """int64 [n_cells]: tokens per cell."""
        return np.diff(self.offsets)

    def row(self, i: int) -> np.ndarray:
        """Tokens of cell ``i`` (a view)."""
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


def shard_files(directory: str | Path, *, field: str = "data.tokenized") -> list[Path]:
    """The ``part-*.parquet`` shards of a tokenized artifact, in name order; ``field`` is
    the config key named in the error."""
    files = sorted(Path(directory).glob("part-*.parquet"))
    if not files:
        raise ValueError(
            f"{field}: {directory} holds no part-*.parquet shards; run `cellfoundry corpus` "
            f"or `cellfoundry tokenize` first, or point {field} at their output"
        )
    return files


def _kept(table: pa.Table, exclude: dict[str, list[str]] | None) -> pa.Array | None:
    """Boolean mask of the rows of one shard that ``exclude`` keeps (None: all)."""
    if not exclude:
        return None
    keep = pa.array(np.ones(table.num_rows, dtype=bool))
    for column, values in exclude.items():
        hit = pc.is_in(table[column].cast(pa.string()), value_set=pa.array(values, pa.string()))
        keep = pc.and_(keep, pc.invert(pc.fill_null(hit, False)))
    return keep


def _read(path: Path, columns: list[str]) -> pa.Table:
    names = pq.read_schema(path).names
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(
            f"data.exclude: {path} has no column {missing[0]!r}; its columns are {names}: fix "
            "the column name or drop it from data.exclude"
        )
    return pq.read_table(path, columns=columns)


def _read_shards(directory: str | Path, exclude: dict[str, list[str]] | None) -> Iterator[pa.Table]:
    for f in shard_files(directory):
        table = _read(f, ["input_ids", *(exclude or {})])
        keep = _kept(table, exclude)
        yield table if keep is None else table.filter(keep)


def load_token_corpus(
    directory: str | Path, exclude: dict[str, list[str]] | None = None
) -> TokenCorpus:
    """Read the ``input_ids`` of every shard (in name order) into a :class:`TokenCorpus`,
    leaving out cells whose metadata ``exclude`` names (column -> values).

    Memory: 4 bytes per token plus 8 per cell, in every worker.
    """
    column = pa.chunked_array(
        [t["input_ids"] for t in _read_shards(directory, exclude)], type=pa.list_(pa.int32())
    )
    lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    if len(offsets) == 1:
        raise ValueError(f"data.tokenized: {directory} holds no cells (after data.exclude)")
    return TokenCorpus(offsets, tokens)


def count_cells(directory: str | Path, exclude: dict[str, list[str]] | None = None) -> int:
    """Cells in a tokenized artifact: from the Parquet footers (reads no data), or, with
    ``exclude``, by reading only the named metadata columns."""
    if not exclude:
        return sum(pq.ParquetFile(f).metadata.num_rows for f in shard_files(directory))
    total = 0
    for f in shard_files(directory):
        table = _read(f, list(exclude))
        keep = _kept(table, exclude)
        total += int(pc.sum(keep).as_py() or 0) if keep is not None else table.num_rows
    return total


def truncate(row: np.ndarray, max_length: int, eos_id: int | None) -> np.ndarray:
    """The first ``max_length`` tokens of ``row``; a row that ended with ``<eos>`` keeps it,
    as if it had been tokenized with ``model_input_size = max_length``."""
    if len(row) <= max_length:
        return row
    if eos_id is not None and row[-1] == eos_id:
        return np.concatenate([row[: max_length - 1], row[-1:]])
    return row[:max_length]


class PretrainBatches:
    """The masked micro-batches of one rank; micro-batch ``m`` (counted over the whole run)
    belongs to epoch ``m // micro_per_epoch``.

    Rows come from :class:`cellfoundry.model.LengthGroupedBatches` with ``drop_last`` (every
    rank gets the same number of equally long batches); masks come from a
    :class:`cellfoundry.model.MaskingCollator` whose generator is seeded per (rank, micro-batch).
    """

    def __init__(
        self,
        corpus: TokenCorpus,
        token_dictionary: dict[str, int],
        data: DataConfig,
        *,
        max_length: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.corpus, self.max_length, self.seed, self.rank = corpus, max_length, seed, rank
        self.eos_id = token_dictionary.get("<eos>")
        self.sampler = LengthGroupedBatches(
            np.minimum(corpus.lengths, max_length),
            data.batch_size,
            seed=seed,
            megabatch_mult=data.megabatch_mult if data.group_by_length else 1,
            drop_last=True,
            num_replicas=world_size,
            rank=rank,
        )
        self.micro_per_epoch = len(self.sampler)
        if self.micro_per_epoch == 0:
            raise ValueError(
                f"data.tokenized has {len(corpus)} cells, fewer than one global batch "
                f"(data.batch_size {data.batch_size} x {world_size} workers); lower data.batch_size"
            )
        self._collator_kwargs = {
            "mlm_probability": data.mlm_probability,
            "max_length": max_length,
            "pad_to_multiple_of": data.pad_to_multiple_of,
        }
        self.token_dictionary = token_dictionary
        self._epoch: int | None = None
        self._batches: list[list[int]] = []

    def rows(self, micro: int) -> list[int]:
        """Cell indices of micro-batch ``micro`` of this rank."""
        epoch, position = divmod(micro, self.micro_per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._batches, self._epoch = list(self.sampler), epoch
        return self._batches[position]

    def batch(self, micro: int) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``labels``: int64 (batch_size, padded length)."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, 1, self.rank, micro))
        collator = MaskingCollator.for_token_dictionary(
            self.token_dictionary, generator=generator, **self._collator_kwargs
        )
        rows = [
            truncate(self.corpus.row(i), self.max_length, self.eos_id) for i in self.rows(micro)
        ]
        return collator(rows)
