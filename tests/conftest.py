"""Test-wide setup: Ray's loopback-only env before anything imports ray; shared-data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Must precede `import ray` anywhere in the session: Ray reads it on import (PITFALLS.md).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray token auth stays on (its default): the session cluster gets a token of its own
# (tests/integration/conftest.py), as every cluster cellfoundry starts does.

from cellfoundry.paths import shared_path

H5AD_DIR = shared_path("data", "h5ad")
GENEFORMER_DIR = shared_path("geneformer")
REAL_H5AD = sorted(H5AD_DIR.glob("*.h5ad")) if H5AD_DIR.exists() else []


@pytest.fixture(scope="session")
def real_h5ad() -> list[Path]:
    """The real single-cell files of ../shared/data (skips when absent)."""
    if not REAL_H5AD:
        pytest.skip("../shared/data/h5ad is not available")
    return REAL_H5AD


@pytest.fixture(scope="session")
def geneformer_dir() -> Path:
    """../shared/geneformer with the real v1/ and v2/ dictionaries (skips when absent)."""
    if not (GENEFORMER_DIR / "v2").exists():
        pytest.skip("../shared/geneformer is not available")
    return GENEFORMER_DIR
