"""Turn a chunk of a source file into cell rows (Arrow), vectorised over the chunk.

Gene columns of the file are remapped to corpus gene ids (source genes that map to the
same Ensembl ID are summed); per-cell QC fields and a content hash are computed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

_HEX = np.array([f"{i:02x}" for i in range(256)], dtype="<U2")


def remap_csr(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, mapping: np.ndarray, n_out: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Remap CSR column ids through ``mapping`` (-1 drops), summing entries that collide.

    Returns ``(indptr int64, indices int32 ascending per row, data)``; explicit zeros dropped.
    Input columns must be ascending within each row (as readers and artifacts provide).
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    mapping = np.asarray(mapping)
    new = mapping[indices]
    keep = (new >= 0) & (np.asarray(data) != 0)
    if _order_preserving(mapping):
        # No two columns share a target and order is kept: filtering is all there is to do.
        kept_before = np.zeros(len(keep) + 1, dtype=np.int64)
        np.cumsum(keep, out=kept_before[1:])
        return kept_before[indptr], new[keep].astype(np.int32), np.asarray(data)[keep]
    n_rows = len(indptr) - 1
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(indptr))[keep]
    m = sp.coo_matrix((np.asarray(data)[keep], (rows, new[keep])), shape=(n_rows, n_out)).tocsr()
    m.sum_duplicates()  # also sorts the column ids of each row
    m.eliminate_zeros()
    return m.indptr.astype(np.int64), m.indices.astype(np.int32), m.data


def _order_preserving(mapping: np.ndarray) -> bool:
    """True when the mapped columns' targets strictly increase (no collisions, same order)."""
    targets = mapping[mapping >= 0]
    return bool(np.all(targets[1:] > targets[:-1]))


def row_sums(indptr: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per-row sums of a CSR ``values`` array (0 for empty rows), in ``values``' dtype."""
    out = np.zeros(len(indptr) - 1, dtype=values.dtype)
    nz = np.diff(indptr) > 0
    if values.size:
        out[nz] = np.add.reduceat(values, np.asarray(indptr[:-1])[nz])
    return out


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A strong 64-bit mixer (splitmix64 finaliser), vectorised, wrapping arithmetic."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def content_hash(indptr: np.ndarray, gene_ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """128-bit hash per cell of its set of (gene id, count) pairs, as 32-char hex strings.

    Each pair is mixed to two independent 64-bit values and summed per cell (an
    order-independent set hash); the number of pairs is mixed in last. Two cells hash
    equal iff (up to ~2^-128 chance) they hold the same pairs.
    """
    n = len(indptr) - 1
    with np.errstate(over="ignore"):
        key = (gene_ids.astype(np.uint64) << np.uint64(32)) ^ counts.astype(np.uint64)
        h1, h2 = _splitmix64(key), _splitmix64(key ^ np.uint64(0x5851F42D4C957F2D))
        s1, s2 = row_sums(indptr, h1), row_sums(indptr, h2)
        length = np.diff(indptr).astype(np.uint64)
        s1 = _splitmix64(s1 ^ length)
        s2 = _splitmix64(s2 ^ (length * np.uint64(0x9E3779B97F4A7C15)))
    both = np.stack([s1.astype(">u8"), s2.astype(">u8")], axis=1).view(np.uint8).reshape(n, 16)
    # Hex without a Python loop per cell: 16 two-char pieces per row, viewed as one string.
    return np.ascontiguousarray(_HEX[both]).view("<U32").ravel()


def top_pairs_key(
    indptr: np.ndarray, gene_ids: np.ndarray, counts: np.ndarray, k: int = 16
) -> np.ndarray:
    """Duplicate-candidate key per cell: :func:`content_hash` of its k highest (gene, count) pairs.

    Highly expressed genes survive any gene filtering of a dataset, so a copy of a cell in
    a dataset with a smaller gene panel keeps the key (counts desc, gene id asc on ties).
    """
    n = len(indptr) - 1
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    order = np.lexsort((gene_ids, -counts.astype(np.int64), rows))
    starts = np.asarray(indptr[:-1], dtype=np.int64)
    rank = np.arange(len(order), dtype=np.int64) - starts[rows]  # rows are sorted already
    top = order[rank < k]
    sel_rows = rows[top]
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(sel_rows, minlength=n), out=ptr[1:])
    return content_hash(ptr, gene_ids[top], counts[top])


@dataclass(frozen=True)
class GeneFlags:
    """Per corpus gene id: protein-coding and mitochondrial flags."""

    protein_coding: np.ndarray  # bool [n_genes]
    mitochondrial: np.ndarray  # bool [n_genes]


def list_array(offsets: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """An Arrow list array from int64 offsets and flat values."""
    return pa.LargeListArray.from_arrays(
        pa.array(offsets, type=pa.int64()), pa.array(values, type=value_type)
    ).cast(pa.list_(value_type))


def chunk_to_cells(
    *,
    dataset_id: str,
    dataset_index: int,
    start: int,
    barcodes: np.ndarray,
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    col_map: np.ndarray,
    n_corpus_genes: int,
    flags: GeneFlags,
    metadata: dict[str, np.ndarray],
) -> pa.Table:
    """Cell rows of one chunk (schema in docs/CONTRACTS.md).

    ``n_counts`` is the cell's total raw count over all genes of its file, including genes
    that did not map (DESIGN.md); ``pct_mito`` is mitochondrial counts / n_counts * 100.
    """
    n = len(indptr) - 1
    indptr = np.asarray(indptr, dtype=np.int64)
    data = np.asarray(data, dtype=np.int64)
    n_counts = row_sums(indptr, data)
    g_ptr, g_ids, g_counts = remap_csr(indptr, indices, data, col_map, n_corpus_genes)
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(g_ptr))
    n_pc = np.bincount(rows[flags.protein_coding[g_ids]], minlength=n).astype(np.int32)
    mito = np.bincount(rows, weights=g_counts * flags.mitochondrial[g_ids], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        pct_mito = np.where(n_counts > 0, mito / n_counts * 100.0, 0.0)
    order = np.int64(dataset_index) * np.int64(2**40) + start + np.arange(n, dtype=np.int64)
    columns = {
        "cell_id": pa.array([f"{dataset_id}:{b}" for b in barcodes], type=pa.string()),
        "dataset_id": pa.array(np.full(n, dataset_id, dtype=object), type=pa.string()),
        "order": pa.array(order, type=pa.int64()),
        "gene_ids": list_array(g_ptr, g_ids, pa.int32()),
        "counts": list_array(g_ptr, g_counts.astype(np.int32), pa.int32()),
        "n_counts": pa.array(n_counts, type=pa.int64()),
        "n_genes": pa.array(np.diff(g_ptr).astype(np.int32), type=pa.int32()),
        "n_pc_genes": pa.array(n_pc, type=pa.int32()),
        "pct_mito": pa.array(pct_mito, type=pa.float64()),
        "content_hash": pa.array(content_hash(g_ptr, g_ids, g_counts), type=pa.string()),
        "dedup_key": pa.array(top_pairs_key(g_ptr, g_ids, g_counts), type=pa.string()),
    }
    for name, values in metadata.items():
        columns[name] = pa.array(np.asarray(values, dtype=object).astype(str), type=pa.string())
    return pa.table(columns)
