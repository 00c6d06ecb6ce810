"""Artifacts on S3, against moto's real S3 server over HTTP on 127.0.0.1 (no patched client):
the storage layer, the preflight errors, commit-by-manifest, orphans of a killed writer, and
the lock with conditional writes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cellfoundry import artifacts, locks, storage
from support.s3_server import S3Prefix


def test_storage_layer_resolves_and_round_trips(s3: S3Prefix, tmp_path: Path) -> None:
    fs, path = storage.resolve(tmp_path / "x")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "x")
    fs, path = storage.resolve(s3.uri("a", "b.txt"))
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{s3.server.bucket}/{s3.key}/a/b.txt"
    assert storage.normalize("gcs://bkt/k/") == "gs://bkt/k"
    assert storage.parent(s3.uri("a", "b")) == s3.uri("a") and storage.name(s3.uri("a")) == "a"

    storage.write_text(s3.uri("a", "b.txt"), "hello")
    storage.write_bytes(s3.uri("a", "c", "d.bin"), b"\x00\x01")
    assert storage.read_text(s3.uri("a", "b.txt")) == "hello"
    assert storage.exists(s3.uri("a")) and storage.is_file(s3.uri("a", "b.txt"))
    assert not storage.exists(s3.uri("nothing"))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(s3.uri("nothing"))
    assert storage.list_files(s3.uri("a")) == {"b.txt": 5, "c/d.bin": 2}
    assert storage.list_children(s3.uri("a")) == {"b.txt": False, "c": True}
    storage.delete_prefix(s3.uri("a", "c"))
    storage.delete_file(s3.uri("a", "b.txt"))
    assert s3.objects() == []  # no "folder" marker objects left behind


def test_preflight_names_the_uri_and_the_variable(
    s3: S3Prefix, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage.check_reachable(s3.uri("out"))  # the configured bucket answers
    missing = "s3://no-such-bucket-cf/out"
    with pytest.raises(storage.StorageError, match=r"s3://no-such-bucket-cf/out: bucket .* does not exist .*AWS_ENDPOINT_URL"):  # fmt: skip
        storage.check_reachable(missing)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(storage.StorageError, match=r"refused the credentials .*fix AWS_SECRET_ACCESS_KEY"):  # fmt: skip
        storage.check_reachable(s3.uri("out"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNUNKNOWN00")
    with pytest.raises(storage.StorageError, match=r"InvalidAccessKeyId.*fix AWS_ACCESS_KEY_ID"):
        storage.check_reachable(s3.uri("out"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(storage.StorageError, match=r"cannot reach the S3 endpoint .*127\.0\.0\.1:9.*fix AWS_ENDPOINT_URL"):  # fmt: skip
        storage.check_reachable(s3.uri("out"))
    assert time.monotonic() - start < 30


def test_write_artifact_commits_with_the_manifest_last(s3: S3Prefix) -> None:
    uri = s3.uri("cells")
    with artifacts.write_artifact(uri, "cells", {"v": 1}) as w:
        assert w.remote and w.uri.startswith(uri + "/cf-run-")
        storage.write_text(storage.join(w.uri, "part-0.txt"), "v1")
        assert not storage.exists(storage.join(uri, "manifest.json"))  # nothing trusted yet
        with pytest.raises(artifacts.ArtifactError, match="not a complete artifact"):
            artifacts.read_manifest(uri)
        w.counts = {"n": 1}
    manifest = artifacts.read_manifest(uri, "cells")
    run1 = manifest["data"]
    assert manifest["counts"] == {"n": 1} and manifest["data_files"] == {"part-0.txt": 2}
    assert s3.objects() == [f"cells/{run1}/part-0.txt", "cells/manifest.json"]  # lock released
    assert artifacts.data_files(uri) == [f"{uri}/{run1}/part-0.txt"]
    fp = artifacts.fingerprint("cells", {"v": 1}, {})
    assert artifacts.reusable(uri, "cells", fp) is not None
    with artifacts.write_artifact(s3.uri("down"), "medians", {}, {"cells": uri}) as w:
        pass
    assert artifacts.read_manifest(s3.uri("down"))["inputs"]["cells"] == {
        "path": uri, "manifest_sha256": artifacts.manifest_hash(uri)
    }  # fmt: skip

    # A failed rerun leaves the previous artifact whole and removes its own objects.
    with pytest.raises(RuntimeError), artifacts.write_artifact(uri, "cells", {"v": 2}) as w:
        storage.write_text(storage.join(w.uri, "part-0.txt"), "v2")
        raise RuntimeError("failed mid-write")
    assert artifacts.read_manifest(uri)["config"] == {"v": 1}
    assert s3.objects("cells") == [f"cells/{run1}/part-0.txt", "cells/manifest.json"]

    # A successful rerun replaces it: new data, then the manifest, then the old data goes.
    with artifacts.write_artifact(uri, "cells", {"v": 3}) as w:
        storage.write_text(storage.join(w.uri, "part-0.txt"), "v3")
    run3 = artifacts.read_manifest(uri)["data"]
    assert run3 != run1
    assert s3.objects("cells") == [f"cells/{run3}/part-0.txt", "cells/manifest.json"]
    assert [storage.read_text(f) for f in artifacts.data_files(uri)] == ["v3"]


def test_driver_files_are_staged_then_uploaded_and_localize_caches_the_artifact(
    s3: S3Prefix, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(artifacts.CACHE_ENV, str(tmp_path / "cache"))
    uri = s3.uri("model")
    with artifacts.write_artifact(uri, "model", {"v": 1}) as w:
        staging = w.dir  # a local folder on this machine, uploaded just before the commit
        (staging / "config.json").write_text("{}")
        (staging / "state").mkdir()
        (staging / "state" / "w.bin").write_bytes(b"\x01" * 1000)
        storage.write_text(storage.join(w.uri, "direct.txt"), "from a task")
        assert not storage.exists(storage.join(uri, "manifest.json"))
    assert not staging.exists()  # removed after the upload
    manifest = artifacts.read_manifest(uri, "model")
    assert manifest["data_files"] == {"config.json": 2, "direct.txt": 11, "state/w.bin": 1000}

    local = artifacts.localize(uri)
    assert local.parent == tmp_path / "cache" / "artifacts"
    assert (local / "state" / "w.bin").read_bytes() == b"\x01" * 1000
    assert artifacts.read_manifest(local, "model")["fingerprint"] == manifest["fingerprint"]
    assert artifacts.localize(uri) == local  # cached: the same manifest, the same copy
    assert artifacts.localize(tmp_path) == tmp_path  # a local path is itself

    with artifacts.write_artifact(uri, "model", {"v": 2}) as w:  # a new artifact, a new copy
        (w.dir / "config.json").write_text('{"v": 2}')
    fresh = artifacts.localize(uri)
    assert fresh != local and (fresh / "config.json").read_text() == '{"v": 2}'
    assert not (fresh / "direct.txt").exists()

    with pytest.raises(artifacts.ArtifactError, match=r"no manifest.json there.*rerun the stage"):
        artifacts.localize(s3.uri("nothing"))
    storage.write_text(storage.join(artifacts.data_uri(uri), "config.json"), "{changed}")
    monkeypatch.setenv(artifacts.CACHE_ENV, str(tmp_path / "cache2"))
    with pytest.raises(artifacts.ArtifactError, match="changed after it was written"):
        artifacts.localize(uri)
    assert list((tmp_path / "cache2" / "artifacts").iterdir()) == []  # no half copy left


def test_objects_cellfoundry_did_not_write_are_refused(s3: S3Prefix) -> None:
    storage.write_text(s3.uri("mine", "notes.txt"), "precious")
    refused = pytest.raises(artifacts.ArtifactError, match=r"mine holds objects that are not a cellfoundry artifact")  # fmt: skip
    with refused, artifacts.write_artifact(s3.uri("mine"), "cells", {}):
        pass
    with artifacts.write_artifact(s3.uri("other"), "cells", {}):
        pass
    refused = pytest.raises(artifacts.ArtifactError, match=r"holds a 'cells' artifact.*--overwrite")
    with refused, artifacts.write_artifact(s3.uri("other"), "medians", {}):
        pass
    assert s3.objects("mine") == ["mine/notes.txt"]


_CRASH = """
import os, sys
from cellfoundry import artifacts, storage
with artifacts.write_artifact(sys.argv[1], "cells", {"v": 2}) as w:
    for i in range(3):
        storage.write_text(storage.join(w.uri, f"part-{i}.txt"), "half-written")
    os._exit(3)  # killed mid-write: no cleanup runs
"""


def test_a_killed_writer_leaves_nothing_trusted_and_the_rerun_removes_its_orphans(
    s3: S3Prefix,
) -> None:
    uri = s3.uri("cells")
    crashed = subprocess.run([sys.executable, "-c", _CRASH, uri], check=False)
    assert crashed.returncode == 3
    left = s3.objects()
    assert ".cells.lock" in left and len([k for k in left if "/cf-run-" in k]) == 3
    assert "cells/manifest.json" not in left
    with pytest.raises(artifacts.ArtifactError, match="not a complete artifact"):
        artifacts.data_files(uri)  # readers trust nothing without the manifest
    assert artifacts.reusable(uri, "cells", artifacts.fingerprint("cells", {"v": 2}, {})) is None

    with artifacts.write_artifact(uri, "cells", {"v": 2}) as w:  # takes over the dead lock
        for i in range(2):
            storage.write_text(storage.join(w.uri, f"part-{i}.txt"), "whole")
    run = artifacts.read_manifest(uri)["data"]
    assert s3.objects() == [f"cells/{run}/part-0.txt", f"cells/{run}/part-1.txt",
                         "cells/manifest.json"]  # fmt: skip


_HOLDER = """
import sys, time
from pathlib import Path
from cellfoundry import artifacts
uri, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
with artifacts.write_artifact(uri, "cells", {"who": "holder"}) as w:
    ready.write_text("1")
    while not go.exists():
        time.sleep(0.05)
"""


def test_second_writer_fails_fast_on_the_s3_lock(s3: S3Prefix, tmp_path: Path) -> None:
    uri = s3.uri("cells")
    ready, go = tmp_path / "ready", tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, uri, str(ready), str(go)])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        start = time.monotonic()
        with (
            pytest.raises(artifacts.ArtifactError) as info,
            artifacts.write_artifact(uri, "cells", {"who": "second"}),
        ):
            pass
        assert time.monotonic() - start < 5
        assert f"pid {proc.pid}" in str(info.value) and "being written by another run" in str(
            info.value
        )
        assert s3.objects() == [".cells.lock"]  # the refused writer wrote nothing
    finally:
        go.write_text("1")
        assert proc.wait(60) == 0
    assert artifacts.read_manifest(uri)["config"] == {"who": "holder"}
    assert ".cells.lock" not in s3.objects()


def test_s3_lock_store_uses_conditional_writes(s3: S3Prefix) -> None:
    store, key = locks.S3LockStore(), s3.uri(".x.lock")
    assert store.create(key, b"a") and not store.create(key, b"b")  # If-None-Match: *
    assert store.read(key) == b"a"
    assert not store.replace_if(key, b"other", b"c") and store.read(key) == b"a"
    assert store.replace_if(key, b"a", b"c") and store.read(key) == b"c"  # If-Match: ETag
    assert not store.remove_if(key, b"a") and store.read(key) == b"c"
    assert store.remove_if(key, b"c") and store.read(key) is None
    assert not store.remove_if(key, b"c")
    with pytest.raises(storage.StorageError, match="gs:// yet"):
        locks._store("gs://bucket/.x.lock")


def test_serving_reads_a_model_artifact_on_s3(
    s3: S3Prefix, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import torch

    from cellfoundry.config import parse_config
    from cellfoundry.config.serve import ServeJobConfig
    from cellfoundry.model import bert_config, build_model, save_checkpoint
    from cellfoundry.serve import CellTokenizer
    from cellfoundry.serve.loading import load_encoder

    monkeypatch.setenv(artifacts.CACHE_ENV, str(tmp_path / "cache"))
    genes = ["ENSG00000000003", "ENSG00000000005", "ENSG00000000419", "ENSG00000000457"]
    vocab = {
        "<pad>": 0,
        "<mask>": 1,
        "<cls>": 2,
        "<eos>": 3,
        **{g: 4 + i for i, g in enumerate(genes)},
    }
    config = bert_config("tiny", vocab_size=len(vocab), max_position_embeddings=16, hidden_size=32,
                         num_attention_heads=2, intermediate_size=64, num_hidden_layers=1)  # fmt: skip
    uri = s3.uri("served", "model")
    with artifacts.write_artifact(uri, "model", {"test": "serve"}) as w:
        save_checkpoint(build_model(config, seed=0), w.dir, token_dictionary=vocab)
        (w.dir / "gene_median_dictionary.json").write_text(json.dumps(dict.fromkeys(genes, 1.0)))

    cfg = parse_config(ServeJobConfig, {"model": uri, "classifiers": {"c": s3.uri("served", "ft")}})
    assert cfg.model == uri  # a URI is kept, never made a local path
    with pytest.raises(ValueError, match=r"gene_medians: s3://.* give a local or mounted file"):
        parse_config(ServeJobConfig, {"model": uri, "gene_medians": s3.uri("m.json")})
    tokenizer = CellTokenizer.for_model(uri, min_genes=1)
    ids = tokenizer.tokenize({genes[2]: 5, genes[0]: 1})[0]
    assert ids[0] == vocab["<cls>"] and ids[1] == vocab[genes[2]]
    model = load_encoder(uri, "fp32", torch.device("cpu"))
    assert model.config.vocab_size == len(vocab)
    assert list((tmp_path / "cache" / "artifacts").iterdir())  # read from this node's copy


def test_pretraining_finds_the_vocabulary_beside_tokens_in_a_bucket(
    s3: S3Prefix, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from cellfoundry.config import DataConfig
    from cellfoundry.train.data import resolve_token_dictionary

    monkeypatch.setenv(artifacts.CACHE_ENV, str(tmp_path / "cache"))
    data = DataConfig(tokenized=s3.uri("corpus", "tokenized"), token_dictionary=None)
    with pytest.raises(ValueError, match=r"no vocabulary artifact beside data.tokenized .*corpus/vocabulary"):  # fmt: skip
        resolve_token_dictionary(data)
    vocab = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, "ENSG00000000003": 4}
    with artifacts.write_artifact(s3.uri("corpus", "vocabulary"), "vocabulary", {}) as w:
        (w.dir / "token_dictionary.json").write_text(json.dumps(vocab))
    path, found = resolve_token_dictionary(data)
    assert found == vocab and path.is_relative_to(tmp_path / "cache")
