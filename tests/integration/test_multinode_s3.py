"""No shared filesystem assumed: corpus -> pretraining (2 workers) -> embed on a 3-node
``ray.cluster_utils.Cluster`` with every artifact on S3 (moto's real S3 server over HTTP on
127.0.0.1), giving the same tokens, medians and embeddings as the single-node run.

The cluster runs in a subprocess (a driver of its own, as ``test_elastic_pools.py`` does), so
the session's cluster is untouched. Its working directory is an empty folder and its artifact
cache (:func:`cellfoundry.artifacts.localize`) a folder of its own: afterwards the working
directory must still be empty, so no stage wrote an artifact to a local path. The single-node
reference is the session's ``pbmc_corpus`` (the same catalog and config, written locally,
with the one-task duplicate search and medians of small corpora: the cluster run uses the
distributed ones, so the equality covers both).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cellfoundry import artifacts, storage
from support.s3_server import S3Prefix

EMBED_CELLS = 120
INPUT_SIZE = 128  # conftest's SMALL_INPUT_SIZE: the session corpus's tokens per cell

SCRIPT = textwrap.dedent(
    """
    import json
    import sys

    from cellfoundry import runtime  # before ray: every Ray socket on 127.0.0.1

    runtime.ensure_cluster_token()
    import ray
    from ray.cluster_utils import Cluster

    from cellfoundry.config import CorpusConfig, EmbedJobConfig, PretrainJobConfig, parse_config
    from cellfoundry.corpus.pipeline import run_corpus
    from cellfoundry.infer.embed_job import run_embed
    from cellfoundry.train import run_pretrain

    root, catalog, input_size, n_embed, out = sys.argv[1:6]
    node = {"num_cpus": 1, "object_store_memory": 150 * 1024**2}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(**node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        nodes = len([n for n in ray.nodes() if n["Alive"]])
        corpus = run_corpus(parse_config(CorpusConfig, {
            "catalog": catalog, "output_dir": f"{root}/corpus", "rows_per_chunk": 1024,
            "tokenize": {"mode": "v2", "model_input_size": int(input_size)},
            # the distributed duplicate search and medians, across the nodes (the session's
            # single-node reference takes the one-task path of small corpora)
            "single_task_max_cells": 0,
        }))
        pretrain = run_pretrain(parse_config(PretrainJobConfig, {
            "data": {"tokenized": str(corpus.tokenized), "token_dictionary": str(corpus.vocabulary),
                     "max_length": int(input_size), "batch_size": 8},
            "model": {"preset": "tiny", "overrides": {
                "hidden_size": 64, "num_attention_heads": 1, "intermediate_size": 128,
                "max_position_embeddings": int(input_size)}},
            "optim": {"lr": 2e-3, "warmup_ratio": 0.1, "max_steps": 4},
            "deepspeed": {"stage": 2},
            "scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 1}},
            "checkpoint_every": 2, "log_every": 1,
            "tracking": {"tensorboard": False, "mlflow": False},
            "output_dir": f"{root}/model",
            "run": {"name": "multinode", "storage_path": f"{root}/runs"},
        }))
        embed = run_embed(parse_config(EmbedJobConfig, {
            "model": f"{root}/model", "tokenized": str(corpus.tokenized),
            "output": f"{root}/embeddings/pbmc.h5ad", "max_cells": int(n_embed),
            "umap_color": None, "genes": False,
            "compute": {"batch_size": 40, "model_batch_size": 16},
        }))
        result = {
            "nodes": nodes, "corpus": corpus.paths(), "counts": corpus.counts,
            "completed": pretrain.completed, "final_loss": pretrain.final_loss,
            "embed_cells": embed.n_cells,
        }
    finally:
        ray.shutdown()
        cluster.shutdown()
    with open(out, "w") as f:
        json.dump(result, f, default=str)
    """
)


def read_parts(files: list[str]) -> pa.Table:
    """The rows of Parquet files given as paths or URIs, in file order."""
    tables = []
    for f in files:
        fs, path = storage.resolve(f)
        tables.append(pq.read_table(path, filesystem=fs))
    return pa.concat_tables(tables)


def by_cell(table: pa.Table) -> dict[str, Any]:
    ids = table["cell_id"].to_pylist()
    return dict(zip(ids, table["input_ids"].to_pylist(), strict=True))


@pytest.mark.timeout(900)
def test_corpus_pretrain_embed_on_three_nodes_with_every_artifact_on_s3(
    s3: S3Prefix, pbmc_corpus: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = Path(pbmc_corpus.catalog).parents[1] / "catalog.yaml"  # the session corpus's
    workdir, cache, script = tmp_path / "cwd", tmp_path / "cache", tmp_path / "multinode.py"
    workdir.mkdir()
    script.write_text(SCRIPT)
    root = s3.uri("run")
    monkeypatch.setenv(artifacts.CACHE_ENV, str(cache))  # this process's copies too
    env = dict(os.environ)
    done = subprocess.run(
        [sys.executable, str(script), root, str(catalog), str(INPUT_SIZE),
         str(EMBED_CELLS), str(tmp_path / "result.json")],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=840,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-6000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["nodes"] == 3 and result["completed"] and np.isfinite(result["final_loss"])
    assert list(workdir.iterdir()) == []  # nothing written to a local path

    # Every artifact committed on S3 by its manifest; nothing else left under the prefix
    # except Ray Train's run folder.
    for name in ("corpus/catalog", "corpus/cells", "corpus/medians", "corpus/vocabulary",
                 "corpus/tokenized", "model"):  # fmt: skip
        manifest = artifacts.read_manifest(s3.uri("run", *name.split("/")))
        assert manifest["data"].startswith("cf-run-") and manifest["data_files"], name
    # the embeddings' artifact holds only provenance here (no gene table, no UMAP): the
    # h5ad beside it is the output, uploaded whole
    embeddings = artifacts.read_manifest(s3.uri("run", "embeddings", "pbmc.embeddings"))
    assert embeddings["counts"]["cells"] == EMBED_CELLS
    assert storage.is_file(s3.uri("run", "embeddings", "pbmc.h5ad"))
    assert not any("/cf-run-" in k and k.endswith(".lock") for k in s3.objects())

    # Same tokens as the single-node run, cell by cell.
    remote = by_cell(read_parts(artifacts.data_files(s3.uri("run", "corpus", "tokenized"), "part-*.parquet")))  # fmt: skip
    local = by_cell(read_parts([str(p) for p in sorted(Path(pbmc_corpus.tokenized).glob("part-*.parquet"))]))  # fmt: skip
    assert len(remote) == len(local) > 8000
    assert remote == local

    # Same medians and vocabulary.
    vocab = artifacts.localize(s3.uri("run", "corpus", "vocabulary"))
    for f in sorted(Path(pbmc_corpus.vocabulary).glob("*.json")):
        if f.name != artifacts.MANIFEST:
            assert json.loads((vocab / f.name).read_text()) == json.loads(f.read_text()), f.name
    medians = artifacts.localize(s3.uri("run", "corpus", "medians"))
    remote_medians, local_medians = (
        pq.read_table(d / "medians.parquet") for d in (medians, Path(pbmc_corpus.medians))
    )
    for column in remote_medians.column_names:  # assert_array_equal: NaN (never detected) == NaN
        np.testing.assert_array_equal(
            remote_medians[column].to_numpy(), local_medians[column].to_numpy(), err_msg=column
        )

    # Same embeddings as this process computes from the S3 model on the single-node tokens.
    import anndata as ad

    from cellfoundry.infer.common import cells_of
    from cellfoundry.infer.embed import Embedder

    h5ad = tmp_path / "pbmc.h5ad"
    storage.download_file(s3.uri("run", "embeddings", "pbmc.h5ad"), h5ad)
    adata = ad.read_h5ad(h5ad)
    assert adata.n_obs == result["embed_cells"] == EMBED_CELLS
    ids = adata.obs_names.tolist()
    cells = pa.table({"input_ids": pa.array([local[i] for i in ids], pa.list_(pa.int32()))})
    expected = Embedder(artifacts.localize(s3.uri("run", "model")), batch_size=16)
    assert np.allclose(
        adata.obsm["X_cellfoundry"], expected.embed_cells(cells_of(cells)), atol=1e-4
    )
