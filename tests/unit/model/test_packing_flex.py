"""The padding-free path: FlexAttention over packed rows with a document mask equals the
padded path (logits, loss, hidden states, cell embeddings), and no cell sees another."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellfoundry.model import MaskingCollator, bert_config, build_model
from cellfoundry.model.packing import FLEX_BLOCK, pack, use_flex_attention

pytest.importorskip("torch.nn.attention.flex_attention")

LENGTHS = (120, 7, 60, 33, 90, 2, 45)  # gene tokens per cell (+ <cls>, <eos>)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    config = bert_config(
        "tiny", vocab_size=64, max_position_embeddings=128, hidden_size=64,
        num_attention_heads=2, intermediate_size=128, num_hidden_layers=2,
    )  # fmt: skip
    return build_model(config, seed=0).eval()


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    cells = [[2, *rng.integers(4, 64, n).tolist(), 3] for n in LENGTHS]
    return MaskingCollator(vocab_size=64, generator=torch.Generator().manual_seed(seed))(cells)


def test_flex_packed_path_equals_the_padded_path(model: torch.nn.Module) -> None:
    padded = batch()
    with torch.no_grad():
        ref = model(**padded, output_hidden_states=True)
    packed, packing = pack(padded, row_length=256, attention="flex")
    rows, width = packed["input_ids"].shape
    assert width % FLEX_BLOCK == 0 and rows < len(LENGTHS)
    assert int((packing.segment >= 0).sum()) == int(padded["attention_mask"].sum())
    with use_flex_attention(model), torch.no_grad():
        out = model(**packed, output_hidden_states=True)
    assert model.config._attn_implementation != "flex_attention"  # put back afterwards
    real = padded["attention_mask"].bool()
    # logits and every layer's hidden states, token by token; the loss over the same labels
    assert torch.allclose(packing.unpack(out.logits)[real], ref.logits[real], atol=1e-4)
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert torch.allclose(packing.unpack(a)[real], b[real], atol=1e-4)
    assert torch.allclose(out.loss, ref.loss, atol=1e-5)
    # cell embeddings: mean over gene tokens (specials excluded) of the second-to-last layer
    genes = real.clone()
    genes[:, 0] = False
    genes[torch.arange(len(LENGTHS)), real.sum(1) - 1] = False

    def pool(h: torch.Tensor) -> torch.Tensor:
        return (h * genes[..., None]).sum(1) / genes.sum(1, keepdim=True)

    emb = pool(packing.unpack(out.hidden_states[-2]))
    assert torch.allclose(emb, pool(ref.hidden_states[-2]), atol=1e-5)


def test_no_cell_attends_to_another(model: torch.nn.Module) -> None:
    first = batch()
    packed, packing = pack(first, row_length=256, attention="flex")
    # change every token of one cell; every other cell sharing its row must not move
    victim = int(np.argmax(LENGTHS))
    changed = {k: v.clone() for k, v in first.items()}
    n = int(first["attention_mask"][victim].sum())
    changed["input_ids"][victim, 1 : n - 1] = (first["input_ids"][victim, 1 : n - 1] + 1) % 60 + 4
    packed2, packing2 = pack(changed, row_length=256, attention="flex")
    assert torch.equal(packing.segment, packing2.segment)  # the same layout
    row = int((packing.segment == victim).any(1).nonzero()[0, 0])
    neighbours = set(packing.segment[row].tolist()) - {victim, -1}
    assert neighbours, "the test needs another cell in the victim's row"
    with use_flex_attention(model), torch.no_grad():
        a = packing.unpack(model(**packed).logits)
        b = packing2.unpack(model(**packed2).logits)
    for other in neighbours:
        assert torch.equal(a[other], b[other])
    assert not torch.allclose(a[victim], b[victim])


def test_dense_and_flex_packings_share_the_layout() -> None:
    padded = batch(1)
    dense, dp = pack(padded, attention="dense")
    flex, fp = pack(padded, row_length=dense["input_ids"].shape[1], attention="flex")
    w = dense["input_ids"].shape[1]
    assert torch.equal(dp.segment, fp.segment[:, :w]) and (fp.segment[:, w:] == -1).all()
    assert torch.equal(dense["labels"], flex["labels"][:, :w])
    with pytest.raises(ValueError, match="right-padded"):
        pack({"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"].flip(1)})
