"""The trainable core: one process (CPU or GPU) fine-tunes a classifier epoch by epoch,
validates after each epoch and hands the metrics to a callback (``tune.report`` in a Tune
trial, a log line in ``cellfoundry finetune``). No Ray here."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

from cellfoundry import progress
from cellfoundry.config.tune import FinetuneJobConfig
from cellfoundry.train.optim import param_groups
from cellfoundry.tune.data import IGNORE_INDEX, LabelledCells
from cellfoundry.tune.metrics import classification_metrics, softmax

logger = logging.getLogger(__name__)


@dataclass
class TaskData:
    """What one split of one task trains and is scored on."""

    cells: LabelledCells
    pad_id: int
    label_names: list[str]
    train_rows: np.ndarray
    """Cells that train (all cells in the gene task: genes are split, cells give context)."""
    eval_rows: dict[str, np.ndarray]
    """``val`` / ``test`` -> cells scored."""
    gene_classes: dict[str, dict[int, int]] = field(default_factory=dict)
    """Gene task: ``train`` / ``val`` / ``test`` -> {token id: class} of that side's genes."""

    @property
    def task(self) -> str:
        return "gene" if self.gene_classes else "cell"


def collate(data: TaskData, rows: np.ndarray, side: str) -> dict[str, torch.Tensor]:
    """Padded ``input_ids`` / ``attention_mask`` [b, L] (L rounded up to 8) and ``labels``:
    [b] class per cell, or [b, L] class per token of ``side``'s genes (else -100)."""
    seqs = [data.cells.tokens[r] for r in rows]
    width = int(math.ceil(max(len(s) for s in seqs) / 8) * 8)
    ids = np.full((len(seqs), width), data.pad_id, dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    batch = {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(ids != data.pad_id).long(),
    }
    if data.task == "cell":
        batch["labels"] = torch.from_numpy(data.cells.labels[rows])
    else:
        lookup = data.gene_classes[side]
        table = np.full(max([int(ids.max()), *lookup]) + 1, IGNORE_INDEX, dtype=np.int64)
        table[list(lookup)] = list(lookup.values())  # token id -> class of this side's genes
        labels = table[ids]
        batch["labels"] = torch.from_numpy(labels)
    return batch


@torch.no_grad()
def predict(
    model: torch.nn.Module, data: TaskData, side: str, batch_size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """(true classes [n], class probabilities [n, k]) of ``side`` (``val`` / ``test``):
    per cell, or per labelled gene token in the gene task."""
    model.eval()
    rows = data.eval_rows[side]
    ys, scores = [], []
    for start in range(0, len(rows), batch_size):
        batch = collate(data, rows[start : start + batch_size], side)
        labels = batch.pop("labels")
        with autocast(device):
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
        if data.task == "gene":
            keep = labels != IGNORE_INDEX
            logits, labels = logits[keep], labels[keep]
        ys.append(labels.numpy())
        scores.append(logits.numpy())
    return np.concatenate(ys), softmax(np.concatenate(scores).astype(np.float64))


def evaluate(
    model: torch.nn.Module, data: TaskData, side: str, batch_size: int, device: torch.device
) -> dict[str, Any]:
    """:func:`classification_metrics` of ``side``, with ``y_true`` and ``scores`` arrays."""
    y, s = predict(model, data, side, batch_size, device)
    return {**classification_metrics(y, s, data.label_names), "y_true": y, "scores": s}


def cross_entropy(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean negative log probability of the true class: int [n], float [n, k] -> nats
    (the validation loss beside the training loss; NaN for no rows)."""
    if len(y_true) == 0:
        return float("nan")
    p = probabilities[np.arange(len(y_true)), y_true]
    return float(-np.log(np.clip(p, 1e-12, 1.0)).mean())


def autocast(device: torch.device) -> Any:
    """bf16 autocast on a GPU that supports it (fp32 master weights), else nothing."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` on ``device``; a k-bit (bitsandbytes) model stays where it was loaded
    (``device_map``), as transformers refuses ``.to`` on it."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return model
    return model.to(device)


@dataclass
class TrainState:
    """Where training stands (what a Tune checkpoint restores)."""

    epoch: int = 0
    step: int = 0
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None


EpochCallback = Callable[[dict[str, Any], torch.nn.Module, TrainState], None]


def train_classifier(
    cfg: FinetuneJobConfig, data: TaskData, model: torch.nn.Module, device: torch.device,
    *, state: TrainState | None = None, on_epoch: EpochCallback | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:  # fmt: skip
    """Train ``model`` on ``data.train_rows`` for ``cfg.optim.num_train_epochs`` epochs
    (from ``state`` when resuming), validating after each; returns the model and the last
    epoch's metrics (``epoch``, ``train_loss``, ``val_macro_f1``, ``val_accuracy``, ...)."""
    opt_cfg, batch_size = cfg.optim, cfg.data.batch_size
    model = to_device(model, device)
    state = state or TrainState()
    batches_per_epoch = math.ceil(len(data.train_rows) / batch_size)
    if opt_cfg.max_steps_per_epoch is not None:
        batches_per_epoch = min(batches_per_epoch, opt_cfg.max_steps_per_epoch)
    total = batches_per_epoch * opt_cfg.num_train_epochs
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(model, opt_cfg.weight_decay)
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=opt_cfg.learning_rate)
    scheduler = transformers.get_scheduler(
        opt_cfg.lr_scheduler_type, optimizer,
        num_warmup_steps=int(opt_cfg.warmup_ratio * total), num_training_steps=total,
    )  # fmt: skip
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler or {})
    metrics: dict[str, Any] = {}
    run_started, first_step = time.perf_counter(), state.step  # the ETA: this run's pace
    for epoch in range(state.epoch, opt_cfg.num_train_epochs):
        model.train()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(data.train_rows)
        losses, start, seen = [], time.perf_counter(), 0
        window_cells, window_start = 0, start
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout
        for b in tqdm(
            range(batches_per_epoch), desc=f"epoch {epoch + 1}", leave=False, mininterval=5
        ):
            batch = collate(data, order[b * batch_size : (b + 1) * batch_size], "train")
            with autocast(device):
                out = model(**{k: v.to(device) for k, v in batch.items()})
            out.loss.backward()
            if opt_cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, opt_cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(out.loss.detach()))
            seen += len(batch["input_ids"])
            window_cells += len(batch["input_ids"])
            state.step += 1
            if state.step % cfg.log_every == 0:
                now = time.perf_counter()
                logger.info(
                    "epoch %d/%d step %d/%d loss %.4f %.0f cells/s ETA %s",
                    epoch + 1, opt_cfg.num_train_epochs, state.step, total,
                    float(np.mean(losses[-cfg.log_every :])),
                    window_cells / max(now - window_start, 1e-9),
                    progress.eta(state.step - first_step, total - first_step, now - run_started),
                    extra=progress.PROGRESS,
                )  # fmt: skip
                window_cells, window_start = 0, now
        elapsed = time.perf_counter() - start
        val = evaluate(model, data, "val", batch_size, device)
        state.epoch = epoch + 1
        state.optimizer, state.scheduler = optimizer.state_dict(), scheduler.state_dict()
        metrics = {
            "epoch": state.epoch, "step": state.step, "train_loss": float(np.mean(losses)),
            "val_loss": cross_entropy(val["y_true"], val["scores"]),
            "val_macro_f1": val["macro_f1"], "val_accuracy": val["accuracy"],
            "val_roc_auc_ovr": val["roc_auc_ovr"], "samples_per_s": seen / max(elapsed, 1e-9),
            "lr": scheduler.get_last_lr()[0],
        }  # fmt: skip
        logger.info(
            "epoch %d/%d done: loss %.4f val_loss %.4f val macro F1 %.3f accuracy %.3f "
            "(%.0f cells/s) ETA %s",
            state.epoch, opt_cfg.num_train_epochs, metrics["train_loss"], metrics["val_loss"],
            val["macro_f1"], val["accuracy"], metrics["samples_per_s"],
            progress.eta(state.step - first_step, total - first_step,
                         time.perf_counter() - run_started),
            extra=progress.PROGRESS,
        )  # fmt: skip
        if on_epoch is not None:
            on_epoch(metrics, model, state)
    return model, metrics
