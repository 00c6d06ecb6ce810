"""Signed files: the checkpoint key and HMAC-SHA256 manifests for files that must be unpickled.

Most of what cellfoundry reads is safe by its format (safetensors, JSON, Parquet, and
``torch.load(weights_only=True)``). DeepSpeed's engine state is the exception: its
``load_checkpoint`` unpickles every file of a checkpoint, so a file planted in the run
storage (NFS, s3, gs) would run code in every worker that resumes from it. Such files are
signed when written and verified before they are loaded, with a key that is never written
to the run storage (:func:`checkpoint_key`).

A manifest is a JSON file beside the signed files::

    {"format": "cellfoundry.hmac.v1", "algorithm": "HMAC-SHA256", "key_id": "<16 hex>",
     "files": {"<relative/posix/path>": "<64 hex>", ...}}

The MAC of a file is ``HMAC-SHA256(key, b"cellfoundry.hmac.v1\\0" + path + b"\\0" + bytes)``
(path: UTF-8, relative to the manifest's folder, ``/``-separated), so a file cannot be
moved to another name either. ``key_id`` only names the key in error messages; it proves
nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "KEY_ENV",
    "KEY_FILE_ENV",
    "IntegrityError",
    "Manifests",
    "checkpoint_key",
    "default_key_file",
    "key_id",
    "list_files",
    "mac_bytes",
    "mac_file",
    "refused_pickle_reason",
    "write_manifest",
]

#: The key itself: hex (e.g. ``secrets.token_hex(32)``) or any string of >= 16 bytes.
KEY_ENV = "CELLFOUNDRY_CHECKPOINT_KEY"
#: A file that holds the key in the same form (e.g. a mounted Kubernetes secret).
KEY_FILE_ENV = "CELLFOUNDRY_CHECKPOINT_KEY_FILE"
FORMAT = "cellfoundry.hmac.v1"
MIN_KEY_BYTES = 16
_CHUNK = 1 << 20
_KEY_HELP = (
    f"Every process that writes or resumes a checkpoint needs the same key: on a multi-node "
    f"cluster set {KEY_ENV} (e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`) "
    "on every node, or in the job's runtime env (env_vars), never in a file on the run storage"
)


class IntegrityError(ValueError):
    """A file that must be signed is unsigned, unlisted or does not match its signature."""


def refused_pickle_reason(exc: BaseException) -> str:
    """What ``torch.load(weights_only=True)`` refused (e.g. "Trying to load unsupported
    GLOBAL posix.system ..."), without torch's advice to retry with ``weights_only=False``."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)


def default_key_file() -> Path:
    """``$XDG_CONFIG_HOME/cellfoundry/checkpoint.key`` (``~/.config/...`` by default)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cellfoundry" / "checkpoint.key"


def _parse_key(text: str, source: str) -> bytes:
    text = text.strip()
    try:
        key = bytes.fromhex(text) if len(text) >= 2 * MIN_KEY_BYTES else text.encode()
    except ValueError:  # not hex: the string's own bytes
        key = text.encode()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(
            f"{source}: the checkpoint key has {len(key)} bytes, fewer than {MIN_KEY_BYTES}; "
            "use e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`"
        )
    return key


def _read_key_file(path: Path) -> bytes | None:
    """The key in ``path``; None while another process is still writing it (empty file)."""
    text = path.read_text()
    if not text.strip():
        return None
    mode = path.stat().st_mode
    if mode & 0o077:
        logger.warning(
            "%s is readable by other users (mode %o): `chmod 600 %s`", path, mode & 0o777, path
        )
    return _parse_key(text, str(path))


def _create_key_file(path: Path) -> None:
    """Write a new random key to ``path`` (mode 0600) unless it exists; safe when several
    processes race to create it (O_EXCL: exactly one wins, the others read its key)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
        f.flush()
        os.fsync(f.fileno())
    logger.warning(
        "generated a checkpoint key in %s; processes on other machines will not find it: "
        "on a multi-node cluster set %s on every node",
        path,
        KEY_ENV,
    )


def checkpoint_key() -> bytes:
    """The key that signs and verifies checkpoint files (at least 16 bytes).

    In order: ``$CELLFOUNDRY_CHECKPOINT_KEY`` (hex, or any string); the file named by
    ``$CELLFOUNDRY_CHECKPOINT_KEY_FILE``; else :func:`default_key_file`, generated once with
    32 random bytes and mode 0600. Ray workers of a local cluster run as the same user on
    the same machine and so find the same file. On a multi-node cluster each node would
    generate its own: set ``CELLFOUNDRY_CHECKPOINT_KEY`` to one value on every node (or in
    the job's runtime env). Keep the key out of the run storage and out of anything written
    there (configs, ``train_loop_config``).
    """
    value = os.environ.get(KEY_ENV)
    if value:
        return _parse_key(value, f"${KEY_ENV}")
    named = os.environ.get(KEY_FILE_ENV)
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise ValueError(f"${KEY_FILE_ENV}={named}: no such file. {_KEY_HELP}")
    else:
        path = default_key_file()
        if not path.is_file():
            _create_key_file(path)
    for _ in range(100):  # a racing creator may not have written its key yet (~ms)
        key = _read_key_file(path)
        if key is not None:
            return key
        time.sleep(0.02)
    raise ValueError(f"{path} is empty: delete it to generate a new key, or write one in")


def key_id(key: bytes) -> str:
    """A short public name of ``key`` (for messages): equal ids mean, almost surely, equal keys."""
    return hmac.new(key, b"cellfoundry.key-id.v1", hashlib.sha256).hexdigest()[:16]


def _mac(key: bytes, relpath: str) -> hmac.HMAC:
    return hmac.new(key, f"{FORMAT}\0{relpath}\0".encode(), hashlib.sha256)


def mac_bytes(key: bytes, relpath: str, data: bytes) -> str:
    """Hex MAC of a file named ``relpath`` with contents ``data``."""
    h = _mac(key, relpath)
    h.update(data)
    return h.hexdigest()


def mac_file(key: bytes, root: Path, relpath: str) -> str:
    """Hex MAC of ``root / relpath`` (read in 1 MiB chunks)."""
    h = _mac(key, relpath)
    with open(root / relpath, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def list_files(root: Path) -> Iterator[str]:
    """Relative POSIX paths of the files under ``root``, sorted. A symbolic link is refused:
    what it points at could change after it was verified."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [*dirnames, *filenames]:
            if os.path.islink(os.path.join(dirpath, name)):
                raise IntegrityError(
                    f"{Path(dirpath) / name} is a symbolic link; a checkpoint holds plain files "
                    "only: remove it (and check who put it there)"
                )
        for name in sorted(filenames):
            yield Path(dirpath, name).relative_to(root).as_posix()


def write_manifest(root: Path, relpaths: Iterable[str], name: str, key: bytes) -> Path:
    """Sign ``relpaths`` (files under ``root``) into the manifest ``root / name``."""
    files = {rel: mac_file(key, root, rel) for rel in sorted(relpaths)}
    data = {"format": FORMAT, "algorithm": "HMAC-SHA256", "key_id": key_id(key), "files": files}
    path = root / name
    tmp = path.with_name(f".{name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


@dataclass
class Manifests:
    """The manifests of one folder: which MACs each file must match."""

    root: Path
    key: bytes
    listed: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    """relative path -> [(manifest name, hex MAC)] (every listing must match)."""
    key_ids: dict[str, str] = field(default_factory=dict)
    """manifest name -> the key id it was written with."""

    @classmethod
    def read(cls, root: Path, names: Iterable[str], key: bytes) -> Manifests:
        """Parse the manifests ``names`` of ``root`` (none: :class:`IntegrityError`)."""
        out = cls(root, key)
        for name in sorted(names):
            path = root / name
            try:
                data = json.loads(path.read_text())
                if data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
                    raise ValueError(f"not a {FORMAT} manifest")
                out.key_ids[name] = str(data.get("key_id", "?"))
                for rel, mac in data["files"].items():
                    out.listed.setdefault(str(rel), []).append((name, str(mac)))
            except (OSError, ValueError, AttributeError) as exc:
                raise IntegrityError(f"{path}: unreadable HMAC manifest ({exc})") from exc
        if not out.key_ids:
            raise IntegrityError(f"{root}: no HMAC manifest")
        return out

    def _mismatch(self, relpath: str, manifest: str) -> IntegrityError:
        ours, theirs = key_id(self.key), self.key_ids.get(manifest, "?")
        if theirs != ours:
            why = (
                f"it was signed with another key (key id {theirs} in {manifest}, this process "
                f"has {ours}). {_KEY_HELP}"
            )
        else:
            why = (
                "it was changed after it was written (same key): do not load it; restore the "
                "file from a copy you trust or resume from an earlier checkpoint"
            )
        return IntegrityError(f"refusing to load {self.root / relpath}: HMAC mismatch; {why}")

    def _unlisted(self, relpath: str) -> IntegrityError:
        return IntegrityError(
            f"refusing to load {self.root / relpath}: it is not listed in any HMAC manifest of "
            f"{self.root}, so it was added after the checkpoint was written; remove it if you "
            "did not put it there, or resume from an earlier checkpoint"
        )

    def verify_bytes(self, relpath: str, data: bytes) -> None:
        """Check ``data``, read from ``relpath``, against every listing of it."""
        if relpath not in self.listed:
            raise self._unlisted(relpath)
        for manifest, mac in self.listed[relpath]:
            if not hmac.compare_digest(mac_bytes(self.key, relpath, data), mac):
                raise self._mismatch(relpath, manifest)

    def verify_file(self, relpath: str) -> None:
        """Check the file ``relpath`` against every listing of it."""
        if relpath not in self.listed:
            raise self._unlisted(relpath)
        digest = mac_file(self.key, self.root, relpath)
        for manifest, mac in self.listed[relpath]:
            if not hmac.compare_digest(digest, mac):
                raise self._mismatch(relpath, manifest)
