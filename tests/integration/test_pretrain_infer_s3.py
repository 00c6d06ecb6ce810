"""Pretraining, embed and perturb with object storage only (moto's real S3 server on
127.0.0.1): tokenized cells, the model artifact, Ray Train's checkpoints, the embeddings
(.h5ad and artifact) and the screen all live in the bucket; no stage reads another's
local files. The embeddings equal those of the same model loaded from a local copy, every
artifact's manifest lists its data, reruns reuse the artifacts, and plain transformers
loads the remote model through :func:`cellfoundry.artifacts.localize`."""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import numpy as np
import pyarrow.parquet as pq
import pytest
import transformers

from cellfoundry import artifacts, storage
from cellfoundry.cli import main
from cellfoundry.config import EmbedJobConfig, PerturbJobConfig, PretrainJobConfig, parse_config
from cellfoundry.infer.common import cells_of, read_table, shard_files
from cellfoundry.infer.embed_job import run_embed
from cellfoundry.infer.outputs import OBSM_KEY
from cellfoundry.infer.perturb_job import run_perturb
from cellfoundry.integrity import KEY_ENV, KEY_FILE_ENV
from cellfoundry.train import run_pretrain
from cellfoundry.train.checkpoint import verify_training_state
from support.s3_server import S3Prefix

SOURCE = "scwg_1k_PBMC_v3_filt.h5ad"
STEPS = 4


@pytest.fixture(autouse=True)
def checkpoint_key_file(tmp_path: Path) -> Iterator[None]:
    """The checkpoint key in a temp file (forwarded to the workers by name, never by value)."""
    path = tmp_path / "checkpoint.key"
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(KEY_ENV, raising=False)
        mp.setenv(KEY_FILE_ENV, str(path))
        yield


def pretrain_cfg(s3: S3Prefix, tokenized: str, geneformer_dir: Path) -> PretrainJobConfig:
    """A 2-layer, 64-wide BERT, one CPU worker, a few steps; everything it writes on s3."""
    data = {
        "data": {"tokenized": tokenized, "token_dictionary": str(geneformer_dir / "v2"),
                 "max_length": 64, "batch_size": 8, "megabatch_mult": 4},
        "model": {"preset": "tiny", "overrides": {"hidden_size": 64, "num_attention_heads": 1,
                                                  "intermediate_size": 128, "max_position_embeddings": 64}},
        "optim": {"lr": 2e-3, "warmup_ratio": 0.1, "max_steps": STEPS},
        "scaling": {"num_workers": 1, "resources_per_worker": {"CPU": 1}},
        "checkpoint_every": 2, "log_every": 1,
        "tracking": {"tensorboard": False, "mlflow": False},
        "output_dir": s3.uri("model"),
        "run": {"storage_path": s3.uri("runs"), "name": "tiny"},
    }  # fmt: skip
    return parse_config(PretrainJobConfig, data)


def _cache_entry(uri: str) -> Path:
    """Where :func:`artifacts.localize` keeps ``uri`` for a process with the default cache
    (the Ray actors of the session cluster do not see this test's environment)."""
    raw = storage.read_bytes(storage.join(uri, artifacts.MANIFEST))
    key = hashlib.sha256(storage.normalize(uri).encode() + b"\0" + raw).hexdigest()[:24]
    return Path.home() / ".cache" / "cellfoundry" / "artifacts" / key


def test_pretrain_embed_perturb_all_on_s3(
    ray_local: None, s3: S3Prefix, real_h5ad: list[Path], geneformer_dir: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv(artifacts.CACHE_ENV, str(tmp_path / "cache"))  # this driver's cache
    source = next((p for p in real_h5ad if p.name == SOURCE), None)
    if source is None:
        pytest.skip(f"needs {SOURCE} in ../shared/data/h5ad")
    tokenized = s3.uri("tokenized")
    argv = ["tokenize", str(source), "--dictionaries", str(geneformer_dir / "v2"), "--mode", "v2",
            "--output", tokenized, "--model-input-size", "64", "--rows-per-chunk", "400"]  # fmt: skip
    assert main(argv) == 0

    # --- pretraining: tokens, checkpoints and the model artifact on s3 ---
    cfg = pretrain_cfg(s3, tokenized, geneformer_dir)
    assert not Path(cfg.tracking.log_dir or "").is_relative_to(Path.cwd())  # a local default
    result = run_pretrain(cfg)
    model = s3.uri("model")
    assert result.completed and result.steps == STEPS and result.model_dir == model
    assert str(result.checkpoint_path).startswith(s3.uri("runs", "tiny", "checkpoint_"))
    manifest = artifacts.read_manifest(model, "model")
    listed = set(manifest["data_files"])
    assert {"config.json", "model.safetensors", "token_dictionary.json", "metrics.csv",
            "loss_curve.png", "training_state/latest"} <= listed  # fmt: skip
    assert manifest["inputs"]["tokenized"]["path"] == tokenized
    run_objects = s3.objects("runs", "tiny")
    assert "runs/tiny/cellfoundry_fingerprint" in run_objects
    assert any(o.startswith("runs/tiny/checkpoint_step_00000004/") for o in run_objects)
    local_model = artifacts.localize(model)
    hf = transformers.BertForMaskedLM.from_pretrained(local_model)
    assert hf.config.hidden_size == 64
    assert verify_training_state(local_model / "training_state") == f"step_{STEPS:08d}"
    rows = (local_model / "metrics.csv").read_text().splitlines()
    assert len(rows) == STEPS + 1  # the header and one row per step, through the checkpoints
    assert run_pretrain(cfg).reused
    # the run folder belongs to this config: another one is refused, with the fix named
    with pytest.raises(artifacts.ArtifactError, match=r"runs/tiny holds a Ray run.*run\.name"):
        artifacts.claim_run_dir(s3.uri("runs"), "tiny", "0" * 32)

    try:
        _embed_and_perturb(s3, model, tokenized, local_model, tmp_path)
    finally:
        shutil.rmtree(_cache_entry(model), ignore_errors=True)  # what the actors cached


def _embed_and_perturb(
    s3: S3Prefix, model: str, tokenized: str, local_model: Path, tmp_path: Path
) -> None:
    compute = {"concurrency": 1, "batch_size": 100, "model_batch_size": 32}
    # --- embed: the s3 model and tokens, the .h5ad and artifact on s3 ---
    base = {"tokenized": tokenized, "max_cells": 200, "umap_color": None, "compute": compute}
    cfg = parse_config(EmbedJobConfig, {**base, "model": model, "output": s3.uri("emb.h5ad")})
    emb = run_embed(cfg)
    assert emb.n_cells == 200 and emb.h5ad == s3.uri("emb.h5ad")
    embeddings = s3.uri("emb.embeddings")
    assert "genes.parquet" in artifacts.read_manifest(embeddings, "embeddings")["data_files"]
    storage.download_file(s3.uri("emb.h5ad"), tmp_path / "remote.h5ad")
    remote = ad.read_h5ad(tmp_path / "remote.h5ad")
    copy = shutil.copytree(local_model, tmp_path / "model")  # a plain local folder
    local_cfg = {**base, "model": str(copy), "output": str(tmp_path / "local.h5ad")}
    local = ad.read_h5ad(run_embed(parse_config(EmbedJobConfig, local_cfg)).h5ad)
    assert list(remote.obs_names) == list(local.obs_names)
    np.testing.assert_allclose(remote.obsm[OBSM_KEY], local.obsm[OBSM_KEY], atol=1e-5)
    assert run_embed(cfg).reused

    # --- perturb: a small screen, its work files and artifact on s3 ---
    vocab = json.loads((local_model / "token_dictionary.json").read_text())
    names = {v: k for k, v in vocab.items()}
    first = shard_files(tokenized)[0]
    cells = cells_of(read_table(first).slice(0, 3))
    top = Counter(int(t) for c in cells for t in c[1:-1]).most_common(1)[0][0]
    screen = s3.uri("screen")
    pcfg = parse_config(PerturbJobConfig, {
        "model": model, "tokenized": tokenized, "output_dir": screen, "max_cells": 3,
        "perturbations": [{"kind": "delete", "genes": [names[top]]}],
        "compute": {**compute, "model_batch_size": 16},
    })  # fmt: skip
    shot = run_perturb(pcfg)
    assert shot.artifact == screen and shot.counts["cells_perturbed"] > 0
    listed = artifacts.read_manifest(screen, "screen")["data_files"]
    assert {"stats.parquet", "gene_stats.parquet"} <= set(listed)
    shards = sorted(n for n in listed if n.startswith("screen/part-"))
    assert len(shards) == len(shard_files(tokenized)) and shot.counts["shards"] == len(shards)
    assert s3.objects("screen.work") == []  # the actors' work files are gone
    stats = pq.read_table(artifacts.data_files(screen, "stats.parquet")[0].split("://")[1],
                          filesystem=storage.filesystem(screen))  # fmt: skip
    assert stats.num_rows == 1
    assert run_perturb(pcfg).reused
