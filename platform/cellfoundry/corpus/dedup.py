"""Cross-dataset duplicate cells: candidate keys, then exact verification on shared genes.

A cell is a duplicate of an earlier cell (catalog order, then row) when, over the genes
both datasets measure, their counts are identical on at least ``min_identity`` of the
genes either cell expresses. Candidates share a :func:`~cellfoundry.corpus.cells.top_pairs_key`
(their 16 highest (gene, count) pairs); verification runs per candidate group on Ray Data
(``groupby().map_groups()``), so only cells that share a key are ever compared. Comparing
on the shared panel finds copies whose dataset was gene-filtered (e.g. a 10x "filtered"
matrix of a "raw" one); the identity threshold absorbs a few genes whose symbol mapped
to different columns in the two files. Distinct cells share nowhere near 99% of exact counts.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cellfoundry.corpus.filemap import resolve
from cellfoundry.corpus.tokenized import csr_from_lists

logger = logging.getLogger(__name__)


def identity(
    genes_a: np.ndarray,
    counts_a: np.ndarray,
    genes_b: np.ndarray,
    counts_b: np.ndarray,
    panel: np.ndarray,
) -> float:
    """Share of genes expressed by either cell (within ``panel``, bool over gene ids) with equal counts."""
    ka, kb = panel[genes_a], panel[genes_b]
    ga, ca, gb, cb = genes_a[ka], counts_a[ka], genes_b[kb], counts_b[kb]
    union = np.union1d(ga, gb)
    if len(union) == 0:
        return 0.0
    _, ia, ib = np.intersect1d(ga, gb, assume_unique=True, return_indices=True)
    return float(np.sum(ca[ia] == cb[ib])) / len(union)


class VerifyGroup:
    """Ray Data ``map_groups`` UDF: cells sharing a key -> (order, duplicate_of) rows."""

    def __init__(self, panels: Any, min_identity: float) -> None:
        self.panels: dict[str, np.ndarray] = resolve(panels)
        self.min_identity = min_identity

    def __call__(self, group: pa.Table) -> pa.Table:
        group = group.sort_by("order")
        ptr, genes = csr_from_lists(group["gene_ids"])
        _, counts = csr_from_lists(group["counts"])
        orders = group["order"].to_numpy()
        datasets = group["dataset_id"].to_pylist()
        kept: list[int] = []
        dup_order, dup_of = [], []
        for i in range(group.num_rows):
            gi, ci = genes[ptr[i] : ptr[i + 1]], counts[ptr[i] : ptr[i + 1]]
            match = -1
            for j in kept:
                panel = self.panels[datasets[i]] & self.panels[datasets[j]]
                gj, cj = genes[ptr[j] : ptr[j + 1]], counts[ptr[j] : ptr[j + 1]]
                if identity(gi, ci, gj, cj, panel) >= self.min_identity:
                    match = j
                    break
            if match < 0:
                kept.append(i)
            else:
                dup_order.append(orders[i])
                dup_of.append(orders[match])
        return pa.table({
            "order": pa.array(dup_order, pa.int64()),
            "duplicate_of": pa.array(dup_of, pa.int64()),
        })  # fmt: skip


def find_duplicates(
    files: list[str], panels: dict[str, np.ndarray], *, min_identity: float, num_partitions: int
) -> tuple[np.ndarray, np.ndarray]:
    """(order, duplicate_of) int64 arrays, sorted by order, of every duplicate cell in ``files``."""
    import ray
    from ray.data.aggregate import Count

    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if not files:
        return empty
    keys = (
        ray.data.read_parquet(files, columns=["dedup_key", "n_genes"])
        .map_batches(lambda b: b.filter(pc.greater(b["n_genes"], 0)), batch_format="pyarrow")
        .groupby("dedup_key", num_partitions=num_partitions)
        .aggregate(Count(alias_name="n"))
        .map_batches(
            lambda b: b.filter(pc.greater(b["n"], 1)).select(["dedup_key"]), batch_format="pyarrow"
        )
        .take_all()
    )
    if not keys:
        return empty
    candidates = pa.array([r["dedup_key"] for r in keys], pa.string())
    logger.info("dedup: %d candidate groups of cells sharing a key", len(candidates))
    found = (
        ray.data.read_parquet(
            files, columns=["dedup_key", "order", "dataset_id", "gene_ids", "counts"]
        )
        .map_batches(
            lambda b: b.filter(pc.is_in(b["dedup_key"], value_set=candidates)),
            batch_format="pyarrow",
        )
        .groupby("dedup_key", num_partitions=num_partitions)
        .map_groups(
            VerifyGroup,
            batch_format="pyarrow",
            fn_constructor_kwargs={"panels": ray.put(panels), "min_identity": min_identity},
            compute=ray.data.ActorPoolStrategy(size=1),
        )
        .take_all()
    )
    if not found:
        return empty
    order = np.array([r["order"] for r in found], np.int64)
    dup_of = np.array([r["duplicate_of"] for r in found], np.int64)
    idx = np.argsort(order)
    return order[idx], dup_of[idx]
