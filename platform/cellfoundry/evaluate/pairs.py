"""Cosine similarities of bounded sets of pairs, and nearest neighbours, of embedding rows.

A pair category is a union of *blocks* over groups of rows: a block ``(a, a)`` holds every
unordered pair of distinct rows of group ``a``; a block ``(a, b)`` with ``a != b`` every
pair of one row of ``a`` and one of ``b``. :func:`sample_pairs` returns all pairs of a
category when there are at most ``max_pairs`` of them, else ``max_pairs`` pairs drawn
uniformly (with replacement) from the category, so its cost does not grow with the square
of the number of cells.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "block_sizes",
    "cosine_of_pairs",
    "nearest_neighbours",
    "sample_pairs",
    "unit_rows",
]

logger = logging.getLogger(__name__)

Exclude = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(i, j) -> bool mask of the pairs to leave out of a category (e.g. the same gene)."""


def unit_rows(x: np.ndarray) -> np.ndarray:
    """float32 [n, d]: rows scaled to unit L2 norm (all-zero rows stay zero: cosine 0)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero = int((norms[:, 0] == 0).sum())
    if zero:
        logger.warning("%d embedding rows are all zeros; their cosine similarities are 0", zero)
    return x / np.where(norms == 0, 1.0, norms)


def block_sizes(members: Sequence[np.ndarray], blocks: Sequence[tuple[int, int]]) -> np.ndarray:
    """int64 [n_blocks]: pairs in each block."""
    out = np.empty(len(blocks), dtype=np.int64)
    for k, (a, b) in enumerate(blocks):
        na, nb = len(members[a]), len(members[b])
        out[k] = na * (na - 1) // 2 if a == b else na * nb
    return out


def _all_pairs(m_a: np.ndarray, m_b: np.ndarray, same: bool) -> tuple[np.ndarray, np.ndarray]:
    if same:
        i, j = np.triu_indices(len(m_a), k=1)
        return m_a[i], m_a[j]
    return np.repeat(m_a, len(m_b)), np.tile(m_b, len(m_a))


def sample_pairs(
    members: Sequence[np.ndarray],
    blocks: Sequence[tuple[int, int]],
    max_pairs: int,
    rng: np.random.Generator,
    *,
    exclude: Exclude | None = None,
) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """Row indices (i, j) of the category's pairs, ``n_possible`` (its number of pairs) and
    whether the pairs were sampled (else they are all of the category's pairs).

    ``members[g]`` are the row indices of group ``g``. With ``exclude``, pairs it flags are
    not part of the category (drawn pairs are rejected and redrawn); ``n_possible`` is then
    exact when the category was enumerated and an estimate from the rejection rate otherwise.
    """
    sizes = block_sizes(members, blocks)
    total = int(sizes.sum())
    empty = np.empty(0, dtype=np.int64)
    if total == 0:
        return empty, empty, 0, False
    if total <= max_pairs:
        parts = [_all_pairs(members[a], members[b], a == b) for a, b in blocks]
        i = np.concatenate([p[0] for p in parts]).astype(np.int64)
        j = np.concatenate([p[1] for p in parts]).astype(np.int64)
        if exclude is not None:
            keep = ~exclude(i, j)
            i, j = i[keep], j[keep]
        return i, j, int(i.size), False
    kept_i, kept_j, drawn, kept = [], [], 0, 0
    for _ in range(50):
        want = max_pairs - kept
        i, j = _draw(members, blocks, sizes, want if exclude is None else 2 * want, rng)
        drawn += i.size
        if exclude is not None:
            keep = ~exclude(i, j)
            i, j = i[keep][:want], j[keep][:want]
        kept_i.append(i)
        kept_j.append(j)
        kept += i.size
        if kept >= max_pairs:
            break
    i, j = np.concatenate(kept_i), np.concatenate(kept_j)
    n_possible = total if exclude is None else round(total * min(1.0, kept / drawn))
    return i, j, n_possible, True


def _draw(
    members: Sequence[np.ndarray],
    blocks: Sequence[tuple[int, int]],
    sizes: np.ndarray,
    n: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` pairs uniform over all pairs of the blocks: a block with probability
    proportional to its pairs, then a uniform pair inside it."""
    counts = rng.multinomial(n, sizes / sizes.sum())
    out_i, out_j = [], []
    for k in np.flatnonzero(counts):
        a, b = blocks[k]
        m_a, m_b, c = members[a], members[b], int(counts[k])
        if a == b:
            x = rng.integers(len(m_a), size=c)
            y = rng.integers(len(m_a) - 1, size=c)
            y += y >= x  # a uniform row other than x
            out_i.append(m_a[x])
            out_j.append(m_a[y])
        else:
            out_i.append(m_a[rng.integers(len(m_a), size=c)])
            out_j.append(m_b[rng.integers(len(m_b), size=c)])
    return np.concatenate(out_i).astype(np.int64), np.concatenate(out_j).astype(np.int64)


def cosine_of_pairs(
    unit: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = 8192
) -> np.ndarray:
    """float64 [n_pairs]: cosine similarity of rows ``i`` and ``j`` of unit-norm ``unit``."""
    out = np.empty(len(i), dtype=np.float64)
    for s in range(0, len(i), chunk):
        a, b = unit[i[s : s + chunk]], unit[j[s : s + chunk]]  # (chunk, d)
        out[s : s + chunk] = np.einsum("nd,nd->n", a, b, dtype=np.float64)
    return np.clip(out, -1.0, 1.0)


def nearest_neighbours(unit: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """int64 [n]: for each row of unit-norm ``unit``, the row of highest cosine similarity
    other than itself (ties: the lower index). Needs n >= 2; cost O(n^2 d) in chunks."""
    n = unit.shape[0]
    if n < 2:
        raise ValueError("nearest neighbours need at least 2 rows")
    out = np.empty(n, dtype=np.int64)
    for s in range(0, n, chunk):
        sims = unit[s : s + chunk] @ unit.T  # (chunk, n)
        rows = np.arange(sims.shape[0])
        sims[rows, s + rows] = -np.inf
        out[s : s + chunk] = sims.argmax(axis=1)
    return out
