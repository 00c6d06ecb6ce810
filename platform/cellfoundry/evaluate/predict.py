"""The model's guesses at masked positions: length-sorted batches, eval mode, gene tokens only.

Only the hidden states of masked positions go through the MLM head, so memory stays
(masked positions x vocabulary) rather than (batch x length x vocabulary).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import transformers

__all__ = ["MaskedPredictor", "resolve_device"]

logger = logging.getLogger(__name__)


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype | None]:
    """(device, autocast dtype or None) for the config's ``device`` and ``dtype`` strings."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device: cuda was asked for but torch sees no GPU; use device: auto or cpu"
        )
    if device == "cpu":
        if dtype == "bf16":
            warnings.warn(
                "dtype bf16 on a CPU: evaluating in fp32 instead", UserWarning, stacklevel=2
            )
        return torch.device("cpu"), None
    bf16_ok = torch.cuda.is_bf16_supported()
    if dtype == "bf16" and not bf16_ok:
        warnings.warn("this GPU has no bf16: evaluating in fp32", UserWarning, stacklevel=2)
    use_bf16 = dtype in ("auto", "bf16") and bf16_ok
    return torch.device(device), torch.bfloat16 if use_bf16 else None


class MaskedPredictor:
    """Wraps a ``BertForMaskedLM`` (put in eval mode and on ``device``) to predict the genes
    at masked positions, choosing among gene tokens only (``special`` is excluded)."""

    def __init__(
        self,
        model: transformers.BertForMaskedLM,
        special: np.ndarray,
        *,
        pad_id: int,
        mask_id: int,
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        self.device, self.autocast_dtype = device, autocast_dtype
        self.pad_id, self.mask_id = pad_id, mask_id
        vocab = model.config.vocab_size
        if special.size != vocab:
            raise ValueError(f"special mask has {special.size} entries, the model {vocab} tokens")
        self._excluded = torch.from_numpy(np.flatnonzero(special)).to(device)

    @torch.no_grad()
    def predict(self, rows: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> list[np.ndarray]:
        """For each cell (token ids ``rows[i]``, masked positions ``masks[i]``), the predicted
        token id at each masked position: a list of int64 arrays shaped like ``masks``.

        The model sees the row with every masked position set to ``<mask>``; one forward
        pass for the whole list (callers cut batches).
        """
        if not rows:
            return []
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)  # (B, L)
        attn = np.zeros((len(rows), width), dtype=np.int64)
        which = np.zeros((len(rows), width), dtype=bool)
        for i, (row, pos) in enumerate(zip(rows, masks, strict=True)):
            ids[i, : len(row)] = row
            attn[i, : len(row)] = 1
            ids[i, pos] = self.mask_id
            which[i, pos] = True
        input_ids = torch.from_numpy(ids).to(self.device)
        attention = torch.from_numpy(attn).to(self.device)
        selected = torch.from_numpy(which).to(self.device)
        with torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):  # fmt: skip
            hidden = self.model.bert(input_ids=input_ids, attention_mask=attention)[0]  # (B, L, H)
            logits = self.model.cls(hidden[selected]).float()  # (n_masked, V)
        logits[:, self._excluded] = float("-inf")
        guesses = logits.argmax(dim=-1).cpu().numpy()
        sizes = [len(m) for m in masks]
        return np.split(guesses.astype(np.int64), np.cumsum(sizes)[:-1])
