"""Named BERT sizes for Geneformer-style models, and their ``transformers.BertConfig``.

Shared by every preset (the published Geneformer configs): ReLU, dropout 0.02 on hidden
states and attention, initializer std 0.02, layer-norm eps 1e-12, absolute positions,
``<pad>`` = 0, two token types (unused, kept so released checkpoints load unchanged).

V2 presets follow the Geneformer V2 scaling series: head dimension 64, width = 64 x depth,
feed-forward 4 x width, input 4,096 tokens, vocabulary 20,275 (Genecorpus-104M).
``gf-10m`` is the released V1 model (Genecorpus-30M): input 2,048, vocabulary 25,426.

=========  ======  ======  =====  =====  =====  ======  ===========
preset     layers  hidden  heads  ffn    input  vocab   parameters
=========  ======  ======  =====  =====  =====  ======  ===========
tiny       2       128     2      512    4096   20275   3,553,587
gf-10m     6       256     4      512    2048   25426   10,288,722
gf-38m     8       512     8      2048   4096   20275   37,983,027
gf-65m     10      640     10     2560   4096   20275   65,266,995
gf-104m    12      768     12     3072   4096   20275   104,386,867
gf-228m    16      1024    16     4096   4096   20275   227,571,507
gf-316m    18      1152    18     4608   4096   20275   316,354,867
=========  ======  ======  =====  =====  =====  ======  ===========

Parameters are those of ``BertForMaskedLM`` (no pooler; decoder tied to the embeddings),
as returned by :func:`cellfoundry.model.count_parameters`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import transformers

__all__ = ["PRESETS", "ModelPreset", "PresetError", "bert_config"]

HEAD_DIM = 64
V1_VOCAB, V1_INPUT = 25_426, 2_048
V2_VOCAB, V2_INPUT = 20_275, 4_096

#: BertConfig settings common to every preset (the published Geneformer values).
SHARED_SETTINGS: dict[str, Any] = {
    "hidden_act": "relu",
    "hidden_dropout_prob": 0.02,
    "attention_probs_dropout_prob": 0.02,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
}


class PresetError(ValueError):
    """An unknown preset name, an unknown override or an inconsistent size."""


@dataclass(frozen=True)
class ModelPreset:
    """One model size. ``nominal_params`` is the size the name promises (None for tiny)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    vocab_size: int
    nominal_params: int | None = None
    """Parameter count the name promises; the real count is within 5% of it (tested)."""
    vocab: Literal["v1", "v2"] = "v2"
    """Token layout the preset's vocabulary size belongs to (see cellfoundry.genes.vocab)."""
    note: str = ""
    """Where the sizes come from, and any departure from the V2 scaling rules."""

    def __post_init__(self) -> None:
        if min(self.num_layers, self.hidden_size, self.num_heads, self.intermediate_size) < 1:
            raise PresetError(f"preset {self.name!r}: sizes must be positive")
        if self.hidden_size % self.num_heads:
            raise PresetError(
                f"preset {self.name!r}: hidden_size {self.hidden_size} is not a multiple of "
                f"num_heads {self.num_heads}; pick heads = hidden_size / {HEAD_DIM}"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads


def _v2(name: str, layers: int, nominal: int | None, note: str = "") -> ModelPreset:
    """A V2 scaling-series preset: width 64 x depth, head dim 64, feed-forward 4 x width."""
    width = HEAD_DIM * layers
    return ModelPreset(
        name=name,
        num_layers=layers,
        hidden_size=width,
        num_heads=width // HEAD_DIM,
        intermediate_size=4 * width,
        max_position_embeddings=V2_INPUT,
        vocab_size=V2_VOCAB,
        nominal_params=nominal,
        vocab="v2",
        note=note or f"V2 scaling series: {layers} layers x {width} wide, ffn {4 * width}.",
    )


PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(
        name="tiny",
        num_layers=2,
        hidden_size=128,
        num_heads=2,
        intermediate_size=512,
        max_position_embeddings=V2_INPUT,
        vocab_size=V2_VOCAB,
        nominal_params=None,
        vocab="v2",
        note="For tests and smoke runs only: head dim 64, ffn 4x, V2 input and vocabulary.",
    ),
    "gf-10m": ModelPreset(
        name="gf-10m",
        num_layers=6,
        hidden_size=256,
        num_heads=4,
        intermediate_size=512,
        max_position_embeddings=V1_INPUT,
        vocab_size=V1_VOCAB,
        nominal_params=10_000_000,
        vocab="v1",
        note=(
            "The released Geneformer V1 10M model (gf-6L-30M-i2048, Geneformer-V1-10M): its "
            "config.json has intermediate_size 512, i.e. feed-forward 2x width, not 4x, and "
            "width/depth 256/6 rather than 64. With ffn 4x (1,024) the model would have "
            "11.86M parameters (+18.6%); with the released 512 it has 10.29M (+2.9%)."
        ),
    ),
    "gf-38m": _v2("gf-38m", 8, 38_000_000),
    "gf-65m": _v2("gf-65m", 10, 65_000_000),
    "gf-104m": _v2(
        "gf-104m", 12, 104_000_000, "Geneformer-V2-104M: 12 layers x 768, 12 heads, ffn 3,072."
    ),
    "gf-228m": _v2("gf-228m", 16, 228_000_000),
    "gf-316m": _v2(
        "gf-316m", 18, 316_000_000, "Geneformer-V2-316M: 18 layers x 1,152, 18 heads, ffn 4,608."
    ),
}

_ALLOWED_OVERRIDES = frozenset(transformers.BertConfig().to_dict()) - {
    "model_type",
    "transformers_version",
    "_name_or_path",
}


def get_preset(preset: str | ModelPreset) -> ModelPreset:
    """The preset named ``preset`` (or ``preset`` itself); :class:`PresetError` if unknown."""
    if isinstance(preset, ModelPreset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise PresetError(
            f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}"
        ) from None


def bert_config(preset: str | ModelPreset, **overrides: Any) -> transformers.BertConfig:
    """``BertConfig`` of ``preset`` with ``overrides`` (BertConfig field names, e.g.
    ``vocab_size=25_426``, ``max_position_embeddings=2_048``, ``hidden_dropout_prob=0.0``).

    Raises :class:`PresetError` for an unknown preset or field, or heads not dividing width.
    """
    p = get_preset(preset)
    unknown = sorted(set(overrides) - _ALLOWED_OVERRIDES)
    if unknown:
        raise PresetError(
            f"bert_config({p.name!r}): unknown BertConfig fields {unknown}; use BertConfig "
            f"names such as num_hidden_layers, num_attention_heads, vocab_size"
        )
    kwargs: dict[str, Any] = {
        "vocab_size": p.vocab_size,
        "hidden_size": p.hidden_size,
        "num_hidden_layers": p.num_layers,
        "num_attention_heads": p.num_heads,
        "intermediate_size": p.intermediate_size,
        "max_position_embeddings": p.max_position_embeddings,
        **SHARED_SETTINGS,
        "architectures": ["BertForMaskedLM"],
    }
    kwargs.update(overrides)
    if kwargs["hidden_size"] % kwargs["num_attention_heads"]:
        raise PresetError(
            f"bert_config({p.name!r}): hidden_size {kwargs['hidden_size']} is not a multiple "
            f"of num_attention_heads {kwargs['num_attention_heads']}"
        )
    return transformers.BertConfig(**kwargs)
