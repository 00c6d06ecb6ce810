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

The owner/heartbeat logic needs only four operations on the lock file, the
:class:`LockStore` protocol: create-if-absent, read, replace, remove-if-unchanged.
:class:`LocalLockStore` implements them on a local or mounted filesystem (``link(2)``
makes create-if-absent atomic). An object-storage store would use a conditional PUT
(``If-None-Match: *``) to create and ``If-Match`` on the ETag to replace and delete; it is
not built yet, because cellfoundry writes artifacts to local or mounted paths only.
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


_STORE: LockStore = LocalLockStore()
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
    """The lock file of output ``path``: ``<parent>/.<name>.lock``."""
    path = Path(path)
    return str(path.parent / f".{path.name}.lock")


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
        if _STORE.create(key, data):
            _HELD[key] = _Held(token, threading.get_ident(), False, data, started)
            _start_heartbeat()
            return
        raw = _STORE.read(key)
        if raw is None:
            continue  # released meanwhile: try again
        info = _parse(raw)
        reason = _stale_reason(key, info)
        if reason is None:
            raise LockHeldError(_held_message(what, key, info))
        if _STORE.remove_if(key, raw):
            logger.warning(
                "%s: took over the lock of a dead run (%s): %s", what, reason, describe(info)
            )
    raise LockHeldError(f"{what}: other runs are taking its lock {key} at the same time; retry")


def _join(key: str, what: str, lease: Lease) -> None:
    """Share the lock of the run that gave ``lease`` (call with ``_GUARD`` held)."""
    info = _parse(_STORE.read(key) or b"")
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
        if held.lost or not _STORE.remove_if(key, held.data):
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
                    if _STORE.read(key) != held.data:
                        held.lost = True
                        logger.error("another run took over the lock %s of this run", key)
                        continue
                    data = _record(held.token, held.started)
                    _STORE.replace(key, data)
                    held.data = data
                except OSError as exc:  # keep beating; a lock is only stale after a minute
                    logger.warning("heartbeat of %s failed: %s", key, exc)


def verify(path: str | Path) -> None:
    """Raise :class:`LockHeldError` unless this thread still holds the lock of ``path``."""
    key = lock_key(path)
    with _GUARD:
        held = _HELD.get(key)
    info = _parse(_STORE.read(key) or b"")
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
