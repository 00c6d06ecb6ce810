"""Corpus-wide per-gene non-zero medians of count / n_counts * 10,000 (the ``medians`` artifact).

Pass 1 builds sparse per-gene log histograms (key = gene * bins + bin) with per-bin count, min
and max, merged by a Ray Data ``groupby``: its size is bounded by genes x occupied bins, never
by cells. ``sketch`` interpolates inside the bin holding each median rank. ``exact`` narrows
each unresolved gene to the single bin (then sub-bin) holding its median rank(s) until at most
``max_values_per_gene`` values remain, and a last pass collects those values and picks the
order statistics. A rank that is the first or last value of its bin, or in a bin whose min
equals its max, is known from the histogram alone. Bins are defined by exact comparisons with
edges computed once on the driver (a logarithm only guesses), so every worker bins alike.
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
LOG_RANGE = (-3.0, 4.0)  #: decades of the pass-1 histogram: [1e-3, 1e4], outer bins clamp
CELL_COLUMNS = ["gene_ids", "counts", "n_counts"]
_SUB_BINS = (64, 4096)  # sub-bins per gene in a refinement pass (powers of two)
_MAX_REFINE_PASSES = 64  # each shrinks an interval >= 64x; 0 or 1 are typical
_CELLS = pa.schema(
    [("gene_ids", pa.list_(pa.int32())), ("counts", pa.list_(pa.int32())), ("n_counts", pa.int64())]
)
_HIST = pa.schema(
    [("key", pa.int64()), ("count", pa.int64()), ("vmin", pa.float64()), ("vmax", pa.float64())]
)
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
    """Log-spaced pass-1 edges, float64 [bins + 1], from 1e-3 to 1e4."""
    return 10.0 ** np.linspace(LOG_RANGE[0], LOG_RANGE[1], bins + 1)


def cell_values(batch: pa.Table, n_genes: int) -> tuple[np.ndarray, np.ndarray]:
    """Flatten cells into (gene int64 [m], value float64 [m]), value = c / n * 10,000."""
    missing = [c for c in CELL_COLUMNS if c not in batch.column_names]
    if missing:
        raise ValueError(f"cells: missing column(s) {missing}; medians need {CELL_COLUMNS}")
    lengths = pc.fill_null(pc.list_value_length(batch["gene_ids"]), 0).to_numpy()
    genes = pc.list_flatten(batch["gene_ids"]).to_numpy().astype(np.int64)
    counts = pc.list_flatten(batch["counts"]).to_numpy()
    if counts.size != genes.size or not np.array_equal(
        pc.fill_null(pc.list_value_length(batch["counts"]), 0).to_numpy(), lengths
    ):
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
    """Bin of each value: #interior edges <= value, so edges[b] <= v < edges[b+1] (outer bins
    clamp). A log10 guess is corrected by exact comparisons; int64 [m]."""
    nb = edges.size - 1
    scale = nb / (LOG_RANGE[1] - LOG_RANGE[0])
    b = np.clip(np.floor((np.log10(values) - LOG_RANGE[0]) * scale), 0, nb - 1).astype(np.int64)
    while True:  # each round moves every misplaced value one bin closer
        down = (b > 0) & (values < edges[b])
        up = (b < nb - 1) & (values >= edges[b + 1])
        if not (down.any() or up.any()):
            return b
        b += up.astype(np.int64) - down


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
    keys: np.ndarray, counts: np.ndarray | None, vmin: np.ndarray, vmax: np.ndarray
) -> pa.Table:
    """Merge rows with equal key: counts summed (None = 1 each), min of vmin, max of vmax.

    Returns a histogram table (key, count, vmin, vmax) sorted by key.
    """
    if keys.size == 0:
        return _HIST.empty_table()
    order = np.argsort(keys)
    k = keys[order]
    starts = np.flatnonzero(np.concatenate(([True], k[1:] != k[:-1])))
    c = (
        np.diff(np.append(starts, k.size))
        if counts is None
        else np.add.reduceat(counts[order], starts)
    )
    return pa.table(
        [
            k[starts],
            c.astype(np.int64),
            np.minimum.reduceat(vmin[order], starts),
            np.maximum.reduceat(vmax[order], starts),
        ],
        schema=_HIST,
    )


def _fetch(params: Any) -> Any:
    return ray.get(params) if isinstance(params, ray.ObjectRef) else params


def histogram_batch(batch: pa.Table, *, n_genes: int, edges: np.ndarray) -> pa.Table:
    """Pass 1 partial: sparse histogram of one batch, key = gene * bins + log bin."""
    genes, values = cell_values(batch, n_genes)
    keys = genes * (edges.size - 1) + log_bins(values, edges)
    return reduce_by_key(keys, None, values, values)


def refine_batch(batch: pa.Table, *, n_genes: int, params: Any) -> pa.Table:
    """Refinement partial: values inside each active gene's [lo, hi], in n_sub linear
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

    def histogram(self, fn: Callable[[pa.Table], pa.Table]) -> pa.Table:
        cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 2
        merged = (
            self._map(fn)
            .groupby("key", num_partitions=max(1, min(cpus, 200)))
            .aggregate(
                Sum("count", alias_name="count"),
                Min("vmin", alias_name="vmin"),
                Max("vmax", alias_name="vmax"),
            )
        )
        table = _concat(ray.get(merged.to_arrow_refs()), _HIST)
        return table.take(np.argsort(table["key"].to_numpy()))

    def collect(self, fn: Callable[[pa.Table], pa.Table]) -> pa.Table:
        return _concat(ray.get(self._map(fn).to_arrow_refs()), _VALUES)


class _LocalPasses:
    """The same passes in this process, over Arrow tables (small inputs and tests)."""

    def __init__(self, tables: Iterable[pa.Table], batch_size: int) -> None:
        self.tables, self.batch_size, self.passes = list(tables), batch_size, 0

    def _map(self, fn: Callable[[pa.Table], pa.Table]) -> pa.Table:
        self.passes += 1
        return pa.concat_tables(
            [
                fn(t.slice(i, self.batch_size))
                for t in self.tables
                for i in range(0, t.num_rows, self.batch_size)
            ]
            or [fn(_CELLS.empty_table())]
        )

    def put(self, params: Any) -> Any:
        return params

    def histogram(self, fn: Callable[[pa.Table], pa.Table]) -> pa.Table:
        t = self._map(fn)
        return reduce_by_key(*(t[c].to_numpy() for c in _HIST.names))

    def collect(self, fn: Callable[[pa.Table], pa.Table]) -> pa.Table:
        return self._map(fn)


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    tables = [t.select(schema.names).cast(schema) for t in tables if t.num_rows]
    return pa.concat_tables(tables).combine_chunks() if tables else schema.empty_table()


# --------------------------------------------------------------------- driver-side narrowing
class _Narrowing:
    """Per-gene state: the order statistics at ranks (n-1)//2 and n//2, each known (value)
    or located as `rank` within a closed interval [lo, hi] that holds `m` of the gene's values
    (both unknown ranks, if two, always share one interval)."""

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
        self, hist: pa.Table, width: int, active: np.ndarray | None = None, *, sketch: bool = False
    ) -> None:
        """Locate the unknown ranks in a merged histogram (rows sorted by key, key = gene *
        width + bin) of all values (active None) or of the active genes' intervals; resolve
        them from bin min/max, or narrow to their bin (sketch: geometric interpolation)."""
        key, count, vmin, vmax = (hist[c].to_numpy() for c in _HIST.names)
        gene = key // width
        total = np.bincount(gene, weights=count, minlength=self.n.size).astype(np.int64)
        if active is None:
            self.n, self.m = total, total.copy()
            self.rank = np.stack([(total - 1) // 2, total // 2], axis=1)
        elif not np.array_equal(total, np.where(active, self.m, 0)):
            raise RuntimeError(
                "medians: the cells changed between passes; make the input "
                "dataset deterministic (or materialize it) before medians"
            )
        cum = np.cumsum(count)
        base = np.zeros(self.n.size, np.int64)  # values of the gene before its first row
        starts = (
            np.flatnonzero(np.concatenate(([True], gene[1:] != gene[:-1])))
            if gene.size
            else np.zeros(0, np.int64)
        )
        base[gene[starts]] = cum[starts] - count[starts]
        for j in (0, 1):
            g = np.flatnonzero((total > 0) & np.isnan(self.value[:, j]))
            row = np.searchsorted(cum, base[g] + self.rank[g, j], side="right")
            off = base[g] + self.rank[g, j] - (cum[row] - count[row])
            c, a, b = count[row], vmin[row], vmax[row]
            known = (off == 0) | (off == c - 1) | (a == b)
            self.value[g[known], j] = np.where(off == c - 1, b, a)[known]
            g, off, c, a, b = g[~known], off[~known], c[~known], a[~known], b[~known]
            if sketch:  # 0 < off < c - 1 here, so c >= 3
                self.value[g, j] = a * (b / a) ** (off / (c - 1))
                self.err[g, j] = b / a - 1.0
            else:
                self.rank[g, j], self.m[g], self.lo[g], self.hi[g] = off, c, a, b

    def finish(self, values: pa.Table, active: np.ndarray) -> None:
        """Pick the unknown ranks from the collected values of the active genes."""
        gene = values["gene"].to_numpy().astype(np.int64)
        value = values["value"].to_numpy()
        order = np.lexsort((value, gene))
        got = np.bincount(gene, minlength=self.n.size)
        if not np.array_equal(got, np.where(active, self.m, 0)):
            raise RuntimeError(
                "medians: the cells changed between passes; make the input "
                "dataset deterministic (or materialize it) before medians"
            )
        start = np.cumsum(got) - got
        for j in (0, 1):
            g = np.flatnonzero(active & np.isnan(self.value[:, j]))
            self.value[g, j] = value[order[start[g] + self.rank[g, j]]]

    def medians(self) -> np.ndarray:
        """numpy's median: mean of the middle pair (one value twice when n is odd)."""
        return np.where(self.n > 0, (self.value[:, 0] + self.value[:, 1]) / 2.0, np.nan)


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
    <= 10**(7/bins) - 1. Collected values are bounded by ``max_values_per_gene`` per gene and
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
    state.update(
        runner.histogram(functools.partial(histogram_batch, n_genes=n_genes, edges=edges)),
        bins,
        sketch=method == "sketch",
    )
    logger.info(
        "medians pass 1: %d genes detected, %d need narrowing (%.1f s)",
        int((state.n > 0).sum()),
        int(state.pending().sum()),
        time.perf_counter() - t0,
    )
    for _ in range(_MAX_REFINE_PASSES):
        refine = _to_refine(state, max_values_per_gene, max_total_values)
        if not refine.any():
            break
        want = 2 ** np.ceil(np.log2(np.maximum(8 * state.m / max_values_per_gene, 1)))
        n_sub = np.where(refine, np.clip(want, *_SUB_BINS), 0).astype(np.int64)
        lo, hi = np.where(refine, state.lo, np.nan), np.where(refine, state.hi, np.nan)
        params = runner.put(
            (lo, hi, np.where(refine, (hi - lo) / np.maximum(n_sub, 1), 0.0), n_sub)
        )
        state.update(
            runner.histogram(functools.partial(refine_batch, n_genes=n_genes, params=params)),
            int(n_sub.max()),
            refine,
        )
        logger.info("medians pass %d: narrowed %d genes", runner.passes, int(refine.sum()))
    else:
        raise RuntimeError(
            f"medians: still narrowing after {_MAX_REFINE_PASSES} passes; raise max_values_per_gene"
        )
    active = state.pending()
    if active.any():
        params = runner.put(
            (np.where(active, state.lo, np.nan), np.where(active, state.hi, np.nan))
        )
        state.finish(
            runner.collect(functools.partial(collect_batch, n_genes=n_genes, params=params)), active
        )
        logger.info(
            "medians pass %d: collected %d values of %d genes",
            runner.passes,
            int(state.m[active].sum()),
            int(active.sum()),
        )
    bound = 0.0 if method == "exact" else max(10.0 ** (7.0 / bins) - 1.0, float(state.err.max()))
    logger.info("medians: %s, %d passes, %.1f s", method, runner.passes, time.perf_counter() - t0)
    return MedianResult(state.medians(), state.n, method, bound, runner.passes)


def _to_refine(state: _Narrowing, max_per_gene: int, max_total: int) -> np.ndarray:
    """Pending genes to narrow further: above max_per_gene values, or the largest ones while
    the values to collect exceed max_total; bool [n_genes]."""
    pending = state.pending()
    refine = pending & (state.m > max_per_gene)
    rest = np.flatnonzero(pending & ~refine)
    rest = rest[np.argsort(state.m[rest], kind="stable")]
    refine[rest[np.cumsum(state.m[rest]) > max_total]] = True
    return refine


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
    return pa.table(
        {
            "ensembl_id": ids,
            "median": pa.array(result.medians, pa.float64()),
            "n_cells_detected": pa.array(result.n_detected, pa.int64()),
            "method": pa.array([result.method] * n, pa.string()),
            "relative_error_bound": pa.array(np.full(n, result.relative_error_bound), pa.float64()),
        }
    )
