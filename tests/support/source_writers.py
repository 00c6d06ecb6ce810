"""Writers of loom, 10x HDF5 and 10x mtx test files from a cells x genes count matrix.

They follow the layouts that loompy and Cell Ranger write, so the readers are tested on the
files real tools produce (the loom file is written by loompy itself).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import h5py
import loompy
import numpy as np
import scipy.io
import scipy.sparse as sp


def with_antibodies(
    x: sp.csr_matrix, every: int = 7, seed: int = 0
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Insert an "Antibody Capture" feature column after every ``every`` genes.

    Returns the wider matrix and the mask of its Gene Expression columns.
    """
    n_genes = x.shape[1]
    n_ab = n_genes // every
    gex = np.ones(n_genes + n_ab, bool)
    gex[np.arange(1, n_ab + 1) * (every + 1) - 1] = False
    rng = np.random.default_rng(seed)
    ab = sp.random(x.shape[0], n_ab, density=0.3, format="csr", random_state=rng)
    ab.data = np.ceil(ab.data * 50)
    wide = sp.lil_matrix((x.shape[0], len(gex)), dtype=np.int64)
    wide[:, np.flatnonzero(gex)] = x
    wide[:, np.flatnonzero(~gex)] = ab
    return sp.csr_matrix(wide), gex


def write_loom(
    path: Path,
    x: sp.csr_matrix,
    gene_ids: np.ndarray,
    symbols: np.ndarray,
    barcodes: np.ndarray,
    layers: dict[str, sp.csr_matrix] | None = None,
) -> None:
    """A loom file (genes x cells) with Accession/Gene row attrs and CellID/n_counts col attrs."""
    row_attrs = {"Accession": np.asarray(gene_ids, str), "Gene": np.asarray(symbols, str)}
    col_attrs = {
        "CellID": np.asarray(barcodes, str),
        "n_counts": np.asarray(x.sum(axis=1)).ravel().astype(np.float64),
    }
    matrix_layers = {"": x.T.tocoo()}
    for name, m in (layers or {}).items():
        matrix_layers[name] = m.T.tocoo()
    loompy.create(str(path), matrix_layers, row_attrs, col_attrs)


def write_10x_h5(
    path: Path,
    x: sp.csr_matrix,
    gene_ids: np.ndarray,
    symbols: np.ndarray,
    barcodes: np.ndarray,
    *,
    gex: np.ndarray | None = None,
    version: int = 3,
    genomes: tuple[str, ...] = ("GRCh38",),
) -> None:
    """A Cell Ranger HDF5 file (CSC features x cells: the CSR arrays of cells x features).

    v3 writes ``/matrix`` with ``features/{id,name,feature_type,genome}``; v2 writes one
    ``/<genome>`` group per genome (each with the same matrix).
    """
    x = sp.csr_matrix(x)
    gex = np.ones(x.shape[1], bool) if gex is None else gex
    ftype = np.where(gex, "Gene Expression", "Antibody Capture").astype("S")
    with h5py.File(path, "w") as h5:
        groups = ["matrix"] if version == 3 else list(genomes)
        for name in groups:
            g = h5.create_group(name)
            g["data"] = x.data.astype(np.int32)
            g["indices"] = x.indices.astype(np.int64)
            g["indptr"] = x.indptr.astype(np.int64)
            g["shape"] = np.array([x.shape[1], x.shape[0]], np.int32)
            g["barcodes"] = np.asarray(barcodes, "S")
            if version == 3:
                f = g.create_group("features")
                f["id"] = np.asarray(gene_ids, "S")
                f["name"] = np.asarray(symbols, "S")
                f["feature_type"] = ftype
                f["genome"] = np.full(x.shape[1], genomes[0], "S")
                f["_all_tag_keys"] = np.array([b"genome"])
            else:
                g["genes"] = np.asarray(gene_ids, "S")
                g["gene_names"] = np.asarray(symbols, "S")


def write_10x_mtx(
    folder: Path,
    x: sp.csr_matrix,
    gene_ids: np.ndarray,
    symbols: np.ndarray,
    barcodes: np.ndarray,
    *,
    gex: np.ndarray | None = None,
    gz: bool = True,
) -> Path:
    """A Cell Ranger mtx directory: v3 style (gzipped, features.tsv.gz with a feature-type
    column) when ``gz``, else v2 style (plain matrix.mtx, genes.tsv with two columns)."""
    folder.mkdir(parents=True, exist_ok=True)
    if gex is None:
        gex = np.ones(x.shape[1], bool)
    if gz:
        ftype = np.where(gex, "Gene Expression", "Antibody Capture")
        features = "".join(
            f"{i}\t{s}\t{t}\n" for i, s, t in zip(gene_ids, symbols, ftype, strict=True)
        )
    else:
        features = "".join(f"{i}\t{s}\n" for i, s in zip(gene_ids, symbols, strict=True))
    files = {
        "features.tsv" if gz else "genes.tsv": features.encode(),
        "barcodes.tsv": "".join(f"{b}\n" for b in barcodes).encode(),
    }
    mtx = folder / "matrix.mtx"
    scipy.io.mmwrite(mtx, sp.coo_matrix(x.T, dtype=np.int64), field="integer", symmetry="general")
    if gz:
        files["matrix.mtx"] = mtx.read_bytes()
        mtx.unlink()
    for name, payload in files.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (folder / name).write_bytes(payload)
    return folder
