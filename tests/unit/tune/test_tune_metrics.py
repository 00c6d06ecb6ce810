"""Metrics against hand-computed values; baseline preprocessing on a tiny matrix."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from cellfoundry.tune.baselines import highly_variable, log_normalize
from cellfoundry.tune.metrics import classification_metrics, majority_rate, ovr_auc, plot_confusion


def test_metrics_by_hand(tmp_path) -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    scores = np.eye(3)[[0, 1, 1, 1, 2, 0]] * 0.9 + 0.05  # predictions 0,1,1,1,2,0
    m = classification_metrics(y, scores, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    # F1: a = 2*0.5*0.5/1 = 0.5, b = 2*(2/3)*1/(5/3) = 0.8, c = 2*1*0.5/1.5 = 2/3
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["per_class"]["b"]["support"] == 2 and m["per_class"]["b"]["recall"] == 1.0
    assert (
        plot_confusion(m["confusion_matrix"], ["a", "b", "c"], tmp_path / "c.png", "t")
        .stat()
        .st_size
        > 0
    )


def test_ovr_auc_perfect_and_missing_classes() -> None:
    y = np.array([0, 1, 1, 0])
    s = np.array([[0.9, 0.1, 0], [0.2, 0.8, 0], [0.4, 0.6, 0], [0.7, 0.3, 0]])
    auc, per_class = ovr_auc(y, s)
    assert auc == 1.0 and set(per_class) == {0, 1}  # class 2 absent: left out


def test_majority_rate_uses_training_labels() -> None:
    assert majority_rate(np.array([1, 1, 0]), np.array([1, 0, 0, 0])) == 0.25


def test_log_normalize_and_hvg() -> None:
    x = sp.csr_matrix(np.array([[1, 0, 9, 0], [1, 5, 0, 0], [1, 0, 0, 0]], dtype=np.float32))
    norm = log_normalize(x).toarray()
    assert norm[0, 2] == pytest.approx(np.log1p(9 / 10 * 1e4))
    assert norm[2, 0] == pytest.approx(np.log1p(1e4))
    genes = highly_variable(log_normalize(x), 2)
    assert set(genes) == {1, 2}  # gene 0 is constant-ish, gene 3 never seen
