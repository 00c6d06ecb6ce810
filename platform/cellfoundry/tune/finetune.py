"""``run_finetune``: fine-tune (or probe) one model and the baselines on the same splits, as
one Ray task with the configured resources, and write the fine-tuned model artifact.

Inputs and ``output_dir`` may be ``s3://`` / ``gs://`` URIs (:mod:`cellfoundry.tune.remote`).
The task writes the artifact itself: its files go to a staging folder on the task's node,
uploaded into the run's data sub-prefix before the manifest commits it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cellfoundry import artifacts, progress, runtime
from cellfoundry.config.loader import config_to_dict, load_config
from cellfoundry.config.tune import FinetuneJobConfig
from cellfoundry.storage import StorageEnv
from cellfoundry.tune.compare import METHOD_TITLES, Comparison, compare
from cellfoundry.tune.data import label_mapping
from cellfoundry.tune.models import save_finetuned
from cellfoundry.tune.prepare import Prepared, prepare
from cellfoundry.tune.remote import has_manifest
from cellfoundry.tune.report import write_report

logger = logging.getLogger(__name__)

KIND = "finetuned"
"""Artifact kind of a fine-tuned model directory."""
LABELS_FILE = "label_mapping.json"


def _fingerprint_config(cfg: FinetuneJobConfig) -> dict[str, Any]:
    data = config_to_dict(cfg)
    for key in ("ray", "log_every"):  # how it runs and talks, not what it makes
        data.pop(key)
    return data


def artifact_inputs(cfg: FinetuneJobConfig) -> dict[str, str]:
    """Input artifacts (those with a manifest) of a fine-tuning run: tokens, model, cells."""
    candidates = {"tokenized": cfg.data.tokenized, "model": cfg.model.model_dir}
    if cfg.data.cells:
        candidates["cells"] = cfg.data.cells
    return {k: v for k, v in candidates.items() if has_manifest(v)}


def write_finetuned_artifact(
    cfg: FinetuneJobConfig, output_dir: str | Path, comparison: Comparison, prep: Prepared,
    *, method: str, fp_config: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The artifact: ``model/`` (HF folder), ``adapter/`` (PEFT) or ``probe/`` (linear head;
    both with the base model's path in ``finetune.json``), ``label_mapping.json``,
    ``metrics.json``, ``report.md``, ``confusion_matrix.png``, ``roc.png``, ``splits.json``."""
    fp_config = fp_config if fp_config is not None else _fingerprint_config(cfg)
    with artifacts.write_artifact(output_dir, KIND, fp_config, artifact_inputs(cfg)) as w:
        model = comparison.models.get(method)
        if model is not None:
            save_finetuned(
                model.cpu() if method != "qlora" else model, w.dir, mode=method, task=cfg.task.kind,
                label_names=prep.label_names, base_model=cfg.model.model_dir,
                token_dictionary=prep.token_dictionary,
            )  # fmt: skip
        (w.dir / LABELS_FILE).write_text(
            json.dumps(label_mapping(prep.label_names), indent=2) + "\n"
        )
        splits = {s.name: {side: prep.cells.cell_ids[getattr(s, side)].tolist() for side in ("train", "val", "test")}
                  for s in prep.splits} if cfg.task.kind == "cell" else {}  # fmt: skip
        (w.dir / "splits.json").write_text(json.dumps(splits) + "\n")
        notes = [f"model: `{cfg.model.model_dir}` ({METHOD_TITLES[method]})"]
        if cfg.data.max_train_cells:
            notes.append(f"trained on at most {cfg.data.max_train_cells} of the training cells "
                         "(stratified draw); the baselines train on the same cells")  # fmt: skip
        if cfg.data.few_shot:
            notes.append(f"few-shot: {cfg.data.few_shot} training cells per class (baselines too)")
        metrics = write_report(comparison, w.dir, title=f"Fine-tuning: {cfg.data.label_column}",
                               main_method=method, notes=notes, extra=extra)  # fmt: skip
        summary = metrics["summary"]
        w.counts = {
            "cells": len(prep.cells),
            "classes": len(prep.label_names),
            "splits": len(prep.splits),
        }
        w.extra["metrics"] = {
            "summary": summary,
            "majority_class_rate": metrics["majority_class_rate"],
        }
    return metrics


def finetune_local(
    cfg: FinetuneJobConfig, claim: artifacts.OutputClaim | None = None,
    settings: StorageEnv | None = None, link: progress.ProgressLink | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Everything in this process: prepare, train and compare, write the artifact; returns
    the JSON summary (what the Ray task of :func:`run_finetune` returns). ``claim``: the
    hold on ``output_dir`` of the run that started this task (else it is claimed here);
    ``settings``: the object-storage settings of the driver that started it; ``link``: its
    console (:func:`cellfoundry.progress.relay`)."""
    from cellfoundry.logs import setup_logging

    setup_logging()  # also inside a Ray worker
    progress.install(link)
    if cfg.output_dir is None:
        raise ValueError("output_dir is not set: give the folder of the fine-tuned model artifact")
    with (
        (settings or StorageEnv()).applied(),
        artifacts.claim_output(cfg.output_dir, KIND, join=claim, object_storage=True),
    ):
        prep = prepare(cfg)
        comparison = compare(cfg, [cfg.model.mode], prep=prep)
        metrics = write_finetuned_artifact(
            cfg, cfg.output_dir, comparison, prep, method=cfg.model.mode
        )
    return {"output_dir": cfg.output_dir, "summary": metrics["summary"],
            "majority_class_rate": metrics["majority_class_rate"], "reused": False}  # fmt: skip


def _remote_options(cfg: FinetuneJobConfig) -> dict[str, Any]:
    res = dict(cfg.scaling.resources_per_worker or {})
    opts: dict[str, Any] = {
        "num_cpus": res.pop("CPU", 1),
        "num_gpus": res.pop("GPU", 1 if cfg.scaling.use_gpu else 0),
    }
    if res:
        opts["resources"] = res
    return opts


def run_finetune(cfg: FinetuneJobConfig) -> dict[str, Any]:
    """Fine-tune per ``cfg`` as one Ray task (``scaling.resources_per_worker`` /
    ``use_gpu``) on the current or a new local cluster; reuse a complete artifact with the
    same config and inputs. ``output_dir`` must be reachable from the worker (object
    storage, or a shared path). Returns a JSON-able summary."""
    if cfg.output_dir is None:
        raise ValueError("output_dir is not set: give the folder of the fine-tuned model artifact")
    # the task joins this claim
    with artifacts.claim_output(cfg.output_dir, KIND, object_storage=True) as claim:
        fingerprint = artifacts.fingerprint(KIND, _fingerprint_config(cfg), artifact_inputs(cfg))
        manifest = artifacts.reusable(cfg.output_dir, KIND, fingerprint)
        if manifest is not None:
            logger.info("finetune: reusing %s", cfg.output_dir)
            return {"output_dir": cfg.output_dir, **manifest.get("metrics", {}), "reused": True}
        runtime.init_ray(cfg.ray)
        import ray

        task = ray.remote(finetune_local).options(**_remote_options(cfg), max_retries=0)
        logger.info("finetune: %s on %s -> %s", cfg.model.mode, cfg.data.tokenized, cfg.output_dir)
        settings = StorageEnv.capture(
            cfg.output_dir, cfg.model.model_dir, cfg.data.tokenized, cfg.data.cells
        )
        with progress.relay() as link:  # the task's step and epoch lines on this console
            return ray.get(task.remote(cfg, claim, settings, link))


def run_finetune_job(
    config: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """What ``cellfoundry finetune`` and ``jobs/finetune.py`` do: load the YAML, join Ray, run."""
    cfg = load_config(FinetuneJobConfig, config, overrides)
    runtime.init_ray(cfg.ray)
    return run_finetune(cfg)
