"""Progress of Ray workers on the driver's console: step lines of training, fine-tuning
and Tune trials, and what workers warn about.

Local clusters start with ``log_to_driver=False`` (:func:`cellfoundry.runtime.init_ray`):
Ray's forwarding would bring every worker's stdout and stderr along (DeepSpeed's banners,
library warnings, Ray internals), which made ``make demo`` unreadable, and would make
tests noisy. Then nothing a training worker logs reaches the console. So only what
cellfoundry's own loggers say on a worker at WARNING or above, or mark as progress
(``logger.info(..., extra=PROGRESS)``), travels: a logging handler on the worker hands it
to a small actor that the driver creates (:func:`relay`), and a driver thread drains that
actor every second and logs each line under the logger name it had on the worker.

Why an actor rather than ``ray.train.report`` metrics: reports reach Ray Train's
controller, not the driver (and ``Result.metrics`` keeps only reports with a checkpoint),
Tune trials and plain tasks have other channels again, and a driver-side callback would
see numbers, not the worker's line. One actor handle works the same for Train workers,
Tune trials and tasks, on any node, and costs one idle process (``num_cpus=0``, one per
driver). When
the driver already receives workers' output (it joined a cluster, ``log_to_driver=True``),
no relay is made, so no line is printed twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

_MARK = "cellfoundry_progress"
#: ``logger.info(..., extra=PROGRESS)`` marks a record as a progress line for the driver.
PROGRESS: dict[str, Any] = {_MARK: True}
#: ``CELLFOUNDRY_PROGRESS=0`` turns the relay off (workers' lines stay in their logs).
ENV = "CELLFOUNDRY_PROGRESS"
#: One line as it travels: (logger name, level, message).
Line = tuple[str, int, str]


def is_relayed(record: logging.LogRecord) -> bool:
    """A progress line, or a warning or error (what the driver's console must show)."""
    return record.levelno >= logging.WARNING or bool(getattr(record, _MARK, False))


def format_duration(seconds: float) -> str:
    """``75.0`` -> ``"1m15s"``; ``4000`` -> ``"1h06m"``; under a minute ``"42s"``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta(done: int, total: int, elapsed_s: float) -> str:
    """Time left at the pace so far: ``done`` of ``total`` units took ``elapsed_s``."""
    if done <= 0:
        return "?"
    return format_duration(elapsed_s / done * max(total - done, 0))


class ProgressBoard:
    """Lines waiting for the driver (the relay actor's class; plain Python). Keeps at most
    ``limit`` lines; older ones are dropped and counted if the driver stops draining."""

    def __init__(self, limit: int = 10_000) -> None:
        self._lines: list[Line] = []
        self._limit = limit
        self.dropped = 0

    def push(self, lines: list[Line]) -> None:
        self._lines.extend(lines)
        if len(self._lines) > self._limit:
            self.dropped += len(self._lines) - self._limit
            del self._lines[: len(self._lines) - self._limit]

    def drain(self) -> list[Line]:
        lines, self._lines = self._lines, []
        return lines


class RelayHandler(logging.Handler):
    """Sends relayed records (:func:`is_relayed`) to ``send``, prefixed with ``[tag]``.

    Never raises: a lost line must not stop training."""

    def __init__(self, send: Callable[[list[Line]], None], tag: str = "") -> None:
        super().__init__(logging.INFO)
        self._send = send
        self.tag = tag

    def emit(self, record: logging.LogRecord) -> None:
        if not is_relayed(record):
            return
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            if self.tag:
                message = f"[{self.tag}] {message}"
            self._send([(record.name, record.levelno, message)])
        except Exception:  # the driver may be gone; training goes on
            pass


def install_handler(handler: RelayHandler) -> None:
    """Put ``handler`` on the ``cellfoundry`` logger, replacing an earlier relay handler
    (a reused worker process gets the current run's)."""
    root = logging.getLogger("cellfoundry")
    for old in [h for h in root.handlers if isinstance(h, RelayHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)


@dataclass(frozen=True)
class ProgressLink:
    """What a worker needs to reach the driver's console: the relay actor's handle
    (picklable; pass it in a train loop config or a task's arguments)."""

    board: Any

    def install(self, tag: str = "") -> None:
        """Relay this process's progress lines and warnings (see :func:`is_relayed`).

        Each line is delivered before the logging call returns (``ray.get`` on the push),
        so a run's last line is on the board before the run's result reaches the driver."""
        import ray

        board = self.board

        def send(lines: list[Line]) -> None:
            ray.get(board.push.remote(lines), timeout=10)

        install_handler(RelayHandler(send, tag))


def install(link: ProgressLink | None, tag: str = "") -> None:
    """On a worker: :meth:`ProgressLink.install` when the driver made a relay."""
    if link is not None:
        link.install(tag)


def driver_sees_worker_output() -> bool:
    """True when Ray already forwards workers' stdout / stderr to this driver
    (``ray.init(log_to_driver=True)``, as when joining a cluster)."""
    try:
        import ray._private.worker as ray_worker

        thread = getattr(ray_worker.global_worker, "logger_thread", None)
    except (ImportError, AttributeError):  # Ray's internals moved: relay (a line twice at worst)
        return False
    return thread is not None and thread.is_alive()


def emit(lines: list[Line]) -> None:
    """Log ``lines`` in this process under the names they had on the worker."""
    for name, level, message in lines:
        logging.getLogger(name).log(level, "%s", message)


@contextlib.contextmanager
def relay(poll_s: float = 1.0) -> Iterator[ProgressLink | None]:
    """On the driver: the relay actor and a thread that logs what workers send to it, every
    ``poll_s`` seconds and once more at the end; yields the link to hand to workers, or
    None when there is nothing to do (Ray not started, workers' output already reaches
    this driver, or ``CELLFOUNDRY_PROGRESS=0``)."""
    import ray

    if not ray.is_initialized() or os.environ.get(ENV, "1") == "0" or driver_sees_worker_output():
        yield None
        return
    board = _board()
    stop = threading.Event()

    def pump() -> None:
        while not stop.wait(poll_s):
            try:
                emit(ray.get(board.drain.remote(), timeout=30))
            except Exception as exc:  # progress must not fail the run
                logger.debug("progress relay: %s", exc)

    thread = threading.Thread(target=pump, name="cellfoundry-progress", daemon=True)
    thread.start()
    try:
        yield ProgressLink(board)
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):
            emit(ray.get(board.drain.remote(), timeout=30))


_BOARDS: dict[str, Any] = {}


def _board() -> Any:
    """The relay actor of this driver's Ray job, made once (starting a process costs about
    a second; every stage of a demo or test session reuses it). It ends with the job."""
    import ray

    context = ray.get_runtime_context()
    # job ids restart with every cluster: the node names the cluster this handle lives in
    job = f"{context.get_node_id()}/{context.get_job_id()}"
    if job not in _BOARDS:
        _BOARDS.clear()  # a previous Ray session's actor is gone with it
        _BOARDS[job] = ray.remote(num_cpus=0, max_restarts=0)(ProgressBoard).remote()
    return _BOARDS[job]
