"""Single-cell source files as row chunks of raw counts (the readers of stage 1).

A Ray task reads one ``(file, row range)`` with :func:`read_chunk`; only the requested cells
are read (for h5ad CSR a chunk is a couple of h5py slices), so no process ever holds the
whole matrix of a large file. The one exception is ``10x_mtx`` (listed in
:data:`WHOLE_FILE_FORMATS`): Matrix Market text cannot be seeked by cell, so each task
parses the whole file and keeps its row range; give such sources a single chunk.

Formats (:data:`FORMATS`): ``h5ad`` (anndata on-disk format; ``matrix`` may be ``X``,
``raw/X`` or ``layers/<name>``), ``loom`` (``/matrix`` genes x cells, or ``layers/<name>``),
``10x_h5`` (Cell Ranger v3 ``/matrix``, Gene Expression features only; v2 ``/<genome>``,
``matrix`` naming the genome when there are several) and ``10x_mtx`` (a directory of
``matrix.mtx[.gz]``, ``features.tsv[.gz]`` or ``genes.tsv``, ``barcodes.tsv[.gz]``).

URIs are local paths or any pyarrow filesystem URI (``s3://``, ``gs://``, ``file://``); a
URI is opened with ``pyarrow.fs.FileSystem.from_uri`` and HDF5 reads go through the file
object (a local path is opened by h5py directly).

Every chunk is validated: counts must be non-negative whole numbers (float storage of whole
numbers is accepted), else :class:`SourceError` says the matrix looks normalised and where
the raw counts may be. Stored zeros are dropped and genes sorted within each cell. Repeated
obs names are made unique over the whole file, whatever the chunking (``a``, ``a-1``, ...),
with a warning. Problems with a file raise :class:`SourceError` naming the file, the field
and the fix; the format readers live in ``readers_h5`` (h5ad, loom), ``readers_10x`` (Cell
Ranger HDF5 and mtx) and ``readers_base`` (shared validation).
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from cellfoundry.corpus import readers_10x, readers_h5
from cellfoundry.corpus.readers_base import (
    Reader,
    SourceError,
    as_counts,
    canonical,
    to_str,
    unique_names,
)

logger = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "WHOLE_FILE_FORMATS",
    "Chunk",
    "SourceError",
    "SourceInfo",
    "chunk_ranges",
    "detect_format",
    "probe",
    "read_chunk",
]

#: Supported source formats.
FORMATS = ("h5ad", "loom", "10x_h5", "10x_mtx")
#: Formats that cannot be read by row range: every task parses the whole file.
WHOLE_FILE_FORMATS = ("10x_mtx",)
_EXTENSIONS = {".h5ad": "h5ad", ".loom": "loom", ".h5": "10x_h5", ".hdf5": "10x_h5"}
_MTX_NAMES = ("matrix.mtx", "matrix.mtx.gz")
_HDF5_READERS = {
    "h5ad": readers_h5.H5adReader,
    "loom": readers_h5.LoomReader,
    "10x_h5": readers_10x.TenxH5Reader,
}
_PROBE_ROWS = 64  # cells whose counts probe() validates


@dataclass(frozen=True)
class SourceInfo:
    """What :func:`probe` learns about a source (it reads the matrix of its first 64 cells only)."""

    uri: str
    format: str
    n_cells: int
    n_genes: int  # genes of the matrix (10x: Gene Expression features only)
    gene_names: list[str]  # the chosen gene-id column, one per gene ("" where missing)
    gene_id_kind: str  # "ensembl" when most gene_names match ^ENS[A-Z]*G\d, else "symbol"
    obs_columns: list[str]  # per-cell metadata columns read_chunk can return
    has_n_counts: bool  # obs has "n_counts"


@dataclass
class Chunk:
    """Cells ``start..stop`` of a file as CSR over the file's genes.

    Within a row, ``indices`` are ascending and unique and every count is > 0.
    """

    barcodes: np.ndarray  # str [n], obs names (made unique over the whole file)
    indptr: np.ndarray  # int64 [n + 1]
    indices: np.ndarray  # int32 [nnz], gene column in the file (SourceInfo.gene_names)
    data: np.ndarray  # int64 [nnz], raw counts
    obs: dict[str, np.ndarray]  # requested obs columns, str [n] ("" where missing)
    n_counts_obs: (
        np.ndarray | None
    )  # float64 [n], obs["n_counts"] if present (NaN: missing or text)

    @property
    def n_cells(self) -> int:
        return len(self.barcodes)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Filesystem and path of a local path or a pyarrow filesystem URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise SourceError(
            uri,
            "uri",
            f"no filesystem for this URI ({e})",
            "use a local path or an s3://, gs:// or file:// URI",
        ) from e


def detect_format(uri: str) -> str:
    """Format of a source from its extension, or ``10x_mtx`` for a directory with matrix.mtx."""
    name = uri.split("?", 1)[0].rstrip("/")  # no filesystem call (nor network) when it can
    ext = posixpath.splitext(name)[1].lower()
    if ext in _EXTENSIONS:
        return _EXTENSIONS[ext]
    if posixpath.basename(name) in _MTX_NAMES:
        return "10x_mtx"
    fs, path = resolve(uri)
    path = path.rstrip("/")
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(uri, "uri", "no such file or directory", "check the path")
    if info.type == pafs.FileType.Directory:
        if any(fs.get_file_info(f"{path}/{n}").type == pafs.FileType.File for n in _MTX_NAMES):
            return "10x_mtx"
        raise SourceError(
            uri,
            "format",
            "directory holds no matrix.mtx or matrix.mtx.gz",
            "point it at a 10x directory (matrix.mtx[.gz], features.tsv[.gz] "
            "or genes.tsv, barcodes.tsv[.gz]) or at a single file",
        )
    raise SourceError(
        uri,
        "format",
        f"cannot tell the format from the extension {ext!r}",
        f"rename it to .h5ad/.loom/.h5 (or, in a corpus catalog, set format: to one of "
        f"{list(FORMATS)})",
    )


def chunk_ranges(n_cells: int, rows_per_chunk: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``0..n_cells`` in chunks of ``rows_per_chunk`` cells."""
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be >= 1, got {rows_per_chunk}")
    return [(s, min(s + rows_per_chunk, n_cells)) for s in range(0, n_cells, rows_per_chunk)]


def probe(
    uri: str, fmt: str | None = None, *, gene_id_column: str | None = None, matrix: str = "X"
) -> SourceInfo:
    """Shape, gene identifiers and obs columns of a source; validates the first cells' counts.

    ``gene_id_column`` names the var column (h5ad), row attribute (loom) or ``id``/``name``
    (10x) holding gene IDs; by default the Ensembl-ID column when there is one.
    """
    fmt = _check_format(uri, fmt)
    with _open(uri, fmt, matrix) as reader:
        column, genes = reader.gene_ids(gene_id_column)
        if len(genes) != reader.n_genes:
            raise SourceError(
                uri,
                column,
                f"has {len(genes)} entries for {reader.n_genes} genes",
                "the file is inconsistent; re-export it",
            )
        if fmt not in WHOLE_FILE_FORMATS:
            _read(reader, 0, min(reader.n_cells, _PROBE_ROWS), ())
        kind = "symbol"
        if len(genes):
            hits = pc.match_substring_regex(pa.array(genes), r"^ENS[A-Z]*G\d", ignore_case=True)
            kind = "ensembl" if pc.sum(hits).as_py() > len(genes) / 2 else "symbol"
    logger.info(
        "%s: %s, %d cells x %d genes, gene ids from %r (%s)",
        uri,
        fmt,
        reader.n_cells,
        reader.n_genes,
        column,
        kind,
    )
    return SourceInfo(
        uri=uri,
        format=fmt,
        n_cells=reader.n_cells,
        n_genes=reader.n_genes,
        gene_names=genes.tolist(),
        gene_id_kind=kind,
        obs_columns=list(reader.obs_columns),
        has_n_counts="n_counts" in reader.obs_columns,
    )


def count_cells(uri: str, fmt: str | None = None, *, matrix: str = "X") -> int | None:
    """Number of cells from the header alone, or None when even that cannot be read.

    Lets a quarantined dataset still count its cells, so the corpus counts reconcile: when
    the file is readable but ``matrix`` cannot be used (not in the file, stored as CSC, an
    unsupported encoding), the cells are counted from the obs names (h5ad), the matrix
    shape (loom) or the barcodes (10x) instead.
    """
    try:
        fmt = _check_format(uri, fmt)
        with _open(uri, fmt, matrix) as reader:
            return int(reader.n_cells)
    except (SourceError, OSError, ValueError, KeyError):
        pass
    if fmt not in _HDF5_READERS:
        return None
    try:
        fs, path = resolve(uri)
        with readers_h5.open_h5(fs, path, uri, fmt) as (h5, _):
            return readers_h5.header_cells(h5, fmt)
    except (SourceError, OSError, ValueError, KeyError, TypeError):
        return None


def read_chunk(
    uri: str, fmt: str, start: int, stop: int, *, obs_columns: Sequence[str] = (), matrix: str = "X"
) -> Chunk:
    """Cells ``start..stop`` of a source with the requested obs columns (see :class:`Chunk`)."""
    fmt = _check_format(uri, fmt)
    with _open(uri, fmt, matrix) as reader:
        if not 0 <= start <= stop <= reader.n_cells:
            raise SourceError(
                uri,
                "rows",
                f"range {start}:{stop} is outside 0:{reader.n_cells}",
                "take ranges from chunk_ranges(probe(uri).n_cells, ...)",
            )
        missing = [c for c in obs_columns if c not in reader.obs_columns]
        if missing:
            raise SourceError(
                uri,
                "obs",
                f"no column(s) {missing} (available: {reader.obs_columns})",
                "fix the catalog's metadata mapping to name existing columns",
            )
        return _read(reader, start, stop, obs_columns)


def _check_format(uri: str, fmt: str | None) -> str:
    fmt = detect_format(uri) if fmt is None else fmt
    if fmt not in FORMATS:
        raise SourceError(uri, "format", f"unknown format {fmt!r}", f"use one of {list(FORMATS)}")
    return fmt


@contextmanager
def _open(uri: str, fmt: str, matrix: str) -> Iterator[Reader]:
    """An open reader; low-level read errors (corrupt, truncated file) become SourceError."""
    fs, path = resolve(uri)
    try:
        with ExitStack() as stack:
            if fmt == "10x_mtx":
                reader: Reader = readers_10x.TenxMtxReader(fs, path, uri, matrix)
            else:
                h5, version = stack.enter_context(readers_h5.open_h5(fs, path, uri, fmt))
                reader = _HDF5_READERS[fmt](h5, uri, matrix, version)
            if reader.n_cells == 0 or reader.n_genes == 0:
                raise SourceError(
                    uri,
                    matrix,
                    f"is empty ({reader.n_cells} cells x {reader.n_genes} genes)",
                    "remove it from the inputs (the corpus catalog or the tokenize file list)",
                )
            yield reader
    except SourceError:
        raise
    except (OSError, KeyError, ValueError, EOFError) as e:
        raise SourceError(
            uri,
            "file",
            f"cannot be read as {fmt} ({type(e).__name__}: {e})",
            "the file may be corrupt or truncated, or not this format: "
            "re-download or re-export it (or fix format: in the corpus catalog)",
        ) from e


def _read(reader: Reader, start: int, stop: int, obs_columns: Sequence[str]) -> Chunk:
    n, uri = stop - start, reader.uri
    indptr, indices, data = reader.rows(start, stop)
    indptr = np.asarray(indptr, dtype=np.int64)
    nnz = len(data)
    if (
        len(indptr) != n + 1
        or indptr[0] != 0
        or indptr[-1] != nnz
        or len(indices) != nnz
        or np.any(np.diff(indptr) < 0)
    ):
        raise SourceError(
            uri,
            reader.matrix,
            f"row pointers of cells {start}:{stop} do not match the stored entries",
            "the file is corrupt; re-export it",
        )
    if nnz and (indices.min() < 0 or indices.max() >= reader.n_genes):
        raise SourceError(
            uri,
            reader.matrix,
            f"gene indices outside 0:{reader.n_genes}",
            "the matrix shape does not match its genes; re-export the file",
        )
    barcodes = unique_names(reader, start, stop)
    counts = as_counts(data, indptr, barcodes, uri, reader.matrix)
    indptr, indices, counts = canonical(indptr, indices, counts, reader.n_genes)
    obs = {c: to_str(*reader.obs_column(c, start, stop)) for c in obs_columns}
    n_counts = None
    if "n_counts" in reader.obs_columns:
        values, missing = reader.obs_column("n_counts", start, stop)
        values = np.asarray(values)
        if values.dtype.kind in "biuf":
            n_counts = values.astype(np.float64)
        else:  # text (or objects): what does not parse as a number is NaN; callers judge
            n_counts = pd.to_numeric(pd.Series(to_str(values)), errors="coerce").to_numpy(
                np.float64
            )
        if missing is not None:
            n_counts = np.where(missing, np.nan, n_counts)
    return Chunk(
        barcodes=barcodes,
        indptr=indptr,
        indices=indices.astype(np.int32),
        data=counts,
        obs=obs,
        n_counts_obs=n_counts,
    )
