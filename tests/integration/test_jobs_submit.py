"""`ray job submit` on a real `ray start` cluster: the corpus job over one small real file.

The cluster is this test's own (own ports, RAY_TMPDIR and HOME, loopback only, Ray token
auth on with a token of its own, as docs/clusters.md says to start one), started as a
subprocess in its own process group and stopped by killing that group: never `ray stop`,
which would stop every Ray cluster on the machine (PITFALLS.md). It does not touch the
session's in-process ``ray_local`` cluster, nor ``RAY_ADDRESS``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cellfoundry import artifacts
from cellfoundry.paths import REPO_ROOT, shared_dir
from cellfoundry.runtime import write_token_file

BIN = Path(sys.executable).parent
RUNTIME_ENV = REPO_ROOT / "cluster" / "runtime_env" / "local.yaml"
WU2020 = shared_dir() / "data" / "h5ad" / "scirpy_wu2020_200cells.h5ad"
_PORT_FLAGS = (
    "--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port",
    "--object-manager-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port", "--metrics-export-port",
)  # fmt: skip


@dataclass
class Cluster:
    """A running `ray start --head --block` cluster of this test."""

    address: str  # the dashboard's HTTP address, for `ray job submit --address`
    env: dict[str, str]  # environment for the `ray` CLI talking to it
    proc: subprocess.Popen
    tmpdir: Path


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _jobs_api(address: str, token: str | None) -> int:
    """HTTP status of the dashboard's jobs API (with ``token`` as Ray's bearer token)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{address}/api/jobs/", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _wait_for_jobs_api(
    address: str, proc: subprocess.Popen, token: str, timeout: float = 90.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            if _jobs_api(address, token) == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the Ray dashboard at {address} did not accept jobs in {timeout:.0f} s")


def _ours(tmpdir: Path) -> list[int]:
    """Pids of processes still running with our temp dir in their command line or cwd."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(p / "cwd")
        except OSError:
            continue
        if str(tmpdir) in cmd or cwd.startswith(str(tmpdir)):
            pids.append(int(p.name))
    return pids


def _stop(cluster: Cluster) -> None:
    """Kill this cluster's process group (and any stray process of its temp dir).

    `ray start --block` does not exit on SIGTERM (its GCS lingers ~15 s), so SIGKILL follows.
    """
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
        try:
            os.killpg(cluster.proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            cluster.proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    time.sleep(1)
    for pid in _ours(cluster.tmpdir):
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    """A 2-CPU head node on 127.0.0.1 with a dashboard (needed for job submission)."""
    if not WU2020.is_file():
        pytest.skip(f"{WU2020} is not available")
    tmpdir = Path(tempfile.mkdtemp(prefix="cfjob-"))  # short: socket paths stay < 107 bytes
    token = write_token_file(tmpdir / "auth")
    ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # jobs run the venv's python
        "HOME": str(tmpdir),
        "RAY_TMPDIR": str(tmpdir),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "CELLFOUNDRY_SHARED": str(shared_dir()),
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2",
        "--object-store-memory=200000000", "--disable-usage-stats", f"--temp-dir={tmpdir}",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]  # fmt: skip
    log = (tmpdir / "ray-start.log").open("wb")
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    cluster = Cluster(f"http://127.0.0.1:{ports['--dashboard-port']}", env, proc, tmpdir)
    try:
        _wait_for_jobs_api(cluster.address, proc, token.read_text())
        yield cluster
    finally:
        _stop(cluster)
        log.close()
        shutil.rmtree(tmpdir, ignore_errors=True)


def _submit(
    cluster: Cluster, *entrypoint: str, timeout: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    cmd = [
        str(BIN / "ray"), "job", "submit", "--address", cluster.address,
        "--working-dir", str(REPO_ROOT), "--runtime-env", str(RUNTIME_ENV), "--", *entrypoint,
    ]  # fmt: skip
    return subprocess.run(
        cmd, env=env or cluster.env, cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _last_json(text: str) -> dict:
    """The JSON object a job printed last (its output follows Ray's own log lines)."""
    start = text.rindex("\n{\n") + 1
    return json.loads(text[start : text.index("\n}\n", start) + 2])


def test_corpus_job_runs_on_a_ray_start_cluster(ray_cluster: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    done = _submit(
        ray_cluster, "python", "jobs/corpus.py", "--config", "jobs/configs/corpus/tiny.yaml",
        "--set", f"corpus.output_dir={out}",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "succeeded" in done.stdout
    result = _last_json(done.stdout)
    counts = result["counts"]
    assert counts["cells_in"] == 200
    assert counts["quarantined"] == {}
    assert (
        counts["cells_in"]
        == counts["passed"] + sum(counts["filtered"].values()) + counts["duplicates"]
    )
    assert counts["tokenized"]["cells"] == counts["passed"] > 150
    for kind in ("catalog", "cells", "medians", "vocabulary", "tokenized"):
        path = Path(result["artifacts"][kind])
        assert path.parent == out
        assert artifacts.read_manifest(path, kind)["kind"] == kind
    assert artifacts.read_manifest(out / "cells")["counts"]["cells_in"] == 200


def test_job_workers_import_cellfoundry_from_the_upload(ray_cluster: Cluster) -> None:
    probe = (
        "import json, ray, cellfoundry; ray.init(); "
        "f = ray.remote(lambda: __import__('cellfoundry').__file__); "
        "print(json.dumps({'driver': cellfoundry.__file__, 'worker': ray.get(f.remote())}))"
    )
    done = _submit(ray_cluster, "python", "-c", probe, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    where = json.loads(
        next(line for line in done.stdout.splitlines() if line.startswith('{"driver"'))
    )
    # Both come from the unpacked working dir under the cluster's temp dir, not the repo.
    for path in where.values():
        assert path.startswith(str(ray_cluster.tmpdir)), where
        assert path.endswith("platform/cellfoundry/__init__.py"), where


def test_submission_without_the_token_is_refused(ray_cluster: Cluster, tmp_path: Path) -> None:
    """Nothing runs for a client without the cluster's token (or with another one)."""
    marker = tmp_path / "ran"
    probe = f"open({str(marker)!r}, 'w').write('ran')"
    other = write_token_file(tmp_path / "other")
    for env in (
        {k: v for k, v in ray_cluster.env.items() if k != "RAY_AUTH_TOKEN_PATH"},
        {**ray_cluster.env, "RAY_AUTH_TOKEN_PATH": str(other)},
    ):
        done = _submit(ray_cluster, "python", "-c", probe, timeout=120, env=env)
        assert done.returncode != 0, done.stdout[-2000:]
        assert "auth" in (done.stdout + done.stderr).lower(), done.stderr[-2000:]
    time.sleep(2)
    assert not marker.exists()
    assert _jobs_api(ray_cluster.address, None) == 401
    assert _jobs_api(ray_cluster.address, other.read_text()) in (401, 403)


def test_ray_start_cluster_listens_on_loopback_only(ray_cluster: Cluster) -> None:
    import psutil

    pids = set(_ours(ray_cluster.tmpdir)) | {ray_cluster.proc.pid}
    found = [
        (c.laddr.ip, c.laddr.port, c.pid)
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]
    assert len(found) >= 5, found  # GCS, raylet, dashboard, agents
    assert [s for s in found if s[0] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")] == []
