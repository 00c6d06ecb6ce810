"""Corpus-wide per-gene non-zero medians of count / n_counts * 10,000 (the ``medians`` artifact).

Pass 1 builds sparse per-gene log histograms (key = gene * n_bins + bin, a count per key) with
``map_batches``. ``sketch`` interpolates inside the bin holding each median rank. ``exact``
narrows every gene to the bin(s) holding its median rank(s), then, while more than
``max_values_per_gene`` values are left, to finer sub-bins (these passes also keep each
sub-bin's min and max: a rank that is first or last in its sub-bin, or in one whose min equals
its max, is known at once); a last pass collects the values left and picks the order
statistics. Bins are value intervals fixed by exact comparisons with edges computed once on the
driver (a logarithm only guesses), so every worker bins alike; catch-all outer bins give every
positive value a bin (nothing is clamped), and the collection tests values, not bins.

Memory does not grow with the cells: each pass's partials stream, as the map emits them, to
one reducer per contiguous gene range (``median_reduce``), sized so that its state (a slot per
gene and bin, or the values it collects) stays within ``reducer_bytes``; a reducer finishes its
own genes, and the driver keeps only per-gene state. The NumPy/Arrow pieces live in
``median_bins``; this module runs the passes (public API).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from cellfoundry.corpus.median_bins import (
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
from cellfoundry.corpus.median_reduce import (
    RangeReducer,
    plan_ranges,
    reduce_locally,
    reduce_on_ray,
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
    reducers: int = 0  # most gene-range reducers in one pass
    reducer_peak_bytes: int = 0  # most bytes of state any one reducer held


# ------------------------------------------------------------------------ passes (runners)
class _RayPasses:
    """Runs a batch function over a Ray Dataset and streams its partials to range reducers."""

    def __init__(self, cells: ray.data.Dataset, batch_size: int) -> None:
        schema = cells.schema(fetch_if_missing=False)
        if schema is not None and set(CELL_COLUMNS) - set(schema.names):
            raise ValueError(
                f"cells: columns {schema.names} lack some of {CELL_COLUMNS}; "
                "pass the `cells` artifact rows"
            )
        self.cells, self.batch_size, self.passes = cells.select_columns(CELL_COLUMNS), batch_size, 0
        self.pool: list[Any] = []  # reducer actors, reused from pass to pass

    def put(self, params: Any) -> Any:
        return ray.put(params)

    def reduce(self, fn: _BatchFn, specs: list[tuple[Any, ...]], state: _Narrowing) -> int:
        """One pass: ``fn`` on every batch, its partials reduced into ``state``; peak bytes."""
        self.passes += 1
        partials = self.cells.map_batches(fn, batch_format="pyarrow", batch_size=self.batch_size)
        return reduce_on_ray(partials, specs, state, self.pool)

    def close(self) -> None:
        for actor in self.pool:
            ray.kill(actor)
        self.pool = []


class TableFiles:
    """Tables read from Parquet files one at a time, again on every pass (so a pass in one
    process holds one file, not the corpus); ``transform`` (e.g. keep the passed cells) is
    applied to each file's table."""

    def __init__(
        self, paths: list[str], filesystem: Any, columns: list[str],
        transform: Callable[[pa.Table], pa.Table] | None = None,
    ) -> None:  # fmt: skip
        self.paths, self.filesystem, self.columns, self.transform = (
            paths,
            filesystem,
            columns,
            transform,
        )

    def __iter__(self) -> Iterator[pa.Table]:
        import pyarrow.parquet as pq

        for path in self.paths:
            table = pq.read_table(path, columns=self.columns, filesystem=self.filesystem)
            yield self.transform(table) if self.transform else table


class _LocalPasses:
    """The same passes in this process, over Arrow tables (small inputs and tests)."""

    def __init__(self, tables: Iterable[pa.Table], batch_size: int) -> None:
        # TableFiles re-reads its files on each pass; anything else is held as given
        self.tables = tables if isinstance(tables, TableFiles) else list(tables)
        self.batch_size, self.passes = batch_size, 0

    def put(self, params: Any) -> Any:
        return params

    def reduce(self, fn: _BatchFn, specs: list[tuple[Any, ...]], state: _Narrowing) -> int:
        self.passes += 1
        size = self.batch_size
        parts = (fn(t.slice(i, size)) for t in self.tables for i in range(0, t.num_rows, size))
        return reduce_locally(parts, [RangeReducer(*s) for s in specs], state)

    def close(self) -> None:
        pass


_BatchFn = Callable[[pa.Table], pa.Table]


def _specs(
    kind: str, slots: np.ndarray, width: int, budget: int, **spec: Any
) -> list[tuple[Any, ...]]:
    """RangeReducer arguments per planned gene range; bool [n_genes] ``spec`` values are cut
    to the range."""
    return [
        (kind, g0, g1, width, slots[g0:g1], {k: v[g0:g1] if k == "active" else v
                                             for k, v in spec.items()})
        for g0, g1 in plan_ranges(slots, kind, budget)
    ]  # fmt: skip


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
    reducer_bytes: int = 256 * 2**20,
) -> MedianResult:
    """Per-gene median of counts / n_counts * 10,000 over the cells where the gene is non-zero.

    ``cells``: a Ray Dataset with ``gene_ids`` (list<int32> in [0, n_genes)), ``counts``
    (list<int32>, > 0) and ``n_counts`` (int64), or Arrow tables (or :class:`TableFiles`)
    to run in this process.
    ``exact`` equals ``np.median`` bitwise (usually 2 passes); ``sketch`` takes 1 pass, error
    <= 10**(7/bins) - 1 (medians outside [1e-3, 1e4] fall in wider outer bins; the bound then
    says so). Collected values are bounded by ``max_values_per_gene`` per gene and
    ``max_total_values`` in all; genes above either are narrowed by another pass first. Each
    pass re-reads ``cells``: materialize it first when that is cheaper than recomputing it.
    ``reducer_bytes``: the state one gene-range reducer may hold (a histogram's slots, 8 bytes
    per gene and bin in pass 1, or the values it collects, 32 bytes each); the genes are cut
    into as many ranges as that takes (a gene above it gets a range alone). Worker and driver
    memory does not depend on the number of cells.
    """
    if method not in ("exact", "sketch"):
        raise ValueError(f"compute_medians: method={method!r}; use 'exact' or 'sketch'")
    for name, v, least in (
        ("n_genes", n_genes, 1),
        ("bins", bins, 2),
        ("batch_size", batch_size, 1),
        ("max_values_per_gene", max_values_per_gene, 1),
        ("max_total_values", max_total_values, 1),
        ("reducer_bytes", reducer_bytes, 1),
    ):
        if v < least:
            raise ValueError(f"compute_medians: {name}={v}; it must be >= {least}")
    runner = (
        _RayPasses(cells, batch_size)
        if isinstance(cells, ray.data.Dataset)
        else _LocalPasses(cells, batch_size)
    )
    try:
        state, stats = _run_passes(
            runner, n_genes, method, bins, max_values_per_gene, max_total_values, reducer_bytes
        )
    finally:
        runner.close()
    bound = 0.0 if method == "exact" else max(10.0 ** (7.0 / bins) - 1.0, float(state.err.max()))
    return MedianResult(state.medians(), state.n, method, bound, runner.passes, *stats)


def _run_passes(
    runner: _RayPasses | _LocalPasses, n_genes: int, method: str, bins: int,
    max_per_gene: int, max_total: int, budget: int,
) -> tuple[_Narrowing, tuple[int, int]]:  # fmt: skip
    """The histogram pass, narrowing passes, then the collection; the final state and
    (most reducers in one pass, most bytes one reducer held)."""
    state, edges, t0 = _Narrowing(n_genes), bin_edges(bins), time.perf_counter()
    n_bins = edges.size - 1
    specs = _specs("hist", np.full(n_genes, n_bins), n_bins, budget, edges=edges,
                   sketch=method == "sketch")  # fmt: skip
    fn = functools.partial(histogram_batch, n_genes=n_genes, edges=edges)
    peak, reducers = runner.reduce(fn, specs, state), len(specs)
    logger.info(
        "medians pass 1: %d genes detected, %d reducers, <= %.0f MB each (%.1f s)",
        int((state.n > 0).sum()), len(specs), peak / 2**20, time.perf_counter() - t0,
    )  # fmt: skip
    for _ in range(_MAX_NARROWING_PASSES):
        narrow = _to_narrow(state, max_per_gene, max_total)
        if not narrow.any():
            break
        params, specs = _narrowing_specs(state, narrow, max_per_gene, budget)
        fn = functools.partial(narrow_batch, n_genes=n_genes, params=runner.put(params))
        peak, reducers = max(peak, runner.reduce(fn, specs, state)), max(reducers, len(specs))
        logger.info("medians pass %d: narrowed %d genes", runner.passes, int(narrow.sum()))
    else:
        raise RuntimeError(f"medians: still narrowing after {_MAX_NARROWING_PASSES} passes")
    active = state.pending()
    if active.any():
        params = runner.put(
            (np.where(active, state.lo, np.nan), np.where(active, state.hi, np.nan))
        )
        fn = functools.partial(collect_batch, n_genes=n_genes, params=params)
        specs = _specs("collect", np.where(active, state.m, 0), 0, budget, active=active)
        peak, reducers = max(peak, runner.reduce(fn, specs, state)), max(reducers, len(specs))
        logger.info(
            "medians pass %d: collected %d values of %d genes in %d reducers",
            runner.passes, int(state.m[active].sum()), int(active.sum()), len(specs),
        )  # fmt: skip
    logger.info("medians: %s, %d passes, %.1f s", method, runner.passes, time.perf_counter() - t0)
    return state, (reducers, peak)


def _to_narrow(state: _Narrowing, max_per_gene: int, max_total: int) -> np.ndarray:
    """Pending genes to narrow further: above max_per_gene values, or the largest ones while
    the values to collect exceed max_total; bool [n_genes]."""
    pending = state.pending()
    narrow = pending & (state.m > max_per_gene)
    rest = np.flatnonzero(pending & ~narrow)
    rest = rest[np.argsort(state.m[rest], kind="stable")]
    narrow[rest[np.cumsum(state.m[rest]) > max_total]] = True
    return narrow


def _narrowing_specs(
    state: _Narrowing, narrow: np.ndarray, max_per_gene: int, budget: int
) -> tuple[tuple[np.ndarray, ...], list[tuple[Any, ...]]]:
    """A pass of n_sub linear sub-bins (64..4096, ~max_per_gene / 8 values each) over each
    narrowed gene's interval; 1 bin (just its min and max) for the unbounded outer bins.
    Returns the map's (lo, hi, step, n_sub) [n_genes] and the reducer specs."""
    lo, hi = np.where(narrow, state.lo, np.nan), np.where(narrow, state.hi, np.nan)
    want = np.clip(2 ** np.ceil(np.log2(np.maximum(8 * state.m / max_per_gene, 1))), *_SUB_BINS)
    n_sub = np.where(narrow, np.where((lo > 0) & (hi < 1e300), want, 1), 0).astype(np.int64)
    step = np.where(narrow, (hi - lo) / np.maximum(n_sub, 1), 0.0)
    return (lo, hi, step, n_sub), _specs("narrow", n_sub, int(n_sub.max()), budget, active=narrow)


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
