"""One output file per input item, written by a Ray Data UDF: deterministic on any cluster.

Each item (a file chunk or a Parquet part) names its own output file, derived from its
position in the corpus (``part-<dataset>-<first row>.parquet``), so file names and row
order do not depend on how Ray schedules tasks, and a rerun can skip finished files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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
