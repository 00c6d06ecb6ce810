"""Stage 4 on a real local Ray cluster: embeddings and a perturbation screen over real PBMC
cells with the tiny model, checked against the in-process Embedder / perturb_cells."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cellfoundry.config import EmbedJobConfig, PerturbJobConfig, parse_config
from cellfoundry.infer.common import cells_of
from cellfoundry.infer.embed import Embedder
from cellfoundry.infer.embed_job import run_embed
from cellfoundry.infer.outputs import GENE_SCHEMA
from cellfoundry.infer.perturb import RESULT_SCHEMA, perturb_cells
from cellfoundry.infer.perturb_job import run_perturb, select_cells
from cellfoundry.infer.perturb_ops import perturbation_from_genes
from cellfoundry.infer.states import sample_state_cells

ATOL = 1e-4


def shards(corpus: Any) -> list[Path]:
    return sorted(Path(corpus.tokenized).glob("part-*.parquet"))


def first_cells(corpus: Any, n: int) -> pa.Table:
    tables, total = [], 0
    for f in shards(corpus):
        t = pq.read_table(f)
        tables.append(t.slice(0, n - total))
        total += tables[-1].num_rows
        if total >= n:
            break
    return pa.concat_tables(tables)


def test_embed_job_contract(
    ray_local: None, pbmc_corpus: Any, tiny_model: Path, tmp_path: Path
) -> None:
    cfg = parse_config(
        EmbedJobConfig,
        {
            "model": str(tiny_model), "tokenized": str(pbmc_corpus.tokenized),
            "output": str(tmp_path / "emb" / "pbmc.h5ad"), "max_cells": 300,
            "compute": {"batch_size": 64, "model_batch_size": 16},
        },
    )  # fmt: skip
    result = run_embed(cfg)
    import anndata as ad

    adata = ad.read_h5ad(result.h5ad)
    cells = first_cells(pbmc_corpus, 300)
    assert adata.obs_names.tolist() == cells["cell_id"].to_pylist()  # input order and IDs
    assert {"dataset_id", "cell_type", "split"} <= set(adata.obs.columns)
    x = adata.obsm["X_cellfoundry"]
    assert x.dtype == np.float32 and x.shape == (300, 64)
    e = Embedder(tiny_model, batch_size=16)
    assert np.allclose(x, e.embed_cells(cells_of(cells)), atol=ATOL)
    uns = adata.uns["cellfoundry"]
    assert uns["layer"] == -2 and uns["pooling"] == "mean" and uns["model_dir"] == str(tiny_model)
    assert {"input_dir", "created_at", "code_version", "model_manifest_sha256"} <= set(uns)
    genes = pq.read_table(result.artifact / "genes.parquet")
    assert genes.schema == GENE_SCHEMA and set(genes["group"].to_pylist()) == {"all"}
    per_cell = e.embed_genes(cells_of(cells))
    token = Counter(int(t) for ids, _ in per_cell for t in ids).most_common(1)[0][0]
    ref = np.mean([emb[ids == token][0] for ids, emb in per_cell if token in ids], axis=0)
    row = genes.filter(pa.compute.equal(genes["token_id"], token)).to_pylist()[0]
    assert row["n_cells"] == sum(token in ids for ids, _ in per_cell)
    assert np.allclose(row["embedding"], ref, atol=ATOL) and row["ensembl_id"].startswith("ENSG")
    assert (result.artifact / "umap.png").stat().st_size > 1000
    assert run_embed(cfg).reused


def test_embed_cli(ray_local: None, pbmc_corpus: Any, tiny_model: Path, tmp_path: Path) -> None:
    from cellfoundry.cli import main

    out = tmp_path / "cli.h5ad"
    argv = ["embed", "--model", str(tiny_model), "--input", str(pbmc_corpus.tokenized),
            "--output", str(out), "--set", "max_cells=40", "--set", "umap_color=null",
            "--set", "genes=false", "--set", "layer=-1"]  # fmt: skip
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "cli.embeddings" / "manifest.json").read_text())
    assert manifest["kind"] == "embeddings" and manifest["counts"]["cells"] == 40
    assert (
        main(["embed", "--model", str(tiny_model), "--input", str(tmp_path), "--output", str(out)])
        == 2
    )


def test_perturb_job_equals_direct_and_resumes(
    ray_local: None, pbmc_corpus: Any, tiny_model: Path, tmp_path: Path
) -> None:
    per_shard = 5
    selected = [select_cells(pq.read_table(f), {}, per_shard) for f in shards(pbmc_corpus)]
    cells = [c for t in selected for c in cells_of(t)]
    vocab = json.loads((tiny_model / "token_dictionary.json").read_text())
    names = {v: k for k, v in vocab.items()}
    common = [names[t] for t, _ in Counter(int(t) for c in cells for t in c[1:-1]).most_common(3)]
    specs = [
        {"kind": "delete", "genes": [common[0]]},
        {"kind": "delete", "genes": [common[0], common[1]]},
        {"kind": "overexpress", "genes": [common[2]]},
        {"kind": "inhibit", "genes": [common[1]]},
        {"kind": "activate", "genes": [common[2]]},
    ]
    goal = {"column": "dataset_id", "value": "pbmc3k", "max_cells": 40}
    cfg = parse_config(
        PerturbJobConfig,
        {"model": str(tiny_model), "tokenized": str(pbmc_corpus.tokenized),
         "output_dir": str(tmp_path / "screen"), "perturbations": specs, "goal": goal,
         "max_cells": per_shard, "compute": {"model_batch_size": 16}},
    )  # fmt: skip
    result = run_perturb(cfg)
    screen = pl.read_parquet(sorted((result.artifact / "screen").glob("*.parquet")))
    # direct, in-process: same cells in shard order, the goal from the job's seeded sample of
    # 40 pbmc3k cells (goal.seed 0: the 40 smallest blake2b(seed, cell_id));
    # the job's defaults: Geneformer's metric, <cls> pooling on this V2 model, 2 controls
    e = Embedder(tiny_model, batch_size=16, pooling="cls")
    pbmc3k = pa.concat_tables(
        select_cells(pq.read_table(f), {"dataset_id": ["pbmc3k"]}, None)
        for f in shards(pbmc_corpus)
    )
    goal_cells = sample_state_cells(pbmc3k, "dataset_id", ["pbmc3k"], 40, seed=0)
    goal_vec = e.embed_cells(cells_of(goal_cells)).mean(0)
    perts = [perturbation_from_genes(s["kind"], s["genes"], vocab) for s in specs]
    ids = [i for t in selected for i in t["cell_id"].to_pylist()]
    direct = pl.from_arrow(
        perturb_cells(e, cells, perts, goal=goal_vec, cell_ids=ids, null_draws=2, seed=0)
    )
    assert screen.height == direct.height > 20 and screen["control"].sum() > 0
    assert screen["cell_id"].to_list() == direct["cell_id"].to_list()  # order preserved
    assert screen["perturbation"].to_list() == direct["perturbation"].to_list()
    for col in ("cell_cos", "goal_shift"):
        assert np.allclose(screen[col].to_numpy(), direct[col].to_numpy(), atol=ATOL)
    stats = pl.read_parquet(result.artifact / "stats.parquet")
    assert stats.height == 5 and set(stats["tested"]) == {"goal_shift"}
    assert set(stats["test"]) == {"matched_controls"} and set(stats["metric"]) == {"geneformer"}
    assert set(stats["emb_layer"]) == {-1} and set(stats["pooling"]) == {"cls"}
    assert stats["fdr"].is_between(0, 1).all() and (stats["fdr"] >= stats["pvalue"]).all()
    assert pl.read_parquet(result.artifact / "gene_stats.parquet").height > 0
    assert (result.artifact / "stats.png").is_file()
    assert run_perturb(cfg).reused

    # resume: a finished shard in the work folder is not recomputed
    fp = json.loads((result.artifact / "manifest.json").read_text())["fingerprint"]
    shutil.rmtree(result.artifact)
    work = Path(f"{cfg.output_dir}.work") / fp
    work.mkdir(parents=True)
    marker = {name: [None] for name in RESULT_SCHEMA.names} | {
        "cell_id": ["MARKER"],
        "cell_cos": [1.0],
    }
    pq.write_table(pa.table(marker, schema=RESULT_SCHEMA), work / shards(pbmc_corpus)[0].name)
    again = run_perturb(cfg)
    first = pq.read_table(again.artifact / "screen" / shards(pbmc_corpus)[0].name)
    assert first["cell_id"].to_pylist() == ["MARKER"]
    second = pq.read_table(again.artifact / "screen" / shards(pbmc_corpus)[1].name)
    assert second.num_rows > 0 and not work.parent.exists()
    bad = {"model": str(tiny_model), "tokenized": str(pbmc_corpus.tokenized),
           "output_dir": str(tmp_path / "bad"), "perturbations": [{"kind": "delete", "genes": ["ENSGXX"]}]}  # fmt: skip
    with pytest.raises(ValueError, match="not in the model's token dictionary"):
        run_perturb(parse_config(PerturbJobConfig, bad))
