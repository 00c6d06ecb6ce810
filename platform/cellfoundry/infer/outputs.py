"""Embedding outputs: the AnnData file, gene-embedding sums and their Parquet table, the UMAP.

The AnnData file may be an object (``s3://bucket/emb.h5ad``): it is written to a local temp
file, then uploaded whole (an object appears only once complete).
"""

from __future__ import annotations

import logging
import os
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from cellfoundry import storage

logger = logging.getLogger(__name__)

OBSM_KEY = "X_cellfoundry"
UNS_KEY = "cellfoundry"
GENE_SCHEMA = pa.schema(
    [
        ("ensembl_id", pa.string()),
        ("token_id", pa.int32()),
        ("group", pa.string()),
        ("n_cells", pa.int64()),
        ("embedding", pa.list_(pa.float32())),
    ]
)


class GeneSums:
    """Running per-(group, gene) sums of contextual gene embeddings (mergeable)."""

    def __init__(self, vocab_size: int, hidden: int) -> None:
        self.vocab_size, self.hidden = vocab_size, hidden
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}

    def add(self, group: str, ids: np.ndarray, emb: np.ndarray) -> None:
        """Add one cell's gene ids (n,) and embeddings (n, hidden); a gene counts once per cell."""
        if group not in self.sums:
            self.sums[group] = np.zeros((self.vocab_size, self.hidden), np.float64)
            self.counts[group] = np.zeros(self.vocab_size, np.int64)
        np.add.at(self.sums[group], ids, emb)
        self.counts[group][np.unique(ids)] += 1

    def to_rows(self) -> pa.Table:
        """Non-zero partial sums as rows (group, token_id, n, sum) to ship between processes."""
        groups, tokens, ns, sums = [], [], [], []
        for g, c in self.counts.items():
            hit = np.flatnonzero(c)
            groups += [g] * len(hit)
            tokens.append(hit.astype(np.int32))
            ns.append(c[hit])
            sums.append(self.sums[g][hit].astype(np.float32))
        flat = np.concatenate(sums) if sums else np.zeros((0, self.hidden), np.float32)
        return pa.table(
            {
                "_g_group": pa.array(groups, pa.string()),
                "_g_token": pa.array(np.concatenate(tokens) if tokens else [], pa.int32()),
                "_g_n": pa.array(np.concatenate(ns) if ns else [], pa.int64()),
                "_g_sum": pa.FixedSizeListArray.from_arrays(flat.reshape(-1), self.hidden),
            }
        )

    def merge_rows(self, rows: pa.Table) -> None:
        """Add partial sums made by :meth:`to_rows`."""
        if rows.num_rows == 0:
            return
        tok = rows["_g_token"].to_numpy()
        n = rows["_g_n"].to_numpy()
        flat = rows["_g_sum"].combine_chunks().flatten().to_numpy().reshape(-1, self.hidden)
        grp = np.asarray(rows["_g_group"].to_pylist(), dtype=object)
        for g in dict.fromkeys(grp.tolist()):
            sel = grp == g
            if g not in self.sums:
                self.sums[g] = np.zeros((self.vocab_size, self.hidden), np.float64)
                self.counts[g] = np.zeros(self.vocab_size, np.int64)
            np.add.at(self.sums[g], tok[sel], flat[sel])
            np.add.at(self.counts[g], tok[sel], n[sel])

    def table(self, names: dict[int, str]) -> pa.Table:
        """The gene-embedding table (DESIGN contract): mean embedding per (gene, group)."""
        rows: dict[str, list[Any]] = {k: [] for k in GENE_SCHEMA.names}
        for g in sorted(self.counts):
            hit = np.flatnonzero(self.counts[g])
            mean = (self.sums[g][hit] / self.counts[g][hit, None]).astype(np.float32)
            rows["ensembl_id"] += [names.get(int(t), "") for t in hit]
            rows["token_id"] += hit.tolist()
            rows["group"] += [g] * len(hit)
            rows["n_cells"] += self.counts[g][hit].tolist()
            rows["embedding"] += list(mean)
        return pa.table(rows, schema=GENE_SCHEMA)


def check_h5ad_output(path: str | Path) -> None:
    """Raise ``ArtifactError`` if ``path`` exists and is not an embeddings file cellfoundry
    wrote (one with ``.uns["cellfoundry"]``): someone's own file is never replaced."""
    import h5py

    from cellfoundry.artifacts import ArtifactError

    if storage.is_remote(path):
        found = storage.info(path)
        if found.type == pafs.FileType.NotFound:
            return
        ours = False
        if found.type == pafs.FileType.File:
            fs, key = storage.resolve(path)
            try:  # h5py reads the few blocks it needs through a seekable remote file
                with fs.open_input_file(key) as handle, h5py.File(handle, "r") as f:
                    ours = f"uns/{UNS_KEY}" in f
            except OSError:
                ours = False
    else:
        path = Path(path)
        if not path.exists():
            return
        try:
            with h5py.File(path, "r") as f:
                ours = f"uns/{UNS_KEY}" in f
        except OSError:
            ours = False
    if not ours:
        raise ArtifactError(
            f"{path} exists and is not an embeddings file written by cellfoundry (no "
            f".uns['{UNS_KEY}']); it is never replaced: choose another output path"
        )


def write_h5ad(
    path: str | Path, obs: pa.Table, embeddings: np.ndarray, uns: dict[str, Any]
) -> Path | str:
    """AnnData with ``.obs_names`` = cell_id, metadata in ``.obs`` (string columns as
    categoricals, nulls as missing values), ``.obsm["X_cellfoundry"]`` and provenance in
    ``.uns["cellfoundry"]``; written to a temp name, then renamed (on object storage: a local
    temp file, then uploaded whole). Returns ``path`` (a URI stays a string)."""
    import anndata as ad
    import pandas as pd

    frame = pd.DataFrame(
        index=pd.Index([str(c) for c in obs["cell_id"].to_pylist()], name="cell_id")
    )
    for name in obs.column_names:
        if name == "cell_id":
            continue
        col = obs[name]
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            frame[name] = pd.Categorical(col.to_pylist())
        else:
            frame[name] = col.to_numpy()
    adata = ad.AnnData(obs=frame, obsm={OBSM_KEY: np.ascontiguousarray(embeddings, np.float32)})
    adata.uns[UNS_KEY] = uns
    if storage.is_remote(path):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="cf-h5ad-") as tmpdir:
            local = Path(tmpdir) / storage.name(path)
            adata.write_h5ad(local)
            fs, key = storage.resolve(path)
            pafs.copy_files(str(local), key, source_filesystem=pafs.LocalFileSystem(),
                                    destination_filesystem=fs)  # fmt: skip
        return path
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    adata.write_h5ad(tmp)
    os.replace(tmp, path)
    return path


def plot_umap(
    embeddings: np.ndarray, labels: list[Any] | None, path: str | Path, title: str
) -> Path:
    """UMAP of the cell embeddings coloured by ``labels`` (missing shown as "n/a"), PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():  # umap-learn's n_jobs / numba notices
        warnings.simplefilter("ignore")
        import umap

        n_neighbors = max(2, min(15, len(embeddings) - 1))
        xy = umap.UMAP(n_neighbors=n_neighbors, random_state=0).fit_transform(embeddings)
    fig, ax = plt.subplots(figsize=(7, 5.5))
    names = ["n/a" if v is None or v == "" else str(v) for v in (labels or [None] * len(xy))]
    for name in sorted(set(names)):
        sel = np.array([n == name for n in names])
        ax.scatter(xy[sel, 0], xy[sel, 1], s=3, label=f"{name} ({sel.sum()})")
    ax.legend(fontsize=6, markerscale=3, loc="best", frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
