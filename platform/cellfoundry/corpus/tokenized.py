"""Tokenized shards: the Ray Data encode step, and the Hugging Face ``datasets`` layout.

The artifact holds Parquet shards (``*.parquet``: ``input_ids``, ``length``, metadata) and
the same rows under ``hf/`` in the layout ``datasets.save_to_disk`` writes (Arrow stream
files + ``state.json`` + ``dataset_info.json``), so ``datasets.load_from_disk(DIR/hf)``
loads it like Genecorpus. Each shard is converted by its own task: nothing holds the corpus.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cellfoundry.corpus.cells import list_array, remap_csr
from cellfoundry.corpus.encode import RankEncoder

logger = logging.getLogger(__name__)


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def finalize_shards(directory: Path, prefix: str = "part") -> list[Path]:
    """Rename the Parquet files Ray Data wrote to ``<prefix>-00000.parquet``... in write order.

    Ray names files ``<uuid>_<task>-<block>.parquet``; a numeric sort of those restores the
    (order-preserving) write order, and stable names make runs comparable.
    """
    files = sorted(directory.glob("*.parquet"), key=lambda p: _natural_key(p.name))
    staged = []
    for i, f in enumerate(files):
        tmp = f.with_name(f".{prefix}-{i:05d}.parquet.tmp")
        f.rename(tmp)
        staged.append(tmp)
    out = []
    for i, tmp in enumerate(staged):
        final = tmp.with_name(f"{prefix}-{i:05d}.parquet")
        tmp.rename(final)
        out.append(final)
    return out


def csr_from_lists(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(int64 offsets, flat values) of a list column, respecting slices."""
    lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    return offsets, values


class EncodeCells:
    """Ray Data UDF: cell rows (corpus gene ids) -> token rows.

    ``gene_map`` maps each corpus gene id to a position of the encoder's gene space (-1:
    not tokenised); genes colliding on one position are summed before ranking.
    """

    def __init__(self, encoder: Any, gene_map: Any, keep_columns: Sequence[str]) -> None:
        import ray

        def resolve(x: Any) -> Any:
            return ray.get(x) if isinstance(x, ray.ObjectRef) else x

        self.encoder: RankEncoder = resolve(encoder)
        self.gene_map: np.ndarray = resolve(gene_map)
        self.keep_columns = list(keep_columns)

    def __call__(self, batch: pa.Table) -> pa.Table:
        indptr, gene_ids = csr_from_lists(batch["gene_ids"])
        _, counts = csr_from_lists(batch["counts"])
        ptr, idx, cnt = remap_csr(indptr, gene_ids, counts, self.gene_map, len(self.encoder.token_ids))
        offsets, tokens = self.encoder.encode(ptr, idx, cnt, batch["n_counts"].to_numpy())
        columns: dict[str, pa.Array] = {
            name: batch[name] for name in self.keep_columns if name in batch.column_names
        }
        columns["input_ids"] = list_array(offsets, tokens, pa.int32())
        columns["length"] = pa.array(np.diff(offsets), type=pa.int64())
        return pa.table(columns)


def length_histogram(lengths: np.ndarray, max_length: int, n_bins: int = 16) -> dict[str, Any]:
    """Counts of cell lengths in equal-width bins up to ``max_length`` (for the manifest)."""
    edges = np.linspace(0, max_length, n_bins + 1).round().astype(int)
    counts, _ = np.histogram(lengths, bins=edges)
    return {
        "edges": edges.tolist(),
        "counts": counts.tolist(),
        "mean": float(np.mean(lengths)) if len(lengths) else 0.0,
        "at_max": int(np.sum(lengths >= max_length)),
    }


def _to_arrow_stream(parquet_file: str, arrow_file: str) -> int:
    table = pq.read_table(parquet_file)
    with pa.OSFile(arrow_file, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=1000):
            writer.write_batch(batch)
    return table.num_rows


def write_hf_layout(parquet_files: Sequence[str | Path], out_dir: Path) -> dict[str, Any]:
    """Write ``out_dir`` in ``datasets.save_to_disk`` layout from Parquet shards (one Ray task each)."""
    import ray
    from datasets import Features

    out_dir.mkdir(parents=True, exist_ok=True)
    files = [str(f) for f in parquet_files]
    n = len(files)
    names = [f"data-{i:05d}-of-{n:05d}.arrow" for i in range(n)]
    convert = ray.remote(num_cpus=1)(_to_arrow_stream)
    rows = ray.get([convert.remote(f, str(out_dir / name)) for f, name in zip(files, names, strict=True)])
    schema = pq.read_schema(files[0]) if files else pa.schema([])
    features = Features.from_arrow_schema(schema).to_dict() if files else {}
    (out_dir / "dataset_info.json").write_text(
        json.dumps({"citation": "", "description": "", "features": features, "homepage": "", "license": ""}, indent=2)
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
    (out_dir / "state.json").write_text(json.dumps(state, indent=2))
    return {"shards": n, "rows": int(sum(rows))}
