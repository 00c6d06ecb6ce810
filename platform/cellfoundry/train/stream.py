"""Streaming pretraining input: each rank reads only its share of the token shards, through
a window of bounded size, and micro-batch ``m`` of rank ``r`` is a pure function of
``(seed, m, r, world size)`` and the artifact.

Why rank-assigned row-group blocks and not Ray Data (``get_dataset_shard`` /
``streaming_split``): exact resume. Here the position in the data *is* the step: a resumed
run recomputes the plan of its epoch from Parquet footers and reads only the blocks of the
window it resumes in; there is no pipeline state to checkpoint, and every rank derives
the same number of micro-batches per epoch from the same footers, so DeepSpeed's
collectives never wait for a rank that ran out of data. ``streaming_split`` gives neither
(its split and order depend on execution; resuming means replaying or checkpointing it).
Files are opened through ``pyarrow.fs`` (:mod:`cellfoundry.storage`), so ``s3://`` /
``gs://`` artifacts work too; there only the shards the manifest lists are read.

The plan (:class:`BlockIndex`, then :class:`PretrainBatches`):

1. Index: every row group is cut into blocks of at most ``data.block_rows`` rows; each
   block knows how many of its rows the stream uses (``kept``: all of them, or, with
   ``data.exclude`` / a validation fraction, a count from the few metadata columns those
   need). The driver builds it once and hands it to the workers; it holds a few integers
   per block, no cells.
2. Epoch ``e``: the blocks are permuted by ``rng(seed, stream, e)``; their kept rows, end
   to end, are cut into ``world_size`` equal contiguous ranges of
   ``micro_per_epoch x batch_size`` rows (the rest, less than one global batch, waits for
   another epoch's permutation). Rank ``r`` reads only the blocks overlapping its range;
   at most two blocks are shared with a neighbour, each rank taking its own rows.
3. A rank's range is read in windows of ``batch_size x megabatch_mult`` rows (the shuffle
   buffer and the length-grouping window): rows are shuffled by ``rng(seed, stream, e,
   window, rank)``, sorted by length (longest first) and cut into micro-batches, which run
   in an order drawn from ``rng(seed, stream, e, window)``, the longest first. That order
   is the same on every rank, so at each step all ranks hold the k-th longest micro-batch
   of statistically alike windows: similar lengths, little waiting at the all-reduce.
4. Masks come from a generator seeded by ``(seed, stream, rank, micro-batch)``.

Memory per worker: one window of cells plus two blocks (the last one read, kept so that a
block straddling two windows is read once, and the one being decoded), whatever the corpus
size; the index adds ~50 bytes per block. Trade-offs: a window mixes about
``window / block_rows`` blocks from random places of the corpus (smaller blocks mix more
datasets into each batch); a block is decoded from the start of its row group (Parquet
cannot seek within one), so row groups far larger than ``block_rows`` cost CPU: shards
written with row groups of a few thousand cells keep reads cheap.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from cellfoundry import storage
from cellfoundry.artifacts import ArtifactError, data_files
from cellfoundry.config.train import DataConfig
from cellfoundry.model import MaskingCollator
from cellfoundry.train.data import RowFilter, derive_seed, truncate

logger = logging.getLogger(__name__)

#: Stream keys of the seeds (2 is dropout, in the loop).
TRAIN, VALIDATION = 1, 3
#: Bytes read at a time within a column chunk (without it pyarrow reads whole chunks).
READ_BUFFER = 1 << 20


def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``uri`` (a local path, ``s3://`` or ``gs://``, configured
    by :mod:`cellfoundry.storage`) and the path within it."""
    return storage.resolve(uri)


def list_shards(uri: str, filesystem: pafs.FileSystem | None = None) -> list[str]:
    """Paths (within the filesystem) of the ``part-*.parquet`` shards of ``uri``, by name.
    On object storage only the shards a complete artifact's manifest lists."""
    if storage.is_remote(uri):
        try:
            paths = [open_filesystem(f)[1] for f in data_files(uri, "part-*.parquet")]
        except ArtifactError as exc:
            raise ValueError(f"{exc}; run `cellfoundry corpus` or `cellfoundry tokenize`") from None
    else:
        fs, root = open_filesystem(uri) if filesystem is None else (filesystem, uri)
        selector = pafs.FileSelector(root, recursive=False, allow_not_found=True)
        paths = sorted(
            i.path for i in fs.get_file_info(selector)
            if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, "part-*.parquet")
        )  # fmt: skip
    if not paths:
        raise ValueError(
            f"{uri} holds no part-*.parquet shards; run `cellfoundry corpus` or "
            "`cellfoundry tokenize` first, or point the config at their output"
        )
    return paths


@dataclass
class BlockIndex:
    """The blocks of a tokenized artifact (a few integers each) and the rows a stream uses."""

    uri: str
    paths: list[str]
    """Shard paths within ``uri``'s filesystem, in name order."""
    file: np.ndarray
    """int64 [n_blocks]: index into ``paths``."""
    group: np.ndarray
    """int64 [n_blocks]: row group within the file."""
    start: np.ndarray
    """int64 [n_blocks]: the block is rows ``start:stop`` of its row group."""
    stop: np.ndarray
    first_row: np.ndarray
    """int64 [n_blocks]: artifact-wide index (shards in name order) of the block's first row."""
    kept: np.ndarray
    """int64 [n_blocks]: rows of the block the stream uses."""
    row_filter: RowFilter

    def __len__(self) -> int:
        return len(self.file)

    @property
    def total(self) -> int:
        """Rows the stream uses, all blocks together."""
        return int(self.kept.sum())

    @classmethod
    def build(
        cls, uri: str, row_filter: RowFilter, block_rows: int,
        filesystem: pafs.FileSystem | None = None,
    ) -> BlockIndex:  # fmt: skip
        """Read the footers of ``uri``'s shards (and ``row_filter``'s columns, when it has
        any) and cut each row group into blocks of at most ``block_rows`` rows."""
        started = time.perf_counter()
        fs = open_filesystem(uri)[0] if filesystem is None else filesystem
        paths = list_shards(uri, filesystem)
        cols: dict[str, list[int]] = {k: [] for k in ("file", "group", "start", "stop", "first")}
        kept: list[np.ndarray] = []
        row = 0
        for f, path in enumerate(paths):
            with fs.open_input_file(path) as handle:
                pf = pq.ParquetFile(handle, buffer_size=READ_BUFFER)
                row_filter.check(pf.schema_arrow.names, path)
                for g in range(pf.metadata.num_row_groups):
                    n = pf.metadata.row_group(g).num_rows
                    cuts = np.linspace(0, n, -(-n // block_rows) + 1).round().astype(np.int64)
                    starts, stops = cuts[:-1], cuts[1:]
                    mask = None
                    if row_filter.columns:
                        mask = row_filter.mask(pf.read_row_group(g, columns=row_filter.columns))
                    if mask is None:
                        kept.append(stops - starts)
                    else:
                        used = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
                        kept.append(used[stops] - used[starts])
                    cols["start"] += starts.tolist()
                    cols["stop"] += stops.tolist()
                    cols["first"] += (row + starts).tolist()
                    cols["file"] += [f] * len(starts)
                    cols["group"] += [g] * len(starts)
                    row += n
        a = {k: np.asarray(v, dtype=np.int64) for k, v in cols.items()}
        index = cls(
            uri, paths, a["file"], a["group"], a["start"], a["stop"], a["first"],
            np.concatenate(kept) if kept else np.zeros(0, np.int64), row_filter,
        )  # fmt: skip
        logger.info(
            "%s: %d shards, %d blocks, %d of %d cells used (%.1f s)", uri, len(paths),
            len(index), index.total, row, time.perf_counter() - started,
        )  # fmt: skip
        return index

    def to_state(self) -> dict[str, Any]:
        """A picklable copy (for the workers); :meth:`from_state` undoes it."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "row_filter"}

    @classmethod
    def from_state(cls, state: dict[str, Any], row_filter: RowFilter) -> BlockIndex:
        """The index :meth:`to_state` saved (the filter comes from the config)."""
        return cls(**state, row_filter=row_filter)

    def read(
        self, block: int, filesystem: pafs.FileSystem | None = None
    ) -> tuple[np.ndarray, pa.ChunkedArray]:
        """Row ids (int64 [kept]) and ``input_ids`` of the rows of ``block`` the stream uses,
        reading only that block's row group, up to the block's last row."""
        fs = open_filesystem(self.uri)[0] if filesystem is None else filesystem
        g, start, stop = int(self.group[block]), int(self.start[block]), int(self.stop[block])
        columns = ["input_ids", *self.row_filter.columns]
        pieces, position = [], 0
        with fs.open_input_file(self.paths[int(self.file[block])]) as handle:
            pf = pq.ParquetFile(handle, buffer_size=READ_BUFFER)
            for batch in pf.iter_batches(batch_size=stop - start, row_groups=[g], columns=columns):
                lo, hi = max(start - position, 0), min(stop - position, batch.num_rows)
                if lo < hi:
                    pieces.append(batch.slice(lo, hi - lo))
                position += batch.num_rows
                if position >= stop:
                    break
        table = pa.Table.from_batches(pieces, schema=pieces[0].schema)
        ids = self.first_row[block] + np.arange(table.num_rows, dtype=np.int64)
        mask = self.row_filter.mask(table)
        if mask is not None:
            table, ids = table.filter(pa.array(mask)), ids[mask]
        assert len(ids) == self.kept[block], "the shard changed after it was indexed"
        return ids, table["input_ids"]


@dataclass
class Window:
    """The rows of one window of one rank, and its micro-batches (positions into ``rows``)."""

    ids: np.ndarray
    """int64 [rows]: artifact-wide row ids."""
    rows: list[np.ndarray]
    """Tokens of each row, truncated to max_length."""
    batches: list[np.ndarray]
    """In the order they run."""


class PretrainBatches:
    """The masked micro-batches of one rank, streamed; see the module docstring.

    Micro-batch ``m`` (counted over the whole run) belongs to epoch ``m // micro_per_epoch``.
    ``stream`` is :data:`TRAIN` or :data:`VALIDATION` (another order and other masks).
    """

    def __init__(
        self,
        index: BlockIndex,
        token_dictionary: dict[str, int],
        data: DataConfig,
        *,
        max_length: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        stream: int = TRAIN,
        filesystem: pafs.FileSystem | None = None,
    ) -> None:
        self.index, self.max_length, self.seed, self.rank = index, max_length, seed, rank
        self.stream, self.group_by_length = stream, data.group_by_length
        self.batch_size, self.world_size = data.batch_size, world_size
        self.fs = open_filesystem(index.uri)[0] if filesystem is None else filesystem
        self.eos_id = token_dictionary.get("<eos>")
        self.micro_per_epoch = index.total // (data.batch_size * world_size)
        if self.micro_per_epoch == 0:
            what = "data.tokenized" if stream == TRAIN else "the validation set"
            raise ValueError(
                f"{what} has {index.total} cells, fewer than one global batch "
                f"(data.batch_size {data.batch_size} x {world_size} workers); lower "
                "data.batch_size" + ("" if stream == TRAIN else " or hold out more cells")
            )
        self.rows_per_epoch = self.micro_per_epoch * data.batch_size
        self.window_batches = data.megabatch_mult
        self.collator_kwargs = {
            "mlm_probability": data.mlm_probability,
            "max_length": max_length,
            "pad_to_multiple_of": data.pad_to_multiple_of,
        }
        self.token_dictionary = token_dictionary
        self._plan: tuple[int, np.ndarray, np.ndarray] | None = None
        self._window: tuple[tuple[int, int], Window] | None = None
        self._block: tuple[int, np.ndarray, pa.ChunkedArray] | None = None
        self.peak_rows = 0
        """Most rows held at once: the window being built, the last block read (a block
        that straddles two windows is read once) and the block being read."""
        self.blocks_read: list[int] = []
        """Blocks read so far, in order (what this rank has touched)."""

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Blocks in epoch order and where each ends in the epoch's row stream."""
        if self._plan is None or self._plan[0] != epoch:
            order = np.random.default_rng([self.seed, self.stream, epoch]).permutation(
                len(self.index)
            )
            self._plan = (epoch, order, np.cumsum(self.index.kept[order]))
        return self._plan[1], self._plan[2]

    def segments(self, epoch: int, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """``(block, first, stop)``: the kept rows ``first:stop`` of each block that make up
        rows ``lo:hi`` of this rank's range in ``epoch``, in order."""
        order, ends = self._epoch_plan(epoch)
        a, b = self.rank * self.rows_per_epoch + lo, self.rank * self.rows_per_epoch + hi
        begins = ends - self.index.kept[order]
        out = []
        for i in range(int(np.searchsorted(ends, a, side="right")), len(order)):
            if begins[i] >= b:
                break
            if ends[i] > begins[i]:
                out.append((int(order[i]), int(max(a, begins[i]) - begins[i]),
                            int(min(b, ends[i]) - begins[i])))  # fmt: skip
        return out

    def window(self, epoch: int, w: int) -> Window:
        """Window ``w`` of ``epoch`` of this rank (cached: one window at a time)."""
        if self._window is not None and self._window[0] == (epoch, w):
            return self._window[1]
        self._window = None  # let the previous window go before reading the next
        size = self.batch_size * self.window_batches
        lo, hi = w * size, min((w + 1) * size, self.rows_per_epoch)
        ids, rows = [], []
        for block, first, stop in self.segments(epoch, lo, hi):
            block_ids, column = self._read(block, len(rows))
            column = column.slice(first, stop - first).combine_chunks()
            offsets = column.offsets.to_numpy().astype(np.int64)
            tokens = column.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
            for i in range(len(column)):
                row = tokens[offsets[i] : offsets[i + 1]]
                rows.append(truncate(row, self.max_length, self.eos_id).copy())
            ids.append(block_ids[first:stop])
        assert len(rows) == hi - lo
        self.peak_rows = max(self.peak_rows, len(rows))
        window = Window(np.concatenate(ids), rows, self._arrange(epoch, w, rows))
        self._window = ((epoch, w), window)
        return window

    def _read(self, block: int, held: int) -> tuple[np.ndarray, pa.ChunkedArray]:
        if self._block is None or self._block[0] != block:
            cached = 0 if self._block is None else len(self._block[1])
            size = int(self.index.stop[block] - self.index.start[block])
            self.peak_rows = max(self.peak_rows, held + cached + size)
            self._block = (block, *self.index.read(block, self.fs))
            self.blocks_read.append(block)
        return self._block[1], self._block[2]

    def _arrange(self, epoch: int, w: int, rows: list[np.ndarray]) -> list[np.ndarray]:
        """Shuffle the window's rows, group them by length, order the micro-batches."""
        keys = [self.seed, self.stream, epoch, w]
        order = np.random.default_rng([*keys, self.rank]).permutation(len(rows))
        n_batches = len(rows) // self.batch_size
        if not self.group_by_length:
            return [
                order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(n_batches)
            ]
        lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
        order = order[np.argsort(-lengths[order], kind="stable")]  # longest first
        batches = [order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(n_batches)]
        rest = np.random.default_rng(keys).permutation(np.arange(1, n_batches))
        return [batches[i] for i in [0, *rest.tolist()]]

    def _locate(self, micro: int) -> tuple[Window, np.ndarray]:
        epoch, position = divmod(micro, self.micro_per_epoch)
        w, i = divmod(position, self.window_batches)
        window = self.window(epoch, w)
        return window, window.batches[i]

    def rows(self, micro: int) -> list[int]:
        """Artifact-wide row ids (shards in name order) of micro-batch ``micro``."""
        window, batch = self._locate(micro)
        return window.ids[batch].tolist()

    def batch(self, micro: int) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``labels``: int64 (batch_size, padded length)."""
        window, batch = self._locate(micro)
        key = derive_seed(self.seed, self.stream, self.rank, micro)
        collator = MaskingCollator.for_token_dictionary(
            self.token_dictionary, generator=torch.Generator().manual_seed(key),
            **self.collator_kwargs,
        )  # fmt: skip
        return collator([window.rows[i] for i in batch])
