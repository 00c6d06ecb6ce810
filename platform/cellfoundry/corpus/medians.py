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
The NumPy/Arrow pieces live in ``median_bins``; this module runs the passes (public API).
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
import ray
from ray.data.aggregate import Max, Min, Sum

from cellfoundry.corpus.median_bins import (
    _CELLS,
    _COUNTS,
    _HIST,
    _VALUES,
    CELL_COLUMNS,
    SCALE,
    _Narrowing,
    bin_edges,
    cell_values,
    collect_batch,
    histogram_batch,
    log_bins,
    narrow_batch,
    reduce_by_key,
    sub_bins,
)

# The public API; the per-batch pieces of ``median_bins`` stay importable from here too.
__all__ = [
    "CELL_COLUMNS",
    "SCALE",
    "MedianResult",
    "bin_edges",
    "cell_values",
    "collect_batch",
    "compute_medians",
    "histogram_batch",
    "log_bins",
    "medians_to_table",
    "narrow_batch",
    "reduce_by_key",
    "sub_bins",
]

logger = logging.getLogger(__name__)

_SUB_BINS = (64, 4096)  # sub-bins per gene in a narrowing pass (powers of two)
_MAX_NARROWING_PASSES = 64  # each shrinks an interval >= 64x; 0 or 1 are typical


@dataclass
class MedianResult:
    """Per-gene non-zero medians; arrays are indexed by corpus gene id."""

    medians: np.ndarray  # float64 [n_genes], NaN where never detected
    n_detected: np.ndarray  # int64 [n_genes], cells with the gene non-zero
    method: str  # "exact" or "sketch"
    relative_error_bound: float  # 0.0 for exact; sketch: max relative error of any median
    passes: int  # full passes made over the cells


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
