"""Stage 4a: cell and gene embeddings of a tokenized artifact as a Ray Data batch job.

``ray.data.read_parquet`` streams the shards; ``map_batches`` runs :class:`EmbedCells` on an
actor pool (each actor loads the model once, CPU or GPU); inside a batch, cells are sorted
by length so padding is minimal. Output order equals input order
(``runtime.configure_data_context``). The driver collects the cell embeddings (one row of
``hidden`` floats per cell) and merges the actors' per-batch gene-embedding sums.

Model, tokenized input and outputs may be on object storage (``s3://``): the shards are
read in place, each actor loads the model from its node's cache copy, and the driver, which
collects everything, writes the .h5ad (uploaded whole) and stages the artifact's files
(``genes.parquet``, ``umap.png``) for upload at its commit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cellfoundry import storage
from cellfoundry.artifacts import (
    fingerprint,
    holds_output,
    remove_stale_temps,
    reusable,
    write_artifact,
)
from cellfoundry.config.infer import EmbedJobConfig, emb_layer_of
from cellfoundry.config.loader import config_to_dict, load_config
from cellfoundry.infer.common import (
    POOL_FIELDS,
    TOKEN_COLUMNS,
    cells_of,
    check_placeable,
    embedder_kwargs,
    inputs_with_manifest,
    map_batches_kwargs,
    model_signature,
    provenance,
    shard_files,
    shard_source,
)
from cellfoundry.infer.outputs import (
    OBSM_KEY,
    GeneSums,
    check_h5ad_output,
    plot_umap,
    write_h5ad,
)
from cellfoundry.train.storage_env import StorageEnv

logger = logging.getLogger(__name__)

EMB_COLUMN = "_emb"


class EmbedCells:
    """Ray Data UDF (an actor): a batch of tokenized cells -> its metadata with the cell
    embedding (``_emb``), followed by rows of the batch's gene-embedding sums (``_g_*``)."""

    def __init__(
        self,
        model: str,
        embedder: dict[str, Any],
        genes: bool,
        group_by: str | None,
        storage_env: StorageEnv | None = None,
    ) -> None:
        from cellfoundry.infer.embed import Embedder
        from cellfoundry.logs import setup_logging

        setup_logging()
        with (storage_env or StorageEnv()).applied():  # a model URI: copied to this node
            self.embedder = Embedder(model, **embedder)
        self.genes, self.group_by = genes, group_by

    def __call__(self, batch: pa.Table) -> pa.Table:
        e = self.embedder
        cell_emb, gene_emb = e.embed(cells_of(batch), genes=self.genes)
        meta = batch.drop_columns([c for c in TOKEN_COLUMNS if c in batch.column_names])
        emb = pa.FixedSizeListArray.from_arrays(pa.array(cell_emb.reshape(-1)), e.hidden_size)
        out = meta.append_column(EMB_COLUMN, emb)
        if not self.genes or gene_emb is None:
            return out
        sums = GeneSums(e.vocab_size, e.hidden_size)
        groups = batch[self.group_by].to_pylist() if self.group_by else ["all"] * batch.num_rows
        for (ids, vecs), g in zip(gene_emb, groups, strict=True):
            sums.add("" if g is None else str(g), ids, vecs)
        return pa.concat_tables([out, sums.to_rows()], promote_options="default")


@dataclass
class EmbedResult:
    """Where the embeddings went (paths, or URIs on object storage) and how many cells."""

    h5ad: Path | str
    artifact: Path | str
    n_cells: int
    reused: bool = False

    def summary(self) -> dict[str, Any]:
        return {
            "h5ad": str(self.h5ad),
            "artifact": str(self.artifact),
            "n_cells": self.n_cells,
            "reused": self.reused,
        }


def _local_or_uri(path: str) -> Path | str:
    return path if storage.is_remote(path) else Path(path)


@holds_output("embeddings", lambda cfg: cfg.artifact_dir, object_storage=True)
def run_embed(cfg: EmbedJobConfig) -> EmbedResult:
    """Embed every cell of ``cfg.tokenized`` (Ray must be initialised; see :func:`run_embed_job`)."""
    import ray

    from cellfoundry.runtime import configure_data_context

    check_h5ad_output(cfg.output)  # the artifact folder beside it is held by this run
    if not storage.is_remote(cfg.output):  # an object is uploaded whole: no temp to remove
        remove_stale_temps(cfg.output)
    files = shard_files(cfg.tokenized)
    config = {**config_to_dict(cfg), "model_signature": model_signature(cfg.model)}
    config.pop("ray")
    for key in POOL_FIELDS:  # how many actors run it does not change the embeddings
        config["compute"].pop(key)
    inputs = inputs_with_manifest(model=cfg.model, tokenized=cfg.tokenized)
    artifact = _local_or_uri(cfg.artifact_dir)
    previous = reusable(artifact, "embeddings", fingerprint("embeddings", config, inputs))
    if previous is not None and storage.is_file(cfg.output):
        logger.info("embeddings in %s are up to date; reusing them", cfg.output)
        return EmbedResult(
            _local_or_uri(cfg.output), artifact, int(previous["counts"]["cells"]), reused=True
        )
    check_placeable(compute=cfg.compute, reads=True, stage="embed")  # never wait silently
    with write_artifact(artifact, "embeddings", config, inputs) as w:
        configure_data_context()
        fs, paths = shard_source(files)
        columns = [c for c in pq.read_schema(paths[0], filesystem=fs).names if c != "length"]
        ds = ray.data.read_parquet(paths, filesystem=fs, columns=columns)
        if cfg.max_cells is not None:
            ds = ds.limit(cfg.max_cells)
        ds = ds.map_batches(
            EmbedCells,
            fn_constructor_kwargs={
                "model": cfg.model,
                "embedder": embedder_kwargs(cfg.compute, cfg.layer, cfg.pooling),
                "genes": cfg.genes,
                "group_by": cfg.group_by,
                "storage_env": StorageEnv.capture(cfg.model),
            },
            batch_format="pyarrow",
            **map_batches_kwargs(cfg.compute),
        )
        cells, sums = _collect(ds, cfg)
        emb = cells[EMB_COLUMN].combine_chunks().flatten().to_numpy().reshape(cells.num_rows, -1)
        obs = cells.drop_columns(
            [c for c in cells.column_names if c == EMB_COLUMN or c.startswith("_g_")]
        )
        uns = provenance(
            cfg.model, cfg.tokenized, layer=cfg.layer, emb_layer=emb_layer_of(cfg.layer),  # type: ignore[arg-type]
            pooling=cfg.pooling, n_cells=cells.num_rows,
        )  # fmt: skip
        write_h5ad(cfg.output, obs, emb.astype(np.float32), uns)
        w.counts = {"cells": cells.num_rows, "hidden": int(emb.shape[1]) if emb.size else 0}
        w.extra = {"outputs": {"h5ad": cfg.output}, "provenance": uns}
        if sums is not None:
            from cellfoundry.model import load_token_dictionary_for

            names = {v: k for k, v in (load_token_dictionary_for(cfg.model) or {}).items()}
            genes = sums.table(names)
            pq.write_table(genes, w.dir / "genes.parquet")
            w.counts["gene_rows"] = genes.num_rows
        if cfg.umap_color is not None and cells.num_rows >= 4:
            labels = obs[cfg.umap_color].to_pylist() if cfg.umap_color in obs.column_names else None
            if labels is None:
                logger.warning(
                    "umap_color %r is not a metadata column; UMAP uncoloured", cfg.umap_color
                )
            title = f"{storage.name(cfg.output)}: {cfg.umap_color}"
            plot_umap(emb, labels, w.dir / "umap.png", title)
    logger.info(
        "embedded %d cells -> %s (%s in %s)", cells.num_rows, cfg.output, OBSM_KEY, artifact
    )
    return EmbedResult(_local_or_uri(cfg.output), artifact, cells.num_rows)


def _collect(ds: Any, cfg: EmbedJobConfig) -> tuple[pa.Table, GeneSums | None]:
    """Cell rows in input order, and the merged gene sums, from the streamed batches."""
    parts: list[pa.Table] = []
    sums: GeneSums | None = None
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        is_cell = pc.is_valid(block["cell_id"])
        cells = block.filter(is_cell)
        parts.append(cells.drop_columns([c for c in cells.column_names if c.startswith("_g_")]))
        if cfg.genes and "_g_sum" in block.column_names:
            rows = block.filter(pc.invert(is_cell))
            if sums is None:
                hidden = rows["_g_sum"].type.list_size
                sums = GeneSums(int(rows["_g_token"].to_numpy().max(initial=0)) + 1, hidden)
            _merge(sums, rows)
    if not parts:
        raise ValueError(f"tokenized: {cfg.tokenized} holds no cells")
    return pa.concat_tables(parts, promote_options="default"), sums


def _merge(sums: GeneSums, rows: pa.Table) -> None:
    """Merge partial sums, growing the vocabulary range when a larger token id appears."""
    top = int(rows["_g_token"].to_numpy().max(initial=-1)) + 1
    if top > sums.vocab_size:
        for g in sums.sums:
            sums.sums[g] = np.pad(sums.sums[g], ((0, top - sums.vocab_size), (0, 0)))
            sums.counts[g] = np.pad(sums.counts[g], (0, top - sums.vocab_size))
        sums.vocab_size = top
    sums.merge_rows(rows)


def run_embed_job(
    config: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """Load the YAML config (with ``--set`` overrides), start or join Ray, embed; a summary."""
    from cellfoundry import runtime

    cfg = load_config(EmbedJobConfig, config, overrides)
    runtime.init_ray(cfg.ray)
    return run_embed(cfg).summary()
