"""Realistic synthetic single-cell data, so every stage runs without ``../shared/data``.

:func:`generate_synthetic` writes raw-count ``.h5ad`` files (CSR, int32, like the real PBMC
files), a gene table and a catalog beside them, deterministically from a seed:

- PBMC-like cell types with marker programmes; negative-binomial counts (gamma-Poisson)
  with a per-cell sequencing depth; mitochondrial ``MT-`` genes taking a few percent;
- two chemistries as batches (``v2`` and ``v3``: different depth and per-gene efficiency);
- planted QC outliers in every dataset that is read: a 20x-depth cell, a cell with 45%
  mitochondrial counts and a cell with only 4 detected genes per ~100 cells;
- a gene-filtered copy of most cells of one dataset (cell duplicates) and a re-release of
  another under the same DOI (a dataset duplicate); labels and a train/test split like
  ``pbmc_facs``; Ensembl IDs in one file, symbols (a few unmappable) in the others.

``truth.json`` beside the files lists what was planted, so a corpus run can be checked.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import yaml

from cellfoundry.corpus.synthetic_files import catalog_row, existing, read_truth, write_h5ad
from cellfoundry.corpus.synthetic_genes import (
    CELL_TYPES,
    GENE_TABLE,
    GenePanel,
    gene_panel,
    write_gene_table,
)
from cellfoundry.paths import shared_path

logger = logging.getLogger(__name__)

__all__ = ["SyntheticData", "generate_synthetic", "read_truth"]

#: dataset id -> (share of n_cells, chemistry, gene ids in the file, obs cell-type column)
_DATASETS = {
    "synth_facs": (0.36, "v2", "ensembl", "celltype"),
    "synth_facs_rerelease": (0.04, "v2", "symbol", "celltype"),
    "synth_v2_raw": (0.25, "v2", "symbol", "cell_type"),
    "synth_v2_filt": (0.20, "v2", "symbol", "cell_type"),
    "synth_v3": (0.15, "v3", "symbol", "cell_type"),
}
_DEPTH = {"v2": 2500.0, "v3": 5000.0}  # median UMIs per cell
_REASONS = ("total_counts_outlier", "mito_outlier", "low_protein_coding_genes")


@dataclass
class SyntheticData:
    """What :func:`generate_synthetic` wrote."""

    catalog: Path  # catalog.yaml (URIs relative to it)
    gene_table: Path  # genes.tsv: pass as corpus.gene_table
    files: dict[str, Path]  # dataset id -> .h5ad
    truth: dict[str, Any]  # also in truth.json: cells, planted outliers, duplicates


def _gene_programmes(panel: GenePanel, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Expected expression share per gene (sums to 1 over non-MT genes) for each cell type."""
    n = panel.table.height
    base = rng.lognormal(0.0, 1.6, size=n)
    base[~panel.protein_coding] *= 0.2
    base[panel.mitochondrial] = 0.0
    out = {}
    for name, (_, markers) in CELL_TYPES.items():
        prof = base * rng.lognormal(0.0, 0.25, size=n)  # each type shifts every gene a little
        prof[panel.index_of(markers)] += base.mean() * rng.uniform(
            15, 40, size=len(panel.index_of(markers))
        )
        out[name] = prof / prof.sum()
    return out


def _counts(
    types: np.ndarray, programmes: dict[str, np.ndarray], panel: GenePanel, chemistry: str,
    efficiency: np.ndarray, rng: np.random.Generator,
) -> sp.csr_matrix:  # fmt: skip
    """Raw counts (cells x genes): NB(mean = depth * share, dispersion 5) with clipped
    log-normal depth and a 1-6% mitochondrial share, built in blocks of 1,024 cells."""
    mito = panel.mitochondrial
    mito_prof = np.where(mito, 1.0, 0.0) / max(1, mito.sum())
    blocks = []
    for start in range(0, len(types), 1024):
        t = types[start : start + 1024]
        depth = _DEPTH[chemistry] * np.exp(np.clip(rng.normal(0, 0.35, len(t)), -0.7, 0.7))
        frac_mt = np.clip(rng.normal(0.03, 0.008, len(t)), 0.01, 0.06)
        share = np.stack([programmes[x] for x in t]) * efficiency
        share /= share.sum(axis=1, keepdims=True)
        mean = depth[:, None] * ((1 - frac_mt)[:, None] * share + frac_mt[:, None] * mito_prof)
        lam = rng.gamma(5.0, mean / 5.0)
        blocks.append(sp.csr_matrix(rng.poisson(lam).astype(np.int32)))
    return sp.vstack(blocks, format="csr")


def _plant_outliers(
    x: sp.csr_matrix, panel: GenePanel, rng: np.random.Generator
) -> tuple[sp.csr_matrix, dict[str, list[int]]]:
    """Turn ~1% of cells into each kind of QC outlier; returns the counts and their rows."""
    n = x.shape[0]
    k = max(1, round(0.01 * n))
    rows = rng.choice(n, size=3 * k, replace=False)
    planted = {r: sorted(int(i) for i in rows[j * k : (j + 1) * k]) for j, r in enumerate(_REASONS)}
    mito = panel.mitochondrial
    pc = np.flatnonzero(panel.protein_coding & ~mito)
    order = [i for r in _REASONS for i in planted[r]]
    dense = x[order].toarray()  # only the planted cells
    for j, i in enumerate(order):
        if i in planted["total_counts_outlier"]:  # 20x the depth (a multiplet)
            dense[j] = rng.poisson(dense[j] * 20.0 + 0.05)
        elif i in planted["mito_outlier"]:  # 45% of the cell's counts on MT genes
            extra = int(0.45 * dense[j].sum() / 0.55)
            dense[j, mito] += rng.multinomial(extra, np.full(mito.sum(), 1.0 / mito.sum()))
        else:  # an empty droplet: 4 genes detected
            dense[j] = 0
            dense[j, rng.choice(pc, size=4, replace=False)] = rng.integers(1, 4, size=4)
    keep = np.ones(n, dtype=np.int32)
    keep[order] = 0
    cleared = sp.csr_matrix(
        (x.data * np.repeat(keep, np.diff(x.indptr)), x.indices, x.indptr), x.shape
    )
    new = sp.coo_matrix(dense)
    new = sp.csr_matrix((new.data, (np.asarray(order)[new.row], new.col)), shape=x.shape)
    out = (cleared + new).tocsr().astype(np.int32)
    out.eliminate_zeros()
    return out, planted


def _top_genes(x: sp.csr_matrix, k: int) -> np.ndarray:
    """Genes among the ``k`` highest counts of any cell."""
    tops = [
        np.argsort(-x[s : s + 1024].toarray(), axis=1, kind="stable")[:, :k]
        for s in range(0, x.shape[0], 1024)
    ]
    return np.unique(np.concatenate(tops)) if tops else np.zeros(0, np.int64)


def _barcodes(n: int, rng: np.random.Generator) -> np.ndarray:
    letters = np.array(list("ACGT"))[rng.integers(0, 4, size=(n, 16))]
    codes = np.array(["".join(r) + "-1" for r in letters], dtype=object)
    _, first = np.unique(codes, return_index=True)
    if len(first) < n:  # a collision (about 1 in 4**16 per pair): make the names unique
        codes = np.array([f"{c[:-2]}-{i + 1}" for i, c in enumerate(codes)], dtype=object)
    return codes


@dataclass
class _Dataset:
    x: sp.csr_matrix  # raw counts, cells x panel genes
    obs: dict[str, np.ndarray]
    barcodes: np.ndarray
    planted: dict[str, list[int]]  # QC reason -> rows

    def rows(self, sel: np.ndarray | slice, obs: dict[str, np.ndarray] | None = None) -> _Dataset:
        """The selected cells, as a new dataset (no planted outliers)."""
        obs = {k: v[sel] for k, v in (obs or self.obs).items()}
        return _Dataset(self.x[sel], obs, self.barcodes[sel], {})


def _simulate(
    ds: str, n: int, panel: GenePanel, programmes: dict[str, np.ndarray],
    efficiency: np.ndarray, rng: np.random.Generator,
) -> _Dataset:  # fmt: skip
    _, chem, _, type_col = _DATASETS[ds]
    names = list(CELL_TYPES)
    probs = np.array([CELL_TYPES[t][0] for t in names])
    types = np.array(names, dtype=object)[rng.choice(len(names), size=n, p=probs / probs.sum())]
    x = _counts(types, programmes, panel, chem, efficiency, rng)
    x, planted = _plant_outliers(x, panel, rng)
    obs = {type_col: types, "batch": np.full(n, chem, dtype=object)}
    if ds == "synth_facs":
        obs["split"] = np.where(rng.random(n) < 0.8, "train", "test").astype(object)
    return _Dataset(x, obs, _barcodes(n, rng), planted)


def generate_synthetic(
    output: str | Path,
    *,
    n_cells: int = 3000,
    seed: int = 0,
    n_genes: int = 2000,
    real_genes: bool | None = None,
) -> SyntheticData:
    """Write the synthetic datasets, ``genes.tsv``, ``catalog.yaml`` and ``truth.json`` to ``output``.

    ``n_cells``: cells over all files (cells_in of a corpus run); ``n_genes``: panel size;
    ``real_genes``: see :func:`~cellfoundry.corpus.synthetic_genes.gene_panel`.
    """
    if n_cells < 200:
        raise ValueError(f"n_cells={n_cells}: use at least 200 cells (5 datasets with outliers)")
    out = Path(output)
    if real_genes is None:
        real_genes = shared_path(*GENE_TABLE).is_file()
    params = {"n_cells": n_cells, "seed": seed, "n_genes": n_genes, "real_genes": real_genes}
    previous = existing(out, params, list(_DATASETS))
    if previous is not None:
        logger.info("synthetic data in %s already made with %s: reusing it", out, params)
        files = {ds: out / f"{ds}.h5ad" for ds in _DATASETS}
        return SyntheticData(out / "catalog.yaml", out / "genes.tsv", files, previous)
    out.mkdir(parents=True, exist_ok=True)
    (out / "truth.json").unlink(missing_ok=True)  # written last: marks a complete set
    rng = np.random.default_rng(seed)
    panel = gene_panel(n_genes, rng, real=real_genes)
    programmes = _gene_programmes(panel, rng)
    n_all = panel.table.height
    efficiency = {"v2": np.ones(n_all), "v3": rng.lognormal(0.0, 0.4, n_all)}  # the batch effect
    sizes = {k: round(v[0] * n_cells) for k, v in _DATASETS.items()}
    sizes["synth_v3"] = n_cells - sum(v for k, v in sizes.items() if k != "synth_v3")
    data = {
        ds: _simulate(ds, sizes[ds], panel, programmes, efficiency[_DATASETS[ds][1]], rng)
        for ds in ("synth_facs", "synth_v2_raw", "synth_v3")
    }
    # A re-release of synth_facs's first cells under the same DOI (a dataset duplicate).
    facs = data["synth_facs"]
    k = sizes["synth_facs_rerelease"]
    data["synth_facs_rerelease"] = facs.rows(slice(0, k), {"celltype": facs.obs["celltype"]})
    # A gene-filtered copy of synth_v2_raw's non-outlier cells (like 10x "filtered" matrices).
    raw = data["synth_v2_raw"]
    normal = np.setdiff1d(np.arange(raw.x.shape[0]), [i for r in raw.planted.values() for i in r])
    copy = np.sort(rng.choice(normal, size=min(len(normal), sizes["synth_v2_filt"]), replace=False))
    data["synth_v2_filt"] = raw.rows(copy)
    # Its genes: every gene among any cell's top 32 (so duplicates stay findable), 60% of the rest.
    filt_genes = np.union1d(_top_genes(raw.x[copy], 32), np.flatnonzero(rng.random(n_all) < 0.6))
    truth: dict[str, Any] = {"params": params, "seed": seed, "genes": panel.source, "datasets": {}}
    files = {}
    for ds, (_, chem, gene_ids, _) in _DATASETS.items():
        d = data[ds]
        genes = filt_genes if ds == "synth_v2_filt" else np.arange(n_all)
        files[ds] = out / f"{ds}.h5ad"
        unmapped = 0 if gene_ids == "ensembl" else 20
        write_h5ad(files[ds], d.x[:, genes], panel, genes, d.obs, gene_ids, d.barcodes, unmapped)
        truth["datasets"][ds] = {
            "n_cells": int(d.x.shape[0]), "chemistry": chem, "gene_ids": gene_ids,
            "planted": {r: [str(d.barcodes[i]) for i in rows] for r, rows in d.planted.items()},
        }  # fmt: skip
    truth["datasets"]["synth_v2_filt"]["duplicate_of"] = "synth_v2_raw"
    truth["datasets"]["synth_facs_rerelease"]["duplicate_dataset_of"] = "synth_facs"
    planted = [d["planted"] for d in truth["datasets"].values()]
    truth["expected"] = {
        "cells_in": sum(d["n_cells"] for d in truth["datasets"].values()),
        "duplicates": k + len(copy),
        "filtered": {r: sum(len(p.get(r, [])) for p in planted) for r in _REASONS},
    }
    gene_table = write_gene_table(panel, out / "genes.tsv")
    catalog = out / "catalog.yaml"
    rows = [catalog_row(ds, _DATASETS[ds][3]) for ds in _DATASETS]
    catalog.write_text(yaml.safe_dump({"datasets": rows}, sort_keys=False))
    (out / "truth.json").write_text(json.dumps(truth, indent=2))
    logger.info("wrote %d synthetic cells in %d files to %s", n_cells, len(files), out)
    return SyntheticData(catalog, gene_table, files, truth)
