"""The one logging setup of cellfoundry: call :func:`setup_logging` once per process."""

from __future__ import annotations

import logging
import os

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
