"""`cellfoundry tokenize` per chunk: n_counts checks and cells without vocabulary genes (no Ray)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from cellfoundry.corpus.encode import RankEncoder
from cellfoundry.corpus.tokenize_files import (
    NO_VOCABULARY_GENES,
    TokenizeChunks,
    check_n_counts,
    parse_obs_columns,
    tokenize_files,
)

# 6 file genes: the first 4 are tokens 10..13 (medians 1, 2, 1, 4), the last 2 are not tokenised.
ENCODER = RankEncoder(
    token_ids=np.array([10, 11, 12, 13], np.int32),
    medians=np.array([1.0, 2.0, 1.0, 4.0]),
    max_genes=10,
    cls_id=2,
    eos_id=3,
)
COL_MAP = np.array([0, 1, 2, 3, -1, -1], np.int32)
X = sp.csr_matrix(
    np.array(
        [
            [5, 3, 0, 0, 0, 0],  # c0: tokens 10, 11
            [0, 0, 0, 0, 7, 0],  # c1: counts outside the vocabulary only -> dropped
            [0, 0, 0, 0, 0, 0],  # c2: no counts at all -> dropped
            [0, 0, 1, 8, 0, 2],  # c3: 8/4 > 1/1, so token 13 before 12
        ]
    )
)
EXPECTED = {"c0": [2, 10, 11, 3], "c3": [2, 13, 12, 3]}


def test_check_n_counts() -> None:
    n_counts = np.array([8.0, 0.0, -3.0, np.nan, np.inf, 0.0])
    totals = np.array([8.0, 5.0, 3.0, 4.0, 9.0, 0.0])
    tokenised = np.array([True, True, True, True, True, False])  # the last has no vocab gene
    used, bad = check_n_counts(n_counts, totals, tokenised, recompute=False)
    assert bad.tolist() == [False, True, True, True, True, False]
    assert np.array_equal(used, n_counts, equal_nan=True)
    used, bad = check_n_counts(n_counts, totals, tokenised, recompute=True)
    assert used.tolist() == [8.0, 5.0, 3.0, 4.0, 9.0, 0.0]


def _run(tmp_path: Path, n_counts: list[float] | None, recompute: bool) -> tuple[dict, dict]:
    obs = pd.DataFrame(index=["c0", "c1", "c2", "c3"])
    if n_counts is not None:
        obs["n_counts"] = n_counts
    var = pd.DataFrame({"ensembl_id": [f"ENSG{i:011d}" for i in range(6)]}, index=list("abcdef"))
    path = tmp_path / "cells.h5ad"
    ad.AnnData(X, obs=obs, var=var).write_h5ad(path)
    out = tmp_path / "out"
    udf = TokenizeChunks({str(path): {"format": "h5ad", "col_map": COL_MAP, "index": 0}}, ENCODER,
                         recompute_n_counts=recompute)  # fmt: skip
    result = udf.process({"uri": str(path), "start": 0, "stop": 4, "out_dir": str(out)})
    shards = sorted(out.glob("part-*.parquet"))
    rows = pq.read_table(shards).to_pylist() if shards else []
    return result, {r["cell_id"]: r["input_ids"] for r in rows}


@pytest.mark.parametrize("n_counts", [None, [8.0, 7.0, 0.0, 11.0]], ids=["no-column", "column"])
def test_cells_without_vocabulary_genes_are_dropped_and_counted(
    tmp_path: Path, n_counts: list[float] | None
) -> None:
    result, tokens = _run(tmp_path, n_counts, recompute=False)
    assert tokens == EXPECTED  # no <cls><eos> rows for c1 and c2
    assert result["error"] == "" and result["rows"] == 2
    assert result["cells_in"] == 4 and result[NO_VOCABULARY_GENES] == 2
    assert result["bad_n_counts"] == 0  # c2's n_counts of 0 is right: it has no counts


@pytest.mark.parametrize("bad", [0.0, -11.0, np.nan, np.inf])
def test_bad_n_counts_fails_the_chunk_or_is_recomputed(tmp_path: Path, bad: float) -> None:
    """Before: a negative n_counts reversed the ranking, 0 / NaN ordered genes by token id."""
    result, tokens = _run(tmp_path, [8.0, 7.0, 0.0, bad], recompute=False)
    assert tokens == {}  # nothing written for a chunk with a bad n_counts
    assert "obs/n_counts" in result["error"]
    assert result["bad_n_counts"] == 1 and result["bad_example"] == f"cell 'c3': {bad}"
    result, tokens = _run(tmp_path, [8.0, 7.0, 0.0, bad], recompute=True)
    assert tokens == EXPECTED  # c3's n_counts is its total raw count (11) instead
    assert result["error"] == "" and result["bad_n_counts"] == 1


def test_obs_columns_are_carried_into_the_shards(tmp_path: Path) -> None:
    """`--obs-columns cell_type,donor`: each kept cell's values beside its tokens, in the
    columns Geneformer's tools read (input_ids, length, the attributes)."""
    from datasets import Dataset

    obs = pd.DataFrame(
        {"cell_type": ["T", "B", "NK", "mono"], "donor": pd.Categorical(["d1", "d1", "d2", "d2"]),
         "age": [30, 31, 32, 33]},
        index=["c0", "c1", "c2", "c3"],
    )  # fmt: skip
    var = pd.DataFrame({"ensembl_id": [f"ENSG{i:011d}" for i in range(6)]}, index=list("abcdef"))
    path = tmp_path / "cells.h5ad"
    ad.AnnData(X, obs=obs, var=var).write_h5ad(path)
    udf = TokenizeChunks({str(path): {"format": "h5ad", "col_map": COL_MAP, "index": 0}}, ENCODER,
                         obs_columns=parse_obs_columns("cell_type, donor,age"))  # fmt: skip
    result = udf.process({"uri": str(path), "start": 0, "stop": 4, "out_dir": str(tmp_path / "o")})
    assert result["error"] == "" and result["rows"] == 2
    shards = sorted((tmp_path / "o").glob("part-*.parquet"))
    rows = pq.read_table(shards).to_pylist()
    # c1 and c2 have no vocabulary gene: dropped with their labels, rows stay aligned
    assert [(r["cell_id"], r["cell_type"], r["donor"], r["age"]) for r in rows] == [
        ("c0", "T", "d1", "30"),
        ("c3", "mono", "d2", "33"),
    ]
    ds = Dataset.from_parquet([str(s) for s in shards])
    assert {"input_ids", "length", "cell_type", "donor"} <= set(ds.column_names)
    assert ds[1]["input_ids"] == EXPECTED["c3"] and ds[1]["length"] == 4
    assert ds.filter(lambda r: r["cell_type"] == "T")["cell_id"] == ["c0"]


def test_parse_obs_columns_refuses_shard_names_and_repeats() -> None:
    assert parse_obs_columns(None) == [] and parse_obs_columns(["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match=r"\['length'\].*rename"):
        parse_obs_columns("cell_type,length")
    with pytest.raises(ValueError, match="twice"):
        parse_obs_columns("donor,donor")


def test_missing_obs_column_is_a_clear_error(tmp_path: Path, geneformer_dir: Path) -> None:
    """Checked for every file before any cell is tokenised (no Ray needed to fail)."""
    import json

    vocab = json.loads((geneformer_dir / "v2" / "token_dictionary_gc104M.json").read_text())
    genes = sorted(g for g in vocab if g.startswith("ENSG"))[:6]
    obs = pd.DataFrame({"cell_type": list("abcd"), "batch": list("xxyy")}, index=list("wxyz"))
    path = tmp_path / "labelled.h5ad"
    ad.AnnData(X, obs=obs, var=pd.DataFrame({"ensembl_id": genes}, index=genes)).write_h5ad(path)
    with pytest.raises(ValueError) as info:
        tokenize_files([str(path)], dictionaries=geneformer_dir / "v2", mode="v2",
                       output=tmp_path / "out", obs_columns="cell_type,donor")  # fmt: skip
    message = str(info.value)
    assert str(path) in message and "'donor'" in message and "'cell_type'" not in message
    assert "cell_type, batch" in message  # the columns the file has
    assert not (tmp_path / "out" / "manifest.json").exists()
