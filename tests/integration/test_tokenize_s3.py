"""`cellfoundry tokenize --output s3://...` against moto's S3 server on 127.0.0.1: the same
tokens as a local folder, fast and clear errors for a bad store, a killed driver that leaves
nothing trusted, and one writer per output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cellfoundry import artifacts
from cellfoundry.cli import main
from cellfoundry.corpus.tokenize_files import tokenize_files
from cellfoundry.corpus.tokenized import shard_files
from support.s3_server import S3Prefix

NAMES = ["scwg_1k_PBMC_v2_filt.h5ad", "scwg_1k_PBMC_v3_filt.h5ad"]
ROWS = 150  # cells per shard: ~15 shards over the two files


@pytest.fixture
def files(real_h5ad: list[Path]) -> list[str]:
    found = [str(p) for p in real_h5ad if p.name in NAMES]
    if len(found) != len(NAMES):
        pytest.skip(f"needs {NAMES} in ../shared/data/h5ad")
    return sorted(found)


def _tokens(path: str | Path) -> tuple[list[str], pa.Table]:
    """Shard names and all rows of a tokenized artifact, through its manifest."""
    fs, paths = shard_files(path)
    table = pa.concat_tables([pq.read_table(p, filesystem=fs) for p in paths])
    return [p.rpartition("/")[2] for p in paths], table


def _args(files: list[str], geneformer_dir: Path, output: str) -> list[str]:
    return [*files, "--dictionaries", str(geneformer_dir / "v2"), "--mode", "v2",
            "--output", output, "--rows-per-chunk", str(ROWS)]  # fmt: skip


@pytest.fixture(scope="module")
def local_tokens(
    ray_local: None, real_h5ad: list[Path], geneformer_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict, list[str], pa.Table]:  # fmt: skip
    """The clean local run that the s3 runs must equal: (manifest, shard names, rows)."""
    files = sorted(str(p) for p in real_h5ad if p.name in NAMES)
    out = tmp_path_factory.mktemp("tokenize_s3") / "local"
    manifest = tokenize_files(files, dictionaries=geneformer_dir / "v2", mode="v2",
                              output=out, rows_per_chunk=ROWS)  # fmt: skip
    return (manifest, *_tokens(out))


def test_tokenize_to_s3_equals_local(
    s3: S3Prefix, files: list[str], geneformer_dir: Path, local_tokens: tuple
) -> None:
    manifest, names, table = local_tokens
    uri = s3.uri("tok")
    assert main(["tokenize", *_args(files, geneformer_dir, uri)]) == 0
    got = artifacts.read_manifest(uri, "tokenized")
    assert got["counts"] == manifest["counts"] and got["fingerprint"] == manifest["fingerprint"]
    got_names, got_table = _tokens(uri)
    assert got_names == names and len(names) > 5
    assert got_table.equals(table)
    objects = s3.objects()
    assert objects[-1] == "tok/manifest.json" and ".tok.lock" not in objects
    assert [o.rpartition("/")[2] for o in objects[:-1]] == names  # nothing else left
    # Same inputs and config: the complete artifact is reused, nothing is rewritten.
    before = s3.server.client().head_object(Bucket=s3.server.bucket, Key=f"{s3.key}/tok/manifest.json")  # fmt: skip
    again = tokenize_files(files, dictionaries=geneformer_dir / "v2", mode="v2", output=uri,
                           rows_per_chunk=ROWS)  # fmt: skip
    assert again == got
    after = s3.server.client().head_object(Bucket=s3.server.bucket, Key=f"{s3.key}/tok/manifest.json")  # fmt: skip
    assert after["ETag"] == before["ETag"] and s3.objects() == objects


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            {"bucket": "no-such-bucket-cf"},
            r"bucket 'no-such-bucket-cf' does not exist.*AWS_ENDPOINT_URL",
        ),
        (
            {"AWS_SECRET_ACCESS_KEY": "wrong"},
            r"refused the credentials.*fix AWS_SECRET_ACCESS_KEY",
        ),
        (
            {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
            r"cannot reach the S3 endpoint.*fix AWS_ENDPOINT_URL",
        ),
    ],
    ids=["missing-bucket", "wrong-credentials", "unreachable-endpoint"],
)
def test_bad_store_fails_before_any_work(
    s3: S3Prefix,
    files: list[str],
    geneformer_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    setting: dict[str, str],
    message: str,
) -> None:
    uri = s3.uri("tok")
    if "bucket" in setting:
        uri = uri.replace(s3.server.bucket, setting["bucket"])
    for var, value in setting.items():
        if var.startswith("AWS_"):
            monkeypatch.setenv(var, value)
    start = time.monotonic()
    with pytest.raises(artifacts.ArtifactError, match=message) as info:
        tokenize_files(files, dictionaries=geneformer_dir / "v2", mode="v2", output=uri)
    assert str(info.value).startswith(uri)  # names the URI
    assert time.monotonic() - start < 15  # before the dictionaries are even loaded
    monkeypatch.undo()
    assert s3.objects() == []


_HOLDER = """
import sys, time
from pathlib import Path
from cellfoundry import artifacts
uri, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
with artifacts.claim_output(uri, "tokenized", object_storage=True):
    ready.write_text("1")
    while not go.exists():
        time.sleep(0.05)
"""


def test_a_second_writer_to_the_same_s3_output_fails_fast(
    s3: S3Prefix, files: list[str], geneformer_dir: Path, tmp_path: Path
) -> None:
    uri = s3.uri("tok")
    ready, go = tmp_path / "ready", tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, uri, str(ready), str(go)])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        start = time.monotonic()
        with pytest.raises(artifacts.ArtifactError, match=f"pid {proc.pid}.*choose another"):
            tokenize_files(files, dictionaries=geneformer_dir / "v2", mode="v2", output=uri)
        assert time.monotonic() - start < 5
    finally:
        go.write_text("1")
        assert proc.wait(60) == 0
    assert s3.objects() == []


_RUN_CLI = "import sys; from cellfoundry.cli import main; sys.exit(main(sys.argv[1:]))"


def _wait_gone(pgid: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise AssertionError(f"process group {pgid} survived SIGKILL")


def _settled(s3: S3Prefix, quiet: float = 3.0, seconds: float = 60) -> list[str]:
    """The objects under the test prefix once they stop changing for ``quiet`` seconds."""
    deadline = time.monotonic() + seconds
    last, since = s3.objects(), time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.5)
        now = s3.objects()
        if now != last:
            last, since = now, time.monotonic()
    return last


def test_a_killed_driver_leaves_nothing_trusted_and_the_rerun_matches_a_clean_run(
    s3: S3Prefix, files: list[str], geneformer_dir: Path, local_tokens: tuple, tmp_path: Path
) -> None:
    """The CLI (a driver of its own, joined to the session's Ray cluster) is killed with
    SIGKILL once some shards are on S3; the rerun in this process completes the artifact."""
    import ray

    manifest, names, table = local_tokens
    uri = s3.uri("tok")
    argv = [sys.executable, "-c", _RUN_CLI, "tokenize", *_args(files, geneformer_dir, uri),
            "--address", ray.get_runtime_context().gcs_address]  # fmt: skip
    log = tmp_path / "cli.log"  # AWS_* and the cluster's token path are inherited
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, start_new_session=True, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while len([o for o in s3.objects() if "/part-" in o]) < 2:
            assert proc.poll() is None, f"the CLI ended first: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no shard written in time"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        _wait_gone(proc.pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    left = _settled(s3)  # Ray stops the dead driver's actors within moments
    assert "tok/manifest.json" not in left and ".tok.lock" in left
    orphans = [o for o in left if o.startswith("tok/cf-run-")]
    assert 2 <= len(orphans) < len(names)
    with pytest.raises(artifacts.ArtifactError, match="not a complete artifact"):
        shard_files(uri)

    again = tokenize_files(files, dictionaries=geneformer_dir / "v2", mode="v2", output=uri,
                           rows_per_chunk=ROWS)  # fmt: skip
    assert again["counts"] == manifest["counts"]
    got_names, got_table = _tokens(uri)
    assert got_names == names and got_table.equals(table)
    objects = s3.objects()
    assert not set(orphans) & set(objects)  # the crashed run's objects are gone
    assert ".tok.lock" not in objects and len(objects) == len(names) + 1
