"""The screen job's driver side without Ray: pooling resolved per model, what was computed
recorded in the stats table and shard metadata, each perturbation tested against its own
null (its controls, or the same perturbation in a null screen)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from _infer_reference import random_cells

from cellfoundry.config import ConfigError, PerturbJobConfig, parse_config
from cellfoundry.infer.embed import Embedder
from cellfoundry.infer.perturb import perturb_cells, result_metadata
from cellfoundry.infer.perturb_job import (
    _assemble,
    _null_values,
    control_draws,
    resolved,
    what_was_computed,
)
from cellfoundry.infer.perturb_ops import Perturbation


def _cfg(small_model: Path, tmp_path: Path, **extra: object) -> PerturbJobConfig:
    genes = ["ENSG00000000010", "ENSG00000000020"]
    return parse_config(
        PerturbJobConfig,
        {"model": str(small_model), "tokenized": str(tmp_path / "tok"),
         "output_dir": str(tmp_path / "screen"),
         "perturbations": [{"kind": "delete", "genes": [genes[0]]},
                           {"kind": "overexpress", "genes": [genes[1]]}], **extra},
    )  # fmt: skip


def test_layer_metric_and_pooling_settings(small_model: Path, tmp_path: Path, vocab: dict) -> None:
    cfg = _cfg(small_model, tmp_path, emb_layer=0)
    assert cfg.layer == -1 and cfg.emb_layer is None and cfg.metric == "geneformer"
    assert _cfg(small_model, tmp_path).layer == -2  # the default: Geneformer's emb_layer -1
    with pytest.raises(ConfigError, match="not both"):
        _cfg(small_model, tmp_path, layer=-2, emb_layer=-1)
    with pytest.raises(ConfigError, match="is not one of"):
        _cfg(small_model, tmp_path, metric="cosine")
    v1 = {k: v for k, v in vocab.items() if k not in ("<cls>", "<eos>")}
    assert resolved(_cfg(small_model, tmp_path), vocab).pooling == "cls"  # V2: Geneformer's <cls>
    assert resolved(_cfg(small_model, tmp_path), v1).pooling == "mean"
    assert resolved(_cfg(small_model, tmp_path, metric="pooled"), vocab).pooling == "mean"
    assert resolved(_cfg(small_model, tmp_path, pooling="mean"), vocab).pooling == "mean"
    with pytest.raises(ValueError, match="V1 model"):
        resolved(_cfg(small_model, tmp_path, pooling="cls"), v1)
    cfg = resolved(_cfg(small_model, tmp_path, layer=0), vocab)
    computed = what_was_computed(cfg, vocab)
    assert computed == {
        "metric": "geneformer", "layer": 0, "emb_layer": -2, "pooling": "cls",
        "cell_embedding": "<cls> state", "overexpress_original": "cut",
        "null": "matched_controls", "null_draws": 2,
    }  # fmt: skip
    with_null = _cfg(small_model, tmp_path, null_screen=str(tmp_path / "null"))
    assert (
        control_draws(with_null) == 0
        and what_was_computed(resolved(with_null, vocab), vocab)["null"] == "null_screen"
    )


def _shard(cfg: PerturbJobConfig, small_model: Path, vocab: dict, path: Path, seed: int) -> Path:
    """One shard as an actor writes it (schema metadata included)."""
    e = Embedder(small_model, layer=cfg.layer, pooling=cfg.pooling)  # type: ignore[arg-type]
    cells = random_cells(12, seed=seed, min_genes=20, max_genes=40)
    for c in cells:  # every cell expresses gene 10 (token 10 is ENSG00000000010)
        if 10 not in c:
            c[5] = 10
    perts = [Perturbation("delete", (10,)), Perturbation("overexpress", (20,))]
    table = perturb_cells(e, cells, perts, cell_ids=[f"{path.stem}-{i}" for i in range(12)],
                          metric=cfg.metric, null_draws=control_draws(cfg), seed=cfg.seed)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    assert table.schema.metadata[b"metric"] == cfg.metric.encode()
    assert result_metadata(e, cfg.metric)["pooling"] == cfg.pooling
    return path


def test_assemble_tests_each_perturbation_against_its_controls(
    small_model: Path, tmp_path: Path, vocab: dict
) -> None:
    cfg = resolved(_cfg(small_model, tmp_path), vocab)
    part = _shard(cfg, small_model, vocab, tmp_path / "work" / "part-0.parquet", seed=1)
    dest = tmp_path / "artifact"
    dest.mkdir()
    counts = _assemble(cfg, [str(part)], dest, what_was_computed(cfg, vocab))
    assert counts["rows"] == 24 and counts["control_rows"] == 48 and counts["cells_perturbed"] == 12
    stats = pl.read_parquet(dest / "stats.parquet")
    assert stats.height == 2 and set(stats["test"]) == {"matched_controls"}
    assert stats["n_cells"].to_list() == [12, 12] and stats["n_null"].to_list() == [24, 24]
    row = stats.row(0, named=True)
    assert (row["metric"], row["layer"], row["emb_layer"], row["pooling"]) == (
        "geneformer", -2, -1, "cls",
    )  # fmt: skip
    assert pq.read_metadata(dest / "screen" / "part-0.parquet").metadata[b"emb_layer"] == b"-1"
    genes = pl.read_parquet(dest / "gene_stats.parquet")
    assert genes["n_cells"].max() <= 12  # the controls' gene shifts are not the perturbation's


def test_null_screen_values_are_per_perturbation(
    small_model: Path, tmp_path: Path, vocab: dict
) -> None:
    null_dir = tmp_path / "null"
    cfg = resolved(_cfg(small_model, tmp_path), vocab)
    _shard(cfg, small_model, vocab, null_dir / "screen" / "part-0.parquet", seed=2)
    null = _null_values(str(null_dir), goal=False)
    assert null.columns == ["perturbation", "value"] and null.height == 24  # controls left out
    assert set(null["perturbation"]) == {"delete:ENSG00000000010", "overexpress:ENSG00000000020"}
    screened = resolved(_cfg(small_model, tmp_path, null_screen=str(null_dir)), vocab)
    part = _shard(screened, small_model, vocab, tmp_path / "work" / "part-0.parquet", seed=3)
    dest = tmp_path / "artifact"
    dest.mkdir()
    counts = _assemble(screened, [str(part)], dest, what_was_computed(screened, vocab))
    assert counts["control_rows"] == 0
    stats = pl.read_parquet(dest / "stats.parquet")
    assert set(stats["test"]) == {"null_screen"} and stats["n_null"].to_list() == [12, 12]
    assert np.isfinite(stats["pvalue"].to_numpy()).all()
