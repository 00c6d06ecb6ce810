"""A real S3 API over HTTP for tests: moto's standalone server on 127.0.0.1.

``s3_server`` (session) starts ``python -m moto.server -H 127.0.0.1 -p <free port>`` as a
subprocess, turns on its credential checks (IAM auth: unknown keys and wrong secrets are
refused, as AWS does), creates a user with a key and a bucket, and stops the server at the
end. ``s3`` (per test) points the standard AWS variables at it with monkeypatch and gives
the test a prefix of its own. Nothing listens beyond loopback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

BUCKET = "cellfoundry-test"
REGION = "us-east-1"
_AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
             "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
             "AWS_PROFILE")  # fmt: skip


@dataclass(frozen=True)
class S3Server:
    """The running server: its endpoint, a valid key pair and the test bucket."""

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str = BUCKET

    def env(self) -> dict[str, str]:
        """The AWS environment that points boto3, pyarrow and the AWS CLI at the server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": REGION,
        }

    def client(self) -> Any:
        """A boto3 client with the valid key (for setup and assertions)."""
        import boto3

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
        )  # fmt: skip

    def keys(self, prefix: str) -> list[str]:
        """Every object key under ``prefix`` (a key prefix in the bucket), sorted."""
        pages = (
            self.client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=self.bucket, Prefix=prefix)
        )
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: bytes) -> bytes:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "text/plain"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as r:
        return bytes(r.read())


def start_server(log: Path) -> tuple[subprocess.Popen[bytes], S3Server]:
    """Start moto's server on a free loopback port; create a user, a key and the bucket;
    then require valid credentials for every request."""
    import boto3

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            break
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(
                    f"moto server did not start: {log.read_text()[-2000:]}"
                ) from None
            time.sleep(0.2)
    # Anyone may act until auth is on: make a user with a key that may do everything.
    setup = {"endpoint_url": endpoint, "region_name": REGION,
             "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}  # fmt: skip
    iam = boto3.session.Session().client("iam", **setup)
    iam.create_user(UserName="cellfoundry")
    key = iam.create_access_key(UserName="cellfoundry")["AccessKey"]
    policy = {"Version": "2012-10-17",
              "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}  # fmt: skip
    iam.put_user_policy(UserName="cellfoundry", PolicyName="all",
                        PolicyDocument=json.dumps(policy))  # fmt: skip
    _post(f"{endpoint}/moto-api/reset-auth", b"0")  # from now on, keys are checked
    server = S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    server.client().create_bucket(Bucket=BUCKET)
    return proc, server


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server's process group (SIGTERM, then SIGKILL)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 for the session (skips without ``moto[server]``)."""
    pytest.importorskip("moto.server")
    pytest.importorskip("boto3")
    proc, server = start_server(tmp_path_factory.mktemp("moto") / "server.log")
    try:
        yield server
    finally:
        stop_server(proc)


@dataclass(frozen=True)
class S3Prefix:
    """A test's own prefix in the test bucket."""

    server: S3Server
    key: str

    def uri(self, *parts: str) -> str:
        """``s3://bucket/<test prefix>/parts...``."""
        return "/".join([f"s3://{self.server.bucket}", self.key, *parts])

    def objects(self, *parts: str) -> list[str]:
        """Keys under ``uri(parts...)``, relative to the test prefix."""
        base = "/".join([self.key, *parts])
        return [k[len(self.key) + 1 :] for k in self.server.keys(base)]


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Prefix:
    """The AWS environment pointed at :func:`s3_server` (monkeypatched for this test) and
    a fresh prefix ``s3://cellfoundry-test/t-<hex>``."""
    for var in _AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in s3_server.env().items():
        monkeypatch.setenv(var, value)
    return S3Prefix(s3_server, f"t-{uuid.uuid4().hex[:10]}")
