"""Metric rows of rank 0: a CSV always, TensorBoard and MLflow optionally, a loss-curve PNG.

A run resumed from step ``s`` first drops rows after ``s`` (they belong to the attempt that
failed), so the files describe one uninterrupted run.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cellfoundry.config.train import TrackingConfig

logger = logging.getLogger(__name__)

COLUMNS = [
    "step", "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "grad_norm", "tokens", "tokens_per_s",
    "tflops_per_s", "mfu", "elapsed_s",
]  # fmt: skip
CSV_FILE, PNG_FILE, MLFLOW_RUN_FILE = "metrics.csv", "loss_curve.png", "mlflow_run_id"

#: Dense bf16 peak FLOP/s per GPU, by a substring of ``torch.cuda.get_device_name()``
#: (first match wins; NVIDIA data sheets, without sparsity).
GPU_PEAK_BF16 = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
    ("H800", 989e12), ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A6000", 155e12), ("A10G", 70e12),
    ("A10", 125e12),
)  # fmt: skip


def gpu_peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU named ``device_name``, or None when unknown."""
    for key, peak in GPU_PEAK_BF16:
        if key in device_name:
            return peak
    return None


def read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a metrics CSV (empty when absent)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def plot_loss_curve(csv_path: Path, png_path: Path) -> Path | None:
    """Loss and masked-gene accuracy against step, training and (where evaluated)
    validation, as a PNG (None without rows)."""
    rows = read_rows(csv_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [float(r["loss"]) for r in rows], color="tab:blue", label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("masked-gene loss (cross-entropy)")
    acc = ax.twinx()
    acc.plot(steps, [float(r["accuracy"]) for r in rows], color="tab:orange", label="accuracy")
    val = [r for r in rows if r.get("val_loss")]
    if val:
        val_steps = [int(r["step"]) for r in val]
        ax.plot(val_steps, [float(r["val_loss"]) for r in val], "o--", color="tab:blue",
                markersize=3, label="validation loss")  # fmt: skip
        acc.plot(val_steps, [float(r["val_accuracy"]) for r in val], "o--", color="tab:orange",
                 markersize=3, label="validation accuracy")  # fmt: skip
    acc.set_ylabel("masked-gene accuracy")
    fig.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def _file_store_path(root: Path) -> Path:
    """``root``, or a symlink to it when a folder on its path is named ``artifacts``: MLflow
    3's file store rejects any run whose absolute path has such a folder (a guard meant for
    its own ``artifacts/`` subfolders), so it could not find the runs it has just created."""
    root.mkdir(parents=True, exist_ok=True)
    if "artifacts" not in root.resolve().parts:
        return root
    alias = Path(tempfile.mkdtemp(prefix="cellfoundry-mlruns-")) / "mlruns"
    alias.symlink_to(root.resolve(), target_is_directory=True)
    logger.info(
        "MLflow file store %s opened as %s (its path holds a folder named artifacts)", root, alias
    )
    return alias


class MetricsLogger:
    """Writes metric rows to ``log_dir`` (rank 0 only); see the module docstring."""

    def __init__(
        self,
        tracking: TrackingConfig,
        *,
        resume_step: int,
        params: Mapping[str, Any],
        run_name: str,
    ) -> None:
        assert tracking.log_dir is not None
        self.dir = Path(tracking.log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.dir / CSV_FILE
        kept = [r for r in read_rows(self.csv_path) if int(r["step"]) <= resume_step]
        with self.csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(kept)
        self.tensorboard = None
        if tracking.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(
                str(self.dir / "tensorboard"), purge_step=resume_step + 1
            )
        self.mlflow, self.mlflow_run_id = None, None
        self._alias_dir: Path | None = None
        if tracking.mlflow:
            self._start_mlflow(tracking, resume_step, params, run_name)

    def _start_mlflow(
        self, tracking: TrackingConfig, resume_step: int, params: Mapping[str, Any], run_name: str
    ) -> None:
        uri = tracking.mlflow_tracking_uri
        if uri is None:
            store = _file_store_path(self.dir / "mlruns")
            self._alias_dir = store.parent if store != self.dir / "mlruns" else None
            uri = f"file:{store}"
        if uri.startswith("file:"):  # MLflow 3 wants an opt-in for its file store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.mlflow = MlflowClient(tracking_uri=uri)
        id_file = self.dir / MLFLOW_RUN_FILE
        if resume_step > 0 and id_file.is_file():
            self.mlflow_run_id = id_file.read_text().strip()
            return
        experiment = self.mlflow.get_experiment_by_name(tracking.mlflow_experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment
            else self.mlflow.create_experiment(tracking.mlflow_experiment)
        )
        run = self.mlflow.create_run(experiment_id, run_name=run_name)
        self.mlflow_run_id = run.info.run_id
        id_file.write_text(self.mlflow_run_id + "\n")
        items = [Param(k, str(v)[:500]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.mlflow.log_batch(self.mlflow_run_id, params=items[i : i + 100])
        logger.info("MLflow run %s at %s", self.mlflow_run_id, uri)

    def log(self, row: Mapping[str, Any]) -> None:
        """Append one row (keys of :data:`COLUMNS`; None for a missing value)."""
        with self.csv_path.open("a", newline="") as f:
            csv.DictWriter(f, COLUMNS).writerow(
                {k: ("" if row.get(k) is None else row[k]) for k in COLUMNS}
            )
        step = int(row["step"])
        values = {k: float(v) for k, v in row.items() if k not in ("step",) and v is not None}
        if self.tensorboard is not None:
            for key, value in values.items():
                tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                self.tensorboard.add_scalar(tag, value, step)
            self.tensorboard.flush()
        if self.mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, step) for k, v in values.items()]
            self.mlflow.log_batch(self.mlflow_run_id, metrics=metrics)

    def close(self, *, finished: bool) -> Path | None:
        """Flush, draw the loss curve and (when ``finished``) end the MLflow run."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.mlflow is not None and finished:
            self.mlflow.set_terminated(self.mlflow_run_id, "FINISHED")
        if self._alias_dir is not None:
            shutil.rmtree(self._alias_dir, ignore_errors=True)  # the link, not its target
        return plot_loss_curve(self.csv_path, self.dir / PNG_FILE)
