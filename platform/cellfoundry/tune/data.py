"""Labelled cells for fine-tuning: tokens and labels from a ``tokenized`` artifact (a local
folder, or a URI whose manifest lists the shards, read in place).

Cells are read once (only the needed columns), filtered to labelled cells of the chosen
datasets, ordered by ``cell_id`` (deterministic on any cluster) and cut to the model's
input size. Gene classification labels each token with its gene's class instead.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import polars as pl
import yaml

from cellfoundry import storage
from cellfoundry.config.tune import FinetuneJobConfig
from cellfoundry.train.data import shard_files, truncate
from cellfoundry.tune.remote import data_file_list, parquet_columns, read_parquet

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of tokens that carry no gene label (ignored by the loss and the metrics)."""


@dataclass
class LabelledCells:
    """Cells with their tokens and (cell task) labels; rows ordered by ``cell_id``."""

    cell_ids: np.ndarray
    """str [n_cells]."""
    tokens: list[np.ndarray]
    """int32 token ids per cell, already cut to ``max_length``."""
    labels: np.ndarray
    """int64 [n_cells] class index (cell task); all -1 for the gene task."""
    label_names: list[str]
    """Class names in index order (the label mapping saved with the model)."""
    meta: pl.DataFrame
    """The metadata columns read (label, split and group columns), same row order."""

    def __len__(self) -> int:
        return len(self.cell_ids)


def label_mapping(names: list[str]) -> dict[str, dict]:
    """``{"id2label": {"0": name, ...}, "label2id": {name: 0, ...}}`` (saved with the model)."""
    return {
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
    }


def _columns(cfg: FinetuneJobConfig, available: list[str]) -> list[str]:
    wanted = ["cell_id", "dataset_id", "input_ids"]
    if cfg.task.kind == "cell":
        wanted.append(cfg.data.label_column)
    for extra in (cfg.split.column, cfg.split.group_by):
        if extra is not None and extra not in wanted:
            wanted.append(extra)
    missing = [c for c in wanted if c not in available]
    if missing:
        raise ValueError(
            f"data.tokenized {cfg.data.tokenized}: no column(s) {missing}; columns are "
            f"{available}; fix data.label_column / split.column / split.group_by"
        )
    return wanted


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of ``n`` rows drawn in proportion to each label (at least 1 each)."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    take = np.maximum(1, np.floor(counts / counts.sum() * n).astype(int))
    chosen = [
        rng.choice(np.flatnonzero(labels == c), size=min(k, cnt), replace=False)
        for c, k, cnt in zip(classes, take, counts, strict=True)
    ]
    return np.sort(np.concatenate(chosen))


def tokenized_shards(path: str, field: str = "data.tokenized") -> list[str]:
    """The ``part-*.parquet`` shards of a tokenized artifact in name order: files of a local
    folder, or on object storage the objects its manifest lists."""
    if not storage.is_remote(path):
        return [str(f) for f in shard_files(path, field=field)]
    return data_file_list(path, "part-*.parquet", field,
                          "run `cellfoundry corpus` or `cellfoundry tokenize` first")  # fmt: skip


def load_labelled_cells(
    cfg: FinetuneJobConfig, *, max_length: int, eos_id: int | None
) -> LabelledCells:
    """Read the labelled cells of ``cfg.data`` (see :class:`LabelledCells`)."""
    files = tokenized_shards(cfg.data.tokenized)
    columns = _columns(cfg, parquet_columns(files[0]))
    frame = pl.concat([read_parquet(f, columns=columns) for f in files]).sort("cell_id")
    if cfg.data.dataset_ids:
        frame = frame.filter(pl.col("dataset_id").is_in(cfg.data.dataset_ids))
    if cfg.task.kind == "cell":
        label = cfg.data.label_column
        frame = frame.filter(pl.col(label).is_not_null() & (pl.col(label).cast(pl.Utf8) != ""))
        counts = frame[label].value_counts()
        rare = counts.filter(pl.col("count") < cfg.data.min_cells_per_class)[label].to_list()
        if rare:
            logger.warning(
                "dropping classes with < %d cells: %s", cfg.data.min_cells_per_class, rare
            )
            frame = frame.filter(~pl.col(label).is_in(rare))
    if cfg.split.column is not None:
        keep = [*cfg.split.train_values, *cfg.split.test_values]
        frame = frame.filter(pl.col(cfg.split.column).cast(pl.Utf8).is_in(keep))
    if frame.height == 0:
        raise ValueError(
            f"data.tokenized {cfg.data.tokenized}: no labelled cells left after the filters "
            f"(dataset_ids={cfg.data.dataset_ids}, label_column={cfg.data.label_column!r})"
        )
    names = (
        sorted(frame[cfg.data.label_column].cast(pl.Utf8).unique().to_list())
        if cfg.task.kind == "cell"
        else []
    )
    if cfg.task.kind == "cell":
        if len(names) < 2:
            raise ValueError(
                f"data.label_column {cfg.data.label_column!r} has < 2 classes: {names}"
            )
        index = {n: i for i, n in enumerate(names)}
        labels = np.array(
            [index[v] for v in frame[cfg.data.label_column].cast(pl.Utf8)], dtype=np.int64
        )
    else:
        labels = np.full(frame.height, -1, dtype=np.int64)
    tokens = [
        truncate(np.asarray(row, dtype=np.int32), max_length, eos_id)
        for row in frame["input_ids"].to_list()
    ]
    logger.info("labelled cells: %d, classes: %d", frame.height, len(names))
    return LabelledCells(
        cell_ids=frame["cell_id"].to_numpy(),
        tokens=tokens,
        labels=labels,
        label_names=names,
        meta=frame.drop("input_ids"),
    )


def load_gene_labels(cfg: FinetuneJobConfig) -> dict[str, list[str]]:
    """The gene task's ``label -> Ensembl IDs`` (inline or from a JSON/YAML file)."""
    if cfg.task.gene_labels_file is None:
        return dict(cfg.task.gene_labels)
    path = cfg.task.gene_labels_file
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise ValueError(f"task.gene_labels_file {path} does not exist") from None
    data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ValueError(f"task.gene_labels_file {path}: expected a mapping label -> list of IDs")
    return {str(k): [str(g) for g in v] for k, v in data.items()}


def gene_token_classes(
    gene_labels: dict[str, list[str]], token_dictionary: dict[str, int]
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Label names, and the token ids and class indices of the labelled genes that are in
    the vocabulary (a gene listed under two labels is an error)."""
    names = sorted(gene_labels)
    if len(names) < 2:
        raise ValueError("task.gene_labels needs at least 2 labels")
    seen: dict[str, str] = {}
    token_ids, classes = [], []
    for i, name in enumerate(names):
        for gene in gene_labels[name]:
            if gene in seen and seen[gene] != name:
                raise ValueError(f"task.gene_labels: {gene} is under both {seen[gene]} and {name}")
            seen[gene] = name
            if gene in token_dictionary:
                token_ids.append(token_dictionary[gene])
                classes.append(i)
    if len(set(classes)) < 2:
        raise ValueError("task.gene_labels: fewer than 2 labels have genes in the vocabulary")
    return names, np.array(token_ids, dtype=np.int64), np.array(classes, dtype=np.int64)
