"""The streamed synthetic corpus: depth as asked, distinct cells, readable, reused, deterministic."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from cellfoundry.corpus import sources
from cellfoundry.corpus.catalog import load_catalog
from cellfoundry.corpus.synthetic_scale import ScaleParams, generate_scale_corpus

PARAMS = ScaleParams(
    cells_per_file=600, genes_mean=150.0, genes_sigma=0.5, n_genes=800, seed=3, real_genes=False
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    return generate_scale_corpus(tmp_path_factory.mktemp("scale"), 2, PARAMS)


def test_depth_follows_the_lognormal_target(corpus) -> None:
    x = ad.read_h5ad(corpus.files[0]).X
    assert x.shape == (600, 800) and x.dtype == np.int32 and x.has_sorted_indices
    detected = np.diff(x.indptr)
    # the target counts genes besides MT (at most 13 more per cell)
    assert 0.9 * PARAMS.genes_mean < detected.mean() < 1.1 * PARAMS.genes_mean + 13
    spread = np.log(detected).std()
    assert 0.35 < spread < 0.65  # log-normal sigma 0.5 (plus sampling noise)
    assert x.data.min() >= 1
    rows = {
        tuple(x.indices[a:b]) + tuple(x.data[a:b])
        for a, b in zip(x.indptr, x.indptr[1:], strict=False)
    }
    assert len(rows) == 600  # every cell distinct: deduplication keeps them all


def test_files_are_readable_sources_listed_in_the_catalog(corpus) -> None:
    info = sources.probe(str(corpus.files[1]))
    assert (info.n_cells, info.n_genes, info.gene_id_kind) == (600, 800, "ensembl")
    chunk = sources.read_chunk(str(corpus.files[1]), info.format, 100, 300)
    full = ad.read_h5ad(corpus.files[1]).X[100:300]
    assert np.array_equal(chunk.indptr - chunk.indptr[0], full.indptr)
    assert np.array_equal(chunk.data, full.data)
    entries = load_catalog(corpus.catalog)
    assert len(entries) == 2
    mito = ad.read_h5ad(corpus.files[1]).var["gene_symbol"].str.startswith("MT-").to_numpy()
    x = ad.read_h5ad(corpus.files[1]).X
    share = x[:, mito].sum() / x.sum()
    assert 0.01 < share < 0.06


def test_deterministic_extended_and_reused(tmp_path: Path, corpus) -> None:
    one = generate_scale_corpus(tmp_path / "one", 1, PARAMS)
    a, b = ad.read_h5ad(one.files[0]), ad.read_h5ad(corpus.files[0])
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs)  # file i depends on (params, i) only
    mtime = one.files[0].stat().st_mtime_ns
    more = generate_scale_corpus(tmp_path / "one", 2, PARAMS)
    assert more.files[0].stat().st_mtime_ns == mtime  # reused, not rewritten
    assert (ad.read_h5ad(more.files[1]).X != ad.read_h5ad(corpus.files[1]).X).nnz == 0
    with pytest.raises(ValueError, match="another folder"):
        generate_scale_corpus(tmp_path / "one", 1, ScaleParams(**{**vars(PARAMS), "seed": 4}))


def test_bad_params_say_how_to_fix() -> None:
    with pytest.raises(ValueError, match="raise n_genes"):
        ScaleParams(genes_mean=5000.0, n_genes=2000)
