"""The walkthroughs in notebooks/ run top to bottom on smoke settings (nbclient), in order:
each writes what the next reads, into one temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cellfoundry.paths import REPO_ROOT, shared_dir

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.slow  # ~7 min on 2 cores; `make test` checks them statically (test_notebooks_static)
def test_notebooks_run_in_order(
    real_h5ad: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nbclient
    import nbformat

    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"]
    monkeypatch.setenv("CELLFOUNDRY_NOTEBOOK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("CELLFOUNDRY_SHARED", str(shared_dir()))
    # Each kernel starts its own local Ray cluster: keep it apart from the session's.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        client = nbclient.NotebookClient(
            book,
            timeout=600,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
        )
        client.execute()  # raises CellExecutionError naming the failing cell
        errors = [
            o for c in book.cells for o in c.get("outputs", []) if o.get("output_type") == "error"
        ]
        assert not errors, f"{path.name}: {errors}"
    assert (tmp_path / "work" / "model" / "config.json").is_file()
    assert (tmp_path / "work" / "embeddings" / "pbmc.h5ad").is_file()
    assert os.listdir(tmp_path / "work" / "screen")
