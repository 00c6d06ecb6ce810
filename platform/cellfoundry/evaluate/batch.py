"""``cellfoundry evaluate batch``: how batch-robust cell and gene embeddings are.

Reads the embedding contract of stage 4: cell embeddings from an AnnData ``.h5ad``
(``.obsm["X_cellfoundry"]``, metadata in ``.obs``) and, optionally, gene embeddings from
Parquet (one row per gene and group). Writes the ``evaluation_batch`` artifact: metrics.json,
report.md, cell_similarity.png and gene_similarity.png. See :mod:`.batch_metrics` for the
pair categories, the gaps between them and the separability index.

Inputs and ``output_dir`` may be ``s3://`` / ``gs://`` URIs: the ``.h5ad`` is downloaded to a
temp file (AnnData reads local files only), the gene Parquet is read in place, and the
report is written as an artifact on object storage (manifest last).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cellfoundry import artifacts, storage
from cellfoundry.config.evaluate import BatchEvalConfig
from cellfoundry.config.loader import config_to_dict
from cellfoundry.evaluate import batch_report
from cellfoundry.evaluate.batch_metrics import cell_metrics, gene_metrics
from cellfoundry.evaluate.report import input_signatures

logger = logging.getLogger(__name__)

KIND = "evaluation_batch"
GENE_COLUMNS = ("ensembl_id", "token_id", "group", "n_cells", "embedding")

__all__ = ["KIND", "BatchEvalResult", "load_cells", "load_genes", "run_batch", "run_batch_job"]


@dataclass
class BatchEvalResult:
    """Where the report went and its figures (``metrics`` is metrics.json)."""

    output_dir: Path | str
    """A folder, or the artifact's URI on object storage."""
    metrics: dict[str, Any]
    reused: bool = False


def _read_h5ad(path: str) -> Any:
    """The AnnData of a local file, or of an object (downloaded to a temp file first)."""
    import anndata

    if not storage.is_remote(path):
        return anndata.read_h5ad(path)
    with tempfile.TemporaryDirectory(prefix="cf-h5ad-") as tmp:
        local = Path(tmp) / "cells.h5ad"
        storage.download_file(path, local)
        return anndata.read_h5ad(local)


def _obs_values(obs: Any, key: str, path: str, label_map: dict[str, str] | None = None) -> list:
    """A ``.obs`` column as a list of str, with None for missing / NaN / empty values."""
    if key not in obs.columns:
        raise ValueError(
            f"{path}: .obs has no column {key!r} (columns: {', '.join(map(str, obs.columns))}); "
            "pass --batch-key / --label-key naming one of them"
        )
    out = []
    for v in obs[key].astype(object).tolist():
        missing = v is None or (isinstance(v, float) and np.isnan(v)) or str(v) in ("", "nan")
        s = None if missing else str(v)
        out.append(label_map.get(s, s) if (label_map and s is not None) else s)
    return out


def load_cells(cfg: BatchEvalConfig) -> tuple[np.ndarray, list, list]:
    """(embeddings float32 [n, d], batches, labels) of the cells kept by ``cfg.batches``."""
    path = cfg.embeddings
    if not storage.is_file(path):
        raise ValueError(
            f"embeddings: {path} does not exist; run `cellfoundry embed` (stage 4) first"
        )
    adata = _read_h5ad(path)
    if cfg.obsm_key not in adata.obsm:
        raise ValueError(
            f"{path}: no .obsm[{cfg.obsm_key!r}] (has {list(adata.obsm)}); set obsm_key"
        )
    emb = np.asarray(adata.obsm[cfg.obsm_key], dtype=np.float32)
    batches = _obs_values(adata.obs, cfg.batch_key, str(path))
    labels = _obs_values(adata.obs, cfg.label_key, str(path), cfg.label_map)
    if cfg.batches is not None:
        keep = np.isin(np.array(batches, dtype=object), cfg.batches)
        if not keep.any():
            raise ValueError(
                f"batches {cfg.batches}: no cell of {path} has those {cfg.batch_key} values "
                f"(found {sorted({b for b in batches if b is not None})})"
            )
        idx = np.flatnonzero(keep)
        emb, batches, labels = emb[idx], [batches[i] for i in idx], [labels[i] for i in idx]
    return emb, batches, labels


def load_genes(
    path: str | Path, min_cells: int = 1, groups: list[str] | None = None
) -> tuple[np.ndarray, list[str], list[str]]:
    """(embeddings float32 [n, d], ensembl ids, groups) of the gene embedding rows with
    ``n_cells >= min_cells`` (and a group in ``groups`` unless it is None). ``path``: a
    file, folder of files, or URI."""
    if not storage.exists(path):
        raise ValueError(
            f"gene_embeddings: {path} does not exist; run `cellfoundry embed` (stage 4) first"
        )
    fs, where = storage.resolve(path)
    table = pq.read_table(where, filesystem=fs)
    missing = [c for c in GENE_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{path}: gene embeddings lack column(s) {missing}; expected {list(GENE_COLUMNS)}"
        )
    table = table.filter(pc.greater_equal(table["n_cells"], min_cells))
    if groups is not None:
        table = table.filter(pc.is_in(pc.cast(table["group"], pa.string()), pa.array(groups)))
    if table.num_rows == 0:
        raise ValueError(
            f"{path}: no gene embedding with n_cells >= {min_cells} in groups {groups or 'any'}; "
            "lower min_gene_cells or check gene_groups"
        )
    flat = pc.list_flatten(table["embedding"]).to_numpy(zero_copy_only=False)
    emb = flat.astype(np.float32).reshape(table.num_rows, -1)
    return emb, table["ensembl_id"].to_pylist(), [str(g) for g in table["group"].to_pylist()]


@artifacts.holds_output(KIND, lambda cfg: cfg.output_dir, object_storage=True)
def run_batch(cfg: BatchEvalConfig) -> BatchEvalResult:
    """Evaluate ``cfg.embeddings`` (and ``cfg.gene_embeddings``); write the artifact."""
    artifact_dir = os.path.splitext(cfg.embeddings)[0] + ".embeddings"  # stage 4's artifact
    has_artifact = storage.is_file(storage.join(artifact_dir, artifacts.MANIFEST))
    gene_embeddings = cfg.gene_embeddings
    if gene_embeddings is None and storage.is_remote(artifact_dir) and has_artifact:
        # in a bucket the gene table lies in the artifact's data prefix, named by its manifest
        # (the config cannot probe a URI while it loads)
        found = artifacts.data_files(artifact_dir, "genes.parquet")
        gene_embeddings = found[0] if found else None
    paths = {"embeddings": cfg.embeddings}
    if gene_embeddings:
        paths["gene_embeddings"] = gene_embeddings
    for name, p in paths.items():
        if not storage.exists(p):
            raise ValueError(f"{name}: {p} does not exist; run `cellfoundry embed` (stage 4) first")
    inputs, signatures = input_signatures(paths)
    if has_artifact:
        inputs["embeddings_artifact"] = storage.normalize(artifact_dir)
    fp_config = {"config": config_to_dict(cfg), "input_files": signatures}
    fp = artifacts.fingerprint(KIND, fp_config, inputs)
    if artifacts.reusable(cfg.output_dir, KIND, fp) is not None:
        logger.info("reusing the complete evaluation at %s", cfg.output_dir)
        metrics = batch_report.read_metrics(cfg.output_dir)
        return BatchEvalResult(_output(cfg.output_dir), metrics, reused=True)

    emb, batches, labels = load_cells(cfg)
    logger.info("cell embeddings: %d cells x %d dims", *emb.shape)
    opts = {"max_pairs": cfg.max_pairs, "max_nn": cfg.max_nn, "seed": cfg.seed}
    cells, cell_sims = cell_metrics(emb, batches, labels, **opts)
    genes = gene_sims = None
    if gene_embeddings:
        g_emb, g_ids, g_groups = load_genes(gene_embeddings, cfg.min_gene_cells, cfg.gene_groups)
        logger.info("gene embeddings: %d (gene, group) rows x %d dims", *g_emb.shape)
        genes, gene_sims = gene_metrics(g_emb, g_ids, g_groups, **opts)
    metrics = {"cells": cells, "genes": genes, "config": config_to_dict(cfg)}
    with artifacts.write_artifact(cfg.output_dir, KIND, fp_config, inputs) as w:
        batch_report.write_report(w.dir, metrics, cell_sims, gene_sims, cfg=cfg)
        w.counts = {"cells": cells["n_cells"], "gene_rows": genes["n_rows"] if genes else 0}
    return BatchEvalResult(_output(cfg.output_dir), metrics)


def _output(path: str) -> Path | str:
    return path if storage.is_remote(path) else Path(path)


def run_batch_job(
    config: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """What ``cellfoundry evaluate batch`` and ``jobs/evaluate.py batch`` do: load the YAML
    (or defaults) with overrides, evaluate, return a JSON-able summary."""
    from cellfoundry.config.loader import load_config

    cfg = load_config(BatchEvalConfig, config, overrides)
    result = run_batch(cfg)
    cells, genes = result.metrics["cells"], result.metrics["genes"]
    sep = genes["separability"] if genes else None
    return {
        "output_dir": str(result.output_dir), "reused": result.reused,
        "n_cells": cells["n_cells"], "batch_gap": cells["batch_gap"], "type_gap": cells["type_gap"],
        "separability_index": sep["index"] if sep else None,
    }  # fmt: skip
