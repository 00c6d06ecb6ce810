"""Stage 1 end to end on the real PBMC data, on a local and on a 3-node Ray cluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cellfoundry import artifacts
from cellfoundry.config import CorpusConfig, parse_config
from cellfoundry.corpus.pipeline import CorpusResult, run_corpus
from cellfoundry.paths import REPO_ROOT

CATALOG = REPO_ROOT / "jobs" / "configs" / "corpus" / "catalog.pbmc.yaml"
ARTIFACT_FILES = {
    "cells": "data/part-*.parquet",
    "medians": "medians.parquet",
    "tokenized": "part-*.parquet",
}


def corpus_config(output: Path, **overrides: object) -> CorpusConfig:
    data = {"catalog": str(CATALOG), "output_dir": str(output), "rows_per_chunk": 1024, **overrides}
    return parse_config(CorpusConfig, data)


@pytest.fixture(scope="module")
def real_run(
    ray_local: None, real_h5ad: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> CorpusResult:
    return run_corpus(corpus_config(tmp_path_factory.mktemp("corpus")))


def read(path: Path, pattern: str) -> pl.DataFrame:
    return pl.read_parquet(sorted(path.glob(pattern)))


def test_counts_reconcile_and_duplicates_found(real_run: CorpusResult) -> None:
    c = real_run.counts
    assert c["cells_in"] == 3874 + 2638 + 996 + 954 + 906 + 200
    assert c["cells_in"] == c["passed"] + sum(c["filtered"].values()) + c["duplicates"] + sum(
        q["n_cells"] for q in c["quarantined"].values()
    )
    assert c["quarantined"] == {}
    cells = read(real_run.cells, ARTIFACT_FILES["cells"])
    assert cells.height == c["cells_in"]  # one row per cell that entered
    dup = cells.filter(pl.col("qc") == "duplicate")
    # Every cell of the gene-filtered 1k PBMC v2 matrix copies one of the raw matrix...
    assert dup["dataset_id"].unique().to_list() == ["pbmc1k_v2_filt"]
    assert dup.height == 954
    # ... while pbmc_facs cells that only share a barcode are not duplicates.
    facs = cells.filter(pl.col("dataset_id") == "pbmc_facs")
    barcodes = (
        facs["cell_id"].str.extract(r":([ACGT]+-1)").value_counts().filter(pl.col("count") > 1)
    )
    assert barcodes["count"].sum() == 20  # 20 cells, 10 barcodes
    assert facs.filter(pl.col("qc") == "duplicate").height == 0
    assert cells["cell_id"].is_unique().all()
    summary = pl.read_parquet(real_run.cells / "qc_summary.parquet")
    assert summary["cells"].sum() == c["cells_in"]


def test_qc_thresholds_follow_the_seeds(real_run: CorpusResult) -> None:
    cells = read(real_run.cells, ARTIFACT_FILES["cells"])
    manifest = artifacts.read_manifest(real_run.cells, "cells")
    for ds_id, status in manifest["datasets"].items():
        mine = cells.filter(pl.col("dataset_id") == ds_id)
        counts = mine["n_counts"].to_numpy().astype(float)
        lo, hi = counts.mean() - 3 * counts.std(ddof=1), counts.mean() + 3 * counts.std(ddof=1)
        t = status["thresholds"]
        assert t["counts_low"] == pytest.approx(lo) and t["counts_high"] == pytest.approx(hi)
        outliers = mine.filter((pl.col("n_counts") < lo) | (pl.col("n_counts") > hi))
        assert set(outliers["qc"].to_list()) <= {
            "total_counts_outlier",
            "low_protein_coding_genes",
            "duplicate",
        }
        passed = mine.filter(pl.col("qc") == "passed")
        assert (passed["n_pc_genes"] >= 7).all()


def test_exact_medians_equal_numpy(real_run: CorpusResult) -> None:
    cells = read(real_run.cells, ARTIFACT_FILES["cells"]).filter(pl.col("qc") == "passed")
    genes = pl.read_parquet(real_run.cells / "genes.parquet")
    medians = pl.read_parquet(real_run.medians / "medians.parquet")
    assert medians.height == genes.height
    flat = cells.select("gene_ids", "counts", "n_counts").explode("gene_ids", "counts")
    values = flat.with_columns(v=pl.col("counts") / pl.col("n_counts") * 10000.0)
    by_gene = values.group_by("gene_ids").agg(pl.col("v"))
    for row in by_gene.sample(300, seed=0).iter_rows(named=True):
        expected = np.median(np.array(row["v"]))
        got = medians.row(row["gene_ids"], named=True)
        assert got["median"] == expected  # exact, bitwise
        assert got["n_cells_detected"] == len(row["v"])


def test_vocabulary_and_tokens(real_run: CorpusResult) -> None:
    vocab = json.loads((real_run.vocabulary / "token_dictionary.json").read_text())
    assert list(vocab)[:4] == ["<pad>", "<mask>", "<cls>", "<eos>"]
    genes = list(vocab)[4:]
    assert genes == sorted(genes) and all(g.startswith("ENSG") for g in genes)
    tokens = read(real_run.tokenized, ARTIFACT_FILES["tokenized"])
    assert tokens.height == real_run.counts["passed"]
    assert {"input_ids", "length", "cell_id", "cell_type", "organ_major", "dataset_id"} <= set(
        tokens.columns
    )
    first = tokens["input_ids"].list.first().unique().to_list()
    last = tokens["input_ids"].list.last().unique().to_list()
    assert first == [2] and last == [3]
    assert (tokens["length"] <= 4096).all()
    datasets = pytest.importorskip("datasets")
    hf = datasets.load_from_disk(str(real_run.tokenized / "hf"))
    assert hf.num_rows == tokens.height
    assert hf[0]["input_ids"] == tokens["input_ids"][0].to_list()
    facs = tokens.filter(pl.col("dataset_id") == "pbmc_facs")
    assert facs["cell_type"].n_unique() == 10  # metadata carried from obs.celltype


def test_rerun_reuses_every_artifact(real_run: CorpusResult, ray_local: None) -> None:
    before = {k: artifacts.read_manifest(v)["created_at"] for k, v in real_run.paths().items()}
    again = run_corpus(corpus_config(real_run.cells.parent))
    after = {k: artifacts.read_manifest(v)["created_at"] for k, v in again.paths().items()}
    assert after == before
    assert again.counts == real_run.counts


MULTINODE = textwrap.dedent(
    """
    import sys
    from cellfoundry import runtime
    import ray
    from ray.cluster_utils import Cluster
    from cellfoundry.config import CorpusConfig, parse_config
    from cellfoundry.corpus.pipeline import run_corpus

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 150 * 1024**2, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=150 * 1024**2)
    ray.init(address=cluster.address, log_to_driver=False)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3
    runtime.configure_data_context()
    # distributed dedup and medians (the local run takes the one-task path of small corpora)
    run_corpus(parse_config(CorpusConfig, {"catalog": sys.argv[1], "output_dir": sys.argv[2],
                                           "rows_per_chunk": 1024, "single_task_max_cells": 0}))
    ray.shutdown()
    cluster.shutdown()
    """
)


@pytest.mark.slow
def test_three_node_cluster_gives_identical_outputs(real_run: CorpusResult, tmp_path: Path) -> None:
    out = tmp_path / "multinode"
    # A short temp dir: Ray's socket paths must stay under 107 bytes.
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="cfray-")}
    proc = subprocess.run(
        [sys.executable, "-c", MULTINODE, str(CATALOG), str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for kind, pattern in ARTIFACT_FILES.items():
        local = read(getattr(real_run, kind), pattern)
        multi = read(out / kind, pattern)
        assert local.equals(multi), kind
    vocab = "vocabulary/token_dictionary.json"
    assert (real_run.vocabulary / "token_dictionary.json").read_text() == (out / vocab).read_text()
