"""Single-cell source readers: real h5ad files, and loom / 10x files written from them."""

from __future__ import annotations

import gzip
import logging
import pickle
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellfoundry.corpus import readers_h5
from cellfoundry.corpus.sources import (
    FORMATS,
    WHOLE_FILE_FORMATS,
    Chunk,
    SourceError,
    chunk_ranges,
    count_cells,
    detect_format,
    probe,
    read_chunk,
)
from cellfoundry.paths import shared_path
from support.source_writers import with_antibodies, write_10x_h5, write_10x_mtx, write_loom

H5AD = shared_path("data", "h5ad")
PBMC_FACS = H5AD / "pbmc_facs_zheng2017_3874cells.h5ad"
needs_data = pytest.mark.skipif(not PBMC_FACS.is_file(), reason="shared real data not present")

# file: (cells, genes, gene id kind), from ../shared/data/README.md
REAL = {
    "pbmc_facs_zheng2017_3874cells.h5ad": (3874, 16791, "ensembl"),
    "pbmc3k_seurat_2638cells.h5ad": (2638, 13714, "symbol"),
    "scwg_1k_PBMC_v2_raw.h5ad": (996, 33538, "symbol"),
    "scwg_1k_PBMC_v2_filt.h5ad": (954, 12518, "symbol"),
    "scwg_1k_PBMC_v3_filt.h5ad": (906, 14688, "symbol"),
    "scirpy_wu2020_200cells.h5ad": (200, 30727, "symbol"),
}


def stack(chunks: list[Chunk], n_genes: int) -> sp.csr_matrix:
    """The chunks of a file as one cells x genes matrix, checking each chunk's invariants."""
    parts = []
    for c in chunks:
        assert c.indptr.dtype == np.int64 and c.indices.dtype == np.int32
        assert c.data.dtype == np.int64 and (c.data > 0).all()
        assert len(c.indptr) == c.n_cells + 1 == len(c.barcodes) + 1
        m = sp.csr_matrix((c.data, c.indices, c.indptr), shape=(c.n_cells, n_genes))
        assert m.has_canonical_format
        parts.append(m)
    return sp.csr_matrix(sp.vstack(parts))


def read_all(uri: str, fmt: str, n_cells: int, rows: int, **kw) -> list[Chunk]:
    return [read_chunk(uri, fmt, a, b, **kw) for a, b in chunk_ranges(n_cells, rows)]


def same(a: sp.spmatrix, b: sp.spmatrix) -> bool:
    return a.shape == b.shape and abs(sp.csr_matrix(a) - sp.csr_matrix(b)).sum() == 0


@pytest.fixture(scope="module")
def cells() -> dict:
    """A count matrix to write test files from: a slice of pbmc_facs, else synthetic counts."""
    if PBMC_FACS.is_file():
        a = ad.read_h5ad(PBMC_FACS)[::16, :3000]
        x = sp.csr_matrix(a.X, dtype=np.int64)
        return {
            "x": x,
            "ids": a.var["ensembl_id"].to_numpy(str),
            "symbols": a.var["gene_symbol"].to_numpy(str),
            "barcodes": a.obs_names.to_numpy(str),
        }
    rng = np.random.default_rng(0)
    x = sp.random(240, 600, density=0.1, format="csr", random_state=rng)
    x.data = np.ceil(x.data * 20)
    return {
        "x": x.astype(np.int64),
        "ids": np.array([f"ENSG{i:011d}" for i in range(600)]),
        "symbols": np.array([f"GENE{i}" for i in range(600)]),
        "barcodes": np.array([f"CELL{i}-1" for i in range(240)]),
    }


# ---- format detection and chunking ------------------------------------------------------


def test_detect_format(tmp_path: Path, cells: dict) -> None:
    assert [detect_format(f"x/y.{e}") for e in ("h5ad", "LOOM", "h5")] == ["h5ad", "loom", "10x_h5"]
    folder = write_10x_mtx(
        tmp_path / "mtx", cells["x"], cells["ids"], cells["symbols"], cells["barcodes"]
    )
    assert detect_format(str(folder)) == detect_format(f"file://{folder}/") == "10x_mtx"
    assert detect_format(str(folder / "matrix.mtx.gz")) == "10x_mtx"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"no matrix\.mtx"):
        detect_format(str(tmp_path / "empty"))
    with pytest.raises(SourceError, match="no such file"):
        detect_format(str(tmp_path / "missing"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(SourceError, match=r"extension '\.csv'.*format: to one of"):
        detect_format(str(tmp_path / "data.csv"))
    assert set(WHOLE_FILE_FORMATS) <= set(FORMATS)


def test_chunk_ranges() -> None:
    assert chunk_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_ranges(8, 4) == [(0, 4), (4, 8)]
    assert chunk_ranges(0, 4) == []
    with pytest.raises(ValueError, match="rows_per_chunk"):
        chunk_ranges(10, 0)


# ---- the real h5ad files -----------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_h5ad_chunks_equal_anndata(name: str) -> None:
    uri = str(H5AD / name)
    info = probe(uri)
    n_cells, n_genes, kind = REAL[name]
    assert (info.format, info.n_cells, info.n_genes, info.gene_id_kind) == (
        "h5ad",
        n_cells,
        n_genes,
        kind,
    )
    assert len(info.gene_names) == n_genes and not info.has_n_counts
    a = ad.read_h5ad(uri)
    assert info.obs_columns == list(a.obs.columns)
    chunks = read_all(uri, "h5ad", n_cells, 512)
    assert same(stack(chunks, n_genes), a.X)  # scirpy's float32 integers included
    assert np.array_equal(np.concatenate([c.barcodes for c in chunks]), a.obs_names.to_numpy(str))
    assert all(c.n_counts_obs is None for c in chunks)


@needs_data
def test_pbmc_facs_gene_ids_and_obs() -> None:
    a = ad.read_h5ad(PBMC_FACS)
    info = probe(str(PBMC_FACS))
    assert info.gene_names == a.var["ensembl_id"].tolist()
    symbols = probe(str(PBMC_FACS), gene_id_column="gene_symbol")
    assert symbols.gene_names == a.var["gene_symbol"].astype(str).tolist()
    assert symbols.gene_id_kind == "symbol"
    with pytest.raises(SourceError, match=r"gene_id_column.*'nope'.*ensembl_id.*gene_symbol"):
        probe(str(PBMC_FACS), gene_id_column="nope")
    chunk = read_chunk(str(PBMC_FACS), "h5ad", 100, 700, obs_columns=["celltype", "split"])
    assert list(chunk.obs) == ["celltype", "split"]
    for col, values in chunk.obs.items():
        assert np.array_equal(values, a.obs[col].iloc[100:700].to_numpy(str))
    with pytest.raises(SourceError, match=r"obs.*\['cell_type'\].*available.*'celltype'"):
        read_chunk(str(PBMC_FACS), "h5ad", 0, 10, obs_columns=["cell_type"])


@needs_data
def test_pbmc3k_partial_ensembl_column_has_blanks() -> None:
    uri = str(H5AD / "pbmc3k_seurat_2638cells.h5ad")
    info = probe(uri, gene_id_column="ensembl_id_from_pbmc_facs")
    column = ad.read_h5ad(uri).var["ensembl_id_from_pbmc_facs"]
    assert info.gene_names == column.astype(str).tolist()
    assert "" in info.gene_names and info.gene_id_kind == "ensembl"  # most genes have one


@needs_data
def test_file_uri_matches_local_path() -> None:
    local = read_chunk(str(PBMC_FACS), "h5ad", 1000, 1512, obs_columns=["celltype"])
    remote = read_chunk(PBMC_FACS.as_uri(), "h5ad", 1000, 1512, obs_columns=["celltype"])
    assert probe(PBMC_FACS.as_uri()).n_cells == 3874
    for field in ("barcodes", "indptr", "indices", "data"):
        assert np.array_equal(getattr(local, field), getattr(remote, field))
    assert np.array_equal(local.obs["celltype"], remote.obs["celltype"])


@needs_data
def test_truncated_and_corrupt_files(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.h5ad"
    truncated.write_bytes(PBMC_FACS.read_bytes()[: PBMC_FACS.stat().st_size // 2])
    garbage = tmp_path / "garbage.h5ad"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    for path in (truncated, garbage):
        with pytest.raises(SourceError, match=r"file.*(corrupt|truncated)"):
            probe(str(path))
        with pytest.raises(SourceError, match=r"file.*(corrupt|truncated)"):
            read_chunk(str(path), "h5ad", 0, 10)


# ---- h5ad variants written here ----------------------------------------------------------


def _h5ad(path: Path, x: sp.spmatrix, **kw) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # repeated obs names in some tests
        ad.AnnData(x, **kw).write_h5ad(path)
    return str(path)


def test_normalised_x_with_raw_counts_elsewhere(tmp_path: Path, cells: dict) -> None:
    x = cells["x"][:100]
    norm = sp.csr_matrix(x.multiply(1e4 / np.maximum(x.sum(axis=1), 1)).log1p(), dtype=np.float32)
    var = pd.DataFrame({"ensembl_id": cells["ids"]}, index=np.char.add("v", cells["ids"]))
    raw = ad.AnnData(x, var=pd.DataFrame(index=np.char.add("raw", cells["ids"])))
    a = ad.AnnData(norm, var=var, layers={"counts": x})
    a.raw = raw
    uri = str(tmp_path / "norm.h5ad")
    a.write_h5ad(uri)
    with pytest.raises(
        SourceError,
        match=r"norm\.h5ad: X: counts are not whole numbers.*matrix: raw/X.*layers/counts",
    ):
        probe(uri)
    with pytest.raises(SourceError, match="not whole numbers"):
        read_chunk(uri, "h5ad", 0, 100)
    for matrix, genes in (
        ("layers/counts", cells["ids"]),
        ("raw/X", np.char.add("raw", cells["ids"])),
    ):
        info = probe(uri, matrix=matrix)
        assert info.gene_names == genes.tolist()
        assert same(stack(read_all(uri, "h5ad", 100, 30, matrix=matrix), info.n_genes), x)
    with pytest.raises(SourceError, match=r"matrix: 'layers/spliced' is not in the file.*raw/X"):
        probe(uri, matrix="layers/spliced")


def test_dense_x_read_in_blocks(
    tmp_path: Path, cells: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = cells["x"][:90]
    uri = _h5ad(tmp_path / "dense.h5ad", x.toarray().astype(np.float64))
    monkeypatch.setattr(readers_h5, "_BLOCK_BYTES", 8 * x.shape[1] * 7)  # 7 rows per block
    assert same(stack(read_all(uri, "h5ad", 90, 40), x.shape[1]), x)


def test_csc_negative_and_empty_matrices(tmp_path: Path, cells: dict) -> None:
    x = cells["x"][:20]
    with pytest.raises(SourceError, match=r"X: is stored as CSC.*adata\.X = adata\.X\.tocsr\(\)"):
        probe(_h5ad(tmp_path / "csc.h5ad", sp.csc_matrix(x)))
    neg = x.copy()
    neg.data[5] = -3
    with pytest.raises(SourceError, match=r"X: counts are negative \(e\.g\. -3 in cell"):
        read_chunk(_h5ad(tmp_path / "neg.h5ad", neg), "h5ad", 0, 20)
    with pytest.raises(SourceError, match=r"empty\.h5ad: X: is empty \(0 cells"):
        probe(_h5ad(tmp_path / "empty.h5ad", sp.csr_matrix((0, 5), dtype=np.int32)))


def test_cell_names_in_messages_are_plain_text(tmp_path: Path, cells: dict) -> None:
    """Errors quote a cell as 'name', never as NumPy's np.str_('name')."""
    x = sp.csr_matrix(cells["x"][:20], dtype=np.float32)
    x.data[5] = 0.5
    uri = _h5ad(tmp_path / "half.h5ad", x, obs=pd.DataFrame(index=cells["barcodes"][:20]))
    with pytest.raises(SourceError) as err:
        read_chunk(uri, "h5ad", 0, 20)
    cell = cells["barcodes"][int(np.searchsorted(x.indptr, 5, side="right")) - 1]
    assert f"in cell '{cell}'" in str(err.value) and "np.str_" not in str(err.value)


def test_readable_quarantined_files_still_count_their_cells(tmp_path: Path, cells: dict) -> None:
    """A file that is readable but cannot be used as given counts its cells (corpus counts)."""
    x = cells["x"][:30]
    csc = _h5ad(tmp_path / "csc.h5ad", sp.csc_matrix(x))
    plain = _h5ad(tmp_path / "plain.h5ad", x)
    with pytest.raises(SourceError, match="CSC"):
        probe(csc)
    with pytest.raises(SourceError, match="'layers/counts' is not in the file"):
        probe(plain, matrix="layers/counts")
    assert count_cells(csc) == 30  # stored as CSC
    assert count_cells(plain, matrix="layers/counts") == 30  # no such matrix
    assert count_cells(plain, "h5ad", matrix="raw/X") == 30
    loom = tmp_path / "cells.loom"
    write_loom(loom, sp.csr_matrix(x), cells["ids"][: x.shape[1]], cells["symbols"][: x.shape[1]],
               cells["barcodes"][:30])  # fmt: skip
    assert count_cells(str(loom), matrix="layers/nope") == 30
    two = tmp_path / "v2_two_genomes.h5"
    write_10x_h5(two, x, cells["ids"], cells["symbols"], cells["barcodes"][:30], version=2,
                 genomes=("hg19", "mm10"))  # fmt: skip
    assert count_cells(str(two)) == 30  # several genomes, none chosen
    garbage = tmp_path / "garbage.h5ad"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    assert count_cells(str(garbage)) is None  # unreadable: nothing to count


def test_text_n_counts_is_nan_not_an_error(tmp_path: Path, cells: dict) -> None:
    """A non-numeric obs["n_counts"] no longer quarantines a file for the corpus stage (which
    does not use it); tokenize sees NaN and reports those cells."""
    obs = pd.DataFrame({"n_counts": ["12", "n/a", "7.5", ""]}, index=[f"c{i}" for i in range(4)])
    uri = _h5ad(tmp_path / "text.h5ad", cells["x"][:4], obs=obs)
    c = read_chunk(uri, "h5ad", 0, 4)
    assert np.array_equal(c.n_counts_obs, [12.0, np.nan, 7.5, np.nan], equal_nan=True)


def test_stored_zeros_and_unsorted_duplicate_indices(tmp_path: Path) -> None:
    # row 0: gene 3 twice (summed), gene 1 after it, a stored zero; row 1: empty; row 2: one gene
    x = sp.csr_matrix(
        (np.array([2, 5, 1, 0, 4]), np.array([3, 1, 3, 0, 2]), np.array([0, 4, 4, 5])), shape=(3, 4)
    )
    uri = _h5ad(tmp_path / "messy.h5ad", x)
    with h5py.File(uri) as h5:  # anndata wrote the arrays as given
        assert h5["X/data"].shape == (5,)
    c = read_chunk(uri, "h5ad", 0, 3)
    assert c.indptr.tolist() == [0, 2, 2, 3]
    assert c.indices.tolist() == [1, 3, 2] and c.data.tolist() == [5, 3, 4]


def test_obs_columns_types_and_missing_values(tmp_path: Path, cells: dict) -> None:
    n = 6
    obs = pd.DataFrame(
        {
            "cat": pd.Categorical(["t", None, "b", "t", None, "b"]),
            "text": ["x", "y", "z", "x", "y", "z"],
            "nullable": pd.array([1, None, 3, 4, 5, None], dtype="Int64"),
            "score": [0.5, np.nan, 2.0, 1.0, 1.5, 3.0],
            "flag": [True, False, True, True, False, False],
            "n_counts": [10.0, 20.0, np.nan, 40.0, 50.0, 60.0],
        },
        index=[f"c{i}" for i in range(n)],
    )
    uri = _h5ad(tmp_path / "obs.h5ad", cells["x"][:n], obs=obs)
    info = probe(uri)
    assert info.has_n_counts and info.obs_columns == list(obs.columns)
    c = read_chunk(uri, "h5ad", 1, 5, obs_columns=["cat", "text", "nullable", "score", "flag"])
    assert c.obs["cat"].tolist() == ["", "b", "t", ""]
    assert c.obs["text"].tolist() == ["y", "z", "x", "y"]
    assert c.obs["nullable"].tolist() == ["", "3", "4", "5"]
    assert c.obs["score"].tolist() == ["", "2.0", "1.0", "1.5"]
    assert c.obs["flag"].tolist() == ["False", "True", "True", "False"]
    assert c.n_counts_obs.dtype == np.float64
    assert np.array_equal(c.n_counts_obs, [20.0, np.nan, 40.0, 50.0], equal_nan=True)


def test_repeated_obs_names_made_unique_whatever_the_chunking(
    tmp_path: Path, cells: dict, caplog: pytest.LogCaptureFixture
) -> None:
    names = ["a", "b", "a", "a-1", "b", "a"]
    uri = _h5ad(tmp_path / "dups.h5ad", cells["x"][:6], obs=pd.DataFrame(index=names))
    expected = ["a", "b", "a-2", "a-1", "b-1", "a-3"]
    log = logging.getLogger("cellfoundry.corpus")
    log.addHandler(caplog.handler)  # works even when the cellfoundry logger does not propagate
    try:
        for rows in (1, 2, 4, 6):
            chunks = read_all(uri, "h5ad", 6, rows)
            assert np.concatenate([c.barcodes for c in chunks]).tolist() == expected
    finally:
        log.removeHandler(caplog.handler)
    assert "repeated obs names" in caplog.text


def test_bad_requests(tmp_path: Path, cells: dict) -> None:
    uri = _h5ad(tmp_path / "ok.h5ad", cells["x"][:10])
    with pytest.raises(SourceError, match=r"rows: range 5:11 is outside 0:10"):
        read_chunk(uri, "h5ad", 5, 11)
    assert read_chunk(uri, "h5ad", 4, 4).n_cells == 0
    with pytest.raises(SourceError, match="unknown format 'csv'"):
        read_chunk(uri, "csv", 0, 1)
    with pytest.raises(SourceError, match=r"missing\.h5ad: uri: file not found"):
        probe(str(tmp_path / "missing.h5ad"))
    err = SourceError("f.h5ad", "X", "counts are negative", "use raw counts")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, ValueError) and str(back) == str(err) and back.field == "X"


# ---- loom --------------------------------------------------------------------------------


def test_loom_written_by_loompy(tmp_path: Path, cells: dict) -> None:
    x = cells["x"]
    uri = str(tmp_path / "cells.loom")
    write_loom(
        tmp_path / "cells.loom",
        x,
        cells["ids"],
        cells["symbols"],
        cells["barcodes"],
        layers={"spliced": x * 2},
    )
    info = probe(uri)
    assert (info.format, info.n_cells, info.n_genes) == ("loom", *x.shape)
    assert info.gene_names == cells["ids"].tolist() and info.gene_id_kind == "ensembl"
    assert info.has_n_counts and {"CellID", "n_counts"} <= set(info.obs_columns)
    assert probe(uri, gene_id_column="Gene").gene_names == cells["symbols"].tolist()
    chunks = read_all(uri, "loom", x.shape[0], 64, obs_columns=["CellID"])
    assert same(stack(chunks, x.shape[1]), x)
    barcodes = np.concatenate([c.barcodes for c in chunks])
    assert barcodes.tolist() == cells["barcodes"].tolist()
    assert np.concatenate([c.obs["CellID"] for c in chunks]).tolist() == barcodes.tolist()
    n_counts = np.concatenate([c.n_counts_obs for c in chunks])
    assert np.array_equal(n_counts, np.asarray(x.sum(axis=1)).ravel())
    spliced = read_all(uri, "loom", x.shape[0], 100, matrix="layers/spliced")
    assert same(stack(spliced, x.shape[1]), x * 2)
    with pytest.raises(SourceError, match=r"gene_id_column: 'gene'.*Accession"):
        probe(uri, gene_id_column="gene")


# ---- 10x HDF5 ----------------------------------------------------------------------------


def test_10x_h5_v3_keeps_gene_expression_only(tmp_path: Path, cells: dict) -> None:
    x, gex = with_antibodies(cells["x"])
    ids = np.where(gex, "", "AB_").astype(object)
    ids[gex], ids[~gex] = cells["ids"], [f"AB_{i}" for i in range((~gex).sum())]
    symbols = ids.copy()
    symbols[gex] = cells["symbols"]
    uri = str(tmp_path / "filtered_feature_bc_matrix.h5")
    write_10x_h5(Path(uri), x, ids, symbols, cells["barcodes"], gex=gex)
    info = probe(uri)
    assert (info.format, info.n_cells, info.n_genes) == ("10x_h5", *cells["x"].shape)
    assert info.gene_names == cells["ids"].tolist() and info.obs_columns == []
    assert probe(uri, gene_id_column="name").gene_names == cells["symbols"].tolist()
    chunks = read_all(uri, "10x_h5", info.n_cells, 50)
    assert same(stack(chunks, info.n_genes), cells["x"])
    assert np.concatenate([c.barcodes for c in chunks]).tolist() == cells["barcodes"].tolist()
    with pytest.raises(
        SourceError, match=r"obs: no column\(s\) \['cell_type'\] \(available: \[\]\)"
    ):
        read_chunk(uri, "10x_h5", 0, 5, obs_columns=["cell_type"])


def test_10x_h5_v2_genomes(tmp_path: Path, cells: dict) -> None:
    x = cells["x"]
    one, two = tmp_path / "v2.h5", tmp_path / "v2_two_genomes.h5"
    write_10x_h5(one, x, cells["ids"], cells["symbols"], cells["barcodes"], version=2)
    info = probe(str(one))
    assert info.gene_names == cells["ids"].tolist() and info.gene_id_kind == "ensembl"
    assert same(stack(read_all(str(one), "10x_h5", x.shape[0], 100), x.shape[1]), x)
    assert probe(str(one), gene_id_column="name").gene_names == cells["symbols"].tolist()
    genomes = ("hg19", "mm10")
    write_10x_h5(
        two, x, cells["ids"], cells["symbols"], cells["barcodes"], version=2, genomes=genomes
    )
    with pytest.raises(SourceError, match=r"several genomes \['hg19', 'mm10'\].*set matrix"):
        probe(str(two))
    assert probe(str(two), matrix="mm10").n_genes == x.shape[1]


# ---- 10x mtx -----------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["v3-gzip", "v2-plain"])
def test_10x_mtx_directory(tmp_path: Path, cells: dict, gz: bool) -> None:
    x, gex = with_antibodies(cells["x"]) if gz else (cells["x"], None)
    ids = np.array([f"AB_{i}" for i in range(x.shape[1])], dtype=object)
    ids[gex if gz else slice(None)] = cells["ids"]
    symbols = ids.copy()
    symbols[gex if gz else slice(None)] = cells["symbols"]
    folder = write_10x_mtx(tmp_path / "mtx", x, ids, symbols, cells["barcodes"], gex=gex, gz=gz)
    for uri in (str(folder), folder.as_uri()):
        info = probe(uri)
        assert (info.format, info.n_cells, info.n_genes) == ("10x_mtx", *cells["x"].shape)
        assert info.gene_names == cells["ids"].tolist()
        chunks = read_all(uri, "10x_mtx", info.n_cells, 70)
        assert same(stack(chunks, info.n_genes), cells["x"])
        assert np.concatenate([c.barcodes for c in chunks]).tolist() == cells["barcodes"].tolist()
    assert probe(str(folder), gene_id_column="name").gene_names == cells["symbols"].tolist()
    barcodes = folder / ("barcodes.tsv.gz" if gz else "barcodes.tsv")
    barcodes.write_bytes(gzip.compress(b"only-one\n") if gz else b"only-one\n")
    with pytest.raises(
        SourceError, match=r"matrix\.mtx(\.gz)?: is \d+ genes x \d+ cells but .* 1 barcodes"
    ):
        probe(str(folder))
