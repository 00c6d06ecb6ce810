"""Per-gene non-zero medians, in process (no Ray cluster): exact == np.median bitwise."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from cellfoundry.corpus import medians as M

N_GENES = 60


def make_cells(seed: int, n_cells: int = 1500, n_genes: int = N_GENES) -> pa.Table:
    """Random cells plus corner cases: gene 0 never detected, genes 1/2/3 in 1/2/3 cells,
    gene 4 mostly tied values, gene 5 values on decade edges, gene 6 outside [1e-3, 1e4]."""
    rng = np.random.default_rng(seed)
    cells: list[tuple[list[int], list[int], int]] = []
    for i in range(n_cells):
        genes = rng.choice(np.arange(7, n_genes), rng.integers(1, 40), replace=False)
        counts = np.maximum(1, rng.lognormal(0.3, 1.3, genes.size)).astype(int)
        n = int(counts.sum() + rng.integers(0, 3000))
        extra = {4: 1} if i % 3 else {}  # gene 4: 1 count in cells with n = 10,000
        if i % 3 == 0:
            extra[4] = 1 + i % 2
        if i % 5 == 0:
            extra[5] = int(rng.choice([1, 3, 7]))  # with n in 10**k * c: values 10**j
        if i < 3:  # gene 1 in cell 0, gene 2 in cells 0-1, gene 3 in cells 0-2
            extra.update({g: 2 + i + g for g in range(1 + i, 4)})
        if i % 11 == 0:
            extra[6] = int(rng.integers(1, 4))
        genes = np.concatenate([genes, list(extra)]).astype(np.int32)
        counts = np.concatenate([counts, list(extra.values())]).astype(np.int32)
        if i % 3 and 5 not in extra:
            n = 10_000
        elif 5 in extra:
            n = extra[5] * 10 ** int(rng.integers(1, 8))
        if i % 11 == 0:  # tiny values (n huge) or values > 1e4 (n below a count)
            n = int(rng.choice([2 * 10**9, 1]))
        order = np.argsort(genes)
        cells.append((genes[order].tolist(), counts[order].tolist(), n))
    gene_ids, counts, n_counts = zip(*cells, strict=True)
    return pa.table(
        {
            "gene_ids": pa.array(gene_ids, pa.list_(pa.int32())),
            "counts": pa.array(counts, pa.list_(pa.int32())),
            "n_counts": pa.array(n_counts, pa.int64()),
        }
    )


def reference(table: pa.Table, n_genes: int = N_GENES) -> tuple[np.ndarray, np.ndarray]:
    """np.median per gene of c / n * 10000.0 (NaN where absent), and detection counts."""
    genes = np.concatenate(table["gene_ids"].to_pylist())
    counts = np.concatenate(table["counts"].to_pylist()).astype(np.int32)
    n = np.repeat(table["n_counts"].to_numpy(), [len(g) for g in table["gene_ids"].to_pylist()])
    values = counts / n * 10000.0
    med = np.array(
        [np.median(values[genes == g]) if (genes == g).any() else np.nan for g in range(n_genes)]
    )
    return med, np.bincount(genes, minlength=n_genes)


@pytest.fixture(scope="module")
def cells() -> pa.Table:
    return make_cells(0)


def test_corner_cases_are_present(cells: pa.Table) -> None:
    _, n = reference(cells)
    assert n[0] == 0 and n[1] == 1 and n[2] == 2 and n[3] == 3
    genes = np.concatenate(cells["gene_ids"].to_pylist())
    counts = np.concatenate(cells["counts"].to_pylist())
    lens = [len(g) for g in cells["gene_ids"].to_pylist()]
    values = counts / np.repeat(cells["n_counts"].to_numpy(), lens) * 10000.0
    assert np.isin(values[genes == 5], M.bin_edges(7)).sum() > 50
    assert values.min() < 1e-3 and values.max() > 1e4 and (values == 1e4).any()


@pytest.mark.parametrize("bins", [2048, 7, 64])
@pytest.mark.parametrize("max_values", [200_000, 10, 1])
def test_exact_equals_numpy_median(cells: pa.Table, bins: int, max_values: int) -> None:
    expected, n = reference(cells)
    parts = [cells.slice(0, 700), cells.slice(700, 1), cells.slice(701)]
    result = M.compute_medians(
        parts, N_GENES, bins=bins, max_values_per_gene=max_values, batch_size=256
    )
    assert result.medians.tobytes() == expected.tobytes()  # bitwise, NaN where absent
    assert np.array_equal(result.n_detected, n) and result.n_detected.dtype == np.int64
    assert result.method == "exact" and result.relative_error_bound == 0.0
    # 1 histogram + 1 collection; narrowing adds one (its bins may resolve every gene)
    assert result.passes == 2 if max_values > 1000 else result.passes in (2, 3)


def test_narrow_then_collect(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(3)
    n_cells = 20_000  # one gene, distinct values packed into ~36 bins
    table = pa.table(
        {
            "gene_ids": pa.ListArray.from_arrays(
                np.arange(n_cells + 1, dtype=np.int32), pa.array(np.zeros(n_cells, np.int32))
            ),
            "counts": pa.ListArray.from_arrays(
                np.arange(n_cells + 1, dtype=np.int32),
                pa.array(rng.integers(1000, 1100, n_cells, dtype=np.int32)),
            ),
            "n_counts": rng.integers(10**6, 11 * 10**5, n_cells),
        }
    )
    expected, _ = reference(table, 1)
    with caplog.at_level("INFO", logger=M.__name__):
        result = M.compute_medians([table], 1, max_values_per_gene=100)
    assert "narrowed 1 genes" in caplog.text and "collected" in caplog.text
    assert result.passes == 3 and result.medians.tobytes() == expected.tobytes()


def test_total_cap_forces_narrowing(cells: pa.Table, caplog: pytest.LogCaptureFixture) -> None:
    expected, _ = reference(cells)
    with caplog.at_level("INFO", logger=M.__name__):
        result = M.compute_medians([cells], N_GENES, max_total_values=50)
    assert "narrowed" in caplog.text and result.medians.tobytes() == expected.tobytes()


@pytest.mark.parametrize("seed", [1, 2])
def test_sketch_within_bound(seed: int) -> None:
    table = make_cells(seed)
    expected, n = reference(table)
    result = M.compute_medians([table], N_GENES, method="sketch")
    assert result.passes == 1 and np.array_equal(result.n_detected, n)
    assert np.array_equal(np.isnan(result.medians), np.isnan(expected))
    assert result.relative_error_bound >= 10 ** (7 / 2048) - 1
    ok = ~np.isnan(expected)
    rel = np.abs(result.medians[ok] - expected[ok]) / expected[ok]
    assert (rel <= result.relative_error_bound * (1 + 1e-9)).all()


def test_log_bins_exact_at_edges() -> None:
    edges = M.bin_edges(2048)
    assert edges.size == 2048 + 26 and (np.diff(edges) > 0).all()
    inner = edges[1:-1]  # every positive value has a bin: [0, 1e-16) ... [1e14, inf)
    values = np.concatenate([
        inner, np.nextafter(inner, 0), np.nextafter(inner, np.inf),
        [5e-324, 1e-20, 5e-16, 1e-9, 5e-4, 2e4, 1e9, 5e13, 5e14, 1e300],
        np.random.default_rng(0).lognormal(0, 4, 20_000),
    ])  # fmt: skip
    expected = np.searchsorted(edges, values, side="right") - 1
    assert np.array_equal(M.log_bins(values, edges), expected)


def test_sub_bins_match_definition() -> None:
    rng = np.random.default_rng(0)
    lo, hi, n_sub = 0.37, 0.37 * 1.003, 64
    step = (hi - lo) / n_sub
    edges = lo + np.arange(n_sub) * step
    values = np.concatenate([edges, np.nextafter(edges, 0)[1:], [hi], rng.uniform(lo, hi, 999)])
    got = M.sub_bins(
        values, np.full(values.size, lo), np.full(values.size, step), np.full(values.size, n_sub)
    )
    assert np.array_equal(got, np.searchsorted(edges, values, side="right") - 1)


def test_reduce_by_key_merges() -> None:
    t = M.reduce_by_key(
        np.array([5, 1, 5, 5]),
        np.array([1, 2, 3, 4]),
        np.array([0.5, 1.0, 0.2, 0.9]),
        np.array([0.6, 1.5, 0.3, 2.0]),
    )
    assert t.to_pydict() == {"key": [1, 5], "count": [2, 8], "vmin": [1.0, 0.2], "vmax": [1.5, 2.0]}
    assert M.reduce_by_key(*[np.zeros(0)] * 4).num_rows == 0


def test_no_cells_gives_nan() -> None:
    result = M.compute_medians([], 4)
    assert np.isnan(result.medians).all() and not result.n_detected.any()
    assert result.passes == 1


@pytest.mark.parametrize(
    ("column", "value", "match"),
    [
        ("gene_ids", [[0, 9]], "outside"),
        ("counts", [[1, 0]], "> 0"),
        ("counts", [[1]], "parallel"),
        ("n_counts", [0], "> 0"),
    ],
)
def test_bad_cells_raise(column: str, value: list, match: str) -> None:
    data = {"gene_ids": [[0, 1]], "counts": [[1, 2]], "n_counts": [10]}
    data[column] = value
    with pytest.raises(ValueError, match=match):
        M.compute_medians([pa.table(data)], 4)


def test_bad_arguments_raise(cells: pa.Table) -> None:
    with pytest.raises(ValueError, match="method"):
        M.compute_medians([cells], N_GENES, method="mean")
    with pytest.raises(ValueError, match="bins"):
        M.compute_medians([cells], N_GENES, bins=1)


def test_medians_to_table(cells: pa.Table) -> None:
    result = M.compute_medians([cells], N_GENES, method="sketch")
    ids = [f"ENSG{i:011d}" for i in range(N_GENES)]
    table = M.medians_to_table(result, ids)
    assert table.schema.names == [
        "ensembl_id",
        "median",
        "n_cells_detected",
        "method",
        "relative_error_bound",
    ]
    assert [str(t) for t in table.schema.types] == ["string", "double", "int64", "string", "double"]
    assert table["method"][0].as_py() == "sketch" and table["ensembl_id"][3].as_py() == ids[3]
    with pytest.raises(ValueError, match="ensembl_ids"):
        M.medians_to_table(result, ids[:-1])


def test_outer_bins() -> None:
    """Medians far outside [1e-3, 1e4] (a decade bin, and the unbounded top bin) stay exact;
    the sketch's bound widens to the outer bin it used."""
    rng = np.random.default_rng(5)
    n = 400  # gene 0: values ~5e-5 (n ~ 1e9); gene 1: ~1e16 (int64 counts ~1e12, n = 1)
    c0, c1 = rng.integers(1, 9, n), rng.integers(10**11, 10**13, n)
    n0 = np.where(np.arange(n) % 2, 10**9, 10**9 + 7)
    table = pa.table({
        "gene_ids": pa.array([[0]] * n + [[1]] * n, pa.list_(pa.int32())),
        "counts": pa.array([[c] for c in np.r_[c0, c1].tolist()], pa.list_(pa.int64())),
        "n_counts": np.r_[n0, np.ones(n, np.int64)],
    })  # fmt: skip
    expected = np.array([np.median(c0 / n0 * 10000.0), np.median(c1 / 1 * 10000.0)])
    assert expected[0] < 1e-4 and expected[1] > 1e14
    for max_values in (200_000, 3):
        result = M.compute_medians([table], 2, max_values_per_gene=max_values)
        assert result.medians.tobytes() == expected.tobytes()
    sketch = M.compute_medians([table.slice(0, n)], 2, method="sketch")
    assert 1 < sketch.relative_error_bound < 10  # a decade bin
    assert abs(sketch.medians[0] / expected[0] - 1) <= sketch.relative_error_bound
    assert M.compute_medians([table], 2, method="sketch").relative_error_bound > 1e100


def test_plan_ranges_within_budget() -> None:
    from cellfoundry.corpus.median_reduce import plan_ranges

    slots = np.array([0, 3, 3, 0, 0, 10, 1, 1, 0, 2])
    assert plan_ranges(slots, "hist", 6 * 8) == [(1, 5), (5, 6), (6, 10)]  # gene 5 alone
    assert plan_ranges(slots, "collect", 10**9) == [(1, 10)]
    assert plan_ranges(np.zeros(4, np.int64), "narrow", 100) == []
    for budget in (1, 30, 200):
        ranges = plan_ranges(slots, "narrow", budget)
        covered = np.zeros(slots.size, bool)
        for g0, g1 in ranges:
            covered[g0:g1] = True
            assert g1 - g0 == 1 or slots[g0:g1].sum() * 24 <= budget
        assert covered[slots > 0].all()


def test_reducer_memory_bounded_by_budget_not_by_cells(cells: pa.Table) -> None:
    """Reducers never hold more than reducer_bytes, at 1x and 8x the cells, and the
    histogram reducers' state is the same at both sizes; medians stay bitwise exact."""
    budget = 120_000  # > one gene's slots in every pass: 2,073 bins x 8 B, 4,096 x 24 B
    runs = {}
    for copies in (1, 8):
        table = pa.concat_tables([cells] * copies)
        expected, _ = reference(table)
        result = M.compute_medians(
            [table], N_GENES, max_values_per_gene=50, batch_size=500, reducer_bytes=budget
        )
        assert result.medians.tobytes() == expected.tobytes()
        assert result.reducers >= 8 and 0 < result.reducer_peak_bytes <= budget
        runs[copies] = result
    one = M.compute_medians([cells], N_GENES, max_values_per_gene=50, batch_size=500)
    assert one.reducers == 1 and one.reducer_peak_bytes > budget  # the default: one range
    assert one.medians.tobytes() == runs[1].medians.tobytes()


def test_range_reducer_skips_empty_blocks_and_other_genes() -> None:
    from cellfoundry.corpus.median_reduce import RangeReducer

    r = RangeReducer("hist", 2, 4, 3, np.full(2, 3), {"edges": np.arange(4.0), "sketch": False})
    assert r.add(pa.table({"gene_ids": pa.array([], pa.list_(pa.int32()))})) == 0  # no map
    keys = pa.array(np.array([0, 6, 6, 11, 12], np.int64))  # genes 0, 2, 2, 3, 4
    assert r.add(pa.table({"key": keys, "count": pa.array([5, 1, 2, 4, 9])})) == 3
    assert r.count.tolist() == [3, 0, 0, 0, 0, 4] and r.peak == 6 * 8


def test_table_files_are_reread_on_every_pass(cells: pa.Table, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The one-task path of small corpora: Parquet files read one at a time on each pass,
    a filter applied to each, give the medians of the filtered cells bitwise."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    marked = cells.append_column("qc", pa.array(["passed", "filtered"] * (cells.num_rows // 2)))
    paths = []
    for i, (a, b) in enumerate([(0, 700), (700, 701), (701, cells.num_rows)]):
        paths.append(str(tmp_path / f"part-{i}.parquet"))
        pq.write_table(marked.slice(a, b - a), paths[-1])
    columns = ["gene_ids", "counts", "n_counts"]
    files = M.TableFiles(
        paths,
        None,
        [*columns, "qc"],
        lambda t: t.filter(pc.equal(t["qc"], "passed")).select(columns),
    )
    expected, n = reference(cells.filter(pc.equal(marked["qc"], "passed")))
    result = M.compute_medians(files, N_GENES, max_values_per_gene=10, batch_size=256)
    assert result.passes >= 2  # so the files were read more than once
    assert result.medians.tobytes() == expected.tobytes() and np.array_equal(result.n_detected, n)
