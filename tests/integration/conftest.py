"""One local Ray cluster per test session, bound to loopback, leaving nothing behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "token",  # as every cluster cellfoundry starts (docs/security.md)
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every socket on 127.0.0.1 (PITFALLS.md)
}


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A 2-CPU in-process Ray cluster (300 MB object store) shared by the session, with
    Ray token auth on and a random token of its own (0600 in the cluster's temp dir)."""
    ray = pytest.importorskip("ray")
    from cellfoundry.runtime import ensure_cluster_token, write_token_file

    saved = {k: os.environ.get(k) for k in [*_ENV, "RAY_TMPDIR", "RAY_AUTH_TOKEN_PATH"]}
    # A short temp dir (Ray's socket paths must stay under 107 bytes), removed at the end.
    tmpdir = tempfile.mkdtemp(prefix="cfray-")
    token = write_token_file(tmpdir)
    os.environ.update(_ENV, RAY_TMPDIR=tmpdir, RAY_AUTH_TOKEN_PATH=str(token))
    os.environ.pop("RAY_AUTH_TOKEN", None)
    ensure_cluster_token()  # Ray caches the auth mode once imported: refresh it
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=300 * 1024**2,
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(tmpdir, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_CATALOG = """\
# pbmc_facs (labels + split), pbmc3k (labels), 10x v2 and v3 (two chemistries as batches).
datasets:
  - id: pbmc_facs
    uri: "{shared}/data/h5ad/pbmc_facs_zheng2017_3874cells.h5ad"
    doi: 10.1038/ncomms14049
    metadata: {cell_type: celltype, split: split}
  - id: pbmc3k
    uri: "{shared}/data/h5ad/pbmc3k_seurat_2638cells.h5ad"
    metadata: {cell_type: cell_type}
  - id: pbmc1k_v2_raw
    uri: "{shared}/data/h5ad/scwg_1k_PBMC_v2_raw.h5ad"
  - id: pbmc1k_v3_filt
    uri: "{shared}/data/h5ad/scwg_1k_PBMC_v3_filt.h5ad"
"""

SMALL_INPUT_SIZE = 128
"""Tokens per cell of :func:`pbmc_corpus` (<cls> + 126 genes + <eos>): small for fast tests."""


@pytest.fixture(scope="session")
def pbmc_corpus(ray_local: None, real_h5ad: list, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Stage 1 over four real PBMC files (~8.4k cells), V2 layout cut to 128 tokens per
    cell, the corpus's own medians and vocabulary; shared by the stage 3/4/5/eval tests.
    Returns the :class:`~cellfoundry.corpus.pipeline.CorpusResult`."""
    from cellfoundry.config import CorpusConfig, parse_config
    from cellfoundry.corpus.pipeline import run_corpus

    root = tmp_path_factory.mktemp("pbmc_corpus")
    (root / "catalog.yaml").write_text(_CATALOG)
    cfg = parse_config(
        CorpusConfig,
        {
            "catalog": str(root / "catalog.yaml"),
            "output_dir": str(root / "out"),
            "rows_per_chunk": 1024,
            "tokenize": {"mode": "v2", "model_input_size": SMALL_INPUT_SIZE},
        },
    )
    return run_corpus(cfg)


@pytest.fixture(scope="session")
def tiny_model(pbmc_corpus: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer, 64-wide BertForMaskedLM (seed 0) over the corpus
    vocabulary, saved as a model directory (config.json, safetensors, token dictionary).
    Random weights are enough for equality tests; learning tests train from it."""
    import json as _json

    from cellfoundry.model import bert_config, build_model, save_checkpoint

    vocab = _json.loads((pbmc_corpus.vocabulary / "token_dictionary.json").read_text())
    config = bert_config(
        "tiny", vocab_size=len(vocab), num_hidden_layers=2, hidden_size=64,
        num_attention_heads=2, intermediate_size=128, max_position_embeddings=SMALL_INPUT_SIZE,
    )  # fmt: skip
    model = build_model(config, seed=0)
    return save_checkpoint(
        model, tmp_path_factory.mktemp("tiny_model") / "model", token_dictionary=vocab
    )


# moto's S3 server on 127.0.0.1 (session) and a per-test AWS environment pointing at it.
from support.s3_server import s3, s3_server  # noqa: E402, F401
