"""The vectorised rank value encoder against a plain per-cell implementation."""

from __future__ import annotations

import numpy as np
import pytest

from cellfoundry.corpus.encode import RankEncoder


def plain_encode(cells, n_counts, token_ids, medians, max_genes, cls_id=None, eos_id=None):
    """Obviously correct: per cell, score each vocabulary gene, sort by (-score, token)."""
    out = []
    for genes, n in zip(cells, n_counts, strict=True):
        scored = [
            (-(c / n * 10000.0 / medians[g]), int(token_ids[g]))
            for g, c in genes.items()
            if token_ids[g] >= 0 and c > 0
        ]
        tokens = [t for _, t in sorted(scored)][:max_genes]
        out.append(
            ([cls_id] if cls_id is not None else [])
            + tokens
            + ([eos_id] if eos_id is not None else [])
        )
    return out


def to_csr(cells):
    indptr = np.cumsum([0] + [len(c) for c in cells])
    genes = np.array([g for c in cells for g in c], dtype=np.int64)
    counts = np.array([v for c in cells for v in c.values()], dtype=np.int64)
    return indptr, genes, counts


def split(offsets, tokens):
    return [tokens[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


@pytest.mark.parametrize("mode", ["v1", "v2"])
def test_random_cells_match_plain(mode: str) -> None:
    rng = np.random.default_rng(0)
    n_genes = 500
    token_ids = rng.permutation(n_genes).astype(np.int32) + 4
    token_ids[rng.random(n_genes) < 0.2] = -1  # genes outside the vocabulary
    medians = np.where(token_ids >= 0, rng.lognormal(0, 1, n_genes), np.nan)
    cells = []
    for _ in range(300):
        k = int(rng.integers(0, 200))
        genes = rng.choice(n_genes, size=k, replace=False)
        counts = rng.integers(0, 30, size=k)  # zeros included: they must be dropped
        cells.append(dict(zip(genes.tolist(), counts.tolist(), strict=True)))
    n_counts = np.array(
        [sum(c.values()) + int(rng.integers(1, 50)) for c in cells], dtype=np.float64
    )
    kw = {"cls_id": 2, "eos_id": 3} if mode == "v2" else {}
    max_genes = 60
    enc = RankEncoder(token_ids, medians, max_genes=max_genes, **kw)
    offsets, tokens = enc.encode(*to_csr(cells), n_counts)
    assert split(offsets, tokens) == plain_encode(
        cells, n_counts, token_ids, medians, max_genes, **kw
    )


def test_ties_break_by_token_id_and_truncation() -> None:
    token_ids = np.array([9, 7, 8, 5], dtype=np.int32)
    medians = np.ones(4)
    enc = RankEncoder(token_ids, medians, max_genes=3, cls_id=2, eos_id=3)
    # Genes 0,1,2 tie; gene 3 has the top score. Truncated to 3 genes.
    offsets, tokens = enc.encode(
        np.array([0, 4, 4]), np.array([0, 1, 2, 3]), np.array([2, 2, 2, 5]), np.array([11.0, 1.0])
    )
    assert split(offsets, tokens) == [[2, 5, 7, 8, 3], [2, 3]]  # an empty cell is <cls> <eos>


def test_rejects_vocabulary_gene_without_median() -> None:
    with pytest.raises(ValueError, match="no positive median"):
        RankEncoder(np.array([4, 5], np.int32), np.array([1.0, np.nan]), max_genes=10)
