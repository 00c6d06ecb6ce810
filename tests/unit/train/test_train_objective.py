"""The sparse-head MLM objective equals the model's own loss; FLOP count matches 6N."""

from __future__ import annotations

import pytest
import torch

from cellfoundry.model import MaskingCollator, bert_config, build_model
from cellfoundry.train.objective import MaskedLMObjective, training_flops


def test_loss_and_accuracy_match_bert_for_masked_lm() -> None:
    config = bert_config("tiny", num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                         intermediate_size=64, vocab_size=50, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)  # fmt: skip
    model = build_model(config, seed=0).eval()
    collator = MaskingCollator(
        vocab_size=50, generator=torch.Generator().manual_seed(0), mlm_probability=0.3
    )
    g = torch.Generator().manual_seed(1)
    batch = collator(
        [[2, *torch.randint(4, 50, (n,), generator=g).tolist(), 3] for n in (5, 17, 30, 9)]
    )
    with torch.no_grad():
        out = MaskedLMObjective(model)(**batch)
        ref = model(**batch)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    chosen = batch["labels"] != -100
    correct = (ref.logits.argmax(-1)[chosen] == batch["labels"][chosen]).sum()
    assert int(out.n_masked) == int(chosen.sum()) and int(out.n_correct) == int(correct)


def test_gradients_flow_to_tied_embeddings() -> None:
    config = bert_config("tiny", num_hidden_layers=1, hidden_size=32, num_attention_heads=1,
                         intermediate_size=32, vocab_size=40)  # fmt: skip
    objective = MaskedLMObjective(build_model(config, seed=0))
    batch = MaskingCollator(vocab_size=40, generator=torch.Generator().manual_seed(0))(
        [[2, *range(4, 30), 3]]
    )
    objective(**batch).loss.backward()
    assert objective.model.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_flops_are_six_per_weight_per_token() -> None:
    config = bert_config("gf-104m")
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    weights = n * (4 * h * h + 2 * h * i)
    # dense part only (no attention, no masked tokens): 6 FLOPs per weight per token
    assert training_flops(config, 1000, 0, 0) == pytest.approx(6 * weights * 1000)
    with_attention = training_flops(config, 2 * 512, 2 * 512**2, 0)
    assert with_attention == pytest.approx(6 * weights * 1024 + 12 * n * h * 2 * 512**2)
