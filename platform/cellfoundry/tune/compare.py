"""Several methods on the same splits: fine-tuning (full, QLoRA), the frozen-encoder linear
probe and the scikit-learn baselines; test metrics per split and their mean."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from cellfoundry.config.tune import BASELINES, FinetuneJobConfig
from cellfoundry.tune.baselines import load_counts, resolve_cells_dir, run_baselines
from cellfoundry.tune.loop import EpochCallback, evaluate, to_device, train_classifier
from cellfoundry.tune.metrics import classification_metrics, majority_rate
from cellfoundry.tune.models import build_classifier
from cellfoundry.tune.prepare import (
    Prepared,
    device_for,
    linear_probe,
    prepare,
    set_threads,
    task_data,
)

logger = logging.getLogger(__name__)

#: Torch methods (``model.mode`` values) and how reports name them.
MODEL_METHODS = {
    "full": "fine-tuned (full)",
    "qlora": "fine-tuned (QLoRA)",
    "probe": "linear probe (frozen)",
}
METHOD_TITLES = {**MODEL_METHODS, "logreg": "logistic regression (HVG counts)",
                 "random_forest": "random forest (HVG counts)", "svm": "linear SVM (HVG counts)"}  # fmt: skip


@dataclass
class MethodResult:
    """One method on one split: test metrics (JSON-able) and the raw test predictions."""

    metrics: dict[str, Any]
    y_true: np.ndarray
    scores: np.ndarray
    """[n, k] class probabilities (or SVM margins)."""
    train: dict[str, Any] = field(default_factory=dict)
    """Fine-tuning only: the last epoch's metrics (loss, validation F1, samples/s, ...)."""


@dataclass
class Comparison:
    """Every method's results on every split."""

    label_names: list[str]
    split_sizes: dict[str, dict[str, int]]
    results: dict[str, dict[str, MethodResult]]
    """split name -> method -> result."""
    majority_rate: dict[str, float]
    """split name -> test accuracy of predicting the commonest training class."""
    models: dict[str, torch.nn.Module] = field(default_factory=dict)
    """Fine-tuned models of the first split, by method."""

    def summary(self) -> dict[str, dict[str, float | None]]:
        """method -> mean test accuracy / macro F1 / ROC AUC over the splits."""
        out: dict[str, dict[str, float | None]] = {}
        methods = next(iter(self.results.values())).keys()
        for m in methods:
            row = {}
            for key in ("accuracy", "macro_f1", "roc_auc_ovr"):
                vals = [
                    r[m].metrics[key]
                    for r in self.results.values()
                    if r[m].metrics[key] is not None
                ]
                row[key] = float(np.mean(vals)) if vals else None
            out[m] = row
        out["majority_class"] = {"accuracy": float(np.mean(list(self.majority_rate.values())))}
        return out

    def to_json(self) -> dict[str, Any]:
        """Everything but the arrays and models."""
        return {
            "label_names": self.label_names,
            "splits": self.split_sizes,
            "majority_class_rate": self.majority_rate,
            "summary": self.summary(),
            "results": {
                s: {m: {"test": r.metrics, "train": r.train} for m, r in res.items()}
                for s, res in self.results.items()
            },
        }


def _fit_model(
    cfg: FinetuneJobConfig, mode: str, prep: Prepared, split_index: int, device: torch.device,
    on_epoch: EpochCallback | None, trained: torch.nn.Module | None = None,
) -> tuple[MethodResult, torch.nn.Module | None]:  # fmt: skip
    split = prep.splits[split_index]
    run_cfg = replace(cfg, model=replace(cfg.model, mode=mode))
    data = task_data(run_cfg, prep, split)
    start = time.perf_counter()
    if trained is not None:
        model, last = to_device(trained, device), {}
    elif mode == "probe":
        model, last = linear_probe(run_cfg, data, device), {}
    else:
        model = build_classifier(
            run_cfg.model, task=cfg.task.kind, label_names=prep.label_names, seed=cfg.seed,
            on_gpu=device.type == "cuda",
        )  # fmt: skip
        model, last = train_classifier(run_cfg, data, model, device, on_epoch=on_epoch)
    test = evaluate(model, data, "test", cfg.data.batch_size, device)
    y, s = test.pop("y_true"), test.pop("scores")
    return MethodResult(test, y, s, {**last, "seconds": time.perf_counter() - start}), model


def compare(
    cfg: FinetuneJobConfig, methods: Sequence[str], *, prep: Prepared | None = None,
    on_epoch: EpochCallback | None = None, trained: dict[str, torch.nn.Module] | None = None,
) -> Comparison:  # fmt: skip
    """Run ``methods`` (any of full, qlora, probe) and ``cfg.baselines.methods`` (cell task,
    when raw counts are available) on every split of ``cfg``. A model in ``trained`` (by
    method) is evaluated on the first split instead of being trained there."""
    unknown = [m for m in methods if m not in MODEL_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(MODEL_METHODS)}")
    set_threads(cfg)
    prep = prep or prepare(cfg)
    device = device_for(cfg)
    baselines = (
        [b for b in cfg.baselines.methods if b in BASELINES] if cfg.task.kind == "cell" else []
    )
    cells_dir = resolve_cells_dir(cfg.data.cells, cfg.data.tokenized) if baselines else None
    if baselines and cells_dir is None:
        logger.warning(
            "no cells artifact beside %s (set data.cells): baselines skipped", cfg.data.tokenized
        )
        baselines = []
    counts = load_counts(cells_dir, prep.cells.cell_ids) if cells_dir is not None else None
    results: dict[str, dict[str, MethodResult]] = {}
    majority, sizes, models = {}, {}, {}
    for i, split in enumerate(prep.splits):
        sizes[split.name] = split.sizes()
        res: dict[str, MethodResult] = {}
        for mode in methods:
            logger.info("%s: %s", split.name, METHOD_TITLES[mode])
            given = (trained or {}).get(mode) if i == 0 else None
            res[mode], model = _fit_model(cfg, mode, prep, i, device, on_epoch, given)
            if model is not None and i == 0:
                models[mode] = model
        if counts is not None:
            train = task_data(cfg, prep, split).train_rows
            scores = run_baselines(counts, prep.cells.labels, train, split.test, len(prep.label_names),
                                   cfg.baselines, cfg.seed)  # fmt: skip
            y = prep.cells.labels[split.test]
            for name, s in scores.items():
                res[name] = MethodResult(classification_metrics(y, s, prep.label_names), y, s)
        if cfg.task.kind == "cell":
            majority[split.name] = majority_rate(
                prep.cells.labels[split.train], prep.cells.labels[split.test]
            )
        else:
            first = next(iter(res.values()))
            majority[split.name] = float(
                np.mean(first.y_true == np.bincount(first.y_true).argmax())
            )
        results[split.name] = res
    return Comparison(prep.label_names, sizes, results, majority, models)
