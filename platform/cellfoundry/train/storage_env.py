"""The driver's object-storage settings, carried into Ray workers and actors.

:mod:`cellfoundry.storage` configures its clients from the process environment
(``AWS_ENDPOINT_URL``, keys, region; ``STORAGE_EMULATOR_HOST``, ...). A Ray worker runs with
the environment its node was started with, which on a cluster the driver joined (or in a
test whose S3 server started after Ray) lacks the driver's settings. So a stage that hands
a URI to workers captures the settings on the driver (:meth:`StorageEnv.capture`) and passes
them as an argument of the task or actor, as the pickled filesystems of
:mod:`cellfoundry.storage` travel, never in a runtime env or ``train_loop_config`` (Ray
records both in its state API and dashboard). Nodes whose own environment is configured
(instance or pod roles) need nothing: a local run captures nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellfoundry import storage

#: What :mod:`cellfoundry.storage` reads from the environment (endpoint, region, keys).
STORAGE_ENV = (*storage._S3_ENV, *storage._GCS_ENV)


@dataclass(frozen=True)
class StorageEnv:
    """Object-storage variables of the driver, to apply inside a Ray worker or actor."""

    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def capture(cls, *paths: str | Path | None) -> StorageEnv:
        """The driver's settings when one of ``paths`` is on object storage, else none (a
        local run passes no credentials around)."""
        if not any(p is not None and storage.is_remote(p) for p in paths):
            return cls()
        return cls({k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k)})

    def __repr__(self) -> str:  # never print the keys
        return f"StorageEnv({sorted(self.env)})"

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block, this process's environment holds these settings; the previous
        values come back afterwards (Ray reuses worker processes)."""
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


class WithStorageEnv:
    """``fn(config)`` run under a :class:`StorageEnv`: a Ray Train loop function that
    carries the driver's storage settings inside the pickled function, not in
    ``train_loop_config``."""

    def __init__(self, fn: Callable[[dict[str, Any]], Any], env: StorageEnv) -> None:
        self.fn, self.env = fn, env
        self.__name__ = getattr(fn, "__name__", "train_loop")

    def __call__(self, config: dict[str, Any]) -> Any:
        with self.env.applied():
            return self.fn(config)
