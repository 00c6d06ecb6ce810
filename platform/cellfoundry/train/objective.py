"""The masked-gene objective around a ``BertForMaskedLM``, with its FLOP count.

The MLM head runs on the masked positions only (~15% of tokens): the loss equals the
model's own (mean cross-entropy over positions whose label is not -100), without computing
vocabulary-sized logits for every token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import transformers

from cellfoundry.model import IGNORE_INDEX


class MLMOutput(NamedTuple):
    """One micro-batch's loss (mean over masked positions) and counts for metrics."""

    loss: torch.Tensor
    n_correct: torch.Tensor
    """Masked positions whose top prediction is the true gene."""
    n_masked: torch.Tensor


class MaskedLMObjective(torch.nn.Module):
    """Wraps ``model`` so that DeepSpeed sees one module whose forward returns the loss.

    Parameter names are those of ``model`` prefixed with ``model.``.
    """

    def __init__(self, model: transformers.BertForMaskedLM) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> MLMOutput:
        """input_ids, attention_mask, labels: int64 (B, L)."""
        hidden = self.model.bert(input_ids=input_ids, attention_mask=attention_mask)[0]  # (B, L, H)
        chosen = labels != IGNORE_INDEX  # (B, L)
        target = labels[chosen]  # (M,)
        logits = self.model.cls(hidden[chosen])  # (M, V)
        n_masked = chosen.sum()
        loss = F.cross_entropy(logits.float(), target, reduction="sum") / n_masked.clamp(min=1)
        with torch.no_grad():
            n_correct = (logits.argmax(dim=-1) == target).sum()
        return MLMOutput(loss, n_correct, n_masked)


def training_flops(
    config: transformers.BertConfig, n_tokens: float, sum_sq_lengths: float, n_masked: float
) -> float:
    """Model FLOPs of training (forward + backward = 3 x forward) on cells with ``n_tokens``
    real tokens in all (padding excluded), ``sum_sq_lengths`` = sum of squared cell lengths,
    and ``n_masked`` predicted positions.

    Per token and layer: 2 (4 H^2 + 2 H I) for the dense weights and 4 H n for attention over
    the cell's n tokens; per masked token: 2 (H^2 + H V) for the MLM head.
    """
    h, i = config.hidden_size, config.intermediate_size
    n_layers, v = config.num_hidden_layers, config.vocab_size
    dense = 2 * (4 * h * h + 2 * h * i) * n_tokens
    attention = 4 * h * sum_sq_lengths
    head = 2 * (h * h + h * v) * n_masked
    return 3.0 * (n_layers * (dense + attention) + head)
