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
        gene_index = np.asarray(gene_index, dtype=np.intp)
        counts_f = np.asarray(counts, dtype=np.float64)
        tok = self.token_ids[gene_index]
        keep = (tok >= 0) & (counts_f > 0)
        if not keep.all():  # drop genes outside the vocabulary and explicit zeros
            kept_before = np.zeros(len(keep) + 1, dtype=np.int64)
            np.cumsum(keep, out=kept_before[1:])
            indptr = kept_before[indptr]
            gene_index, tok, counts_f = gene_index[keep], tok[keep], counts_f[keep]
        per_cell = np.diff(indptr)
        # Same operations in the same order as the reference tokenizer, so scores are
        # bit-identical: X / n_counts * target_sum / median.
        n = np.repeat(np.asarray(n_counts, dtype=np.float64), per_cell)
        score = counts_f / n * TARGET_SUM / self.medians[gene_index]
        extra, first = (2, 1) if self.special else (0, 0)
        offsets = np.zeros(n_cells + 1, dtype=np.int64)
        np.cumsum(np.minimum(per_cell, self.max_genes) + extra, out=offsets[1:])
        tokens = np.empty(int(offsets[-1]), dtype=np.int32)
        for lo in range(0, n_cells, _ROWS_PER_BLOCK):
            hi = min(lo + _ROWS_PER_BLOCK, n_cells)
            _encode_block(
                score[indptr[lo] : indptr[hi]], tok[indptr[lo] : indptr[hi]], per_cell[lo:hi],
                tokens, offsets[lo:hi] + first, self.max_genes,
            )  # fmt: skip
        if self.special:
            tokens[offsets[:-1]] = self.cls_id
            tokens[offsets[1:] - 1] = self.eos_id
        return offsets, tokens


_ROWS_PER_BLOCK = 256  # bounds a padded block to 256 x (longest cell) values


def _encode_block(
    score: np.ndarray,
    tok: np.ndarray,
    per_cell: np.ndarray,
    out: np.ndarray,
    out_start: np.ndarray,
    k: int,
) -> None:
    """Rank the genes of a block of cells and write each cell's first ``k`` tokens.

    The cells are scattered into a padded [cells, width] matrix and sorted row-wise with
    NumPy's (SIMD) argsort, far faster than one global multi-key sort. Cells where two
    scores among the kept ranks (or at the cut-off) tie are redone exactly: score
    descending, then token id ascending.
    """
    n_rows = len(per_cell)
    width = int(per_cell.max()) if n_rows else 0
    if width == 0:
        return
    starts = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(per_cell, out=starts[1:])
    row = np.repeat(np.arange(n_rows), per_cell)
    pos = np.arange(len(score)) - starts[row]
    flat = row * width + pos
    block = np.full(n_rows * width, np.inf)
    block[flat] = -score
    tok_block = np.empty(n_rows * width, dtype=np.int32)
    tok_block[flat] = tok
    keep = min(width, k)
    cols = min(width, k + 1)  # one past the cut-off, to see a tie across it
    order = np.argsort(block.reshape(n_rows, width), axis=1)[:, :cols]
    order += (np.arange(n_rows) * width)[:, None]
    vals = block[order]
    n_valid = np.minimum(per_cell, cols)
    valid = np.arange(cols)[None, :] < n_valid[:, None]
    ties = ((vals[:, 1:] == vals[:, :-1]) & valid[:, 1:]).any(axis=1)
    kept = valid[:, :keep] & (np.arange(keep)[None, :] < k)
    dest = out_start[:, None] + np.arange(keep)[None, :]
    out[dest[kept]] = tok_block[order[:, :keep][kept]]
    for c in np.flatnonzero(ties):
        s, e = starts[c], starts[c + 1]
        ranked = tok[s:e][np.lexsort((tok[s:e], -score[s:e]))][:k]
        out[out_start[c] : out_start[c] + len(ranked)] = ranked
