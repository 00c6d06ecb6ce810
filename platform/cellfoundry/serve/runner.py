"""Start (and stop) the serving application on a Ray cluster."""

from __future__ import annotations

import hashlib
import logging
import os
import time
import urllib.request
from dataclasses import dataclass

from cellfoundry import runtime
from cellfoundry.config import load_config
from cellfoundry.config.serve import ServeJobConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeHandle:
    """A running application: its base ``url`` and name."""

    url: str
    app_name: str

    def shutdown(self) -> None:
        """Delete this application (the Serve proxy and controller stay up)."""
        from ray import serve

        serve.delete(self.app_name)


def token_sha256(cfg: ServeJobConfig) -> str | None:
    """SHA-256 of the bearer token in ``$<cfg.auth_token_env>`` (None without auth)."""
    if cfg.auth_token_env is None:
        return None
    token = os.environ.get(cfg.auth_token_env)
    if not token:
        raise ValueError(
            f"auth_token_env={cfg.auth_token_env!r} but that environment variable is empty; "
            f"export {cfg.auth_token_env}=<a long random token> or drop auth_token_env"
        )
    return hashlib.sha256(token.encode()).hexdigest()


def run_serve(
    cfg: ServeJobConfig, *, blocking: bool = False, ready_timeout_s: float = 300.0
) -> ServeHandle:
    """Deploy the API of ``cfg`` and wait until ``/healthz`` answers; with ``blocking``,
    then serve until interrupted. Binds to ``cfg.http.host`` (127.0.0.1 by default)."""
    from ray import serve

    from cellfoundry.serve.app import build_app

    if cfg.http.host not in ("127.0.0.1", "localhost", "::1") and cfg.auth_token_env is None:
        logger.warning(
            "serving on %s without auth_token_env: anyone who reaches it can call the API",
            cfg.http.host,
        )
    token = token_sha256(cfg)
    runtime.init_ray(cfg.ray)
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    serve.run(
        build_app(cfg, token), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False
    )
    prefix = cfg.route_prefix.rstrip("/")
    url = f"http://{'127.0.0.1' if cfg.http.host in ('0.0.0.0', 'localhost') else cfg.http.host}:{cfg.http.port}{prefix}"
    _wait_healthy(f"{url}/healthz", ready_timeout_s)
    logger.info("serving %s at %s", cfg.model, url)
    handle = ServeHandle(url, cfg.app_name)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            handle.shutdown()
    return handle


def _wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s; see the Serve logs")
        time.sleep(0.5)


def run_serve_job(
    path: str, overrides: list[str] | None = None, *, blocking: bool = True
) -> ServeHandle:
    """Load the serve config at ``path`` (with ``--set`` overrides) and :func:`run_serve` it."""
    return run_serve(load_config(ServeJobConfig, path, overrides or []), blocking=blocking)
