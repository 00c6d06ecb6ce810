"""Fine-tuning, search and evaluation with object storage (moto's real S3 server on 127.0.0.1):
the base model, the tokens and the cells on s3, the outputs on s3, and the results equal
to the same runs on local folders. Small generated cells (3 types, ~100 cells) and a
2-layer, 32-wide model keep it quick.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cellfoundry import artifacts, storage
from cellfoundry.config import FinetuneJobConfig, ProbeConfig, TuneJobConfig, parse_config
from cellfoundry.config.evaluate import MaskedEvalConfig
from support.s3_server import _AWS_VARS, S3Prefix, S3Server

N_GENES, PER_TYPE = 30, 36
TYPES = ("B", "NK", "T")
VOCAB = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3,
         **{f"ENSG{i:011d}": 4 + i for i in range(N_GENES)}}  # fmt: skip


def _cells() -> tuple[pa.Table, pa.Table]:
    """(tokens, counts) of 108 cells: each type ranks its own 10 genes first."""
    rng = np.random.default_rng(0)
    ids, types, splits, tokens, genes, counts = [], [], [], [], [], []
    for t, name in enumerate(TYPES):
        for i in range(PER_TYPE):
            own = rng.permutation(np.arange(10 * t, 10 * t + 10))[: rng.integers(6, 10)]
            rest = rng.choice(np.setdiff1d(np.arange(N_GENES), own), 5, replace=False)
            ranked = np.concatenate([own, rest])  # gene indices, highest count first
            ids.append(f"synth:{name}-{i:03d}")
            types.append(name)
            splits.append("test" if i % 4 == 0 else "train")
            tokens.append([2, *(ranked + 4).tolist(), 3])
            genes.append(ranked.tolist())
            counts.append(sorted(rng.integers(1, 50, len(ranked)).tolist(), reverse=True))
    meta = {"cell_id": ids, "dataset_id": ["synth"] * len(ids), "cell_type": types}
    tok = pa.table({**meta, "split": splits,
                    "input_ids": pa.array(tokens, pa.list_(pa.int32()))})  # fmt: skip
    raw = pa.table({"cell_id": ids, "gene_ids": pa.array(genes, pa.list_(pa.int32())),
                    "counts": pa.array(counts, pa.list_(pa.int32()))})  # fmt: skip
    return tok, raw


def _write_inputs(root: str) -> dict[str, str]:
    """The tokenized, cells and model artifacts under ``root`` (a folder or a prefix),
    written through :func:`cellfoundry.artifacts.write_artifact` as the stages do."""
    from cellfoundry.model import bert_config, build_model, save_checkpoint

    tok, raw = _cells()
    paths = {name: storage.join(root, name) for name in ("tokenized", "cells", "model")}
    with artifacts.write_artifact(paths["tokenized"], "tokenized", {"test": "synth"}) as w:
        pq.write_table(tok.slice(0, 60), w.dir / "part-00000.parquet")
        pq.write_table(tok.slice(60), w.dir / "part-00001.parquet")
    with artifacts.write_artifact(paths["cells"], "cells", {"test": "synth"}) as w:
        (w.dir / "data").mkdir()
        pq.write_table(raw, w.dir / "data" / "part-00000.parquet")
        pq.write_table(pa.table({"index": list(range(N_GENES))}), w.dir / "genes.parquet")
    config = bert_config(
        "tiny", vocab_size=len(VOCAB), num_hidden_layers=2, hidden_size=32,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
    )  # fmt: skip
    with artifacts.write_artifact(paths["model"], "model", {"test": "synth"}) as w:
        save_checkpoint(build_model(config, seed=0), w.dir, token_dictionary=VOCAB)
    return paths


def _finetune(inputs: dict[str, str], output_dir: str, **changes: Any) -> dict[str, Any]:
    cfg = {
        "data": {"tokenized": inputs["tokenized"], "cells": inputs["cells"], "batch_size": 16},
        "split": {"column": "split", "validation_size": 0.15},
        "model": {"model_dir": inputs["model"], "mode": "full"},
        "optim": {"learning_rate": 0.003, "num_train_epochs": 2},
        "baselines": {"methods": ["logreg"], "n_top_genes": 20},
        "scaling": {"resources_per_worker": {"CPU": 1}},
        "output_dir": output_dir,
    }  # fmt: skip
    cfg.update(changes)
    return cfg


@pytest.fixture(scope="module")
def store(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Prefix]:
    """The AWS environment pointed at the test server for the whole module (a prefix of its
    own), and the artifact cache of :func:`artifacts.localize` in a temp folder."""
    with pytest.MonkeyPatch.context() as mp:
        for var in _AWS_VARS:
            mp.delenv(var, raising=False)
        for var, value in s3_server.env().items():
            mp.setenv(var, value)
        mp.setenv(artifacts.CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
        yield S3Prefix(s3_server, f"t-{uuid.uuid4().hex[:10]}")


@pytest.fixture(scope="module")
def local(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Inputs in local folders, and the fine-tuned model made from them (``finetuned``)."""
    from cellfoundry.tune import run_finetune

    root = tmp_path_factory.mktemp("local")
    paths = _write_inputs(str(root))
    out = str(root / "finetuned")
    run_finetune(parse_config(FinetuneJobConfig, _finetune(paths, out)))
    return {**paths, "finetuned": out, "root": str(root)}


@pytest.fixture(scope="module")
def remote(store: S3Prefix, local: dict[str, str]) -> dict[str, str]:
    """The same inputs on s3 (nothing local), and the model fine-tuned from and to s3."""
    from cellfoundry.tune import run_finetune

    paths = _write_inputs(store.uri("in"))
    out = store.uri("finetuned")
    result = run_finetune(parse_config(FinetuneJobConfig, _finetune(paths, out)))
    assert result["reused"] is False
    return {**paths, "finetuned": out}


def test_finetune_from_and_to_s3_equals_local(
    store: S3Prefix, local: dict[str, str], remote: dict[str, str]
) -> None:
    from cellfoundry.tune import run_finetune

    manifest = artifacts.read_manifest(remote["finetuned"], "finetuned")
    listed = set(manifest["data_files"])
    for name in ("finetune.json", "label_mapping.json", "metrics.json", "report.md", "roc.png",
                 "confusion_matrix.png", "splits.json", "model/model.safetensors"):  # fmt: skip
        assert name in listed, name
    assert set(manifest["inputs"]) == {"tokenized", "model", "cells"}
    assert manifest["inputs"]["model"]["path"] == remote["model"]
    # what the manifest lists is exactly what is there: no lock, no stray objects
    objects = store.objects("finetuned")
    assert objects[-1] == "finetuned/manifest.json"
    assert sorted(o.split("/", 2)[2] for o in objects[:-1]) == sorted(listed)
    assert all(o.split("/")[1] == manifest["data"] for o in objects[:-1])

    local_metrics = json.loads((Path(local["finetuned"]) / "metrics.json").read_text())
    remote_metrics = json.loads(
        storage.read_text(storage.join(artifacts.data_uri(remote["finetuned"]), "metrics.json"))
    )
    assert remote_metrics["summary"] == local_metrics["summary"]
    assert remote_metrics["summary"]["logreg"]["accuracy"] > 0.5  # the baseline read the counts
    info = json.loads(storage.read_text(storage.join(artifacts.data_uri(remote["finetuned"]),
                                                     "finetune.json")))  # fmt: skip
    assert info["base_model"] == remote["model"]  # the artifact names its base by URI

    # same config and inputs: reused, nothing rewritten
    key = f"{store.key}/finetuned/manifest.json"
    before = store.server.client().head_object(Bucket=store.server.bucket, Key=key)["ETag"]
    again = run_finetune(parse_config(FinetuneJobConfig, _finetune(remote, remote["finetuned"])))
    assert again["reused"] is True and again["summary"] == remote_metrics["summary"]
    after = store.server.client().head_object(Bucket=store.server.bucket, Key=key)["ETag"]
    assert after == before and store.objects("finetuned") == objects


def test_s3_finetuned_model_predicts_as_the_local_one(
    local: dict[str, str], remote: dict[str, str]
) -> None:
    from cellfoundry.serve.loading import load_classifier
    from cellfoundry.tune import evaluate, load_finetuned, prepare, task_data

    cfg = parse_config(FinetuneJobConfig, _finetune(local, local["finetuned"]))
    prep = prepare(cfg)
    data = task_data(cfg, prep, prep.splits[0])
    cpu = torch.device("cpu")
    here = evaluate(load_finetuned(local["finetuned"]), data, "test", 16, cpu)
    there = evaluate(load_finetuned(remote["finetuned"]), data, "test", 16, cpu)
    np.testing.assert_allclose(there["scores"], here["scores"], rtol=0, atol=1e-6)
    served, labels = load_classifier(remote["finetuned"], "fp32", cpu)
    assert labels == list(TYPES)
    served_test = evaluate(served, data, "test", 16, cpu)
    np.testing.assert_allclose(served_test["scores"], here["scores"], rtol=0, atol=1e-6)


def test_masked_evaluation_on_s3_equals_local(
    store: S3Prefix, local: dict[str, str], remote: dict[str, str]
) -> None:
    from cellfoundry.evaluate.masked import run_masked

    def run(paths: dict[str, str], out: str) -> Any:
        return run_masked(parse_config(MaskedEvalConfig, {
            "model": paths["model"], "tokenized": paths["tokenized"], "output_dir": out,
            "batch_size": 8, "device": "cpu",
        }))  # fmt: skip

    here = run(local, str(Path(local["root"]) / "masked"))
    out = store.uri("masked")
    there = run(remote, out)
    assert there.output_dir == out and not there.reused
    for key in ("model", "baseline", "difference", "pooled", "by_group"):
        assert there.metrics[key] == here.metrics[key], key
    manifest = artifacts.read_manifest(out, "evaluation_masked")
    assert set(manifest["data_files"]) == {"metrics.json", "report.md", "per_cell.parquet",
                                           "accuracy.png"}  # fmt: skip
    assert set(manifest["inputs"]) == {"model", "tokenized"}
    fs, path = storage.resolve(storage.join(artifacts.data_uri(out), "per_cell.parquet"))
    assert pq.read_table(path, filesystem=fs).equals(
        pq.read_table(Path(local["root"]) / "masked" / "per_cell.parquet")
    )
    again = run(remote, out)
    assert again.reused is True and again.metrics == there.metrics


def test_batch_evaluation_from_s3_to_s3(store: S3Prefix, tmp_path: Path) -> None:
    import anndata
    import pandas as pd

    from cellfoundry.config.evaluate import BatchEvalConfig
    from cellfoundry.evaluate.batch import run_batch

    rng = np.random.default_rng(1)
    obs = pd.DataFrame({"dataset_id": ["a", "b"] * 30, "cell_type": list(TYPES) * 20},
                       index=[f"c{i}" for i in range(60)])  # fmt: skip
    adata = anndata.AnnData(obs=obs)
    adata.obsm["X_cellfoundry"] = rng.normal(size=(60, 8)).astype(np.float32)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    uri = store.uri("emb", "cells.h5ad")
    storage.write_bytes(uri, (tmp_path / "cells.h5ad").read_bytes())

    def run(embeddings: str, out: str) -> Any:
        return run_batch(parse_config(BatchEvalConfig, {
            "embeddings": embeddings, "gene_embeddings": "none", "output_dir": out,
        }))  # fmt: skip

    here = run(str(tmp_path / "cells.h5ad"), str(tmp_path / "batch"))
    out = store.uri("batch")
    there = run(uri, out)
    assert there.metrics["cells"] == here.metrics["cells"] and there.output_dir == out
    manifest = artifacts.read_manifest(out, "evaluation_batch")
    assert {"metrics.json", "report.md", "cell_similarity.png"} <= set(manifest["data_files"])
    assert run(uri, out).reused is True

    # gene embeddings of an embeddings artifact in the bucket are found through its manifest
    genes = pa.table({
        "ensembl_id": ["G1", "G1", "G2", "G2"], "token_id": pa.array([4, 4, 5, 5], pa.int32()),
        "group": ["a", "b", "a", "b"], "n_cells": pa.array([3, 3, 3, 3], pa.int64()),
        "embedding": pa.array(rng.normal(size=(4, 8)).tolist(), pa.list_(pa.float32())),
    })  # fmt: skip
    with artifacts.write_artifact(store.uri("emb", "cells.embeddings"), "embeddings", {}) as w:
        pq.write_table(genes, w.dir / "genes.parquet")
    with_genes = run_batch(parse_config(BatchEvalConfig, {
        "embeddings": uri, "output_dir": store.uri("batch-genes"),
    }))  # fmt: skip
    assert with_genes.metrics["genes"]["n_rows"] == 4
    found = artifacts.read_manifest(store.uri("batch-genes"), "evaluation_batch")["data_files"]
    assert "gene_similarity.png" in found


def test_probe_report_from_s3_to_s3(
    store: S3Prefix, local: dict[str, str], remote: dict[str, str]
) -> None:
    from cellfoundry.evaluate.probe import REPORT_JSON, run_probe

    def run(paths: dict[str, str], out: str) -> dict[str, Any]:
        return run_probe(parse_config(ProbeConfig, {
            "finetune": _finetune(paths, None), "output_dir": out,
            "methods": ["probe", "full"], "finetuned_dir": paths["finetuned"],
        }))  # fmt: skip

    here = run(local, str(Path(local["root"]) / "probe"))
    out = store.uri("probe")
    there = run(remote, out)
    assert there["summary"] == here["summary"]
    assert store.objects("probe") == sorted(
        f"probe/{n}" for n in ("confusion_matrix.png", "probe_report.md", "roc.png", REPORT_JSON)
    )
    assert (
        json.loads(storage.read_text(storage.join(out, REPORT_JSON)))["summary"] == there["summary"]
    )
    with pytest.raises(artifacts.ArtifactError, match="not an earlier probe report"):
        run(remote, store.uri("finetuned"))  # someone else's prefix is never written into


def test_tune_search_with_s3_run_storage_and_output(
    store: S3Prefix, remote: dict[str, str], tmp_path: Path
) -> None:
    from cellfoundry.tune.search import run_tune

    data = {
        "finetune": _finetune(remote, None, optim={"learning_rate": 0.003, "num_train_epochs": 1}),
        "space": {"optim.learning_rate": {"loguniform": [1.0e-3, 5.0e-3]}},
        "tune": {"num_samples": 1},
        "search": {"n_initial_points": 1},
        "run": {"name": "search", "storage_path": store.uri("runs")},
        "output_dir": store.uri("best"),
    }  # fmt: skip
    result = run_tune(parse_config(TuneJobConfig, data))
    assert result["completed"] is True and result["finished_trials"] == 1
    manifest = artifacts.read_manifest(store.uri("best"), "finetuned")
    assert "model/model.safetensors" in manifest["data_files"]
    best = artifacts.data_uri(store.uri("best"))
    metrics = json.loads(storage.read_text(storage.join(best, "metrics.json")))
    assert metrics["search"]["best_params"]["optim"]["learning_rate"] > 0
    runs = store.objects("runs", "search")
    assert "runs/search/cellfoundry_fingerprint" in runs
    assert any(o.endswith("trial_state.pt") for o in runs)  # trial checkpoints on s3
    assert run_tune(parse_config(TuneJobConfig, data))["reused"] is True
    # another config may not resume that experiment
    other = {**data, "tune": {"num_samples": 2}, "output_dir": store.uri("best2")}
    with pytest.raises(ValueError, match=r"another config or inputs.*run\.name"):
        run_tune(parse_config(TuneJobConfig, other))


def test_missing_remote_model_is_a_clear_error(store: S3Prefix, remote: dict[str, str]) -> None:
    from cellfoundry.tune import prepare

    paths = {**remote, "model": store.uri("no-model")}
    cfg = parse_config(FinetuneJobConfig, _finetune(paths, None))
    with pytest.raises(ValueError, match=r"model.model_dir: s3://.*/no-model: no manifest.json"):
        prepare(cfg)


@pytest.fixture(autouse=True, scope="module")
def _no_local_s3_folder() -> Iterator[None]:
    """No stage may turn a URI into a local folder named ``s3:`` (a mangled path)."""
    yield
    mangled = Path.cwd() / "s3:"
    if mangled.exists():
        shutil.rmtree(mangled, ignore_errors=True)
        pytest.fail("a local folder 's3:' was created from a URI")
