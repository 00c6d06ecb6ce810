"""Stage 3: fine-tuning and hyperparameter search (Ray Tune + HyperOpt + ASHA).

- :func:`run_finetune` / :func:`run_finetune_job`: fine-tune one model (``model.mode`` full,
  probe or qlora; few-shot with ``data.few_shot``) and the scikit-learn baselines on the same
  group-safe splits, as one Ray task; writes a ``finetuned`` artifact (model or adapter,
  label mapping, metrics.json, report.md, confusion_matrix.png, roc.png).
- :func:`run_tune` / :func:`run_tune_job`: ``Tuner`` + ``HyperOptSearch`` + ASHA over
  ``space``, resumable with ``Tuner.restore``; the best trial is exported the same way.
- Building blocks for other stages (e.g. ``cellfoundry evaluate probe``): :func:`prepare`,
  :func:`task_data`, :func:`compare`, :func:`write_report`, :func:`train_classifier`,
  :func:`build_classifier`, :func:`load_finetuned`, :func:`classification_metrics`.

Imports of this package stay light: Ray is imported only by the functions that need it.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cellfoundry.config.tune import TuneJobConfig
from cellfoundry.tune.compare import METHOD_TITLES, Comparison, MethodResult, compare
from cellfoundry.tune.finetune import KIND, finetune_local, run_finetune, run_finetune_job
from cellfoundry.tune.loop import TaskData, TrainState, evaluate, train_classifier
from cellfoundry.tune.metrics import classification_metrics, majority_rate
from cellfoundry.tune.models import build_classifier, load_finetuned, save_finetuned
from cellfoundry.tune.prepare import Prepared, linear_probe, prepare, task_data
from cellfoundry.tune.probe_model import ProbeClassifier
from cellfoundry.tune.report import write_report
from cellfoundry.tune.splits import Split, make_splits


def run_tune(cfg: TuneJobConfig) -> dict[str, Any]:
    """See :func:`cellfoundry.tune.search.run_tune` (imported lazily: it imports Ray)."""
    from cellfoundry.tune.search import run_tune as _run

    return _run(cfg)


def run_tune_job(config: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """See :func:`cellfoundry.tune.search.run_tune_job` (imported lazily: it imports Ray)."""
    from cellfoundry.tune.search import run_tune_job as _run

    return _run(config, list(overrides))


__all__ = [
    "KIND",
    "METHOD_TITLES",
    "Comparison",
    "MethodResult",
    "Prepared",
    "ProbeClassifier",
    "Split",
    "TaskData",
    "TrainState",
    "build_classifier",
    "classification_metrics",
    "compare",
    "evaluate",
    "finetune_local",
    "linear_probe",
    "load_finetuned",
    "majority_rate",
    "make_splits",
    "prepare",
    "run_finetune",
    "run_finetune_job",
    "run_tune",
    "run_tune_job",
    "save_finetuned",
    "task_data",
    "train_classifier",
    "write_report",
]
