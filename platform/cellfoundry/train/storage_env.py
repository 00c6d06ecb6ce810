"""The driver's object-storage settings in a Ray Train loop (:class:`WithStorageEnv`).

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

from collections.abc import Callable
from typing import Any

from cellfoundry.storage import StorageEnv

__all__ = ["StorageEnv", "WithStorageEnv"]


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
