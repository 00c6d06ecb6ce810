"""Load models for serving: fp32, bf16 or 8-bit (bitsandbytes LLM.int8), on CPU or GPU.

Classifiers are either full fine-tuned ``BertForSequenceClassification`` directories or
peft LoRA adapter directories (``adapter_config.json``) put onto their base model.
Any of them (and a base model an adapter names) may be the ``s3://`` / ``gs://`` URI of an
artifact: each replica loads it from its node's cached copy, downloaded once per node and
manifest (:func:`cellfoundry.artifacts.localize`).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers

from cellfoundry import artifacts, storage
from cellfoundry.model import ATTN_IMPLEMENTATION, load_model

logger = logging.getLogger(__name__)

# Heads stay in full precision: bitsandbytes cannot quantize a head of few outputs, and the
# tied MLM decoder shares the word embeddings (PITFALLS.md).
_SKIP_MODULES = [
    "cls",
    "classifier",
    "pooler",
    "pooler.dense",
]  # names match from the start or as a suffix


def local_model(directory: str | Path) -> Path:
    """The local folder of a model: ``directory`` itself, or this node's cached copy of the
    artifact at a URI (an incomplete or missing one is a ``ValueError`` naming it)."""
    try:
        return artifacts.localize(directory)
    except artifacts.ArtifactError as exc:
        raise ValueError(f"cannot serve {directory}: {exc}") from None


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on a GPU, fp32 on CPU; bf16 on CPU is kept (slow but valid)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def serving_device(num_gpus: float) -> torch.device:
    """cuda when the replica was given a GPU and one is visible, else cpu."""
    if num_gpus > 0 and not torch.cuda.is_available():
        warnings.warn("num_gpus > 0 but no CUDA device is visible: serving on CPU", stacklevel=2)
    return torch.device("cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu")


def _quantization(precision: str) -> dict[str, Any]:
    if precision != "int8":
        return {}
    return {
        "quantization_config": transformers.BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_skip_modules=_SKIP_MODULES
        )
    }


def load_encoder(
    directory: str | Path, precision: str, device: torch.device
) -> transformers.PreTrainedModel:
    """The masked-LM model of ``directory`` (folder or URI) in ``precision`` on ``device``
    (eval mode)."""
    where, directory = directory, local_model(directory)
    precision = resolve_precision(precision, device)
    if precision == "int8":
        model = transformers.BertForMaskedLM.from_pretrained(
            directory, attn_implementation=ATTN_IMPLEMENTATION, device_map={"": str(device)},
            **_quantization(precision),
        )  # fmt: skip
    else:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        model = load_model(directory, dtype=dtype).to(device)
    logger.info("loaded %s in %s on %s", where, precision, device)
    return model.eval()


def load_classifier(
    directory: str | Path, precision: str, device: torch.device
) -> tuple[torch.nn.Module, list[str]]:
    """``(model, labels)`` of a fine-tuned cell classifier: a full model directory, or a
    LoRA adapter directory whose ``adapter_config.json`` names its base model. Labels come
    from the config's ``id2label`` (ordered by class index). Folders or URIs."""
    directory = local_model(directory)
    precision = resolve_precision(precision, device)
    if (directory / "finetune.json").is_file():  # a `cellfoundry finetune` artifact
        return _load_finetuned(directory, precision, device)
    adapter = directory / "adapter_config.json"
    if adapter.is_file():
        import peft

        base_dir = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if base_dir and storage.is_remote(base_dir):
            base_dir = str(local_model(base_dir))
        config_dir = directory if (directory / "config.json").is_file() else Path(base_dir or "")
        if not (config_dir / "config.json").is_file():
            raise ValueError(
                f"{adapter}: base_model_name_or_path={base_dir!r} has no config.json; save the "
                "adapter with its classifier config beside it or fix the base path"
            )
        config = transformers.AutoConfig.from_pretrained(config_dir)
        base = _load_seq_classifier(base_dir, precision, device, config=config)
        model = (
            peft.PeftModel.from_pretrained(base, directory).to(device)
            if precision != "int8"
            else (peft.PeftModel.from_pretrained(base, directory))
        )
    else:
        if not (directory / "config.json").is_file():
            raise ValueError(
                f"classifier {directory}: neither config.json nor adapter_config.json found"
            )
        config = transformers.AutoConfig.from_pretrained(directory)
        model = _load_seq_classifier(directory, precision, device, config=config)
    labels = [config.id2label[i] for i in range(config.num_labels)]
    return model.eval(), labels


def _load_seq_classifier(
    directory: str | Path, precision: str, device: torch.device, *, config: Any
) -> torch.nn.Module:
    kwargs: dict[str, Any] = {"config": config, "attn_implementation": ATTN_IMPLEMENTATION}
    if precision == "int8":
        return transformers.BertForSequenceClassification.from_pretrained(
            directory, device_map={"": str(device)}, **kwargs, **_quantization(precision)
        )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return transformers.BertForSequenceClassification.from_pretrained(
        directory, dtype=dtype, **kwargs
    ).to(device)


def _load_finetuned(
    directory: Path, precision: str, device: torch.device
) -> tuple[torch.nn.Module, list[str]]:
    from cellfoundry.tune.models import load_finetuned

    info = json.loads((directory / "finetune.json").read_text())
    if info.get("task") != "cell":
        raise ValueError(
            f"{directory} is a {info.get('task')!r} classifier; /classify serves cell classifiers"
        )
    model = load_finetuned(
        directory, load_in_8bit=precision == "int8", on_gpu=device.type == "cuda"
    )
    if precision != "int8" and info.get("mode") != "qlora":
        model = model.to(device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    return model.eval(), list(info["label_names"])
