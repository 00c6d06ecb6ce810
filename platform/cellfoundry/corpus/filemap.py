"""One output file per input item, written by a Ray Data UDF: deterministic on any cluster.

Each item (a file chunk or a Parquet part) names its own output file, derived from its
position in the corpus (``part-<dataset>-<first row>.parquet``), so file names and row
order do not depend on how Ray schedules tasks, and a rerun can skip finished files.

Files may live on object storage (``s3://``, ``gs://``) as well as on a local or mounted
disk. A UDF then gets the driver's pyarrow filesystem as a constructor argument and paths
within it in its items (:func:`on_filesystem`), and reads and writes only through it
(:func:`read_bytes_in`, :func:`write_bytes_in`, :func:`is_file_in`,
:func:`cellfoundry.storage.write_parquet`): a task on another node never touches a path
that only exists on the driver, and writes with the driver's S3 settings. Without a
filesystem (None) paths are local, as before.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cellfoundry import storage
from cellfoundry.config.schema import ActorPoolConfig


def part_name(dataset_index: int, start: int) -> str:
    """File name of the part holding rows from ``start`` of dataset number ``dataset_index``."""
    return f"part-{dataset_index:05d}-{start:012d}.parquet"


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """Write Parquet to a temp name, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def on_filesystem(uris: Sequence[str | Path]) -> tuple[pafs.FileSystem, list[str]]:
    """``(filesystem, paths within it)`` of files that all live on one filesystem (local
    paths or URIs of one object store), for Ray Data's ``filesystem=`` and for UDFs."""
    if not uris:
        return pafs.LocalFileSystem(), []
    remote = {storage.is_remote(u) for u in uris}
    if len(remote) > 1:
        raise ValueError(f"files on several filesystems (e.g. {list(uris)[:2]}); keep them on one")
    fs = storage.filesystem(uris[0])
    return fs, [storage.resolve(u)[1] for u in uris]


def table_at(uri: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read one Parquet file (a local path or an object-store URI) on the driver."""
    fs, path = storage.resolve(uri)
    return pq.read_table(path, columns=columns, filesystem=fs)


def _local(filesystem: pafs.FileSystem | None) -> bool:
    return filesystem is None or isinstance(filesystem, pafs.LocalFileSystem)


def is_file_in(filesystem: pafs.FileSystem | None, path: str) -> bool:
    """Whether a file or object is at ``path`` within ``filesystem`` (None: local)."""
    if _local(filesystem):
        return Path(path).is_file()
    return filesystem.get_file_info(path).type == pafs.FileType.File


def read_bytes_in(filesystem: pafs.FileSystem | None, path: str) -> bytes:
    """The bytes of the file at ``path`` within ``filesystem`` (None: local)."""
    if _local(filesystem):
        return Path(path).read_bytes()
    with filesystem.open_input_stream(path) as f:
        return bytes(f.read())


def write_bytes_in(filesystem: pafs.FileSystem | None, path: str, data: bytes) -> None:
    """Write a whole file at ``path`` within ``filesystem`` (None: local); readers never
    see part of it (a temp name and a rename locally; an object appears whole)."""
    if _local(filesystem):
        storage.write_bytes(path, data)
        return
    with filesystem.open_output_stream(path) as f:
        f.write(data)


class PerItem:
    """Ray Data UDF base: ``process(item) -> dict`` per input row; results come back as JSON."""

    def process(self, item: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = list(batch)
        rows = [{k: _plain(batch[k][i]) for k in keys} for i in range(len(batch[keys[0]]))]
        return {"result": np.array([json.dumps(self.process(r)) for r in rows], dtype=object)}


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def resolve(value: Any) -> Any:
    """``ray.get`` an ObjectRef (shared read-only state of a UDF), pass anything else through."""
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def run_per_item(
    items: list[dict[str, Any]],
    udf: type[PerItem],
    *,
    pool: ActorPoolConfig | None = None,
    **constructor_kwargs: Any,
) -> list[dict[str, Any]]:
    """Run ``udf`` over ``items`` on an autoscaling actor pool of one CPU per actor; results
    in item order. The pool grows between ``pool.min_actors`` and ``pool.max_actors``
    (default 1 and no fixed cap) as the cluster does, also while the step runs."""
    import ray

    from cellfoundry.runtime import actor_pool

    if not items:
        return []
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 1000)).map_batches(
        udf,
        fn_constructor_kwargs={k: ray.put(v) for k, v in constructor_kwargs.items()},
        batch_size=1,
        compute=actor_pool(pool or ActorPoolConfig()),
        num_cpus=1,
    )
    return [json.loads(r["result"]) for r in ds.take_all()]
