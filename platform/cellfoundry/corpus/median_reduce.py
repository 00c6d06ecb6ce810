"""Reducing one medians pass's partial tables per gene range, in memory bounded by a budget.

The genes are cut into contiguous ranges whose reducer state fits ``budget`` bytes
(:func:`plan_ranges`); a :class:`RangeReducer` per range keeps a dense slot per (gene, bin)
of its genes, or the collected values of its genes, and finishes its genes' narrowing state.
Nothing it holds depends on the number of cells: a histogram reducer's size is fixed by its
genes x bins, a collection's by the counts the previous pass measured (and checked on
arrival). On Ray each range is an actor fed with the map's output blocks as they stream
out (:func:`reduce_on_ray`); the driver only passes references and per-gene state.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from cellfoundry.corpus.median_bins import _CHANGED, _Narrowing

logger = logging.getLogger(__name__)

#: bytes a reducer holds per slot: a count (histogram); count, min and max (narrowing); a
#: gene id and a value plus the sort's copies and order (collection)
SLOT_BYTES = {"hist": 8, "narrow": 24, "collect": 32}
_INFLIGHT_PER_REDUCER = 2  # blocks queued per reducer before the driver waits
_ADD_ROWS = 1 << 20  # partial rows merged at a time (~40 MB of temporaries)


def plan_ranges(slots: np.ndarray, kind: str, budget: int) -> list[tuple[int, int]]:
    """Contiguous gene ranges [g0, g1) holding every gene with slots > 0, each within
    ``budget`` bytes (a single gene above it gets a range of its own)."""
    cost = slots.astype(np.int64) * SLOT_BYTES[kind]
    cum = np.concatenate([[0], np.cumsum(cost)])
    used = np.flatnonzero(cost > 0)
    ranges, g0 = [], 0
    while True:
        i = np.searchsorted(used, g0)
        if i == used.size:
            return ranges
        g0 = int(used[i])
        g1 = int(np.searchsorted(cum, cum[g0] + budget, side="right")) - 1
        g1 = max(min(g1, slots.size), g0 + 1)
        ranges.append((g0, g1))
        g0 = g1


class RangeReducer:
    """One pass's partials merged over the genes [g0, g1); see :func:`plan_ranges`.

    ``kind``: ``hist`` (key, count), ``narrow`` (key, count, vmin, vmax), key = gene * width +
    bin, or ``collect`` (gene, value). ``slots`` [g1 - g0]: bins of each gene (collect: the
    values to expect). ``spec``: ``edges`` and ``sketch`` (hist); ``active`` bool [g1 - g0]
    (narrow, collect).
    """

    def __init__(
        self, kind: str, g0: int, g1: int, width: int, slots: np.ndarray, spec: dict[str, Any]
    ) -> None:
        if kind not in SLOT_BYTES:
            raise ValueError(f"RangeReducer: kind={kind!r}; use one of {sorted(SLOT_BYTES)}")
        self.kind, self.g0, self.g1, self.width, self.spec = kind, g0, g1, width, spec
        self.offsets = np.concatenate([[0], np.cumsum(slots.astype(np.int64))])
        size = int(self.offsets[-1])
        self.held = 0  # collect: values received
        self.count = np.zeros(size if kind != "collect" else 0, np.int64)
        if kind == "narrow":
            self.vmin, self.vmax = np.full(size, np.inf), np.full(size, -np.inf)
        self.genes: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.peak = self.nbytes()

    def nbytes(self) -> int:
        """Bytes of state held now (arrays allocated; collect: the values received)."""
        if self.kind == "collect":
            return self.held * SLOT_BYTES["collect"]
        return self.count.nbytes * SLOT_BYTES[self.kind] // 8

    def add(self, table: pa.Table) -> int:
        """Merge one partial table (rows of other genes are skipped); rows taken. Works
        through it in slices of _ADD_ROWS, so the temporaries stay small whatever the
        block size."""
        n = table.num_rows  # Ray Data may pass an empty block on without the map
        return sum(self._add(table.slice(i, _ADD_ROWS)) for i in range(0, n, _ADD_ROWS))

    def _add(self, table: pa.Table) -> int:
        if self.kind == "collect":
            gene = table["gene"].to_numpy()
            keep = (gene >= self.g0) & (gene < self.g1)
            self.genes.append(gene[keep].astype(np.int64) - self.g0)
            self.values.append(table["value"].to_numpy()[keep])
            self.held += int(keep.sum())
            if self.held > self.offsets[-1]:
                raise RuntimeError(_CHANGED)
            self.peak = max(self.peak, self.nbytes())
            return int(keep.sum())
        key = table["key"].to_numpy().astype(np.int64)
        keep = (key >= self.g0 * self.width) & (key < self.g1 * self.width)
        gene, j = np.divmod(key[keep], self.width)
        idx = self.offsets[gene - self.g0] + j
        np.add.at(self.count, idx, table["count"].to_numpy()[keep])
        if self.kind == "narrow":
            np.minimum.at(self.vmin, idx, table["vmin"].to_numpy()[keep])
            np.maximum.at(self.vmax, idx, table["vmax"].to_numpy()[keep])
        return int(keep.sum())

    def finish(self, state: _Narrowing) -> _Narrowing:
        """``state`` of the genes [g0, g1) (gene 0 = g0), updated with what was merged."""
        if self.kind == "collect":
            gene = np.concatenate([np.zeros(0, np.int64), *self.genes])
            value = np.concatenate([np.zeros(0), *self.values])
            self.genes, self.values = [], []
            state.finish(gene, value, self.spec["active"])
            return state
        idx = np.flatnonzero(self.count)
        gene = np.searchsorted(self.offsets, idx, side="right") - 1
        count = self.count[idx]
        if self.kind == "hist":
            edges, b = self.spec["edges"], idx - self.offsets[gene]
            lo, hi = edges[b], np.nextafter(edges[b + 1], 0.0)  # bin b as a closed interval
            state.update(gene, count, lo, hi, attained=False, sketch=self.spec["sketch"])
        else:
            lo, hi = self.vmin[idx], self.vmax[idx]
            state.update(gene, count, lo, hi, self.spec["active"], attained=True)
        return state


def reduce_locally(tables: list[pa.Table], reducers: list[RangeReducer], state: _Narrowing) -> int:
    """Feed ``tables`` to every reducer in this process and finish them into ``state``;
    returns the most bytes any reducer held."""
    for t in tables:
        for r in reducers:
            r.add(t)
    for r in reducers:
        state.put(r.g0, r.finish(state.take(r.g0, r.g1)))
    return max((r.peak for r in reducers), default=0)


def _block_refs(bundle: Any) -> Iterator[tuple[Any, int | None, int | None]]:
    """(block ref, start, stop) of a Ray Data RefBundle (a slice, or the whole block)."""
    slices = getattr(bundle, "slices", None) or [None] * len(bundle.blocks)
    for entry, sl in zip(bundle.blocks, slices, strict=True):
        ref = entry.ref if hasattr(entry, "ref") else entry[0]
        yield ref, *((None, None) if sl is None else (sl.start_offset, sl.end_offset))


class ReducerActor:
    """A :class:`RangeReducer` in a Ray actor, reused from pass to pass."""

    def start(self, *args: Any) -> None:
        self.reducer = RangeReducer(*args)

    def add(self, block: pa.Table, start: int | None, stop: int | None) -> int:
        if start is not None:
            block = block.slice(start, stop - start)
        return self.reducer.add(block)

    def finish(self, state: _Narrowing) -> tuple[_Narrowing, int]:
        out = self.reducer.finish(state.take(0, state.n.size))  # writable (Ray's are not)
        peak = self.reducer.peak
        del self.reducer
        return out, peak


def reduce_on_ray(
    partials: Any, specs: list[tuple[Any, ...]], state: _Narrowing, pool: list[Any]
) -> int:
    """Stream the blocks of the Ray Dataset ``partials`` to one reducer actor per spec
    (RangeReducer arguments; actors of ``pool`` are reused, new ones appended to it) and
    finish them into ``state``; returns the most bytes any reducer held.

    At most a few blocks per reducer are in flight: the driver waits, and Ray Data's
    backpressure stops the map, until the reducers catch up."""
    import ray

    actor_cls = ray.remote(num_cpus=0, max_restarts=0, scheduling_strategy="SPREAD")(ReducerActor)
    while len(pool) < len(specs):
        pool.append(actor_cls.remote())
    actors = pool[: len(specs)]
    ray.get([a.start.remote(*s) for a, s in zip(actors, specs, strict=True)])
    limit, inflight = _INFLIGHT_PER_REDUCER * len(actors), []
    for bundle in partials.iter_internal_ref_bundles():
        for ref, start, stop in _block_refs(bundle):
            inflight += [a.add.remote(ref, start, stop) for a in actors]
        if len(inflight) > limit:
            done, inflight = ray.wait(inflight, num_returns=len(inflight) - limit)
            ray.get(done)  # raises a reducer's error at once
    ray.get(inflight)
    finished = ray.get(
        [a.finish.remote(state.take(s[1], s[2])) for a, s in zip(actors, specs, strict=True)]
    )
    for s, (sub, _) in zip(specs, finished, strict=True):
        state.put(s[1], sub)
    return max(peak for _, peak in finished)
