"""Cell states of a screen (goal and alternatives): which cells stand for a state, and how
their embeddings make the state's embedding (NumPy + pyarrow, no model, no Ray).

A state's cells are a seeded random sample of the cells in it: each cell gets the key
``blake2b(seed, cell_id)`` and the ``max_cells`` smallest keys are drawn (ties, which need
equal IDs, by cell ID). The sample is a uniform one that depends on the cells and the seed
only, never on shard order or how the shards are split; and it can be taken in pieces:
the smallest keys of each piece, then the smallest of those, give the same cells
(:func:`sample_state_cells` on the concatenated pieces' samples). Geneformer shuffles with
a fixed seed and takes the first ``max_ncells``, which depends on the row order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["STATISTICS", "sample_keys", "sample_state_cells", "state_embedding"]

STATISTICS = ("mean", "median")


def sample_keys(cell_ids: Sequence[str], seed: int) -> np.ndarray:
    """(n,) uint64 sampling key of each cell: a hash of (seed, cell_id)."""
    salt = str(int(seed)).encode()
    return np.fromiter(
        (
            int.from_bytes(
                hashlib.blake2b(str(c).encode(), digest_size=8, key=salt).digest(), "big"
            )
            for c in cell_ids
        ),
        dtype=np.uint64,
        count=len(cell_ids),
    )


def sample_state_cells(
    table: pa.Table, column: str, states: Sequence[str], max_cells: int, seed: int
) -> pa.Table:
    """The rows of ``table`` (needs ``cell_id`` and ``column``) drawn for each state of
    ``states``: at most ``max_cells`` per state, those with the smallest
    :func:`sample_keys`, in state order then key order (so the output does not depend on
    the input's row order)."""
    for name in ("cell_id", column):
        if name not in table.column_names:
            raise ValueError(
                f"goal: no column {name!r} in the tokenized shards ({table.column_names}); "
                "tokenize with --obs-columns naming it"
            )
    values = pc.cast(table[column], pa.string())
    keep = pc.is_in(values, value_set=pa.array([str(s) for s in states], pa.string()))
    table = table.filter(pc.fill_null(keep, False))
    values = pc.cast(table[column], pa.string()).to_pylist()
    ids = [str(c) for c in table["cell_id"].to_pylist()]
    keys = sample_keys(ids, seed)
    parts = []
    for state in states:
        rows = np.array([i for i, v in enumerate(values) if v == str(state)], dtype=np.int64)
        order = sorted(rows.tolist(), key=lambda i: (int(keys[i]), ids[i]))[:max_cells]
        parts.append(np.asarray(order, dtype=np.int64))
    take = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return table.take(pa.array(take, pa.int64()))


def state_embedding(embeddings: np.ndarray, statistic: str = "mean") -> np.ndarray:
    """(hidden,) float32 embedding of a state from its cells' (cells, hidden) embeddings:
    their mean, or their element-wise median."""
    if statistic not in STATISTICS:
        raise ValueError(f"goal.statistic {statistic!r}: use mean or median")
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise ValueError(f"a state needs (cells, hidden) embeddings of >= 1 cell, got {emb.shape}")
    out = emb.mean(0) if statistic == "mean" else np.median(emb, axis=0)
    return out.astype(np.float32)
