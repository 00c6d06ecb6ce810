"""What a run is made of, derived from its config alone: token dictionary, model config,
step plan and (on a worker) the batches. The driver checks the same things before it
starts any worker, so a wrong path or preset fails fast with a clear message."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import transformers

from cellfoundry.config.train import PretrainJobConfig
from cellfoundry.model import bert_config
from cellfoundry.train.data import (
    PretrainBatches,
    count_cells,
    load_token_corpus,
    resolve_token_dictionary,
)
from cellfoundry.train.optim import StepPlan, plan_steps


@dataclass
class RunSpec:
    """The resolved pieces of a run (``batches`` only on workers)."""

    token_dictionary_path: Path
    token_dictionary: dict[str, int]
    model_config: transformers.BertConfig
    max_length: int
    plan: StepPlan
    n_cells: int
    batches: PretrainBatches | None = None


def model_config_for(
    cfg: PretrainJobConfig, token_dictionary: dict[str, int]
) -> transformers.BertConfig:
    """The preset with its overrides; vocabulary size and pad id from the token dictionary."""
    overrides = dict(cfg.model.overrides)
    clash = sorted({"vocab_size", "pad_token_id"} & set(overrides))
    if clash:
        raise ValueError(
            f"model.overrides sets {clash}: these come from the token dictionary; remove them"
        )
    return bert_config(
        cfg.model.preset,
        **overrides,
        vocab_size=max(token_dictionary.values()) + 1,
        pad_token_id=token_dictionary["<pad>"],
    )


def resolve_max_length(cfg: PretrainJobConfig, model_config: transformers.BertConfig) -> int:
    """``data.max_length``, or the model's max_position_embeddings; never more than it."""
    limit = model_config.max_position_embeddings
    if cfg.data.max_length is None:
        return limit
    if cfg.data.max_length > limit:
        raise ValueError(
            f"data.max_length {cfg.data.max_length} exceeds the model's max_position_embeddings "
            f"{limit}; lower data.max_length or set model.overrides.max_position_embeddings"
        )
    return cfg.data.max_length


def micro_batches_per_epoch(n_cells: int, batch_size: int, world_size: int) -> int:
    """Micro-batches each rank runs per epoch (full global batches only)."""
    return n_cells // (batch_size * world_size)


def prepare_run(
    cfg: PretrainJobConfig, *, rank: int = 0, world_size: int | None = None, load_data: bool = True
) -> RunSpec:
    """Resolve ``cfg``; with ``load_data`` also read the tokens and build this rank's batches."""
    world_size = world_size or cfg.scaling.num_workers
    if not Path(cfg.data.tokenized).is_dir():
        raise ValueError(
            f"data.tokenized: {cfg.data.tokenized} does not exist; run `cellfoundry corpus` or "
            "`cellfoundry tokenize` first, or fix the path"
        )
    td_path, td = resolve_token_dictionary(cfg.data)
    model_config = model_config_for(cfg, td)
    max_length = resolve_max_length(cfg, model_config)
    batches = None
    if load_data:
        corpus = load_token_corpus(cfg.data.tokenized, cfg.data.exclude)
        batches = PretrainBatches(
            corpus,
            td,
            cfg.data,
            max_length=max_length,
            seed=cfg.seed,
            rank=rank,
            world_size=world_size,
        )
        n_cells, micro = len(corpus), batches.micro_per_epoch
    else:
        n_cells = count_cells(cfg.data.tokenized, cfg.data.exclude)
        micro = micro_batches_per_epoch(n_cells, cfg.data.batch_size, world_size)
        if micro == 0:
            raise ValueError(
                f"data.tokenized has {n_cells} cells, fewer than one global batch (data.batch_size "
                f"{cfg.data.batch_size} x {world_size} workers); lower data.batch_size"
            )
    plan = plan_steps(cfg.optim, micro)
    return RunSpec(td_path, td, model_config, max_length, plan, n_cells, batches)
