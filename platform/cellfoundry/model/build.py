"""Build a ``BertForMaskedLM`` with SDPA attention, and count parameters without allocating."""

from __future__ import annotations

import copy

import torch
import transformers

from cellfoundry.model.presets import ModelPreset, bert_config

__all__ = ["ATTN_IMPLEMENTATION", "build_model", "count_parameters"]

#: Attention kernel of every model we build or load (torch.nn.functional.scaled_dot_product_attention).
ATTN_IMPLEMENTATION = "sdpa"


def build_model(
    config: transformers.BertConfig | ModelPreset | str, *, seed: int | None = None
) -> transformers.BertForMaskedLM:
    """A freshly initialised ``BertForMaskedLM`` (fp32, CPU) with SDPA attention, from a
    ``BertConfig`` (see :func:`bert_config`) or a preset (name).

    With ``seed``, the initial weights depend only on the seed; the global torch RNG is
    left as it was. ``config`` is not modified.
    """
    if isinstance(config, (str, ModelPreset)):
        config = bert_config(config)
    if not isinstance(config, transformers.BertConfig):
        raise TypeError(
            f"build_model takes a transformers.BertConfig or a preset name, got "
            f"{type(config).__name__}; make one with cellfoundry.model.bert_config(preset)"
        )
    config = copy.deepcopy(config)
    if seed is None:
        return _construct(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _construct(config)


def _construct(config: transformers.BertConfig) -> transformers.BertForMaskedLM:
    model = transformers.AutoModelForMaskedLM.from_config(
        config, attn_implementation=ATTN_IMPLEMENTATION
    )
    assert isinstance(model, transformers.BertForMaskedLM)
    return model


def count_parameters(
    model_or_config: torch.nn.Module | transformers.BertConfig | ModelPreset | str,
) -> int:
    """Number of distinct parameters (tied weights once). For a config, preset or preset
    name, the ``BertForMaskedLM`` it describes is built on the meta device (no memory)."""
    if isinstance(model_or_config, torch.nn.Module):
        model = model_or_config
    else:
        config = (
            model_or_config
            if isinstance(model_or_config, transformers.BertConfig)
            else bert_config(model_or_config)
        )
        with torch.device("meta"):
            model = transformers.BertForMaskedLM(config)
    # named_parameters() yields a tied tensor once
    return sum(p.numel() for _, p in model.named_parameters())
