"""Starting or joining Ray the same way in the CLI, jobs, tests, demo and benchmarks."""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cellfoundry.config.schema import ActorPoolConfig, RayConfig

logger = logging.getLogger(__name__)

# Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is imported, so this module sets it
# on import and must be imported before `ray` (the CLI, jobs and tests do so).
_IMPORT_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
if "ray" not in sys.modules:
    for _key, _value in _IMPORT_ENV.items():
        os.environ.setdefault(_key, _value)

#: Set before a local cluster starts: loopback-only sockets and no usage stats
#: (PITFALLS.md). A user's own values win. Token auth is set up by :func:`ensure_cluster_token`.
LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray Train's preemption watcher reports spot nodes being taken away; one machine has
    # none to lose. Its actor gets the workers' handles as constructor arguments, which
    # makes Ray log an ERROR-level line ("PreemptionWatcher ... has constructor arguments
    # in the object store") on every training run (docs/logging.md). Clusters that are
    # joined keep it.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}

AUTH_MODE, AUTH_TOKEN, AUTH_TOKEN_PATH = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
#: The file name of a cluster token written by :func:`ensure_cluster_token`.
TOKEN_FILE = "ray_auth_token"


def write_token_file(directory: str | Path) -> Path:
    """Write a new random Ray auth token to ``directory/ray_auth_token`` (mode 0600, created
    exclusively, so an existing file is never overwritten) and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def ensure_cluster_token() -> str | None:
    """Turn on Ray token auth for a cluster this process is about to start; return the path
    of the token file (None when auth is off or the token comes from ``$RAY_AUTH_TOKEN``).

    A Ray worker's gRPC port runs whatever a caller sends it (it unpickles request data), so
    every cluster cellfoundry starts requires Ray's token. A token already given through
    ``$RAY_AUTH_TOKEN`` or ``$RAY_AUTH_TOKEN_PATH`` is used as it is; otherwise a random one
    is written 0600 into a fresh 0700 folder (removed at exit) and exported as
    ``RAY_AUTH_TOKEN_PATH``, which the cluster's processes and any job it runs inherit.
    ``RAY_AUTH_MODE=disabled``, set by the user, is honoured with a warning.
    """
    mode = os.environ.get(AUTH_MODE, "").lower()
    if mode == "disabled":
        logger.warning(
            "RAY_AUTH_MODE=disabled: this Ray cluster accepts calls without a token, so anyone "
            "who reaches one of its ports can run code as you; unset RAY_AUTH_MODE to turn "
            "token auth back on (docs/security.md)"
        )
        return None
    os.environ[AUTH_MODE] = "token"
    if os.environ.get(AUTH_TOKEN):
        path = None
    elif os.environ.get(AUTH_TOKEN_PATH) and Path(os.environ[AUTH_TOKEN_PATH]).is_file():
        path = os.environ[AUTH_TOKEN_PATH]
    else:
        folder = tempfile.mkdtemp(prefix="cellfoundry-ray-")  # mode 0700
        path = str(write_token_file(folder))
        atexit.register(shutil.rmtree, folder, True)
        os.environ[AUTH_TOKEN_PATH] = path
    _refresh_ray_auth_config()
    logger.debug("Ray token auth on (token %s)", path or "from $RAY_AUTH_TOKEN")
    return path


def _refresh_ray_auth_config() -> None:
    """Ray caches its config (auth mode included) and the token on first use; re-read both
    from the environment, as Ray itself does when it turns token auth on."""
    if "ray" not in sys.modules:
        return
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def init_ray(cfg: RayConfig | None = None) -> bool:
    """Connect to Ray per ``cfg``; return True when this call started a new local cluster.

    Order: an already initialised Ray is reused; ``cfg.address`` or ``$RAY_ADDRESS`` (set by
    ``ray job submit``) joins that cluster (with the token in ``$RAY_AUTH_TOKEN`` or
    ``$RAY_AUTH_TOKEN_PATH`` when it requires one); otherwise a local cluster listening on
    127.0.0.1 only, with Ray token auth on (:func:`ensure_cluster_token`), is started with
    ``num_cpus`` and ``object_store_memory``.
    """
    import ray

    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("joining Ray cluster at %s", address)
        try:
            ray.init(address=address, log_to_driver=True)
        except ray.exceptions.AuthenticationError as exc:
            raise RuntimeError(
                f"the Ray cluster at {address} refused this process's token: set "
                "RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN or "
                "RAY_AUTH_TOKEN_PATH (docs/security.md)"
            ) from exc
        return False
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    ensure_cluster_token()
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        logger.warning(
            "ray was imported before cellfoundry.runtime: the local cluster may listen beyond "
            "127.0.0.1; import cellfoundry.runtime first or export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
        )
    ray.init(
        address="local",
        num_cpus=cfg.num_cpus,
        object_store_memory=cfg.object_store_memory,
        include_dashboard=False,
        log_to_driver=False,
    )
    logger.info(
        "started a local Ray cluster on 127.0.0.1 (%s CPUs, token auth %s)",
        ray.cluster_resources().get("CPU"),
        "on" if os.environ.get(AUTH_MODE) == "token" else "OFF",
    )
    return True


def configure_data_context(interactive: bool | None = None) -> None:
    """Deterministic Ray Data execution (output order follows input order) and how it shows
    progress. ``interactive`` (default: stdout is a terminal): Ray Data's progress bars.
    Otherwise (a log file, CI, ``ray job submit``) no bars: without a terminal Ray Data
    would log a 10-line status block of every running dataset every 10 s; instead one line
    when each operator starts and one when it finishes (:mod:`cellfoundry.datalog`)."""
    import ray.data

    from cellfoundry import datalog

    if interactive is None:
        interactive = sys.stdout.isatty()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = interactive
    if interactive:
        datalog.unregister(ctx)
    else:
        datalog.register(ctx)
        from ray.util.debug import log_once

        # the first dataset would log that bars are off and how to turn them on: we chose
        # that (uses up Ray Data's one-time warning; if the key changes it just shows)
        log_once("ray_data_progress_manager_disabled")


def actor_pool(pool: ActorPoolConfig) -> Any:
    """Ray Data's autoscaling ``ActorPoolStrategy`` between ``pool.min_actors`` and
    ``pool.max_actors`` (None: no fixed cap). Ray Data sizes it to the work queued and the
    resources of the cluster as it is now, so nodes that join while a step runs get actors."""
    import ray.data

    return ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors)


def job_main(
    run: Callable[[str, list[str]], Any], doc: str | None, argv: Sequence[str] | None = None
) -> int:
    """What a ``jobs/<stage>.py`` entrypoint does: parse ``--config FILE``, repeated
    ``--set KEY=VALUE`` and ``--overwrite`` (as the CLI's), set up logging, call ``run(config, overrides)`` and print its
    JSON-able summary."""
    import argparse
    import json

    from cellfoundry.logs import drop_stderr_lines, no_bars_without_terminal, setup_logging

    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="the output may replace an artifact of another kind (never other files)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    setup_logging()
    if argv is None:  # the job script itself, not a test calling it in-process
        no_bars_without_terminal()
        drop_stderr_lines()
    from cellfoundry.artifacts import allow_overwrite

    with allow_overwrite(args.overwrite):
        summary = run(args.config, args.set)
    print(json.dumps(summary, indent=2, default=str))
    return 0
