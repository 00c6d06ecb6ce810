"""Pretraining data helpers: seeds, the token dictionary, which rows a stream uses.

:class:`RowFilter` decides, per shard row, whether a stream (training or validation) uses
it: ``data.exclude`` leaves cells out of both, and a validation ``fraction`` splits the
rest by :func:`stable_hash` of ``cell_id``, so the same cells are held out on every run,
rank and machine. The streams themselves are in :mod:`cellfoundry.train.stream`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cellfoundry.config.train import DataConfig
from cellfoundry.genes.vocab import load_token_dictionary

logger = logging.getLogger(__name__)

TOKEN_DICTIONARY_FILE = "token_dictionary.json"
#: The column whose hash chooses validation cells.
CELL_ID = "cell_id"


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that depends only on ``seed`` and ``keys`` (e.g. purpose, rank, step)."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


def resolve_token_dictionary(data: DataConfig) -> tuple[Path, dict[str, int]]:
    """The token dictionary file of ``data`` and its contents (validated).

    ``data.token_dictionary`` may be a file or a folder (a ``vocabulary`` artifact, or a
    Geneformer dictionary folder with ``token_dictionary*.json``/``.pkl``), or the URI of a
    ``vocabulary`` artifact on object storage (copied into the local cache first, on each
    machine that needs it); by default the ``vocabulary`` artifact beside the tokenized one
    (a folder or a URI) is used.
    """
    from cellfoundry import artifacts, storage

    given = data.token_dictionary
    if given is None and storage.is_remote(data.tokenized):
        # the corpus stage writes tokenized/ and vocabulary/ side by side, in a bucket too
        beside = storage.join(storage.parent(data.tokenized), "vocabulary")
        if not storage.is_file(storage.join(beside, artifacts.MANIFEST)):
            raise ValueError(
                f"data.token_dictionary is not set and there is no vocabulary artifact beside "
                f"data.tokenized ({beside}): set data.token_dictionary to a vocabulary folder, "
                "a dictionary file or the URI of a vocabulary artifact"
            )
        given = beside
    if given is not None and storage.is_remote(given):
        try:
            given = str(artifacts.localize(given))
        except artifacts.ArtifactError as exc:
            raise ValueError(f"data.token_dictionary: {exc}") from None
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


def truncate(row: np.ndarray, max_length: int, eos_id: int | None) -> np.ndarray:
    """The first ``max_length`` tokens of ``row``; a row that ended with ``<eos>`` keeps it,
    as if it had been tokenized with ``model_input_size = max_length``."""
    if len(row) <= max_length:
        return row
    if eos_id is not None and row[-1] == eos_id:
        return np.concatenate([row[: max_length - 1], row[-1:]])
    return row[:max_length]


_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN, _PRIME = np.uint64(0x9E3779B97F4A7C15), np.uint64(0x100000001B3)


def stable_hash(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """uint64 [n]: a hash of each string's UTF-8 bytes (null = ""), the same on every
    machine, process and version of Python (a polynomial hash finished with splitmix64)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], pa.string())
    arr = pc.fill_null(values.cast(pa.large_string()), "")
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], np.int64, count=n + 1, offset=arr.offset * 8)
    data = arr.buffers()[2]
    raw = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    sums = np.zeros(n, np.uint64)
    with np.errstate(over="ignore"):
        if n and lengths.max() > 0:
            positions = np.arange(offsets[0], offsets[-1])
            ends = np.repeat(offsets[1:], lengths)
            powers = np.ones(int(lengths.max()), np.uint64)  # PRIME ** k (mod 2 ** 64)
            powers[1:] = np.cumprod(np.full(len(powers) - 1, _PRIME, np.uint64))
            terms = raw[positions].astype(np.uint64) * powers[ends - 1 - positions]
            nonempty = lengths > 0
            sums[nonempty] = np.add.reduceat(terms, offsets[:-1][nonempty] - offsets[0])
        z = sums ^ ((lengths.astype(np.uint64) + np.uint64(1)) * _GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def hash_fraction(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """float64 [n] in [0, 1): :func:`stable_hash` as a uniform number; cells below a
    fraction ``f`` are the held-out ``f`` (raising ``f`` only adds cells)."""
    return (stable_hash(values) >> np.uint64(11)).astype(np.float64) * 2.0**-53


@dataclass(frozen=True)
class RowFilter:
    """Which rows of a tokenized shard a stream uses."""

    exclude: Mapping[str, Sequence[str]] = field(default_factory=dict)
    """Metadata column -> values left out (``data.exclude``)."""
    holdout: float = 0.0
    """Share of cells held out for validation, by :func:`hash_fraction` of ``cell_id``."""
    side: Literal["train", "validation"] = "train"
    """With ``holdout``: train keeps the other cells, validation the held-out ones."""

    @classmethod
    def for_stream(cls, data: DataConfig, side: Literal["train", "validation"]) -> RowFilter:
        """The filter of the ``side`` stream of ``data`` (a separate validation artifact
        holds out nothing: all its cells, less ``exclude``, are validation cells)."""
        holdout = data.validation.fraction if data.validation.tokenized is None else 0.0
        return cls(dict(data.exclude), holdout, side)

    @property
    def columns(self) -> list[str]:
        """Metadata columns the filter reads (empty: every row is used)."""
        return [*self.exclude, *([CELL_ID] if self.holdout > 0 else [])]

    def check(self, names: Sequence[str], where: str) -> None:
        """Raise a ValueError naming the fix when a shard lacks a column the filter needs."""
        for column in self.exclude:
            if column not in names:
                raise ValueError(
                    f"data.exclude: {where} has no column {column!r}; its columns are "
                    f"{list(names)}: fix the column name or drop it from data.exclude"
                )
        if self.holdout > 0 and CELL_ID not in names:
            raise ValueError(
                f"data.validation.fraction: {where} has no {CELL_ID!r} column to hold cells "
                "out by; set data.validation.tokenized to a separate artifact instead"
            )

    def mask(self, table: pa.Table) -> np.ndarray | None:
        """bool [rows]: rows of ``table`` the stream uses (None: all of them)."""
        if not self.columns:
            return None
        keep = np.ones(table.num_rows, dtype=bool)
        for column, values in self.exclude.items():
            hit = pc.is_in(table[column].cast(pa.string()), value_set=pa.array(values, pa.string()))
            keep &= ~pc.fill_null(hit, False).to_numpy(zero_copy_only=False)
        if self.holdout > 0:
            held = hash_fraction(table[CELL_ID].cast(pa.string())) < self.holdout
            keep &= held if self.side == "validation" else ~held
        return keep
