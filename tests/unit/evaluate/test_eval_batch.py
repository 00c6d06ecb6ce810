"""Batch metrics against small hand-computed cases: pair categories, gaps, neighbour shares,
the separability index; bounded pair sampling; the files of ``run_batch``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cellfoundry.config import parse_config
from cellfoundry.config.evaluate import BatchEvalConfig
from cellfoundry.evaluate.batch import run_batch
from cellfoundry.evaluate.batch_metrics import cell_metrics, gene_metrics
from cellfoundry.evaluate.pairs import nearest_neighbours, sample_pairs, unit_rows

R2 = math.sqrt(0.5)  # cos 45 degrees

# five cells in 2-D: batch A / B, type T / U, one unlabelled
CELLS = np.array([[1, 0], [1, 0], [0, 1], [-1, 0], [1, 1]], dtype=np.float32)
BATCHES = ["A", "A", "B", "A", "B"]
LABELS = ["T", "T", "T", "U", None]

# (gene, group) rows: g1 and g2 in groups A and B, g3 in A only
GENES = np.array([[1, 0], [1, 0.1], [0, 1], [1, 0.2], [-1, 0]], dtype=np.float32)
GENE_IDS = ["g1", "g1", "g2", "g2", "g3"]
GROUPS = ["A", "B", "A", "B", "A"]


def cos(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_cell_categories_hand_case() -> None:
    m, sims = cell_metrics(CELLS, BATCHES, LABELS)
    c = m["categories"]
    # (T,A) = {0, 1}: one pair, cosine 1; (T,B) and (U,A) have one cell each
    assert (c["same_type_same_batch"]["n_pairs"], c["same_type_same_batch"]["mean"]) == (1, 1.0)
    # (T,A) x (T,B): (0,2), (1,2), both orthogonal
    assert (c["same_type_other_batch"]["n_pairs"], c["same_type_other_batch"]["mean"]) == (2, 0.0)
    # T x U: (0,3) = -1, (1,3) = -1, (2,3) = 0
    assert c["different_type"]["n_pairs"] == 3
    assert c["different_type"]["mean"] == pytest.approx(-2 / 3)
    # label-free, the unlabelled cell 4 included: A = {0,1,3}, B = {2,4}
    assert c["same_batch"]["n_pairs"] == 4
    assert c["same_batch"]["mean"] == pytest.approx((1 - 1 - 1 + R2) / 4)
    assert c["other_batch"]["n_pairs"] == 6
    assert c["other_batch"]["mean"] == pytest.approx((0 + R2 + 0 + R2 + 0 - R2) / 6)
    assert all(not s["sampled"] and s["n_possible"] == s["n_pairs"] for s in c.values())
    assert m["batch_gap"] == pytest.approx(1.0) and m["type_gap"] == pytest.approx(2 / 3)
    # nearest cells: 0->1 (A), 1->0 (A), 2->4 (B), 3->2 (B, not A), 4->0 (tie, lowest; A != B)
    assert m["batch_neighbours"] == {"n": 5, "share": 0.6, "chance": pytest.approx(0.4)}
    # labelled only: 0->1, 1->0, 2->0 (ties at 0), 3->2 (T != U)
    assert m["label_neighbours"] == {"n": 4, "share": 0.75, "chance": pytest.approx(0.5)}
    assert sorted(sims["other_batch"].round(6)) == sorted(np.round([0, R2, 0, R2, 0, -R2], 6))
    assert m["batches"] == {"A": 3, "B": 2} and m["labels"] == {"T": 3, "U": 1}


def test_unlabelled_cells_enter_only_the_label_free_comparison() -> None:
    m, _ = cell_metrics(CELLS, BATCHES, [None] * 5)
    c = m["categories"]
    assert [c[k]["n_pairs"] for k in c] == [0, 0, 0, 4, 6]
    assert m["batch_gap"] is None and m["label_neighbours"] is None and m["n_labelled"] == 0
    with pytest.raises(ValueError, match="no batch"):
        cell_metrics(CELLS, ["A", None, "B", "A", "B"], LABELS)


def test_gene_categories_and_separability_hand_case() -> None:
    m, _ = gene_metrics(GENES, GENE_IDS, GROUPS)
    c = m["categories"]
    g = dict(zip(["g1A", "g1B", "g2A", "g2B", "g3A"], GENES, strict=True))
    same_group = [cos(g["g1A"], g["g2A"]), cos(g["g1A"], g["g3A"]), cos(g["g2A"], g["g3A"]),
                  cos(g["g1B"], g["g2B"])]  # fmt: skip
    other = [cos(g["g1A"], g["g2B"]), cos(g["g2A"], g["g1B"]), cos(g["g3A"], g["g1B"]),
             cos(g["g3A"], g["g2B"])]  # fmt: skip
    same_gene = [cos(g["g1A"], g["g1B"]), cos(g["g2A"], g["g2B"])]
    assert c["different_gene_same_group"]["mean"] == pytest.approx(np.mean(same_group), abs=1e-6)
    assert c["different_gene_other_group"]["mean"] == pytest.approx(np.mean(other), abs=1e-6)
    assert c["different_gene_other_group"]["n_possible"] == 4  # 6 cross pairs - 2 same gene
    assert c["same_gene_other_group"]["mean"] == pytest.approx(np.mean(same_gene), abs=1e-6)
    assert [c[k]["n_pairs"] for k in c] == [4, 2, 2][:0] or [c[k]["n_pairs"] for k in c] == [
        4,
        4,
        2,
    ]
    # neighbours: g1A->g1B (same), g1B->g2B (0.9952 > 0.9950), g2A->g2B (same), g2B->g1B;
    # g3 has one group only, so it is not eligible: 2 of 4
    assert m["separability"] == {"index": 0.5, "n_eligible": 4, "n_rows": 5, "chance": 0.25}
    assert m["gene_gap"] == pytest.approx(np.mean(same_gene) - np.mean(other), abs=1e-6)


def test_separability_needs_two_groups_and_rows_are_unique() -> None:
    m, _ = gene_metrics(GENES[:3], ["g1", "g2", "g3"], ["all"] * 3)
    assert m["separability"] is None and m["categories"]["same_gene_other_group"]["n_pairs"] == 0
    with pytest.raises(ValueError, match="one row per"):
        gene_metrics(GENES[:2], ["g1", "g1"], ["all", "all"])


def test_sampled_pairs_are_bounded_uniform_and_in_category() -> None:
    rng = np.random.default_rng(0)
    members = [np.arange(0, 30), np.arange(30, 40), np.arange(40, 100)]
    blocks = [(0, 0), (0, 1), (2, 2)]  # 435 + 300 + 1770 = 2505 pairs
    i, j, n, sampled = sample_pairs(members, blocks, 5000, rng)
    assert (n, sampled, len(i)) == (2505, False, 2505)
    assert len(set(zip(i.tolist(), j.tolist(), strict=True))) == 2505  # all, no repeat
    i, j, n, sampled = sample_pairs(members, blocks, 20000, rng)
    assert sampled is False
    i, j, n, sampled = sample_pairs(members, blocks, 1000, rng)
    assert (n, sampled, len(i)) == (2505, True, 1000)
    assert (i != j).all()
    in_0 = (i < 30) & (j < 30)
    cross = (i < 30) & (j >= 30) & (j < 40)
    in_2 = (i >= 40) & (j >= 40)
    assert (in_0 | cross | in_2).all()
    # block shares follow the pair counts (435, 300, 1770) / 2505 within sampling error
    shares = np.array([in_0.mean(), cross.mean(), in_2.mean()])
    np.testing.assert_allclose(shares, [0.174, 0.120, 0.707], atol=0.05)
    # exclusion by rejection
    i, j, n, _ = sample_pairs(members, [(0, 2)], 500, rng, exclude=lambda a, b: (a + b) % 2 == 0)
    assert len(i) == 500 and ((i + j) % 2 == 1).all() and abs(n - 900) < 150


def test_sampled_means_approach_the_exact_ones() -> None:
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(600, 8)) + np.repeat(np.eye(8)[:3] * 2, 200, axis=0)
    batches = list(np.tile(["A", "B"], 300))
    labels = list(np.repeat(["x", "y", "z"], 200))
    exact, _ = cell_metrics(emb, batches, labels, max_pairs=10**6)
    sampled, sims = cell_metrics(emb, batches, labels, max_pairs=3000, max_nn=100, seed=2)
    for k, s in sampled["categories"].items():
        assert s["sampled"] and s["n_pairs"] == 3000 == len(sims[k])
        assert s["n_possible"] == exact["categories"][k]["n_pairs"]
        assert s["mean"] == pytest.approx(exact["categories"][k]["mean"], abs=0.03)
    assert sampled["batch_neighbours"]["n"] == 100


def test_nearest_neighbours_exclude_self_in_chunks() -> None:
    unit = unit_rows(np.random.default_rng(3).normal(size=(50, 4)))
    full = unit @ unit.T
    np.fill_diagonal(full, -np.inf)
    np.testing.assert_array_equal(nearest_neighbours(unit, chunk=7), full.argmax(1))


def _write_inputs(tmp: Path) -> tuple[Path, Path]:
    obs = pd.DataFrame(
        {
            "dataset_id": pd.Categorical(BATCHES),
            "cell_type": ["CD19+ B", "CD19+ B", "B", "NK", np.nan],
        },
        index=[f"c{i}" for i in range(5)],
    )
    adata = anndata.AnnData(obs=obs, obsm={"X_cellfoundry": CELLS.copy()})
    adata.write_h5ad(tmp / "cells.h5ad")
    table = pa.table({
        "ensembl_id": GENE_IDS, "token_id": pa.array([4, 4, 5, 5, 6], pa.int32()), "group": GROUPS,
        "n_cells": pa.array([3, 3, 3, 1, 3], pa.int64()),
        "embedding": pa.array([r.tolist() for r in GENES], pa.list_(pa.float32())),
    })  # fmt: skip
    (tmp / "cells.embeddings").mkdir()  # where `cellfoundry embed` puts them
    pq.write_table(table, tmp / "cells.embeddings" / "genes.parquet")
    return tmp / "cells.h5ad", tmp / "cells.embeddings" / "genes.parquet"


def test_run_batch_files_label_map_and_reuse(tmp_path: Path) -> None:
    cells, genes = _write_inputs(tmp_path)
    cfg = parse_config(BatchEvalConfig, {
        "embeddings": str(cells), "label_map": {"CD19+ B": "B"}, "min_gene_cells": 2,
    })  # fmt: skip
    assert cfg.gene_embeddings == str(genes)  # found beside the .h5ad
    result = run_batch(cfg)
    out = tmp_path / "cells-eval-batch"
    assert result.output_dir == out and not result.reused
    assert {p.name for p in out.iterdir()} >= {"metrics.json", "report.md", "manifest.json",
                                               "cell_similarity.png", "gene_similarity.png"}  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    # after the label map the labels are those of the hand case: B,B,B,NK,None
    assert metrics["cells"]["categories"]["same_type_other_batch"]["mean"] == 0.0
    assert metrics["cells"]["labels"] == {"B": 3, "NK": 1}
    assert metrics["genes"]["n_rows"] == 4  # (g2, B) has n_cells 1 < 2
    assert "batch gap" in (out / "report.md").read_text()
    assert run_batch(cfg).reused
    only_b = parse_config(BatchEvalConfig, {"embeddings": str(cells), "batches": ["B"],
                                            "gene_embeddings": "none",
                                            "output_dir": str(tmp_path / "b")})  # fmt: skip
    only_b_metrics = run_batch(only_b).metrics
    assert only_b_metrics["cells"]["n_cells"] == 2 and only_b_metrics["genes"] is None
    assert not (tmp_path / "b" / "gene_similarity.png").exists()


def test_run_batch_bad_inputs_name_the_fix(tmp_path: Path) -> None:
    cells, _ = _write_inputs(tmp_path)
    with pytest.raises(ValueError, match="cellfoundry embed"):
        run_batch(parse_config(BatchEvalConfig, {"embeddings": str(tmp_path / "none.h5ad")}))
    with pytest.raises(ValueError, match="--batch-key"):
        run_batch(parse_config(BatchEvalConfig, {"embeddings": str(cells), "batch_key": "chem"}))
    with pytest.raises(ValueError, match="no cell"):
        run_batch(parse_config(BatchEvalConfig, {"embeddings": str(cells), "batches": ["Z"]}))
    pq.write_table(pa.table({"ensembl_id": ["g"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="lack column"):
        run_batch(parse_config(BatchEvalConfig, {"embeddings": str(cells),
                                                 "gene_embeddings": str(tmp_path / "bad.parquet")}))  # fmt: skip


def test_cli_evaluate_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cellfoundry.cli import main

    cells, _ = _write_inputs(tmp_path)
    argv = ["evaluate", "batch", "--embeddings", str(cells), "--batch-key", "dataset_id",
            "--label-key", "cell_type", "--output", str(tmp_path / "out"), "--set", "seed=1"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["output_dir"] == str(tmp_path / "out") and summary["n_cells"] == 5
    assert summary["separability_index"] == 0.5
    assert main([*argv[:4], "--batch-key", "nope"]) == 2  # a clear error, no traceback
