"""Ingest: probe each dataset, then read every file chunk in a Ray task into cell parts.

Each chunk becomes one Parquet part under ``<work>/ingest/<dataset>/<fingerprint>/``,
written atomically, with a small stats sidecar; a rerun skips parts that exist, so after
fixing one input only what is missing is redone. A dataset that fails to probe or to
read is quarantined with its error; the others go on. ``<work>`` is a local folder or an
object-store prefix; tasks write there through the driver's filesystem (see
:mod:`cellfoundry.corpus.filemap`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellfoundry import storage
from cellfoundry.corpus import sources
from cellfoundry.corpus.catalog import DatasetEntry
from cellfoundry.corpus.cells import GeneFlags, chunk_to_cells
from cellfoundry.corpus.filemap import PerItem, is_file_in, read_bytes_in, resolve, write_bytes_in
from cellfoundry.genes import GeneTable

logger = logging.getLogger(__name__)

INGEST_VERSION = 1  # bump when the part layout changes, so old parts are not reused


@dataclass
class GeneIndex:
    """The corpus gene index: genes of the gene table sorted by Ensembl ID."""

    ensembl_ids: np.ndarray  # str [n_genes], sorted
    symbols: np.ndarray
    biotypes: np.ndarray
    chromosomes: np.ndarray
    flags: GeneFlags
    position: dict[str, int] = field(repr=False, default_factory=dict)

    @classmethod
    def from_table(cls, table: GeneTable) -> GeneIndex:
        frame = table.frame.sort("ensembl_id")
        ids = frame["ensembl_id"].to_numpy().astype(str)
        return cls(
            ensembl_ids=ids,
            symbols=frame["symbol"].fill_null("").to_numpy().astype(str),
            biotypes=frame["biotype"].fill_null("").to_numpy().astype(str),
            chromosomes=frame["chromosome"].fill_null("").to_numpy().astype(str),
            flags=GeneFlags(
                protein_coding=np.asarray(table.is_protein_coding(list(ids)), dtype=bool),
                mitochondrial=np.asarray(table.is_mitochondrial(list(ids)), dtype=bool),
            ),
            position={g: i for i, g in enumerate(ids)},
        )

    def __len__(self) -> int:
        return len(self.ensembl_ids)

    def lookup(self, ensembl_ids: list[str | None]) -> np.ndarray:
        """int32 corpus ids (-1 where None or not in the index)."""
        return np.array(
            [self.position.get(g, -1) if g else -1 for g in ensembl_ids], dtype=np.int32
        )


@dataclass
class ProbedDataset:
    """What the driver needs to read a dataset: its chunks and gene column map."""

    entry: DatasetEntry
    index: int
    n_cells: int
    col_map: np.ndarray  # int32 [n_file_genes] -> corpus gene id or -1
    gene_report: dict[str, Any]
    fingerprint: str
    chunks: list[tuple[int, int]]


def file_signature(uri: str) -> str:
    """Size and modification time, so an edited input file invalidates its parts."""
    try:
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(uri if "://" in uri else Path(uri).resolve().as_uri())
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            return ";".join(
                f"{i.path}:{i.size}:{i.mtime_ns}" for i in sorted(infos, key=lambda i: i.path)
            )
        return f"{info.size}:{info.mtime_ns}"
    except (OSError, ValueError):
        return "unreadable"


def probe_dataset(
    entry: DatasetEntry,
    index: int,
    genes: GeneIndex,
    table: GeneTable,
    rows_per_chunk: int,
    salt: str,
) -> ProbedDataset:
    """Open a dataset's header, map its genes, plan its chunks (raises SourceError)."""
    info = sources.probe(
        entry.uri, entry.format, gene_id_column=entry.gene_id_column, matrix=entry.matrix
    )
    missing = [src for src in entry.metadata.values() if src not in info.obs_columns]
    if missing:
        raise sources.SourceError(
            entry.uri,
            "obs",
            f"column(s) {missing} named in the catalog's metadata for dataset {entry.id!r} do not "
            f"exist (available: {sorted(info.obs_columns)[:40]})",
            "correct the dataset's metadata mapping in the catalog",
        )
    mapping = table.map_genes(info.gene_names, kind=info.gene_id_kind)
    col_map = genes.lookup(mapping.ensembl_ids)
    if not (col_map >= 0).any():
        raise sources.SourceError(
            entry.uri,
            "var",
            f"none of the {info.n_genes} gene identifiers (e.g. {info.gene_names[:3]}) maps to an "
            "Ensembl ID of the gene table",
            "set gene_id_column in the catalog to the var column holding Ensembl IDs or symbols",
        )
    signature = json.dumps(
        [
            entry.to_row(),
            info.format,
            file_signature(entry.uri),
            rows_per_chunk,
            salt,
            INGEST_VERSION,
        ],
        sort_keys=True,
    )
    return ProbedDataset(
        entry=entry,
        index=index,
        n_cells=info.n_cells,
        col_map=col_map,
        gene_report={"format": info.format, "gene_id_kind": info.gene_id_kind, **mapping.summary()},
        fingerprint=hashlib.sha256(signature.encode()).hexdigest()[:16],
        # A whole-file format (mtx) is parsed whole by any task: one chunk, not many.
        chunks=sources.chunk_ranges(
            info.n_cells,
            info.n_cells if info.format in sources.WHOLE_FILE_FORMATS else rows_per_chunk,
        ),
    )


def part_dir(work_dir: str | Path, probed: ProbedDataset) -> str:
    """Where a dataset's parts go: a local path or an object-store URI, as ``work_dir``."""
    return storage.join(work_dir, "ingest", probed.entry.id, probed.fingerprint)


def _moments(x: np.ndarray) -> list[float]:
    """[n, mean, M2] of x, mergeable with Chan et al.'s formula."""
    if len(x) == 0:
        return [0.0, 0.0, 0.0]
    mean = float(np.mean(x))
    return [float(len(x)), mean, float(np.sum((x - mean) ** 2))]


class IngestChunks(PerItem):
    """Ray Data UDF: one chunk in, one cell part and a stats row out.

    ``item["part_dir"]`` is a path within ``filesystem`` (the driver's pyarrow filesystem,
    None: local), so the part lands on the output's storage whichever node runs the task.
    """

    def __init__(self, plan: Any, filesystem: Any = None) -> None:
        self.plan: dict[str, Any] = resolve(plan)
        self.filesystem = resolve(filesystem)

    def process(self, item: dict[str, Any]) -> dict[str, Any]:
        ds_id, start, stop = str(item["dataset_id"]), int(item["start"]), int(item["stop"])
        out = f"{str(item['part_dir']).rstrip('/')}/part-{start:012d}.parquet"
        stats_file = out.removesuffix(".parquet") + ".json"
        # The sidecar is written after the part, so it marks a part an earlier run finished.
        if is_file_in(self.filesystem, stats_file) and is_file_in(self.filesystem, out):
            return json.loads(read_bytes_in(self.filesystem, stats_file))
        p = self.plan[ds_id]
        entry: DatasetEntry = p["entry"]
        try:
            chunk = sources.read_chunk(
                entry.uri, p["format"], start, stop,
                obs_columns=list(entry.metadata.values()), matrix=entry.matrix,
            )  # fmt: skip
            given = {out_name: chunk.obs[src] for out_name, src in entry.metadata.items()}
            blank = np.full(stop - start, "", dtype=object)
            metadata = {name: given.get(name, blank) for name in p["metadata_columns"]}
            metadata["organ_major"] = np.full(stop - start, entry.organ, dtype=object)
            table = chunk_to_cells(
                dataset_id=ds_id, dataset_index=p["index"], start=start, barcodes=chunk.barcodes,
                indptr=chunk.indptr, indices=chunk.indices, data=chunk.data, col_map=p["col_map"],
                n_corpus_genes=p["n_genes"], flags=p["flags"], metadata=metadata,
            )  # fmt: skip
        except (sources.SourceError, ValueError, OSError) as exc:
            logger.error("dataset %s, cells %d-%d: %s", ds_id, start, stop, exc)
            return {"dataset_id": ds_id, "start": start, "n_cells": 0, "error": str(exc)}
        storage.write_parquet(table, out, self.filesystem)
        stats = {
            "dataset_id": ds_id,
            "start": start,
            "n_cells": table.num_rows,
            "error": "",
            "n_counts_moments": _moments(table["n_counts"].to_numpy().astype(np.float64)),
            "pct_mito_moments": _moments(table["pct_mito"].to_numpy()),
        }
        write_bytes_in(self.filesystem, stats_file, json.dumps(stats).encode())
        return stats


def merge_moments(parts: list[list[float]]) -> tuple[int, float, float]:
    """Merge [n, mean, M2] triples; returns (n, mean, sample standard deviation)."""
    n, mean, m2 = 0.0, 0.0, 0.0
    for nb, mb, m2b in parts:
        if nb == 0:
            continue
        delta = mb - mean
        total = n + nb
        mean += delta * nb / total
        m2 += m2b + delta * delta * n * nb / total
        n = total
    sd = float(np.sqrt(m2 / (n - 1))) if n > 1 else 0.0
    return int(n), mean, sd


def remove_parts(work_dir: str | Path, dataset_id: str) -> None:
    """Drop a quarantined dataset's partial parts so a rerun reads it afresh."""
    storage.delete_prefix(storage.join(work_dir, "ingest", dataset_id))
