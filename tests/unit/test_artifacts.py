from __future__ import annotations

import json
from pathlib import Path

import pytest

from cellfoundry import artifacts


def test_atomic_write_and_reuse(tmp_path: Path) -> None:
    target = tmp_path / "medians"
    with artifacts.write_artifact(target, "medians", {"method": "exact"}) as w:
        (w.dir / "x.txt").write_text("1")
        assert not target.exists()  # nothing visible until complete
        w.counts = {"genes": 3}
    manifest = artifacts.read_manifest(target, "medians")
    assert manifest["counts"] == {"genes": 3}
    assert manifest["config"] == {"method": "exact"}
    fp = artifacts.fingerprint("medians", {"method": "exact"}, {})
    assert artifacts.reusable(target, "medians", fp) is not None
    assert (
        artifacts.reusable(
            target, "medians", artifacts.fingerprint("medians", {"method": "sketch"}, {})
        )
        is None
    )
    with pytest.raises(artifacts.ArtifactError, match="expected 'cells'"):
        artifacts.read_manifest(target, "cells")


def test_failure_leaves_previous_artifact(tmp_path: Path) -> None:
    target = tmp_path / "a"
    with artifacts.write_artifact(target, "catalog", {"v": 1}) as w:
        (w.dir / "f").write_text("old")
    with pytest.raises(RuntimeError), artifacts.write_artifact(target, "catalog", {"v": 2}) as w:
        (w.dir / "f").write_text("new")
        raise RuntimeError("crash mid-write")
    assert (target / "f").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # temp folder cleaned up


def test_inputs_hash_chain(tmp_path: Path) -> None:
    up = tmp_path / "up"
    with artifacts.write_artifact(up, "cells", {"v": 1}):
        pass
    with artifacts.write_artifact(tmp_path / "down", "medians", {}, {"cells": up}) as w:
        pass
    m = artifacts.read_manifest(tmp_path / "down")
    assert m["inputs"]["cells"]["manifest_sha256"] == artifacts.manifest_hash(up)
    fp_before = artifacts.fingerprint("medians", {}, {"cells": up})
    manifest = json.loads((up / "manifest.json").read_text())
    manifest["counts"] = {"changed": True}
    (up / "manifest.json").write_text(json.dumps(manifest))
    assert artifacts.fingerprint("medians", {}, {"cells": up}) != fp_before
    assert w.fingerprint == fp_before
    with pytest.raises(artifacts.ArtifactError, match="run the stage"):
        artifacts.read_manifest(tmp_path / "nothing", "tokenized")


def test_claim_run_dir_moves_other_runs_aside(tmp_path: Path) -> None:
    """A resumable run folder is resumed only by the same fingerprint; others move aside."""
    run = artifacts.claim_run_dir(str(tmp_path), "run", "aaaa1111")
    assert run == tmp_path / "run"
    (run / "checkpoint_000001").mkdir()
    assert artifacts.claim_run_dir(str(tmp_path), "run", "aaaa1111") == run
    assert (run / "checkpoint_000001").is_dir()
    artifacts.claim_run_dir(str(tmp_path), "run", "bbbb2222")
    assert not (run / "checkpoint_000001").exists()
    (aside,) = tmp_path.glob("run.superseded-aaaa1111-*")
    assert (aside / "checkpoint_000001").is_dir()  # kept, not deleted
    assert (run / artifacts.RUN_FINGERPRINT).read_text().strip() == "bbbb2222"
    assert artifacts.claim_run_dir("s3://bucket/runs", "run", "cccc3333") is None
