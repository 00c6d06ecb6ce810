"""Cross-dataset duplicate cells: candidate keys, then exact verification on shared genes.

A cell is a duplicate of an earlier cell (catalog order, then row) when, over the genes
both datasets measure, their counts are identical on at least ``min_identity`` of the
genes either cell expresses. Candidates share a :func:`~cellfoundry.corpus.cells.top_pairs_key`
(their 16 highest (gene, count) pairs), so only cells that share a key are ever compared.
Comparing on the shared panel finds copies whose dataset was gene-filtered (e.g. a 10x
"filtered" matrix of a "raw" one); the identity threshold absorbs a few genes whose symbol
mapped to different columns in the two files. Distinct cells share nowhere near 99% of exact
counts.

Nothing here grows with the corpus in one process, the driver included:

1. Keys shared by more than one cell are counted with a Ray Data ``groupby`` (keys only).
2. A Bloom filter of those keys (at most ``filter_bytes``, built by one task from the
   counted blocks) picks the candidate cells in a map over the cells; a false positive only
   adds a cell that verifies as unique.
3. The candidates are hash-partitioned by key into partitions of about ``partition_bytes``
   (sized from the counted genes), and each partition is verified by its own task, in
   parallel (``groupby().map_groups()``).
4. The duplicates (order, duplicate_of) are sorted by order and written to Parquet; the QC
   step reads, per cells part, only the files that overlap the part's orders
   (:class:`DuplicateIndex`, :class:`AssignQCParts`).

The cells parts and the output folder may be on object storage: every read and write goes
through the pyarrow filesystem of the driver (carried by :class:`DuplicateIndex`), never
through a path that only exists on the driver.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cellfoundry import storage
from cellfoundry.corpus import qc
from cellfoundry.corpus.filemap import on_filesystem, resolve
from cellfoundry.corpus.tokenized import csr_from_lists

logger = logging.getLogger(__name__)

_HASH_KEYS = ("cellfoundry-dd-1", "cellfoundry-dd-2")  # 16 bytes each (pandas hash_array)
_BLOOM_HASHES = 3  # bit positions per key
_ROW_OVERHEAD = 64  # bytes a candidate row takes besides its gene ids and counts


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


# ------------------------------------------------------------------------ candidate filter
def _bit_positions(keys: pa.Array | pa.ChunkedArray, n_bits: int) -> np.ndarray:
    """The Bloom filter's bit positions of each key, int64 [n, _BLOOM_HASHES]."""
    from pandas.util import hash_array

    values = np.asarray(keys.to_numpy(zero_copy_only=False), dtype=object)
    h1, h2 = (hash_array(values, hash_key=k, categorize=False) for k in _HASH_KEYS)
    i = np.arange(_BLOOM_HASHES, dtype=np.uint64)
    with np.errstate(over="ignore"):  # double hashing, wrapping arithmetic
        pos = h1[:, None] + i[None, :] * (h2[:, None] | np.uint64(1))
    return (pos % np.uint64(n_bits)).astype(np.int64)


def build_filter(key_blocks: list[Any], n_bits: int) -> np.ndarray:
    """A Bloom filter (uint8 [n_bits / 8]) of the ``dedup_key`` column of ``key_blocks``
    (Arrow tables or ObjectRefs, fetched one at a time)."""
    bits = np.zeros(n_bits // 8, np.uint8)
    for block in key_blocks:
        pos = _bit_positions(resolve(block)["dedup_key"], n_bits).ravel()
        np.bitwise_or.at(bits, pos >> 3, (1 << (pos & 7)).astype(np.uint8))
    return bits


def _column_sums(blocks: list[Any], columns: list[str]) -> list[int]:
    """Sums of integer columns over blocks (ObjectRefs fetched one at a time)."""
    sums = [0] * len(columns)
    for block in blocks:
        t = resolve(block)
        sums = [s + int(pc.sum(t[c]).as_py() or 0) for s, c in zip(sums, columns, strict=True)]
    return sums


def _distinct(blocks: list[Any], column: str) -> int:
    """Distinct values of a column over blocks (ObjectRefs fetched one at a time)."""
    seen: set[Any] = set()
    for block in blocks:
        seen.update(pc.unique(resolve(block)[column]).to_pylist())
    return len(seen)


def may_contain(bits: np.ndarray, keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Bool [n]: whether each key may be in the filter (no false negatives)."""
    pos = _bit_positions(keys, bits.size * 8)
    return ((bits[pos >> 3] >> (pos & 7).astype(np.uint8)) & 1).astype(bool).all(axis=1)


def _filter_bits(n_keys: int, filter_bytes: int) -> int:
    """Filter size: ~16 bits per key (false positives ~0.3%), a power of two, at most
    ``filter_bytes`` (false positives then grow, results do not change)."""
    want = 1 << max(16, int(np.ceil(np.log2(max(n_keys, 1) * 16))))
    return int(min(want, max(8 * filter_bytes, 1 << 16)))


def _candidates(batch: pa.Table, bits: Any) -> pa.Table:
    return batch.filter(may_contain(resolve(bits), batch["dedup_key"]))


# ---------------------------------------------------------------------------- verification
def verify_group(group: pa.Table, panels: Any, min_identity: float) -> pa.Table:
    """Cells sharing a key -> (order, duplicate_of, task) of the duplicates among them: a
    cell is compared with the earlier cells of the group that are not duplicates."""
    import ray

    panel_of: dict[str, np.ndarray] = resolve(panels)
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
            panel = panel_of[datasets[i]] & panel_of[datasets[j]]
            gj, cj = genes[ptr[j] : ptr[j + 1]], counts[ptr[j] : ptr[j + 1]]
            if identity(gi, ci, gj, cj, panel) >= min_identity:
                match = j
                break
        if match < 0:
            kept.append(i)
        else:
            dup_order.append(orders[i])
            dup_of.append(orders[match])
    task = ray.get_runtime_context().get_task_id() if ray.is_initialized() else "local"
    return pa.table({
        "order": pa.array(dup_order, pa.int64()),
        "duplicate_of": pa.array(dup_of, pa.int64()),
        "task": pa.array([task] * len(dup_order), pa.string()),
    })  # fmt: skip


@dataclass
class DuplicateIndex:
    """Where the duplicates are: Parquet files of (order, duplicate_of), each sorted by order,
    with each file's order range; plus what the search did. ``files`` are paths within
    ``filesystem`` (None: local paths)."""

    files: list[str] = field(default_factory=list)
    lo: list[int] = field(default_factory=list)  # smallest order in each file
    hi: list[int] = field(default_factory=list)  # largest order in each file
    n: int = 0  # duplicate cells
    candidate_groups: int = 0  # keys shared by more than one cell
    partitions: int = 0  # verification partitions (one task each)
    verifiers: int = 0  # distinct tasks that found duplicates
    filesystem: pafs.FileSystem | None = None  # where ``files`` are (pickled with the index)

    def orders_between(self, lo: int, hi: int) -> np.ndarray:
        """Sorted int64 orders of the duplicates with lo <= order <= hi."""
        parts = [
            pq.read_table(f, columns=["order"], filters=[("order", ">=", lo), ("order", "<=", hi)],
                          filesystem=self.filesystem)
            for f, a, b in zip(self.files, self.lo, self.hi, strict=True)
            if a <= hi and b >= lo
        ]  # fmt: skip
        orders = [p["order"].to_numpy() for p in parts]
        return np.sort(np.concatenate([np.zeros(0, np.int64), *orders]))

    def read(self) -> pa.Table:
        """All duplicates (order, duplicate_of), sorted by order (small corpora, tests)."""
        tables = [
            pq.read_table(f, columns=["order", "duplicate_of"], filesystem=self.filesystem)
            for f in self.files
        ]
        schema = pa.schema([("order", pa.int64()), ("duplicate_of", pa.int64())])
        return pa.concat_tables([schema.empty_table(), *tables]).sort_by("order")


class AssignQCParts(qc.AssignQCFiles):
    """:class:`~cellfoundry.corpus.qc.AssignQCFiles` with the duplicates of each part read
    from a :class:`DuplicateIndex` (never all of them in one process)."""

    def __init__(self, thresholds: Any, duplicates: Any, filesystem: Any = None) -> None:
        super().__init__(thresholds, np.zeros(0, np.int64), filesystem)
        self.index: DuplicateIndex = resolve(duplicates)

    def process(self, item: dict[str, Any]) -> dict[str, Any]:
        orders = pq.read_table(item["src"], columns=["order"], filesystem=self.filesystem)["order"]
        if len(orders) and self.index.files:
            lo, hi = pc.min_max(orders).values()
            self.duplicate_orders = self.index.orders_between(lo.as_py(), hi.as_py())
        else:
            self.duplicate_orders = np.zeros(0, np.int64)
        return super().process(item)


def find_duplicates(
    files: list[str],
    panels: dict[str, np.ndarray],
    *,
    min_identity: float,
    num_partitions: int,
    out_dir: str | Path,
    partition_bytes: int = 64 * 2**20,
    filter_bytes: int = 32 * 2**20,
    n_cells: int | None = None,
    single_task_max_cells: int = 0,
) -> DuplicateIndex:
    """Find every duplicate cell in the cells parts ``files``; write them to ``out_dir``
    (replaced) and return their index. ``files`` and ``out_dir`` are local paths or URIs of
    one object store (read and written through the driver's filesystem).

    ``num_partitions``: of the key count; ``partition_bytes``: candidate cells (gene ids and
    counts) verified by one task; ``filter_bytes``: the most the candidate filter takes.
    ``n_cells`` (the cells in ``files``) at most ``single_task_max_cells``: the whole search
    runs in one Ray task instead (same result; a distributed ``groupby`` starts its shuffle
    machinery, tens of seconds of fixed cost that small corpora do not need).
    """
    import ray
    from ray.data.aggregate import Count, Sum

    storage.delete_prefix(out_dir)
    if not files:
        return DuplicateIndex()
    fs, paths = on_filesystem(files)
    if n_cells is not None and n_cells <= single_task_max_cells:
        task = ray.remote(num_cpus=1)(_find_in_one_task)
        out_fs, out = storage.resolve(out_dir)
        n_keys, n = ray.get(
            task.remote(paths, fs, ray.put(panels), min_identity, out, out_fs,
                        not storage.is_remote(out_dir))
        )  # fmt: skip
        index = DuplicateIndex(candidate_groups=n_keys, partitions=1, n=n, verifiers=int(n > 0))
        if n:
            _index_files(index, out_dir)
        logger.info("dedup: %d keys shared, %d duplicates, in one task", n_keys, n)
        return index
    shared = (
        ray.data.read_parquet(paths, columns=["dedup_key", "n_genes"], filesystem=fs)
        .map_batches(lambda b: b.filter(pc.greater(b["n_genes"], 0)), batch_format="pyarrow")
        .groupby("dedup_key", num_partitions=num_partitions)
        .aggregate(Count(alias_name="n"), Sum("n_genes", alias_name="genes"))
        .map_batches(lambda b: b.filter(pc.greater(b["n"], 1)), batch_format="pyarrow")
        .materialize()
    )
    n_keys = shared.count()
    if n_keys == 0:
        return DuplicateIndex()
    blocks = shared.to_arrow_refs()  # references only: the driver never holds the keys
    n_cells, n_genes = ray.get(ray.remote(_column_sums).remote(blocks, ["n", "genes"]))
    nbytes = 8 * n_genes + _ROW_OVERHEAD * n_cells
    partitions = max(1, int(np.ceil(nbytes / partition_bytes)))
    bits = ray.remote(build_filter).remote(blocks, _filter_bits(n_keys, filter_bytes))
    logger.info(
        "dedup: %d keys shared by %d cells (%.0f MB); %d verification partitions",
        n_keys, n_cells, nbytes / 2**20, partitions,
    )  # fmt: skip
    found = (
        ray.data.read_parquet(
            paths,
            columns=["dedup_key", "order", "dataset_id", "gene_ids", "counts"],
            filesystem=fs,
        )
        .map_batches(_candidates, batch_format="pyarrow", fn_kwargs={"bits": bits})
        .groupby("dedup_key", num_partitions=partitions)
        .map_groups(
            verify_group,
            batch_format="pyarrow",
            fn_kwargs={"panels": ray.put(panels), "min_identity": min_identity},
        )
        .materialize()
    )
    index = DuplicateIndex(candidate_groups=n_keys, partitions=partitions, n=found.count())
    if index.n:
        index.verifiers = ray.get(ray.remote(_distinct).remote(found.to_arrow_refs(), "task"))
        out_fs, out = storage.resolve(out_dir)
        remote = storage.is_remote(out_dir)
        # No empty "folder" object on object storage: it would outlive the prefix's files.
        found.drop_columns(["task"]).sort("order").write_parquet(
            out, filesystem=out_fs, try_create_dir=not remote
        )
        _index_files(index, out_dir)
    logger.info(
        "dedup: %d duplicates, verified by %d tasks", index.n, index.verifiers
    )  # fmt: skip
    return index


def _find_in_one_task(
    paths: list[str], fs: pafs.FileSystem, panels: Any, min_identity: float, out: str,
    out_fs: pafs.FileSystem, make_dir: bool,
) -> tuple[int, int]:  # fmt: skip
    """:func:`find_duplicates` of a small corpus in one process: the keys shared by more than
    one cell, then each group of candidates verified as ``verify_group`` does on Ray; the
    duplicates (sorted by order) written to ``out/part-0.parquet``. (keys shared, duplicates)."""
    keys = pa.concat_tables(
        pq.read_table(p, columns=["dedup_key", "n_genes"], filesystem=fs) for p in paths
    )
    keys = keys.filter(pc.greater(keys["n_genes"], 0))
    counted = keys.group_by("dedup_key").aggregate([("dedup_key", "count")])
    shared = counted.filter(pc.greater(counted["dedup_key_count"], 1))["dedup_key"]
    if len(shared) == 0:
        return 0, 0
    columns = ["dedup_key", "order", "dataset_id", "gene_ids", "counts"]
    candidates = []
    for p in paths:  # one file at a time: only the candidates are kept
        t = pq.read_table(p, columns=columns, filesystem=fs)
        candidates.append(t.filter(pc.is_in(t["dedup_key"], value_set=shared)))
    cells = pa.concat_tables(candidates).sort_by([("dedup_key", "ascending")])
    key = cells["dedup_key"].combine_chunks()
    change = pc.not_equal(key.slice(1), key.slice(0, len(key) - 1))
    bounds = np.flatnonzero(change.to_numpy(zero_copy_only=False))
    starts, stops = np.r_[0, bounds + 1], np.r_[bounds + 1, cells.num_rows]
    found = pa.concat_tables(
        verify_group(cells.slice(a, b - a), panels, min_identity)
        for a, b in zip(starts, stops, strict=True)
    ).drop_columns(["task"])
    if found.num_rows:
        if make_dir:
            out_fs.create_dir(out, recursive=True)
        pq.write_table(
            found.sort_by("order"), f"{out.rstrip('/')}/part-0.parquet", filesystem=out_fs
        )
    return len(shared), found.num_rows


def _index_files(index: DuplicateIndex, out_dir: str | Path) -> None:
    """Each written file's order range, from its Parquet statistics."""
    fs, out = storage.resolve(out_dir)
    index.filesystem = fs
    names = [n for n in storage.list_files(out_dir, recursive=False) if n.endswith(".parquet")]
    for name in names:
        f = f"{out.rstrip('/')}/{name}"
        meta = pq.ParquetFile(f, filesystem=fs).metadata
        col = meta.schema.names.index("order")
        stats = [meta.row_group(i).column(col).statistics for i in range(meta.num_row_groups)]
        stats = [s for s in stats if s is not None and s.has_min_max]
        if meta.num_rows == 0:
            continue
        if len(stats) < meta.num_row_groups:  # no statistics: read the column
            orders = pq.read_table(f, columns=["order"], filesystem=fs)["order"].to_numpy()
            lo, hi = int(orders.min()), int(orders.max())
        else:
            lo, hi = min(int(s.min) for s in stats), max(int(s.max) for s in stats)
        index.files.append(str(f))
        index.lo.append(lo)
        index.hi.append(hi)
