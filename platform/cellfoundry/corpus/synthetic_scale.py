"""Synthetic corpora of Genecorpus-like depth and size, written file by file in bounded memory.

:func:`~cellfoundry.corpus.synthetic.generate_synthetic` draws every gene of every cell
(dense negative-binomial counts) and holds all its datasets in memory: right for the few
thousand cells of a test, not for a million cells at ~1,400 detected genes each (~1.4e9
non-zeros). :func:`generate_scale_corpus` reuses its gene panel and cell-type programmes but
draws each cell's UMIs directly, as sequencing does (each UMI picks a gene with the cell
type's expression shares; 1-6% land on ``MT-`` genes), so the cost grows with the UMIs, not
with the panel. The UMIs per cell are chosen so that the *expected number of detected genes*
follows a log-normal distribution (``genes_mean``, ``genes_sigma``). Each file is one dataset
of ``cells_per_file`` cells whose CSR matrix is streamed to a gzip-compressed ``.h5ad`` in
blocks of cells; memory stays at one block whatever the corpus size. ``catalog.yaml`` and
``genes.tsv`` sit beside the files. No QC outliers or duplicates are planted: every cell is
an ordinary, distinct cell.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import yaml

from cellfoundry.corpus.synthetic import _barcodes, _gene_programmes
from cellfoundry.corpus.synthetic_genes import CELL_TYPES, GenePanel, gene_panel, write_gene_table

logger = logging.getLogger(__name__)

__all__ = ["ScaleCorpus", "ScaleParams", "generate_scale_corpus"]

_BLOCK = 256  # cells drawn at once: the counting buffer is block x panel int64 (~40 MB)
_CHUNK = 1 << 18  # HDF5 chunk of data/indices (elements): 1 MiB of int32 before gzip
_UMI_GRID = np.geomspace(50, 500_000, 400)  # UMIs per cell at which detected genes are tabled


@dataclass(frozen=True)
class ScaleParams:
    """What the files depend on (recorded in ``params.json``; file ``i`` depends on these and
    ``i`` only, so a larger corpus of the same parameters extends a smaller one)."""

    cells_per_file: int = 50_000
    genes_mean: float = 1400.0
    """Mean detected genes (non-zero columns) per cell."""
    genes_sigma: float = 0.5
    """Log-normal spread (sigma of the log) of detected genes per cell."""
    n_genes: int = 20_000
    """Gene panel size (real genes of the Geneformer V2 vocabulary when ``../shared`` has them)."""
    seed: int = 0
    real_genes: bool | None = None
    """None: real genes when the shared gene table exists, else generated IDs."""

    def __post_init__(self) -> None:
        if self.cells_per_file < 1:
            raise ValueError("cells_per_file must be >= 1 (tens of thousands is realistic)")
        if not 10 <= self.genes_mean <= self.n_genes / 2:
            raise ValueError(
                f"genes_mean {self.genes_mean} must lie in [10, n_genes / 2]; raise n_genes "
                "or lower genes_mean"
            )
        if self.genes_sigma < 0:
            raise ValueError("genes_sigma must be >= 0 (0.5 gives a Genecorpus-like spread)")


@dataclass
class ScaleCorpus:
    """What :func:`generate_scale_corpus` wrote."""

    catalog: Path
    gene_table: Path
    files: list[Path]
    params: ScaleParams


class _CellModel:
    """Per cell type: the CDF of its genes' expression shares and the table of expected
    detected genes against UMIs (to pick each cell's UMIs from its detected-gene target)."""

    def __init__(self, panel: GenePanel, programmes: dict[str, np.ndarray]) -> None:
        self.n_genes = panel.table.height
        self.mito = np.flatnonzero(panel.mitochondrial)
        self.types = list(CELL_TYPES)
        probs = np.array([CELL_TYPES[t][0] for t in self.types])
        self.type_probs = probs / probs.sum()
        self.cdf, self.detected = [], []
        for t in self.types:
            share = programmes[t]  # sums to 1 over non-MT genes
            cdf = np.cumsum(share)
            self.cdf.append(cdf / cdf[-1])
            # expected distinct genes among u draws: sum_g 1 - (1 - p_g)^u (increasing in u)
            log_miss = np.log1p(-np.minimum(share, 1 - 1e-12))
            self.detected.append(
                np.array([self.n_genes - np.exp(u * log_miss).sum() for u in _UMI_GRID])
            )

    def block(
        self, types: np.ndarray, genes: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CSR (indptr int64 [n+1], indices int32, data int32) of ``len(types)`` cells with
        ``genes`` (float [n]) expected detected non-MT genes each."""
        n, g = len(types), self.n_genes
        umis = np.zeros(n, dtype=np.int64)
        rows_all, genes_all = [], []
        for t in np.unique(types):
            rows = np.flatnonzero(types == t)
            umis[rows] = np.rint(np.interp(genes[rows], self.detected[t], _UMI_GRID))
            picked = np.searchsorted(self.cdf[t], rng.random(int(umis[rows].sum())), side="right")
            rows_all.append(np.repeat(rows, umis[rows]))
            genes_all.append(np.minimum(picked, g - 1))
        frac_mt = np.clip(rng.normal(0.03, 0.008, n), 0.01, 0.06)  # like generate_synthetic
        n_mt = rng.poisson(umis * frac_mt / (1 - frac_mt))
        rows_all.append(np.repeat(np.arange(n), n_mt))
        genes_all.append(self.mito[rng.integers(0, len(self.mito), int(n_mt.sum()))])
        key = np.concatenate(rows_all) * g + np.concatenate(genes_all)
        counts = np.bincount(key, minlength=n * g)  # UMIs per (cell, gene), row-major
        nz = np.flatnonzero(counts)
        indptr = np.zeros(n + 1, dtype=np.int64)
        indptr[1:] = np.cumsum(np.bincount(nz // g, minlength=n))
        return indptr, (nz % g).astype(np.int32), counts[nz].astype(np.int32)


def _model(params: ScaleParams) -> tuple[GenePanel, _CellModel]:
    rng = np.random.default_rng(params.seed)
    panel = gene_panel(params.n_genes, rng, real=params.real_genes)
    return panel, _CellModel(panel, _gene_programmes(panel, rng))


def _write_file(path: Path, index: int, params: ScaleParams) -> Path:
    """File ``index``: obs/var through anndata, then X streamed into it block by block."""
    import anndata as ad
    import h5py
    import pandas as pd

    panel, model = _model(params)
    rng = np.random.default_rng([params.seed, index])
    n = params.cells_per_file
    types = rng.choice(len(model.types), size=n, p=model.type_probs)
    mu = np.log(params.genes_mean) - params.genes_sigma**2 / 2  # so that the mean is genes_mean
    genes = np.clip(rng.lognormal(mu, params.genes_sigma, n), 10, model.n_genes / 2)
    ids = panel.ensembl_ids
    var = pd.DataFrame({"ensembl_id": ids, "gene_symbol": panel.symbols}, index=pd.Index(ids))
    obs = pd.DataFrame(
        {
            "celltype": pd.Categorical(np.array(model.types, dtype=object)[types]),
            "batch": pd.Categorical([path.stem] * n),
        },
        index=pd.Index(_barcodes(n, rng).astype(str)),
    )
    tmp = path.with_suffix(".tmp.h5ad")
    adata = ad.AnnData(obs=obs, var=var)
    adata.uns["source"] = "cellfoundry.corpus.synthetic_scale"
    adata.write_h5ad(tmp)
    with h5py.File(tmp, "a") as h5:
        x = h5.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                        "shape": np.array([n, model.n_genes], dtype=np.int64)})  # fmt: skip
        kw = {"maxshape": (None,), "chunks": (_CHUNK,), "compression": "gzip"}
        data = x.create_dataset("data", shape=(0,), dtype=np.int32, **kw)
        indices = x.create_dataset("indices", shape=(0,), dtype=np.int32, **kw)
        indptr = np.zeros(n + 1, dtype=np.int64)
        for start in range(0, n, _BLOCK):
            stop = min(start + _BLOCK, n)
            ptr, idx, val = model.block(types[start:stop], genes[start:stop], rng)
            end = int(indptr[start]) + len(val)
            data.resize((end,))
            indices.resize((end,))
            data[indptr[start] :], indices[indptr[start] :] = val, idx
            indptr[start + 1 : stop + 1] = indptr[start] + ptr[1:]
        x.create_dataset("indptr", data=indptr, compression="gzip")
    os.replace(tmp, path)
    return path


def generate_scale_corpus(
    output: str | Path, n_files: int, params: ScaleParams | None = None, *, processes: int = 1
) -> ScaleCorpus:
    """Write ``n_files`` files ``scale_0000.h5ad``... of ``params.cells_per_file`` cells each,
    ``genes.tsv`` and ``catalog.yaml`` (one dataset per file) to ``output``; reuse files an
    earlier call with the same ``params`` wrote. ``processes`` files are written at once."""
    params = params or ScaleParams()
    if n_files < 1:
        raise ValueError("n_files must be >= 1")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    recorded = out / "params.json"
    if recorded.is_file() and json.loads(recorded.read_text()) != asdict(params):
        raise ValueError(
            f"{out} holds files made with {recorded.read_text().strip()}, not {asdict(params)}: "
            "use another folder (or delete this one)"
        )
    recorded.write_text(json.dumps(asdict(params)))
    files = [out / f"scale_{i:04d}.h5ad" for i in range(n_files)]
    todo = [(f, i) for i, f in enumerate(files) if not f.is_file()]
    if todo:
        logger.info("writing %d of %d synthetic files to %s", len(todo), n_files, out)
        if processes > 1:  # spawn: polars' threads do not survive a fork
            with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
                paths, indices = [f for f, _ in todo], [i for _, i in todo]
                for done in pool.map(_write_file, paths, indices, [params] * len(todo)):
                    logger.info("wrote %s", done)
        else:
            for f, i in todo:
                _write_file(f, i, params)
    panel, _ = _model(params)
    gene_table = write_gene_table(panel, out / "genes.tsv")
    rows = [
        {"id": f.stem, "uri": f.name, "organ": "blood", "platform": "droplet",
         "metadata": {"cell_type": "celltype", "batch": "batch"}}
        for f in files
    ]  # fmt: skip
    catalog = out / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"datasets": rows}, sort_keys=False))
    return ScaleCorpus(catalog, gene_table, files, params)
