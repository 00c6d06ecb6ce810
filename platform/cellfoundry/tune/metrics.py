"""Classification metrics (macro F1, accuracy, per-class report, one-vs-rest ROC AUC) and
the confusion-matrix and ROC figures."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    roc_auc_score,
    roc_curve,
)

logger = logging.getLogger(__name__)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of float [n, k] scores."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def ovr_auc(y_true: np.ndarray, scores: np.ndarray) -> tuple[float | None, dict[int, float]]:
    """Macro one-vs-rest ROC AUC over the classes present (with both outcomes) in
    ``y_true``, and each such class's AUC. ``scores`` [n, k]: probabilities or any scores."""
    per_class = {}
    for c in range(scores.shape[1]):
        positive = y_true == c
        if positive.any() and not positive.all():
            per_class[c] = float(roc_auc_score(positive, scores[:, c]))
    return (float(np.mean(list(per_class.values()))) if per_class else None), per_class


def majority_rate(y_train: np.ndarray, y_test: np.ndarray) -> float:
    """Accuracy on ``y_test`` of always predicting the most common training class."""
    values, counts = np.unique(y_train, return_counts=True)
    return float(np.mean(y_test == values[np.argmax(counts)]))


def classification_metrics(
    y_true: np.ndarray, scores: np.ndarray, label_names: list[str]
) -> dict[str, Any]:
    """JSON-able metrics of predictions ``argmax(scores)`` against ``y_true`` (int [n])."""
    y_pred = scores.argmax(axis=1)
    labels = list(range(len(label_names)))
    auc, per_class_auc = ovr_auc(y_true, scores)
    report = classification_report(
        y_true, y_pred, labels=labels, target_names=label_names, output_dict=True, zero_division=0
    )
    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
        "roc_auc_ovr": auc,
        "per_class": {
            name: {
                "precision": float(report[name]["precision"]),
                "recall": float(report[name]["recall"]),
                "f1": float(report[name]["f1-score"]),
                "support": int(report[name]["support"]),
                "roc_auc": per_class_auc.get(i),
            }
            for i, name in enumerate(label_names)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(matrix: list[list[int]], label_names: list[str], path: Path, title: str) -> Path:
    """Row-normalised confusion matrix (true rows, predicted columns) as a PNG."""
    plt = _pyplot()
    m = np.asarray(matrix, dtype=float)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.5 * len(label_names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(label_names))
    ax.set_xticks(ticks, label_names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(ticks, label_names, fontsize=7)
    for i in ticks:
        for j in ticks:
            if m[i, j]:
                ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")  # fmt: skip
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_roc(y_true: np.ndarray, scores: dict[str, np.ndarray], path: Path, title: str) -> Path:
    """Micro-averaged one-vs-rest ROC curve of each method (``scores``: name -> [n, k])."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, s in scores.items():
        onehot = np.eye(s.shape[1], dtype=bool)[y_true]
        fpr, tpr, _ = roc_curve(onehot.ravel(), s.ravel())
        auc, _ = ovr_auc(y_true, s)
        ax.plot(fpr, tpr, label=f"{name} (macro AUC {auc:.3f})" if auc is not None else name)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
