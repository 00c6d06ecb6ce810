"""What every source reader shares: the error, the reader protocol, validation, unique names.

The public API is :mod:`cellfoundry.corpus.sources`; this module sits below it and below the
format readers (``readers_h5``, ``readers_10x``), so none of them import each other in a cycle.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Protocol

import numpy as np
import pandas as pd
import scipy.sparse as sp

logger = logging.getLogger(__name__)

RAW_COUNTS_FIX = (
    "use the raw counts: in a corpus catalog set matrix: raw/X or matrix: layers/counts "
    "(or the loom layer holding them); for tokenize, write a file whose X holds them"
)
_NAME_FIXES: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()  # per process


class SourceError(ValueError):
    """A source file cannot be used as given; the message names the file, field and fix."""

    def __init__(self, uri: str, field: str, problem: str, fix: str = "") -> None:
        self.uri, self.field, self.problem, self.fix = uri, field, problem, fix
        super().__init__(f"{uri}: {field}: {problem}" + (f"; fix: {fix}" if fix else ""))

    def __reduce__(self) -> tuple[type, tuple[str, str, str, str]]:  # picklable (Ray tasks)
        return (type(self), (self.uri, self.field, self.problem, self.fix))


class Reader(Protocol):
    """One open source file of a given format; rows are cells."""

    uri: str
    matrix: str  # which matrix of the file is read (h5ad: X, raw/X, layers/<name>)
    version: tuple | None  # (size, mtime) of the file: keys per-process caches
    n_cells: int
    n_genes: int
    obs_columns: list[str]

    def gene_ids(self, column: str | None) -> tuple[str, np.ndarray]:
        """(chosen column, str [n_genes]); SourceError listing the columns if missing."""
        ...

    def obs_names(self, start: int, stop: int) -> np.ndarray:
        """Cell names (barcodes) of cells start..stop, as stored (may repeat)."""
        ...

    def obs_column(self, name: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(values [n], mask of missing values or None) of one obs column."""
        ...

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indptr [n+1], gene indices [nnz], values [nnz]) of cells start..stop, any dtypes."""
        ...


def to_str(values: np.ndarray, missing: np.ndarray | None = None) -> np.ndarray:
    """Values as a str array; missing entries (mask, NaN, None, pandas NA) become ""."""
    arr = np.asarray(values)
    if arr.dtype.kind == "S":
        arr = np.char.decode(arr, "utf-8")
    na = np.zeros(arr.shape, bool) if missing is None else np.asarray(missing, bool).copy()
    if arr.dtype.kind == "f":
        na |= np.isnan(arr)
    elif arr.dtype.kind == "O":
        na |= pd.isna(arr)
    out = arr.astype(str)
    out[na] = ""
    return out


def keep_entries(indptr: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Row pointers after dropping the stored entries where ``keep`` is False."""
    return np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])[indptr]


def remap_columns(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, col_map: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR with gene columns renumbered by ``col_map`` (-1 drops the column)."""
    new = col_map[indices]
    keep = new >= 0
    return keep_entries(np.asarray(indptr, np.int64), keep), new[keep], data[keep]


def as_counts(
    data: np.ndarray, indptr: np.ndarray, names: np.ndarray, uri: str, field: str
) -> np.ndarray:
    """``data`` as int64 after checking it holds non-negative whole numbers (else SourceError)."""
    kind = data.dtype.kind
    if kind not in "iufb":
        raise SourceError(uri, field, f"holds {data.dtype} values, not counts", RAW_COUNTS_FIX)
    checks = []
    if kind == "f":
        checks.append((~(np.isfinite(data) & (data == np.rint(data))), "not whole numbers"))
    if kind in "if":
        checks.append((data < 0, "negative"))
    for bad, what in checks:
        if bad.any():
            k = int(np.argmax(bad))
            cell = str(names[int(np.searchsorted(indptr, k, side="right")) - 1])  # not np.str_
            raise SourceError(
                uri,
                field,
                f"counts are {what} (e.g. {data[k].item()!r} in cell {cell!r}; "
                f"{int(bad.sum())} such values in this chunk), so the matrix looks normalised or scaled",
                RAW_COUNTS_FIX,
            )
    return data.astype(np.int64)


def canonical(
    indptr: np.ndarray, indices: np.ndarray, counts: np.ndarray, n_genes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR without stored zeros, indices ascending and unique within rows (duplicates summed)."""
    keep = counts != 0
    if not keep.all():
        indptr, indices, counts = keep_entries(indptr, keep), indices[keep], counts[keep]
    if len(indices) > 1:
        ascending = np.diff(indices) > 0
        starts = indptr[1:-1]
        ascending[starts[(starts > 0) & (starts < len(indices))] - 1] = True  # row boundaries
        if not ascending.all():
            m = sp.csr_matrix((counts, indices, indptr), shape=(len(indptr) - 1, n_genes))
            m.sum_duplicates()  # sorts indices too
            indptr, indices, counts = m.indptr.astype(np.int64), m.indices, m.data
    return indptr, indices, counts


def name_fixes(names: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of repeated names (after the first) and their new names ``a-1``, ``a-2``, ...

    Rows are ascending (order of appearance). A suffix that would clash with an existing
    name is skipped (``a, a, a-1`` -> ``a, a-2, a-1``), so names that were unique stay.
    """
    _, first = np.unique(names, return_index=True)
    if len(first) == len(names):
        return np.zeros(0, np.int64), np.zeros(0, str)
    repeated = np.ones(len(names), bool)
    repeated[first] = False
    rows = np.flatnonzero(repeated)
    taken, last, new = set(names.tolist()), {}, []
    for name in names[rows].tolist():  # a loop over the repeated names only
        k = last.get(name, 0) + 1
        while f"{name}-{k}" in taken:
            k += 1
        last[name] = k
        taken.add(f"{name}-{k}")
        new.append(f"{name}-{k}")
    return rows.astype(np.int64), np.array(new, dtype=str)


def unique_names(reader: Reader, start: int, stop: int) -> np.ndarray:
    """Obs names of cells start..stop, repeats over the whole file renamed (see name_fixes).

    The renaming needs every name of the file: it is computed once per process and file.
    """
    names = to_str(reader.obs_names(start, stop))
    key = (reader.uri, reader.version)
    fixes = _NAME_FIXES.get(key) if reader.version is not None else None
    if fixes is None:
        fixes = name_fixes(to_str(reader.obs_names(0, reader.n_cells)))
        if len(fixes[0]):
            logger.warning(
                "%s: %d repeated obs names, made unique by appending -1, -2, ...",
                reader.uri,
                len(fixes[0]),
            )
        _NAME_FIXES[key] = fixes
        while len(_NAME_FIXES) > 16:
            _NAME_FIXES.popitem(last=False)
    rows, new = fixes
    lo, hi = np.searchsorted(rows, [start, stop])
    if hi > lo:
        names = names.astype(object)
        names[rows[lo:hi] - start] = new[lo:hi]
        names = names.astype(str)
    return names
