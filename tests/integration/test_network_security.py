"""No process the project starts listens beyond loopback, and Ray's ports want its token.

The session cluster (tests/integration/conftest.py) is started as cellfoundry starts every
cluster: loopback only, Ray token auth on with a random token. While a Serve app and a
pretraining run are up, every listening socket of the cluster's processes is listed
(psutil) and any one off loopback fails the test. A Serve replica's internal gRPC port,
which unpickles what a caller sends, refuses a call without the token: the planted payload
never runs. With the token the same call reaches the unpickler, which shows that the token
is the guard.
"""

from __future__ import annotations

import os
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from cellfoundry.config import PretrainJobConfig, parse_config
from cellfoundry.config.serve import ServeJobConfig

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}

#: Non-loopback listeners that are known and documented (docs/security.md), by process
#: name. None today; an entry here must come with its line in docs/security.md.
DOCUMENTED: dict[str, str] = {}


def cluster_pids() -> set[int]:
    """This test process and everything it started (the Ray cluster's GCS, raylet, workers,
    Serve and Train actors)."""
    me = psutil.Process()
    return {me.pid, *(p.pid for p in me.children(recursive=True))}


def listeners(pids: set[int]) -> list[tuple[str, int, int, str]]:
    """(ip, port, pid, process name) of every TCP socket in LISTEN state held by ``pids``."""
    out = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status != psutil.CONN_LISTEN or conn.pid not in pids:
            continue
        try:
            name = psutil.Process(conn.pid).name()
        except psutil.NoSuchProcess:
            continue
        out.append((conn.laddr.ip, conn.laddr.port, conn.pid, name))
    return out


def off_loopback(found: list[tuple[str, int, int, str]]) -> list[tuple[str, int, int, str]]:
    return [s for s in found if s[0] not in LOOPBACK and s[3] not in DOCUMENTED]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Runs before the Serve app starts: its two workers need both of the session's CPUs.
def test_pretraining_run_listens_on_loopback_only(
    ray_local: None, pbmc_corpus: Any, tmp_path: Path
) -> None:
    """Sample the cluster's listeners every 0.3 s while a 2-worker DeepSpeed run trains."""
    from cellfoundry.train import run_pretrain

    cfg = parse_config(
        PretrainJobConfig,
        {
            "data": {"tokenized": str(pbmc_corpus.tokenized), "max_length": 64, "batch_size": 4},
            "model": {"preset": "tiny", "overrides": {"hidden_size": 32, "num_attention_heads": 1,
                                                      "intermediate_size": 64,
                                                      "max_position_embeddings": 64}},
            "optim": {"lr": 1e-3, "max_steps": 12},
            "deepspeed": {"stage": 2},
            "scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 1}},
            "checkpoint_every": 6,
            "tracking": {"tensorboard": False, "mlflow": False},
            "output_dir": str(tmp_path / "model"),
        },
    )  # fmt: skip
    seen: dict[tuple[str, int, int, str], None] = {}
    train_workers: set[str] = set()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for s in listeners(cluster_pids()):
                seen[s] = None
                if "RayTrainWorker" in s[3] or "RayTrainWorker" in _cmd(s[2]):
                    train_workers.add(s[3])
            time.sleep(0.3)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = run_pretrain(cfg)
    finally:
        stop.set()
        sampler.join()
    assert result.completed
    assert train_workers, "the sampler never saw a Train worker listening"
    assert off_loopback(list(seen)) == [], off_loopback(list(seen))


@pytest.fixture(scope="module")
def serve_app(ray_local: None, tiny_model: Path, pbmc_corpus: Any) -> Iterator[Any]:
    from ray import serve

    from cellfoundry.serve import run_serve

    cfg = parse_config(
        ServeJobConfig,
        {
            "model": str(tiny_model),
            "gene_medians": str(pbmc_corpus.vocabulary),
            "num_cpus": 0.5,
            "app_name": "netcheck",
            "http": {"port": free_port()},
        },
    )
    handle = run_serve(cfg)
    yield handle
    serve.shutdown()


def test_token_auth_is_on_for_the_session_cluster(ray_local: None) -> None:
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    assert os.environ["RAY_AUTH_MODE"] == "token"
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
    assert token.stat().st_mode & 0o077 == 0, oct(token.stat().st_mode)
    assert len(token.read_text().strip()) >= 32
    assert is_token_auth_enabled()


def test_serve_app_listens_on_loopback_only(serve_app: Any) -> None:
    import requests

    assert requests.get(f"{serve_app.url}/healthz", timeout=10).status_code == 200
    found = listeners(cluster_pids())
    replicas = [s for s in found if "ServeReplica" in s[3] or "ServeReplica" in _cmd(s[2])]
    assert replicas, f"no Serve replica listener among {found}"
    assert off_loopback(found) == [], off_loopback(found)


def _cmd(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.NoSuchProcess:
        return ""


def _replica_grpc_port(app_name: str) -> int:
    """The internal gRPC port of the app's model replica, as Serve itself records it."""
    from ray import serve

    status = serve.status().applications[app_name]
    assert status.status == "RUNNING", status
    for pid in cluster_pids():
        if "ServeReplica:netcheck:CellModel" in _cmd(pid):
            ports = [ip_port for ip_port in listeners({pid})]
            # A replica holds its core worker's port and Serve's gRPC port; Serve's is the
            # one that speaks the ASGIService (probe each).
            for ip, port, _, _ in ports:
                if _speaks_asgi(ip, port):
                    return port
    raise AssertionError("no CellModel replica with an ASGIService port found")


def _speaks_asgi(ip: str, port: int) -> bool:
    import grpc

    host = "127.0.0.1" if ip.startswith("::ffff:") else ip
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest")
        try:
            call(b"", timeout=5)
        except grpc.RpcError as e:
            return e.code() != grpc.StatusCode.UNIMPLEMENTED
    return True


class _Planted:
    """Unpickling it creates a folder: a stand-in for any code an attacker would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def _handle_request(port: int, payload: bytes, metadata: tuple[tuple[str, str], ...]) -> Any:
    import grpc
    from ray.serve.generated import serve_pb2, serve_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = serve_pb2_grpc.ASGIServiceStub(channel)
        request = serve_pb2.ASGIRequest(pickled_request_metadata=payload)
        try:
            stub.HandleRequest(request, metadata=metadata, timeout=10)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_replica_grpc_refuses_calls_without_the_token(serve_app: Any, tmp_path: Path) -> None:
    import grpc

    port = _replica_grpc_port(serve_app.app_name)
    marker = tmp_path / "planted-ran"
    payload = pickle.dumps(_Planted(marker))

    assert _handle_request(port, payload, ()) == grpc.StatusCode.UNAUTHENTICATED
    wrong = (("authorization", "Bearer " + "0" * 64),)
    assert _handle_request(port, payload, wrong) == grpc.StatusCode.UNAUTHENTICATED
    time.sleep(1)
    assert not marker.exists(), "the payload ran without the token"

    # Control: with the cluster's token the same bytes reach Ray's unpickler (the payload
    # runs), so what refused the calls above is the token check and nothing else.
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    _handle_request(port, payload, (("authorization", f"Bearer {token}"),))
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "control failed: the token-bearing call never reached the replica"
