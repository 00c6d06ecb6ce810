"""The one logging setup of cellfoundry: call :func:`setup_logging` once per process."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Sequence

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(level: str | int | None = None) -> None:
    """Configure the root ``cellfoundry`` logger (idempotent).

    ``level`` defaults to ``$CELLFOUNDRY_LOG_LEVEL`` or INFO. Library modules only ever call
    ``logging.getLogger(__name__)``; entrypoints (CLI, jobs, Ray workers) call this.
    """
    level = level or os.environ.get("CELLFOUNDRY_LOG_LEVEL", "INFO")
    logger = logging.getLogger("cellfoundry")
    logger.setLevel(level)
    if not any(getattr(h, "_cellfoundry", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler._cellfoundry = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False


def no_bars_without_terminal() -> None:
    """Without a terminal on stderr (a log file, CI, ``ray job submit``), turn tqdm's bars
    off (``TQDM_DISABLE=1``: ours, transformers' weight loading): there each redraw would
    be a line of its own. Only for entrypoints, before tqdm is imported (tqdm reads the
    variable then); Ray workers started by this process inherit it. A user's value wins."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")


#: Console lines that are known false alarms, dropped by :func:`drop_stderr_lines` (they
#: stay in Ray's own log files). Ray Data puts every actor pool's map function in the
#: object store and creates the pool's actors with ``max_restarts=-1``, so Ray's core worker
#: logs "MapWorker(...) has constructor arguments in the object store and max_restarts > 0"
#: at ERROR level once per driver process whatever the user's code does (ray-project/ray
#: #57733, open; the restart caveat itself is #53727). Matched on the class name too, so the
#: same message about an actor of ours still shows (docs/logging.md).
KNOWN_RAY_NOISE = (
    re.compile(
        rb"core_worker\.cc:\d+: Actor with class name: 'MapWorker\(.*' and ID: '[0-9a-f]+' "
        rb"has constructor arguments in the object store and max_restarts > 0"
    ),
)


def drop_stderr_lines(patterns: Sequence[re.Pattern[bytes]] = KNOWN_RAY_NOISE) -> bool:
    """Filter this process's file descriptor 2 (Python and native code alike): lines that
    match one of ``patterns`` are dropped, everything else is passed on unchanged. Only for
    entrypoints (the CLI, job scripts): a test runner's own stderr capture must not be
    wrapped. ``CELLFOUNDRY_RAW_STDERR=1`` turns it off. Returns True when installed.

    A background thread copies a pipe to the original stderr; at exit the original is put
    back and the pipe drained, so nothing written before exit (a traceback) is lost.
    Partial lines (progress bars' ``\\r`` updates) pass at once unless they start like a
    Ray native log line (``[``), which waits for its newline to be matched whole."""
    if os.environ.get("CELLFOUNDRY_RAW_STDERR") == "1" or _FILTER:
        return False
    try:
        sys.stderr.flush()
        original = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
    except OSError:
        return False

    def keep(line: bytes) -> bool:
        return not any(p.search(line) for p in patterns)

    def pump() -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(read_end, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            out = b"".join(line + b"\n" for line in lines if keep(line))
            if pending and not pending.startswith(b"["):
                out, pending = out + pending, b""
            if out:
                os.write(original, out)
        if pending and keep(pending):
            os.write(original, pending)
        os.close(read_end)

    thread = threading.Thread(target=pump, name="cellfoundry-stderr", daemon=True)
    thread.start()

    def restore() -> None:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(original, 2)  # closes the pipe's last write end: the pump sees EOF
        thread.join(timeout=5)

    atexit.register(restore)
    _FILTER.append(thread)
    return True


_FILTER: list[threading.Thread] = []
