"""The files of the synthetic data set: .h5ad writer, catalog rows, reuse of an earlier run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from cellfoundry.corpus.synthetic_genes import GenePanel

#: Shared by the original and its re-release (a DOI duplicate the corpus drops).
DOI = "10.5555/cellfoundry.synthetic.1"


def write_h5ad(
    path: Path, x: sp.csr_matrix, panel: GenePanel, genes: np.ndarray, obs: dict[str, np.ndarray],
    gene_ids: str, barcodes: np.ndarray, unmapped: int,
) -> None:  # fmt: skip
    """Raw counts as CSR int32 with var ids per ``gene_ids`` ("ensembl": IDs + symbols;
    "symbol": symbols plus ``unmapped`` clone names no gene table knows), obs as categories."""
    import anndata as ad
    import pandas as pd

    ids, symbols = panel.ensembl_ids[genes], panel.symbols[genes]
    if gene_ids == "ensembl":
        var = pd.DataFrame({"ensembl_id": ids, "gene_symbol": symbols}, index=pd.Index(ids))
    else:  # symbols, plus a few lncRNA clone names no gene table knows (like real 10x files)
        names = np.concatenate([symbols, [f"AC{900000 + i}.1" for i in range(unmapped)]])
        var = pd.DataFrame({"gene_symbol": names}, index=pd.Index(names))
        if unmapped:
            rng = np.random.default_rng(len(names))
            extra = sp.csr_matrix(rng.poisson(0.05, size=(x.shape[0], unmapped)).astype(np.int32))
            x = sp.hstack([x, extra], format="csr")
    frame = pd.DataFrame(
        {k: pd.Categorical(v.astype(str)) for k, v in obs.items()},
        index=pd.Index(barcodes.astype(str)),
    )
    adata = ad.AnnData(X=x.astype(np.int32), obs=frame, var=var)
    adata.uns["source"] = "cellfoundry.corpus.synthetic"
    adata.write_h5ad(path)


def catalog_row(ds: str, type_col: str) -> dict[str, Any]:
    """The catalog entry of a synthetic dataset (URI relative to the catalog)."""
    row: dict[str, Any] = {"id": ds, "uri": f"{ds}.h5ad", "organ": "blood", "platform": "droplet"}
    if ds.startswith("synth_facs"):
        row["doi"] = DOI
    metadata = {"cell_type": type_col}
    if ds != "synth_facs_rerelease":
        metadata["batch"] = "batch"
    if ds == "synth_facs":
        metadata["split"] = "split"
    row["metadata"] = metadata
    return row


def existing(out: Path, params: dict[str, Any], datasets: list[str]) -> dict[str, Any] | None:
    """The truth of what an earlier call with the same parameters wrote to ``out``, or None
    when anything is missing: a rerun keeps the files (and a corpus run's reusable artifacts)."""
    try:
        truth = json.loads((out / "truth.json").read_text())
    except (OSError, ValueError):
        return None
    paths = [out / "catalog.yaml", out / "genes.tsv", *(out / f"{ds}.h5ad" for ds in datasets)]
    if truth.get("params") != params or not all(p.is_file() for p in paths):
        return None
    return truth


def read_truth(output: str | Path) -> dict[str, Any]:
    """The ``truth.json`` that :func:`generate_synthetic` wrote to ``output``."""
    path = Path(output) / "truth.json"
    if not path.is_file():
        raise ValueError(f"{path} does not exist; run `cellfoundry synth --output {output}` first")
    return json.loads(path.read_text())
