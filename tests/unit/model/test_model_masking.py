"""Masking collator: 15% of gene tokens, 80/10/10, never specials, padding, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellfoundry.model import IGNORE_INDEX, MaskingCollator

VOCAB = 500
SPECIAL = (0, 1, 2, 3)  # <pad>, <mask>, <cls>, <eos>


def v2_cells(n: int, rng: np.random.Generator, lo: int = 5, hi: int = 300) -> list[list[int]]:
    """V2-like token lists: <cls>, distinct gene tokens, <eos>."""
    cells = []
    for _ in range(n):
        genes = rng.choice(np.arange(4, VOCAB), size=int(rng.integers(lo, hi)), replace=False)
        cells.append([2, *genes.tolist(), 3])
    return cells


def collator(seed: int = 0, **kw) -> MaskingCollator:
    return MaskingCollator(vocab_size=VOCAB, generator=torch.Generator().manual_seed(seed), **kw)


def test_padding_shapes_and_attention_mask() -> None:
    out = collator()(
        [
            [2, 10, 11, 3],
            [2, 12, 3],
            {"input_ids": np.array([2, 13, 14, 15, 16, 17, 18, 19, 20, 3])},
        ]
    )
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.int64 for t in out.values())
    assert out["input_ids"].shape == (3, 16)  # longest 10, rounded up to a multiple of 8
    assert out["attention_mask"].sum(dim=1).tolist() == [4, 3, 10]
    pad = out["attention_mask"] == 0
    assert (out["input_ids"][pad] == 0).all() and (out["labels"][pad] == IGNORE_INDEX).all()
    no_multiple = MaskingCollator(vocab_size=VOCAB, pad_to_multiple_of=None)([[2, 5, 3], [2, 3]])
    assert no_multiple["input_ids"].shape == (2, 3)


def test_truncation_to_max_length() -> None:
    out = collator(max_length=6)([list(range(2, 40)), [2, 5, 3]])
    assert out["input_ids"].shape == (2, 6)  # never rounded above max_length
    assert out["attention_mask"][0].all()
    labels = out["labels"][0]
    kept = labels != IGNORE_INDEX
    assert (labels[kept] == torch.arange(2, 8)[kept]).all()


def test_masking_statistics_and_specials() -> None:
    rng = np.random.default_rng(0)
    cells = v2_cells(400, rng)
    c = collator(1)
    original = c.pad(cells)
    out = c(cells)
    chosen = out["labels"] != IGNORE_INDEX
    is_special = torch.isin(original, torch.tensor(SPECIAL))
    genes = (~is_special).sum().item()
    assert genes > 50_000
    # never a special token, labels hold the original ids
    assert not (chosen & is_special).any()
    assert torch.equal(out["labels"][chosen], original[chosen])
    assert abs(chosen.sum().item() / genes - 0.15) < 0.01
    # 80 / 10 / 10 among chosen tokens
    n = chosen.sum().item()
    masked = (out["input_ids"] == 1) & chosen
    same = (out["input_ids"] == original) & chosen
    changed = chosen & ~masked & ~same
    assert abs(masked.sum().item() / n - 0.8) < 0.02
    assert abs(changed.sum().item() / n - 0.1) < 0.015
    # the "unchanged" share includes random draws equal to the original (1/496 of 10%)
    assert abs(same.sum().item() / n - 0.1) < 0.015
    # random replacements are gene tokens only; unchosen positions untouched
    assert (out["input_ids"][changed] >= 4).all()
    assert torch.equal(out["input_ids"][~chosen], original[~chosen])


def test_every_nonempty_sequence_gets_a_masked_token() -> None:
    cells = [[2, 7, 3]] * 200 + [[2, 3], []]  # one gene each; the last two have none
    out = collator(3)(cells)
    per_row = (out["labels"] != IGNORE_INDEX).sum(dim=1)
    assert (per_row[:200] >= 1).all()
    assert (out["labels"][:200, 1] == 7).all()  # the only candidate is the gene
    assert per_row[200:].tolist() == [0, 0]


def test_deterministic_with_a_generator() -> None:
    cells = v2_cells(20, np.random.default_rng(5))
    a, b, c = collator(11)(cells), collator(11)(cells), collator(12)(cells)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["labels"], c["labels"])


def test_v1_dictionary_layout_and_bad_ids() -> None:
    d = {"<pad>": 0, "<mask>": 1, **{f"ENSG{i:011d}": i for i in range(2, 50)}}
    c = MaskingCollator.for_token_dictionary(d, generator=torch.Generator().manual_seed(0))
    assert c.special_ids == (0, 1) and c.vocab_size == 50
    out = c([list(range(2, 50))] * 50)
    chosen = out["labels"] != IGNORE_INDEX
    assert chosen[:, :2].any()  # ids 2 and 3 are genes in V1, so they get masked too
    assert (out["input_ids"][chosen & (out["input_ids"] != 1)] >= 2).all()
    with pytest.raises(ValueError, match="V1 vs V2"):
        c([[2, 60]])
    with pytest.raises(ValueError, match="empty batch"):
        c([])
    with pytest.raises(ValueError, match="mlm_probability"):
        MaskingCollator(vocab_size=10, mlm_probability=1.5)
