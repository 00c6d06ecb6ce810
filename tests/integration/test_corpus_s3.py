"""Stage 1 (`run_corpus`) with ``output_dir: s3://...`` against moto's S3 server on
127.0.0.1: every sub-artifact (catalog, cells with its dedup and QC steps, medians,
vocabulary, tokenized with its ``hf/`` copy) equals a local run of the same config, a rerun
reuses them all, and nothing is left in the bucket outside the manifests' data prefixes
(no ``_work`` scratch, no lock, no orphan) nor on the local disk (no ``s3:`` folder).

The catalog is small (three real files, ~2.2k cells, one a gene-filtered copy of another so
the duplicate search finds cells and writes them to S3) and cut into several chunks per
file, so every Ray step runs more than one task.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cellfoundry import artifacts, storage
from cellfoundry.config import CorpusConfig, parse_config
from cellfoundry.corpus.pipeline import CorpusResult, run_corpus
from cellfoundry.corpus.tokenized import shard_files
from support.s3_server import S3Prefix

KINDS = ("catalog", "cells", "medians", "vocabulary", "tokenized")
NAMES = {
    "pbmc1k_v2_raw": "scwg_1k_PBMC_v2_raw.h5ad",
    "pbmc1k_v2_filt": "scwg_1k_PBMC_v2_filt.h5ad",  # every cell a copy of one of v2_raw
    "wu2020_tcells": "scirpy_wu2020_200cells.h5ad",
}


@pytest.fixture(scope="module")
def catalog(real_h5ad: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    found = {p.name: p for p in real_h5ad}
    if not set(NAMES.values()) <= set(found):
        pytest.skip(f"needs {sorted(NAMES.values())} in ../shared/data/h5ad")
    lines = ["datasets:"]
    for ds_id, name in NAMES.items():
        lines += [f"  - id: {ds_id}", f'    uri: "{found[name]}"', "    organ: blood"]
    lines += ["    metadata: {cell_type: cluster_orig, batch: source}"]  # the last one's
    path = tmp_path_factory.mktemp("corpus_s3") / "catalog.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(catalog: Path, output: str | Path) -> CorpusConfig:
    return parse_config(CorpusConfig, {
        "catalog": str(catalog), "output_dir": str(output), "rows_per_chunk": 512,
        "tokenize": {"mode": "v2", "model_input_size": 256},
    })  # fmt: skip


@pytest.fixture(scope="module")
def local_run(
    ray_local: None, catalog: Path, tmp_path_factory: pytest.TempPathFactory
) -> CorpusResult:
    """The local run that the s3 run must equal."""
    return run_corpus(_config(catalog, tmp_path_factory.mktemp("corpus_s3") / "local"))


def _files(path: str | Path, pattern: str) -> dict[str, bytes]:
    """``{relative name: bytes}`` of an artifact's data files matching ``pattern``,
    read through its manifest (local folder or object store alike)."""
    root = artifacts.data_uri(path)
    return {
        f[len(str(root)) + 1 :]: storage.read_bytes(f) for f in artifacts.data_files(path, pattern)
    }


def _table(path: str | Path, pattern: str) -> pa.Table:
    tables = []
    for f in artifacts.data_files(path, pattern):
        fs, p = storage.resolve(f)
        tables.append(pq.read_table(p, filesystem=fs))
    return pa.concat_tables(tables)


def _same(a: pa.Table, b: pa.Table) -> bool:
    """Equal schemas and values, NaN equal to NaN (medians of undetected genes are NaN)."""
    return a.schema == b.schema and a.to_pandas().equals(b.to_pandas())


def _manifests(result: CorpusResult) -> dict[str, dict[str, Any]]:
    return {k: artifacts.read_manifest(getattr(result, k), k) for k in KINDS}


def test_corpus_to_s3_equals_local_reruns_idempotently_and_leaves_nothing_else(
    s3: S3Prefix,
    catalog: Path,
    local_run: CorpusResult,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # a local "s3:" folder would appear here
    uri = s3.uri("corpus")
    result = run_corpus(_config(catalog, uri))
    assert result.tokenized == f"{uri}/tokenized" and isinstance(result.tokenized, str)
    assert result.counts == local_run.counts
    assert result.counts["duplicates"] == 954 and result.counts["quarantined"] == {}

    # Same config and inputs as the local run: the same counts (fingerprints differ past the
    # catalog, as they hash the inputs' manifests, which name where and when they were written).
    remote, local = _manifests(result), _manifests(local_run)
    assert remote["catalog"]["fingerprint"] == local["catalog"]["fingerprint"]
    for kind in KINDS:
        assert remote[kind]["counts"] == local[kind]["counts"], kind
    assert remote["tokenized"]["length_histogram"] == local["tokenized"]["length_histogram"]
    assert remote["tokenized"]["hf"] == local["tokenized"]["hf"]

    # Tokens, lengths, cell ids (every column), shard by shard, as downstream stages read them.
    fs_r, shards_r = shard_files(result.tokenized)
    fs_l, shards_l = shard_files(local_run.tokenized)
    names = [p.rpartition("/")[2] for p in shards_l]
    assert [p.rpartition("/")[2] for p in shards_r] == names and len(names) >= 3
    got = pa.concat_tables([pq.read_table(p, filesystem=fs_r) for p in shards_r])
    want = pa.concat_tables([pq.read_table(p, filesystem=fs_l) for p in shards_l])
    assert got.equals(want) and got.num_rows == result.counts["passed"]
    assert {"cell_id", "input_ids", "length", "dataset_id"} <= set(got.column_names)
    from cellfoundry.train.stream import list_shards  # what pretraining reads

    assert [p.rpartition("/")[2] for p in list_shards(result.tokenized)] == names
    # The datasets copy: the same Arrow streams, state and features.
    assert _files(result.tokenized, "hf/*") == _files(local_run.tokenized, "hf/*")

    # Medians, the vocabulary and the cells parts (QC and duplicates) are equal too.
    assert _same(
        _table(result.medians, "medians.parquet"), _table(local_run.medians, "medians.parquet")
    )
    assert _files(result.vocabulary, "*.json") == _files(local_run.vocabulary, "*.json")
    vocab = json.loads(
        (artifacts.localize(result.vocabulary) / "token_dictionary.json").read_text()
    )
    assert list(vocab)[:4] == ["<pad>", "<mask>", "<cls>", "<eos>"]
    for pattern in ("data/part-*.parquet", "genes.parquet", "qc_summary.parquet"):
        assert _same(_table(result.cells, pattern), _table(local_run.cells, pattern)), pattern
    assert _same(_table(result.catalog, "*.parquet"), _table(local_run.catalog, "*.parquet"))

    # Nothing but the manifests and the data objects they list: no _work, lock or orphan.
    expected = set()
    for kind in KINDS:
        expected.add(f"corpus/{kind}/manifest.json")
        data = remote[kind]["data"]
        expected |= {f"corpus/{kind}/{data}/{rel}" for rel in remote[kind]["data_files"]}
    objects = s3.objects()
    assert set(objects) == expected and len(objects) == len(expected)
    assert list(tmp_path.iterdir()) == []  # nothing written to a local path

    # A rerun reuses every complete artifact: no object is rewritten.
    client = s3.server.client()
    etags = {o: client.head_object(Bucket=s3.server.bucket, Key=f"{s3.key}/{o}")["ETag"]
             for o in objects if o.endswith("manifest.json")}  # fmt: skip
    again = run_corpus(_config(catalog, uri))
    assert again.paths() == result.paths() and again.counts == result.counts
    assert s3.objects() == objects
    for o, etag in etags.items():
        assert client.head_object(Bucket=s3.server.bucket, Key=f"{s3.key}/{o}")["ETag"] == etag


def test_a_missing_bucket_fails_before_any_work(
    s3: S3Prefix, catalog: Path, ray_local: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    uri = s3.uri("corpus").replace(s3.server.bucket, "no-such-bucket-cf")
    start = time.monotonic()
    with pytest.raises(artifacts.ArtifactError, match=r"bucket 'no-such-bucket-cf' does not exist"):
        run_corpus(_config(catalog, uri))
    assert time.monotonic() - start < 15
    assert s3.objects() == [] and list(tmp_path.iterdir()) == []
