"""Stage 1 over generated data: counts reconcile, planted outliers and duplicates are caught."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from cellfoundry.config import CorpusConfig, load_config, parse_config
from cellfoundry.corpus.pipeline import CorpusResult, run_corpus
from cellfoundry.corpus.synthetic import SyntheticData, generate_synthetic
from cellfoundry.paths import REPO_ROOT


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> SyntheticData:
    return generate_synthetic(tmp_path_factory.mktemp("synth"), n_cells=1500, seed=3)


@pytest.fixture(scope="module")
def synthetic_run(
    ray_local: None, synthetic: SyntheticData, tmp_path_factory: pytest.TempPathFactory
) -> CorpusResult:
    cfg = parse_config(
        CorpusConfig,
        {
            "catalog": str(synthetic.catalog),
            "gene_table": str(synthetic.gene_table),
            "output_dir": str(tmp_path_factory.mktemp("synth_corpus")),
            "rows_per_chunk": 512,
            "medians": {"method": "sketch"},  # one pass over the cells, not two
            "tokenize": {"mode": "v2", "model_input_size": 128},
        },
    )
    return run_corpus(cfg)


def test_counts_reconcile_with_what_was_planted(
    synthetic: SyntheticData, synthetic_run: CorpusResult
) -> None:
    c, expected = synthetic_run.counts, synthetic.truth["expected"]
    assert c["quarantined"] == {}
    assert c["cells_in"] == expected["cells_in"] == 1500
    assert c["cells_in"] == c["passed"] + sum(c["filtered"].values()) + c["duplicates"]
    assert c["filtered"] == expected["filtered"]  # exactly the planted outliers, nothing else
    assert c["duplicates"] == expected["duplicates"]
    assert c["tokenized"]["cells"] == c["passed"]


def test_each_planted_cell_gets_its_reason(
    synthetic: SyntheticData, synthetic_run: CorpusResult
) -> None:
    cells = pl.read_parquet(sorted((synthetic_run.cells / "data").glob("part-*.parquet")))
    qc = dict(zip(cells["cell_id"].to_list(), cells["qc"].to_list(), strict=True))
    for ds, info in synthetic.truth["datasets"].items():
        for reason, barcodes in info["planted"].items():
            assert barcodes
            assert {qc[f"{ds}:{b}"] for b in barcodes} == {reason}, (ds, reason)
    # Every cell of the gene-filtered copy is a duplicate; the DOI re-release is not read.
    filt = cells.filter(pl.col("dataset_id") == "synth_v2_filt")
    assert filt.height == synthetic.truth["datasets"]["synth_v2_filt"]["n_cells"]
    assert filt["qc"].unique().to_list() == ["duplicate"]
    assert cells.filter(pl.col("dataset_id") == "synth_facs_rerelease").height == 0
    assert cells.filter(pl.col("dataset_id") != "synth_v2_filt")["qc"].ne("duplicate").all()


def test_labels_split_and_batches_reach_the_tokens(synthetic_run: CorpusResult) -> None:
    tokens = pl.read_parquet(sorted(synthetic_run.tokenized.glob("part-*.parquet")))
    assert tokens["cell_type"].null_count() == 0
    assert tokens["cell_type"].n_unique() == 8
    facs = tokens.filter(pl.col("dataset_id") == "synth_facs")
    assert set(facs["split"].unique().to_list()) == {"train", "test"}
    assert set(tokens["batch"].unique().to_list()) == {"v2", "v3"}
    assert tokens["length"].max() == 128


def test_synthetic_job_config_loads() -> None:
    from cellfoundry.config import CorpusJobConfig

    cfg = load_config(CorpusJobConfig, REPO_ROOT / "jobs" / "configs" / "corpus" / "synthetic.yaml")
    assert Path(cfg.corpus.gene_table or "").name == "genes.tsv"
    assert Path(cfg.corpus.catalog).name == "catalog.yaml"
