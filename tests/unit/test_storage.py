"""The storage layer's URI handling and the guards that need no server (the S3 behaviour
itself is tested against moto's server in tests/integration/test_object_storage.py)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cellfoundry import artifacts, locks, storage


def test_uris_split_join_and_normalize(tmp_path: Path) -> None:
    assert storage.is_remote("s3://b/k") and storage.is_remote("gcs://b/k")
    assert not storage.is_remote(tmp_path) and not storage.is_remote("s3:/b/k")
    assert storage.split("gcs://bkt/a/b/") == ("gs", "bkt", "a/b")
    assert storage.normalize("s3://bkt/a/b/") == "s3://bkt/a/b"
    assert storage.normalize(tmp_path / "x" / ".." / "y") == str(tmp_path / "y")
    assert storage.join("s3://bkt/a/", "b", "c.txt") == "s3://bkt/a/b/c.txt"
    assert storage.join(tmp_path, "b") == str(tmp_path / "b")
    assert storage.parent("s3://bkt/a/b") == "s3://bkt/a" and storage.parent("s3://bkt/a") == "s3://bkt"  # fmt: skip
    assert storage.name("s3://bkt/a/b") == "b" and storage.name("s3://bkt") == ""
    assert locks.lock_key("s3://bkt/runs/tok") == "s3://bkt/runs/.tok.lock"
    with pytest.raises(storage.StorageError, match="no bucket"):
        storage.split("s3:///k")
    with pytest.raises(storage.StorageError, match="prefix below the bucket"):
        locks.lock_key("s3://bkt")


def test_s3_filesystem_takes_the_endpoint_and_keys_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    fs, path = storage.resolve("s3://bkt/a/b")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bkt/a/b"
    options = fs.__reduce__()[1][0]  # what a Ray task receives when the filesystem is pickled
    assert options["endpoint_override"] == "http://127.0.0.1:9"
    assert options["access_key"] == "AKIAEXAMPLE" and options["region"] == "eu-west-1"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:10")
    assert storage.resolve("s3://bkt/a")[0].__reduce__()[1][0]["endpoint_override"].endswith(":10")  # fmt: skip
    local, p = storage.resolve("rel/path")
    assert isinstance(local, pafs.LocalFileSystem) and Path(p).is_absolute()


def test_stages_not_wired_to_object_storage_refuse_it_before_any_work(tmp_path: Path) -> None:
    work: list[str] = []

    # a stage that has not opted in with object_storage=True (the real ones that have, e.g.
    # pretraining, embed and perturb, are tested against moto's S3 in tests/integration)
    @artifacts.holds_output("example", lambda out: out)
    def stage(out: str | Path) -> None:
        work.append("trained")

    with pytest.raises(artifacts.ArtifactError, match=r"s3://bkt/out: the example stage cannot write to object storage yet"):  # fmt: skip
        stage("s3://bkt/out")
    with pytest.raises(artifacts.ArtifactError, match="cannot write to object storage yet"):
        stage(Path("s3://bkt/out"))  # a URI mangled by Path: never a local "s3:" folder
    assert work == [] and not Path("s3:").exists()
    with pytest.raises(storage.StorageError, match="gs:// yet"):
        locks._store(locks.lock_key("gs://bkt/x"))
    stage(tmp_path / "out")
    assert work == ["trained"]


def test_the_corpus_stage_takes_object_storage_but_a_bad_store_fails_before_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run_corpus`` accepts ``s3://`` (tests/integration/test_corpus_s3.py runs it), and an
    endpoint that does not answer fails at once, naming the URI and the variable to fix,
    before the catalog is read or anything is created; a URI mangled into a local path
    (``s3:/bkt/...``) is refused, never written as a local "s3:" folder."""
    from cellfoundry.config import CorpusConfig, parse_config
    from cellfoundry.corpus.pipeline import run_corpus

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    for output in ("s3://bkt/corpus", "s3:/bkt/corpus"):
        cfg = parse_config(CorpusConfig, {"catalog": str(tmp_path / "catalog.yaml"),
                                          "output_dir": output})  # fmt: skip
        message = "cannot reach the S3 endpoint.*AWS_ENDPOINT_URL" if "//" in output else (
            "cannot write to object storage")  # fmt: skip
        with pytest.raises(artifacts.ArtifactError, match=message) as info:
            run_corpus(cfg)
        assert "bkt/corpus/catalog" in str(info.value)  # names the output
    assert list(tmp_path.iterdir()) == []  # no local "s3:" folder, no catalog read
