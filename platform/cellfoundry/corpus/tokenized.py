"""Tokenized shards: the Ray Data encode step, and the Hugging Face ``datasets`` layout.

The artifact holds Parquet shards (``*.parquet``: ``input_ids``, ``length``, metadata) and
the same rows under ``hf/`` in the layout ``datasets.save_to_disk`` writes (Arrow stream
files + ``state.json`` + ``dataset_info.json``), so ``datasets.load_from_disk(DIR/hf)``
loads it like Genecorpus. Each shard is converted by its own task: nothing holds the corpus.
Shards and the ``hf/`` copy may be on object storage: tasks read and write them through
the driver's pyarrow filesystem (on S3 the ``hf/`` folder then needs
``datasets.load_from_disk("s3://...", storage_options=...)``, with ``s3fs``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cellfoundry import artifacts, storage
from cellfoundry.corpus.cells import list_array, remap_csr
from cellfoundry.corpus.encode import RankEncoder
from cellfoundry.corpus.filemap import PerItem, on_filesystem, resolve

logger = logging.getLogger(__name__)


def csr_from_lists(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(int64 offsets, flat values) of a list column, respecting slices."""
    lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    return offsets, values


class EncodeCells:
    """Cell rows (corpus gene ids) -> token rows.

    ``gene_map`` maps each corpus gene id to a position of the encoder's gene space (-1:
    not tokenised); genes colliding on one position are summed before ranking.
    """

    def __init__(
        self, encoder: RankEncoder, gene_map: np.ndarray, keep_columns: Sequence[str]
    ) -> None:
        self.encoder, self.gene_map, self.keep_columns = encoder, gene_map, list(keep_columns)

    def __call__(self, batch: pa.Table) -> pa.Table:
        indptr, gene_ids = csr_from_lists(batch["gene_ids"])
        _, counts = csr_from_lists(batch["counts"])
        ptr, idx, cnt = remap_csr(
            indptr, gene_ids, counts, self.gene_map, len(self.encoder.token_ids)
        )
        offsets, tokens = self.encoder.encode(ptr, idx, cnt, batch["n_counts"].to_numpy())
        columns: dict[str, pa.Array] = {
            name: batch[name] for name in self.keep_columns if name in batch.column_names
        }
        columns["input_ids"] = list_array(offsets, tokens, pa.int32())
        columns["length"] = pa.array(np.diff(offsets), type=pa.int64())
        return pa.table(columns)


class EncodeFiles(PerItem):
    """Ray Data UDF: a cells file in, a token shard of its passed cells out (same name).

    ``item["src"]`` and ``item["dst"]`` are paths within ``filesystem`` (the driver's
    pyarrow filesystem; None: local)."""

    def __init__(
        self, encoder: Any, gene_map: Any, keep_columns: Any, max_length: Any,
        filesystem: Any = None,
    ) -> None:  # fmt: skip
        self.encode = EncodeCells(resolve(encoder), resolve(gene_map), resolve(keep_columns))
        self.max_length: int = resolve(max_length)
        self.filesystem = resolve(filesystem)

    def process(self, item: dict[str, Any]) -> dict[str, Any]:
        cells = pq.read_table(item["src"], filesystem=self.filesystem)
        passed = cells.filter(pc.equal(cells["qc"], "passed"))
        if passed.num_rows == 0:
            return {"rows": 0, "lengths": length_histogram(np.zeros(0, np.int64), self.max_length)}
        table = self.encode(passed)
        storage.write_parquet(table, str(item["dst"]), self.filesystem)
        return {
            "rows": table.num_rows,
            "lengths": length_histogram(table["length"].to_numpy(), self.max_length),
        }


def shard_files(path: str | Path) -> tuple[pafs.FileSystem, list[str]]:
    """``(filesystem, paths)`` of a tokenized artifact's ``part-*.parquet`` shards in name
    order, local or on object storage (only the shards its manifest lists), ready for
    ``pq.read_table(paths, filesystem=fs)`` or ``ray.data.read_parquet(paths, filesystem=fs)``."""
    artifacts.read_manifest(path, "tokenized")
    files = artifacts.data_files(path, "part-*.parquet")
    fs = storage.filesystem(path)
    return fs, [storage.resolve(f)[1] for f in files]


def length_histogram(lengths: np.ndarray, max_length: int, n_bins: int = 16) -> dict[str, Any]:
    """Counts of cell lengths in equal-width bins up to ``max_length`` (mergeable)."""
    edges = np.linspace(0, max_length, n_bins + 1).round().astype(int)
    counts, _ = np.histogram(lengths, bins=edges)
    return {
        "edges": edges.tolist(),
        "counts": counts.tolist(),
        "cells": len(lengths),
        "tokens": int(np.sum(lengths)),
        "at_max": int(np.sum(lengths >= max_length)),
    }


def merge_histograms(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Sum :func:`length_histogram` results of the same edges; adds the mean length."""
    total = {
        "edges": parts[0]["edges"],
        "counts": np.zeros(len(parts[0]["counts"]), np.int64),
        "cells": 0,
        "tokens": 0,
        "at_max": 0,
    }
    for h in parts:
        total["counts"] += np.asarray(h["counts"], np.int64)
        for key in ("cells", "tokens", "at_max"):
            total[key] += h[key]
    total["counts"] = total["counts"].tolist()
    total["mean"] = total["tokens"] / total["cells"] if total["cells"] else 0.0
    return total


def _to_arrow_stream(
    parquet_file: str, source: pafs.FileSystem, arrow_file: str, dest: pafs.FileSystem
) -> int:
    """One Parquet shard (within ``source``) -> one Arrow stream file (within ``dest``)."""
    table = pq.read_table(parquet_file, filesystem=source)
    with (
        dest.open_output_stream(arrow_file) as sink,
        pa.ipc.new_stream(sink, table.schema) as writer,
    ):
        for batch in table.to_batches(max_chunksize=1000):
            writer.write_batch(batch)
    return table.num_rows


def write_hf_layout(parquet_files: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Write ``out_dir`` in ``datasets.save_to_disk`` layout from Parquet shards (one Ray task
    each). Shards and ``out_dir`` are local paths or URIs of one object store; tasks use the
    driver's filesystem."""
    import ray
    from datasets import Features

    if not storage.is_remote(out_dir):  # an object store has no folders to make
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    fs, files = on_filesystem([str(f) for f in parquet_files])
    out_fs, out = storage.resolve(out_dir)
    n = len(files)
    names = [f"data-{i:05d}-of-{n:05d}.arrow" for i in range(n)]
    convert = ray.remote(num_cpus=1)(_to_arrow_stream)
    rows = ray.get([
        convert.remote(f, fs, f"{out.rstrip('/')}/{name}", out_fs)
        for f, name in zip(files, names, strict=True)
    ])  # fmt: skip
    schema = pq.read_schema(files[0], filesystem=fs) if files else pa.schema([])
    features = Features.from_arrow_schema(schema).to_dict() if files else {}
    storage.write_text(
        storage.join(out_dir, "dataset_info.json"),
        json.dumps(
            {
                "citation": "",
                "description": "",
                "features": features,
                "homepage": "",
                "license": "",
            },
            indent=2,
        ),
    )
    state = {
        "_data_files": [{"filename": name} for name in names],
        "_fingerprint": f"cellfoundry-{sum(rows)}-{n}",
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    storage.write_text(storage.join(out_dir, "state.json"), json.dumps(state, indent=2))
    return {"shards": n, "rows": int(sum(rows))}
