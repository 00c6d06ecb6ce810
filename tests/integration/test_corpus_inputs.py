"""Stage 1 on mixed formats and bad inputs: quarantine, reconcile, fix and rerun."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import yaml

from cellfoundry import artifacts
from cellfoundry.config import CorpusConfig, parse_config
from cellfoundry.corpus.pipeline import run_corpus
from support.source_writers import write_10x_h5, write_10x_mtx, write_loom


@pytest.fixture(scope="module")
def pbmc3k(real_h5ad: list[Path]) -> ad.AnnData:
    path = next(p for p in real_h5ad if p.name.startswith("pbmc3k"))
    return ad.read_h5ad(path)


def subset(adata: ad.AnnData, start: int, n: int) -> ad.AnnData:
    return adata[start : start + n].copy()


def write_catalog(folder: Path, rows: list[dict]) -> Path:
    path = folder / "catalog.yaml"
    path.write_text(yaml.safe_dump({"datasets": rows}))
    return path


def config(catalog: Path, out: Path) -> CorpusConfig:
    return parse_config(
        CorpusConfig, {"catalog": str(catalog), "output_dir": str(out), "rows_per_chunk": 128}
    )


@pytest.fixture
def inputs(tmp_path: Path, pbmc3k: ad.AnnData) -> dict[str, Path]:
    """Good files in four formats and seven kinds of bad input."""
    d = tmp_path / "in"
    d.mkdir()
    files: dict[str, Path] = {}
    files["good_h5ad"] = d / "good.h5ad"
    subset(pbmc3k, 0, 300).write_h5ad(files["good_h5ad"])
    ids = np.asarray(pbmc3k.var_names)
    for name, start, writer in [("loom", 300, "loom"), ("tenx_h5", 500, "h5"), ("mtx", 700, "mtx")]:
        part = subset(pbmc3k, start, 200)
        x, barcodes = sp.csr_matrix(part.X), np.asarray(part.obs_names)
        if writer == "loom":
            files[name] = d / "cells.loom"
            write_loom(files[name], x, ids, ids, barcodes)
        elif writer == "h5":
            files[name] = d / "filtered_feature_bc_matrix.h5"
            write_10x_h5(files[name], x, ids, ids, barcodes)
        else:
            files[name] = write_10x_mtx(d / "mtx", x, ids, ids, barcodes)
    files["corrupt"] = d / "corrupt.h5ad"
    files["corrupt"].write_bytes(os.urandom(4096))
    normalised = subset(pbmc3k, 900, 100)
    normalised.X = normalised.X.astype(np.float32) * 0.5
    files["non_integer"] = d / "normalised.h5ad"
    normalised.write_h5ad(files["non_integer"])
    nogenes = subset(pbmc3k, 1000, 100)
    nogenes.var_names = [f"feature_{i}" for i in range(nogenes.n_vars)]
    files["no_gene_ids"] = d / "nogenes.h5ad"
    nogenes.write_h5ad(files["no_gene_ids"])
    files["empty"] = d / "empty.h5ad"
    subset(pbmc3k, 0, 0).write_h5ad(files["empty"])
    files["missing_column"] = d / "nometa.h5ad"
    subset(pbmc3k, 1100, 100).write_h5ad(files["missing_column"])
    csc = subset(pbmc3k, 1200, 100)
    csc.X = sp.csc_matrix(csc.X)
    files["csc"] = d / "csc.h5ad"  # readable, but cells cannot be read in row chunks
    csc.write_h5ad(files["csc"])
    files["wrong_matrix"] = d / "nolayer.h5ad"  # the catalog names a layer it does not have
    subset(pbmc3k, 1300, 100).write_h5ad(files["wrong_matrix"])
    return files


def test_bad_inputs_are_quarantined_then_fixed(
    ray_local: None, inputs: dict[str, Path], pbmc3k: ad.AnnData, tmp_path: Path
) -> None:
    rows = [{"id": k, "uri": str(v), "organ": "blood"} for k, v in inputs.items()]
    rows[0]["metadata"] = {"cell_type": "cell_type"}
    next(r for r in rows if r["id"] == "missing_column")["metadata"] = {"cell_type": "not_a_column"}
    next(r for r in rows if r["id"] == "wrong_matrix")["matrix"] = "layers/counts"
    catalog = write_catalog(tmp_path, rows)
    out = tmp_path / "out"
    result = run_corpus(config(catalog, out))
    c = result.counts
    q = c["quarantined"]
    assert set(q) == {
        "corrupt", "non_integer", "no_gene_ids", "empty", "missing_column", "csc", "wrong_matrix"
    }  # fmt: skip
    assert "not_a_column" in q["missing_column"]["reason"]
    assert "raw" in q["non_integer"]["reason"] or "integer" in q["non_integer"]["reason"]
    assert q["non_integer"]["n_cells"] == 100 and q["missing_column"]["n_cells"] == 100
    # Readable files count their cells even when their matrix cannot be used.
    assert q["csc"]["n_cells"] == 100 and q["wrong_matrix"]["n_cells"] == 100
    assert "np.str_" not in q["non_integer"]["reason"]
    good = 300 + 200 + 200 + 200
    assert c["cells_in"] == good + 5 * 100  # corrupt and empty hold no countable cells
    assert c["cells_in"] == c["passed"] + sum(c["filtered"].values()) + c["duplicates"] + sum(
        v["n_cells"] for v in q.values()
    )
    cells = pl.read_parquet(sorted((out / "cells" / "data").glob("*.parquet")))
    assert cells.group_by("dataset_id").len().sort("dataset_id").rows() == [
        ("good_h5ad", 300), ("loom", 200), ("mtx", 200), ("tenx_h5", 200)
    ]  # fmt: skip
    # The same cells in four formats give the same genes and counts as the source file.
    for ds in ["loom", "tenx_h5", "mtx"]:
        assert cells.filter(pl.col("dataset_id") == ds)["n_counts"].sum() == int(
            subset(pbmc3k, {"loom": 300, "tenx_h5": 500, "mtx": 700}[ds], 200).X.sum()
        )

    # Fix one input and rerun: only the fixed dataset is read again.
    parts = sorted((out / "_work" / "ingest" / "good_h5ad").rglob("part-*.parquet"))
    stamps = {p: p.stat().st_mtime_ns for p in parts}
    subset(pbmc3k, 900, 100).write_h5ad(inputs["non_integer"])
    again = run_corpus(config(catalog, out)).counts
    assert set(again["quarantined"]) == set(q) - {"non_integer"}
    assert {p: p.stat().st_mtime_ns for p in parts} == stamps  # good parts were reused
    assert again["cells_in"] == c["cells_in"]
    assert artifacts.read_manifest(out / "cells")["datasets"]["non_integer"]["status"] == "read"


def test_doi_duplicates_and_flags(ray_local: None, pbmc3k: ad.AnnData, tmp_path: Path) -> None:
    paths = []
    for i in range(4):
        p = tmp_path / f"d{i}.h5ad"
        subset(pbmc3k, 200 * i, 200).write_h5ad(p)
        paths.append(p)
    rows = [
        {"id": "first", "uri": str(paths[0]), "doi": "10.1/ABC"},
        {"id": "same_doi", "uri": str(paths[1]), "doi": "10.1/abc"},  # DOIs compare case-blind
        {"id": "tumour", "uri": str(paths[2]), "malignant": True},
        {"id": "smartseq", "uri": str(paths[3]), "platform": "Smart-seq2"},
    ]
    result = run_corpus(config(write_catalog(tmp_path, rows), tmp_path / "out"))
    c = result.counts
    assert c["duplicates"] == 200
    assert c["filtered"]["excluded_malignant"] == 200
    assert c["filtered"]["excluded_non_droplet"] == 200
    assert (
        c["passed"] + sum(v for k, v in c["filtered"].items() if not k.startswith("excluded"))
        == 200
    )
    status = artifacts.read_manifest(result.cells)["datasets"]
    assert status["same_doi"] == {"status": "duplicate_dataset", "duplicate_of": "first"}
