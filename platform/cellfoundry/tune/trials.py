"""Pieces of a Tune search: the search space from the config, trial checkpoints, the trial
table, and a callback that interrupts a search as a preemption would."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from ray.tune import Callback

from cellfoundry.integrity import refused_pickle_reason
from cellfoundry.tune.loop import TrainState

logger = logging.getLogger(__name__)

STATE_FILE = "trial_state.pt"


def search_space(space: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """Ray Tune distributions, nested like the finetune config: {"optim.learning_rate":
    {"loguniform": [1e-5, 1e-3]}} -> {"optim": {"learning_rate": tune.loguniform(...)}}."""
    from ray import tune

    makers = {"uniform": tune.uniform, "loguniform": tune.loguniform, "quniform": tune.quniform,
              "randint": tune.randint, "choice": lambda *c: tune.choice(list(c))}  # fmt: skip
    out: dict[str, Any] = {}
    for key, dist in space.items():
        (kind, args), *_ = dist.items()
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        try:
            node[leaf] = makers[kind](*args)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"space.{key}: bad arguments {args} for {kind}: {exc}") from exc
    return out


def save_trial_state(model: torch.nn.Module, state: TrainState, path: Path) -> None:
    """The trainable weights (all of them, or LoRA + head for QLoRA), optimizer, scheduler, epoch.

    Only tensors, numbers, strings and plain containers: :func:`load_trial_state` reads the
    file with ``torch.load(weights_only=True)``, which refuses anything else.
    """
    weights = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"weights": weights, "epoch": state.epoch, "step": state.step,
                "optimizer": state.optimizer, "scheduler": state.scheduler}, path)  # fmt: skip


def load_trial_state(model: torch.nn.Module, path: Path) -> TrainState:
    """Load what :func:`save_trial_state` wrote into ``model``; returns the training state.

    The file is read with ``torch.load(weights_only=True)``: a file that needs any class or
    function to unpickle (e.g. one planted in the run storage) raises a ``ValueError``
    naming it, and nothing in it runs.
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"refusing to load the trial state {path}: it holds more than tensors and plain "
            f"values ({refused_pickle_reason(exc)}), so cellfoundry did not write it and "
            "unpickling it could run code; delete it and resume the trial from an earlier "
            "checkpoint"
        ) from exc
    keys = ("weights", "epoch", "step", "optimizer", "scheduler")
    if not isinstance(data, dict) or any(k not in data for k in keys):
        raise ValueError(f"{path} is not a trial state written by save_trial_state")
    params = dict(model.named_parameters())
    missing = [n for n in data["weights"] if n not in params]
    if missing:
        raise ValueError(f"{path}: weights {missing[:3]} do not fit this model; same config?")
    with torch.no_grad():
        for name, value in data["weights"].items():
            params[name].copy_(value.to(params[name].device))
    return TrainState(data["epoch"], data["step"], data["optimizer"], data["scheduler"])


def trial_table(results: Any, metric: str) -> list[dict[str, Any]]:
    """One row per trial: id, status, params, epochs, last and best ``metric``."""
    rows = []
    for r in results:
        df = r.metrics_dataframe
        best = float(df[metric].max()) if df is not None and metric in df else None
        rows.append({
            "trial_id": (r.metrics or {}).get("trial_id") or Path(r.path).name,
            "status": "ERROR" if r.error else ("TERMINATED" if (r.metrics or {}).get("done") else "UNFINISHED"),
            "params": r.config,
            "epochs": int((r.metrics or {}).get("training_iteration", 0)),
            metric: (r.metrics or {}).get(metric),
            f"best_{metric}": best,
        })  # fmt: skip
    return rows


class InterruptAfterTrials(Callback):
    """Stops a fresh search once ``n`` trials have finished by sending SIGUSR1 to the
    driver: Tune saves the experiment state and returns, as after a preemption. A restored
    search (one that began with >= ``n`` finished trials) is never stopped."""

    def __init__(self, n: int) -> None:
        self.n, self.done_at_start, self.completed, self.fired = n, None, 0, False

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self.done_at_start is None:
            self.done_at_start = sum(t.status == "TERMINATED" for t in trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.completed += 1
        start = self.done_at_start or 0
        if self.fired or start >= self.n or start + self.completed < self.n:
            return
        if threading.current_thread() is not threading.main_thread():
            logger.warning("interrupt_after_trials needs Tune in the main thread: ignored")
            return
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
            logger.warning("interrupt_after_trials: Tune catches no SIGUSR1 here: ignored")
            return
        self.fired = True
        logger.warning("interrupting the search after %d finished trials", self.n)
        os.kill(os.getpid(), signal.SIGUSR1)
