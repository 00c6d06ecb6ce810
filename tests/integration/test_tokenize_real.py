"""`cellfoundry tokenize` with the real Geneformer dictionaries equals a plain per-cell encoding."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import anndata as ad
import numpy as np
import polars as pl
import pytest

from cellfoundry.cli import main
from cellfoundry.corpus.tokenize_files import DictionaryGenes
from cellfoundry.genes import GeneTable


def plain_tokens(
    path: Path, dg: DictionaryGenes, table: GeneTable, mode: str
) -> tuple[list[str], list[list[int]]]:
    """Rank value encoding written plainly, one cell at a time (DESIGN.md)."""
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
    cells = []
    for i in range(X.shape[0]):
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
        cells.append([2, *tokens, 3] if mode == "v2" else tokens)
    return list(adata.obs_names), cells


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
        assert part["input_ids"].to_list() == cells, path.name
        assert part["length"].to_list() == [len(c) for c in cells]
        limit = 4096 if mode == "v2" else 2048
        assert max(len(c) for c in cells) <= limit
    assert offset == got.height == manifest["counts"]["cells"]


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
