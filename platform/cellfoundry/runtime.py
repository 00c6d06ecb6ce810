"""Starting or joining Ray the same way in the CLI, jobs, tests, demo and benchmarks."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cellfoundry.config.schema import RayConfig

logger = logging.getLogger(__name__)

# Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is imported, so this module sets it
# on import and must be imported before `ray` (the CLI, jobs and tests do so).
_IMPORT_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
if "ray" not in sys.modules:
    for _key, _value in _IMPORT_ENV.items():
        os.environ.setdefault(_key, _value)

#: Set before a local cluster starts: loopback-only sockets, no usage stats, and no token
#: auth for a private in-process cluster (PITFALLS.md). A user's own values win.
LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
}


def init_ray(cfg: RayConfig | None = None) -> bool:
    """Connect to Ray per ``cfg``; return True when this call started a new local cluster.

    Order: an already initialised Ray is reused; ``cfg.address`` or ``$RAY_ADDRESS`` (set by
    ``ray job submit``) joins that cluster; otherwise a local cluster listening on
    127.0.0.1 only is started with ``num_cpus`` and ``object_store_memory``.
    """
    import ray

    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return False
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
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
        "started a local Ray cluster on 127.0.0.1 (%s CPUs)", ray.cluster_resources().get("CPU")
    )
    return True


def configure_data_context() -> None:
    """Deterministic Ray Data execution: output order follows input order, progress bars on."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = True


def job_main(
    run: Callable[[str, list[str]], Any], doc: str | None, argv: Sequence[str] | None = None
) -> int:
    """What a ``jobs/<stage>.py`` entrypoint does: parse ``--config FILE`` and repeated
    ``--set KEY=VALUE``, set up logging, call ``run(config, overrides)`` and print its
    JSON-able summary."""
    import argparse
    import json

    from cellfoundry.logs import setup_logging

    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    setup_logging()
    print(json.dumps(run(args.config, args.set), indent=2, default=str))
    return 0
