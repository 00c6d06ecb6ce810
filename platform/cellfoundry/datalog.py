"""One log line per Ray Data operator start and finish, for runs without a terminal.

Ray Data shows progress bars on a terminal; without one it would log a 10-line status
block of every running dataset every 10 s (what made ``make demo``'s log ~600 lines).
:func:`cellfoundry.runtime.configure_data_context` turns those off in non-interactive runs
and registers :class:`OperatorLines` through ``DataContext.custom_execution_callback_classes``
(Ray Data's hook for execution callbacks), which logs when each operator starts (its first
task) and finishes (rows out, seconds). It reads operator state through duck-typed
attributes: if a Ray upgrade moves them, it logs nothing rather than failing a run.
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger("cellfoundry.data")


def _base() -> type:
    try:
        from ray.data._internal.execution.execution_callback import ExecutionCallback
    except ImportError:  # moved in a Ray upgrade: the class still works as a plain object
        return object
    return ExecutionCallback


class OperatorLines(_base()):  # type: ignore[misc]
    """Ray Data execution callback: ``<dataset>: <operator> started`` once its first task
    runs, ``<dataset>: <operator> done: N rows in S s`` once it has finished."""

    def __init__(self) -> None:
        self._started: dict[Any, float] = {}
        self._done: set[Any] = set()

    def before_execution_starts(self, executor: Any) -> None:
        self._started, self._done = {}, set()

    def on_execution_step(self, executor: Any) -> None:
        try:
            self._step(executor)
        except Exception as exc:  # progress lines must never fail a dataset
            logger.debug("operator lines: %s", exc)

    def after_execution_succeeds(self, executor: Any) -> None:
        self.on_execution_step(executor)

    def after_execution_fails(self, executor: Any, error: Exception) -> None:
        pass  # Ray Data logs the failure itself

    def _step(self, executor: Any) -> None:
        topology = getattr(executor, "_topology", None) or {}
        dataset = getattr(executor, "_dataset_id", "dataset")
        now = time.perf_counter()
        for op in topology:
            name = getattr(op, "name", "")
            if name == "Input" or op in self._done:
                continue
            metrics = getattr(op, "metrics", None)
            submitted = getattr(metrics, "num_tasks_submitted", 0) or 0
            if op not in self._started and submitted > 0:
                self._started[op] = now
                logger.info("%s: %s started", dataset, name)
            if op in self._started and op.has_execution_finished():
                self._done.add(op)
                rows = getattr(metrics, "row_outputs_taken", None)
                logger.info(
                    "%s: %s done: %s rows in %.1f s",
                    dataset, name, "?" if rows is None else f"{rows:,}", now - self._started[op],
                )  # fmt: skip


def register(ctx: Any) -> None:
    """Add :class:`OperatorLines` to ``ctx.custom_execution_callback_classes`` (once)."""
    classes = getattr(ctx, "custom_execution_callback_classes", None)
    if classes is not None and OperatorLines not in classes:
        classes.append(OperatorLines)


def unregister(ctx: Any) -> None:
    """Remove :class:`OperatorLines` from ``ctx`` (interactive runs show bars instead)."""
    classes = getattr(ctx, "custom_execution_callback_classes", None)
    if classes is not None and OperatorLines in classes:
        classes.remove(OperatorLines)
