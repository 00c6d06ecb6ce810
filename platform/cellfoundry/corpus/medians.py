"""Corpus-wide per-gene non-zero medians of count / n_counts * 10,000 (the ``medians`` artifact).

Pass 1 builds sparse per-gene log histograms (key = gene * n_bins + bin, a count per key) with
``map_batches`` and merges them with a Ray Data ``groupby``: the merged table is bounded by
genes x occupied bins, never by cells. ``sketch`` interpolates inside the bin holding each
median rank. ``exact`` narrows every gene to the bin(s) holding its median rank(s), then, while
more than ``max_values_per_gene`` values are left, to finer sub-bins (these passes also keep
each sub-bin's min and max: a rank that is first or last in its sub-bin, or in one whose min
equals its max, is known at once); a last pass collects the values left and picks the order
statistics. Bins are value intervals fixed by exact comparisons with edges computed once on the
driver (a logarithm only guesses), so every worker bins alike; catch-all outer bins give every
positive value a bin (nothing is clamped), and the collection tests values, not bins.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.aggregate import Max, Min, Sum

logger = logging.getLogger(__name__)

SCALE = 10_000.0  #: values are counts / n_counts * SCALE
CELL_COLUMNS = ["gene_ids", "counts", "n_counts"]
_N_LOW = 14  # outer bins below 1e-3: [0, 1e-16), then one per decade up to [1e-4, 1e-3)
_N_OUTER = 25  # with those above 1e4: one per decade up to [1e13, 1e14), then [1e14, inf)
_SUB_BINS = (64, 4096)  # sub-bins per gene in a narrowing pass (powers of two)
_MAX_NARROWING_PASSES = 64  # each shrinks an interval >= 64x; 0 or 1 are typical
_CELLS = pa.schema(
    [("gene_ids", pa.list_(pa.int32())), ("counts", pa.list_(pa.int32())), ("n_counts", pa.int64())]
)
_HIST = pa.schema(
    [("key", pa.int64()), ("count", pa.int64()), ("vmin", pa.float64()), ("vmax", pa.float64())]
)
_COUNTS = pa.schema([("key", pa.int64()), ("count", pa.int64())])
_VALUES = pa.schema([("gene", pa.int32()), ("value", pa.float64())])


@dataclass
class MedianResult:
    """Per-gene non-zero medians; arrays are indexed by corpus gene id."""

    medians: np.ndarray  # float64 [n_genes], NaN where never detected
    n_detected: np.ndarray  # int64 [n_genes], cells with the gene non-zero
    method: str  # "exact" or "sketch"
    relative_error_bound: float  # 0.0 for exact; sketch: max relative error of any median
    passes: int  # full passes made over the cells


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


def _fetch(params: Any) -> Any:
    return ray.get(params) if isinstance(params, ray.ObjectRef) else params


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
    lo, hi, step, n_sub = _fetch(params)
    genes, values = cell_values(batch, n_genes)
    keep = (values >= lo[genes]) & (values <= hi[genes])  # NaN lo/hi: inactive gene
    g, v = genes[keep], values[keep]
    keys = g * int(n_sub.max()) + sub_bins(v, lo[g], step[g], n_sub[g])
    return reduce_by_key(keys, None, v, v)


def collect_batch(batch: pa.Table, *, n_genes: int, params: Any) -> pa.Table:
    """Final partial: the values inside each active gene's [lo, hi]; params = (lo, hi)."""
    lo, hi = _fetch(params)
    genes, values = cell_values(batch, n_genes)
    keep = (values >= lo[genes]) & (values <= hi[genes])
    return pa.table([genes[keep].astype(np.int32), values[keep]], schema=_VALUES)


# ------------------------------------------------------------------------ passes (runners)
class _RayPasses:
    """Runs a batch function over a Ray Dataset; merges histograms with a groupby."""

    def __init__(self, cells: ray.data.Dataset, batch_size: int) -> None:
        schema = cells.schema(fetch_if_missing=False)
        if schema is not None and set(CELL_COLUMNS) - set(schema.names):
            raise ValueError(
                f"cells: columns {schema.names} lack some of {CELL_COLUMNS}; "
                "pass the `cells` artifact rows"
            )
        self.cells, self.batch_size, self.passes = cells.select_columns(CELL_COLUMNS), batch_size, 0

    def _map(self, fn: Callable[[pa.Table], pa.Table]) -> ray.data.Dataset:
        self.passes += 1
        return self.cells.map_batches(fn, batch_format="pyarrow", batch_size=self.batch_size)

    def put(self, params: Any) -> Any:
        return ray.put(params)

    def histogram(self, fn: Callable[[pa.Table], pa.Table], ranges: bool) -> pa.Table:
        """Sum of count (with ranges: min of vmin, max of vmax) per key, sorted by key."""
        aggs = [Sum("count", alias_name="count")]
        if ranges:
            aggs += [Min("vmin", alias_name="vmin"), Max("vmax", alias_name="vmax")]
        cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 2
        partitions = max(1, min(cpus, 200))  # the default (200) is slow on small data
        merged = self._map(fn).groupby("key", num_partitions=partitions).aggregate(*aggs)
        table = _concat(ray.get(merged.to_arrow_refs()), _HIST if ranges else _COUNTS)
        return table.take(np.argsort(table["key"].to_numpy()))

    def collect(self, fn: Callable[[pa.Table], pa.Table]) -> pa.Table:
        return _concat(ray.get(self._map(fn).to_arrow_refs()), _VALUES)


class _LocalPasses:
    """The same passes in this process, over Arrow tables (small inputs and tests)."""

    def __init__(self, tables: Iterable[pa.Table], batch_size: int) -> None:
        self.tables, self.batch_size, self.passes = list(tables), batch_size, 0

    def _map(self, fn: Callable[[pa.Table], pa.Table]) -> pa.Table:
        self.passes += 1
        size = self.batch_size
        parts = [fn(t.slice(i, size)) for t in self.tables for i in range(0, t.num_rows, size)]
        return pa.concat_tables(parts or [fn(_CELLS.empty_table())], promote_options="permissive")

    def put(self, params: Any) -> Any:
        return params

    def histogram(self, fn: Callable[[pa.Table], pa.Table], ranges: bool) -> pa.Table:
        t = self._map(fn)
        return reduce_by_key(*(t[c].to_numpy() for c in t.column_names))

    def collect(self, fn: Callable[[pa.Table], pa.Table]) -> pa.Table:
        return self._map(fn)


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    tables = [t.select(schema.names).cast(schema) for t in tables if t.num_rows]
    return pa.concat_tables(tables).combine_chunks() if tables else schema.empty_table()


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

    def finish(self, values: pa.Table, active: np.ndarray) -> None:
        """Pick the unknown ranks from the collected values of the active genes."""
        gene = values["gene"].to_numpy().astype(np.int64)
        value = values["value"].to_numpy()
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


# ---------------------------------------------------------------------------- public API
def compute_medians(
    cells: ray.data.Dataset | Iterable[pa.Table],
    n_genes: int,
    *,
    method: str = "exact",
    bins: int = 2048,
    max_values_per_gene: int = 200_000,
    batch_size: int = 4096,
    max_total_values: int = 50_000_000,
) -> MedianResult:
    """Per-gene median of counts / n_counts * 10,000 over the cells where the gene is non-zero.

    ``cells``: a Ray Dataset with ``gene_ids`` (list<int32> in [0, n_genes)), ``counts``
    (list<int32>, > 0) and ``n_counts`` (int64), or Arrow tables to run in this process.
    ``exact`` equals ``np.median`` bitwise (usually 2 passes); ``sketch`` takes 1 pass, error
    <= 10**(7/bins) - 1 (medians outside [1e-3, 1e4] fall in wider outer bins; the bound then
    says so). Collected values are bounded by ``max_values_per_gene`` per gene and
    ``max_total_values`` in all; genes above either are narrowed by another pass first. Each
    pass re-reads ``cells``: materialize it first when that is cheaper than recomputing it.
    """
    if method not in ("exact", "sketch"):
        raise ValueError(f"compute_medians: method={method!r}; use 'exact' or 'sketch'")
    for name, v, least in (
        ("n_genes", n_genes, 1),
        ("bins", bins, 2),
        ("batch_size", batch_size, 1),
        ("max_values_per_gene", max_values_per_gene, 1),
        ("max_total_values", max_total_values, 1),
    ):
        if v < least:
            raise ValueError(f"compute_medians: {name}={v}; it must be >= {least}")
    runner = (
        _RayPasses(cells, batch_size)
        if isinstance(cells, ray.data.Dataset)
        else _LocalPasses(cells, batch_size)
    )
    state, edges, t0 = _Narrowing(n_genes), bin_edges(bins), time.perf_counter()
    hist = runner.histogram(functools.partial(histogram_batch, n_genes=n_genes, edges=edges), False)
    gene, b = np.divmod(hist["key"].to_numpy(), edges.size - 1)
    lo, hi = edges[b], np.nextafter(edges[b + 1], 0.0)  # bin b as a closed interval
    state.update(gene, hist["count"].to_numpy(), lo, hi, attained=False, sketch=method == "sketch")
    logger.info(
        "medians pass 1: %d genes detected, %d merged bins (%.1f s)",
        int((state.n > 0).sum()), hist.num_rows, time.perf_counter() - t0,
    )  # fmt: skip
    for _ in range(_MAX_NARROWING_PASSES):
        narrow = _to_narrow(state, max_values_per_gene, max_total_values)
        if not narrow.any():
            break
        _narrowing_pass(runner, state, narrow, n_genes, max_values_per_gene)
    else:
        raise RuntimeError(f"medians: still narrowing after {_MAX_NARROWING_PASSES} passes")
    active = state.pending()
    if active.any():
        params = runner.put(
            (np.where(active, state.lo, np.nan), np.where(active, state.hi, np.nan))
        )
        fn = functools.partial(collect_batch, n_genes=n_genes, params=params)
        state.finish(runner.collect(fn), active)
        logger.info(
            "medians pass %d: collected %d values of %d genes",
            runner.passes, int(state.m[active].sum()), int(active.sum()),
        )  # fmt: skip
    bound = 0.0 if method == "exact" else max(10.0 ** (7.0 / bins) - 1.0, float(state.err.max()))
    logger.info("medians: %s, %d passes, %.1f s", method, runner.passes, time.perf_counter() - t0)
    return MedianResult(state.medians(), state.n, method, bound, runner.passes)


def _to_narrow(state: _Narrowing, max_per_gene: int, max_total: int) -> np.ndarray:
    """Pending genes to narrow further: above max_per_gene values, or the largest ones while
    the values to collect exceed max_total; bool [n_genes]."""
    pending = state.pending()
    narrow = pending & (state.m > max_per_gene)
    rest = np.flatnonzero(pending & ~narrow)
    rest = rest[np.argsort(state.m[rest], kind="stable")]
    narrow[rest[np.cumsum(state.m[rest]) > max_total]] = True
    return narrow


def _narrowing_pass(
    runner: _RayPasses | _LocalPasses, state: _Narrowing, narrow: np.ndarray, n_genes: int,
    max_per_gene: int,
) -> None:  # fmt: skip
    """One pass of n_sub linear sub-bins (64..4096, ~max_per_gene / 8 values each) over each
    narrowed gene's interval; 1 bin (just its min and max) for the unbounded outer bins."""
    lo, hi = np.where(narrow, state.lo, np.nan), np.where(narrow, state.hi, np.nan)
    want = np.clip(2 ** np.ceil(np.log2(np.maximum(8 * state.m / max_per_gene, 1))), *_SUB_BINS)
    n_sub = np.where(narrow, np.where((lo > 0) & (hi < 1e300), want, 1), 0).astype(np.int64)
    step = np.where(narrow, (hi - lo) / np.maximum(n_sub, 1), 0.0)
    params = runner.put((lo, hi, step, n_sub))
    hist = runner.histogram(functools.partial(narrow_batch, n_genes=n_genes, params=params), True)
    width = int(n_sub.max())
    key, count, vmin, vmax = (hist[c].to_numpy() for c in _HIST.names)
    state.update(key // width, count, vmin, vmax, narrow, attained=True)
    logger.info("medians pass %d: narrowed %d genes", runner.passes, int(narrow.sum()))


def medians_to_table(
    result: MedianResult, ensembl_ids: list[str] | np.ndarray | pa.Array
) -> pa.Table:
    """The ``medians`` artifact table: ensembl_id, median (float64, NaN if never detected),
    n_cells_detected (int64), method (str), relative_error_bound (float64); one row per gene."""
    ids = pa.array(ensembl_ids, type=pa.string())
    if len(ids) != result.medians.size:
        raise ValueError(
            f"medians_to_table: {len(ids)} ensembl_ids for {result.medians.size} "
            "medians; pass the gene table's ensembl_id column in index order"
        )
    n = result.medians.size
    return pa.table({
        "ensembl_id": ids,
        "median": pa.array(result.medians, pa.float64()),
        "n_cells_detected": pa.array(result.n_detected, pa.int64()),
        "method": pa.array([result.method] * n, pa.string()),
        "relative_error_bound": pa.array(np.full(n, result.relative_error_bound), pa.float64()),
    })  # fmt: skip
