"""Training checkpoints: DeepSpeed's engine state for exact resume, plus a consolidated
Hugging Face folder that plain ``BertForMaskedLM.from_pretrained`` loads.

Layout of one checkpoint folder (every rank writes its own shard files into its local
folder; Ray Train merges them into one checkpoint):

    ds/latest, ds/<tag>/...   DeepSpeed engine: weights, ZeRO optimizer shards, LR schedule
    hf/                       config.json, model.safetensors, token_dictionary.json (rank 0)
    state.json                step and counters (rank 0)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cellfoundry.model import save_checkpoint

logger = logging.getLogger(__name__)

DS_DIR, HF_DIR, STATE_FILE = "ds", "hf", "state.json"
#: Keys of the loop's state saved in DeepSpeed's client state (DeepSpeed adds its own).
STATE_KEYS = ("step", "tokens")


def step_tag(step: int) -> str:
    """DeepSpeed tag (and Ray checkpoint folder suffix) of ``step``."""
    return f"step_{step:08d}"


def save_training_checkpoint(
    engine: Any,
    directory: Path,
    *,
    state: dict[str, Any],
    token_dictionary: dict[str, int],
    extra: dict[str, Any],
    rank: int,
) -> None:
    """Collective: every rank calls it with its own local ``directory``.

    ``state`` (JSON-able: step, counters) goes into DeepSpeed's client state and, on rank 0,
    ``state.json``; ``extra`` into the HF folder's ``cellfoundry.json``.
    """
    engine.save_checkpoint(str(directory / DS_DIR), tag=step_tag(state["step"]), client_state=state)
    hf_model = engine.module.model
    if engine.zero_optimization_partition_weights():  # ZeRO-3: gather the full weights
        import deepspeed

        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if rank == 0:
                save_checkpoint(
                    hf_model, directory / HF_DIR, token_dictionary=token_dictionary, extra=extra
                )
    elif rank == 0:
        save_checkpoint(
            hf_model, directory / HF_DIR, token_dictionary=token_dictionary, extra=extra
        )
    if rank == 0:
        (directory / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def training_state_dir(checkpoint_dir: Path) -> Path:
    """The DeepSpeed folder of a Ray checkpoint (``ds/``) or of a model artifact
    (``training_state/``)."""
    for name in (DS_DIR, "training_state"):
        if (checkpoint_dir / name / "latest").is_file():
            return checkpoint_dir / name
    raise ValueError(
        f"{checkpoint_dir} holds no DeepSpeed training state (ds/latest or training_state/latest); "
        "pass a checkpoint of a cellfoundry pretraining run or its model artifact"
    )


def load_training_checkpoint(engine: Any, checkpoint_dir: Path) -> dict[str, Any]:
    """Restore weights, optimizer, LR schedule and step; returns the saved ``state``."""
    ds_dir = training_state_dir(checkpoint_dir)
    path, client_state = engine.load_checkpoint(
        str(ds_dir), load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise ValueError(f"DeepSpeed could not load the training state in {ds_dir}")
    state = {k: v for k, v in (client_state or {}).items() if k in STATE_KEYS}
    if "step" not in state:
        raise ValueError(
            f"{ds_dir}: the training state has no step; it was not written by cellfoundry"
        )
    logger.info("resumed from %s at step %d", path, state["step"])
    return state
