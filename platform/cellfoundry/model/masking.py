"""Masked-gene collator: pad a batch of rank-value token lists and mask 15% of gene tokens.

Of the chosen tokens, 80% become ``<mask>``, 10% a random *gene* token, 10% stay unchanged
(BERT's 80/10/10). Special tokens (``<pad>``, ``<mask>``, ``<cls>``, ``<eos>``) are never
chosen and never drawn as replacements. Every sequence with at least one gene token gets
at least one chosen token, so the loss is always defined.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["IGNORE_INDEX", "MaskingCollator"]

#: Label of a position that is not predicted (``torch.nn.CrossEntropyLoss`` default).
IGNORE_INDEX = -100


class MaskingCollator:
    """Callable turning a list of token-id sequences (lists, arrays, tensors, or dicts with
    ``"input_ids"``) into ``input_ids``, ``attention_mask``, ``labels``: int64 tensors of
    shape (batch, padded length).

    ``max_length`` truncates longer sequences (keeping their start); the padded length is the
    longest sequence rounded up to ``pad_to_multiple_of`` (never above ``max_length``).
    Draws come from ``generator`` (the global torch RNG if None), so a seeded generator makes
    the masks reproducible. Give each rank its own seed; with DataLoader worker processes
    every worker gets a copy of the same generator, so use ``generator=None`` there (torch
    seeds each worker's global RNG differently) or reseed it in ``worker_init_fn``.
    """

    def __init__(
        self,
        *,
        pad_id: int = 0,
        mask_id: int = 1,
        special_ids: Sequence[int] = (0, 1, 2, 3),
        vocab_size: int,
        mlm_probability: float = 0.15,
        max_length: int | None = None,
        generator: torch.Generator | None = None,
        pad_to_multiple_of: int | None = 8,
    ) -> None:
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be positive or None, got {max_length}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(
                f"pad_to_multiple_of must be positive or None, got {pad_to_multiple_of}"
            )
        excluded = sorted({int(i) for i in special_ids} | {pad_id, mask_id})
        if excluded[0] < 0 or excluded[-1] >= vocab_size:
            raise ValueError(f"special ids {excluded} must lie in [0, vocab_size={vocab_size})")
        is_gene = torch.ones(vocab_size, dtype=torch.bool)
        is_gene[excluded] = False
        if not is_gene.any():
            raise ValueError(f"vocab_size {vocab_size} leaves no gene tokens besides {excluded}")
        self.pad_id, self.mask_id, self.vocab_size = pad_id, mask_id, vocab_size
        self.special_ids = tuple(excluded)
        self.mlm_probability = mlm_probability
        self.max_length, self.pad_to_multiple_of = max_length, pad_to_multiple_of
        self.generator = generator
        self._excluded = torch.tensor(excluded, dtype=torch.long)
        self._gene_ids = torch.nonzero(is_gene).flatten()  # (n_genes,)

    @classmethod
    def for_token_dictionary(
        cls, token_dictionary: Mapping[str, int], **kwargs: Any
    ) -> MaskingCollator:
        """A collator for ``token_dictionary``: its ``<pad>``/``<mask>`` ids, every ``<...>``
        token as special (V1 has only pad and mask) and its size as ``vocab_size``."""
        specials = [i for t, i in token_dictionary.items() if t.startswith("<") and t.endswith(">")]
        if "<pad>" not in token_dictionary or "<mask>" not in token_dictionary:
            raise ValueError(
                "token dictionary lacks <pad> or <mask>; build it with build_vocabulary"
            )
        return cls(
            pad_id=token_dictionary["<pad>"],
            mask_id=token_dictionary["<mask>"],
            special_ids=tuple(specials),
            vocab_size=max(token_dictionary.values()) + 1,
            **kwargs,
        )

    def __call__(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        input_ids = self.pad([self._ids_of(e) for e in examples])  # (B, L)
        attention_mask = (input_ids != self.pad_id).long()
        labels = input_ids.clone()
        chosen = self._choose(input_ids, attention_mask.bool())
        labels[~chosen] = IGNORE_INDEX
        u = torch.rand(input_ids.shape, generator=self.generator)
        to_mask = chosen & (u < 0.8)
        to_random = chosen & (u >= 0.8) & (u < 0.9)
        input_ids[to_mask] = self.mask_id
        draws = torch.randint(
            len(self._gene_ids), (int(to_random.sum()),), generator=self.generator
        )
        input_ids[to_random] = self._gene_ids[draws]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def pad(self, sequences: Sequence[np.ndarray]) -> torch.Tensor:
        """Truncate to ``max_length`` and right-pad with ``pad_id``: int64 (B, L)."""
        if not sequences:
            raise ValueError("MaskingCollator got an empty batch")
        if self.max_length is not None:
            sequences = [s[: self.max_length] for s in sequences]
        longest = max(1, max(len(s) for s in sequences))
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = -(-longest // m) * m
            if self.max_length is not None:
                longest = min(longest, self.max_length)
        out = np.full((len(sequences), longest), self.pad_id, dtype=np.int64)
        for row, s in enumerate(sequences):
            out[row, : len(s)] = s
        if out.size and (out.min() < 0 or out.max() >= self.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}), got {out.min()}..{out.max()}; "
                "are the tokens from the vocabulary the model was built for (V1 vs V2)?"
            )
        return torch.from_numpy(out)

    def _choose(self, input_ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Positions to predict: Bernoulli(mlm_probability) over gene tokens, plus one gene
        token in any row that got none. Bool (B, L)."""
        candidate = real & ~torch.isin(input_ids, self._excluded)
        u = torch.rand(input_ids.shape, generator=self.generator)
        chosen = candidate & (u < self.mlm_probability)
        empty = candidate.any(dim=1) & ~chosen.any(dim=1)  # (B,)
        if empty.any():
            # one uniformly random candidate in each such row
            score = torch.rand(input_ids.shape, generator=self.generator).masked_fill(
                ~candidate, -1.0
            )
            rows = torch.nonzero(empty).flatten()
            chosen[rows, score[rows].argmax(dim=1)] = True
        return chosen

    @staticmethod
    def _ids_of(example: Any) -> np.ndarray:
        ids = example["input_ids"] if isinstance(example, Mapping) else example
        if isinstance(ids, torch.Tensor):
            ids = ids.cpu().numpy()
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(
                f"each example must be a 1-D sequence of integer token ids, got shape "
                f"{arr.shape} dtype {arr.dtype}"
            )
        return arr
