"""Artifact directories: atomic writes, ``manifest.json``, and reuse of complete artifacts.

Every stage writes one directory. It is built under a temporary sibling and renamed into
place only when complete, so a crash never leaves a half-written artifact behind. The
manifest records a fingerprint of (kind, resolved config, inputs' manifest hashes); a
rerun with the same fingerprint reuses the artifact instead of redoing it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellfoundry import __version__

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """An artifact is missing, incomplete or of the wrong kind."""


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def manifest_hash(path: str | Path) -> str:
    """SHA-256 of an artifact's manifest (identifies its content for downstream stages)."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise ArtifactError(f"{path} is not a complete artifact: {MANIFEST} is missing")
    return hashlib.sha256(file.read_bytes()).hexdigest()


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
    file = Path(path) / MANIFEST
    if not file.is_file():
        hint = f" (run the stage that writes the {kind} artifact first)" if kind else ""
        raise ArtifactError(f"{path}: no {MANIFEST}, so this is not a complete artifact{hint}")
    manifest = json.loads(file.read_text())
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


@dataclass
class ArtifactWriter:
    """A directory being written; see :func:`write_artifact`."""

    path: Path
    tmp: Path
    kind: str
    config: Any
    inputs: dict[str, str]
    fingerprint: str
    counts: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        """Where to write files (a temporary folder until the artifact is committed)."""
        return self.tmp

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
    path: str | Path, kind: str, config: Any, inputs: Mapping[str, str | Path] | None = None
) -> Iterator[ArtifactWriter]:
    """Write an artifact atomically: yields a writer whose ``dir`` is a temp folder.

    On normal exit the manifest is written and the folder renamed to ``path`` (replacing
    an older artifact there); on an exception the temp folder is removed.
    """
    path = Path(path).resolve()
    inputs = {k: str(Path(v).resolve()) for k, v in (inputs or {}).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    writer = ArtifactWriter(path, tmp, kind, config, inputs, fingerprint(kind, config, inputs))
    try:
        yield writer
        (tmp / MANIFEST).write_text(json.dumps(writer.manifest(), indent=2, default=str))
        if path.exists():
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


RUN_FINGERPRINT = "cellfoundry_fingerprint"


def claim_run_dir(storage_path: str | None, name: str | None, fingerprint: str) -> Path | None:
    """Make the run folder ``storage_path/name`` (a Ray Train run or Ray Tune experiment,
    which a rerun resumes) belong to ``fingerprint``: a folder left by another config or
    other inputs (or with no fingerprint) is moved aside to
    ``<name>.superseded-<old>-<time>``, never resumed and never deleted. Returns the folder;
    None for remote storage (s3://, gs://), where run names must be kept distinct instead."""
    if not storage_path or not name or "://" in storage_path:
        return None
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
