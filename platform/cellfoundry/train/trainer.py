"""``run_pretrain``: check the config, run ``TorchTrainer``, write the ``model`` artifact.

``output_dir`` and ``run.storage_path`` may be object-store URIs (``s3://bucket/...``):
Ray Train then keeps its checkpoints there through :func:`cellfoundry.storage.filesystem`
(pyarrow's ``S3FileSystem()`` alone ignores ``AWS_ENDPOINT_URL``), and the model artifact
commits as :mod:`cellfoundry.artifacts` describes. No filesystem is shared: workers read
the tokenized shards from storage, the driver takes the model and metrics.csv from the
last checkpoint (which rank 0 wrote, wherever it ran) and draws the loss curve itself.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellfoundry import artifacts, progress, runtime, storage
from cellfoundry.config.loader import config_to_dict
from cellfoundry.config.train import PretrainJobConfig
from cellfoundry.integrity import KEY_ENV
from cellfoundry.model import count_parameters
from cellfoundry.train.checkpoint import DS_DIR, HF_DIR, STATE_FILE
from cellfoundry.train.loop import train_loop_per_worker
from cellfoundry.train.metrics import CSV_FILE, PNG_FILE, plot_loss_curve
from cellfoundry.train.setup import RunSpec, prepare_run
from cellfoundry.train.storage_env import StorageEnv, WithStorageEnv
from cellfoundry.train.zero import resolve_settings

logger = logging.getLogger(__name__)

#: Driver environment variables handed on to the training workers.
FORWARDED_ENV_PREFIXES = ("CELLFOUNDRY_", "MLFLOW_")
#: Never forwarded: Ray records the workers' runtime env in its run state (dashboard, state
#: API). Workers read the checkpoint key from their own environment or key file.
SECRET_ENV = (KEY_ENV,)


@dataclass
class PretrainResult:
    """What a pretraining run produced (``final_loss`` as bionemo's ``main()`` returns)."""

    final_loss: float
    """Masked-gene loss of the last metric window (mean over ranks)."""
    final_accuracy: float
    final_val_loss: float | None
    """Validation loss at the last step (None without ``data.validation``)."""
    steps: int
    """Optimizer steps done so far."""
    total_steps: int
    completed: bool
    """False when the run stopped early (``stop_at_step``); rerun to continue."""
    model_dir: Path | str | None
    """The ``model`` artifact, a folder or a URI (None until the run completes)."""
    checkpoint_path: str | None
    """The latest Ray Train checkpoint of the run."""
    log_dir: Path
    metrics_csv: Path
    loss_curve: Path | None
    reused: bool = False
    """True when a complete artifact with the same config and inputs was reused."""

    def paths(self) -> dict[str, str | None]:
        """Where things went, for the CLI and job output."""
        return {
            "model": str(self.model_dir) if self.model_dir else None,
            "checkpoint": self.checkpoint_path,
            "metrics_csv": str(self.metrics_csv),
            "loss_curve": str(self.loss_curve) if self.loss_curve else None,
            "log_dir": str(self.log_dir),
        }


def _fingerprint_config(cfg: PretrainJobConfig) -> dict[str, Any]:
    """The config that determines the model (not how Ray is reached, not stop_at_step)."""
    data = config_to_dict(cfg)
    for key in ("ray", "stop_at_step"):
        data.pop(key)
    return data


def _inputs(cfg: PretrainJobConfig, spec: RunSpec) -> dict[str, str]:
    """Input artifacts (those with a manifest, local or on object storage) for the model
    artifact's manifest."""
    vocabulary = cfg.data.token_dictionary
    if vocabulary is None and storage.is_remote(cfg.data.tokenized):  # the one beside it
        vocabulary = storage.join(storage.parent(cfg.data.tokenized), "vocabulary")
    elif vocabulary is None or not storage.is_remote(vocabulary):  # not the local cache's copy
        vocabulary = str(spec.token_dictionary_path.parent)
    candidates = {"tokenized": cfg.data.tokenized, "vocabulary": vocabulary}
    if cfg.data.validation.tokenized is not None:
        candidates["validation"] = cfg.data.validation.tokenized
    return {
        k: p for k, p in candidates.items() if storage.is_file(storage.join(p, artifacts.MANIFEST))
    }


def _output(cfg: PretrainJobConfig) -> Path | str:
    """``output_dir`` as a folder, or as the URI it is."""
    return cfg.output_dir if storage.is_remote(cfg.output_dir) else Path(cfg.output_dir)


def _checkpoint_uri(cfg: PretrainJobConfig, path: str) -> str:
    """A Ray checkpoint's path as the user can use it: Ray reports paths within the storage
    filesystem, which for object storage lack the scheme (``bucket/key``)."""
    if storage.is_remote(cfg.run.storage_path or "") and "://" not in path:
        return f"{storage.split(cfg.run.storage_path or '')[0]}://{path}"
    return path


def _result(cfg: PretrainJobConfig, metrics: dict[str, Any], **kwargs: Any) -> PretrainResult:
    log_dir = Path(cfg.tracking.log_dir or "")
    png = log_dir / PNG_FILE
    return PretrainResult(
        final_loss=float(metrics.get("loss", float("nan"))),
        final_accuracy=float(metrics.get("accuracy", float("nan"))),
        final_val_loss=float(metrics["val_loss"]) if "val_loss" in metrics else None,
        steps=int(metrics.get("step", 0)),
        total_steps=int(metrics.get("total_steps", 0)),
        log_dir=log_dir,
        metrics_csv=log_dir / CSV_FILE,
        loss_curve=png if png.is_file() else None,
        **kwargs,
    )


@artifacts.holds_output("model", lambda cfg: cfg.output_dir, object_storage=True)
def run_pretrain(cfg: PretrainJobConfig) -> PretrainResult:
    """Pretrain per ``cfg`` on Ray Train (starting a local Ray if none is running) and write
    the ``model`` artifact at ``cfg.output_dir`` once the last step is done.

    A rerun with the same run name and storage path resumes from the latest checkpoint; a
    rerun whose config and inputs match a complete artifact reuses it.
    """
    spec = prepare_run(cfg, load_data=False)  # fail fast, before any worker starts
    for note in resolve_settings(cfg, on_gpu=cfg.scaling.use_gpu).notes:
        logger.warning(note)
    fp_config, inputs = _fingerprint_config(cfg), _inputs(cfg, spec)
    fingerprint = artifacts.fingerprint("model", fp_config, inputs)
    manifest = artifacts.reusable(cfg.output_dir, "model", fingerprint)
    if manifest is not None:
        logger.info("pretrain: reusing %s", cfg.output_dir)
        return _result(
            cfg, manifest.get("metrics", {}), completed=True, model_dir=_output(cfg),
            checkpoint_path=manifest.get("run", {}).get("checkpoint"), reused=True,
        )  # fmt: skip
    logger.info(
        "pretrain: %s (%s parameters), %d cells (%d held out), %d steps, run %s in %s",
        cfg.model.preset, f"{count_parameters(spec.model_config):,}", spec.n_cells,
        spec.validation_index.total if spec.validation_index else 0,
        spec.plan.total_steps, cfg.run.name, cfg.run.storage_path,
    )  # fmt: skip
    # Ray Train resumes a run folder of this name: only one of the same config and inputs
    # (on object storage a run of another config is refused, see claim_run_dir).
    artifacts.claim_run_dir(cfg.run.storage_path, cfg.run.name, fingerprint)
    result = _fit(cfg, spec)
    metrics = dict(result.metrics or {})
    checkpoint = result.checkpoint
    completed = bool(metrics.get("completed")) and checkpoint is not None
    model_dir = None
    checkpoint_path = _checkpoint_uri(cfg, checkpoint.path) if checkpoint is not None else None
    if completed:
        assert checkpoint_path is not None
        with checkpoint.as_directory() as directory:  # downloaded when remote
            model_dir = _write_model_artifact(
                cfg, spec, Path(directory), metrics, checkpoint_path, fp_config, inputs
            )
    else:
        logger.info(
            "pretrain: stopped at step %s of %s; rerun to continue",
            metrics.get("step"),
            spec.plan.total_steps,
        )
    return _result(
        cfg, metrics, completed=completed, model_dir=model_dir, checkpoint_path=checkpoint_path
    )


def _fit(cfg: PretrainJobConfig, spec: RunSpec) -> Any:
    """Run the TorchTrainer; returns Ray's ``Result``."""
    runtime.init_ray(cfg.ray)
    env = {
        k: v
        for k, v in os.environ.items()
        if k.startswith(FORWARDED_ENV_PREFIXES) and k not in SECRET_ENV
    }
    # workers read the shards (and a vocabulary artifact) with the driver's storage settings
    settings = StorageEnv.capture(
        cfg.data.tokenized, cfg.data.validation.tokenized, cfg.data.token_dictionary
    )
    loop = (
        WithStorageEnv(train_loop_per_worker, settings) if settings.env else train_loop_per_worker
    )
    storage_path, storage_fs = cfg.run.storage_path, None
    if storage.is_remote(storage_path or ""):
        # Ray's own S3FileSystem() would ignore AWS_ENDPOINT_URL: hand it ours (configured
        # from the environment, pickled to the controller and workers) and the bare path.
        storage_fs, storage_path = storage.resolve(storage_path or "")
    with progress.relay() as link:  # rank 0's step lines on this console
        return _trainer(cfg, spec, loop, env, storage_path, storage_fs, link).fit()


def _trainer(
    cfg: PretrainJobConfig, spec: RunSpec, loop: Any, env: dict[str, str], storage_path: str | None,
    storage_fs: Any, link: progress.ProgressLink | None,
) -> Any:  # fmt: skip
    import ray.train
    from ray.train.torch import TorchTrainer

    from cellfoundry.train.network import NodeBoundTorchConfig

    trainer = TorchTrainer(
        loop,
        # the driver's shard index: workers read only their blocks, never all footers
        train_loop_config={
            "job": config_to_dict(cfg),
            "indexes": spec.indexes_state(),
            "progress": link,
        },
        torch_config=NodeBoundTorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=cfg.scaling.resources_per_worker,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.failure.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            worker_runtime_env={"env_vars": env} if env else None,
        ),
    )
    return trainer


def _write_model_artifact(
    cfg: PretrainJobConfig, spec: RunSpec, checkpoint_dir: Path, metrics: dict[str, Any],
    checkpoint_path: str, fp_config: dict[str, Any], inputs: dict[str, str],
) -> Path:  # fmt: skip
    """HF files at the top, DeepSpeed state in ``training_state/``, metrics and the curve.

    metrics.csv comes from the checkpoint (rank 0 put it there, on whichever node it ran),
    else from the local log folder; the loss curve is drawn here from that file, so both
    describe the same run even when rank 0's log folder is on another machine."""
    log_dir = Path(cfg.tracking.log_dir or "")
    with artifacts.write_artifact(cfg.output_dir, "model", fp_config, inputs) as w:
        for item in (checkpoint_dir / HF_DIR).iterdir():
            shutil.copy2(item, w.dir / item.name)
        shutil.copytree(checkpoint_dir / DS_DIR, w.dir / "training_state")
        shutil.copy2(checkpoint_dir / STATE_FILE, w.dir / "training_state" / STATE_FILE)
        for source in (checkpoint_dir / CSV_FILE, log_dir / CSV_FILE):
            if source.is_file():
                shutil.copy2(source, w.dir / CSV_FILE)
                break
        if (w.dir / CSV_FILE).is_file():
            plot_loss_curve(w.dir / CSV_FILE, w.dir / PNG_FILE)
        w.counts = {
            "steps": int(metrics["step"]),
            "tokens": int(metrics.get("tokens", 0)),
            "cells": spec.n_cells,
            "validation_cells": spec.validation_index.total if spec.validation_index else 0,
            "parameters": count_parameters(spec.model_config),
        }
        w.extra["metrics"] = metrics
        w.extra["run"] = {
            "name": cfg.run.name, "storage_path": cfg.run.storage_path,
            "checkpoint": checkpoint_path, "log_dir": str(log_dir),
        }  # fmt: skip
    return _output(cfg)


def run_pretrain_job(
    config: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """What ``cellfoundry pretrain`` and ``jobs/pretrain.py`` do: load the YAML, join Ray, train.

    Returns a JSON-able summary (artifact paths, final loss, steps, completed).
    """
    from cellfoundry.config.loader import load_config

    cfg = load_config(PretrainJobConfig, config, overrides)
    runtime.init_ray(cfg.ray)
    result = run_pretrain(cfg)
    return {"artifacts": result.paths(), "final_loss": result.final_loss, "steps": result.steps,
            "completed": result.completed}  # fmt: skip
