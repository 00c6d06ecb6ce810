"""Artifact directories: atomic writes, ``manifest.json``, and reuse of complete artifacts.

Every stage writes one directory. It is built under a temporary sibling and renamed into
place only when complete, so a crash never leaves a half-written artifact behind. The
manifest records a fingerprint of (kind, resolved config, inputs' manifest hashes); a
rerun with the same fingerprint reuses the artifact instead of redoing it.

Outputs never destroy what cellfoundry did not write (:func:`check_output`), and each
output has one writer at a time (:func:`claim_output`, a lock file with owner and
heartbeat, see :mod:`cellfoundry.locks`); temp folders of crashed runs are removed by
the next run that claims the output.

Object storage (``s3://bucket/prefix``; see :mod:`cellfoundry.storage`) has no rename, so
there an artifact commits differently. The writer puts its data under a run-unique
sub-prefix, ``<prefix>/cf-run-<12 hex>/``, and writes ``<prefix>/manifest.json`` last: that
one PUT is the commit. The manifest names its sub-prefix (``"data"``) and lists every data
object with its size (``"data_files"``); readers trust only the manifest
(:func:`data_uri`, :func:`data_files`). Why a sub-prefix rather than the prefix itself:

- a failed or killed rerun leaves the previous artifact whole and readable, as the local
  rename does (its manifest still names its own sub-prefix);
- a run's objects can never mix with another run's, even with a writer that lost its lock
  and still writes;
- what a crashed run left is recognisable without guessing: a ``cf-run-*`` sub-prefix that
  the manifest does not name. The next run that holds the lock deletes those
  (:func:`remove_orphans`), and nothing else: other objects under the prefix without a
  manifest are someone's own, and the output is refused as a local folder would be.

After the commit the previous artifact's sub-prefix is deleted. On S3 each output has one
writer through a lock object with conditional writes (:class:`cellfoundry.locks.S3LockStore`),
and claiming a remote output first checks that its bucket answers
(:func:`cellfoundry.storage.check_reachable`), so a wrong bucket, credentials or endpoint
fails before any work.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from cellfoundry import __version__, locks, storage

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """An artifact is missing, incomplete or of the wrong kind."""


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


RUN_PREFIX = "cf-run-"
"""Sub-prefix of one run's data in an object-store artifact: ``cf-run-<12 hex>``."""
_RUN_RE = re.compile(r"^cf-run-[0-9a-f]{12}$")


def _manifest_bytes(path: str | Path) -> bytes | None:
    """The bytes of ``path``'s manifest, or None if it has none."""
    if not storage.is_remote(path):
        file = Path(path) / MANIFEST
        return file.read_bytes() if file.is_file() else None
    try:
        return storage.read_bytes(storage.join(path, MANIFEST))
    except FileNotFoundError:
        return None


def manifest_hash(path: str | Path) -> str:
    """SHA-256 of an artifact's manifest (identifies its content for downstream stages)."""
    raw = _manifest_bytes(path)
    if raw is None:
        raise ArtifactError(f"{path} is not a complete artifact: {MANIFEST} is missing")
    return hashlib.sha256(raw).hexdigest()


def fingerprint(kind: str, config: Any, inputs: Mapping[str, str | Path]) -> str:
    """Deterministic hash of what determines an artifact's content."""
    payload = {
        "kind": kind,
        "config": config,
        "inputs": {name: manifest_hash(p) for name, p in sorted(inputs.items())},
        "schema_version": SCHEMA_VERSION,
    }
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()[:32]


def read_manifest(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Read ``manifest.json``; with ``kind``, check the artifact is of that kind."""
    raw = _manifest_bytes(path)
    if raw is None:
        hint = f" (run the stage that writes the {kind} artifact first)" if kind else ""
        raise ArtifactError(f"{path}: no {MANIFEST}, so this is not a complete artifact{hint}")
    manifest = json.loads(raw)
    if kind is not None and manifest.get("kind") != kind:
        raise ArtifactError(
            f"{path}: is a {manifest.get('kind')!r} artifact, expected {kind!r}; check the path"
        )
    return manifest


def reusable(path: str | Path, kind: str, fp: str) -> dict[str, Any] | None:
    """The manifest of a complete artifact at ``path`` with fingerprint ``fp``, else None."""
    try:
        manifest = read_manifest(path, kind)
    except (ArtifactError, json.JSONDecodeError):
        return None
    return manifest if manifest.get("fingerprint") == fp else None


def data_uri(path: str | Path) -> str:
    """Where a complete artifact's data lives: ``path`` itself locally, the sub-prefix
    its manifest names on object storage (:class:`ArtifactError` without a manifest)."""
    if not storage.is_remote(path):
        read_manifest(path)
        return str(path)
    manifest = read_manifest(path)
    if "data" not in manifest:
        raise ArtifactError(f"{path}: its {MANIFEST} names no data prefix; write it again")
    return storage.join(path, manifest["data"])


def data_files(path: str | Path, pattern: str = "*") -> list[str]:
    """The data files of a complete artifact whose path relative to :func:`data_uri`
    matches ``pattern`` (fnmatch), as paths or URIs in name order. On object storage only
    the objects its manifest lists, so nothing a crashed or concurrent run left is read."""
    import fnmatch

    root = data_uri(path)
    if storage.is_remote(path):
        names = list(read_manifest(path).get("data_files", {}))
    else:
        names = [n for n in storage.list_files(root) if n != MANIFEST]
    return [storage.join(root, n) for n in sorted(names) if fnmatch.fnmatch(n, pattern)]


CACHE_ENV = storage.CACHE_ENV


def cache_root() -> Path:
    """Where remote artifacts are cached on this machine (:func:`localize`):
    ``$CELLFOUNDRY_CACHE_DIR/artifacts``, else ``~/.cache/cellfoundry/artifacts``."""
    base = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "cellfoundry")
    return Path(base) / "artifacts"


def localize(path: str | Path) -> Path:
    """A local folder holding the complete artifact at ``path``: ``path`` itself when it is
    local; for an object-store URI, a copy of its manifest and the data files it lists in
    :func:`cache_root`, downloaded once per machine and manifest (a new artifact at the same
    URI has a new manifest, so a new copy). For what must be a local folder to be read (a
    model for ``from_pretrained``, a vocabulary); large tabular data is read in place
    (:func:`data_files`). Sizes are checked against the manifest; the copy appears whole
    (temp folder, then rename), so concurrent callers on one node never see half of it."""
    if not storage.is_remote(path):
        return Path(path)
    uri = storage.normalize(path)
    raw = _manifest_bytes(uri)
    if raw is None:
        raise ArtifactError(
            f"{uri}: no {MANIFEST} there, so no complete artifact (a run that did not finish "
            "leaves none); check the URI, or rerun the stage that writes it"
        )
    key = hashlib.sha256(uri.encode() + b"\0" + raw).hexdigest()[:24]
    dest = cache_root() / key
    if (dest / MANIFEST).is_file():
        return dest
    manifest = json.loads(raw)
    root = data_uri(uri)
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = dest.with_name(f".{key}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        for rel, size in manifest.get("data_files", {}).items():
            target = tmp / rel
            storage.download_file(storage.join(root, rel), target)
            if target.stat().st_size != int(size):
                raise ArtifactError(
                    f"{uri}: {rel} is {target.stat().st_size} bytes, its manifest says {size}; "
                    "the artifact was changed after it was written: rerun the stage that writes it"
                )
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / MANIFEST).write_bytes(raw)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process on this node finished first: use its copy
            if not (dest / MANIFEST).is_file():
                raise
        logger.info("cached %s in %s", uri, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


_OVERWRITE: ContextVar[bool] = ContextVar("cellfoundry_overwrite", default=False)
P = ParamSpec("P")
R = TypeVar("R")


@contextlib.contextmanager
def allow_overwrite(allowed: bool = True) -> Iterator[None]:
    """Within the block, an artifact of another kind may be replaced (``--overwrite``).

    Files and folders that are not artifacts are never replaced, allowed or not.
    """
    reset = _OVERWRITE.set(allowed)
    try:
        yield
    finally:
        _OVERWRITE.reset(reset)


def check_output(path: str | Path, kind: str, *, overwrite: bool | None = None) -> str | None:
    """Raise :class:`ArtifactError` unless a ``kind`` artifact may be written at ``path``;
    returns the kind of the artifact that would be replaced (None: nothing would be).

    Allowed: nothing there, an empty folder, or an artifact of the same kind (replaced).
    An artifact of another kind only with ``overwrite`` (default: :func:`allow_overwrite`).
    Anything else, a file or a folder without ``manifest.json`` (someone's own files), is
    never replaced.
    """
    if storage.is_remote(path):
        return _check_remote_output(storage.normalize(path), kind, overwrite)
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_dir() and not path.is_symlink():
        if not any(path.iterdir()):
            return None
        if (path / MANIFEST).is_file():
            try:
                found = json.loads((path / MANIFEST).read_text()).get("kind")
            except (ValueError, AttributeError):
                found = None
            if found == kind or (_OVERWRITE.get() if overwrite is None else overwrite):
                return str(found)
            raise ArtifactError(
                f"{path} holds a {found!r} artifact, not a {kind!r} one; choose another output "
                "path, or pass --overwrite to replace it"
            )
    what = "a file" if path.is_file() else "a folder that is not a cellfoundry artifact"
    raise ArtifactError(
        f"{path} exists and is {what} (no {MANIFEST}); cellfoundry never replaces files it "
        "did not write: choose another output path, or an empty or new folder"
    )


def _check_remote_output(uri: str, kind: str, overwrite: bool | None) -> str | None:
    """:func:`check_output` for a prefix on object storage."""
    if storage.is_file(uri):
        raise ArtifactError(
            f"{uri} is an object (a file); cellfoundry never replaces files it did not "
            "write: choose another output prefix"
        )
    children = storage.list_children(uri)
    if MANIFEST in children:
        try:
            found = json.loads(storage.read_bytes(storage.join(uri, MANIFEST))).get("kind")
        except (ValueError, AttributeError):
            found = None
        if found == kind or (_OVERWRITE.get() if overwrite is None else overwrite):
            return str(found)
        raise ArtifactError(
            f"{uri} holds a {found!r} artifact, not a {kind!r} one; choose another output "
            "path, or pass --overwrite to replace it"
        )
    foreign = sorted(n for n, is_dir in children.items() if not (is_dir and _RUN_RE.match(n)))
    if not foreign:
        return None
    raise ArtifactError(
        f"{uri} holds objects that are not a cellfoundry artifact (no {MANIFEST}; e.g. "
        f"{foreign[:3]}); cellfoundry never replaces files it did not write: choose another "
        "output prefix, or an empty or new one"
    )


def remove_orphans(uri: str) -> list[str]:
    """Delete the ``cf-run-*`` sub-prefixes under ``uri`` that its manifest does not name:
    what crashed or failed runs left. Only call it while holding the output's lock
    (:func:`claim_output`). Returns the sub-prefixes removed."""
    keep = None
    raw = _manifest_bytes(uri)
    if raw is not None:
        with contextlib.suppress(ValueError, AttributeError):
            keep = json.loads(raw).get("data")
    removed = sorted(
        n for n, is_dir in storage.list_children(uri).items()
        if is_dir and _RUN_RE.match(n) and n != keep
    )  # fmt: skip
    for name in removed:
        storage.delete_prefix(storage.join(uri, name))
    if removed:
        logger.warning("%s: removed what crashed runs left: %s", uri, removed)
    return removed


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove ``.<name>.tmp-*`` and ``.<name>.old-*`` beside ``path``: what crashed runs
    left. Only call it while holding the output's lock (:func:`claim_output`)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    name = glob.escape(path.name)
    removed = sorted(path.parent.glob(f".{name}.tmp-*")) + sorted(
        path.parent.glob(f".{name}.old-*")
    )
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if removed:
        logger.warning("%s: removed what crashed runs left: %s", path, [p.name for p in removed])
    return removed


@dataclass(frozen=True)
class OutputClaim:
    """This run's hold on an output path; picklable, so a Ray task of the same run can
    join it (``claim_output(path, join=claim)``)."""

    path: str
    lease: locks.Lease
    overwrite: bool


@contextlib.contextmanager
def claim_output(
    path: str | Path,
    kind: str | None = None,
    *,
    overwrite: bool | None = None,
    join: OutputClaim | None = None,
    object_storage: bool = False,
) -> Iterator[OutputClaim]:
    """Be the one writer of ``path`` for the block: take its lock (fails fast with
    :class:`ArtifactError` naming the other run if one holds it), remove temp folders of
    crashed runs and, with ``kind``, :func:`check_output`. Reentrant on this thread; with
    ``join`` (the claim of the run that started this process) the lock is shared.

    An object-store URI is accepted only from a stage that writes through
    :mod:`cellfoundry.storage` (``object_storage=True``); others fail here, before any
    work, instead of writing to a local folder named ``s3:``. On object storage, first
    checks that the bucket answers (:func:`cellfoundry.storage.check_reachable`); orphans
    of crashed runs are removed (:func:`remove_orphans`)."""
    remote = storage.is_remote(path)
    _refuse_unwired(path, kind, object_storage)
    path = storage.normalize(path) if remote else Path(path).resolve()
    if remote and not locks.holds(path):
        try:
            storage.check_reachable(path)
        except storage.StorageError as exc:
            raise ArtifactError(str(exc)) from None
    owned_before = locks.holds(path)
    if overwrite is None:
        overwrite = join.overwrite if join is not None else _OVERWRITE.get()
    stack = contextlib.ExitStack()
    try:
        lease = stack.enter_context(locks.hold(path, join=join.lease if join else None))
    except locks.LockHeldError as exc:
        raise ArtifactError(str(exc)) from None
    with stack:
        if not owned_before and join is None:
            if remote:
                remove_orphans(str(path))
            else:
                remove_stale_temps(path)
        found = check_output(path, kind, overwrite=overwrite) if kind is not None else None
        if found not in (None, kind):
            logger.warning(
                "%s: a %r artifact is there; it will be replaced (overwrite)", path, found
            )
        reset = _OVERWRITE.set(overwrite)
        try:
            yield OutputClaim(str(path), lease, overwrite)
        finally:
            _OVERWRITE.reset(reset)


def _refuse_unwired(path: str | Path, kind: str | None, object_storage: bool) -> None:
    """Refuse an object-store output of a stage that writes local paths only, and a URI
    that a local path mangled (``Path("s3://b/k")`` is ``s3:/b/k``)."""
    if storage.is_remote(path):
        unwired = not object_storage
    else:
        unwired = any(p in ("s3:", "gs:", "gcs:") for p in Path(path).parts)
    if unwired:
        what = f"the {kind} stage" if kind else "this stage"
        raise ArtifactError(
            f"{path}: {what} cannot write to object storage yet (see docs/scaling.md "
            "for the stages that can); write it to a local or mounted path"
        )


def holds_output(
    kind: str | None,
    path_of: Callable[..., str | Path | None],
    *,
    object_storage: bool = False,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a stage's run function so that it runs holding
    ``claim_output(path_of(*args, **kwargs), kind)``: a second run into the same output
    fails fast, before any work. ``path_of`` returning None claims nothing.
    ``object_storage``: the stage writes through :mod:`cellfoundry.storage`, so its output
    may be an ``s3://`` prefix."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            path = path_of(*args, **kwargs)
            if path is None:
                return fn(*args, **kwargs)
            with claim_output(path, kind, object_storage=object_storage):
                return fn(*args, **kwargs)

        return run

    return decorate


@dataclass
class ArtifactWriter:
    """A directory being written; see :func:`write_artifact`."""

    path: Path | str
    tmp: Path | str  # local: a temp folder; object storage: the run's data sub-prefix URI
    kind: str
    config: Any
    inputs: dict[str, str]
    fingerprint: str
    counts: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    _staging: Path | None = field(default=None, repr=False)

    @property
    def remote(self) -> bool:
        """Whether the artifact goes to object storage (write through :attr:`uri`)."""
        return storage.is_remote(self.tmp)

    @property
    def dir(self) -> Path:
        """A local folder to write files into (a temp folder until the artifact commits).

        On object storage this is a staging folder on this machine, uploaded into the run's
        data sub-prefix just before the commit: fine for what the driver writes (a model,
        a report). What Ray tasks on other nodes write goes through :attr:`uri` instead."""
        if self.remote:
            if self._staging is None:
                self._staging = Path(tempfile.mkdtemp(prefix="cf-stage-"))
            return self._staging
        return Path(self.tmp)

    @property
    def uri(self) -> str:
        """Where to write files, as a path or URI for :mod:`cellfoundry.storage` (a temp
        folder, or the run's data sub-prefix on object storage)."""
        return str(self.tmp)

    def manifest(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": self.kind,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "inputs": {
                name: {"path": str(p), "manifest_sha256": manifest_hash(p)}
                for name, p in sorted(self.inputs.items())
            },
            "counts": self.counts,
            **self.extra,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "code_version": __version__,
        }


@contextlib.contextmanager
def write_artifact(
    path: str | Path,
    kind: str,
    config: Any,
    inputs: Mapping[str, str | Path] | None = None,
    *,
    overwrite: bool | None = None,
) -> Iterator[ArtifactWriter]:
    """Write an artifact atomically: yields a writer whose ``dir`` is a temp folder.

    Holds ``path`` (:func:`claim_output`) throughout: what is at ``path`` must be
    replaceable by a ``kind`` artifact (:func:`check_output`; ``overwrite`` for another
    kind), checked before and again at commit. On normal exit the manifest is written and
    the folder renamed to ``path``, replacing the artifact there; on an exception the temp
    folder is removed and ``path`` left as it was.
    """
    inputs = {k: storage.normalize(v) for k, v in (inputs or {}).items()}
    if storage.is_remote(path):
        with _write_remote(storage.normalize(path), kind, config, inputs, overwrite) as w:
            yield w
        return
    path = Path(path).resolve()
    with claim_output(path, kind, overwrite=overwrite) as claim:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        fp = fingerprint(kind, config, inputs)
        writer = ArtifactWriter(path, tmp, kind, config, inputs, fp)
        try:
            yield writer
            (tmp / MANIFEST).write_text(json.dumps(writer.manifest(), indent=2, default=str))
            found = check_output(path, kind, overwrite=claim.overwrite)  # changed meanwhile?
            try:
                locks.verify(path)
            except locks.LockHeldError as exc:
                raise ArtifactError(str(exc)) from None
            if path.exists():
                if found is not None:
                    logger.info("replacing the %r artifact at %s", found, path)
                old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
            logger.info("wrote %s artifact %s", kind, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _write_remote(
    uri: str, kind: str, config: Any, inputs: dict[str, str], overwrite: bool | None
) -> Iterator[ArtifactWriter]:
    """:func:`write_artifact` on object storage: data under a new ``cf-run-*`` sub-prefix,
    then the manifest (the commit), then the previous artifact's data is deleted."""
    with claim_output(uri, kind, overwrite=overwrite, object_storage=True) as claim:
        run = f"{RUN_PREFIX}{uuid.uuid4().hex[:12]}"
        data = storage.join(uri, run)
        writer = ArtifactWriter(uri, data, kind, config, inputs, fingerprint(kind, config, inputs))
        committed = False
        try:
            yield writer
            if writer._staging is not None:
                storage.upload_dir(writer._staging, data)
            manifest = {**writer.manifest(), "data": run, "data_files": storage.list_files(data)}
            found = check_output(uri, kind, overwrite=claim.overwrite)  # changed meanwhile?
            try:
                locks.verify(uri)
            except locks.LockHeldError as exc:
                raise ArtifactError(str(exc)) from None
            previous = None
            if found is not None:
                with contextlib.suppress(ValueError, AttributeError):
                    previous = json.loads(_manifest_bytes(uri) or b"{}").get("data")
                logger.info("replacing the %r artifact at %s", found, uri)
            storage.write_text(
                storage.join(uri, MANIFEST), json.dumps(manifest, indent=2, default=str)
            )
            committed = True
            if previous and previous != run and _RUN_RE.match(str(previous)):
                storage.delete_prefix(storage.join(uri, previous))
            logger.info("wrote %s artifact %s", kind, uri)
        finally:
            if writer._staging is not None:
                shutil.rmtree(writer._staging, ignore_errors=True)
            if not committed:
                try:
                    storage.delete_prefix(data)
                except (OSError, ValueError) as exc:  # the next run removes it (remove_orphans)
                    logger.warning("%s: could not remove this run's data %s: %s", uri, data, exc)


RUN_FINGERPRINT = "cellfoundry_fingerprint"


def claim_run_dir(
    storage_path: str | None, name: str | None, fingerprint: str
) -> Path | str | None:
    """Make the run folder ``storage_path/name`` (a Ray Train run or Ray Tune experiment,
    which a rerun resumes) belong to ``fingerprint``, recorded in its marker file
    ``cellfoundry_fingerprint``. Returns the folder (a URI on object storage); None without
    a storage path or name.

    Locally, a folder left by another config or other inputs (or with no marker) is moved
    aside to ``<name>.superseded-<old>-<time>``, never resumed and never deleted. On object
    storage (s3://, gs://) such a run is refused with :class:`ArtifactError` instead.
    """
    if not storage_path or not name:
        return None
    if storage.is_remote(storage_path):
        return _claim_remote_run_dir(storage.join(storage_path, name), fingerprint)
    run_dir = Path(storage_path) / name
    marker = run_dir / RUN_FINGERPRINT
    if run_dir.is_dir() and (not marker.is_file() or marker.read_text().strip() != fingerprint):
        old = marker.read_text().strip()[:8] if marker.is_file() else "unknown"
        aside = run_dir.with_name(f"{run_dir.name}.superseded-{old}-{int(time.time())}")
        logger.warning(
            "%s holds a run of another config or inputs: moved it to %s; starting afresh",
            run_dir, aside,
        )  # fmt: skip
        run_dir.rename(aside)
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint + "\n")
    return run_dir


def _claim_remote_run_dir(run_dir: str, fingerprint: str) -> str:
    """:func:`claim_run_dir` on object storage.

    A foreign run (another fingerprint, or objects without a marker) is refused rather than
    worked around. Moving it aside would mean copying then deleting every checkpoint object
    (no rename on object storage: slow, costly and not atomic, so a crash part-way leaves
    two half runs). A run name silently suffixed with the fingerprint would avoid that, but
    the checkpoints would then sit under a name the user never chose (and Ray Train's
    ``Result.from_path``, dashboards and MLflow would show it), and abandoned runs would
    pile up unseen in the bucket. Refusing keeps the run name the user's handle; the
    message gives both fixes: a new ``run.name``, or deleting the old run.
    """
    try:
        storage.check_reachable(run_dir)
    except storage.StorageError as exc:
        raise ArtifactError(str(exc)) from None
    marker = storage.join(run_dir, RUN_FINGERPRINT)
    try:
        found: str | None = storage.read_text(marker).strip()
    except FileNotFoundError:
        found = None
    if found == fingerprint:
        return run_dir
    if found is not None or storage.list_children(run_dir):
        what = f"fingerprint {found[:8]}" if found else f"no {RUN_FINGERPRINT} marker"
        raise ArtifactError(
            f"{run_dir} holds a Ray run of another config or inputs ({what}; this run is "
            f"{fingerprint[:8]}), which Ray would resume from; object storage cannot move it "
            f"aside: set run.name to a new name (e.g. {storage.name(run_dir)}-{fingerprint[:8]}), "
            "or delete that prefix if its checkpoints are no longer needed"
        )
    storage.write_text(marker, fingerprint + "\n")
    return run_dir
