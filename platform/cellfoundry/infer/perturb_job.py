"""Stage 4b: in-silico perturbation screens as a Ray Data batch job.

One item per tokenized shard goes through ``map_batches`` on an actor pool (CPU or GPU;
each actor loads the model once). An actor perturbs its shard's cells with
:func:`~cellfoundry.infer.perturb.iter_perturb_cells` (cells x perturbations batched,
``max_sequences`` at a time) and streams the results into one Parquet file per shard
under ``<output_dir>.work/<fingerprint>/``: memory stays bounded, and a rerun skips the
shards already finished. The driver then assembles the ``screen`` artifact: the shards,
``stats.parquet`` (tests + FDR), ``gene_stats.parquet`` and ``stats.png``.

What the numbers mean is recorded everywhere they go: the manifest's provenance, the
``metric`` / ``layer`` / ``emb_layer`` / ``pooling`` / ``precision`` columns of
``stats.parquet`` and the schema metadata of every shard
(:func:`~cellfoundry.infer.perturb.result_metadata`). Screens run in fp32 unless
``compute.dtype`` asks for less (see :class:`~cellfoundry.config.infer.InferComputeConfig`). A
targeted screen runs ``null_draws`` controls per cell and perturbation unless a
``null_screen`` is given; ``stats.parquet`` tests each perturbation against its own null
(:func:`~cellfoundry.infer.stats.screen_stats`).

On object storage (``s3://``) nothing is shared but the store: actors, on any node, read
their shard and load the model by URI (with the driver's storage settings, see
:mod:`cellfoundry.train.storage_env`) and write their results to the work prefix
``<output_dir>.work/<fingerprint>/`` (a temp object, then a server-side copy to its final
name, so a failed actor never leaves a finished-looking shard). The driver downloads the
finished shards into the artifact's local staging folder, computes the statistics there
and uploads everything at the commit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cellfoundry import artifacts, storage
from cellfoundry.artifacts import fingerprint, holds_output, reusable, write_artifact
from cellfoundry.config.infer import PerturbJobConfig, emb_layer_of
from cellfoundry.config.loader import config_to_dict, load_config
from cellfoundry.infer.common import (
    POOL_FIELDS,
    cells_of,
    check_placeable,
    embedder_kwargs,
    inputs_with_manifest,
    map_batches_kwargs,
    model_signature,
    provenance,
    read_table,
    shard_files,
    shard_source,
)
from cellfoundry.train.storage_env import StorageEnv

logger = logging.getLogger(__name__)

#: The goal cells sampled per state, kept beside a screen's finished shards (its manifest
#: records them even when a rerun finds every shard done and samples nothing).
STATES_FILE = "goal_states.json"


def select_cells(table: pa.Table, filters: dict[str, list[str]], max_cells: int | None) -> pa.Table:
    """Rows whose metadata match ``filters`` (column -> allowed values; the config's
    ``filter`` and ``start`` state, :attr:`PerturbJobConfig.cell_filter`), at most
    ``max_cells``."""
    for column, values in filters.items():
        if column not in table.column_names:
            raise ValueError(
                f"filter / start: no column {column!r} in the tokenized shards "
                f"({table.column_names}); tokenize with --obs-columns naming it"
            )
        table = table.filter(pc.is_in(table[column], value_set=pa.array(values)))
    return table.slice(0, max_cells) if max_cells is not None else table


class PerturbShards:
    """Ray Data UDF (an actor): each item ``{src, dst}`` perturbs one shard into ``dst``."""

    def __init__(
        self,
        cfg: dict[str, Any],
        goal: list[float] | None,
        storage_env: StorageEnv | None = None,
        alternatives: dict[str, list[float]] | None = None,
    ) -> None:
        from cellfoundry.config.loader import parse_config
        from cellfoundry.infer.embed import Embedder
        from cellfoundry.infer.perturb_ops import perturbation_from_genes
        from cellfoundry.logs import setup_logging

        setup_logging()
        self.cfg = parse_config(PerturbJobConfig, cfg)
        self.storage_env = storage_env or StorageEnv()
        c = self.cfg
        with self.storage_env.applied():  # a model URI: copied to this node's cache once
            self.embedder = Embedder(c.model, **embedder_kwargs(c.compute, c.layer, c.pooling))
        vocab = self.embedder.token_dictionary
        self.perturbations = [
            perturbation_from_genes(p.kind, p.genes, vocab) for p in c.perturbations
        ]
        self.anchor = anchor_token(c, vocab)
        self.goal = None if goal is None else np.asarray(goal, np.float32)
        self.alternatives = {k: np.asarray(v, np.float32) for k, v in (alternatives or {}).items()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.storage_env.applied():
            results = [
                self.process(str(s), str(d))
                for s, d in zip(batch["src"], batch["dst"], strict=True)
            ]
        return {"result": np.array([json.dumps(r) for r in results], dtype=object)}

    def process(self, src: str, dst: str) -> dict[str, Any]:
        from cellfoundry.infer.perturb import iter_perturb_cells, result_metadata, result_schema

        c = self.cfg
        table = select_cells(read_table(src), c.cell_filter, c.max_cells)
        cells, ids = cells_of(table), table["cell_id"].to_pylist()
        name = storage.name(dst)
        # under a temp name first: a writer closed by an exception must not leave a file
        # that a rerun takes for a finished shard
        tmp = storage.join(storage.parent(dst), f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        fs, tmp_path = storage.resolve(tmp)
        _, dst_path = storage.resolve(dst)
        if not storage.is_remote(dst):
            Path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
        rows = done = 0
        try:
            schema = result_schema(list(self.alternatives)).with_metadata(
                result_metadata(self.embedder, c.metric)
            )
            with pq.ParquetWriter(tmp_path, schema, filesystem=fs) as writer:
                for part in iter_perturb_cells(
                    self.embedder, cells, self.perturbations, genome_wide=c.genome_wide,
                    fraction=c.fraction, goal=self.goal, gene_shifts=c.gene_shifts, cell_ids=ids,
                    metric=c.metric, null_draws=control_draws(c), seed=c.seed,
                    anchor_gene=self.anchor, alternatives=self.alternatives,
                    max_sequences=c.max_sequences,
                ):  # fmt: skip
                    writer.write_table(part)
                    rows += part.num_rows
                    done = int(part["cell_index"][-1].as_py()) + 1 if part.num_rows else done
                    logger.info(
                        "%s: %d rows, cells up to %d of %d", storage.name(src), rows, done,
                        len(cells),
                    )  # fmt: skip
            if storage.is_remote(dst):
                # no rename on object storage: a server-side copy (single CopyObject, up to
                # 5 GB per shard of results), then the temp object goes
                fs.copy_file(tmp_path, dst_path)
            else:
                os.replace(tmp_path, dst_path)
        finally:
            storage.delete_file(tmp)
        return {"src": src, "cells": len(cells), "rows": rows}


def anchor_token(cfg: PerturbJobConfig, vocab: dict[str, int]) -> int | None:
    """The token id of ``anchor_gene`` (an unknown gene is an error), or None."""
    from cellfoundry.infer.perturb_ops import perturbation_from_genes

    if cfg.anchor_gene is None or cfg.genome_wide is None:
        return None
    return perturbation_from_genes(cfg.genome_wide, [cfg.anchor_gene], vocab).token_ids[0]


def control_draws(cfg: PerturbJobConfig) -> int:
    """Controls per cell and listed perturbation: none when a null screen is the null."""
    return 0 if cfg.null_screen is not None else cfg.null_draws


def resolved(cfg: PerturbJobConfig, vocab: dict[str, int]) -> PerturbJobConfig:
    """``cfg`` with ``pooling`` decided for the model (``vocab``): null becomes ``cls`` for a
    V2 model (it has ``<cls>``) with ``metric: geneformer``, else ``mean``; and
    ``compute.dtype: auto`` made ``fp32`` (screens' shifts are small: bf16 only when asked)."""
    if cfg.compute.dtype == "auto":
        cfg = dataclasses.replace(cfg, compute=dataclasses.replace(cfg.compute, dtype="fp32"))
    if cfg.pooling is not None:
        if cfg.pooling == "cls" and "<cls>" not in vocab:
            raise ValueError("pooling 'cls' needs a <cls> token; this is a V1 model: use mean")
        return cfg
    v2 = "<cls>" in vocab
    return dataclasses.replace(cfg, pooling="cls" if v2 and cfg.metric == "geneformer" else "mean")


def what_was_computed(cfg: PerturbJobConfig, vocab: dict[str, int]) -> dict[str, Any]:
    """The metric, layer (both conventions), pooling and null of a screen (resolved ``cfg``)."""
    from cellfoundry.model.checkpoint import local_dir

    config = local_dir(cfg.model) / "config.json"  # the driver has the model's copy by now
    layers = json.loads(config.read_text()).get("num_hidden_layers") if config.is_file() else None
    v2 = "<cls>" in vocab
    if cfg.metric == "geneformer":
        cell = "<cls> state" if v2 else "mean of per-gene cosines of the genes left in place"
    else:
        cell = f"{cfg.pooling} pooled embedding"
    if cfg.null_screen is not None:
        null = "null_screen"
    elif cfg.perturbations and cfg.null_draws:
        null = "matched_controls"
    else:
        null = "other_genes" if cfg.genome_wide is not None else "none"
    return {
        "metric": cfg.metric,
        "layer": cfg.layer,
        "emb_layer": emb_layer_of(cfg.layer, layers),  # type: ignore[arg-type]
        "pooling": cfg.pooling,
        "cell_embedding": cell,
        "overexpress_original": "cut" if cfg.metric == "geneformer" else "whole",
        "null": null,
        "null_draws": control_draws(cfg),
    }


@dataclass
class StateEmbeddings:
    """The goal state's embedding, each alternative state's, and the cells behind each."""

    goal: np.ndarray
    alternatives: dict[str, np.ndarray]
    cells: dict[str, int]


def states_record(cfg: PerturbJobConfig, cells: dict[str, int] | None) -> dict[str, Any]:
    """What the manifest records of the start and goal states (``cells``: goal cells
    sampled per state, None where not known)."""
    start = None if cfg.start is None else {"column": cfg.start.column, "value": cfg.start.value}
    if cfg.goal is None:
        return {"start_state": start, "goal_state": None}
    g = cfg.goal
    goal = {
        "column": g.column, "value": g.value, "alternatives": list(g.alternatives),
        "statistic": g.statistic, "max_cells": g.max_cells, "seed": g.seed,
        "sample": "the max_cells cells of each state with the smallest blake2b(seed, cell_id)",
        "cells": cells,
    }  # fmt: skip
    return {"start_state": start, "goal_state": goal}


def state_embeddings(cfg: PerturbJobConfig) -> StateEmbeddings | None:
    """Embeddings of the goal state and its alternatives: a seeded random sample of each
    state's cells (:func:`~cellfoundry.infer.states.sample_state_cells`), embedded and
    summarised by ``goal.statistic``. Two Ray Data passes over the tokenized shards: the
    sample from the IDs and the state column only, then the sampled cells' embeddings."""
    import ray

    from cellfoundry.infer.embed_job import EMB_COLUMN, EmbedCells
    from cellfoundry.infer.states import sample_state_cells, state_embedding

    if cfg.goal is None:
        return None
    goal = cfg.goal
    fs, paths = shard_source(shard_files(cfg.tokenized))
    names = pq.read_schema(paths[0], filesystem=fs).names
    if goal.column not in names:
        raise ValueError(
            f"goal: no column {goal.column!r} in the tokenized shards ({names}); tokenize with "
            "--obs-columns naming it"
        )

    def sample(t: pa.Table) -> pa.Table:
        # each batch's smallest keys hold the whole screen's smallest ones among its cells
        return sample_state_cells(t, goal.column, goal.states, goal.max_cells, goal.seed)

    ids = ray.data.read_parquet(paths, filesystem=fs, columns=["cell_id", goal.column])
    parts = list(
        ids.map_batches(sample, batch_format="pyarrow").iter_batches(
            batch_size=None, batch_format="pyarrow"
        )
    )
    chosen = (
        sample(pa.concat_tables(parts))
        if parts
        else pa.table({"cell_id": pa.array([], pa.string())})
    )
    wanted = pa.array(chosen["cell_id"].to_pylist(), pa.string())
    ds = ray.data.read_parquet(paths, filesystem=fs).map_batches(
        lambda t: t.filter(pc.is_in(pc.cast(t["cell_id"], pa.string()), value_set=wanted)),
        batch_format="pyarrow",
    )
    ds = ds.map_batches(
        EmbedCells,
        fn_constructor_kwargs={
            "model": cfg.model,
            "embedder": embedder_kwargs(cfg.compute, cfg.layer, cfg.pooling),
            "genes": False,
            "group_by": None,
            "storage_env": StorageEnv.capture(cfg.model),
        },
        batch_format="pyarrow",
        **map_batches_kwargs(cfg.compute),
    )
    by_state: dict[str, list[np.ndarray]] = {s: [] for s in goal.states}
    for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        if not b.num_rows:
            continue
        emb = b[EMB_COLUMN].combine_chunks().flatten().to_numpy().reshape(b.num_rows, -1)
        state = pc.cast(b[goal.column], pa.string()).to_pylist()
        for s in by_state:
            rows = [i for i, v in enumerate(state) if v == s]
            if rows:
                by_state[s].append(emb[rows])
    out: dict[str, np.ndarray] = {}
    cells: dict[str, int] = {}
    for s, embs in by_state.items():
        cells[s] = sum(len(e) for e in embs)
        if not cells[s]:
            what = "goal" if s == goal.value else "goal.alternatives"
            raise ValueError(
                f"{what}: no cell has {goal.column} == {s!r}; check the column and value"
            )
        out[s] = state_embedding(np.concatenate(embs), goal.statistic)
    logger.info(
        "goal state %s=%s: %s of %d sampled cells (seed %d)%s", goal.column, goal.value,
        goal.statistic, cells[goal.value], goal.seed,
        "".join(f"; {s}: {cells[s]}" for s in goal.alternatives),
    )  # fmt: skip
    return StateEmbeddings(out[goal.value], {s: out[s] for s in goal.alternatives}, cells)


@dataclass
class PerturbResult:
    """The screen artifact (a folder, or a URI on object storage) and its counts."""

    artifact: Path | str
    counts: dict[str, int]
    reused: bool = False

    def summary(self) -> dict[str, Any]:
        return {"artifact": str(self.artifact), "counts": self.counts, "reused": self.reused}


@holds_output("screen", lambda cfg: cfg.output_dir, object_storage=True)
def run_perturb(cfg: PerturbJobConfig) -> PerturbResult:
    """Run the screen of ``cfg`` (Ray must be initialised; see :func:`run_perturb_job`)."""
    import ray

    from cellfoundry.infer.perturb_ops import perturbation_from_genes
    from cellfoundry.model import load_token_dictionary_for
    from cellfoundry.runtime import configure_data_context

    files = shard_files(cfg.tokenized)
    vocab = load_token_dictionary_for(cfg.model) or {}
    for spec in cfg.perturbations:  # unknown genes fail here, not inside an actor
        perturbation_from_genes(spec.kind, spec.genes, vocab)
    anchor_token(cfg, vocab)
    cfg = resolved(cfg, vocab)  # the pooling the actors and the goal use, in the fingerprint
    computed = what_was_computed(cfg, vocab)
    config = {**config_to_dict(cfg), "model_signature": model_signature(cfg.model)}
    config.pop("ray")
    for key in (*POOL_FIELDS, "num_cpus", "batch_size"):  # where it runs, not what it computes
        config["compute"].pop(key)
    inputs = inputs_with_manifest(model=cfg.model, tokenized=cfg.tokenized)
    fp = fingerprint("screen", config, inputs)
    remote = storage.is_remote(cfg.output_dir)
    out: Path | str = cfg.output_dir if remote else Path(cfg.output_dir)
    previous = reusable(out, "screen", fp)
    if previous is not None:
        logger.info("screen %s is up to date; reusing it", out)
        return PerturbResult(out, previous["counts"], reused=True)
    work_root = f"{cfg.output_dir}.work"  # a sibling folder, or prefix on object storage
    work = storage.join(work_root, fp)
    if not remote:
        Path(work).mkdir(parents=True, exist_ok=True)
    items = [{"src": f, "dst": storage.join(work, storage.name(f))} for f in files]
    todo = [i for i in items if not storage.is_file(i["dst"])]
    logger.info(
        "screen: %d shards, %d finished before, %d to run",
        len(items),
        len(items) - len(todo),
        len(todo),
    )
    configure_data_context()
    if todo:
        # the goal pass reads Parquet with Ray Data tasks; the screen's actors read their own
        check_placeable(cfg.compute, reads=cfg.goal is not None, stage="perturb")
        states = state_embeddings(cfg)
        if states is not None:  # the sample's counts, for the manifest of a resumed screen too
            storage.write_text(storage.join(work, STATES_FILE), json.dumps(states.cells))
        ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            PerturbShards,
            fn_constructor_kwargs={
                "cfg": config_to_dict(cfg),
                "goal": None if states is None else states.goal.tolist(),
                "storage_env": StorageEnv.capture(cfg.model, cfg.tokenized, cfg.output_dir),
                "alternatives": None
                if states is None
                else {k: v.tolist() for k, v in states.alternatives.items()},
            },
            **{**map_batches_kwargs(cfg.compute), "batch_size": 1},
        )
        for r in ds.take_all():
            logger.info("screen shard done: %s", r["result"])
    cells_file = storage.join(work, STATES_FILE)
    sampled = json.loads(storage.read_text(cells_file)) if storage.is_file(cells_file) else None
    computed.update(states_record(cfg, sampled))
    with write_artifact(out, "screen", config, inputs) as w:
        counts = _assemble(cfg, [i["dst"] for i in items], w.dir, computed)
        w.counts = counts
        w.extra = {"provenance": provenance(cfg.model, cfg.tokenized, **computed)}
    _remove_work(work_root)
    return PerturbResult(out, counts)


def _remove_work(work_root: str) -> None:
    """Only the work folders this stage made (one per fingerprint), then the folder if
    empty (a prefix on object storage is gone once its objects are)."""
    fingerprint_dir = re.compile(r"[0-9a-f]{32}")
    if storage.is_remote(work_root):
        for name, is_dir in storage.list_children(work_root).items():
            if is_dir and fingerprint_dir.fullmatch(name):
                storage.delete_prefix(storage.join(work_root, name))
        return
    root = Path(work_root)
    for child in root.iterdir():
        if fingerprint_dir.fullmatch(child.name) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
    with contextlib.suppress(OSError):
        root.rmdir()


def _assemble(
    cfg: PerturbJobConfig, parts: list[str], dest: Path, computed: dict[str, Any]
) -> dict[str, int]:
    """Shards (paths or URIs) into ``dest/screen`` (local: the artifact's temp folder or
    staging folder), then the statistics (with what was computed: ``computed``'s metric,
    layers and pooling, and the precision the shards record, as columns) and the plot.
    ``computed`` gains ``precision`` (for the manifest)."""
    from cellfoundry.infer.stats import gene_shift_stats, plot_stats, screen_stats
    from cellfoundry.model import load_token_dictionary_for

    screen = dest / "screen"
    screen.mkdir()
    names = [storage.name(p) for p in parts]
    for p, name in zip(parts, names, strict=True):
        if storage.is_remote(p):
            storage.download_file(p, screen / name)
            continue
        try:
            os.link(p, screen / name)
        except OSError:
            shutil.copy2(p, screen / name)
    lf = pl.scan_parquet([str(screen / name) for name in names])
    computed["precision"] = _precision([screen / name for name in names])
    null = _null_values(cfg.null_screen, cfg.goal is not None) if cfg.null_screen else None
    alternatives = cfg.goal.alternatives if cfg.goal is not None else []
    stats = screen_stats(
        lf, null=null, genome_wide=cfg.genome_wide is not None, alternatives=alternatives
    )
    stats = stats.with_columns(
        pl.lit(computed["metric"]).alias("metric"),
        pl.lit(computed["layer"], pl.Int64).alias("layer"),
        pl.lit(computed["emb_layer"], pl.Int64).alias("emb_layer"),
        pl.lit(computed["pooling"]).alias("pooling"),
        pl.lit(computed["precision"]).alias("precision"),
    )
    stats.write_parquet(dest / "stats.parquet")
    names = {v: k for k, v in (load_token_dictionary_for(cfg.model) or {}).items()}
    genes = gene_shift_stats(lf, names) if cfg.gene_shifts else None
    if genes is not None:
        genes.write_parquet(dest / "gene_stats.parquet")
    if stats.height:
        plot_stats(stats, dest / "stats.png")
    control = pl.col("control").fill_null(False)
    rows, controls = lf.select(pl.len(), control.sum()).collect().row(0)
    real = lf.filter(~control)
    cells = real.select(pl.col("cell_id").n_unique()).collect().item() if rows else 0
    return {
        "rows": int(rows - (controls or 0)),
        "control_rows": int(controls or 0),
        "cells_perturbed": int(cells),
        "perturbations": int(stats.height),
        "shards": len(parts),
        "gene_stat_rows": 0 if genes is None else genes.height,
    }


def _precision(files: list[Path]) -> str:
    """The precision the shards' actors ran in (their ``precision`` metadata): one name, or
    several joined by ``,`` when actors differed; ``unknown`` for shards written before
    it was recorded."""
    found = set()
    for f in files:
        meta = pq.read_schema(f).metadata or {}
        found.add(meta.get(b"precision", b"unknown").decode())
    return ",".join(sorted(found)) if found else "unknown"


def _null_values(path: str, goal: bool) -> pl.DataFrame:
    """``perturbation``, ``value``: the tested values (goal shifts, or cell shifts) of a null
    screen artifact's perturbations, controls left out; a folder or a URI (then only the
    shards its manifest lists, and only the columns needed)."""
    col = pl.col("goal_shift") if goal else 1.0 - pl.col("cell_cos").cast(pl.Float64)
    if storage.is_remote(path):
        files = artifacts.data_files(path, "screen/*.parquet")
        if not files:
            raise ValueError(f"null_screen: {path} lists no screen/*.parquet shards")
        fs, paths = shard_source(files)
        names = pq.read_schema(paths[0], filesystem=fs).names
        columns = ["perturbation", "goal_shift" if goal else "cell_cos"]
        columns += ["control"] if "control" in names else []
        lf = pl.from_arrow(pq.read_table(paths, filesystem=fs, columns=columns)).lazy()
    else:
        lf = pl.scan_parquet(str(Path(path) / "screen" / "*.parquet"))
    if "control" in lf.collect_schema().names():
        lf = lf.filter(~pl.col("control").fill_null(False))
    out = lf.select("perturbation", col.cast(pl.Float64).alias("value")).collect()
    return out.filter(pl.col("value").is_not_null() & pl.col("value").is_not_nan())


def run_perturb_job(
    config: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """Load the YAML config (with ``--set`` overrides), start or join Ray, run the screen."""
    from cellfoundry import runtime

    cfg = load_config(PerturbJobConfig, config, overrides)
    runtime.init_ray(cfg.ray)
    return run_perturb(cfg).summary()
