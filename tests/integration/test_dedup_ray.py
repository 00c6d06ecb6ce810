"""Duplicate cells on a real local Ray cluster: verification spread over partitions (one task
each) finds exactly the planted copies, the same as in one partition, and the QC step reads
per part only the duplicates it needs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cellfoundry.corpus import dedup
from cellfoundry.corpus.cells import GeneFlags, chunk_to_cells

pytest.importorskip("ray")

N_GENES = 300


def _cells(dataset: str, index: int, x: np.ndarray, col_map: np.ndarray):
    """Cells parts rows of a dense count matrix (cells x file genes)."""
    rows, cols = np.nonzero(x)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=x.shape[0]))])
    flags = GeneFlags(np.ones(N_GENES, bool), np.zeros(N_GENES, bool))
    return chunk_to_cells(
        dataset_id=dataset, dataset_index=index, start=0,
        barcodes=np.array([f"c{i}" for i in range(x.shape[0])]), indptr=indptr,
        indices=cols, data=x[rows, cols], col_map=col_map, n_corpus_genes=N_GENES,
        flags=flags, metadata={},
    )  # fmt: skip


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], dict, np.ndarray]:
    """Dataset a: 400 cells over all genes; b: copies of 150 of them over a 250-gene panel
    (a gene-filtered matrix) plus 100 new cells; c: 200 new cells. Returns the part files,
    the panels and the expected (order of the copy, order of its original) rows."""
    rng = np.random.default_rng(0)

    def counts(n: int) -> np.ndarray:  # 20 highly expressed genes (counts 5..44), the rest <= 3
        x = np.minimum(rng.poisson(rng.gamma(0.3, 2.0, (n, N_GENES))), 3)
        x[:, :20] += rng.integers(5, 42, (n, 20))
        return x

    a = counts(400)
    panel_b = np.sort(np.r_[np.arange(20), rng.choice(np.arange(20, N_GENES), 230, False)])
    copied = rng.choice(400, 150, replace=False)
    b = np.concatenate([a[copied][:, panel_b], counts(100)[:, panel_b]])
    c = counts(200)
    root = tmp_path_factory.mktemp("dedup_parts")
    files = []
    for i, (name, x, col_map) in enumerate(
        [("a", a, np.arange(N_GENES)), ("b", b, panel_b), ("c", c, np.arange(N_GENES))]
    ):
        table = _cells(name, i, x, col_map)
        for s in range(0, table.num_rows, 128):  # parts of 128 cells
            files.append(str(root / f"part-{i:05d}-{s:012d}.parquet"))
            pq.write_table(table.slice(s, 128), files[-1])
    panels = {n: np.isin(np.arange(N_GENES), p) for n, p in
              [("a", np.arange(N_GENES)), ("b", panel_b), ("c", np.arange(N_GENES))]}  # fmt: skip
    return files, panels, np.stack([2**40 + np.arange(150), copied], axis=1)


def _find(parts, tmp_path: Path, **kwargs) -> dedup.DuplicateIndex:
    files, panels, _ = parts
    return dedup.find_duplicates(
        files, panels, min_identity=0.99, num_partitions=2, out_dir=tmp_path, **kwargs
    )


def test_verification_spread_over_tasks_or_in_one_task(
    ray_local: None, parts, tmp_path: Path
) -> None:
    expected = parts[2]
    # Above single_task_max_cells, distributed: ~80 kB of candidates per partition (~260 kB
    # in all), each verified by its own task
    many = _find(parts, tmp_path / "many", partition_bytes=80_000, filter_bytes=64,
                 n_cells=11, single_task_max_cells=10)  # fmt: skip
    assert many.partitions >= 3 and many.verifiers >= 2
    # At most single_task_max_cells: the whole search in one task, the same duplicates
    one = _find(parts, tmp_path / "one", n_cells=10, single_task_max_cells=10)
    assert one.partitions == 1 and one.verifiers == 1
    for index in (one, many):
        got = index.read()
        assert index.n == 150 and index.candidate_groups >= 150
        assert np.array_equal(np.stack([got["order"], got["duplicate_of"]], axis=1), expected)
        # per part, only the duplicates in its order range
        assert np.array_equal(
            index.orders_between(2**40 + 10, 2**40 + 19), 2**40 + np.arange(10, 20)
        )
        assert index.orders_between(0, 2**40 - 1).size == 0
        assert len(index.files) >= 1 and all(
            a <= b for a, b in zip(index.lo, index.hi, strict=True)
        )


def test_bloom_filter_has_no_false_negatives() -> None:
    import pyarrow as pa

    keys = pa.array([f"{i:032x}" for i in range(5000)])
    bits = dedup.build_filter([pa.table({"dedup_key": keys[:1000]})], dedup._filter_bits(1000, 1))
    assert dedup.may_contain(bits, keys[:1000]).all()
    assert dedup.may_contain(bits, keys[1000:]).mean() < 0.05


def test_no_duplicates(ray_local: None, parts, tmp_path: Path) -> None:
    files, panels, _ = parts
    c_only = [f for f in files if "part-00002-" in f]
    for n_cells, out in ((None, tmp_path / "ray"), (50, tmp_path / "one")):  # both paths
        index = dedup.find_duplicates(
            c_only, panels, min_identity=0.99, num_partitions=1, out_dir=out,
            n_cells=n_cells, single_task_max_cells=50,
        )  # fmt: skip
        assert index.n == 0 and index.files == [] and index.orders_between(0, 2**62).size == 0
        assert not out.exists()  # nothing written
