"""What a run is made of, derived from its config alone: token dictionary, model config,
data index, step plan and (on a worker) the batches. The driver checks the same things
before it starts any worker, so a wrong path or preset fails fast with a clear message."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers

from cellfoundry.config.train import PretrainJobConfig
from cellfoundry.model import bert_config
from cellfoundry.train.data import RowFilter, resolve_token_dictionary
from cellfoundry.train.optim import StepPlan, plan_steps
from cellfoundry.train.stream import TRAIN, VALIDATION, BlockIndex, PretrainBatches


@dataclass
class RunSpec:
    """The resolved pieces of a run (``batches`` and ``validation`` only on workers)."""

    token_dictionary_path: Path
    token_dictionary: dict[str, int]
    model_config: transformers.BertConfig
    max_length: int
    plan: StepPlan
    index: BlockIndex
    """Blocks of the training stream."""
    validation_index: BlockIndex | None
    """Blocks of the validation stream (None without ``data.validation``)."""
    micro_per_epoch: int
    validation_batches: int
    """Micro-batches per rank per evaluation (0 without validation)."""
    batches: PretrainBatches | None = None
    validation: PretrainBatches | None = None

    @property
    def n_cells(self) -> int:
        """Training cells (after ``data.exclude`` and the validation hold-out)."""
        return self.index.total

    def indexes_state(self) -> dict[str, Any]:
        """The indexes as plain data, for :func:`prepare_run` on the workers."""
        v = self.validation_index
        return {"train": self.index.to_state(), "validation": v.to_state() if v else None}


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


def _index(
    cfg: PretrainJobConfig, side: str, state: dict[str, Any] | None, field: str
) -> BlockIndex:
    data = cfg.data
    row_filter = RowFilter.for_stream(data, "train" if side == "train" else "validation")
    if state is not None:
        return BlockIndex.from_state(state, row_filter)
    uri = data.tokenized if side == "train" else (data.validation.tokenized or data.tokenized)
    try:
        return BlockIndex.build(uri, row_filter, data.block_rows)
    except ValueError as exc:
        raise ValueError(f"{field}: {exc}") from None


def prepare_run(
    cfg: PretrainJobConfig,
    *,
    rank: int = 0,
    world_size: int | None = None,
    load_data: bool = True,
    indexes: dict[str, Any] | None = None,
) -> RunSpec:
    """Resolve ``cfg``: index the shards (or take ``indexes``, the driver's
    :meth:`RunSpec.indexes_state`) and plan the steps; with ``load_data`` also set up this
    rank's training and validation batches (which read nothing until asked for a batch)."""
    world_size = world_size or cfg.scaling.num_workers
    indexes = indexes or {}
    index = _index(cfg, "train", indexes.get("train"), "data.tokenized")
    validation_index = None
    if cfg.data.validation.enabled:
        field = "data.validation.tokenized" if cfg.data.validation.tokenized else "data.tokenized"
        validation_index = _index(cfg, "validation", indexes.get("validation"), field)
    td_path, td = resolve_token_dictionary(cfg.data)
    model_config = model_config_for(cfg, td)
    max_length = resolve_max_length(cfg, model_config)
    kwargs = {"max_length": max_length, "seed": cfg.seed, "rank": rank, "world_size": world_size}
    # building the batches checks there is at least one global batch; it reads no cells
    batches = PretrainBatches(index, td, cfg.data, stream=TRAIN, **kwargs)
    validation, n_validation = None, 0
    if validation_index is not None:
        validation = PretrainBatches(validation_index, td, cfg.data, stream=VALIDATION, **kwargs)
        n_validation = min(cfg.data.validation.batches, validation.micro_per_epoch)
    plan = plan_steps(cfg.optim, batches.micro_per_epoch)
    spec = RunSpec(
        td_path, td, model_config, max_length, plan, index, validation_index,
        batches.micro_per_epoch, n_validation,
    )  # fmt: skip
    if load_data:
        spec.batches, spec.validation = batches, validation
    return spec
