"""Held-out cells, deterministic masks and the rank baseline of masked-gene prediction.

- :func:`hash_fraction`: a cell_id's position in [0, 1), a pure function of (seed, cell_id).
- :func:`select_cells`: which rows of a shard are held out and which fit the baseline.
- :func:`mask_positions`: the positions of one cell that become ``<mask>`` (15% of its gene
  tokens, never a special token), a pure function of (seed, cell_id).
- :class:`RankBaseline`: the gene most often found at each rank position of the training
  cells, the Geneformer seeds' baseline for masked-gene prediction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from cellfoundry.config.evaluate import HoldoutConfig

__all__ = [
    "RankBaseline",
    "cell_key",
    "gene_ranks",
    "hash_fraction",
    "mask_positions",
    "select_cells",
    "special_mask",
]


def cell_key(cell_id: str, seed: int = 0) -> int:
    """A 64-bit integer that depends only on ``seed`` and ``cell_id``."""
    digest = hashlib.blake2b(f"{seed}:{cell_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def hash_fraction(cell_ids: Iterable[str], seed: int = 0) -> np.ndarray:
    """float64 [n]: each cell_id's hash mapped to [0, 1) (uniform over cells)."""
    return np.array([cell_key(c, seed) / 2.0**64 for c in cell_ids], dtype=np.float64)


def _column(table: pa.Table, name: str, where: str) -> list:
    if name not in table.column_names:
        raise ValueError(
            f"{where}: the tokenized shards have no column {name!r} (columns: "
            f"{', '.join(table.column_names)}); set holdout.column to one of them or use "
            "holdout.mode: hash"
        )
    return table[name].to_pylist()


def select_cells(table: pa.Table, holdout: HoldoutConfig) -> tuple[np.ndarray, np.ndarray]:
    """bool [n] held-out rows and bool [n] training rows (for the baseline) of a shard.

    Never both: a held-out cell never fits the baseline. ``holdout.max_cells`` is applied
    by the caller over all shards (see :func:`hash_fraction`).
    """
    if holdout.mode == "hash":
        frac = hash_fraction(_column(table, "cell_id", "holdout.mode hash"), holdout.seed)
        held = frac < holdout.fraction
        return held, ~held
    values = np.array(
        ["" if v is None else str(v) for v in _column(table, holdout.column, "holdout.column")],
        dtype=object,
    )
    held = np.isin(values, list(holdout.values))
    train = ~held
    if holdout.train_values is not None:
        train &= np.isin(values, list(holdout.train_values))
    return held, train


def special_mask(token_dictionary: Mapping[str, int], vocab_size: int) -> np.ndarray:
    """bool [vocab_size]: True for special tokens (``<pad>``, ``<mask>``, ``<cls>``, ``<eos>``,
    every ``<...>`` entry) and for ids the dictionary does not assign to a gene."""
    special = np.ones(vocab_size, dtype=bool)
    for token, i in token_dictionary.items():
        if i < vocab_size and not (token.startswith("<") and token.endswith(">")):
            special[i] = False
    return special


def mask_positions(
    row: np.ndarray, special: np.ndarray, *, fraction: float, seed: int, cell_id: str
) -> np.ndarray:
    """int64 [k]: sorted positions of ``row`` to replace by ``<mask>``.

    k = max(1, round(fraction x n_genes)) positions drawn without replacement among the gene
    tokens (never a special token) with a generator seeded by (seed, cell_id), so the mask
    does not depend on batching, sharding or order. Empty when the cell has no gene token.
    """
    genes = np.flatnonzero(~special[row])
    if genes.size == 0:
        return genes.astype(np.int64)
    k = max(1, int(np.floor(fraction * genes.size + 0.5)))
    rng = np.random.default_rng([seed, cell_key(cell_id, seed)])
    return np.sort(rng.choice(genes, size=k, replace=False)).astype(np.int64)


def gene_ranks(row: np.ndarray, special: np.ndarray) -> np.ndarray:
    """int64 [len(row)]: each position's rank among the cell's gene tokens (0 = the top
    gene); -1 at special tokens. With the V2 layout, position 1 (after ``<cls>``) is rank 0."""
    is_gene = ~special[row]
    ranks = np.cumsum(is_gene) - 1
    return np.where(is_gene, ranks, -1).astype(np.int64)


class RankBaseline:
    """Predicts, for a masked gene at rank r, the gene found most often at rank r among the
    training cells (ties: the lower token id). Ranks no training cell reaches predict the
    gene most often seen over all ranks. Fit it with :meth:`update` over training cells only.
    """

    def __init__(self, vocab_size: int, special: np.ndarray) -> None:
        self.vocab_size, self.special = vocab_size, special
        self._counts: sp.csr_matrix | None = None  # (rank, token) -> cells
        self.n_cells = 0
        self.modes: np.ndarray | None = None
        self.fallback: int | None = None

    def update(self, rows: Iterable[np.ndarray]) -> None:
        """Count the genes of some training cells at each of their ranks."""
        ranks, tokens = [], []
        for row in rows:
            genes = row[~self.special[row]]
            ranks.append(np.arange(genes.size, dtype=np.int64))
            tokens.append(genes.astype(np.int64))
            self.n_cells += 1
        if not tokens:
            return
        r, t = np.concatenate(ranks), np.concatenate(tokens)
        if r.size == 0:
            return
        counts = sp.coo_matrix(
            (np.ones(r.size, dtype=np.int64), (r, t)), shape=(int(r.max()) + 1, self.vocab_size)
        ).tocsr()
        if self._counts is None:
            self._counts = counts
        else:
            n = max(self._counts.shape[0], counts.shape[0])
            self._counts = _grow(self._counts, n) + _grow(counts, n)
        self.modes = None

    def fit(self) -> RankBaseline:
        """Compute the per-rank modes from the counts so far."""
        if self._counts is None or self._counts.nnz == 0:
            raise ValueError(
                "the rank baseline saw no training cells with gene tokens: check holdout "
                "(every cell is held out, or holdout.train_values matches no cell)"
            )
        counts = self._counts.tocsr()
        counts.sum_duplicates()
        counts.sort_indices()
        modes = np.empty(counts.shape[0], dtype=np.int64)
        total = np.asarray(counts.sum(axis=0)).ravel()
        self.fallback = int(np.argmax(total))  # first (lowest id) among ties
        for r in range(counts.shape[0]):
            lo, hi = counts.indptr[r], counts.indptr[r + 1]
            if lo == hi:
                modes[r] = self.fallback
                continue
            data, cols = counts.data[lo:hi], counts.indices[lo:hi]
            modes[r] = int(cols[data == data.max()].min())
        self.modes = modes
        return self

    def predict(self, ranks: np.ndarray) -> np.ndarray:
        """int64 [n]: the baseline's gene for each rank in ``ranks`` (int, >= 0)."""
        if self.modes is None:
            self.fit()
        assert self.modes is not None and self.fallback is not None
        ranks = np.asarray(ranks, dtype=np.int64)
        out = np.full(ranks.shape, self.fallback, dtype=np.int64)
        inside = ranks < self.modes.size
        out[inside] = self.modes[ranks[inside]]
        return out


def _grow(m: sp.csr_matrix, n_rows: int) -> sp.csr_matrix:
    """``m`` with empty rows appended up to ``n_rows``."""
    if m.shape[0] == n_rows:
        return m
    m = m.tocsr(copy=True)
    m.resize((n_rows, m.shape[1]))
    return m
