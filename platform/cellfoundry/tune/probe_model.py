"""The frozen-encoder linear probe as one module: the pretrained BERT encoder (frozen) ->
mean of the gene tokens' last hidden states -> standardisation -> a linear layer fitted by
logistic regression. It answers like a Hugging Face classifier (``.logits``), so the same
evaluation, saving and serving code handles it; only the small head is saved, with a
pointer to the base model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.modeling_outputs import SequenceClassifierOutput

PROBE_DIR = "probe"
PROBE_FILE = "probe.safetensors"


class ProbeClassifier(torch.nn.Module):
    """Frozen ``BertModel`` + mean pooling over gene tokens + standardised linear head."""

    def __init__(
        self, encoder: transformers.BertModel, special_ids: list[int], n_classes: int
    ) -> None:
        super().__init__()
        hidden = encoder.config.hidden_size
        self.encoder = encoder.requires_grad_(False)
        self.register_buffer(
            "special_ids", torch.tensor(sorted(set(special_ids)), dtype=torch.long)
        )
        self.register_buffer("mean", torch.zeros(hidden))
        self.register_buffer("scale", torch.ones(hidden))
        self.head = torch.nn.Linear(hidden, n_classes)
        self.head.requires_grad_(False)

    def embed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """float [b, hidden]: mean of the last hidden states over non-special tokens."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        keep = (
            (~torch.isin(input_ids, self.special_ids)).unsqueeze(-1).to(hidden.dtype)
        )  # [b, L, 1]
        return (hidden * keep).sum(1) / keep.sum(1).clamp(min=1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object
    ) -> SequenceClassifierOutput:
        z = (self.embed(input_ids, attention_mask) - self.mean) / self.scale
        return SequenceClassifierOutput(logits=self.head(z))

    def set_head(self, mean: np.ndarray, scale: np.ndarray, classes: np.ndarray,
                 coef: np.ndarray, intercept: np.ndarray) -> None:  # fmt: skip
        """Load a fitted ``StandardScaler`` and ``LogisticRegression`` (classes it never saw
        get logit -1e4; a binary fit becomes logits [0, w.x + b])."""
        k, hidden = self.head.out_features, self.head.in_features
        weight, bias = np.zeros((k, hidden)), np.full(k, -1e4)
        if coef.shape[0] == 1 and len(classes) == 2:
            coef, intercept = np.vstack([np.zeros(hidden), coef[0]]), np.array([0.0, intercept[0]])
        weight[classes], bias[classes] = coef, intercept
        with torch.no_grad():
            self.mean.copy_(torch.as_tensor(mean))
            self.scale.copy_(torch.as_tensor(np.where(scale > 0, scale, 1.0)))
            self.head.weight.copy_(torch.as_tensor(weight))
            self.head.bias.copy_(torch.as_tensor(bias))

    def save(self, directory: Path) -> Path:
        """``probe.safetensors`` (head, standardisation, special ids) in ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            k: v.detach().cpu().contiguous()
            for k, v in self.state_dict().items()
            if not k.startswith("encoder.")
        }
        save_file(state, str(directory / PROBE_FILE))
        return directory

    @classmethod
    def load(cls, directory: Path, base_model: str | Path) -> ProbeClassifier:
        """The probe saved in ``directory`` on the encoder of ``base_model``."""
        from cellfoundry.model import load_model

        state = load_file(str(Path(directory) / PROBE_FILE))
        probe = cls(
            load_model(base_model).bert,
            state["special_ids"].tolist(),
            state["head.weight"].shape[0],
        )
        probe.load_state_dict(state, strict=False)
        return probe.eval()
