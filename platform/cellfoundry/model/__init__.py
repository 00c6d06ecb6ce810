"""Models: Hugging Face BERT presets, masking collator, batching, checkpoints (no Ray here).

- :data:`PRESETS`, :func:`bert_config`, :func:`build_model`, :func:`count_parameters`:
  Geneformer-style ``BertForMaskedLM`` sizes from ``tiny`` to ``gf-316m``, SDPA attention.
- :class:`MaskingCollator`: pad and mask 15% of gene tokens (80/10/10), never specials.
- :class:`LengthGroupedBatches`, :func:`padding_fraction`: batches of similar lengths;
  :func:`pack` / :func:`pack_batch`: several cells per row, never attending to each other
  (FlexAttention document mask, :func:`use_flex_attention`, or a dense block-diagonal one).
- :func:`save_checkpoint`, :func:`load_model`, :func:`load_token_dictionary_for`: HF
  directories that plain ``BertForMaskedLM.from_pretrained`` loads; released Geneformer
  folders load too.
"""

from cellfoundry.model.batching import LengthGroupedBatches, padding_fraction
from cellfoundry.model.build import ATTN_IMPLEMENTATION, build_model, count_parameters
from cellfoundry.model.checkpoint import (
    EXTRA_FILE,
    TOKEN_DICTIONARY_FILE,
    CheckpointError,
    load_checkpoint_extra,
    load_model,
    load_token_dictionary_for,
    save_checkpoint,
)
from cellfoundry.model.masking import IGNORE_INDEX, MaskingCollator
from cellfoundry.model.packing import (
    Packing,
    first_fit_decreasing,
    pack,
    pack_batch,
    use_flex_attention,
)
from cellfoundry.model.presets import PRESETS, ModelPreset, PresetError, bert_config, get_preset

__all__ = [
    "ATTN_IMPLEMENTATION",
    "EXTRA_FILE",
    "IGNORE_INDEX",
    "PRESETS",
    "TOKEN_DICTIONARY_FILE",
    "CheckpointError",
    "LengthGroupedBatches",
    "MaskingCollator",
    "ModelPreset",
    "Packing",
    "PresetError",
    "bert_config",
    "build_model",
    "count_parameters",
    "first_fit_decreasing",
    "get_preset",
    "load_checkpoint_extra",
    "load_model",
    "load_token_dictionary_for",
    "pack",
    "pack_batch",
    "padding_fraction",
    "save_checkpoint",
    "use_flex_attention",
]
