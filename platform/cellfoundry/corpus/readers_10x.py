"""10x Genomics sources: Cell Ranger HDF5 (v3 ``/matrix``, v2 ``/<genome>``) and mtx directories.

Only "Gene Expression" features are kept (antibody capture, CRISPR guides etc. are dropped
and the gene columns renumbered). A mtx directory holds ``matrix.mtx[.gz]``,
``features.tsv[.gz]`` or ``genes.tsv``, ``barcodes.tsv[.gz]``; Matrix Market text cannot be
seeked by cell, so :meth:`TenxMtxReader.rows` parses the whole matrix and keeps the requested
cells (the format is in ``sources.WHOLE_FILE_FORMATS``: give it one chunk). Probing reads only
the header and the two TSV files. ``.gz`` files are decompressed on the fly, on any filesystem.
"""

from __future__ import annotations

import posixpath

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.fs as pafs
import scipy.io
import scipy.sparse as sp

from cellfoundry.corpus.readers_base import SourceError, remap_columns, to_str
from cellfoundry.corpus.readers_h5 import csr_rows, h5_values

_MTX_FIX = (
    "a 10x directory holds matrix.mtx[.gz], features.tsv[.gz] (or genes.tsv), barcodes.tsv[.gz]"
)


class TenxH5Reader:
    """A Cell Ranger HDF5 file: v3 ``/matrix`` (Gene Expression features) or v2 ``/<genome>``."""

    def __init__(self, h5: h5py.File, uri: str, matrix: str, version: tuple | None) -> None:
        self.uri, self.matrix, self.version = uri, matrix, version
        self.obs_columns: list[str] = []
        if isinstance(h5.get("matrix"), h5py.Group) and "features" in h5["matrix"]:
            if matrix != "X":
                raise SourceError(
                    uri,
                    "matrix",
                    f"{matrix!r} given for a Cell Ranger v3 file",
                    "leave matrix: at X",
                )
            self._g = h5["matrix"]
            features = self._g["features"]
            n = len(features["id"])
            self._genes = {
                k: ds
                for k, ds in features.items()
                if isinstance(ds, h5py.Dataset) and ds.shape == (n,)
            }
            self._aliases = {"genes": "id", "gene_ids": "id", "gene_names": "name"}
        else:
            genomes = [k for k, g in h5.items() if isinstance(g, h5py.Group) and "genes" in g]
            if matrix == "X" and len(genomes) == 1:
                matrix = genomes[0]
            if matrix not in genomes:
                problem = (
                    f"{matrix!r} is not a genome of the file (genomes: {genomes})"
                    if matrix != "X"
                    else f"holds several genomes {genomes}"
                    if genomes
                    else "has neither a /matrix group (Cell Ranger v3) nor /<genome> groups (v2)"
                )
                fix = (
                    "set matrix: to one genome in the corpus catalog (tokenize reads "
                    "single-genome files)"
                    if genomes
                    else "point it at a Cell Ranger .h5"
                )
                raise SourceError(uri, "matrix", problem, fix)
            self._g = h5[matrix]
            self._genes = {k: self._g[k] for k in ("genes", "gene_names") if k in self._g}
            self._aliases = {"id": "genes", "gene_ids": "genes", "name": "gene_names"}
        n_features, self.n_cells = (int(v) for v in self._g["shape"][:2])
        ftype = self._genes.get("feature_type")
        gex = np.ones(n_features, bool) if ftype is None else h5_values(ftype) == "Gene Expression"
        self._gex = gex
        self.n_genes = int(gex.sum())
        self._col_map = None
        if not gex.all():
            self._col_map = np.where(gex, np.cumsum(gex) - 1, -1)
        if len(self._g["indptr"]) != self.n_cells + 1 or len(self._g["barcodes"]) != self.n_cells:
            raise SourceError(
                uri,
                f"{self._g.name}/shape",
                "does not match indptr or barcodes",
                "the file is corrupt; re-export it",
            )

    def gene_ids(self, column: str | None) -> tuple[str, np.ndarray]:
        """Feature IDs (``id``, the default) or names (``name``) of the Gene Expression genes."""
        key = "id" if column is None else column
        key = key if key in self._genes else self._aliases.get(key, key)
        if key not in self._genes:
            raise SourceError(
                self.uri,
                "gene_id_column",
                f"{column!r} is not a feature field (available: {list(self._genes)})",
                "set gene_id_column to id (Ensembl IDs) or name (symbols)",
            )
        values = to_str(h5_values(self._genes[key]))
        if len(values) != len(self._gex):
            raise SourceError(self.uri, key, "does not match the matrix shape", "re-export it")
        return key, values[self._gex]

    def obs_names(self, start: int, stop: int) -> np.ndarray:
        return to_str(h5_values(self._g["barcodes"], slice(start, stop)))

    def obs_column(self, name: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        raise SourceError(self.uri, "obs", f"10x files have no column {name!r}", "drop it")

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        indptr, indices, data = csr_rows(self._g, start, stop)
        if self._col_map is None:
            return indptr, indices, data
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self._col_map)):
            raise SourceError(
                self.uri,
                "indices",
                "feature indices outside the feature table",
                "the file is corrupt; re-export it",
            )
        return remap_columns(indptr, indices, data, self._col_map)


class TenxMtxReader:
    """A Cell Ranger ``filtered_feature_bc_matrix`` directory (or its matrix.mtx[.gz] path)."""

    def __init__(self, fs: pafs.FileSystem, path: str, uri: str, matrix: str) -> None:
        self.uri, self.matrix, self._fs = uri, matrix, fs
        if matrix != "X":
            raise SourceError(
                uri, "matrix", f"{matrix!r} given for a 10x mtx directory", "leave matrix: at X"
            )
        path = path.rstrip("/")
        if posixpath.basename(path).startswith("matrix.mtx"):
            path = posixpath.dirname(path)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.Directory:
            raise SourceError(uri, "uri", "is not a directory", f"point it at one: {_MTX_FIX}")
        self._mtx = self._find(path, "matrix", ("matrix.mtx", "matrix.mtx.gz"))
        mtx_info = fs.get_file_info(self._mtx)
        self.version = (mtx_info.size, mtx_info.mtime_ns or 0)
        features = self._find(
            path, "features", ("features.tsv.gz", "features.tsv", "genes.tsv", "genes.tsv.gz")
        )
        barcodes = self._find(path, "barcodes", ("barcodes.tsv.gz", "barcodes.tsv"))
        self._features = self._tsv(features)
        self._barcodes = self._tsv(barcodes).column(0).to_numpy(zero_copy_only=False).astype(str)
        with fs.open_input_stream(self._mtx) as stream:
            n_rows, n_cols = (int(v) for v in scipy.io.mminfo(stream)[:2])
        if n_rows != self._features.num_rows or n_cols != len(self._barcodes):
            raise SourceError(
                uri,
                posixpath.basename(self._mtx),
                f"is {n_rows} genes x {n_cols} cells but there are {self._features.num_rows} "
                f"features and {len(self._barcodes)} barcodes",
                "the directory mixes files of different runs; re-export it",
            )
        if self._features.num_columns >= 3:
            ftype = self._features.column(2).to_numpy(zero_copy_only=False).astype(str)
            gex = ftype == "Gene Expression"
        else:
            gex = np.ones(n_rows, bool)
        self._gex = gex
        self._col_map = np.where(gex, np.cumsum(gex) - 1, -1)
        self.n_cells, self.n_genes = n_cols, int(gex.sum())
        self.obs_columns: list[str] = []

    def _find(self, path: str, what: str, names: tuple[str, ...]) -> str:
        for name in names:
            if self._fs.get_file_info(f"{path}/{name}").type == pafs.FileType.File:
                return f"{path}/{name}"
        raise SourceError(self.uri, what, f"none of {list(names)} in the directory", _MTX_FIX)

    def _tsv(self, path: str) -> pa.Table:
        with self._fs.open_input_stream(path) as stream:  # decompresses .gz
            table = pcsv.read_csv(
                stream,
                read_options=pcsv.ReadOptions(autogenerate_column_names=True),
                parse_options=pcsv.ParseOptions(delimiter="\t", quote_char=False),
                convert_options=pcsv.ConvertOptions(
                    column_types={f"f{i}": pa.string() for i in range(8)}
                ),
            )
        return table

    def gene_ids(self, column: str | None) -> tuple[str, np.ndarray]:
        """Gene IDs (TSV column 1, ``id``, the default) or symbols (column 2, ``name``)."""
        fields = {"id": 0, "gene_ids": 0, "name": 1, "gene_symbols": 1}
        key = "id" if column is None else column
        if key not in fields or fields[key] >= self._features.num_columns:
            raise SourceError(
                self.uri,
                "gene_id_column",
                f"{column!r} is not a features column (available: id, name)",
                "set gene_id_column to id or name",
            )
        values = self._features.column(fields[key]).to_numpy(zero_copy_only=False).astype(str)
        return key, values[self._gex]

    def obs_names(self, start: int, stop: int) -> np.ndarray:
        return self._barcodes[start:stop]

    def obs_column(self, name: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        raise SourceError(self.uri, "obs", f"10x directories have no column {name!r}", "drop it")

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cells start..stop as CSR over Gene Expression genes (parses the whole matrix)."""
        with self._fs.open_input_stream(self._mtx) as stream:
            coo = sp.coo_matrix(scipy.io.mmread(stream))  # genes x cells
        keep = (coo.col >= start) & (coo.col < stop)
        genes, cells, data = coo.row[keep], coo.col[keep] - start, coo.data[keep]
        order = np.lexsort((genes, cells))
        genes, cells, data = genes[order], cells[order], data[order]
        indptr = np.concatenate([[0], np.cumsum(np.bincount(cells, minlength=stop - start))])
        return remap_columns(indptr, genes.astype(np.int64), data, self._col_map)
