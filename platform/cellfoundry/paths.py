"""Where the shared, read-only reference data lives (dictionaries, gene tables, real data)."""

from __future__ import annotations

import os
from pathlib import Path

#: Repository root (this file is platform/cellfoundry/paths.py).
REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    """Return the shared data folder: ``$CELLFOUNDRY_SHARED`` or ``<repo>/../shared``.

    The folder holds ``geneformer/`` (the Geneformer dictionaries) and ``data/`` (real
    single-cell files and gene tables). It is read, never written or copied.
    """
    env = os.environ.get("CELLFOUNDRY_SHARED")
    return Path(env).resolve() if env else (REPO_ROOT.parent / "shared").resolve()


def shared_path(*parts: str) -> Path:
    """Return ``shared_dir() / parts...`` (which may not exist; callers check)."""
    return shared_dir().joinpath(*parts)


def expand(path: str) -> str:
    """Replace ``{shared}`` with :func:`shared_dir` and expand ``$VARS`` and ``~``."""
    return os.path.expanduser(os.path.expandvars(path.replace("{shared}", str(shared_dir()))))
