"""scikit-learn baselines on raw counts: log1p(CP10k) of highly variable genes, same splits.

Counts come from the ``cells`` artifact (parallel lists ``gene_ids`` / ``counts`` per cell),
joined on ``cell_id``; on object storage only the files its manifest lists are read, one at a
time. Highly variable genes are chosen on the training cells only.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from cellfoundry import storage
from cellfoundry.config.tune import BaselineConfig
from cellfoundry.tune.remote import data_file_list, has_manifest, parquet_rows, read_parquet

logger = logging.getLogger(__name__)


def resolve_cells_dir(cells: str | None, tokenized: str) -> Path | str | None:
    """``cells`` if given (must exist), else the ``cells`` artifact beside ``tokenized``: a
    folder, or a URI with a manifest."""
    if cells is not None:
        if storage.is_remote(cells):
            if not has_manifest(cells):
                raise ValueError(
                    f"data.cells {cells}: no manifest.json there, so no complete cells "
                    "artifact; run `cellfoundry corpus` to write it, or fix the URI"
                )
            return cells
        if not (Path(cells) / "data").is_dir():
            raise ValueError(f"data.cells {cells}: no data/ folder; point it at a cells artifact")
        return Path(cells)
    if storage.is_remote(tokenized):
        beside = storage.join(storage.parent(tokenized), "cells")
        return beside if has_manifest(beside) else None
    guess = Path(tokenized).parent / "cells"
    return guess if (guess / "data").is_dir() else None


def _remote_counts(cells: str, wanted: pl.DataFrame) -> tuple[int, pl.DataFrame]:
    """``(n_genes, rows of wanted cells)`` of a cells artifact on object storage, one data
    file at a time (only the wanted cells of each are kept)."""
    hint = "run `cellfoundry corpus` to write the cells artifact, or fix data.cells"
    genes = data_file_list(cells, "genes.parquet", "data.cells", hint)[0]
    parts = [
        read_parquet(f, ["cell_id", "gene_ids", "counts"]).join(wanted, on="cell_id", how="inner")
        for f in data_file_list(cells, "data/*.parquet", "data.cells", hint)
    ]
    return parquet_rows(genes), pl.concat(parts).unique("cell_id", keep="first").sort("_row")


def load_counts(cells_dir: str | Path, cell_ids: np.ndarray) -> sp.csr_matrix:
    """Raw counts [n_cells, n_genes] (CSR, float32) of ``cell_ids`` in that order; columns
    are the corpus gene index of ``genes.parquet``. ``cells_dir``: folder or URI."""
    wanted = pl.DataFrame({"cell_id": cell_ids, "_row": np.arange(len(cell_ids))})
    if storage.is_remote(cells_dir):
        n_genes, frame = _remote_counts(str(cells_dir), wanted)
    else:
        cells_dir = Path(cells_dir)
        n_genes = pl.scan_parquet(cells_dir / "genes.parquet").select(pl.len()).collect().item()
        frame = (
            pl.scan_parquet(cells_dir / "data" / "**" / "*.parquet")
            .select("cell_id", "gene_ids", "counts")
            .join(wanted.lazy(), on="cell_id", how="inner")
            .unique("cell_id", keep="first")
            .sort("_row")
            .collect()
        )
    if frame.height != len(cell_ids):
        missing = sorted(set(cell_ids) - set(frame["cell_id"].to_list()))
        raise ValueError(
            f"data.cells {cells_dir}: {len(missing)} cells have no counts (e.g. {missing[:3]}); "
            "use the cells artifact of the corpus run that produced data.tokenized"
        )
    indices = frame["gene_ids"].explode().to_numpy().astype(np.int64)
    values = frame["counts"].explode().to_numpy().astype(np.float32)
    lengths = frame["gene_ids"].list.len().to_numpy()
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    return sp.csr_matrix((values, indices, indptr), shape=(len(cell_ids), n_genes))


def log_normalize(x: sp.csr_matrix) -> sp.csr_matrix:
    """log1p(count / cell total x 10,000), row by row."""
    totals = np.asarray(x.sum(axis=1)).ravel()
    scale = 1e4 / np.maximum(totals, 1)
    out = sp.diags(scale.astype(np.float32)) @ x
    out.data = np.log1p(out.data)
    return out.tocsr()


def highly_variable(x: sp.csr_matrix, n_top: int) -> np.ndarray:
    """Column indices of the ``n_top`` genes of highest dispersion (variance / mean)."""
    mean = np.asarray(x.mean(axis=0)).ravel()
    sq = np.asarray(x.multiply(x).mean(axis=0)).ravel()
    var = sq - mean**2
    dispersion = np.where(mean > 0, var / np.maximum(mean, 1e-12), -np.inf)
    n_top = min(n_top, int((mean > 0).sum()))
    return np.sort(np.argsort(-dispersion, kind="stable")[:n_top])


def _estimator(name: str, cfg: BaselineConfig, seed: int) -> Any:
    if name == "logreg":
        return LogisticRegression(max_iter=cfg.max_iter, C=0.1)
    if name == "random_forest":
        return RandomForestClassifier(n_estimators=200, n_jobs=1, random_state=seed)
    return LinearSVC(C=0.01, max_iter=cfg.max_iter, random_state=seed)


def _scores(model: Any, x: np.ndarray, n_classes: int) -> np.ndarray:
    """[n, n_classes] class scores (probabilities, or SVM margins) in label-index order."""
    raw = model.predict_proba(x) if hasattr(model, "predict_proba") else model.decision_function(x)
    if raw.ndim == 1:  # binary SVM margins
        raw = np.stack([-raw, raw], axis=1)
    out = np.full((len(x), n_classes), -1e9 if raw.min() < 0 else 0.0)
    out[:, model.classes_] = raw
    return out


def run_baselines(
    counts: sp.csr_matrix, labels: np.ndarray, train: np.ndarray, test: np.ndarray,
    n_classes: int, cfg: BaselineConfig, seed: int,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Fit each baseline on ``train`` rows; return method -> test scores [n_test, n_classes]."""
    if not cfg.methods:
        return {}
    norm = log_normalize(counts)
    genes = highly_variable(norm[train], cfg.n_top_genes)
    scaler = StandardScaler().fit(norm[train][:, genes].toarray())
    x_train = scaler.transform(norm[train][:, genes].toarray())
    x_test = scaler.transform(norm[test][:, genes].toarray())
    out = {}
    for name in cfg.methods:
        start = time.perf_counter()
        model = _estimator(name, cfg, seed).fit(x_train, labels[train])
        out[name] = _scores(model, x_test, n_classes)
        logger.info(
            "baseline %s: fitted on %d cells in %.1f s",
            name,
            len(train),
            time.perf_counter() - start,
        )
    return out
