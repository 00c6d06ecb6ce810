"""Helpers shared by the embedding and perturbation jobs: inputs, provenance, the Ray Data
actor that holds an :class:`~cellfoundry.infer.embed.Embedder`.

Inputs may be local folders or artifacts on object storage (``s3://bucket/...``): tokenized
shards are read in place through their filesystem (only those the manifest lists), a model
is identified by its manifest without downloading it, and loaded on each node from its
local cache copy (:func:`cellfoundry.artifacts.localize`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cellfoundry import __version__, artifacts, storage
from cellfoundry.config.infer import InferComputeConfig

logger = logging.getLogger(__name__)

#: Columns of a tokenized shard that are not cell metadata.
TOKEN_COLUMNS = ("input_ids", "length")
#: compute fields that say where a job runs, not what it computes (kept out of fingerprints).
POOL_FIELDS = ("concurrency", "min_actors", "max_actors", "wait_for_nodes")


def shard_files(tokenized: str | Path) -> list[str]:
    """The ``part-*.parquet`` shards of a tokenized artifact, in name order, as paths or
    URIs (on object storage only those its manifest lists), checked to hold ``cell_id``
    and ``input_ids``. Read them with :func:`read_table` or through :func:`shard_source`."""
    if storage.is_remote(tokenized):
        try:
            files = artifacts.data_files(tokenized, "part-*.parquet")
        except artifacts.ArtifactError as exc:
            raise ValueError(
                f"tokenized: {exc}; run `cellfoundry tokenize` or `cellfoundry corpus` first"
            ) from None
        if not files:
            raise ValueError(
                f"tokenized: {tokenized} holds no part-*.parquet shards; is it a tokenized "
                "artifact?"
            )
    else:
        from cellfoundry.train.data import shard_files as tokenized_shards

        files = [str(f) for f in tokenized_shards(tokenized, field="tokenized")]
    fs, first = storage.resolve(files[0])
    schema = pq.read_schema(first, filesystem=fs)
    for column in ("cell_id", "input_ids"):
        if column not in schema.names:
            raise ValueError(
                f"tokenized: {files[0]} has no {column!r} column; is it a tokenized artifact?"
            )
    return files


def shard_source(files: list[str]) -> tuple[pafs.FileSystem, list[str]]:
    """``(filesystem, paths within it)`` of :func:`shard_files`' output, for
    ``ray.data.read_parquet(paths, filesystem=fs)`` (Ray's own S3 filesystem would ignore
    ``AWS_ENDPOINT_URL``)."""
    fs = storage.filesystem(files[0])
    return fs, [storage.resolve(f)[1] for f in files]


def read_table(path: str, **kwargs: Any) -> pa.Table:
    """One Parquet file, local or on object storage (``pq.read_table`` keywords)."""
    fs, p = storage.resolve(path)
    return pq.read_table(p, filesystem=fs, **kwargs)


def model_signature(model: str | Path) -> dict[str, str]:
    """What identifies a model directory: its manifest hash when it is an artifact, else a
    hash of config.json and the weights' size and mtime. A model on object storage must be
    an artifact; it is identified by its manifest alone (nothing is downloaded), which is
    byte for byte the manifest of its local cache copy, so both give the same signature."""
    if storage.is_remote(model):
        try:
            manifest = artifacts.read_manifest(model)
        except artifacts.ArtifactError as exc:
            raise ValueError(
                f"model: {exc}; point it at a model artifact (run `cellfoundry pretrain` with "
                "output_dir there first)"
            ) from None
        if "config.json" not in manifest.get("data_files", {}):
            raise ValueError(
                f"model: {model} is a {manifest.get('kind')!r} artifact with no config.json; "
                "point it at a model artifact"
            )
        return {"model_manifest_sha256": artifacts.manifest_hash(model)}
    directory = Path(model)
    if not (directory / "config.json").is_file():
        raise ValueError(
            f"model: {directory} has no config.json; point it at a model directory (run "
            "`cellfoundry pretrain` first)"
        )
    manifest_file = directory / "manifest.json"
    if manifest_file.is_file():
        return {"model_manifest_sha256": hashlib.sha256(manifest_file.read_bytes()).hexdigest()}
    h = hashlib.sha256((directory / "config.json").read_bytes())
    for w in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("pytorch_model*.bin")):
        st = w.stat()
        h.update(f"{w.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return {"model_files_sha256": h.hexdigest()}


def inputs_with_manifest(**paths: str | Path) -> dict[str, str]:
    """The inputs that are complete artifacts (have a manifest.json, locally or on object
    storage), for write_artifact."""
    return {
        k: str(p) for k, p in paths.items() if storage.is_file(storage.join(p, artifacts.MANIFEST))
    }


def provenance(model: str, tokenized: str, **extra: Any) -> dict[str, Any]:
    """The ``.uns["cellfoundry"]`` / manifest provenance of an output (no None values)."""
    sig = model_signature(model)
    out = {
        "model_dir": str(model),
        "model_manifest_sha256": sig.get("model_manifest_sha256", ""),
        "input_dir": str(tokenized),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": __version__,
    }
    out.update({k: ("" if v is None else v) for k, v in extra.items()})
    return out


def cells_of(batch: pa.Table) -> list[np.ndarray]:
    """The ``input_ids`` of a batch as one int64 array per cell."""
    column = batch["input_ids"].combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False).astype(np.int64)
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(column))]


def map_batches_kwargs(compute: InferComputeConfig) -> dict[str, Any]:
    """Ray Data ``map_batches`` arguments: the actor pool (autoscaling between
    ``compute.min_actors`` and ``compute.max_actors``, or fixed at ``compute.concurrency``)
    and its resources."""
    from cellfoundry.runtime import actor_pool

    return {
        "batch_size": compute.batch_size,
        "compute": actor_pool(compute.pool),
        "num_gpus": compute.num_gpus,
        "num_cpus": compute.num_cpus,
    }


def check_placeable(
    compute: InferComputeConfig,
    nodes: list[dict[str, float]] | None = None,
    *,
    reads: bool = False,
    stage: str = "the job",
) -> None:
    """Fail at once, with asked and available numbers, when the actor pool of ``compute``
    cannot be placed on the cluster, instead of Ray Data waiting without a word for an actor
    that never starts: no node has ``num_cpus`` CPUs and ``num_gpus`` GPUs for one actor, the
    nodes cannot hold the pool's ``min_actors``, or (``reads``: the job reads Parquet with Ray
    Data tasks) the actors would leave no CPU for the read tasks that feed them.

    ``nodes``: each alive node's resources (``{"CPU": 8.0, "GPU": 1.0, ...}``); None: asked
    from Ray (``ray.nodes()``). With ``compute.wait_for_nodes`` (an autoscaling cluster whose
    nodes join later) a warning instead of the error."""
    import warnings

    if nodes is None:
        import ray

        nodes = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    cpus = [float(n.get("CPU", 0.0)) for n in nodes]
    gpus = [float(n.get("GPU", 0.0)) for n in nodes]
    want_cpu, want_gpu = float(compute.num_cpus), float(compute.num_gpus)
    min_actors = compute.pool.min_actors
    have = (
        f"the cluster has {len(nodes)} node(s), {sum(cpus):g} CPUs and {sum(gpus):g} GPUs in "
        f"all, at most {max(cpus, default=0):g} CPUs and {max(gpus, default=0):g} GPUs on one node"
    )
    fits = [
        min(c // want_cpu, g // want_gpu if want_gpu > 0 else float("inf"))
        for c, g in zip(cpus, gpus, strict=True)
    ]
    problem = None
    if not any(f >= 1 for f in fits):
        problem = (
            f"{stage}: one actor asks for {want_cpu:g} CPUs and {want_gpu:g} GPUs "
            f"(compute.num_cpus, compute.num_gpus) and no node has them; {have}. Lower "
            "compute.num_cpus / compute.num_gpus, or start the cluster with such a node"
        )
    elif sum(fits) < min_actors:
        problem = (
            f"{stage}: the actor pool needs at least {min_actors} actors of {want_cpu:g} CPUs "
            f"and {want_gpu:g} GPUs (compute.min_actors or compute.concurrency), and the nodes "
            f"hold {int(sum(fits))}; {have}. Lower compute.min_actors / compute.concurrency "
            "or the resources per actor"
        )
    elif reads and sum(cpus) - min_actors * want_cpu < 1:
        problem = (
            f"{stage}: {min_actors} actor(s) of {want_cpu:g} CPUs would take all "
            f"{sum(cpus):g} CPUs of the cluster, and Ray Data's read tasks that feed them need "
            "1 CPU each, so nothing would run. Lower compute.num_cpus (or compute.min_actors), "
            "or give the cluster more CPUs (ray.num_cpus for a local one)"
        )
    if problem is None:
        return
    if compute.wait_for_nodes:
        warnings.warn(
            f"{problem} (compute.wait_for_nodes: waiting for the autoscaler)",
            UserWarning,
            stacklevel=2,
        )
        return
    raise ValueError(problem)


def embedder_kwargs(compute: InferComputeConfig, layer: int, pooling: str) -> dict[str, Any]:
    """Keyword arguments of :class:`~cellfoundry.infer.embed.Embedder` from a config."""
    return {
        "layer": layer,
        "pooling": pooling,
        "device": compute.device,
        "dtype": compute.dtype,
        "batch_size": compute.model_batch_size,
        "max_tokens": compute.max_tokens,
        "compile": compute.compile,
    }
