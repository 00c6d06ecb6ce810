"""``cellfoundry evaluate masked``: masked-gene accuracy of a model vs the rank baseline.

For each held-out cell, 15% of its gene tokens (never a special token) become ``<mask>``
(every one: no 80/10/10 here); the model, in eval mode, picks a gene token for each masked
position and the rank baseline picks the gene most often found at that rank among the
training cells. A cell's accuracy is its share of masked genes predicted correctly. The
report gives both distributions (mean, median, n cells) and their paired difference.

The tokenized shards are streamed twice (fit the baseline, then evaluate), so memory holds
one shard plus the baseline's counts; no Ray cluster is needed. The model, the tokens and
``output_dir`` may be ``s3://`` / ``gs://`` URIs: the model is read from this machine's
cached copy, the shards in place (only those the tokenized manifest lists), and the report
is written as an artifact on object storage (manifest last).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from cellfoundry import artifacts, storage
from cellfoundry.config.evaluate import MaskedEvalConfig
from cellfoundry.config.loader import config_to_dict
from cellfoundry.evaluate import masked_report
from cellfoundry.evaluate.masking import (
    RankBaseline,
    gene_ranks,
    hash_fraction,
    mask_positions,
    select_cells,
    special_mask,
)
from cellfoundry.evaluate.predict import MaskedPredictor, resolve_device
from cellfoundry.evaluate.report import input_signatures
from cellfoundry.model import load_model, load_token_dictionary_for
from cellfoundry.train.data import truncate
from cellfoundry.tune.data import tokenized_shards
from cellfoundry.tune.remote import has_manifest, local_dir

logger = logging.getLogger(__name__)

KIND = "evaluation_masked"

__all__ = ["KIND", "MaskedEvalResult", "resolve_vocabulary", "run_masked", "run_masked_job"]


@dataclass
class MaskedEvalResult:
    """Where the report went and its headline figures (``metrics`` is metrics.json)."""

    output_dir: Path | str
    """A folder, or the artifact's URI on object storage."""
    metrics: dict[str, Any]
    reused: bool = False


def _output(path: str) -> Path | str:
    return path if storage.is_remote(path) else Path(path)


def _read_shard(path: str, cfg: MaskedEvalConfig) -> pa.Table:
    """The columns :func:`_columns` picks of one shard (a file or an object)."""
    fs, p = storage.resolve(path)
    return pq.read_table(p, columns=_columns(cfg, pq.read_schema(p, filesystem=fs).names),
                         filesystem=fs)  # fmt: skip


def resolve_vocabulary(cfg: MaskedEvalConfig) -> dict[str, int]:
    """The model's token dictionary; it must equal the ``vocabulary`` artifact beside the
    tokenized one when that exists (same ids, same genes), else the tokens mean other genes."""
    saved = load_token_dictionary_for(local_dir(cfg.model, "model"))
    folder = storage.join(storage.parent(cfg.tokenized), "vocabulary")
    if storage.is_remote(folder) and has_manifest(folder):
        folder = str(local_dir(folder, "the vocabulary beside tokenized"))
    beside = Path(folder) / "token_dictionary.json"
    remote = storage.is_remote(folder)  # a URI without a complete artifact: no vocabulary
    data_vocab = (
        load_token_dictionary_for(beside.parent) if not remote and beside.is_file() else None
    )
    if saved is None and data_vocab is None:
        raise ValueError(
            f"{cfg.model} has no token_dictionary.json and "
            f"{storage.join(folder, 'token_dictionary.json')} does not exist; save the "
            "model with its token dictionary (cellfoundry.model.save_checkpoint)"
        )
    if saved is not None and data_vocab is not None and saved != data_vocab:
        raise ValueError(
            f"the model's token dictionary ({cfg.model}) differs from the tokens' ({beside}): "
            "evaluate a model on tokens made with its own vocabulary"
        )
    return saved if saved is not None else data_vocab  # type: ignore[return-value]


def _columns(cfg: MaskedEvalConfig, available: list[str]) -> list[str]:
    """Columns to read from a shard (those that exist: select_cells names a missing one)."""
    missing = [c for c in ("cell_id", "input_ids") if c not in available]
    if missing:
        raise ValueError(
            f"{cfg.tokenized}: shards lack column(s) {missing}; point --tokens at a tokenized artifact"
        )
    wanted = ["cell_id", "input_ids", cfg.holdout.column, cfg.group_by or ""]
    return [c for c in dict.fromkeys(wanted) if c in available]


def _chosen_cells(held_ids: list[str], cfg: MaskedEvalConfig) -> set[str]:
    """The held-out cells to evaluate: all, or the ``max_cells`` with the lowest hash."""
    if not held_ids:
        raise ValueError(
            f"no held-out cell in {cfg.tokenized} (holdout: {config_to_dict(cfg.holdout)}); "
            "set holdout.column/values to a split that exists or use holdout.mode: hash"
        )
    if cfg.holdout.max_cells is None or len(held_ids) <= cfg.holdout.max_cells:
        return set(held_ids)
    order = np.argsort(hash_fraction(held_ids, cfg.holdout.seed + 1), kind="stable")
    return {held_ids[i] for i in order[: cfg.holdout.max_cells]}


def _fit_baseline(
    cfg: MaskedEvalConfig, files: list[str], special: np.ndarray, max_length: int, eos: int | None
) -> tuple[RankBaseline, list[str]]:
    """Pass 1 over the shards: the rank baseline fit on the training cells, and the ids of
    the held-out cells."""
    baseline, held_ids = RankBaseline(len(special), special), []
    for f in tqdm(files, desc="rank baseline", unit="shard"):
        table = _read_shard(f, cfg)
        held, train = select_cells(table, cfg.holdout)
        rows = table["input_ids"].to_numpy(zero_copy_only=False)
        baseline.update(
            truncate(np.asarray(rows[i]), max_length, eos) for i in np.flatnonzero(train)
        )
        held_ids += [table["cell_id"][int(i)].as_py() for i in np.flatnonzero(held)]
    return baseline.fit(), held_ids


def _score_cells(
    cfg: MaskedEvalConfig,
    files: list[str],
    chosen: set[str],
    predictor: MaskedPredictor,
    baseline: RankBaseline,
    max_length: int,
    eos: int | None,
) -> list[dict[str, Any]]:
    """Pass 2: mask the chosen cells of each shard, predict in length-sorted batches, and
    count each cell's correct guesses (model and baseline)."""
    special = baseline.special
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(chosen), desc="masked genes", unit="cell")
    for f in files:
        table = _read_shard(f, cfg)
        ids = table["cell_id"].to_pylist()
        groups = table[cfg.group_by].to_pylist() if cfg.group_by in table.column_names else None
        rows = table["input_ids"].to_numpy(zero_copy_only=False)
        cells = [
            (i, truncate(np.asarray(rows[i]), max_length, eos))
            for i, c in enumerate(ids)
            if c in chosen
        ]
        cells.sort(key=lambda c: -len(c[1]))  # longest first: similar lengths share a batch
        for start in range(0, len(cells), cfg.batch_size):
            batch = cells[start : start + cfg.batch_size]
            masks = [
                mask_positions(
                    r, special, fraction=cfg.mask_fraction, seed=cfg.seed, cell_id=ids[i]
                )
                for i, r in batch
            ]
            keep = [k for k, m in enumerate(masks) if m.size]
            guesses = predictor.predict([batch[k][1] for k in keep], [masks[k] for k in keep])
            for k, guess in zip(keep, guesses, strict=True):
                i, row = batch[k]
                truth = row[masks[k]]
                base = baseline.predict(gene_ranks(row, special)[masks[k]])
                records.append({
                    "cell_id": ids[i], "group": None if groups is None else groups[i],
                    "n_genes": int((~special[row]).sum()), "n_masked": int(masks[k].size),
                    "model_correct": int((guess == truth).sum()),
                    "baseline_correct": int((base == truth).sum()),
                })  # fmt: skip
            bar.update(len(batch))
    bar.close()
    return records


@artifacts.holds_output(KIND, lambda cfg: cfg.output_dir, object_storage=True)
def run_masked(cfg: MaskedEvalConfig) -> MaskedEvalResult:
    """Evaluate ``cfg.model`` on the held-out cells of ``cfg.tokenized``; write the
    ``evaluation_masked`` artifact (metrics.json, report.md, per_cell.parquet, accuracy.png)."""
    model_dir = local_dir(cfg.model, "model")
    if not (model_dir / "config.json").is_file():
        raise ValueError(
            f"model: {cfg.model} is not a model directory (no config.json); run "
            "`cellfoundry pretrain` first or pass --model DIR"
        )
    if not storage.is_remote(cfg.tokenized) and not Path(cfg.tokenized).is_dir():
        raise ValueError(
            f"tokenized: {cfg.tokenized} does not exist; run `cellfoundry corpus` or "
            "`cellfoundry tokenize` first, or pass --tokens DIR"
        )
    inputs, signatures = input_signatures({"model": cfg.model, "tokenized": cfg.tokenized})
    fp_config = {"config": config_to_dict(cfg), "input_files": signatures}
    fp = artifacts.fingerprint(KIND, fp_config, inputs)
    if artifacts.reusable(cfg.output_dir, KIND, fp) is not None:
        logger.info("reusing the complete evaluation at %s", cfg.output_dir)
        metrics = masked_report.read_metrics(cfg.output_dir)
        return MaskedEvalResult(_output(cfg.output_dir), metrics, reused=True)

    vocab = resolve_vocabulary(cfg)
    model = load_model(model_dir)
    vocab_size = model.config.vocab_size
    if max(vocab.values()) >= vocab_size:
        raise ValueError(
            f"{cfg.model}: token ids reach {max(vocab.values())}, vocab_size is {vocab_size}"
        )
    special = special_mask(vocab, vocab_size)
    max_length = cfg.max_length or model.config.max_position_embeddings
    eos = vocab.get("<eos>")
    files = tokenized_shards(cfg.tokenized, field="tokenized")

    baseline, held_ids = _fit_baseline(cfg, files, special, max_length, eos)
    chosen = _chosen_cells(held_ids, cfg)
    logger.info(
        "rank baseline from %d training cells; evaluating %d of %d held-out cells",
        baseline.n_cells, len(chosen), len(held_ids),
    )  # fmt: skip
    device, autocast = resolve_device(cfg.device, cfg.dtype)
    predictor = MaskedPredictor(
        model, special, pad_id=vocab["<pad>"], mask_id=vocab["<mask>"], device=device,
        autocast_dtype=autocast,
    )  # fmt: skip
    records = _score_cells(cfg, files, chosen, predictor, baseline, max_length, eos)
    skipped = len(chosen) - len(records)
    if skipped:
        logger.warning("%d held-out cells have no gene token and were left out", skipped)

    with artifacts.write_artifact(cfg.output_dir, KIND, fp_config, inputs) as w:
        metrics = masked_report.write_report(
            w.dir, records, cfg=cfg,
            context={"training_cells": baseline.n_cells, "held_out_cells": len(held_ids),
                     "cells_without_genes": skipped, "max_length": max_length,
                     "device": str(device), "autocast": str(autocast)},
        )  # fmt: skip
        w.counts = {"cells": len(records), "training_cells": baseline.n_cells}
    return MaskedEvalResult(_output(cfg.output_dir), metrics)


def run_masked_job(
    config: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """What ``cellfoundry evaluate masked`` and ``jobs/evaluate.py masked`` do: load the
    YAML (or defaults) with overrides, evaluate, return a JSON-able summary."""
    from cellfoundry.config.loader import load_config

    cfg = load_config(MaskedEvalConfig, config, overrides)
    result = run_masked(cfg)
    head = result.metrics
    return {
        "output_dir": str(result.output_dir), "reused": result.reused,
        "n_cells": head["model"]["n"], "model_accuracy_mean": head["model"]["mean"],
        "baseline_accuracy_mean": head["baseline"]["mean"],
        "difference_mean": head["difference"]["mean"],
    }  # fmt: skip
