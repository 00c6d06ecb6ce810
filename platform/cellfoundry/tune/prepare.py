"""From a config to what the loop needs: token dictionary, labelled cells, splits, devices;
and the frozen-encoder linear probe (mean-pooled cell embeddings + logistic regression).
A model or vocabulary given as an ``s3://`` / ``gs://`` URI is read from this machine's
cached copy (:func:`cellfoundry.tune.remote.local_dir`)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from cellfoundry import storage
from cellfoundry.config.tune import FinetuneJobConfig
from cellfoundry.genes.vocab import load_token_dictionary
from cellfoundry.model import load_model, load_token_dictionary_for
from cellfoundry.tune.data import (
    LabelledCells,
    gene_token_classes,
    load_gene_labels,
    load_labelled_cells,
    stratified_subset,
)
from cellfoundry.tune.loop import TaskData
from cellfoundry.tune.probe_model import ProbeClassifier
from cellfoundry.tune.remote import has_manifest, local_dir
from cellfoundry.tune.splits import Split, few_shot, make_splits

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A config's cells, label names, splits and vocabulary."""

    cells: LabelledCells
    label_names: list[str]
    splits: list[Split]
    token_dictionary: dict[str, int]
    gene_token_ids: np.ndarray | None = None
    """Gene task: labelled genes' token ids (rows that ``splits`` index), and their classes."""
    gene_classes: np.ndarray | None = None


def token_dictionary_of(cfg: FinetuneJobConfig) -> dict[str, int]:
    """The model's own token dictionary, else the vocabulary beside the tokens."""
    found = load_token_dictionary_for(model_path(cfg))
    if found is not None:
        return found
    beside = storage.join(storage.parent(cfg.data.tokenized), "vocabulary")
    if storage.is_remote(beside) and has_manifest(beside):
        beside = str(local_dir(beside, "the vocabulary beside data.tokenized"))
    path = Path(beside) / "token_dictionary.json"
    if storage.is_remote(beside) or not path.is_file():
        raise ValueError(
            f"{cfg.model.model_dir} has no token_dictionary.json and "
            f"{storage.join(beside, 'token_dictionary.json')} does not exist"
        )
    return load_token_dictionary(path)


def model_path(cfg: FinetuneJobConfig) -> Path:
    """The local folder of ``cfg.model.model_dir`` (a cached copy when it is a URI)."""
    return local_dir(cfg.model.model_dir, "model.model_dir")


def model_max_length(cfg: FinetuneJobConfig) -> int:
    """``data.max_length`` capped by the model's ``max_position_embeddings``."""
    config = json.loads((model_path(cfg) / "config.json").read_text())
    limit = int(config.get("max_position_embeddings", 512))
    return min(limit, cfg.data.max_length or limit)


def prepare(cfg: FinetuneJobConfig) -> Prepared:
    """Read the labelled cells of ``cfg`` and make its splits (cells, or genes for the gene task)."""
    if not (model_path(cfg) / "config.json").is_file():
        raise ValueError(
            f"model.model_dir {cfg.model.model_dir}: no config.json; run `cellfoundry pretrain` first"
        )
    vocab = token_dictionary_of(cfg)
    cells = load_labelled_cells(cfg, max_length=model_max_length(cfg), eos_id=vocab.get("<eos>"))
    meta = cells.meta
    column = meta[cfg.split.column].cast(str).to_numpy() if cfg.split.column else None
    groups = meta[cfg.split.group_by].cast(str).to_numpy() if cfg.split.group_by else None
    if cfg.task.kind == "cell":
        splits = make_splits(cells.labels, cfg.split, column=column, groups=groups)
        return Prepared(cells, cells.label_names, splits, vocab)
    if cfg.split.column is not None or cfg.split.group_by is not None:
        raise ValueError(
            "task.kind gene splits the labelled genes: set split.column and split.group_by to null"
        )
    names, token_ids, classes = gene_token_classes(load_gene_labels(cfg), vocab)
    splits = make_splits(classes, cfg.split)
    return Prepared(cells, names, splits, vocab, token_ids, classes)


def task_data(cfg: FinetuneJobConfig, prep: Prepared, split: Split) -> TaskData:
    """The :class:`TaskData` of one split (few-shot applied to the training cells)."""
    pad_id = prep.token_dictionary.get("<pad>", 0)
    if prep.gene_token_ids is None:
        train = split.train
        if cfg.data.max_train_cells is not None and len(train) > cfg.data.max_train_cells:
            train = train[
                stratified_subset(prep.cells.labels[train], cfg.data.max_train_cells, cfg.seed)
            ]
        if cfg.data.few_shot is not None:
            train = few_shot(train, prep.cells.labels, cfg.data.few_shot, cfg.seed)
        return TaskData(
            prep.cells, pad_id, prep.label_names, train, {"val": split.val, "test": split.test}
        )
    assert prep.gene_classes is not None
    every = np.arange(len(prep.cells))
    sides = {"train": split.train, "val": split.val, "test": split.test}
    classes = {
        side: {int(prep.gene_token_ids[r]): int(prep.gene_classes[r]) for r in rows}
        for side, rows in sides.items()
    }
    return TaskData(
        prep.cells, pad_id, prep.label_names, every, {"val": every, "test": every}, classes
    )


def device_for(cfg: FinetuneJobConfig) -> torch.device:
    """CUDA when ``scaling.use_gpu`` and a GPU is visible, else CPU (with a warning if asked)."""
    if cfg.scaling.use_gpu:
        if torch.cuda.is_available():
            return torch.device("cuda")
        logger.warning("scaling.use_gpu is true but no GPU is visible: training on CPU")
    return torch.device("cpu")


def set_threads(cfg: FinetuneJobConfig) -> None:
    """Torch intra-op threads = the CPUs reserved for this run (default 1: more threads than
    reserved cores oversubscribe a shared machine and run many times slower)."""
    cpus = (
        (cfg.scaling.resources_per_worker or {}).get("CPU")
        or os.environ.get("OMP_NUM_THREADS")
        or 1
    )
    torch.set_num_threads(max(1, int(float(cpus))))


@torch.no_grad()
def cell_embeddings(
    probe: ProbeClassifier,
    data: TaskData,
    rows: np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """float32 [n, hidden]: the probe's mean-pooled frozen-encoder embeddings of ``rows``."""
    from cellfoundry.tune.loop import collate

    out = []
    for start in range(0, len(rows), batch_size):
        batch = collate(replace(data, gene_classes={}), rows[start : start + batch_size], "test")
        emb = probe.embed(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        out.append(emb.float().cpu().numpy())
    return np.concatenate(out)


def linear_probe(cfg: FinetuneJobConfig, data: TaskData, device: torch.device) -> ProbeClassifier:
    """Fit logistic regression on frozen, standardised cell embeddings of the training cells
    (zero-shot encoder); returns the :class:`ProbeClassifier` (eval mode, on ``device``)."""
    vocab = token_dictionary_of(cfg)
    specials = [v for k, v in vocab.items() if k.startswith("<")] + [data.pad_id]
    probe = ProbeClassifier(load_model(model_path(cfg)).bert, specials, len(data.label_names))
    probe = probe.to(device).eval()
    x = cell_embeddings(probe, data, data.train_rows, batch_size=cfg.data.batch_size, device=device)
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(max_iter=cfg.baselines.max_iter).fit(
        scaler.transform(x), data.cells.labels[data.train_rows]
    )
    probe.set_head(scaler.mean_, scaler.scale_, clf.classes_, clf.coef_, clf.intercept_)
    return probe.to(device)
