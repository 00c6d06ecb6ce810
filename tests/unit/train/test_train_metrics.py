"""Rank 0's metric files: CSV (truncated on resume), TensorBoard, MLflow file store, PNG."""

from __future__ import annotations

from pathlib import Path

from cellfoundry.config import TrackingConfig
from cellfoundry.train.metrics import (
    PNG_FILE,
    MetricsLogger,
    gpu_peak_flops,
    read_rows,
)


def row(step: int) -> dict:
    return {"step": step, "epoch": step / 10, "loss": 10.0 - step / 10, "accuracy": step / 100, "lr": 1e-4,
            "grad_norm": None, "tokens": 100.0 * step, "tokens_per_s": 50.0, "tflops_per_s": 0.1,
            "mfu": None, "elapsed_s": 2.0}  # fmt: skip


def test_resume_drops_rows_of_the_failed_attempt(tmp_path: Path) -> None:
    tracking = TrackingConfig(log_dir=str(tmp_path), tensorboard=False, mlflow=False)
    log = MetricsLogger(tracking, resume_step=0, params={}, run_name="r")
    for step in range(1, 8):
        log.log(row(step))
    log.close(finished=False)
    log = MetricsLogger(tracking, resume_step=5, params={}, run_name="r")  # restart from step 5
    log.log({**row(6), "val_loss": 9.5, "val_accuracy": 0.05})  # validation beside training
    png = log.close(finished=True)
    rows = read_rows(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0]["mfu"] == "" and float(rows[5]["loss"]) == 9.4
    assert rows[4]["val_loss"] == "" and float(rows[5]["val_loss"]) == 9.5
    assert png == tmp_path / PNG_FILE and png.stat().st_size > 1000


def test_tensorboard_and_mlflow(tmp_path: Path) -> None:
    root, tmp_path = tmp_path, tmp_path / "artifacts" / "logs"  # MLflow 3 alone cannot use it
    tracking = TrackingConfig(log_dir=str(tmp_path), tensorboard=True, mlflow=True)
    log = MetricsLogger(
        tracking, resume_step=0, params={"optim.lr": 2e-4, "model.preset": "tiny"}, run_name="r"
    )
    log.log(row(1))
    log.log({**row(2), "val_loss": 9.7, "val_accuracy": 0.03})
    log.close(finished=False)
    run_id = (tmp_path / "mlflow_run_id").read_text().strip()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    from mlflow.tracking import MlflowClient

    (root / "mlruns").symlink_to(tmp_path / "mlruns")
    client = MlflowClient(tracking_uri=f"file:{root / 'mlruns'}")
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [9.9, 9.8]
    assert [m.value for m in client.get_metric_history(run_id, "val_loss")] == [9.7]
    assert client.get_run(run_id).data.params["model.preset"] == "tiny"
    # a resumed run keeps logging to the same MLflow run
    log = MetricsLogger(tracking, resume_step=2, params={}, run_name="r")
    assert log.mlflow_run_id == run_id
    log.log(row(3))
    log.close(finished=True)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.get_metric_history(run_id, "loss")) == 3


def test_gpu_peaks() -> None:
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak_flops("NVIDIA A10G") == 70e12
    assert gpu_peak_flops("NVIDIA L4") == 121e12
    assert gpu_peak_flops("Some Other GPU") is None
