"""Train / validation / test splits that keep every group on one side, k-fold CV, few-shot."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import (
    GroupShuffleSplit,
    StratifiedGroupKFold,
    StratifiedKFold,
    train_test_split,
)

from cellfoundry.config.tune import SplitConfig

logger = logging.getLogger(__name__)


@dataclass
class Split:
    """Row indices (sorted) of one train/validation/test split."""

    name: str
    """``split`` for a given split or a single random split, ``fold<k>`` in k-fold CV."""
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def _stratify(labels: np.ndarray) -> np.ndarray | None:
    """Labels to stratify by, or None where a class has fewer than 2 rows."""
    _, counts = np.unique(labels, return_counts=True)
    return labels if len(counts) > 1 and counts.min() >= 2 else None


def _holdout(
    idx: np.ndarray, labels: np.ndarray, groups: np.ndarray | None, size: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (keep, held out) by group, else stratified by label."""
    if groups is not None:
        g = groups[idx]
        if len(np.unique(g)) < 2:
            raise ValueError(
                f"split.group_by: only one group ({g[0]!r}) here, so no group can be held out; "
                "choose another split.group_by or set it to null"
            )
        keep, held = next(
            GroupShuffleSplit(1, test_size=size, random_state=seed).split(idx, groups=g)
        )
        return np.sort(idx[keep]), np.sort(idx[held])
    keep, held = train_test_split(
        idx, test_size=size, random_state=seed, stratify=_stratify(labels[idx])
    )
    return np.sort(keep), np.sort(held)


def make_splits(
    labels: np.ndarray, cfg: SplitConfig, *, column: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> list[Split]:  # fmt: skip
    """The splits of ``len(labels)`` rows per ``cfg``.

    ``column`` holds the values of ``cfg.column`` (given split), ``groups`` those of
    ``cfg.group_by``. Validation is carved out of each training part the same way (by
    group when there are groups). Raises ValueError when a group would leak.
    """
    n = len(labels)
    idx = np.arange(n)
    if cfg.column is not None:
        if column is None:
            raise ValueError(f"split.column {cfg.column!r} was not read")
        values = np.asarray(column).astype(str)
        train = idx[np.isin(values, cfg.train_values)]
        test = idx[np.isin(values, cfg.test_values)]
        if len(train) == 0 or len(test) == 0:
            raise ValueError(
                f"split.column {cfg.column!r}: {len(train)} train and {len(test)} test cells; "
                f"check split.train_values {cfg.train_values} / test_values {cfg.test_values}"
            )
        outer = [("split", train, test)]
    elif cfg.k_folds > 1:
        if groups is not None:
            folds = StratifiedGroupKFold(cfg.k_folds, shuffle=True, random_state=cfg.seed)
            parts = folds.split(idx, labels, groups)
        else:
            parts = StratifiedKFold(cfg.k_folds, shuffle=True, random_state=cfg.seed).split(
                idx, labels
            )
        outer = [(f"fold{k}", tr, te) for k, (tr, te) in enumerate(parts)]
        if cfg.fold is not None:
            outer = [outer[cfg.fold]]
    else:
        train, test = _holdout(idx, labels, groups, cfg.test_size, cfg.seed)
        outer = [("split", train, test)]
    splits = []
    for name, train, test in outer:
        fit, val = _holdout(np.sort(train), labels, groups, cfg.validation_size, cfg.seed)
        split = Split(name, fit, val, np.sort(test))
        check_no_leak(split, groups)
        splits.append(split)
    return splits


def check_no_leak(split: Split, groups: np.ndarray | None) -> None:
    """Raise if a row or a group is on two sides of ``split``."""
    parts = {"train": split.train, "val": split.val, "test": split.test}
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if np.intersect1d(parts[a], parts[b]).size:
                raise ValueError(f"{split.name}: rows in both {a} and {b}")
            if groups is not None and np.intersect1d(groups[parts[a]], groups[parts[b]]).size:
                raise ValueError(f"{split.name}: a group is in both {a} and {b}")


def few_shot(train: np.ndarray, labels: np.ndarray, n_per_class: int, seed: int) -> np.ndarray:
    """At most ``n_per_class`` training rows of each class (seeded draw), sorted."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels[train]):
        rows = train[labels[train] == c]
        chosen.append(rng.choice(rows, size=min(n_per_class, len(rows)), replace=False))
    return np.sort(np.concatenate(chosen))
