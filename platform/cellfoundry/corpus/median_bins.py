"""The NumPy/Arrow pieces of the corpus medians (see ``medians``), free of pass orchestration.

Per batch, on the workers: cells flattened to (gene, value = count / n_counts * 10,000), values
binned against edges fixed on the driver (a logarithm guesses, exact comparisons decide, so
every worker bins alike), sparse per-gene histograms keyed gene * n_bins + bin, and the values
inside each gene's narrowed interval. In each gene range's reducer (``median_reduce``):
``_Narrowing`` locates its genes' median order statistics in the merged histograms and picks
them from the collected values; the driver keeps the per-gene state between passes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cellfoundry.corpus.filemap import resolve

SCALE = 10_000.0  #: values are counts / n_counts * SCALE
CELL_COLUMNS = ["gene_ids", "counts", "n_counts"]
_N_LOW = 14  # outer bins below 1e-3: [0, 1e-16), then one per decade up to [1e-4, 1e-3)
_N_OUTER = 25  # with those above 1e4: one per decade up to [1e13, 1e14), then [1e14, inf)
_CELLS = pa.schema(
    [("gene_ids", pa.list_(pa.int32())), ("counts", pa.list_(pa.int32())), ("n_counts", pa.int64())]
)
_HIST = pa.schema(
    [("key", pa.int64()), ("count", pa.int64()), ("vmin", pa.float64()), ("vmax", pa.float64())]
)
_COUNTS = pa.schema([("key", pa.int64()), ("count", pa.int64())])
_VALUES = pa.schema([("gene", pa.int32()), ("value", pa.float64())])


# ----------------------------------------------------------------- per-batch (worker) pieces
def bin_edges(bins: int) -> np.ndarray:
    """Pass-1 edges, float64 [bins + 26]: ``bins`` log-spaced bins over [1e-3, 1e4], and
    outer bins of a decade each from 1e-16 to 1e14, plus [0, 1e-16) and [1e14, inf)."""
    return np.concatenate([
        [0.0], 10.0 ** np.arange(-16, -3), 10.0 ** np.linspace(-3.0, 4.0, bins + 1),
        10.0 ** np.arange(5, 15), [np.inf],
    ])  # fmt: skip


def cell_values(batch: pa.Table, n_genes: int) -> tuple[np.ndarray, np.ndarray]:
    """Flatten cells into (gene int64 [m], value float64 [m]), value = c / n * 10,000."""
    missing = [c for c in CELL_COLUMNS if c not in batch.column_names]
    if missing:
        raise ValueError(f"cells: missing column(s) {missing}; medians need {CELL_COLUMNS}")
    lengths = pc.fill_null(pc.list_value_length(batch["gene_ids"]), 0).to_numpy()
    genes = pc.list_flatten(batch["gene_ids"]).to_numpy().astype(np.int64)
    counts = pc.list_flatten(batch["counts"]).to_numpy()
    same = pc.fill_null(pc.list_value_length(batch["counts"]), 0).to_numpy()
    if counts.size != genes.size or not np.array_equal(same, lengths):
        raise ValueError(
            "cells: `gene_ids` and `counts` differ in length for some cell; "
            "they must be parallel lists"
        )
    n = np.repeat(batch["n_counts"].to_numpy().astype(np.float64), lengths)
    if genes.size and (genes.min() < 0 or genes.max() >= n_genes):
        raise ValueError(f"cells: `gene_ids` outside [0, {n_genes}); pass the corpus n_genes")
    if genes.size and (counts.min() <= 0 or not n.min() > 0):
        raise ValueError(
            "cells: `counts` and `n_counts` must be > 0 for listed genes; "
            "drop zero counts and cells without a total first"
        )
    return genes, counts / n * SCALE


def log_bins(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin b of each positive value with edges[b] <= v < edges[b + 1]; int64 [m].

    A log10 guess in the main range, corrected by exact comparisons (values outside the main
    range, or rounded across an edge, walk one bin per round)."""
    scale = (edges.size - 1 - _N_OUTER) / 7.0
    guess = np.floor((np.log10(values) + 3.0) * scale) + _N_LOW
    b = np.clip(guess, 0, edges.size - 2).astype(np.int64)
    idx = np.flatnonzero((values < edges[b]) | (values >= edges[b + 1]))
    while idx.size:
        v, bi = values[idx], b[idx]
        bi += (v >= edges[bi + 1]).astype(np.int64) - (v < edges[bi])
        b[idx] = bi
        idx = idx[(v < edges[bi]) | (v >= edges[bi + 1])]
    return b


def sub_bins(values: np.ndarray, lo: np.ndarray, step: np.ndarray, n_sub: np.ndarray) -> np.ndarray:
    """Largest j in [0, n_sub) with lo + j * step <= value (edges are exact IEEE arithmetic,
    the same on every machine), by vectorised bisection; all arrays [m]."""
    j_lo = np.zeros(values.size, np.int64)
    j_hi = n_sub.astype(np.int64) - 1
    while True:
        open_ = j_lo < j_hi
        if not open_.any():
            return j_lo
        mid = (j_lo + j_hi + 1) // 2
        ok = lo + mid * step <= values
        j_lo = np.where(open_ & ok, mid, j_lo)
        j_hi = np.where(open_ & ~ok, mid - 1, j_hi)


def reduce_by_key(
    keys: np.ndarray,
    counts: np.ndarray | None = None,
    vmin: np.ndarray | None = None,
    vmax: np.ndarray | None = None,
) -> pa.Table:
    """Merge rows with equal key: counts summed (None: 1 a row), min of vmin, max of vmax.

    Returns (key, count[, vmin, vmax]) sorted by key; vmin/vmax only when given.
    """
    schema = _HIST if vmin is not None else _COUNTS
    if keys.size == 0:
        return schema.empty_table()
    order = np.argsort(keys)
    k = keys[order]
    starts = np.flatnonzero(np.concatenate(([True], k[1:] != k[:-1])))
    c = (
        np.diff(np.append(starts, k.size))
        if counts is None
        else np.add.reduceat(counts[order].astype(np.int64), starts)
    )
    cols = [k[starts], c]
    if vmin is not None and vmax is not None:
        cols += [np.minimum.reduceat(vmin[order], starts), np.maximum.reduceat(vmax[order], starts)]
    return pa.table(cols, schema=schema)


def histogram_batch(batch: pa.Table, *, n_genes: int, edges: np.ndarray) -> pa.Table:
    """Pass-1 partial of one batch: (key, count), key = gene * n_bins + log bin; int32
    columns when the key space allows (8 bytes a row: these rows are what is shuffled)."""
    genes, values = cell_values(batch, n_genes)
    n_bins = edges.size - 1
    keys, counts = np.unique(genes * n_bins + log_bins(values, edges), return_counts=True)
    kt = pa.int32() if n_genes * n_bins < 2**31 else pa.int64()
    return pa.table({"key": pa.array(keys, kt), "count": pa.array(counts, pa.int32())})


def narrow_batch(batch: pa.Table, *, n_genes: int, params: Any) -> pa.Table:
    """Narrowing partial: values inside each active gene's [lo, hi], in n_sub linear
    sub-bins; key = gene * max(n_sub) + sub-bin. params = (lo, hi, step, n_sub) [n_genes]."""
    lo, hi, step, n_sub = resolve(params)
    genes, values = cell_values(batch, n_genes)
    keep = (values >= lo[genes]) & (values <= hi[genes])  # NaN lo/hi: inactive gene
    g, v = genes[keep], values[keep]
    keys = g * int(n_sub.max()) + sub_bins(v, lo[g], step[g], n_sub[g])
    return reduce_by_key(keys, None, v, v)


def collect_batch(batch: pa.Table, *, n_genes: int, params: Any) -> pa.Table:
    """Final partial: the values inside each active gene's [lo, hi]; params = (lo, hi)."""
    lo, hi = resolve(params)
    genes, values = cell_values(batch, n_genes)
    keep = (values >= lo[genes]) & (values <= hi[genes])
    return pa.table([genes[keep].astype(np.int32), values[keep]], schema=_VALUES)


# --------------------------------------------------------------------- driver-side narrowing
class _Narrowing:
    """Per gene, the order statistics at ranks (n-1)//2 and n//2: each known (`value`) or
    at `rank` within a closed value interval [lo, hi] holding `m` of the gene's values."""

    def __init__(self, n_genes: int) -> None:
        self.n = np.zeros(n_genes, np.int64)
        self.value = np.full((n_genes, 2), np.nan)
        self.err = np.zeros((n_genes, 2))  # sketch: relative error bound of each estimate
        self.rank = np.zeros((n_genes, 2), np.int64)
        self.lo, self.hi = np.full(n_genes, np.nan), np.full(n_genes, np.nan)
        self.m = np.zeros(n_genes, np.int64)

    def pending(self) -> np.ndarray:
        return (self.n > 0) & np.isnan(self.value).any(axis=1)

    def take(self, g0: int, g1: int) -> _Narrowing:
        """A copy of the state of genes [g0, g1), renumbered from 0 (a reducer's part)."""
        part = _Narrowing(0)
        for name, a in vars(self).items():
            setattr(part, name, a[g0:g1].copy())
        return part

    def put(self, g0: int, part: _Narrowing) -> None:
        """Write back a part taken at ``g0``."""
        for name, a in vars(part).items():
            getattr(self, name)[g0 : g0 + len(a)] = a

    def update(
        self,
        gene: np.ndarray,
        count: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
        active: np.ndarray | None = None,
        *,
        attained: bool,
        sketch: bool = False,
    ) -> None:
        """Locate the unknown ranks in a merged histogram: rows [r] sorted by (gene, bin),
        each bin the closed interval [lo, hi] (attained: its min and max values), of all
        values (active None) or of the active genes' intervals. Known from a row's min/max,
        else narrowed to the row(s) holding them (sketch: interpolated inside the row)."""
        total = np.bincount(gene, weights=count, minlength=self.n.size).astype(np.int64)
        if active is None:
            self.n, active = total, total > 0
            self.rank = np.stack([(total - 1) // 2, total // 2], axis=1)
        elif not np.array_equal(total, np.where(active, self.m, 0)):
            raise RuntimeError(_CHANGED)
        cum = np.cumsum(count)
        base = np.zeros(self.n.size, np.int64)  # the gene's values before its first row
        firsts = np.flatnonzero(np.diff(gene, prepend=-1))
        base[gene[firsts]] = cum[firsts] - count[firsts]
        g = np.flatnonzero(active & self.pending())
        t = base[g, None] + self.rank[g]  # [k, 2] positions in the whole table
        row = np.searchsorted(cum, t, side="right")
        off, c, a, b = t - (cum[row] - count[row]), count[row], lo[row], hi[row]
        value, todo = self.value[g], np.isnan(self.value[g])
        if attained:
            known = todo & ((off == 0) | (off == c - 1) | (a == b))
            value = np.where(known, np.where(off == c - 1, b, a), value)
            todo &= ~known
        if sketch:  # geometric interpolation; an error bound of b / a - 1
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                est = np.where(a > 0, a * (b / a) ** ((off + 0.5) / c), b)
                self.err[g] = np.where(todo, b / a - 1.0, 0.0)
            self.value[g] = np.where(todo, est, value)
            return
        self.value[g] = value
        first = np.where(todo[:, 0], row[:, 0], row[:, 1])  # rows holding the unknown ranks
        last = np.where(todo[:, 1], row[:, 1], row[:, 0])
        start = cum[first] - count[first]
        keep = todo.any(axis=1)
        g = g[keep]
        self.lo[g], self.hi[g] = lo[first][keep], hi[last][keep]
        self.m[g] = (cum[last] - start)[keep]
        self.rank[g] = (t - start[:, None])[keep]

    def finish(self, gene: np.ndarray, value: np.ndarray, active: np.ndarray) -> None:
        """Pick the unknown ranks from the collected (gene, value) of the active genes."""
        order = np.lexsort((value, gene))
        got = np.bincount(gene, minlength=self.n.size)
        if not np.array_equal(got, np.where(active, self.m, 0)):
            raise RuntimeError(_CHANGED)
        start = np.cumsum(got) - got
        g = np.flatnonzero(active)
        picked = value[order[np.clip(start[g, None] + self.rank[g], 0, value.size - 1)]]
        self.value[g] = np.where(np.isnan(self.value[g]), picked, self.value[g])

    def medians(self) -> np.ndarray:
        """numpy's median: mean of the middle pair (one value twice when n is odd)."""
        return np.where(self.n > 0, (self.value[:, 0] + self.value[:, 1]) / 2.0, np.nan)


_CHANGED = (
    "medians: the cells changed between passes; make the input dataset deterministic "
    "(or materialize it) before computing medians"
)
