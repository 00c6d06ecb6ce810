"""Cell rows, hashes, duplicate identity and QC outcomes on small hand-made cases."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from cellfoundry.corpus.cells import (
    GeneFlags,
    chunk_to_cells,
    content_hash,
    remap_csr,
    top_pairs_key,
)
from cellfoundry.corpus.dedup import identity
from cellfoundry.corpus.qc import Thresholds, assign_outcomes


def test_remap_sums_collisions_and_drops_unmapped() -> None:
    # Two file genes (0, 1) map to corpus gene 3; file gene 2 is unmapped.
    ptr, idx, data = remap_csr(
        np.array([0, 3, 4]), np.array([0, 1, 2, 2]), np.array([2, 5, 7, 1]), np.array([3, 3, -1]), 4
    )
    assert ptr.tolist() == [0, 1, 1] and idx.tolist() == [3] and data.tolist() == [7]


def test_hashes_identify_pair_sets() -> None:
    ptr = np.array([0, 3, 6, 9])
    genes = np.array([1, 2, 3, 3, 1, 2, 1, 2, 3])
    counts = np.array([5, 6, 7, 7, 5, 6, 5, 6, 8])
    h = content_hash(ptr, genes, counts)
    assert h[0] == h[1] != h[2]  # the same pairs in another order hash equal
    k = top_pairs_key(ptr, genes, counts, k=2)
    assert k[0] == k[1] != k[2]  # cell 2 has (3, 8) among its top pairs
    k1 = top_pairs_key(
        np.array([0, 3, 6]), np.array([1, 2, 3, 1, 2, 3]), np.array([9, 8, 1, 9, 8, 2]), k=2
    )
    assert k1[0] == k1[1]  # cells differing only below their top 2 share the key


def test_identity_on_shared_panel() -> None:
    panel = np.array([True, True, True, False])
    a_genes, a_counts = np.array([0, 1, 3]), np.array([4, 5, 9])
    b_genes, b_counts = np.array([0, 1, 2]), np.array([4, 5, 1])
    # Gene 3 is outside the shared panel; gene 2 differs (0 vs 1): 2 of 3 agree.
    assert identity(a_genes, a_counts, b_genes, b_counts, panel) == 2 / 3
    assert identity(a_genes, a_counts, a_genes, a_counts, panel) == 1.0


def test_chunk_to_cells_fields() -> None:
    flags = GeneFlags(
        protein_coding=np.array([True, True, False]), mitochondrial=np.array([False, False, True])
    )
    t = chunk_to_cells(
        dataset_id="d", dataset_index=2, start=10, barcodes=np.array(["x", "y"]),
        indptr=np.array([0, 3, 4]), indices=np.array([0, 1, 2, 3]), data=np.array([1, 2, 3, 4]),
        col_map=np.array([0, 1, 2, -1]), n_corpus_genes=3, flags=flags, metadata={"cell_type": np.array(["T", "B"])},
    )  # fmt: skip
    assert t["cell_id"].to_pylist() == ["d:x", "d:y"]
    assert t["order"].to_pylist() == [2 * 2**40 + 10, 2 * 2**40 + 11]
    assert t["n_counts"].to_pylist() == [6, 4]  # unmapped genes still count
    assert t["n_genes"].to_pylist() == [3, 0]
    assert t["n_pc_genes"].to_pylist() == [2, 0]
    assert t["pct_mito"].to_pylist() == [50.0, 0.0]
    assert t["cell_type"].to_pylist() == ["T", "B"]


def test_outcomes_precedence() -> None:
    batch = pa.table({
        "dataset_id": ["d"] * 5, "order": [0, 1, 2, 3, 4],
        "n_counts": [100, 1000, 100, 100, 100], "pct_mito": [1.0, 1.0, 50.0, 1.0, 1.0],
        "n_pc_genes": [10, 10, 10, 3, 10],
    })  # fmt: skip
    t = {"d": Thresholds(50, 500, 0, 10, 7)}
    out = assign_outcomes(batch, t, np.array([4], np.int64))["qc"].to_pylist()
    assert out == [
        "passed",
        "total_counts_outlier",
        "mito_outlier",
        "low_protein_coding_genes",
        "duplicate",
    ]
