"""Per-cell QC outcomes and cross-dataset duplicate detection.

Each cell gets exactly one outcome, in this order of precedence: ``duplicate`` (a copy of an
earlier cell in catalog order, see :mod:`cellfoundry.corpus.dedup`), then
``low_protein_coding_genes``, ``total_counts_outlier``, ``mito_outlier``; else ``passed``.
Thresholds are per dataset: mean +/- n_sd sample standard deviations over all of its cells.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cellfoundry import storage
from cellfoundry.corpus.filemap import PerItem, resolve

PASSED = "passed"
DUPLICATE = "duplicate"
QC_REASONS = ("low_protein_coding_genes", "total_counts_outlier", "mito_outlier")


@dataclass(frozen=True)
class Thresholds:
    """A dataset's accepted ranges (inclusive)."""

    counts_low: float
    counts_high: float
    mito_low: float
    mito_high: float
    min_pc_genes: int

    @classmethod
    def from_moments(
        cls,
        counts: tuple[int, float, float],
        mito: tuple[int, float, float],
        n_sd: float,
        min_pc: int,
    ) -> Thresholds:
        (_, cm, cs), (_, mm, ms) = counts, mito
        return cls(cm - n_sd * cs, cm + n_sd * cs, mm - n_sd * ms, mm + n_sd * ms, min_pc)

    def to_dict(self) -> dict[str, float]:
        return self.__dict__.copy()


def assign_outcomes(
    batch: pa.Table, thresholds: dict[str, Thresholds], duplicate_orders: np.ndarray
) -> pa.Table:
    """``batch`` with the ``qc`` column added (``duplicate_orders``: sorted int64 orders)."""
    n = batch.num_rows
    outcome = np.full(n, PASSED, dtype=object)
    ds = batch["dataset_id"].to_numpy(zero_copy_only=False).astype(str)
    n_counts = batch["n_counts"].to_numpy().astype(np.float64)
    mito = batch["pct_mito"].to_numpy()
    n_pc = batch["n_pc_genes"].to_numpy()
    lo_c, hi_c, lo_m, hi_m, min_pc = (np.empty(n) for _ in range(5))
    for name in np.unique(ds):
        t = thresholds[name]
        sel = ds == name
        lo_c[sel], hi_c[sel], lo_m[sel], hi_m[sel] = (
            t.counts_low,
            t.counts_high,
            t.mito_low,
            t.mito_high,
        )
        min_pc[sel] = t.min_pc_genes
    # Later assignments win, so apply the reasons from lowest to highest precedence.
    outcome[(mito < lo_m) | (mito > hi_m)] = "mito_outlier"
    outcome[(n_counts < lo_c) | (n_counts > hi_c)] = "total_counts_outlier"
    outcome[n_pc < min_pc] = "low_protein_coding_genes"
    if len(duplicate_orders):
        outcome[np.isin(batch["order"].to_numpy(), duplicate_orders)] = DUPLICATE
    return batch.append_column("qc", pa.array(outcome, type=pa.string()))


class AssignQCFiles(PerItem):
    """Ray Data UDF: an ingested part in, the same cells with ``qc`` out (file per part).

    ``item["src"]`` and ``item["dst"]`` are paths within ``filesystem`` (the driver's
    pyarrow filesystem; None: local)."""

    def __init__(self, thresholds: Any, duplicate_orders: Any, filesystem: Any = None) -> None:
        self.thresholds: dict[str, Thresholds] = resolve(thresholds)
        self.duplicate_orders: np.ndarray = resolve(duplicate_orders)
        self.filesystem = resolve(filesystem)

    def process(self, item: dict[str, Any]) -> dict[str, Any]:
        cells = pq.read_table(item["src"], filesystem=self.filesystem)
        table = assign_outcomes(cells, self.thresholds, self.duplicate_orders)
        storage.write_parquet(table, str(item["dst"]), self.filesystem)
        outcomes, counts = np.unique(
            table["qc"].to_numpy(zero_copy_only=False).astype(str), return_counts=True
        )
        return {
            "dataset_id": item["dataset_id"],
            "outcomes": dict(zip(outcomes.tolist(), counts.tolist(), strict=True)),
        }


def is_passed(batch: pa.Table) -> pa.Table:
    """Keep only cells that passed QC."""
    return batch.filter(pc.equal(batch["qc"], PASSED))
