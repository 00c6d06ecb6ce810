"""Classifiers from a pretrained model directory: full fine-tuning, QLoRA (4-bit NF4 base,
LoRA adapters on query/key/value), and loading a fine-tuned model for inference (fp32 or
8-bit). Adapters are saved apart from the base model, which stays where it is. Models (and
the base model an adapter or probe names) may be ``s3://`` / ``gs://`` URIs of artifacts:
they are loaded from this machine's cached copy (:func:`cellfoundry.artifacts.localize`)."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers

from cellfoundry.config.tune import FinetuneModelConfig, QuantizationConfig
from cellfoundry.model import ATTN_IMPLEMENTATION
from cellfoundry.tune.remote import local_dir

logger = logging.getLogger(__name__)

FINETUNE_FILE = "finetune.json"
"""What a fine-tuned model directory holds: mode, task, labels, base model path."""
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
#: LoRA defaults from the Geneformer seeds: (r, alpha) per task.
LORA_DEFAULTS = {"cell": (32, 64), "gene": (128, 256)}


def _head_class(task: str) -> type[transformers.PreTrainedModel]:
    if task == "cell":
        return transformers.BertForSequenceClassification
    return transformers.BertForTokenClassification


def compute_dtype(choice: str, on_gpu: bool) -> torch.dtype:
    """bf16 on a GPU that supports it (``auto``/``bf16``), else fp32 (with a warning when
    bf16 was asked for)."""
    bf16_ok = on_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if choice == "bf16" and not bf16_ok:
        logger.warning("quantization.bnb_4bit_compute_dtype bf16 needs a bf16 GPU: using fp32")
    return torch.bfloat16 if choice in ("auto", "bf16") and bf16_ok else torch.float32


def bnb_config(q: QuantizationConfig, *, on_gpu: bool, eight_bit: bool = False) -> Any:
    """``transformers.BitsAndBytesConfig`` of ``q`` (or 8-bit inference with ``eight_bit``)."""
    if eight_bit or not q.load_in_4bit:
        return transformers.BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_skip_modules=list(q.llm_int8_skip_modules)
        )
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype(q.bnb_4bit_compute_dtype, on_gpu),
        llm_int8_skip_modules=list(q.llm_int8_skip_modules),
    )


def _from_pretrained(
    directory: str | Path, task: str, label_names: list[str], *, dropout: float | None = None,
    quantization: Any = None, on_gpu: bool = False,
) -> transformers.PreTrainedModel:  # fmt: skip
    kwargs: dict[str, Any] = {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {n: i for i, n in enumerate(label_names)},
        "attn_implementation": ATTN_IMPLEMENTATION,
        "dtype": torch.float32,
        "weights_only": True,  # transformers' default; explicit as a pytorch_model.bin is a pickle
    }
    if dropout is not None:
        kwargs.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if quantization is not None:
        kwargs.update(
            quantization_config=quantization, device_map={"": 0} if on_gpu else {"": "cpu"}
        )
    local = local_dir(directory, "model.model_dir")
    if not (local / "config.json").is_file():
        raise ValueError(
            f"model.model_dir {directory}: no config.json; point it at a model artifact"
        )
    return _head_class(task).from_pretrained(local, **kwargs)


def build_classifier(
    cfg: FinetuneModelConfig, *, task: str, label_names: list[str], seed: int, on_gpu: bool
) -> torch.nn.Module:
    """A classifier over the pretrained encoder of ``cfg.model_dir`` (new head seeded by
    ``seed``): fp32 with ``freeze_layers`` frozen (mode full), or a PEFT model whose only
    trainable weights are the LoRA adapters, the head and the pooler (mode qlora)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.mode == "qlora":
            return _qlora(cfg, task=task, label_names=label_names, on_gpu=on_gpu)
        model = _from_pretrained(cfg.model_dir, task, label_names, dropout=cfg.dropout)
    frozen = (
        [model.bert.embeddings, *model.bert.encoder.layer[: cfg.freeze_layers]]
        if cfg.freeze_layers
        else []
    )
    for module in frozen:
        module.requires_grad_(False)
    return model


def _qlora(
    cfg: FinetuneModelConfig, *, task: str, label_names: list[str], on_gpu: bool
) -> torch.nn.Module:
    import peft

    base = _from_pretrained(
        cfg.model_dir, task, label_names, dropout=cfg.dropout,
        quantization=bnb_config(cfg.quantization, on_gpu=on_gpu), on_gpu=on_gpu,
    )  # fmt: skip
    r_default, alpha_default = LORA_DEFAULTS[task]
    r = cfg.lora.r or r_default
    lora = peft.LoraConfig(
        r=r,
        lora_alpha=cfg.lora.lora_alpha or (alpha_default if cfg.lora.r is None else 2 * r),
        lora_dropout=cfg.lora.lora_dropout,
        target_modules=list(cfg.lora.target_modules),
        bias=cfg.lora.bias,
        task_type=peft.TaskType.SEQ_CLS if task == "cell" else peft.TaskType.TOKEN_CLS,
        modules_to_save=["classifier", "pooler"] if task == "cell" else ["classifier"],
    )
    model = peft.get_peft_model(base, lora)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("qlora: %s of %s parameters train (r=%d)", f"{trainable:,}", f"{total:,}", r)
    return model


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the weights that train (to check that nothing else changed)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_finetuned(
    model: torch.nn.Module, directory: Path, *, mode: str, task: str, label_names: list[str],
    base_model: str, token_dictionary: dict[str, int] | None = None,
) -> Path:  # fmt: skip
    """Write the model (``model/``: full HF folder; ``adapter/``: PEFT adapter only;
    ``probe/``: the probe's head; the last two point at ``base_model``) and
    ``finetune.json`` into ``directory``."""
    from cellfoundry.genes.vocab import save_token_dictionary
    from cellfoundry.tune.probe_model import PROBE_DIR, ProbeClassifier

    directory.mkdir(parents=True, exist_ok=True)
    sub = {"qlora": ADAPTER_DIR, "probe": PROBE_DIR}.get(mode, MODEL_DIR)
    if isinstance(model, ProbeClassifier):
        model.save(directory / sub)
    else:
        model.save_pretrained(directory / sub)
    if token_dictionary is not None:
        save_token_dictionary(token_dictionary, directory / sub / "token_dictionary.json")
    info = {
        "mode": mode,
        "task": task,
        "label_names": label_names,
        "base_model": base_model,
        "weights": sub,
    }
    (directory / FINETUNE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return directory


def load_finetuned(
    directory: str | Path, *, load_in_8bit: bool = False, on_gpu: bool = False
) -> torch.nn.Module:
    """A fine-tuned classifier saved by :func:`save_finetuned`, in eval mode: fp32, or with
    the encoder in 8-bit (``load_in_8bit``; head and pooler stay fp32). An adapter loads onto
    its base model (4-bit NF4 as trained, or 8-bit); a linear probe onto its frozen base.
    ``directory`` may be the URI of a ``finetuned`` artifact (loaded from a cached copy)."""
    where = directory
    directory = local_dir(directory, "fine-tuned model")
    info_path = directory / FINETUNE_FILE
    if not info_path.is_file():
        raise ValueError(f"{where}: no {FINETUNE_FILE}; run `cellfoundry finetune` first")
    info = json.loads(info_path.read_text())
    q = QuantizationConfig()
    names, task = list(info["label_names"]), info["task"]
    if info["mode"] == "probe":
        from cellfoundry.tune.probe_model import PROBE_DIR, ProbeClassifier

        if load_in_8bit:
            logger.warning("%s: a linear probe loads in fp32 (load_in_8bit ignored)", directory)
        base = local_dir(info["base_model"], f"the base model of {where}")
        return ProbeClassifier.load(directory / PROBE_DIR, base)
    if info["mode"] != "qlora":
        quant = bnb_config(q, on_gpu=on_gpu, eight_bit=True) if load_in_8bit else None
        model = _head_class(task).from_pretrained(
            directory / MODEL_DIR, attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.float32,
            weights_only=True,
            **({"quantization_config": quant, "device_map": {"": 0} if on_gpu else {"": "cpu"}} if quant else {}),
        )  # fmt: skip
        return model.eval()
    import peft

    quant = bnb_config(q, on_gpu=on_gpu, eight_bit=load_in_8bit)
    with warnings.catch_warnings():  # the fresh head is replaced by the adapter's copy
        warnings.simplefilter("ignore", UserWarning)
        base = _from_pretrained(info["base_model"], task, names, quantization=quant, on_gpu=on_gpu)
    return peft.PeftModel.from_pretrained(base, directory / ADAPTER_DIR).eval()
