"""Inputs and outputs of fine-tuning, search and evaluation on object storage.

Any input may be a local path or an ``s3://`` / ``gs://`` URI of a complete artifact:

- small artifacts that libraries must read from a folder (a model for ``from_pretrained``,
  a vocabulary) go through :func:`local_dir`, i.e. :func:`cellfoundry.artifacts.localize`:
  downloaded once per machine and manifest, local paths returned unchanged;
- tabular data (tokenized shards, cells) is read in place, only the objects its manifest
  lists (:func:`cellfoundry.artifacts.data_files`), with :func:`read_parquet`.

A Ray task or Tune trial reads and writes object storage with the settings of the driver
that started it (:class:`cellfoundry.storage.StorageEnv`: endpoint, region, keys, cache
folder): they
travel as an argument of the task, as :mod:`cellfoundry.storage`'s filesystems do, never in
a runtime env (which Ray records in its state). Nothing travels when every path is local.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from cellfoundry import artifacts, storage


def has_manifest(path: str | Path) -> bool:
    """Whether ``path`` (folder or URI) holds a complete artifact (its ``manifest.json``)."""
    if storage.is_remote(path):
        return storage.is_file(storage.join(path, artifacts.MANIFEST))
    return (Path(path) / artifacts.MANIFEST).is_file()


def local_dir(path: str | Path, what: str) -> Path:
    """A local folder with the contents of ``path``: itself when local, else a cached copy
    of the artifact at that URI (:func:`cellfoundry.artifacts.localize`). ``what`` names
    the config field in errors."""
    try:
        return artifacts.localize(path)
    except artifacts.ArtifactError as exc:
        raise ValueError(f"{what}: {exc}") from None


def data_file_list(path: str, pattern: str, what: str, hint: str) -> list[str]:
    """Paths or URIs of the data files of the artifact at URI ``path`` matching
    ``pattern``; a ``ValueError`` naming ``what`` and ``hint`` (what to run) if it has
    none or is not a complete artifact."""
    try:
        files = artifacts.data_files(path, pattern)
    except artifacts.ArtifactError as exc:
        raise ValueError(f"{what}: {exc}; {hint}") from None
    if not files:
        raise ValueError(f"{what}: {path} lists no {pattern} files in its manifest; {hint}")
    return files


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pl.DataFrame:
    """One Parquet file (local or an object) as a polars frame, with the same reader for
    both, so a remote input gives exactly the frame a local copy would."""
    if not storage.is_remote(path):
        return pl.read_parquet(path, columns=columns)
    fs, p = storage.resolve(path)
    with fs.open_input_file(p) as f:
        return pl.read_parquet(f, columns=columns)


def parquet_columns(path: str | Path) -> list[str]:
    """Column names of a Parquet file (local or an object), from its footer."""
    if not storage.is_remote(path):
        return list(pl.read_parquet_schema(path))
    fs, p = storage.resolve(path)
    with fs.open_input_file(p) as f:
        return list(pq.read_schema(f).names)


def parquet_rows(path: str | Path) -> int:
    """Rows of a Parquet file (local or an object), from its footer."""
    fs, p = storage.resolve(path)
    with fs.open_input_file(p) as f:
        return int(pq.ParquetFile(f).metadata.num_rows)


def upload_files(local: Path, dest: str, *, last: str | None = None) -> Mapping[str, int]:
    """Copy the files of folder ``local`` to the prefix ``dest``, the file named ``last``
    after every other (readers that trust it find the rest complete)."""
    done: dict[str, int] = {}
    files = sorted(f for f in local.rglob("*") if f.is_file())
    files.sort(key=lambda f: f.name == last)
    for file in files:
        rel = file.relative_to(local).as_posix()
        storage.write_bytes(storage.join(dest, rel), file.read_bytes())
        done[rel] = file.stat().st_size
    return done
