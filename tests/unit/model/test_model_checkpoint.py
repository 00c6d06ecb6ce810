"""Checkpoints: HF directories that plain transformers loads; released Geneformer layouts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from cellfoundry.genes import VocabularyError
from cellfoundry.model import (
    CheckpointError,
    bert_config,
    build_model,
    load_checkpoint_extra,
    load_model,
    load_token_dictionary_for,
    save_checkpoint,
)

VOCAB = {
    "<pad>": 0,
    "<mask>": 1,
    "<cls>": 2,
    "<eos>": 3,
    **{f"ENSG{i:011d}": i for i in range(4, 40)},
}


@pytest.fixture(scope="module")
def config() -> transformers.BertConfig:
    return bert_config(
        "tiny",
        vocab_size=len(VOCAB),
        max_position_embeddings=32,
        hidden_size=64,
        intermediate_size=256,
        num_attention_heads=1,
    )


def inputs() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[2, 5, 9, 1, 30, 3, 0, 0], [2, 7, 8, 11, 12, 13, 14, 3]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs()).logits


def test_round_trip_with_plain_transformers(tmp_path: Path, config) -> None:
    model = build_model(config, seed=0)
    out = save_checkpoint(
        model, tmp_path / "ckpt", token_dictionary=VOCAB, extra={"preset": "tiny", "step": 3}
    )
    files = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "token_dictionary.json",
        "cellfoundry.json",
    } <= files
    assert not [f for f in files if f.startswith(".tmp")]
    plain = transformers.BertForMaskedLM.from_pretrained(out)
    assert torch.equal(logits(plain), logits(model))
    ours = load_model(out)
    assert ours.config._attn_implementation == "sdpa"
    assert torch.equal(logits(ours), logits(model))
    assert load_token_dictionary_for(out) == VOCAB
    assert load_checkpoint_extra(out) == {"preset": "tiny", "step": 3}
    assert json.loads((out / "config.json").read_text())["hidden_act"] == "relu"
    # saving again over it replaces the files; a wrapper (DDP / DeepSpeed) is unwrapped
    wrapper = torch.nn.Module()
    wrapper.module = build_model(config, seed=1)
    save_checkpoint(wrapper, out)
    assert torch.equal(logits(load_model(out)), logits(wrapper.module))
    assert load_model(out, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_directory_without_dictionary_and_bad_inputs(tmp_path: Path, config) -> None:
    model = build_model(config, seed=0)
    save_checkpoint(model, tmp_path / "a")
    assert load_token_dictionary_for(tmp_path / "a") is None
    assert load_checkpoint_extra(tmp_path / "a") is None
    big = {**VOCAB, **{f"ENSG{i:011d}": i for i in range(40, 50)}}
    with pytest.raises(CheckpointError, match="vocab_size"):
        save_checkpoint(model, tmp_path / "b", token_dictionary=big)
    with pytest.raises(VocabularyError):
        save_checkpoint(
            model, tmp_path / "c", token_dictionary={"<pad>": 0, "<mask>": 1, "TP53": 2}
        )
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_model(tmp_path / "missing")


def test_released_geneformer_pretraining_layout_loads(tmp_path: Path, config) -> None:
    """A Geneformer-like folder saved as BertForPreTraining (pooler and NSP head extra)."""
    reference = transformers.BertForPreTraining(config).eval()
    reference.save_pretrained(tmp_path / "gf")
    keys = set(load_file(tmp_path / "gf" / "model.safetensors"))
    assert "cls.seq_relationship.weight" in keys and "bert.pooler.dense.weight" in keys
    model = load_model(tmp_path / "gf")
    assert isinstance(model, transformers.BertForMaskedLM)
    with torch.no_grad():
        expected = reference(**inputs()).prediction_logits
    assert torch.allclose(logits(model), expected, atol=1e-6)  # encoder and MLM head carried


def test_released_bin_weights_load(tmp_path: Path, config) -> None:
    """Older Geneformer releases ship pytorch_model.bin with a BertForMaskedLM state dict."""
    model = build_model(config, seed=4)
    (tmp_path / "old").mkdir()
    config.to_json_file(tmp_path / "old" / "config.json")
    torch.save(model.state_dict(), tmp_path / "old" / "pytorch_model.bin")
    assert torch.equal(logits(load_model(tmp_path / "old")), logits(model))


class _Exploit:
    """Runs a shell command when unpickled by an unrestricted unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_planted_bin_weights_are_refused_and_never_run(tmp_path: Path, config) -> None:
    """A pytorch_model.bin is a pickle: read with weights_only=True, a payload never runs."""
    marker = tmp_path / "pwned"
    (tmp_path / "evil").mkdir()
    config.to_json_file(tmp_path / "evil" / "config.json")
    state = {**build_model(config, seed=4).state_dict(), "cls.extra": _Exploit(marker)}
    torch.save(state, tmp_path / "evil" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin holds more than tensors"):
        load_model(tmp_path / "evil")
    assert not marker.exists()


def test_our_checkpoints_hold_no_pickles(tmp_path: Path, config) -> None:
    out = save_checkpoint(build_model(config, seed=0), tmp_path / "ckpt", token_dictionary=VOCAB)
    assert sorted(p.suffix for p in out.iterdir()) == [".json", ".json", ".safetensors"]


def test_encoder_only_checkpoint_warns_about_the_head(tmp_path: Path, config) -> None:
    encoder = transformers.BertModel(config, add_pooling_layer=False)
    encoder.save_pretrained(tmp_path / "enc")
    with pytest.warns(UserWarning, match="no MLM head"):
        model = load_model(tmp_path / "enc")
    assert torch.equal(
        model.bert.encoder.layer[0].output.dense.weight,
        encoder.encoder.layer[0].output.dense.weight,
    )
