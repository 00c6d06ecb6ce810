"""Workers' progress lines on the driver's console (cellfoundry.progress, no cluster) and
the fine-tuning loop's step, epoch and validation-loss lines."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch
import transformers

from cellfoundry import progress
from cellfoundry.config.tune import FinetuneJobConfig, FinetuneModelConfig, LabelDataConfig
from cellfoundry.tune.data import LabelledCells
from cellfoundry.tune.loop import TaskData, cross_entropy, train_classifier
from support.logcollect import Collect


def _record(level: int, msg: str, *, marked: bool = False) -> logging.LogRecord:
    record = logging.LogRecord("cellfoundry.train.loop", level, __file__, 1, msg, (), None)
    if marked:
        record.__dict__.update(progress.PROGRESS)
    return record


def test_handler_relays_progress_lines_and_warnings_only() -> None:
    board = progress.ProgressBoard()
    handler = progress.RelayHandler(board.push, tag="trial ab12")
    handler.emit(_record(logging.INFO, "step 10/300 loss 5.1", marked=True))
    handler.emit(_record(logging.INFO, "read 3 shards"))  # plain info stays in the worker's log
    handler.emit(_record(logging.DEBUG, "detail", marked=False))
    handler.emit(_record(logging.WARNING, "bf16 asked for on a CPU: fp32"))
    assert board.drain() == [
        ("cellfoundry.train.loop", logging.INFO, "[trial ab12] step 10/300 loss 5.1"),
        ("cellfoundry.train.loop", logging.WARNING, "[trial ab12] bf16 asked for on a CPU: fp32"),
    ]
    assert board.drain() == []  # drained once


def test_a_failing_send_never_reaches_the_training_loop() -> None:
    def send(lines: list[progress.Line]) -> None:
        raise ConnectionError("the driver is gone")

    progress.RelayHandler(send).emit(_record(logging.ERROR, "boom"))  # no exception


def test_board_keeps_the_newest_lines_and_counts_the_dropped() -> None:
    board = progress.ProgressBoard(limit=3)
    board.push([("a", 20, str(i)) for i in range(5)])
    assert [m for _, _, m in board.drain()] == ["2", "3", "4"] and board.dropped == 2


def test_lines_are_logged_on_the_driver_under_the_workers_logger() -> None:
    with Collect("cellfoundry.tune.loop") as got:
        progress.emit([("cellfoundry.tune.loop", logging.INFO, "epoch 1/3 done")])
    assert [(r.name, r.levelno, r.getMessage()) for r in got.records] == [
        ("cellfoundry.tune.loop", logging.INFO, "epoch 1/3 done")
    ]


def test_install_handler_replaces_an_earlier_relay() -> None:
    root = logging.getLogger("cellfoundry")
    first, second = progress.RelayHandler(lambda _: None), progress.RelayHandler(lambda _: None)
    try:
        progress.install_handler(first)
        progress.install_handler(second)
        relays = [h for h in root.handlers if isinstance(h, progress.RelayHandler)]
        assert relays == [second]
    finally:
        root.removeHandler(second)
    progress.install(None)  # no relay made by the driver: nothing to do


def test_relay_without_ray_yields_nothing() -> None:
    # In a process of its own: under `make test` the integration tests' Ray session is
    # still up in this one when the unit tests run.
    code = (
        "import ray\n"
        "from cellfoundry import progress\n"
        "assert not ray.is_initialized()\n"
        "with progress.relay() as link:\n"
        "    assert link is None, link\n"
        "assert not ray.is_initialized()  # and it did not start Ray\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (42.4, "42s"), (75, "1m15s"), (4000, "1h06m")]
)
def test_format_duration(seconds: float, text: str) -> None:
    assert progress.format_duration(seconds) == text


def test_eta_is_the_pace_so_far() -> None:
    assert progress.eta(10, 40, 20.0) == "1m00s"  # 2 s a step, 30 steps left
    assert progress.eta(0, 40, 5.0) == "?"
    assert progress.eta(40, 40, 80.0) == "0s"


def test_cross_entropy_is_the_mean_negative_log_probability_of_the_true_class() -> None:
    p = np.array([[0.5, 0.5], [0.9, 0.1], [0.0, 1.0]])
    assert cross_entropy(np.array([0, 0, 1]), p) == pytest.approx(
        -(np.log(0.5) + np.log(0.9) + np.log(1.0)) / 3
    )
    assert np.isfinite(cross_entropy(np.array([0]), np.array([[0.0, 1.0]])))  # clipped
    assert np.isnan(cross_entropy(np.zeros(0, np.int64), np.zeros((0, 2))))


def test_finetuning_prints_step_and_epoch_lines_for_the_driver() -> None:
    """Every ``log_every`` steps: step, loss, cells/s, ETA; every epoch: val_loss too. All
    marked as progress lines, so a relay takes them to the driver's console."""
    rng = np.random.default_rng(0)
    tokens = [np.array([2, *rng.choice(np.arange(4, 40), 6, replace=False), 3]) for _ in range(24)]
    cells = LabelledCells(
        cell_ids=np.array([f"c{i}" for i in range(24)]), tokens=tokens,
        labels=np.arange(24) % 2, label_names=["a", "b"], meta=pl.DataFrame({"i": range(24)}),
    )  # fmt: skip
    data = TaskData(cells, pad_id=0, label_names=["a", "b"], train_rows=np.arange(16),
                    eval_rows={"val": np.arange(16, 24)})  # fmt: skip
    cfg = FinetuneJobConfig(
        data=LabelDataConfig(tokenized="unused", batch_size=4),
        model=FinetuneModelConfig(model_dir="unused"), log_every=3,
    )  # fmt: skip
    cfg.optim.num_train_epochs = 2
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
        intermediate_size=32, max_position_embeddings=16, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    with Collect("cellfoundry.tune.loop") as got:
        _, metrics = train_classifier(cfg, data, model, torch.device("cpu"))
    lines = [r for r in got.records if progress.is_relayed(r)]
    steps = [r.getMessage() for r in lines if " step " in r.getMessage()]
    epochs = [r.getMessage() for r in lines if "done:" in r.getMessage()]
    # 4 batches an epoch, 8 steps: lines at steps 3 and 6
    assert [m.split(" loss")[0] for m in steps] == ["epoch 1/2 step 3/8", "epoch 2/2 step 6/8"]
    assert all("cells/s ETA " in m for m in steps)
    assert len(epochs) == 2 and all("val_loss" in m and "ETA" in m for m in epochs)
    assert epochs[-1].endswith("ETA 0s")
    assert np.isfinite(metrics["val_loss"]) and metrics["val_loss"] > 0
