"""Splits keep groups on one side, k-fold covers every row once, few-shot caps classes."""

from __future__ import annotations

import numpy as np
import pytest

from cellfoundry.config.tune import SplitConfig
from cellfoundry.tune.splits import Split, check_no_leak, few_shot, make_splits

RNG = np.random.default_rng(0)
LABELS = RNG.integers(0, 3, 300)
GROUPS = np.array([f"donor{i % 10}" for i in range(300)])


def test_given_split_column_is_kept_and_validation_comes_from_train() -> None:
    column = np.where(np.arange(300) < 240, "train", "test")
    (split,) = make_splits(LABELS, SplitConfig(column="split", validation_size=0.25), column=column)
    assert np.array_equal(split.test, np.arange(240, 300))
    assert len(split.val) == 60 and len(split.train) == 180
    assert set(split.train) | set(split.val) == set(range(240))


def test_group_split_never_leaks_a_group() -> None:
    (split,) = make_splits(LABELS, SplitConfig(group_by="donor", test_size=0.3), groups=GROUPS)
    sides = [set(GROUPS[s]) for s in (split.train, split.val, split.test)]
    assert all(not a & b for i, a in enumerate(sides) for b in sides[i + 1 :])
    assert len(split.train) + len(split.val) + len(split.test) == 300


def test_kfold_tests_every_row_once_by_group() -> None:
    splits = make_splits(LABELS, SplitConfig(group_by="donor", k_folds=5), groups=GROUPS)
    assert [s.name for s in splits] == [f"fold{k}" for k in range(5)]
    tested = np.concatenate([s.test for s in splits])
    assert sorted(tested.tolist()) == list(range(300))
    one = make_splits(LABELS, SplitConfig(k_folds=5, fold=2))
    assert [s.name for s in one] == ["fold2"]


def test_stratified_split_keeps_class_shares() -> None:
    (split,) = make_splits(LABELS, SplitConfig(test_size=0.2))
    share = np.bincount(LABELS[split.test], minlength=3) / len(split.test)
    assert np.allclose(share, np.bincount(LABELS) / 300, atol=0.05)


def test_leaks_and_bad_settings_raise() -> None:
    with pytest.raises(ValueError, match="group"):
        check_no_leak(
            Split("s", np.array([0]), np.array([1]), np.array([2])), np.array(["a", "b", "a"])
        )
    with pytest.raises(ValueError, match="only one group"):
        make_splits(LABELS, SplitConfig(group_by="donor"), groups=np.array(["x"] * 300))
    with pytest.raises(ValueError, match="k_folds"):
        SplitConfig(column="split", k_folds=3)
    with pytest.raises(ValueError, match="test cells"):
        make_splits(LABELS, SplitConfig(column="split"), column=np.array(["train"] * 300))


def test_few_shot_takes_n_per_class() -> None:
    rows = few_shot(np.arange(300), LABELS, 5, seed=1)
    assert np.array_equal(np.bincount(LABELS[rows]), [5, 5, 5])
    assert np.array_equal(rows, few_shot(np.arange(300), LABELS, 5, seed=1))
