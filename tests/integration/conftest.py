"""One local Ray cluster per test session, bound to loopback, leaving nothing behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every socket on 127.0.0.1 (PITFALLS.md)
}


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A 2-CPU in-process Ray cluster (300 MB object store) shared by the session."""
    ray = pytest.importorskip("ray")
    saved = {k: os.environ.get(k) for k in [*_ENV, "RAY_TMPDIR"]}
    # A short temp dir (Ray's socket paths must stay under 107 bytes), removed at the end.
    tmpdir = tempfile.mkdtemp(prefix="cfray-")
    os.environ.update(_ENV, RAY_TMPDIR=tmpdir)
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=300 * 1024**2,
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(tmpdir, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
