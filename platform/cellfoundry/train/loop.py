"""The per-worker pretraining loop that ``ray.train.torch.TorchTrainer`` runs on every worker.

It reads only its config. Resuming: Ray Train hands the latest checkpoint of the run to
``ray.train.get_checkpoint()`` both after a worker failure (``FailureConfig``) and when a
run is started again with the same name and storage path; the loop restores the DeepSpeed
engine from it and continues at the next step, with the same batches, masks and dropout
an uninterrupted run would have used. Its data position is the step alone: each rank
streams its share of the shards (``cellfoundry.train.stream``) and a resumed run reads only
the window it resumes in. With ``data.validation``, every ``eval_every`` steps (and at the
last step) all ranks score the same held-out micro-batches and rank 0 logs ``val_loss`` and
``val_accuracy`` in the row of that step.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cellfoundry import progress
from cellfoundry.config.loader import config_to_dict, parse_config
from cellfoundry.config.train import PretrainJobConfig
from cellfoundry.logs import setup_logging
from cellfoundry.model import build_model
from cellfoundry.train.checkpoint import (
    load_training_checkpoint,
    save_training_checkpoint,
    step_tag,
)
from cellfoundry.train.data import derive_seed
from cellfoundry.train.metrics import CSV_FILE, MetricsLogger, gpu_peak_flops
from cellfoundry.train.objective import MaskedLMObjective, training_flops
from cellfoundry.train.optim import build_optimizer, build_scheduler
from cellfoundry.train.setup import RunSpec, prepare_run
from cellfoundry.train.zero import deepspeed_config, initialize_engine, resolve_settings

logger = logging.getLogger(__name__)

#: Test hook: rank 0 raises once (a marker file in the log folder remembers) when it is
#: about to run this optimizer step, so that ``FailureConfig`` restarts the workers.
FAIL_ONCE_ENV = "CELLFOUNDRY_FAIL_ONCE_AT_STEP"


def _maybe_fail(step: int, rank: int, log_dir: str) -> None:
    value = os.environ.get(FAIL_ONCE_ENV)
    if rank != 0 or not value or int(value) != step:
        return
    marker = Path(log_dir) / f".failed_once_at_step_{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    raise RuntimeError(f"{FAIL_ONCE_ENV}={value}: failing once before step {step} (test hook)")


class Window:
    """Sums over the micro-batches since the last metric row, kept on the device (no host
    sync per step) until :meth:`reduce`."""

    FIELDS = ("loss_sum", "micro", "correct", "masked", "tokens", "sq_lengths")

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=device)
        self.started = time.perf_counter()

    def add(self, out: Any, attention_mask: torch.Tensor) -> None:
        lengths = attention_mask.sum(dim=1).double()  # (B,)
        one = torch.ones((), dtype=torch.float64, device=lengths.device)
        values = [out.loss.detach().double(), one, out.n_correct.double(), out.n_masked.double(),
                  lengths.sum(), (lengths * lengths).sum()]  # fmt: skip
        self.sums += torch.stack(values)

    def reduce(self) -> dict[str, float]:
        """Sums over all ranks (collective)."""
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.sums)
        return dict(zip(self.FIELDS, self.sums.tolist(), strict=True))


@torch.no_grad()
def evaluate(
    engine: Any, batches: list[dict[str, torch.Tensor]], device: torch.device
) -> dict[str, float]:
    """``val_loss`` (cross-entropy averaged over every masked token of ``batches`` on all
    ranks) and ``val_accuracy``; a collective. Eval mode (no dropout), no RNG drawn."""
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss x masked, correct, masked
    engine.eval()
    for batch in batches:
        out = engine(**{k: v.to(device) for k, v in batch.items()})
        masked = out.n_masked.double()
        sums += torch.stack([out.loss.double() * masked, out.n_correct.double(), masked])
    engine.train()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    loss_sum, correct, masked = sums.tolist()
    return {"val_loss": loss_sum / max(masked, 1.0), "val_accuracy": correct / max(masked, 1.0)}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Pretrain on this worker. ``config``: ``{"job": config_to_dict(PretrainJobConfig)}``,
    optionally ``"indexes"``: the driver's ``RunSpec.indexes_state()`` (else each worker
    indexes the shards itself, with the same result)."""
    import ray.train
    import ray.train.torch

    setup_logging()
    cfg = parse_config(PretrainJobConfig, config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if rank == 0:  # rank 0's lines (and warnings) on the driver's console
        progress.install(config.get("progress"))
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    settings = resolve_settings(
        cfg, on_gpu=on_gpu, bf16_supported=on_gpu and torch.cuda.is_bf16_supported()
    )
    if rank == 0:
        for note in settings.notes:
            logger.warning(note)
    run = prepare_run(cfg, rank=rank, world_size=world, indexes=config.get("indexes"))
    plan, batches = run.plan, run.batches
    assert batches is not None
    # the same cells and masks at every evaluation: a few micro-batches, kept in memory
    held_out = None
    if run.validation is not None:
        held_out = [run.validation.batch(i) for i in range(run.validation_batches)]

    model = build_model(run.model_config, seed=cfg.seed).to(device)
    objective = MaskedLMObjective(model)
    optimizer = build_optimizer(objective, cfg.optim, cpu_adam=settings.offload_optimizer)
    scheduler = build_scheduler(optimizer, plan, cfg.optim)
    engine = initialize_engine(objective, optimizer, scheduler, deepspeed_config(cfg, settings))

    state: dict[str, Any] = {"step": 0, "tokens": 0.0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_training_checkpoint(engine, Path(directory))
            if rank == 0:
                _seed_metrics(Path(directory) / CSV_FILE, Path(cfg.tracking.log_dir or ""))
    start = int(state["step"])
    end = plan.total_steps if cfg.stop_at_step is None else min(plan.total_steps, cfg.stop_at_step)
    peak = (
        gpu_peak_flops(torch.cuda.get_device_name(device))
        if on_gpu and settings.dtype == "bf16"
        else None
    )
    metrics_log = None
    if rank == 0:
        logger.info(
            "training steps %d..%d of %d (warm-up %d, %d per epoch), %d workers, ZeRO-%d, %s, %s",
            start + 1, end, plan.total_steps, plan.warmup_steps, plan.steps_per_epoch, world,
            cfg.deepspeed.stage, settings.dtype, device, extra=progress.PROGRESS,
        )  # fmt: skip
        params = _flatten(config_to_dict(cfg))
        params.update(
            {
                "total_steps": plan.total_steps,
                "warmup_steps": plan.warmup_steps,
                "world_size": world,
                "train_cells": run.n_cells,
                "validation_cells": run.validation_index.total if run.validation_index else 0,
            }
        )
        metrics_log = MetricsLogger(
            cfg.tracking, resume_step=start, params=params, run_name=cfg.run.name or ""
        )

    accum = cfg.optim.grad_accum
    window, last = Window(device), {"step": start, "loss": float("nan"), "accuracy": float("nan")}
    engine.train()
    run_started = time.perf_counter()  # for the ETA: this run's pace, evaluations included
    for step in range(start, end):
        _maybe_fail(step, rank, cfg.tracking.log_dir or "")
        lr = engine.get_lr()[0]
        for a in range(accum):
            micro = step * accum + a
            batch = {k: v.to(device) for k, v in batches.batch(micro).items()}
            torch.manual_seed(derive_seed(cfg.seed, 2, rank, micro))  # dropout
            out = engine(**batch)
            engine.backward(out.loss)
            engine.step()
            window.add(out, batch["attention_mask"])
        done = step + 1
        save_now = done % cfg.checkpoint_every == 0 or done == end
        eval_now = held_out is not None and (done % cfg.eval_every == 0 or done == plan.total_steps)
        if done % cfg.log_every == 0 or save_now or eval_now:
            elapsed = time.perf_counter() - window.started
            sums = window.reduce()
            flops = training_flops(
                run.model_config, sums["tokens"], sums["sq_lengths"], sums["masked"]
            )
            state["tokens"] = float(state["tokens"]) + sums["tokens"]
            last = {
                "step": done,
                "epoch": done * accum / batches.micro_per_epoch,
                "loss": sums["loss_sum"] / sums["micro"],
                "accuracy": sums["correct"] / max(sums["masked"], 1.0),
                "lr": lr,
                "grad_norm": _grad_norm(engine),
                "tokens": state["tokens"],
                "tokens_per_s": sums["tokens"] / elapsed,
                "tflops_per_s": flops / elapsed / 1e12,
                "mfu": flops / (elapsed * world * peak) if peak else None,
                "elapsed_s": elapsed,
            }
            if eval_now:
                assert held_out is not None
                last.update(evaluate(engine, held_out, device))
            if metrics_log is not None:
                metrics_log.log(last)
                logger.info(
                    "step %d/%d loss %.4f acc %.4f%s lr %.3g %.0f tokens/s ETA %s", done,
                    plan.total_steps, last["loss"], last["accuracy"],
                    f" val_loss {last['val_loss']:.4f}" if eval_now else "", lr,
                    last["tokens_per_s"],
                    progress.eta(done - start, end - start, time.perf_counter() - run_started),
                    extra=progress.PROGRESS,
                )  # fmt: skip
            window = Window(device)  # evaluation time is not training time
        if save_now:
            state["step"] = done
            _save_and_report(
                engine, cfg, run, state, last, rank, completed=done == plan.total_steps
            )
            window = Window(device)  # the checkpoint's time is not training time
    if metrics_log is not None:
        metrics_log.close(finished=end == plan.total_steps)


def _seed_metrics(saved: Path, log_dir: Path) -> None:
    """Start the local metrics.csv from the checkpoint's copy when this node has none (rank
    0 resumed on another machine, with no shared filesystem): the rows before the resumed
    step are kept, as on the machine that wrote them."""
    if saved.is_file() and not (log_dir / CSV_FILE).is_file():
        log_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(saved, log_dir / CSV_FILE)


def _save_and_report(
    engine: Any, cfg: PretrainJobConfig, run: RunSpec, state: dict[str, Any], last: dict[str, Any],
    rank: int, *, completed: bool,
) -> None:  # fmt: skip
    """Write this rank's part of the checkpoint and report it with the latest metrics."""
    import ray.train

    extra = {
        "preset": cfg.model.preset,
        "step": state["step"],
        "tokens": state["tokens"],
        "seed": cfg.seed,
    }
    with tempfile.TemporaryDirectory(prefix="cellfoundry-ckpt-") as tmp:
        save_training_checkpoint(
            engine,
            Path(tmp),
            state=dict(state),
            token_dictionary=run.token_dictionary,
            extra=extra,
            rank=rank,
        )
        csv_file = Path(cfg.tracking.log_dir or "") / CSV_FILE
        if rank == 0 and csv_file.is_file():
            # the rows so far travel with the checkpoint: the driver and a resumed rank 0
            # may run on machines that cannot see this node's log folder
            shutil.copy2(csv_file, Path(tmp) / CSV_FILE)
        metrics = {k: v for k, v in last.items() if v is not None}
        metrics.update(step=state["step"], completed=completed, total_steps=run.plan.total_steps)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_{step_tag(state['step'])}",
        )


def _grad_norm(engine: Any) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (MLflow parameters)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
