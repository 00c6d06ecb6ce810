"""Rank value encoding, vectorised over a batch of cells (the contract of DESIGN.md).

For a cell with raw counts c_g and total n (``n_counts``), score_g = c_g / n * 10,000 /
median_g over vocabulary genes with c_g > 0; genes are ordered by score descending, ties by
token id ascending. V2 keeps the first 4,094 inside ``<cls>`` ... ``<eos>``; V1 keeps 2,048.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TARGET_SUM = 10_000.0


@dataclass(frozen=True)
class RankEncoder:
    """Maps a gene space (an index per gene) to tokens and medians.

    ``token_ids[g]`` is the token of gene g (-1 when g is not in the vocabulary) and
    ``medians[g]`` its non-zero median (ignored where the token is -1).
    """

    token_ids: np.ndarray  # int32 [n_genes]
    medians: np.ndarray  # float64 [n_genes]
    max_genes: int  # genes kept per cell (4,094 for V2, 2,048 for V1)
    cls_id: int | None = None  # V2: <cls> token; None for V1
    eos_id: int | None = None  # V2: <eos> token; None for V1

    def __post_init__(self) -> None:
        if self.token_ids.shape != self.medians.shape:
            raise ValueError("token_ids and medians must have one entry per gene")
        in_vocab = self.token_ids >= 0
        bad = in_vocab & ~(np.isfinite(self.medians) & (self.medians > 0))
        if bad.any():
            raise ValueError(
                f"{int(bad.sum())} vocabulary genes have no positive median (e.g. gene index "
                f"{int(np.flatnonzero(bad)[0])}); give every tokenised gene a median"
            )
        if (self.cls_id is None) != (self.eos_id is None):
            raise ValueError("set both cls_id and eos_id (V2) or neither (V1)")

    @property
    def special(self) -> bool:
        return self.cls_id is not None

    def encode(
        self,
        indptr: np.ndarray,
        gene_index: np.ndarray,
        counts: np.ndarray,
        n_counts: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode a CSR batch of cells.

        Args:
            indptr: int64 [n_cells + 1], row offsets into ``gene_index`` / ``counts``.
            gene_index: int [nnz], gene of each entry (an index into ``token_ids``). A gene
                appears at most once per cell (sum duplicates first).
            counts: [nnz] raw counts (integers, any numeric dtype).
            n_counts: [n_cells] total raw count of each cell.

        Returns:
            ``(offsets, tokens)``: int64 [n_cells + 1] offsets and int32 tokens, so that cell i
            is ``tokens[offsets[i]:offsets[i + 1]]``.
        """
        indptr = np.asarray(indptr, dtype=np.int64)
        n_cells = len(indptr) - 1
        rows = np.repeat(np.arange(n_cells, dtype=np.int64), np.diff(indptr))
        gene_index = np.asarray(gene_index)
        tok = self.token_ids[gene_index]
        counts_f = np.asarray(counts, dtype=np.float64)
        keep = (tok >= 0) & (counts_f > 0)
        rows, tok, gene_index, counts_f = rows[keep], tok[keep], gene_index[keep], counts_f[keep]
        n = np.asarray(n_counts, dtype=np.float64)[rows]
        # Same operations in the same order as the reference tokenizer, so scores are
        # bit-identical: X / n_counts * target_sum / median.
        score = counts_f / n * TARGET_SUM / self.medians[gene_index]
        # Primary key: cell; then score descending; ties by token id ascending.
        order = np.lexsort((tok, -score, rows))
        rows, tok = rows[order], tok[order]
        per_cell = np.bincount(rows, minlength=n_cells)
        starts = np.concatenate(([0], np.cumsum(per_cell)[:-1]))
        rank = np.arange(len(rows), dtype=np.int64) - starts[rows]
        kept = rank < self.max_genes
        rows, tok, rank = rows[kept], tok[kept], rank[kept]
        n_kept = np.minimum(per_cell, self.max_genes)
        extra = 2 if self.special else 0
        lengths = n_kept + extra
        offsets = np.zeros(n_cells + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.empty(int(offsets[-1]), dtype=np.int32)
        first = 1 if self.special else 0
        tokens[offsets[rows] + first + rank] = tok
        if self.special:
            tokens[offsets[:-1]] = self.cls_id
            tokens[offsets[1:] - 1] = self.eos_id
        return offsets, tokens
