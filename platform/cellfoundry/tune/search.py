"""``run_tune``: hyperparameter search with ``ray.tune.Tuner``, ``HyperOptSearch`` and ASHA,
maximising validation macro F1. Each trial runs the plain training loop of
:mod:`cellfoundry.tune.loop` on one worker with ``finetune.scaling``'s resources and
reports (with a checkpoint) after every epoch. Trials that do not fit wait in the queue,
and on an autoscaling cluster their resource requests make it grow. A rerun with the same
``run.name`` and ``run.storage_path`` restores an interrupted search (``Tuner.restore``).
The best trial's model is exported as a ``finetuned`` artifact with its metrics.

``run.storage_path`` (the experiment and its trial checkpoints) and ``output_dir`` may be
``s3://`` / ``gs://`` URIs: Tune gets the filesystem of :mod:`cellfoundry.storage` (pyarrow's
own would ignore ``AWS_ENDPOINT_URL``), and trials read and write with the driver's storage
settings (:class:`~cellfoundry.tune.remote.StorageEnv`). A remote experiment resumes
only under the same config and inputs: its ``cellfoundry_fingerprint`` object must match."""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from cellfoundry import artifacts, progress, runtime, storage
from cellfoundry.config.loader import config_to_dict, load_config, parse_config
from cellfoundry.config.tune import FinetuneJobConfig, TuneJobConfig
from cellfoundry.storage import StorageEnv
from cellfoundry.tune.finetune import KIND, artifact_inputs, write_finetuned_artifact
from cellfoundry.tune.loop import TrainState, train_classifier
from cellfoundry.tune.models import build_classifier
from cellfoundry.tune.prepare import device_for, prepare, set_threads, task_data
from cellfoundry.tune.trials import (
    STATE_FILE,
    InterruptAfterTrials,
    load_trial_state,
    save_trial_state,
    search_space,
    trial_table,
)

logger = logging.getLogger(__name__)


def _merge(base: dict[str, Any], params: dict[str, Any]) -> None:
    for key, value in params.items():
        if isinstance(value, dict):
            _merge(base.setdefault(key, {}), value)
        else:
            base[key] = value.item() if hasattr(value, "item") else value  # NumPy scalars


def trial_config(job: dict[str, Any], params: dict[str, Any]) -> FinetuneJobConfig:
    """The base finetune config ``job`` (a plain dict) with the sampled ``params`` (nested
    like the config, e.g. {optim: {learning_rate: 1e-4}}) set, validated like a YAML file."""
    data = copy.deepcopy(job)
    _merge(data, params)
    return parse_config(FinetuneJobConfig, data)


def tune_trial(
    params: dict[str, Any], job: dict[str, Any], settings: StorageEnv | None = None,
    link: progress.ProgressLink | None = None,
) -> None:  # fmt: skip
    """One Tune trial: fine-tune on the first split with ``params``, report validation
    metrics and a checkpoint (trainable weights + optimizer) every epoch; resume from the
    trial's checkpoint when Tune restarts it. ``settings``: the driver's storage settings;
    ``link``: its console (lines tagged with the trial's id)."""
    import ray.tune

    from cellfoundry.logs import setup_logging

    setup_logging()
    progress.install(link, tag=f"trial {ray.tune.get_context().get_trial_id()}")
    with (settings or StorageEnv()).applied():
        _trial(params, job)


def _trial(params: dict[str, Any], job: dict[str, Any]) -> None:
    import ray.tune

    cfg = trial_config(job, params)
    set_threads(cfg)
    prep = prepare(cfg)
    data = task_data(cfg, prep, prep.splits[0])
    device = device_for(cfg)
    model = build_classifier(cfg.model, task=cfg.task.kind, label_names=prep.label_names,
                             seed=cfg.seed, on_gpu=device.type == "cuda")  # fmt: skip
    state = None
    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_trial_state(model, Path(directory) / STATE_FILE)
        logger.info("trial resumes after epoch %d", state.epoch)

    def report(metrics: dict[str, Any], model: torch.nn.Module, state: TrainState) -> None:
        with tempfile.TemporaryDirectory() as directory:
            save_trial_state(model, state, Path(directory) / STATE_FILE)
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(directory))

    train_classifier(cfg, data, model, device, state=state, on_epoch=report)


def _fingerprint_config(cfg: TuneJobConfig) -> dict[str, Any]:
    data = config_to_dict(cfg)
    for key in ("ray", "interrupt_after_trials"):
        data.pop(key)
    for key in ("ray", "log_every"):  # how trials run and talk, not what they make
        data["finetune"].pop(key)
    return data


def _run_storage(cfg: TuneJobConfig) -> tuple[str | None, Any]:
    """``(storage_path, storage_filesystem)`` for Ray: a local path and None, or for a URI
    the path within :func:`cellfoundry.storage.filesystem` and that filesystem."""
    if cfg.run.storage_path is None or not storage.is_remote(cfg.run.storage_path):
        return cfg.run.storage_path, None
    fs, path = storage.resolve(cfg.run.storage_path)
    return path, fs


def claim_remote_run(cfg: TuneJobConfig, fingerprint: str) -> None:
    """On object storage, the experiment ``run.storage_path/run.name`` belongs to
    ``fingerprint``: a new one is marked with it; one of another config or inputs (or
    unmarked) is refused, never resumed (there is no rename to move it aside)."""
    if cfg.run.storage_path is None or not storage.is_remote(cfg.run.storage_path):
        return
    run_dir = storage.join(cfg.run.storage_path, cfg.run.name or "")
    marker = storage.join(run_dir, artifacts.RUN_FINGERPRINT)
    try:
        found = storage.read_text(marker).strip()
    except FileNotFoundError:
        found = None
    if found == fingerprint:
        return
    if found is not None or storage.list_files(run_dir):
        raise ValueError(
            f"{run_dir} holds a Tune experiment of another config or inputs; it is not "
            "resumed: set another run.name (or delete that prefix)"
        )
    storage.write_text(marker, fingerprint + "\n")


def _tuner(
    cfg: TuneJobConfig, job: dict[str, Any], settings: StorageEnv,
    link: progress.ProgressLink | None = None,
) -> Any:  # fmt: skip
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.hyperopt import HyperOptSearch

    ft = cfg.finetune
    res = dict(ft.scaling.resources_per_worker or {"CPU": 1})
    if ft.scaling.use_gpu:
        res.setdefault("GPU", 1)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(tune_trial, job=job, settings=settings, link=link), res
    )
    storage_path, fs = _run_storage(cfg)
    path = (
        f"{storage_path}/{cfg.run.name}"
        if fs is not None
        else str(Path(storage_path or "") / (cfg.run.name or ""))
    )
    if ray.tune.Tuner.can_restore(path, storage_filesystem=fs):
        logger.info("tune: restoring the search in %s", cfg.run.storage_path)
        return ray.tune.Tuner.restore(
            path, trainable=trainable, resume_unfinished=True, resume_errored=True,
            storage_filesystem=fs,
        )  # fmt: skip
    t, s = cfg.tune, cfg.scheduler
    return ray.tune.Tuner(
        trainable,
        param_space=search_space(cfg.space),
        tune_config=ray.tune.TuneConfig(
            metric=t.metric,
            mode=t.mode,
            num_samples=t.num_samples,
            max_concurrent_trials=t.max_concurrent_trials,
            time_budget_s=t.time_budget_s,
            search_alg=HyperOptSearch(
                n_initial_points=cfg.search.n_initial_points,
                random_state_seed=cfg.search.random_state_seed,
            ),
            scheduler=ASHAScheduler(
                time_attr=s.time_attr,
                max_t=s.max_t or ft.optim.num_train_epochs,
                grace_period=s.grace_period,
                reduction_factor=s.reduction_factor,
                brackets=s.brackets,
            ),
        ),
        run_config=ray.tune.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=fs,
            verbose=0,
            checkpoint_config=ray.tune.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=t.metric, checkpoint_score_order=t.mode
            ),
            callbacks=[InterruptAfterTrials(cfg.interrupt_after_trials)]
            if cfg.interrupt_after_trials
            else None,
        ),
    )


def export_best(
    cfg: TuneJobConfig, params: dict[str, Any], checkpoint: Any, trials: list[dict[str, Any]],
    claim: artifacts.OutputClaim | None = None, settings: StorageEnv | None = None,
    link: progress.ProgressLink | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Rebuild the best trial's model from its best checkpoint, score it (and the baselines)
    on the test split and write the ``finetuned`` artifact at ``cfg.output_dir`` (joining
    ``claim``, the hold of the search's run on it) with the driver's storage ``settings``;
    its warnings go to the driver's console through ``link``."""
    from cellfoundry.logs import setup_logging

    setup_logging()
    progress.install(link)
    with (settings or StorageEnv()).applied():
        return _export(cfg, params, checkpoint, trials, claim)


def _export(
    cfg: TuneJobConfig, params: dict[str, Any], checkpoint: Any, trials: list[dict[str, Any]],
    claim: artifacts.OutputClaim | None,
) -> dict[str, Any]:  # fmt: skip
    from cellfoundry.tune.compare import compare

    job = config_to_dict(cfg.finetune)
    best = trial_config(job, params)
    set_threads(best)
    prep = prepare(best)
    model = build_classifier(best.model, task=best.task.kind, label_names=prep.label_names,
                             seed=best.seed, on_gpu=device_for(best).type == "cuda")  # fmt: skip
    with checkpoint.as_directory() as directory:  # local, NFS or cloud storage
        state = load_trial_state(model, Path(directory) / STATE_FILE)
    prep = replace(prep, splits=prep.splits[:1])  # the split the trials were validated on
    comparison = compare(best, [best.model.mode], prep=prep, trained={best.model.mode: model})
    extra = {"search": {"best_params": params, "best_epoch": state.epoch, "trials": trials}}
    with artifacts.claim_output(cfg.output_dir, KIND, join=claim, object_storage=True):
        metrics = write_finetuned_artifact(best, cfg.output_dir, comparison, prep, method=best.model.mode,
                                           fp_config=_fingerprint_config(cfg), extra=extra)  # fmt: skip
    return {"summary": metrics["summary"], "majority_class_rate": metrics["majority_class_rate"]}


def run_tune(cfg: TuneJobConfig) -> dict[str, Any]:
    """Search per ``cfg`` (restoring an interrupted search of the same name and storage) and
    export the best trial; returns a JSON-able summary with ``completed`` false when the
    search was interrupted (rerun to finish it). Holds ``cfg.output_dir`` throughout: a
    second search into it fails fast."""
    with artifacts.claim_output(cfg.output_dir, KIND, object_storage=True) as claim:
        return _search(cfg, claim)


def _search(cfg: TuneJobConfig, claim: artifacts.OutputClaim) -> dict[str, Any]:
    fp = artifacts.fingerprint(KIND, _fingerprint_config(cfg), artifact_inputs(cfg.finetune))
    manifest = artifacts.reusable(cfg.output_dir, KIND, fp)
    if manifest is not None:
        logger.info("tune: reusing %s", cfg.output_dir)
        return {
            "output_dir": cfg.output_dir,
            "completed": True,
            "reused": True,
            **manifest.get("metrics", {}),
        }
    runtime.init_ray(cfg.ray)
    import ray

    job = config_to_dict(cfg.finetune)
    # Tuner.restore resumes an experiment folder: only one of the same config and inputs.
    artifacts.claim_run_dir(cfg.run.storage_path, cfg.run.name, fp)
    claim_remote_run(cfg, fp)
    ft = cfg.finetune
    settings = StorageEnv.capture(cfg.output_dir, cfg.run.storage_path, ft.model.model_dir,
                                       ft.data.tokenized, ft.data.cells)  # fmt: skip
    if not storage.is_remote(cfg.run.storage_path or ""):
        # Tune warns (several lines, every few seconds of a small search) when it snapshots
        # the experiment often; a snapshot on a local disk costs nothing worth a warning.
        # 0 turns the warning off, as its own message says; a user's value wins.
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    with progress.relay() as link:  # the trials' step and epoch lines on this console
        results = _tuner(cfg, job, settings, link).fit()
    trials = trial_table(results, cfg.tune.metric)
    finished = sum(t["status"] == "TERMINATED" for t in trials)
    summary: dict[str, Any] = {"output_dir": cfg.output_dir, "experiment": results.experiment_path,
                               "trials": trials, "finished_trials": finished, "reused": False}  # fmt: skip
    if finished < cfg.tune.num_samples:
        logger.warning(
            "tune: %d of %d trials finished; rerun to resume the search",
            finished,
            cfg.tune.num_samples,
        )
        return {**summary, "completed": False}
    best = results.get_best_result(metric=cfg.tune.metric, mode=cfg.tune.mode, scope="all")
    checkpoint = best.get_best_checkpoint(cfg.tune.metric, cfg.tune.mode)
    if checkpoint is None:
        raise ValueError(f"tune: the best trial {best.path} left no checkpoint")
    params = dict(best.config)
    res = dict(ft.scaling.resources_per_worker or {"CPU": 1})
    task = ray.remote(export_best).options(num_cpus=res.pop("CPU", 1), num_gpus=res.pop("GPU", int(ft.scaling.use_gpu)),
                                           resources=res or None, max_retries=0)  # fmt: skip
    with progress.relay() as link:
        exported = ray.get(task.remote(cfg, params, checkpoint, trials, claim, settings, link))
    return {**summary, **exported, "best_params": params, "completed": True}


def run_tune_job(
    config: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """What ``cellfoundry tune`` and ``jobs/tune.py`` do: load the YAML, join Ray, search."""
    cfg = load_config(TuneJobConfig, config, overrides)
    runtime.init_ray(cfg.ray)
    return run_tune(cfg)
