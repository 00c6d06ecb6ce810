"""An embeddings .h5ad output replaces only a file cellfoundry wrote."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pyarrow as pa
import pytest

from cellfoundry.artifacts import ArtifactError
from cellfoundry.infer.outputs import check_h5ad_output, write_h5ad


def test_only_our_own_h5ad_is_replaced(tmp_path: Path) -> None:
    ours = tmp_path / "ours.h5ad"
    check_h5ad_output(ours)  # nothing there yet
    obs = pa.table({"cell_id": ["a", "b"]})
    write_h5ad(ours, obs, np.zeros((2, 3), np.float32), {"layer": -2})
    check_h5ad_output(ours)  # written by cellfoundry: may be replaced
    theirs = tmp_path / "theirs.h5ad"
    ad.AnnData(np.ones((2, 2), np.float32)).write_h5ad(theirs)
    before = theirs.read_bytes()
    with pytest.raises(ArtifactError, match=r"theirs\.h5ad exists .*choose another output path"):
        check_h5ad_output(theirs)
    text = tmp_path / "notes.h5ad"
    text.write_text("not even HDF5")
    with pytest.raises(ArtifactError, match="never replaced"):
        check_h5ad_output(text)
    assert theirs.read_bytes() == before
