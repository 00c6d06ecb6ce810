"""HDF5 source readers: h5ad (anndata) and loom, plus the HDF5 helpers readers_10x uses.

Each reader wraps one open ``h5py.File`` and reads only the cells asked for; the public entry
points are :func:`cellfoundry.corpus.sources.probe` and :func:`~.sources.read_chunk`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import h5py
import numpy as np
import pyarrow.fs as pafs
from anndata.io import read_elem

from cellfoundry.corpus.readers_base import SourceError, to_str

_BLOCK_BYTES = 1 << 26  # dense matrices are converted to CSR in blocks of at most 64 MiB


@contextmanager
def open_h5(
    fs: pafs.FileSystem, path: str, uri: str, fmt: str
) -> Iterator[tuple[h5py.File, tuple[int, int]]]:
    """The open HDF5 file and its (size, mtime) version; by path when local, else file object."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(uri, "uri", "file not found", "check the path")
    if info.type != pafs.FileType.File:
        raise SourceError(
            uri, "uri", f"is not a file ({info.type.name})", f"point it at a {fmt} file"
        )
    version = (info.size, info.mtime_ns or 0)
    remote = "://" in uri
    with fs.open_input_file(path) if remote else _nothing() as handle:
        try:
            h5 = h5py.File(handle, "r") if remote else h5py.File(path, "r", locking=False)
        except OSError as e:
            raise SourceError(
                uri,
                "file",
                f"is not a readable HDF5 file ({e})",
                f"the file is corrupt, truncated or not {fmt}: re-download or re-export it",
            ) from e
        with h5:
            yield h5, version


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def _attr_str(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _attr_list(node: h5py.HLObject, name: str) -> list[str]:
    value = node.attrs.get(name)
    return [] if value is None or np.size(value) == 0 else [_attr_str(v) for v in np.ravel(value)]


def h5_values(ds: h5py.Dataset, sel: slice = slice(None)) -> np.ndarray:
    """A 1-D dataset's entries (strings decoded to str)."""
    if h5py.check_string_dtype(ds.dtype) is not None:
        return ds.asstr()[sel].astype(str)
    return ds[sel]


def csr_rows(group: h5py.Group, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows start..stop of a compressed-sparse group (CSR, or 10x CSC with cells as columns)."""
    indptr = group["indptr"][start : stop + 1].astype(np.int64)
    lo, hi = int(indptr[0]), int(indptr[-1])
    return indptr - lo, group["indices"][lo:hi], group["data"][lo:hi]


def _dense_rows(
    read: Callable[[int, int], np.ndarray], start: int, stop: int, n_genes: int, itemsize: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR of rows start..stop of a dense matrix, read in blocks; ``read(a, b)`` gives rows a..b."""
    step = max(1, _BLOCK_BYTES // max(1, n_genes * itemsize))
    counts, indices, data = [np.zeros(0, np.int64)], [], []
    for a in range(start, stop, step):
        block = read(a, min(a + step, stop))
        rows, cols = np.nonzero(block)
        counts.append(np.bincount(rows, minlength=block.shape[0]))
        indices.append(cols)
        data.append(block[rows, cols])
    if not indices:
        return np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))])
    return indptr, np.concatenate(indices), np.concatenate(data)


def header_cells(h5: h5py.File, fmt: str) -> int | None:
    """Cells of an HDF5 source from its header alone, whatever its matrix (None: unknown).

    h5ad: the obs names; loom: the columns of ``/matrix``; 10x: the barcodes (v3, or the
    single v2 genome). Lets a file that is readable but quarantined count its cells.
    """
    if fmt == "h5ad":
        obs = h5.get("obs")
        if isinstance(obs, h5py.Group) and "_index" in obs.attrs:
            names = obs.get(_attr_str(obs.attrs["_index"]))
            return len(names) if isinstance(names, h5py.Dataset) else None
        return None
    if fmt == "loom":
        m = h5.get("matrix")
        return int(m.shape[1]) if isinstance(m, h5py.Dataset) and m.ndim == 2 else None
    groups = [h5["matrix"]] if isinstance(h5.get("matrix"), h5py.Group) else []
    groups = groups or [g for g in h5.values() if isinstance(g, h5py.Group) and "barcodes" in g]
    sizes = {len(g["barcodes"]) for g in groups if isinstance(g.get("barcodes"), h5py.Dataset)}
    return sizes.pop() if len(sizes) == 1 else None


class H5adReader:
    """An anndata file: ``matrix`` is ``X``, ``raw/X`` or ``layers/<name>`` (CSR or dense)."""

    def __init__(self, h5: h5py.File, uri: str, matrix: str, version: tuple | None) -> None:
        self.uri, self.matrix, self.version = uri, matrix, version
        obs = h5.get("obs")
        if not isinstance(obs, h5py.Group) or "_index" not in obs.attrs:
            raise SourceError(
                uri,
                "obs",
                "missing, or in the layout of anndata < 0.7",
                "re-write it with a current anndata: anndata.read_h5ad(p).write_h5ad(p)",
            )
        self._obs = obs
        self._names = obs[_attr_str(obs.attrs["_index"])]
        self.obs_columns = _attr_list(obs, "column-order")
        available = [m for m in ("X", "raw/X") if m in h5]
        available += [f"layers/{k}" for k in h5.get("layers", {})]
        if matrix not in available:
            raise SourceError(
                uri,
                "matrix",
                f"{matrix!r} is not in the file (available: {available})",
                "set matrix: to one of them in the corpus catalog (tokenize reads X: "
                "write a file whose X holds the raw counts)",
            )
        self._x = h5[matrix]
        var = h5["raw/var"] if matrix == "raw/X" else h5["var"]
        self._var = var
        if isinstance(self._x, h5py.Dataset):
            if self._x.ndim != 2:
                raise SourceError(uri, matrix, f"is a {self._x.ndim}-D array", "store a 2-D matrix")
            self.n_cells, self.n_genes = (int(v) for v in self._x.shape)
            return
        attrs = self._x.attrs
        enc = _attr_str(attrs.get("encoding-type", attrs.get("h5sparse_format", "")))
        if enc.startswith("csc"):
            target = "adata.X" if matrix == "X" else f"adata.{matrix.replace('/', '.')}"
            if matrix.startswith("layers/"):
                target = f"adata.layers[{matrix[7:]!r}]"
            raise SourceError(
                uri,
                matrix,
                "is stored as CSC (column-compressed), so cells cannot be read in row chunks",
                f"convert it once to CSR: adata = anndata.read_h5ad(path); {target} = "
                f"{target}.tocsr(); adata.write_h5ad(path)",
            )
        if not enc.startswith("csr"):
            raise SourceError(
                uri, matrix, f"has unsupported encoding {enc!r}", "store it as CSR or dense"
            )
        self.n_cells, self.n_genes = (
            int(v) for v in attrs.get("shape", attrs.get("h5sparse_shape"))
        )
        if len(self._x["indptr"]) != self.n_cells + 1:
            raise SourceError(
                uri,
                f"{matrix}/indptr",
                f"has {len(self._x['indptr'])} entries for {self.n_cells} cells",
                "the file is corrupt; re-export it",
            )
        if len(self._names) != self.n_cells:
            raise SourceError(
                uri,
                "obs",
                f"has {len(self._names)} cells but {matrix} has {self.n_cells}",
                "the file is corrupt; re-export it",
            )

    def gene_ids(self, column: str | None) -> tuple[str, np.ndarray]:
        """The var column holding gene IDs (default: ``ensembl_id``, else the var index)."""
        index = _attr_str(self._var.attrs["_index"])
        columns = _attr_list(self._var, "column-order")
        if column is None:
            column = "ensembl_id" if "ensembl_id" in columns else index
        elif column not in (index, *columns):
            raise SourceError(
                self.uri,
                "gene_id_column",
                f"{column!r} is not a column of {self._var.name} (available: {[index, *columns]})",
                "set gene_id_column to one of them, or leave it empty for the default",
            )
        return column, to_str(read_elem(self._var[column]))

    def obs_names(self, start: int, stop: int) -> np.ndarray:
        return h5_values(self._names, slice(start, stop))

    def obs_column(self, name: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Values of one obs column for cells start..stop and the mask of missing ones."""
        elem, sel = self._obs[name], slice(start, stop)
        if isinstance(elem, h5py.Dataset):
            return h5_values(elem, sel), None
        enc = _attr_str(elem.attrs.get("encoding-type", ""))
        if enc == "categorical":
            codes = elem["codes"][sel].astype(np.int64)
            categories = to_str(read_elem(elem["categories"]))
            if len(categories) == 0:
                return np.full(len(codes), "", dtype=str), codes < 0
            return categories[np.maximum(codes, 0)], codes < 0
        if enc.startswith("nullable") and "values" in elem:
            mask = elem["mask"][sel] if "mask" in elem else None
            return h5_values(elem["values"], sel), mask
        return np.asarray(read_elem(elem))[sel], None  # any other encoding: whole column

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if isinstance(self._x, h5py.Dataset):
            x = self._x
            return _dense_rows(lambda a, b: x[a:b], start, stop, self.n_genes, x.dtype.itemsize)
        return csr_rows(self._x, start, stop)


class LoomReader:
    """A loom file: ``/matrix`` (or ``layers/<name>``) genes x cells, dense."""

    def __init__(self, h5: h5py.File, uri: str, matrix: str, version: tuple | None) -> None:
        self.uri, self.matrix, self.version = uri, matrix, version
        available = ["X", *(f"layers/{k}" for k in h5.get("layers", {}))]
        if matrix not in available or "matrix" not in h5:
            raise SourceError(
                uri,
                "matrix",
                f"{matrix!r} is not in the file (available: {available if 'matrix' in h5 else []})",
                "set matrix: to X (the loom /matrix) or layers/<name> in the corpus catalog",
            )
        self._m = h5["matrix"] if matrix == "X" else h5[matrix]
        self.n_genes, self.n_cells = (int(v) for v in self._m.shape)
        self._row = h5.get("row_attrs", {})
        self._col = h5.get("col_attrs", {})
        self.obs_columns = [
            k for k, ds in self._col.items() if ds.ndim == 1 and len(ds) == self.n_cells
        ]

    def gene_ids(self, column: str | None) -> tuple[str, np.ndarray]:
        """The row attribute holding gene IDs (default: ensembl_id, Accession, then Gene)."""
        available = list(self._row)
        if column is None:
            column = next((c for c in ("ensembl_id", "Accession", "Gene") if c in available), None)
            if column is None:
                raise SourceError(
                    self.uri,
                    "gene_id_column",
                    f"no ensembl_id, Accession or Gene row attribute (available: {available})",
                    "set gene_id_column in the corpus catalog to the row attribute holding "
                    "gene IDs or symbols (tokenize reads ensembl_id, Accession or Gene)",
                )
        elif column not in available:
            raise SourceError(
                self.uri,
                "gene_id_column",
                f"{column!r} is not a row attribute (available: {available})",
                "set gene_id_column to one of them",
            )
        return column, to_str(h5_values(self._row[column]))

    def obs_names(self, start: int, stop: int) -> np.ndarray:
        if "CellID" in self.obs_columns:
            return h5_values(self._col["CellID"], slice(start, stop))
        return np.arange(start, stop).astype(str)

    def obs_column(self, name: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        return h5_values(self._col[name], slice(start, stop)), None

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        m = self._m
        return _dense_rows(lambda a, b: m[:, a:b].T, start, stop, self.n_genes, m.dtype.itemsize)
