"""Stage 4b: in-silico perturbation screens as a Ray Data batch job.

One item per tokenized shard goes through ``map_batches`` on an actor pool (CPU or GPU;
each actor loads the model once). An actor perturbs its shard's cells with
:func:`~cellfoundry.infer.perturb.iter_perturb_cells` (cells x perturbations batched,
``max_sequences`` at a time) and streams the results into one Parquet file per shard
under ``<output_dir>.work/<fingerprint>/``: memory stays bounded, and a rerun skips the
shards already finished. The driver then assembles the ``screen`` artifact: the shards,
``stats.parquet`` (tests + FDR), ``gene_stats.parquet`` and ``stats.png``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cellfoundry.artifacts import fingerprint, holds_output, reusable, write_artifact
from cellfoundry.config.infer import PerturbJobConfig
from cellfoundry.config.loader import config_to_dict, load_config
from cellfoundry.infer.common import (
    POOL_FIELDS,
    cells_of,
    embedder_kwargs,
    inputs_with_manifest,
    map_batches_kwargs,
    model_signature,
    provenance,
    shard_files,
)

logger = logging.getLogger(__name__)


def select_cells(table: pa.Table, filters: dict[str, list[str]], max_cells: int | None) -> pa.Table:
    """Rows whose metadata match ``filters`` (column -> allowed values), at most ``max_cells``."""
    for column, values in filters.items():
        if column not in table.column_names:
            raise ValueError(
                f"filter: no column {column!r} in the tokenized shards ({table.column_names})"
            )
        table = table.filter(pc.is_in(table[column], value_set=pa.array(values)))
    return table.slice(0, max_cells) if max_cells is not None else table


class PerturbShards:
    """Ray Data UDF (an actor): each item ``{src, dst}`` perturbs one shard into ``dst``."""

    def __init__(self, cfg: dict[str, Any], goal: list[float] | None) -> None:
        from cellfoundry.config.loader import parse_config
        from cellfoundry.infer.embed import Embedder
        from cellfoundry.infer.perturb_ops import perturbation_from_genes
        from cellfoundry.logs import setup_logging

        setup_logging()
        self.cfg = parse_config(PerturbJobConfig, cfg)
        c = self.cfg
        self.embedder = Embedder(c.model, **embedder_kwargs(c.compute, c.layer, c.pooling))
        vocab = self.embedder.token_dictionary
        self.perturbations = [
            perturbation_from_genes(p.kind, p.genes, vocab) for p in c.perturbations
        ]
        self.goal = None if goal is None else np.asarray(goal, np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [
            self.process(str(s), str(d)) for s, d in zip(batch["src"], batch["dst"], strict=True)
        ]
        return {"result": np.array([json.dumps(r) for r in results], dtype=object)}

    def process(self, src: str, dst: str) -> dict[str, Any]:
        from cellfoundry.infer.perturb import RESULT_SCHEMA, iter_perturb_cells

        c = self.cfg
        table = select_cells(pq.read_table(src), c.filter, c.max_cells)
        cells, ids = cells_of(table), table["cell_id"].to_pylist()
        tmp = Path(dst).with_name(f".{Path(dst).name}.tmp-{os.getpid()}")
        rows = done = 0
        with pq.ParquetWriter(tmp, RESULT_SCHEMA) as writer:
            for part in iter_perturb_cells(
                self.embedder, cells, self.perturbations, genome_wide=c.genome_wide,
                fraction=c.fraction, goal=self.goal, gene_shifts=c.gene_shifts, cell_ids=ids,
                max_sequences=c.max_sequences,
            ):  # fmt: skip
                writer.write_table(part)
                rows += part.num_rows
                done = int(part["cell_index"][-1].as_py()) + 1 if part.num_rows else done
                logger.info(
                    "%s: %d rows, cells up to %d of %d", Path(src).name, rows, done, len(cells)
                )
        os.replace(tmp, dst)
        return {"src": src, "cells": len(cells), "rows": rows}


def goal_embedding(cfg: PerturbJobConfig) -> np.ndarray | None:
    """Mean embedding of the goal-state cells (a Ray Data pass over the tokenized shards)."""
    import ray

    from cellfoundry.infer.embed_job import EMB_COLUMN, EmbedCells

    if cfg.goal is None:
        return None
    goal = cfg.goal
    ds = ray.data.read_parquet([str(f) for f in shard_files(cfg.tokenized)])
    ds = ds.map_batches(
        lambda t: select_cells(t, {goal.column: [goal.value]}, None), batch_format="pyarrow"
    ).limit(goal.max_cells)
    ds = ds.map_batches(
        EmbedCells,
        fn_constructor_kwargs={
            "model": cfg.model,
            "embedder": embedder_kwargs(cfg.compute, cfg.layer, cfg.pooling),
            "genes": False,
            "group_by": None,
        },
        batch_format="pyarrow",
        **map_batches_kwargs(cfg.compute),
    )
    parts = [
        b[EMB_COLUMN].combine_chunks()
        for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")
    ]
    n = sum(len(p) for p in parts)
    if n == 0:
        raise ValueError(
            f"goal: no cell has {goal.column} == {goal.value!r}; check the column and value"
        )
    emb = np.concatenate([p.flatten().to_numpy().reshape(len(p), -1) for p in parts if len(p)])
    logger.info("goal state %s=%s: mean of %d cell embeddings", goal.column, goal.value, n)
    return emb.mean(0).astype(np.float32)


@dataclass
class PerturbResult:
    """The screen artifact and its counts."""

    artifact: Path
    counts: dict[str, int]
    reused: bool = False

    def summary(self) -> dict[str, Any]:
        return {"artifact": str(self.artifact), "counts": self.counts, "reused": self.reused}


@holds_output("screen", lambda cfg: cfg.output_dir)
def run_perturb(cfg: PerturbJobConfig) -> PerturbResult:
    """Run the screen of ``cfg`` (Ray must be initialised; see :func:`run_perturb_job`)."""
    import ray

    from cellfoundry.infer.perturb_ops import perturbation_from_genes
    from cellfoundry.model import load_token_dictionary_for
    from cellfoundry.runtime import configure_data_context

    files = shard_files(cfg.tokenized)
    config = {**config_to_dict(cfg), "model_signature": model_signature(cfg.model)}
    vocab = load_token_dictionary_for(cfg.model) or {}
    for spec in cfg.perturbations:  # unknown genes fail here, not inside an actor
        perturbation_from_genes(spec.kind, spec.genes, vocab)
    config.pop("ray")
    for key in (*POOL_FIELDS, "num_cpus", "batch_size"):  # where it runs, not what it computes
        config["compute"].pop(key)
    inputs = inputs_with_manifest(model=cfg.model, tokenized=cfg.tokenized)
    fp = fingerprint("screen", config, inputs)
    out = Path(cfg.output_dir)
    previous = reusable(out, "screen", fp)
    if previous is not None:
        logger.info("screen %s is up to date; reusing it", out)
        return PerturbResult(out, previous["counts"], reused=True)
    work = Path(f"{cfg.output_dir}.work") / fp
    work.mkdir(parents=True, exist_ok=True)
    items = [{"src": str(f), "dst": str(work / f.name)} for f in files]
    todo = [i for i in items if not Path(i["dst"]).is_file()]
    logger.info(
        "screen: %d shards, %d finished before, %d to run",
        len(items),
        len(items) - len(todo),
        len(todo),
    )
    configure_data_context()
    if todo:
        goal = goal_embedding(cfg)
        ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            PerturbShards,
            fn_constructor_kwargs={
                "cfg": config_to_dict(cfg),
                "goal": None if goal is None else goal.tolist(),
            },
            **{**map_batches_kwargs(cfg.compute), "batch_size": 1},
        )
        for r in ds.take_all():
            logger.info("screen shard done: %s", r["result"])
    with write_artifact(out, "screen", config, inputs) as w:
        counts = _assemble(cfg, work, [Path(i["dst"]) for i in items], w.dir)
        w.counts = counts
        w.extra = {
            "provenance": provenance(cfg.model, cfg.tokenized, layer=cfg.layer, pooling=cfg.pooling)
        }
    # Only the work folders this stage made (one per fingerprint), then the folder if empty.
    for child in work.parent.iterdir():
        if re.fullmatch(r"[0-9a-f]{32}", child.name) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
    with contextlib.suppress(OSError):
        work.parent.rmdir()
    return PerturbResult(out, counts)


def _assemble(cfg: PerturbJobConfig, work: Path, parts: list[Path], dest: Path) -> dict[str, int]:
    """Shards into ``dest/screen``, then the statistics and the plot."""
    from cellfoundry.infer.stats import gene_shift_stats, plot_stats, screen_stats
    from cellfoundry.model import load_token_dictionary_for

    screen = dest / "screen"
    screen.mkdir()
    for p in parts:
        try:
            os.link(p, screen / p.name)
        except OSError:
            shutil.copy2(p, screen / p.name)
    lf = pl.scan_parquet([str(screen / p.name) for p in parts])
    null = _null_values(cfg.null_screen, cfg.goal is not None) if cfg.null_screen else None
    stats = screen_stats(lf, null=null)
    stats.write_parquet(dest / "stats.parquet")
    names = {v: k for k, v in (load_token_dictionary_for(cfg.model) or {}).items()}
    genes = gene_shift_stats(lf, names) if cfg.gene_shifts else None
    if genes is not None:
        genes.write_parquet(dest / "gene_stats.parquet")
    if stats.height:
        plot_stats(stats, dest / "stats.png")
    rows = lf.select(pl.len()).collect().item()
    cells = lf.select(pl.col("cell_id").n_unique()).collect().item() if rows else 0
    return {
        "rows": int(rows),
        "cells_perturbed": int(cells),
        "perturbations": int(stats.height),
        "shards": len(parts),
        "gene_stat_rows": 0 if genes is None else genes.height,
    }


def _null_values(path: str, goal: bool) -> np.ndarray:
    """The tested values of a null screen artifact (goal shifts, or cell shifts)."""
    lf = pl.scan_parquet(str(Path(path) / "screen" / "*.parquet"))
    col = pl.col("goal_shift") if goal else 1.0 - pl.col("cell_cos").cast(pl.Float64)
    return lf.select(col.alias("v")).drop_nulls().collect()["v"].to_numpy()


def run_perturb_job(
    config: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """Load the YAML config (with ``--set`` overrides), start or join Ray, run the screen."""
    from cellfoundry import runtime

    cfg = load_config(PerturbJobConfig, config, overrides)
    runtime.init_ray(cfg.ray)
    return run_perturb(cfg).summary()
