from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cellfoundry import artifacts, locks


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
    assert artifacts.claim_run_dir(None, "run", "cccc3333") is None
    # object storage: tests/integration/test_pretrain_infer_s3.py


# --- outputs never destroy what cellfoundry did not write -------------------------------


def _siblings(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def _write(target: Path, kind: str, config: object = None, **kwargs: bool) -> None:
    with artifacts.write_artifact(target, kind, config or {}, **kwargs) as w:
        (w.dir / "f").write_text("new")


@pytest.mark.parametrize("overwrite", [False, True])
def test_user_folder_is_refused_and_left_intact(tmp_path: Path, overwrite: bool) -> None:
    user = tmp_path / "my_analysis"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    with pytest.raises(artifacts.ArtifactError, match=r"my_analysis exists .*another output path"):
        _write(user, "tokenized", overwrite=overwrite)
    assert (user / "notes.txt").read_text() == "precious"
    assert _siblings(user) == ["notes.txt"]
    assert _siblings(tmp_path) == ["my_analysis"]  # no temp folder, no lock left


def test_file_path_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "results.csv"
    target.write_text("a,b\n")
    with artifacts.allow_overwrite(), pytest.raises(artifacts.ArtifactError, match="is a file"):
        _write(target, "cells")
    assert target.read_text() == "a,b\n"
    assert _siblings(tmp_path) == ["results.csv"]


def test_other_kind_needs_overwrite_same_kind_is_replaced(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()  # an empty folder is fine
    with artifacts.write_artifact(target, "cells", {"v": 1}) as w:
        (w.dir / "f").write_text("1")
    with artifacts.write_artifact(target, "cells", {"v": 2}) as w:  # same kind: replaced
        (w.dir / "g").write_text("2")
    assert _siblings(target) == ["g", "manifest.json"]
    with pytest.raises(artifacts.ArtifactError, match=r"holds a 'cells' artifact.*--overwrite"):
        _write(target, "medians")
    assert artifacts.read_manifest(target)["kind"] == "cells"
    with artifacts.allow_overwrite(), artifacts.write_artifact(target, "medians", {}):
        pass
    assert artifacts.read_manifest(target)["kind"] == "medians"
    with artifacts.write_artifact(target, "cells", {}, overwrite=True):
        pass
    assert artifacts.read_manifest(target)["kind"] == "cells"
    assert _siblings(tmp_path) == ["out"]


def test_output_changed_during_the_run_is_checked_again_at_commit(tmp_path: Path) -> None:
    target = tmp_path / "out"
    error = pytest.raises(artifacts.ArtifactError, match="never replaces")
    with error, artifacts.write_artifact(target, "cells", {}):
        target.mkdir()
        (target / "mine.txt").write_text("created meanwhile")
    assert (target / "mine.txt").read_text() == "created meanwhile"


# --- one writer per output: the lock --------------------------------------------------

_HOLDER = """
import sys, time
from pathlib import Path
from cellfoundry import artifacts
target, ready, go = map(Path, sys.argv[1:4])
with artifacts.write_artifact(target, "cells", {"who": "holder"}) as w:
    ready.write_text("1")
    while not go.exists():
        time.sleep(0.05)
    (w.dir / "f").write_text("holder")
"""


def _start_holder(tmp_path: Path, target: Path) -> tuple[subprocess.Popen[bytes], Path]:
    ready, go = tmp_path / "ready", tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(target), str(ready), str(go)])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, "the holder process died"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc, go


def test_second_writer_in_another_process_fails_fast(tmp_path: Path) -> None:
    target = tmp_path / "work" / "cells"
    proc, go = _start_holder(tmp_path, target)
    try:
        start = time.monotonic()
        with pytest.raises(artifacts.ArtifactError) as info:
            _write(target, "cells", {"who": "second"})
        assert time.monotonic() - start < 2
        message = str(info.value)
        assert str(target) in message and f"pid {proc.pid}" in message
        assert "being written by another run" in message and "choose another output" in message
    finally:
        go.write_text("1")
        assert proc.wait(60) == 0
    assert artifacts.read_manifest(target)["config"] == {"who": "holder"}
    with artifacts.write_artifact(target, "cells", {"who": "second"}):  # free again
        pass
    assert _siblings(target.parent) == ["cells"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _lock_record(**fields: object) -> str:
    info = {"host": socket.gethostname(), "pid": os.getpid(), "token": "t", "command": "x",
            "started": "2020-01-01T00:00:00+00:00", "heartbeat": time.time(), **fields}  # fmt: skip
    return json.dumps(info)


@pytest.mark.parametrize(
    "fields",
    [
        {"pid": "dead"},  # same host, its process is gone
        {"host": "elsewhere", "heartbeat": time.time() - 3600},  # heartbeat an hour old
    ],
)
def test_stale_lock_is_taken_over(
    tmp_path: Path, fields: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "cells"
    if fields.get("pid") == "dead":
        fields = {**fields, "pid": _dead_pid()}
    Path(locks.lock_key(target)).write_text(_lock_record(**fields))
    with artifacts.write_artifact(target, "cells", {}):
        pass
    assert "took over the lock of a dead run" in caplog.text
    assert _siblings(tmp_path) == ["cells"]


def test_live_lock_of_another_host_is_respected(tmp_path: Path) -> None:
    target = tmp_path / "cells"
    Path(locks.lock_key(target)).write_text(_lock_record(host="elsewhere", pid=1))
    with pytest.raises(artifacts.ArtifactError, match="pid 1 on elsewhere"):
        _write(target, "cells")
    assert not target.exists()


_CRASH = """
import os, sys
from pathlib import Path
from cellfoundry import artifacts
with artifacts.write_artifact(Path(sys.argv[1]), "cells", {"v": 2}) as w:
    (w.dir / "half").write_text("half-written")
    os._exit(3)  # killed mid-write: no cleanup runs
"""


def test_temp_folders_of_a_crashed_run_are_cleaned(tmp_path: Path) -> None:
    target = tmp_path / "cells"
    with artifacts.write_artifact(target, "cells", {"v": 1}) as w:
        (w.dir / "f").write_text("v1")
    crashed = subprocess.run([sys.executable, "-c", _CRASH, str(target)], check=False)
    assert crashed.returncode == 3
    (tmp_path / ".cells.old-deadbeef").mkdir()  # a crash between the two renames
    left = _siblings(tmp_path)
    assert any(n.startswith(".cells.tmp-") for n in left) and ".cells.lock" in left
    assert (target / "f").read_text() == "v1"  # the crash did not touch the artifact
    with artifacts.write_artifact(target, "cells", {"v": 3}):
        pass
    assert _siblings(tmp_path) == ["cells"]
    assert artifacts.read_manifest(target)["config"] == {"v": 3}


def test_lock_is_reentrant_on_its_thread_and_exclusive_across_threads(tmp_path: Path) -> None:
    target = tmp_path / "tokenized"
    errors: list[Exception] = []

    def other_thread() -> None:
        try:
            with artifacts.write_artifact(target, "tokenized", {}):
                pass
        except artifacts.ArtifactError as exc:
            errors.append(exc)

    with artifacts.claim_output(target, "tokenized"):
        with artifacts.write_artifact(target, "tokenized", {}):  # the stage's own write
            pass
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join(30)
    assert len(errors) == 1 and "another thread of this process" in str(errors[0])
    assert _siblings(tmp_path) == ["tokenized"]


_JOINER = """
import pickle, sys
from pathlib import Path
from cellfoundry import artifacts
claim = pickle.loads(Path(sys.argv[2]).read_bytes())
with artifacts.claim_output(sys.argv[1], "finetuned", join=claim):
    with artifacts.write_artifact(sys.argv[1], "finetuned", {"by": "task"}):
        pass
"""


def test_a_task_of_the_same_run_joins_the_claim(tmp_path: Path) -> None:
    target = tmp_path / "finetuned"
    with artifacts.claim_output(target, "finetuned") as claim:
        (tmp_path / "claim.pkl").write_bytes(pickle.dumps(claim))
        done = subprocess.run(
            [sys.executable, "-c", _JOINER, str(target), str(tmp_path / "claim.pkl")],
            check=False, capture_output=True, text=True,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert Path(locks.lock_key(target)).is_file()  # still ours until the run ends
    assert artifacts.read_manifest(target)["config"] == {"by": "task"}
    assert not Path(locks.lock_key(target)).exists()
    done = subprocess.run(  # a claim no longer held cannot be joined
        [sys.executable, "-c", _JOINER, str(target), str(tmp_path / "claim.pkl")],
        check=False, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode != 0 and "no longer holds its lock" in done.stderr


def test_heartbeat_refreshes_and_a_lost_lock_stops_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.05)
    target = tmp_path / "cells"
    lock = Path(locks.lock_key(target))
    error = pytest.raises(artifacts.ArtifactError, match="lost its lock")
    with error, artifacts.write_artifact(target, "cells", {}) as w:
        first = json.loads(lock.read_text())["heartbeat"]
        time.sleep(0.5)
        assert json.loads(lock.read_text())["heartbeat"] > first
        lock.write_text(_lock_record(host="elsewhere", token="other"))  # taken over
        (w.dir / "f").write_text("x")
    assert not target.exists()
    assert json.loads(lock.read_text())["token"] == "other"  # the other run's lock stays


_COMMITTER = """
import sys
from pathlib import Path
from cellfoundry import artifacts
target, n = Path(sys.argv[1]), int(sys.argv[2])
ok = busy = 0
for i in range(n):
    try:
        with artifacts.write_artifact(target, "cells", {"i": i}) as w:
            (w.dir / "f").write_text(str(i))
        ok += 1
    except artifacts.ArtifactError as exc:
        assert "is being written by another" in str(exc), exc
        busy += 1
print(ok, busy)
"""


def test_concurrent_commits_to_one_path_leave_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "cells"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _COMMITTER, str(target), "100"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    outcomes: list[tuple[int, int]] = []

    def in_threads() -> None:
        for i in range(50):
            try:
                with artifacts.write_artifact(target, "cells", {"thread": i}) as w:
                    (w.dir / "f").write_text("t")
                outcomes.append((1, 0))
            except artifacts.ArtifactError as exc:
                assert "is being written by another" in str(exc), exc
                outcomes.append((0, 1))

    threads = [threading.Thread(target=in_threads) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0
        ok, busy = map(int, out.split())
        outcomes.append((ok, busy))
    assert sum(ok + busy for ok, busy in outcomes) == 6 * 100 + 4 * 50
    assert sum(ok for ok, _ in outcomes) > 0
    assert _siblings(tmp_path) == ["cells"]  # no .old-*, .tmp-* or lock left
    assert (target / "f").is_file() and artifacts.read_manifest(target)["kind"] == "cells"


def test_a_stage_holding_its_output_fails_fast_before_any_work(tmp_path: Path) -> None:
    target = tmp_path / "model"
    work: list[str] = []

    @artifacts.holds_output("model", lambda out: out)
    def stage(out: Path) -> None:
        work.append("trained")  # hours of work would go here
        with artifacts.write_artifact(out, "model", {}):  # reenters the stage's own lock
            pass

    proc, go = _start_holder(tmp_path, target)
    try:
        with pytest.raises(artifacts.ArtifactError, match="being written by another run"):
            stage(target)
        assert work == []
    finally:
        go.write_text("1")
        assert proc.wait(60) == 0
    with pytest.raises(artifacts.ArtifactError, match=r"holds a 'cells' artifact"):
        stage(target)  # the holder wrote a cells artifact there: refused before any work
    assert work == []
    stage(tmp_path / "fresh")
    assert work == ["trained"]
