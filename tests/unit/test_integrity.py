"""The checkpoint key: environment first, else a 0600 key file generated once (also when
several processes race to create it); HMAC manifests of files."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cellfoundry.integrity import (
    KEY_ENV,
    KEY_FILE_ENV,
    IntegrityError,
    Manifests,
    checkpoint_key,
    key_id,
    write_manifest,
)


@pytest.fixture
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No key in the environment; the default key file under a fresh XDG_CONFIG_HOME."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path / "config"


def test_key_file_is_generated_once_with_mode_0600(config_home: Path) -> None:
    key = checkpoint_key()
    path = config_home / "cellfoundry" / "checkpoint.key"
    assert len(key) == 32 and path.read_text().strip() == key.hex()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert checkpoint_key() == key  # reused, not regenerated
    assert path.read_text().strip() == key.hex()


def test_environment_wins_over_the_key_file(
    config_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_file = checkpoint_key()
    monkeypatch.setenv(KEY_ENV, "ab" * 32)
    assert checkpoint_key() == bytes.fromhex("ab" * 32) != from_file
    monkeypatch.setenv(KEY_ENV, "a passphrase, not hex, long enough")
    assert checkpoint_key() == b"a passphrase, not hex, long enough"
    monkeypatch.setenv(KEY_ENV, "short")
    with pytest.raises(ValueError, match=f"{KEY_ENV}.*5 bytes"):
        checkpoint_key()
    monkeypatch.delenv(KEY_ENV)
    assert checkpoint_key() == from_file


def test_key_file_named_by_the_environment(
    config_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "mounted-secret"
    monkeypatch.setenv(KEY_FILE_ENV, str(secret))
    with pytest.raises(ValueError, match="no such file"):
        checkpoint_key()  # a missing secret is an error, not a fresh key
    secret.write_text("cd" * 32 + "\n")
    assert checkpoint_key() == bytes.fromhex("cd" * 32)
    assert not (config_home / "cellfoundry").exists()


def test_processes_racing_to_create_the_key_agree(config_home: Path) -> None:
    """Six processes wait for the same instant, then each asks for the key."""
    start = time.time() + 3
    code = (
        "import sys, time; from cellfoundry.integrity import checkpoint_key; "
        f"time.sleep(max(0, {start} - time.time())); sys.stdout.write(checkpoint_key().hex())"
    )
    env = {**os.environ, "XDG_CONFIG_HOME": str(config_home)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
        for _ in range(6)
    ]
    keys = {p.communicate(timeout=60)[0].decode() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(keys) == 1 and len(next(iter(keys))) == 64
    assert keys == {(config_home / "cellfoundry" / "checkpoint.key").read_text().strip()}
    assert [p.name for p in (config_home / "cellfoundry").iterdir()] == ["checkpoint.key"]


def test_manifest_binds_content_and_name(tmp_path: Path) -> None:
    key, other = b"k" * 32, b"o" * 32
    (tmp_path / "a.pt").write_bytes(b"alpha")
    (tmp_path / "b.pt").write_bytes(b"beta")
    write_manifest(tmp_path, ["a.pt", "b.pt"], "m.json", key)
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["key_id"] == key_id(key) and sorted(data["files"]) == ["a.pt", "b.pt"]
    signed = Manifests.read(tmp_path, ["m.json"], key)
    signed.verify_file("a.pt")
    signed.verify_bytes("b.pt", b"beta")
    with pytest.raises(IntegrityError, match=r"b\.pt: HMAC mismatch; it was changed"):
        signed.verify_bytes("b.pt", b"alpha")  # a's bytes under b's name
    with pytest.raises(IntegrityError, match=r"c\.pt: it is not listed"):
        signed.verify_bytes("c.pt", b"")
    with pytest.raises(IntegrityError, match=f"another key.*{key_id(key)}.*{key_id(other)}"):
        Manifests.read(tmp_path, ["m.json"], other).verify_file("a.pt")
