"""Length-grouped batches and sequence packing: coverage, ranks, padding waste, equivalence."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from cellfoundry.model import (
    LengthGroupedBatches,
    MaskingCollator,
    bert_config,
    build_model,
    first_fit_decreasing,
    pack_batch,
    padding_fraction,
)


def cell_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Skewed lengths like cells' expressed-gene counts, capped at the V2 input."""
    return np.minimum(np.random.default_rng(seed).lognormal(7.0, 0.6, n).astype(int) + 3, 4096)


def test_one_epoch_covers_every_row_once() -> None:
    lengths = cell_lengths(1003)
    sampler = LengthGroupedBatches(lengths, 16, seed=1, megabatch_mult=8)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 63
    rows = [i for b in batches for i in b]
    assert sorted(rows) == list(range(1003))
    assert Counter(len(b) for b in batches) == {16: 62, 11: 1}
    assert max(lengths[batches[0]]) == lengths.max()  # longest batch first
    dropped = LengthGroupedBatches(lengths, 16, seed=1, drop_last=True)
    assert len(list(dropped)) == len(dropped) == 62
    assert all(len(b) == 16 for b in dropped)


def test_epochs_reshuffle_and_seed_reproduces() -> None:
    lengths = cell_lengths(300)
    a = LengthGroupedBatches(lengths, 8, seed=3)
    first = list(a)
    assert first == list(LengthGroupedBatches(lengths, 8, seed=3))
    a.set_epoch(1)
    assert list(a) != first


def test_ranks_partition_rows_with_equal_batch_counts() -> None:
    lengths = cell_lengths(1001)
    per_rank = [
        list(LengthGroupedBatches(lengths, 8, seed=2, num_replicas=3, rank=r)) for r in range(3)
    ]
    assert len({len(b) for b in per_rank}) == 1
    for step in zip(*per_rank, strict=True):
        assert len({len(b) for b in step}) == 1  # same batch size on every rank at a step
    counts = Counter(i for batches in per_rank for b in batches for i in b)
    assert set(counts) == set(range(1001))
    assert sum(counts.values()) == 1002  # padded with one repeat to a multiple of 3
    with pytest.raises(ValueError, match="rank"):
        LengthGroupedBatches(lengths, 8, num_replicas=2, rank=2)


def test_grouping_cuts_padding_waste() -> None:
    lengths = cell_lengths(4000)
    grouped = LengthGroupedBatches(lengths, 32, seed=0)
    rng = np.random.default_rng(0)
    random_batches = np.array_split(rng.permutation(len(lengths)), len(grouped))
    waste_random = padding_fraction(random_batches, lengths, pad_to_multiple_of=8)
    waste_grouped = padding_fraction(grouped, lengths, pad_to_multiple_of=8)
    assert waste_random > 0.4
    assert waste_grouped < 0.05
    assert padding_fraction([[0, 1]], [3, 5]) == pytest.approx(0.2)
    assert padding_fraction([[0, 1]], [3, 5], pad_to_multiple_of=8) == pytest.approx(1 - 8 / 16)


def test_first_fit_decreasing() -> None:
    bins = first_fit_decreasing([5, 3, 8, 2, 2], 10)
    assert sorted(i for b in bins for i in b) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 8, 2, 2][i] for i in b) <= 10 for b in bins)
    assert len(bins) == 2
    with pytest.raises(ValueError, match="row length"):
        first_fit_decreasing([11], 10)


def test_packed_batch_gives_the_same_logits_and_loss() -> None:
    config = bert_config(
        "tiny",
        vocab_size=64,
        max_position_embeddings=64,
        hidden_size=64,
        num_attention_heads=2,
        intermediate_size=128,
    )
    model = build_model(config, seed=0).eval()
    rng = np.random.default_rng(0)
    cells = [[2, *rng.integers(4, 64, n).tolist(), 3] for n in (40, 5, 12, 20, 3, 30)]
    batch = MaskingCollator(vocab_size=64, generator=torch.Generator().manual_seed(0))(cells)
    packed = pack_batch(batch)
    assert packed["input_ids"].shape[0] < len(cells)
    assert packed["attention_mask"].dtype == torch.bool and packed["attention_mask"].ndim == 4
    real = batch["attention_mask"].bool()
    assert (packed["input_ids"] != 0).sum() == real.sum()
    with torch.no_grad():
        padded_out = model(**batch)
        packed_out = model(**packed)
    assert torch.allclose(padded_out.loss, packed_out.loss, atol=1e-5)
    # the layout: bins in order, each bin's rows concatenated from column 0
    lengths = real.sum(dim=1).tolist()
    for r, rows in enumerate(first_fit_decreasing(lengths, batch["input_ids"].shape[1])):
        at = 0
        for i in rows:
            n = lengths[i]
            assert torch.equal(packed["input_ids"][r, at : at + n], batch["input_ids"][i, :n])
            assert torch.equal(packed["position_ids"][r, at : at + n], torch.arange(n))
            assert torch.allclose(
                packed_out.logits[r, at : at + n], padded_out.logits[i, :n], atol=1e-4
            )
            at += n
