"""Precision of a screen: ``compute.dtype: auto`` runs screens in fp32, bf16 only when asked;
the precision that ran is in each shard's metadata, ``stats.parquet`` and the manifest's
record (``computed``)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import torch
from _infer_reference import random_cells

from cellfoundry.config import PerturbJobConfig, parse_config
from cellfoundry.infer.embed import Embedder
from cellfoundry.infer.perturb import Perturbation, perturb_cells, precision_of
from cellfoundry.infer.perturb_job import _assemble, resolved, what_was_computed


def _cfg(small_model: Path, tmp_path: Path, **compute: object) -> PerturbJobConfig:
    return parse_config(
        PerturbJobConfig,
        {"model": str(small_model), "tokenized": str(tmp_path / "tok"),
         "output_dir": str(tmp_path / "screen"), "compute": compute,
         "perturbations": [{"kind": "delete", "genes": ["ENSG00000000010"]}]},
    )  # fmt: skip


def test_screens_default_to_fp32(small_model: Path, tmp_path: Path, vocab: dict) -> None:
    assert resolved(_cfg(small_model, tmp_path), vocab).compute.dtype == "fp32"
    assert resolved(_cfg(small_model, tmp_path, dtype="bf16"), vocab).compute.dtype == "bf16"
    assert resolved(_cfg(small_model, tmp_path, dtype="fp32"), vocab).compute.dtype == "fp32"


def test_precision_that_ran_is_recorded(small_model: Path, tmp_path: Path, vocab: dict) -> None:
    from cellfoundry.model import load_model

    # a bf16 model passed in is kept in bf16 (on CPU too): what a GPU actor asked for bf16 runs
    model = load_model(small_model).to(torch.bfloat16)
    e = Embedder(model, token_dictionary=vocab, pooling="cls")
    assert precision_of(e) == "bf16"
    cells = random_cells(6, seed=8, min_genes=12, max_genes=30)
    for c in cells:
        c[4] = 10  # every cell expresses the perturbed gene
    table = perturb_cells(e, cells, [Perturbation("delete", (10,))], null_draws=1)
    assert table.schema.metadata[b"precision"] == b"bf16"
    part = tmp_path / "work" / "part-0.parquet"
    part.parent.mkdir()
    pq.write_table(table, part)
    cfg = resolved(_cfg(small_model, tmp_path, dtype="bf16"), vocab)
    computed = what_was_computed(cfg, vocab)
    dest = tmp_path / "artifact"
    dest.mkdir()
    _assemble(cfg, [str(part)], dest, computed)
    assert computed["precision"] == "bf16"
    assert set(pl.read_parquet(dest / "stats.parquet")["precision"]) == {"bf16"}
    fp32 = Embedder(small_model, pooling="cls")
    assert precision_of(fp32) == "fp32"
