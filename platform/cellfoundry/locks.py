"""One writer per output: a lock file that names its owner and carries a heartbeat.

The lock of an output path ``<parent>/<name>`` is the file ``<parent>/.<name>.lock``, JSON
with the owner's host, pid, token, command line, start time and heartbeat (epoch seconds).
It is created atomically; while it is held, a daemon thread rewrites the heartbeat every
:data:`HEARTBEAT_S` seconds. A lock whose heartbeat is older than :data:`STALE_AFTER_S`
seconds, or whose owner was a process on this host that is gone, is stale: it is taken
over with a warning. Anyone else fails fast with :class:`LockHeldError` naming the owner.

Holding is reentrant on the holding thread (a stage holds its output while
``write_artifact`` takes the same lock again). Another process of the same run, e.g. the
Ray task that writes a fine-tuned model, joins the lock with the :class:`Lease` it was
given instead of taking it.

The owner/heartbeat logic needs only a few operations on the lock file, the
:class:`LockStore` protocol: create-if-absent, read, replace-if-unchanged,
remove-if-unchanged. :class:`LocalLockStore` implements them on a local or mounted
filesystem (``link(2)`` makes create-if-absent atomic). :class:`S3LockStore` implements
them on S3 with conditional requests (boto3; pyarrow has none): ``PutObject`` with
``If-None-Match: *`` creates, ``If-Match: <ETag>`` replaces and deletes, so two runs never
both hold the lock ``s3://bucket/<parent>/.<name>.lock``. AWS S3 evaluates these
conditions atomically; moto's test server honours them too, though its check and write
are not one atomic step under truly simultaneous requests. ``gs://`` outputs have no lock
store yet (GCS would use ``ifGenerationMatch``): claiming one fails fast with a clear error.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cellfoundry import storage

logger = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
"""Seconds between two heartbeats of a held lock."""
STALE_AFTER_S = 60.0
"""A lock whose heartbeat is older than this (seconds) belongs to a dead run."""


class LockHeldError(ValueError):
    """Another run (or another thread of this process) holds the lock."""


class LockStore(Protocol):
    """Atomic operations on small lock objects, addressed by a key (a path or URI)."""

    def create(self, key: str, data: bytes) -> bool:
        """Write ``data`` at ``key`` only if nothing is there; False if something was."""

    def read(self, key: str) -> bytes | None:
        """The bytes at ``key``, or None if there is nothing."""

    def replace(self, key: str, data: bytes) -> None:
        """Replace the bytes at ``key`` atomically (readers see the old or the new)."""

    def replace_if(self, key: str, old: bytes, new: bytes) -> bool:
        """Replace ``old`` at ``key`` with ``new``; False (nothing written) if ``key`` no
        longer holds exactly ``old``."""

    def remove_if(self, key: str, data: bytes) -> bool:
        """Remove ``key`` only if it still holds exactly ``data``; True if removed."""


class LocalLockStore:
    """:class:`LockStore` on a local or mounted (POSIX) filesystem."""

    def create(self, key: str, data: bytes) -> bool:
        file = Path(key)
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f"{file.name}.new-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        try:
            os.link(tmp, file)  # fails if the file exists; the lock appears complete
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def read(self, key: str) -> bytes | None:
        try:
            return Path(key).read_bytes()
        except FileNotFoundError:
            return None

    def replace(self, key: str, data: bytes) -> None:
        file = Path(key)
        tmp = file.with_name(f"{file.name}.new-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        os.replace(tmp, file)

    def replace_if(self, key: str, old: bytes, new: bytes) -> bool:
        if self.read(key) != old:
            return False
        self.replace(key, new)
        return True

    def remove_if(self, key: str, data: bytes) -> bool:
        file = Path(key)
        aside = file.with_name(f"{file.name}.gone-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(file, aside)  # only one of several removers gets the file
        except FileNotFoundError:
            return False
        try:
            if aside.read_bytes() == data:
                return True
            # Not the lock we meant (it changed meanwhile): put it back unless a new one is there.
            with contextlib.suppress(FileExistsError):
                os.link(aside, file)
            return False
        finally:
            aside.unlink(missing_ok=True)


class S3LockStore:
    """:class:`LockStore` on S3 (or an S3-compatible server) with conditional requests.

    Keys are ``s3://bucket/key`` URIs; the client comes from the AWS environment
    (:func:`cellfoundry.storage.s3_client`). Transport errors are raised as ``OSError``.
    """

    @staticmethod
    def _call(op: str, key: str, **kwargs: Any) -> Any:
        """``op`` on the lock object; None if it does not exist, "conflict" if a
        condition failed."""
        import botocore.exceptions as bex

        _, bucket, name = storage.split(key)
        try:
            return getattr(storage.s3_client(), op)(Bucket=bucket, Key=name, **kwargs)
        except bex.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404"):
                return None
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                return "conflict"
            raise OSError(f"{key}: S3 {op} failed: {exc}") from None
        except bex.BotoCoreError as exc:
            raise OSError(f"{key}: S3 {op} failed: {exc}") from None

    def _get(self, key: str) -> tuple[bytes, str] | None:
        found = self._call("get_object", key)
        return None if found is None else (found["Body"].read(), found["ETag"])

    def create(self, key: str, data: bytes) -> bool:
        return self._call("put_object", key, Body=data, IfNoneMatch="*") != "conflict"

    def read(self, key: str) -> bytes | None:
        found = self._get(key)
        return None if found is None else found[0]

    def replace(self, key: str, data: bytes) -> None:
        self._call("put_object", key, Body=data)

    def replace_if(self, key: str, old: bytes, new: bytes) -> bool:
        found = self._get(key)
        if found is None or found[0] != old:
            return False
        done = self._call("put_object", key, Body=new, IfMatch=found[1])
        return done not in (None, "conflict")

    def remove_if(self, key: str, data: bytes) -> bool:
        found = self._get(key)
        if found is None or found[0] != data:
            return False
        return self._call("delete_object", key, IfMatch=found[1]) not in (None, "conflict")


@dataclass(frozen=True)
class Lease:
    """A held lock, picklable: hand it to another process of the same run to join it."""

    key: str
    token: str


@dataclass
class _Held:
    token: str
    thread: int
    joined: bool
    data: bytes = b""  # the lock file's current bytes (owner only)
    started: float = 0.0
    depth: int = 1
    lost: bool = False


_LOCAL: LockStore = LocalLockStore()
_S3: LockStore = S3LockStore()
_GUARD = threading.Lock()
_HELD: dict[str, _Held] = {}
_BEAT: threading.Thread | None = None
_WAKE = threading.Event()  # set: beat now (a new lock was taken)


def _after_fork() -> None:  # a forked child holds nothing, and has no heartbeat thread
    global _GUARD, _BEAT, _WAKE
    _GUARD, _BEAT, _WAKE = threading.Lock(), None, threading.Event()
    _HELD.clear()


os.register_at_fork(after_in_child=_after_fork)


def lock_key(path: str | Path) -> str:
    """The lock file of output ``path``: ``<parent>/.<name>.lock`` (a path or a URI)."""
    if storage.is_remote(path):
        if not storage.name(path):
            raise storage.StorageError(f"{path}: an output needs a prefix below the bucket")
        return storage.join(storage.parent(path), f".{storage.name(path)}.lock")
    path = Path(path)
    return str(path.parent / f".{path.name}.lock")


def _store(key: str) -> LockStore:
    """The lock store for ``key``: local, or S3 for ``s3://`` keys."""
    if not storage.is_remote(key):
        return _LOCAL
    if storage.split(key)[0] == "s3":
        return _S3
    raise storage.StorageError(
        f"{key}: cellfoundry cannot lock outputs on gs:// yet (no GCS lock store); write "
        "to s3:// or a local or mounted path"
    )


def _record(token: str, started: float) -> bytes:
    return json.dumps({
        "host": socket.gethostname(), "pid": os.getpid(), "token": token,
        "command": " ".join(sys.argv)[:300],
        "started": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(timespec="seconds"),
        "heartbeat": time.time(),
    }).encode()  # fmt: skip


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        info = json.loads(raw)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_reason(key: str, info: dict[str, Any]) -> str | None:
    """Why the lock described by ``info`` belongs to a dead run; None while its owner lives."""
    heartbeat = info.get("heartbeat")
    if not isinstance(heartbeat, (int, float)):
        return "the lock file is unreadable"
    age = time.time() - heartbeat
    if age > STALE_AFTER_S:
        return f"its last heartbeat is {age:.0f} s old"
    pid = info.get("pid")
    if info.get("host") == socket.gethostname() and isinstance(pid, int):
        if pid == os.getpid() and key not in _HELD:
            return "it was left by this process"
        if pid != os.getpid() and not _alive(pid):
            return f"its process {pid} is gone"
    return None


def describe(info: dict[str, Any]) -> str:
    """The owner of a lock, for messages."""
    if not info:
        return "an unknown run"
    age = time.time() - float(info.get("heartbeat", 0))
    return (
        f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}, "
        f"last heartbeat {age:.0f} s ago, command: {info.get('command')!r}"
    )


def _held_message(what: str, key: str, info: dict[str, Any]) -> str:
    return (
        f"{what} is being written by another run ({describe(info)}). Wait for it to finish "
        f"or choose another output path. If that run is gone, its lock {key} is taken over "
        f"automatically once its heartbeat is {STALE_AFTER_S:.0f} s old."
    )


def _acquire(key: str, what: str) -> None:
    """Take the lock (call with ``_GUARD`` held, so threads of this process take turns)."""
    token, started = uuid.uuid4().hex, time.time()
    for _ in range(5):
        data = _record(token, started)
        if _store(key).create(key, data):
            _HELD[key] = _Held(token, threading.get_ident(), False, data, started)
            _start_heartbeat()
            return
        raw = _store(key).read(key)
        if raw is None:
            continue  # released meanwhile: try again
        info = _parse(raw)
        reason = _stale_reason(key, info)
        if reason is None:
            raise LockHeldError(_held_message(what, key, info))
        if _store(key).remove_if(key, raw):
            logger.warning(
                "%s: took over the lock of a dead run (%s): %s", what, reason, describe(info)
            )
    raise LockHeldError(f"{what}: other runs are taking its lock {key} at the same time; retry")


def _join(key: str, what: str, lease: Lease) -> None:
    """Share the lock of the run that gave ``lease`` (call with ``_GUARD`` held)."""
    info = _parse(_store(key).read(key) or b"")
    if info.get("token") != lease.token:
        raise LockHeldError(
            f"{what}: the run that started this task no longer holds its lock {key} "
            f"(now: {describe(info)}); rerun it"
        )
    _HELD[key] = _Held(lease.token, threading.get_ident(), True)


def _release(key: str, what: str) -> None:
    with _GUARD:
        held = _HELD[key]
        held.depth -= 1
        if held.depth > 0:
            return
        del _HELD[key]
        if held.joined:
            return
        if held.lost or not _store(key).remove_if(key, held.data):
            logger.warning("%s: another run took over this run's lock %s meanwhile", what, key)


def _start_heartbeat() -> None:
    """Start the heartbeat thread if none runs (call with ``_GUARD`` held)."""
    global _BEAT
    if _BEAT is None or not _BEAT.is_alive():
        _BEAT = threading.Thread(target=_heartbeat, name="cellfoundry-lock-heartbeat", daemon=True)
        _BEAT.start()
    else:
        _WAKE.set()


def _heartbeat() -> None:
    global _BEAT
    while True:
        _WAKE.wait(HEARTBEAT_S)
        _WAKE.clear()
        with _GUARD:
            owned = {k: h for k, h in _HELD.items() if not h.joined and not h.lost}
            if not owned:
                _BEAT = None
                return
            for key, held in owned.items():
                try:
                    data = _record(held.token, held.started)
                    if not _store(key).replace_if(key, held.data, data):
                        held.lost = True
                        logger.error("another run took over the lock %s of this run", key)
                        continue
                    held.data = data
                except OSError as exc:  # keep beating; a lock is only stale after a minute
                    logger.warning("heartbeat of %s failed: %s", key, exc)


def verify(path: str | Path) -> None:
    """Raise :class:`LockHeldError` unless this thread still holds the lock of ``path``."""
    key = lock_key(path)
    with _GUARD:
        held = _HELD.get(key)
    info = _parse(_store(key).read(key) or b"")
    if held is None or held.lost or info.get("token") != held.token:
        raise LockHeldError(
            f"{path}: this run lost its lock {key} to another run ({describe(info)}); "
            "nothing was written; rerun when that run is done"
        )


@contextlib.contextmanager
def hold(path: str | Path, *, join: Lease | None = None) -> Iterator[Lease]:
    """Hold the lock of output ``path`` for the block; yields a :class:`Lease`.

    Reentrant on the holding thread. With ``join`` (the lease of the run that started this
    process), the lock is shared with that run instead of taken. Raises
    :class:`LockHeldError` at once if another run or thread holds it.
    """
    key, what = lock_key(path), str(path)
    with _GUARD:
        held = _HELD.get(key)
        if held is not None:
            if held.thread != threading.get_ident():
                raise LockHeldError(f"{what} is being written by another thread of this process")
            held.depth += 1
        elif join is not None:
            _join(key, what, join)
        else:
            _acquire(key, what)
        token = _HELD[key].token
    try:
        yield Lease(key, token)
    finally:
        _release(key, what)


def holds(path: str | Path) -> bool:
    """Whether this thread holds (or has joined) the lock of ``path``."""
    with _GUARD:
        held = _HELD.get(lock_key(path))
    return held is not None and held.thread == threading.get_ident()
