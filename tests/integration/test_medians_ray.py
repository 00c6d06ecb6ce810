"""Per-gene non-zero medians on a real local Ray cluster: exact == np.median bitwise."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from cellfoundry.corpus.medians import compute_medians

ray = pytest.importorskip("ray")

N_GENES = 40


def make_tables(seed: int, n_tables: int = 4, n_cells: int = 100) -> list[pa.Table]:
    """Synthetic cells (a few hundred), several tables; genes 1 and 2 in 1 and 2 cells,
    gene 3 mostly ties, gene 0 never detected."""
    rng = np.random.default_rng(seed)
    tables = []
    for t in range(n_tables):
        gene_ids, counts, n_counts = [], [], []
        for i in range(n_cells):
            genes = np.sort(rng.choice(np.arange(4, N_GENES), rng.integers(1, 25), replace=False))
            c = np.maximum(1, rng.lognormal(0.5, 1.2, genes.size)).astype(np.int32)
            n = int(c.sum() + rng.integers(0, 4000))
            if i % 2:  # gene 3: one count in cells of 10,000: tied values
                genes, c, n = np.r_[3, genes], np.r_[1, c], 10_000
            if t == 0 and i < 2:
                genes, c = np.r_[2, genes], np.r_[1 + i, c]
                if i == 0:
                    genes, c = np.r_[1, genes], np.r_[7, c]
            gene_ids.append(genes.astype(np.int32))
            counts.append(c.astype(np.int32))
            n_counts.append(n)
        tables.append(
            pa.table(
                {
                    "gene_ids": pa.array(gene_ids, pa.list_(pa.int32())),
                    "counts": pa.array(counts, pa.list_(pa.int32())),
                    "n_counts": pa.array(n_counts, pa.int64()),
                }
            )
        )
    return tables


def reference(tables: list[pa.Table]) -> tuple[np.ndarray, np.ndarray]:
    """np.median per gene of c / n * 10000.0 (NaN where absent), and detection counts."""
    table = pa.concat_tables(tables)
    lists = table["gene_ids"].to_pylist()
    genes = np.concatenate(lists)
    values = (
        np.concatenate(table["counts"].to_pylist()).astype(np.int32)
        / np.repeat(table["n_counts"].to_numpy(), [len(g) for g in lists])
        * 10000.0
    )
    med = np.array(
        [np.median(values[genes == g]) if (genes == g).any() else np.nan for g in range(N_GENES)]
    )
    return med, np.bincount(genes, minlength=N_GENES)


@pytest.fixture(scope="module")
def tables() -> list[pa.Table]:
    return make_tables(0)


def test_exact_on_ray(ray_local: None, tables: list[pa.Table]) -> None:
    expected, n = reference(tables)
    result = compute_medians(ray.data.from_arrow(tables), N_GENES, batch_size=64)
    assert result.medians.tobytes() == expected.tobytes()
    assert np.array_equal(result.n_detected, n) and n[0] == 0 and n[1] == 1 and n[2] == 2
    assert result.passes == 2 and result.method == "exact"
    # same answer and passes in process
    local = compute_medians(tables, N_GENES, batch_size=64)
    assert local.medians.tobytes() == expected.tobytes() and local.passes == 2


def test_exact_with_narrowing_on_ray(ray_local: None, tables: list[pa.Table]) -> None:
    expected, _ = reference(tables)
    ds = ray.data.from_arrow([t.slice(i, 30) for t in tables for i in range(0, t.num_rows, 30)])
    # 16 coarse bins and <= 10 values per gene: histogram, narrowing, collection
    result = compute_medians(ds, N_GENES, bins=16, max_values_per_gene=10, batch_size=50)
    assert result.medians.tobytes() == expected.tobytes()
    assert result.passes == 3


def test_sketch_on_ray(ray_local: None, tables: list[pa.Table]) -> None:
    expected, n = reference(tables)
    result = compute_medians(ray.data.from_arrow(tables), N_GENES, method="sketch", bins=512)
    assert result.passes == 1 and np.array_equal(result.n_detected, n)
    assert result.relative_error_bound == pytest.approx(10 ** (7 / 512) - 1)
    ok = n > 0
    rel = np.abs(result.medians[ok] - expected[ok]) / expected[ok]
    assert (rel <= result.relative_error_bound * (1 + 1e-9)).all()
    assert np.isnan(result.medians[~ok]).all()


def test_from_items_blocks_on_ray(ray_local: None, tables: list[pa.Table]) -> None:
    items = pa.concat_tables(tables).to_pylist()  # list<int64> columns, 5 blocks
    expected, _ = reference(tables)
    result = compute_medians(ray.data.from_items(items, override_num_blocks=5), N_GENES)
    assert result.medians.tobytes() == expected.tobytes() and result.passes == 2


def test_gene_range_reducers_on_ray(ray_local: None, tables: list[pa.Table]) -> None:
    """A budget of ~5 genes' histogram slots: 8 reducer actors per pass, the same exact
    medians, and no reducer ever held more than the budget."""
    expected, _ = reference(tables)
    budget = 5 * 2073 * 8  # 2,048 log bins + 25 outer bins, 8 bytes each, per gene
    result = compute_medians(
        ray.data.from_arrow(tables), N_GENES, batch_size=64, reducer_bytes=budget
    )
    assert result.medians.tobytes() == expected.tobytes()
    assert result.reducers == 8 and result.reducer_peak_bytes <= budget
