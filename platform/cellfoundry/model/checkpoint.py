"""Model checkpoints as Hugging Face directories.

A directory holds ``config.json``, ``model.safetensors``, ``token_dictionary.json`` and,
optionally, ``cellfoundry.json`` (caller's metadata, e.g. preset, step, corpus). Plain
``transformers.BertForMaskedLM.from_pretrained(directory)`` loads it. :func:`load_model`
also loads released Geneformer directories: ``BertForMaskedLM`` or ``BertForPreTraining``
weights (the pooler and next-sentence head are dropped), safetensors or ``pytorch_model.bin``.

We write safetensors only; a released ``pytorch_model.bin`` is read with
``torch.load(weights_only=True)``, which refuses any pickle that needs a class or function.

Every loader here also takes the URI of a ``model`` artifact on object storage
(``s3://bucket/model``): it is first copied whole into this machine's artifact cache
(:func:`cellfoundry.artifacts.localize`, once per machine and manifest), so a Ray actor on
any node loads a model given only its URI, with no shared filesystem.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers

from cellfoundry import artifacts
from cellfoundry.genes.vocab import load_token_dictionary, save_token_dictionary
from cellfoundry.integrity import refused_pickle_reason
from cellfoundry.model.build import ATTN_IMPLEMENTATION

logger = logging.getLogger(__name__)

__all__ = [
    "EXTRA_FILE",
    "TOKEN_DICTIONARY_FILE",
    "CheckpointError",
    "load_checkpoint_extra",
    "load_model",
    "load_token_dictionary_for",
    "local_dir",
    "save_checkpoint",
]

TOKEN_DICTIONARY_FILE = "token_dictionary.json"
EXTRA_FILE = "cellfoundry.json"
#: Weights a BertForPreTraining checkpoint has and BertForMaskedLM does not use.
_DROPPED_PREFIXES = ("bert.pooler.", "pooler.", "cls.seq_relationship.")


class CheckpointError(ValueError):
    """A directory is not a loadable BERT checkpoint, or what is saved does not fit."""


def local_dir(directory: str | Path) -> Path:
    """``directory`` as a local folder: itself when local; for an object-store URI, the
    local copy of the complete artifact there (:func:`cellfoundry.artifacts.localize`)."""
    return artifacts.localize(directory)


def _unwrap(model: torch.nn.Module) -> transformers.PreTrainedModel:
    """The HF model inside DDP / DeepSpeed (``.module``) or torch.compile (``._orig_mod``)."""
    while not isinstance(model, transformers.PreTrainedModel):
        inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            raise TypeError(
                f"save_checkpoint needs a transformers model, got {type(model).__name__}"
            )
        model = inner
    return model


def save_checkpoint(
    model: torch.nn.Module,
    directory: str | Path,
    *,
    token_dictionary: dict[str, int] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (unwrapped from DDP / DeepSpeed / compile) to ``directory`` as
    config.json + model.safetensors, with ``token_dictionary`` (validated; its ids must fit
    the model's vocabulary) and ``extra`` (JSON-serialisable) beside it. Returns the path.

    Files are written to a temporary folder inside ``directory`` and moved in one by one,
    config.json last (a fresh directory with config.json holds complete weights); files of
    other names (e.g. optimizer state) are left alone.
    """
    hf_model = _unwrap(model)
    directory = Path(directory)
    vocab_size = hf_model.config.vocab_size
    if token_dictionary is not None and max(token_dictionary.values()) >= vocab_size:
        raise CheckpointError(
            f"token dictionary has ids up to {max(token_dictionary.values())} but the model's "
            f"vocab_size is {vocab_size}; build the model with vocab_size=len(token_dictionary)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".tmp-save-") as tmp:
        staging = Path(tmp)
        hf_model.save_pretrained(staging)  # safetensors
        if token_dictionary is not None:
            save_token_dictionary(token_dictionary, staging / TOKEN_DICTIONARY_FILE)
        if extra is not None:
            (staging / EXTRA_FILE).write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")
        names = sorted(p.name for p in staging.iterdir())
        names.sort(key=lambda name: name == "config.json")  # config.json last
        for name in names:
            target = directory / name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(staging / name, target)
    logger.info("saved checkpoint to %s (%s)", directory, ", ".join(names))
    return directory


def load_model(
    directory: str | Path, *, dtype: torch.dtype | None = None
) -> transformers.BertForMaskedLM:
    """Load a ``BertForMaskedLM`` (SDPA attention) from a checkpoint directory (or a model
    artifact's URI, see the module docstring): ours, or a released Geneformer one
    (``BertForMaskedLM`` / ``BertForPreTraining`` weights).

    ``dtype`` defaults to float32 whatever the stored dtype. An encoder-only checkpoint loads
    with a freshly initialised MLM head and a ``UserWarning``; missing encoder weights or a
    non-BERT config raise :class:`CheckpointError`, as does a ``pytorch_model.bin`` that
    holds more than tensors (read with ``weights_only=True``: nothing in it runs).
    """
    directory = local_dir(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{directory}: no config.json; expected a Hugging Face model directory written by "
            "save_checkpoint or a released Geneformer model folder"
        )
    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type != "bert":
        raise CheckpointError(
            f"{config_path}: model_type is {model_type!r}; only 'bert' is supported"
        )
    try:
        model, info = transformers.BertForMaskedLM.from_pretrained(
            directory,
            dtype=dtype or torch.float32,
            attn_implementation=ATTN_IMPLEMENTATION,
            output_loading_info=True,
            weights_only=True,  # the default; explicit because a .bin is a pickle
        )
    except pickle.UnpicklingError as exc:
        names = sorted(p.name for p in directory.glob("pytorch_model*.bin"))
        raise CheckpointError(
            f"refusing to load {directory}: {', '.join(names) or 'its weights'} holds more than "
            f"tensors ({refused_pickle_reason(exc)}) and could run code when unpickled; use "
            "weights from a source you trust, preferably model.safetensors"
        ) from exc
    missing = sorted(info["missing_keys"])
    unexpected = sorted(
        k
        for k in info["unexpected_keys"]
        if not k.startswith(_DROPPED_PREFIXES) and not k.endswith("position_ids")
    )
    if info["mismatched_keys"] or info["error_msgs"]:
        raise CheckpointError(f"{directory}: weights do not fit the config: {info}")
    encoder_missing = [k for k in missing if not k.startswith("cls.")]
    if encoder_missing:
        raise CheckpointError(
            f"{directory}: {len(encoder_missing)} encoder weights missing (e.g. "
            f"{encoder_missing[:3]}); is this a BERT checkpoint?"
        )
    if missing:
        warnings.warn(
            f"{directory}: no MLM head in the checkpoint ({len(missing)} tensors, e.g. "
            f"{missing[0]}); it was initialised randomly: fine for fine-tuning, not for "
            "masked-gene prediction before further pretraining",
            UserWarning,
            stacklevel=2,
        )
    if unexpected:
        logger.warning(
            "%s: ignored %d unknown weights, e.g. %s", directory, len(unexpected), unexpected[:3]
        )
    return model


def load_token_dictionary_for(directory: str | Path) -> dict[str, int] | None:
    """The token dictionary saved with a checkpoint (a folder or a model artifact's URI;
    validated), or None if it has none
    (e.g. a released Geneformer folder: use the published dictionary of its version)."""
    path = local_dir(directory) / TOKEN_DICTIONARY_FILE
    return load_token_dictionary(path) if path.is_file() else None


def load_checkpoint_extra(directory: str | Path) -> dict[str, Any] | None:
    """The ``extra`` metadata saved with a checkpoint (a folder or a model artifact's URI),
    or None."""
    path = local_dir(directory) / EXTRA_FILE
    return json.loads(path.read_text()) if path.is_file() else None
