"""Presets: sizes match their names, shared Geneformer settings, configs, building, counting."""

from __future__ import annotations

import pytest
import torch
import transformers

from cellfoundry.genes import load_token_dictionary
from cellfoundry.model import (
    PRESETS,
    MaskingCollator,
    ModelPreset,
    PresetError,
    bert_config,
    build_model,
    count_parameters,
)

NAMED = [name for name, p in PRESETS.items() if p.nominal_params is not None]


def closed_form(p: ModelPreset) -> int:
    """BertForMaskedLM parameters from the sizes alone (independent of transformers)."""
    h, i, v, n = p.hidden_size, p.intermediate_size, p.vocab_size, p.max_position_embeddings
    embeddings = (v + n + 2) * h + 2 * h
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h
    head = h * h + h + 2 * h + v  # transform dense + LayerNorm + decoder bias (weight tied)
    return embeddings + p.num_layers * layer + head


def test_every_named_preset_is_there() -> None:
    assert set(PRESETS) == {"tiny", "gf-10m", "gf-38m", "gf-65m", "gf-104m", "gf-228m", "gf-316m"}
    assert all(PRESETS[n].name == n for n in PRESETS)


@pytest.mark.parametrize("name", NAMED)
def test_parameter_count_matches_the_name(name: str) -> None:
    p = PRESETS[name]
    n = count_parameters(name)
    assert n == closed_form(p)
    assert abs(n / p.nominal_params - 1) <= 0.05, f"{name}: {n:,} params"
    assert n == count_parameters(bert_config(name)) == count_parameters(p)


@pytest.mark.parametrize("name", [n for n in NAMED if PRESETS[n].vocab == "v2"])
def test_v2_presets_follow_the_scaling_rules(name: str) -> None:
    p = PRESETS[name]
    assert p.hidden_size == 64 * p.num_layers
    assert p.head_dim == 64
    assert p.intermediate_size == 4 * p.hidden_size
    assert (p.max_position_embeddings, p.vocab_size) == (4096, 20275)


def test_v1_and_largest_presets_are_the_released_shapes() -> None:
    v1 = PRESETS["gf-10m"]
    assert (v1.num_layers, v1.hidden_size, v1.num_heads) == (6, 256, 4)
    assert (v1.max_position_embeddings, v1.vocab_size, v1.vocab) == (2048, 25426, "v1")
    assert v1.intermediate_size == 512  # the released gf-6L-30M-i2048 config (2x width)
    big = PRESETS["gf-316m"]
    assert (big.num_layers, big.hidden_size, big.num_heads, big.intermediate_size) == (
        18,
        1152,
        18,
        4608,
    )
    base = PRESETS["gf-104m"]
    assert (base.num_layers, base.hidden_size, base.num_heads) == (12, 768, 12)


def test_config_has_the_geneformer_settings() -> None:
    c = bert_config("gf-104m")
    assert isinstance(c, transformers.BertConfig)
    assert c.hidden_act == "relu"
    assert c.hidden_dropout_prob == c.attention_probs_dropout_prob == 0.02
    assert c.initializer_range == 0.02 and c.layer_norm_eps == 1e-12
    assert c.pad_token_id == 0
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (12, 768, 12)


def test_overrides_and_their_errors() -> None:
    c = bert_config("tiny", vocab_size=64, max_position_embeddings=32)
    assert (c.vocab_size, c.max_position_embeddings, c.hidden_size) == (64, 32, 128)
    with pytest.raises(PresetError, match="num_hidden_layers"):
        bert_config("tiny", num_layers=3)
    with pytest.raises(PresetError, match="gf-10m"):
        bert_config("gf-9m")
    with pytest.raises(PresetError, match="multiple"):
        bert_config("tiny", num_attention_heads=3)
    with pytest.raises(PresetError, match="multiple"):
        ModelPreset("bad", 2, 100, 3, 400, 64, 64)


def test_build_model_sdpa_seeded_and_counted() -> None:
    config = bert_config("tiny", vocab_size=40, max_position_embeddings=32)
    state = torch.random.get_rng_state()
    a = build_model(config, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    b = build_model(config, seed=7)
    c = build_model(config, seed=8)
    assert isinstance(a, transformers.BertForMaskedLM)
    assert a.config._attn_implementation == "sdpa"
    assert a.config is not config
    w = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])
    # the decoder is tied to the embeddings and counted once; meta count == real count
    assert a.cls.predictions.decoder.weight is a.bert.embeddings.word_embeddings.weight
    assert count_parameters(a) == count_parameters(config)
    assert count_parameters(build_model("tiny", seed=0)) == count_parameters("tiny")
    with pytest.raises(TypeError, match="bert_config"):
        build_model({"hidden_size": 64})  # type: ignore[arg-type]


def test_vocabulary_sizes_match_the_real_dictionaries(geneformer_dir) -> None:
    for version, preset in (
        ("v1/token_dictionary_gc30M.json", "gf-10m"),
        ("v2/token_dictionary_gc104M.json", "gf-104m"),
    ):
        d = load_token_dictionary(geneformer_dir / version)
        assert len(d) == PRESETS[preset].vocab_size
        c = MaskingCollator.for_token_dictionary(d)
        assert c.vocab_size == len(d)
        assert c.special_ids == ((0, 1) if PRESETS[preset].vocab == "v1" else (0, 1, 2, 3))
