"""`cellfoundry tokenize` with the real Geneformer dictionaries equals a plain per-cell encoding."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import anndata as ad
import numpy as np
import polars as pl
import pytest

from cellfoundry.artifacts import ArtifactError
from cellfoundry.cli import main
from cellfoundry.corpus.tokenize_files import DictionaryGenes, tokenize_files
from cellfoundry.genes import GeneTable

SAMPLE = 300
"""Cells per file whose tokens are rebuilt by the plain loop (seeded, plus the first and the
last); every cell's ID, order and length are checked. The sample keeps the pure-Python loop,
run for both modes, short."""


def plain_tokens(
    path: Path, dg: DictionaryGenes, table: GeneTable, mode: str
) -> tuple[list[str], dict[int, list[int]]]:
    """Rank value encoding written plainly, one cell at a time (DESIGN.md), for a seeded
    sample of the file's cells: (IDs of every cell that has a vocabulary gene, in order;
    {position among those cells: tokens} for the sample). Cells with no vocabulary gene are
    left out (tokenize drops and counts them)."""
    adata = ad.read_h5ad(path)
    if "ensembl_id" in adata.var:
        col_map, _ = dg.column_map(list(adata.var["ensembl_id"].astype(str)), "ensembl", table)
    else:
        col_map, _ = dg.column_map(list(adata.var_names), "symbol", table)
    X = adata.X.tocsr()
    n_counts = (
        adata.obs["n_counts"].to_numpy(np.float64)
        if "n_counts" in adata.obs
        else np.asarray(X.sum(axis=1)).ravel()
    )
    enc = dg.encoder
    # every cell with a positive count on a vocabulary gene is kept (vectorised)
    in_vocab = np.asarray(X[:, np.flatnonzero(col_map >= 0)].sum(axis=1)).ravel() > 0
    kept = np.flatnonzero(in_vocab)
    ids = [str(adata.obs_names[i]) for i in kept]
    rng = np.random.default_rng(0)
    sample = set(rng.choice(len(kept), min(SAMPLE, len(kept)), replace=False).tolist())
    sample |= {0, len(kept) - 1}
    cells: dict[int, list[int]] = {}
    for pos in sorted(sample):
        i = int(kept[pos])
        row = X.getrow(i)
        summed: dict[int, float] = defaultdict(float)
        for j, c in zip(row.indices, row.data, strict=True):
            if col_map[j] >= 0:
                summed[int(col_map[j])] += float(c)
        n = float(n_counts[i])
        ranked = sorted(
            (-(c / n * 10000.0 / enc.medians[g]), int(enc.token_ids[g]))
            for g, c in summed.items()
            if c > 0
        )
        tokens = [t for _, t in ranked][: enc.max_genes]
        assert tokens, f"cell {i} of {path.name} has vocabulary counts but no token"
        cells[pos] = [2, *tokens, 3] if mode == "v2" else tokens
    return ids, cells


@pytest.mark.parametrize("mode", ["v2", "v1"])
def test_real_files_match_plain_encoding(
    ray_local: None, real_h5ad: list[Path], geneformer_dir: Path, tmp_path: Path, mode: str
) -> None:
    out = tmp_path / f"tokens_{mode}"
    argv = [*map(str, real_h5ad), "--dictionaries", str(geneformer_dir / mode), "--mode", mode,
            "--output", str(out), "--rows-per-chunk", "700"]  # fmt: skip
    assert main(["tokenize", *argv]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "tokenized"
    got = pl.read_parquet(sorted(out.glob("part-*.parquet")))
    assert got.columns == ["cell_id", "source", "input_ids", "length"]
    dg = DictionaryGenes.load(geneformer_dir / mode, mode)
    table = GeneTable.load()
    offset = 0
    for path in real_h5ad:
        ids, cells = plain_tokens(path, dg, table, mode)
        part = got.slice(offset, len(ids))
        offset += len(ids)
        assert part["source"].unique().to_list() == [str(path)]
        assert part["cell_id"].to_list() == ids  # order and IDs preserved
        got_ids, got_len = part["input_ids"].to_list(), part["length"].to_list()
        for pos, want in cells.items():
            assert got_ids[pos] == want, (path.name, ids[pos])
            assert got_len[pos] == len(want)
        limit = 4096 if mode == "v2" else 2048
        assert max(got_len) <= limit and got_len == [len(x) for x in got_ids]
    assert offset == got.height == manifest["counts"]["cells"]
    counts = manifest["counts"]
    assert counts["cells_in"] == got.height + sum(counts["filtered"].values())  # reconciles


def test_v1_dictionaries_with_v2_mode_is_a_clear_error(
    ray_local: None, real_h5ad: list[Path], geneformer_dir: Path, tmp_path: Path
) -> None:
    argv = [
        str(real_h5ad[0]),
        "--dictionaries",
        str(geneformer_dir / "v1"),
        "--mode",
        "v2",
        "--output",
        str(tmp_path / "x"),
    ]
    assert main(["tokenize", *argv]) == 2  # a ValueError, reported in one line
    with pytest.raises(ValueError, match="v1 dictionaries but --mode is v2"):
        DictionaryGenes.load(geneformer_dir / "v1", "v2")


def test_output_folder_of_a_users_files_is_never_replaced(
    ray_local: None, real_h5ad: list[Path], geneformer_dir: Path, tmp_path: Path
) -> None:
    small = next(p for p in real_h5ad if p.name.startswith("scirpy_wu2020"))
    mine = tmp_path / "my_results"
    mine.mkdir()
    (mine / "analysis.txt").write_text("a week of work")
    argv = [str(small), "--dictionaries", str(geneformer_dir / "v2"), "--output", str(mine)]
    for extra in ([], ["--overwrite"]):  # --overwrite only replaces artifacts
        assert main(["tokenize", *argv, *extra]) == 2  # a ValueError, reported in one line
        assert sorted(p.name for p in mine.iterdir()) == ["analysis.txt"]
        assert (mine / "analysis.txt").read_text() == "a week of work"
    with pytest.raises(
        ArtifactError, match=f"{re.escape(str(mine))} exists.*choose another output path"
    ):
        tokenize_files([str(small)], dictionaries=geneformer_dir / "v2", mode="v2", output=mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_results"]  # no temp, no lock
    out = tmp_path / "tokens"  # a new folder works, and a rerun replaces its own artifact
    assert main(["tokenize", *argv[:-1], str(out)]) == 0
    assert main(["tokenize", *argv[:-1], str(out), "--model-input-size", "1024"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "tokenized" and manifest["config"]["model_input_size"] == 1024
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_results", "tokens"]


def test_bad_n_counts_is_an_error_or_recomputed(
    ray_local: None, real_h5ad: list[Path], geneformer_dir: Path, tmp_path: Path
) -> None:
    """obs["n_counts"] of 0 / NaN / negative / inf once mis-ranked cells silently; now the file
    fails with a message naming it, the field, the cells and the fix, and the flag recomputes.
    Cells with no vocabulary gene are dropped and counted instead of becoming <cls><eos>."""
    path = next(p for p in real_h5ad if p.name.startswith("pbmc_facs"))
    adata = ad.read_h5ad(path)[:300].copy()
    col_map, _ = DictionaryGenes.load(geneformer_dir / "v2", "v2").column_map(
        list(adata.var["ensembl_id"].astype(str)), "ensembl", None
    )
    x = adata.X.tolil()
    x[10, :] = 0
    x[10, np.flatnonzero(col_map < 0)[:2]] = 5  # counts outside the vocabulary only
    x[11, :] = 0  # no counts at all
    adata.X = x.tocsr()
    plain, bad = tmp_path / "plain.h5ad", tmp_path / "bad.h5ad"
    adata.write_h5ad(plain)
    n_counts = np.asarray(adata.X.sum(axis=1), dtype=np.float64).ravel()  # as the file's own
    n_counts[[3, 100, 200, 250]] = [0.0, np.nan, -5.0, np.inf]  # cell 11's 0 is right
    adata.obs["n_counts"] = n_counts
    adata.write_h5ad(bad)
    normalised = tmp_path / "normalised.h5ad"
    adata.X = adata.X.astype(np.float32) * 0.5
    adata.write_h5ad(normalised)

    def tokenize(out: Path, *files: Path, flags: tuple[str, ...] = ()) -> tuple[int, dict]:
        argv = [*map(str, files), "--dictionaries", str(geneformer_dir / "v2"), "--mode", "v2",
                "--output", str(out), "--rows-per-chunk", "128", *flags]  # fmt: skip
        code = main(["tokenize", *argv])
        return code, json.loads((out / "manifest.json").read_text())

    code, m = tokenize(tmp_path / "t1", bad, plain, normalised)
    assert code == 1
    q = m["counts"]["quarantined"]
    assert set(q) == {str(bad), str(normalised)}
    assert q[str(bad)].startswith(f"{bad}: obs/n_counts: ")
    assert "for 4 of its 300 cells" in q[str(bad)] and "--recompute-n-counts" in q[str(bad)]
    # Messages fit tokenize (no catalog of its own) and quote cells as plain text.
    assert "point the catalog" not in q[str(normalised)] and "tokenize" in q[str(normalised)]
    assert "np.str_" not in q[str(normalised)] and "in cell '" in q[str(normalised)]
    assert not list((tmp_path / "t1").glob("part-00000-*.parquet"))  # nothing of the bad file
    assert m["counts"]["cells_in"] == 300 and m["counts"]["cells"] == 298
    assert m["counts"]["filtered"] == {"no_vocabulary_genes": 2}
    assert m["files"][str(plain)]["filtered"] == {"no_vocabulary_genes": 2}
    want = pl.read_parquet(sorted((tmp_path / "t1").glob("part-*.parquet")))
    assert str(adata.obs_names[10]) not in want["cell_id"].to_list()
    assert want["length"].min() > 2  # no <cls><eos> rows

    code, m = tokenize(tmp_path / "t2", bad, flags=("--recompute-n-counts",))
    assert code == 0 and m["counts"]["quarantined"] == {}
    assert m["counts"]["n_counts_recomputed"] == 4 and m["config"]["recompute_n_counts"] is True
    assert m["counts"]["filtered"] == {"no_vocabulary_genes": 2}
    got = pl.read_parquet(sorted((tmp_path / "t2").glob("part-*.parquet")))
    assert got["cell_id"].to_list() == want["cell_id"].to_list()
    assert got["input_ids"].to_list() == want["input_ids"].to_list()
