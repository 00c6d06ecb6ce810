"""A small random BERT with a V2-layout vocabulary (see _infer_reference.py for the helpers)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _infer_reference import MAX_POS, N_GENES

SPECIALS = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}


def gene_name(token: int) -> str:
    return f"ENSG{token:011d}"


@pytest.fixture(scope="session")
def vocab() -> dict[str, int]:
    return {**SPECIALS, **{gene_name(t): t for t in range(4, 4 + N_GENES)}}


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory, vocab: dict[str, int]) -> Path:
    """A 3-layer, 32-wide random BERT (seed 0) saved with its token dictionary."""
    from cellfoundry.model import bert_config, build_model, save_checkpoint

    config = bert_config(
        "tiny", vocab_size=len(vocab), num_hidden_layers=3, hidden_size=32,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=MAX_POS,
    )  # fmt: skip
    model = build_model(config, seed=0)
    return save_checkpoint(
        model, tmp_path_factory.mktemp("small") / "model", token_dictionary=vocab
    )
