"""The synthetic data generator: deterministic, realistic, and its genes map consistently."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from cellfoundry.corpus.catalog import load_catalog
from cellfoundry.corpus.synthetic import generate_synthetic, read_truth
from cellfoundry.genes import GeneTable


def _load(path: Path) -> ad.AnnData:
    return ad.read_h5ad(path)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory):
    """300 cells with generated gene IDs (as on a machine without ../shared)."""
    return generate_synthetic(
        tmp_path_factory.mktemp("gen"), n_cells=300, seed=7, n_genes=400, real_genes=False
    )


def test_same_seed_same_data(tmp_path: Path, generated) -> None:
    again = generate_synthetic(
        tmp_path / "again", n_cells=300, seed=7, n_genes=400, real_genes=False
    )
    assert again.truth == generated.truth
    for ds, path in generated.files.items():
        a, b = _load(path), _load(again.files[ds])
        assert (a.X != b.X).nnz == 0
        assert a.obs.equals(b.obs) and a.var.equals(b.var)
    other = generate_synthetic(
        tmp_path / "other", n_cells=300, seed=8, n_genes=400, real_genes=False
    )
    assert (_load(other.files["synth_v3"]).X != _load(generated.files["synth_v3"]).X).nnz > 0


def test_generated_ids_map_through_the_written_gene_table(generated) -> None:
    table = GeneTable.load(generated.gene_table)
    assert len(table) == 400
    assert table.is_mitochondrial(table.frame["ensembl_id"]).sum() == 13
    facs = _load(generated.files["synth_facs"])
    assert facs.var_names.str.match(r"^ENSG9\d{10}$").all()
    assert table.contains(list(facs.var["ensembl_id"])).all()
    v3 = _load(generated.files["synth_v3"])
    mapping = table.map_genes(list(v3.var_names), kind="symbol")
    unmapped = [n for n, i in zip(mapping.names, mapping.ensembl_ids, strict=True) if i is None]
    assert len(unmapped) == 20 and all(n.startswith("AC9") for n in unmapped)
    # The same symbol maps to the same ID as the Ensembl-ID file holds for it.
    by_symbol = dict(zip(facs.var["gene_symbol"], facs.var["ensembl_id"], strict=True))
    assert all(
        by_symbol[n] == i for n, i in zip(mapping.names, mapping.ensembl_ids, strict=True) if i
    )


def test_counts_outliers_and_duplicates_are_as_planted(generated) -> None:
    truth = read_truth(generated.catalog.parent)
    raw = _load(generated.files["synth_v2_raw"])
    assert raw.X.dtype == np.int32 and raw.X.data.min() > 0
    depth = np.asarray(raw.X.sum(axis=1)).ravel()
    mito = raw.var_names.str.startswith("MT-")
    pct_mito = np.asarray(raw.X[:, mito].sum(axis=1)).ravel() / depth * 100
    rows = {b: i for i, b in enumerate(raw.obs_names)}
    planted = truth["datasets"]["synth_v2_raw"]["planted"]
    normal = np.setdiff1d(np.arange(raw.n_obs), [rows[b] for bs in planted.values() for b in bs])
    assert 1 <= np.median(pct_mito[normal]) <= 6
    assert all(depth[rows[b]] > 8 * np.median(depth) for b in planted["total_counts_outlier"])
    assert all(pct_mito[rows[b]] > 40 for b in planted["mito_outlier"])
    assert all(raw.X[rows[b]].nnz <= 4 + 20 for b in planted["low_protein_coding_genes"])
    # The filtered copy holds raw cells' exact counts over its (smaller) gene panel.
    filt = _load(generated.files["synth_v2_filt"])
    assert filt.n_vars < raw.n_vars
    same = raw[filt.obs_names, filt.var_names[~filt.var_names.str.startswith("AC9")]]
    assert (same.X != filt[:, same.var_names].X).nnz == 0
    assert set(filt.obs_names) <= set(raw.obs_names)
    facs = _load(generated.files["synth_facs"])
    assert set(facs.obs["split"]) == {"train", "test"}
    assert facs.obs["celltype"].nunique() >= 6


def test_catalog_loads_with_a_doi_duplicate(generated) -> None:
    entries = load_catalog(generated.catalog)
    assert [e.id for e in entries][:2] == ["synth_facs", "synth_facs_rerelease"]
    assert entries[0].doi == entries[1].doi
    assert all(Path(e.uri).is_file() for e in entries)


def test_without_shared_data_ids_are_generated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CELLFOUNDRY_SHARED", str(tmp_path / "nothing"))
    data = generate_synthetic(tmp_path / "out", n_cells=200, n_genes=100)
    assert data.truth["genes"] == "generated"
    with pytest.raises(ValueError, match="CELLFOUNDRY_SHARED"):
        generate_synthetic(tmp_path / "out2", n_cells=200, real_genes=True)
    with pytest.raises(ValueError, match="at least 200 cells"):
        generate_synthetic(tmp_path / "out3", n_cells=50)


def test_cli_synth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from cellfoundry.cli import main

    argv = [
        "synth",
        "--output",
        str(tmp_path / "d"),
        "--cells",
        "200",
        "--seed",
        "2",
        "--genes",
        "100",
    ]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["expected"]["cells_in"] == 200
    assert Path(out["catalog"]).is_file() and Path(out["gene_table"]).is_file()
    assert sorted(Path(p).name for p in out["files"].values()) == sorted(
        f"{ds}.h5ad"
        for ds in (
            "synth_facs",
            "synth_facs_rerelease",
            "synth_v2_raw",
            "synth_v2_filt",
            "synth_v3",
        )
    )
    assert main(["synth", "--output", str(tmp_path / "e"), "--cells", "20"]) == 2  # a clear error


def test_rerun_with_the_same_parameters_keeps_the_files(tmp_path: Path) -> None:
    kw = {"n_cells": 200, "seed": 4, "n_genes": 100, "real_genes": False}
    first = generate_synthetic(tmp_path, **kw)
    stamps = {p: p.stat().st_mtime_ns for p in first.files.values()}
    again = generate_synthetic(tmp_path, **kw)
    assert again.truth == first.truth
    assert {p: p.stat().st_mtime_ns for p in again.files.values()} == stamps  # not rewritten
    other = generate_synthetic(tmp_path, **{**kw, "seed": 5})
    assert other.truth["params"]["seed"] == 5 and other.truth != first.truth
