"""PNG figures of the evaluation reports (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["plot_accuracy", "plot_similarities"]


def _pyplot():  # matplotlib.pyplot
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(model: np.ndarray, baseline: np.ndarray, path: Path, *, title: str) -> Path:
    """Two panels: histograms of per-cell accuracy (model, rank baseline) and of the paired
    per-cell difference (model - baseline)."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    bins = np.linspace(0.0, 1.0, 26)
    ax1.hist(baseline, bins=bins, alpha=0.6, label=f"rank baseline (mean {np.mean(baseline):.3f})")
    ax1.hist(model, bins=bins, alpha=0.6, label=f"model (mean {np.mean(model):.3f})")
    ax1.set(xlabel="share of masked genes predicted correctly", ylabel="cells", title=title)
    ax1.legend()
    diff = np.asarray(model) - np.asarray(baseline)
    ax2.hist(diff, bins=np.linspace(-1.0, 1.0, 41), color="tab:green")
    ax2.axvline(0.0, color="black", linewidth=0.8)
    ax2.set(
        xlabel="model - baseline (per cell)",
        ylabel="cells",
        title=f"paired difference (mean {np.mean(diff):+.3f}, n={diff.size})",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_similarities(
    groups: Mapping[str, np.ndarray], path: Path, *, title: str, ylabel: str = "cosine similarity"
) -> Path:
    """Box plots of cosine similarities per pair category, each labelled with its n."""
    plt = _pyplot()
    names = [k for k, v in groups.items() if len(v)]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.8 * len(names) + 1.0), 4.5))
    if names:
        ax.boxplot([groups[k] for k in names], showfliers=False)
        ax.set_xticks(range(1, len(names) + 1))
        ax.set_xticklabels(
            [f"{k.replace('_', ' ')}\nn={len(groups[k])}" for k in names], fontsize=8
        )
        for i, k in enumerate(names, start=1):
            ax.plot(i, float(np.mean(groups[k])), marker="D", color="tab:red", markersize=5)
    else:
        ax.text(0.5, 0.5, "no pairs", ha="center", va="center", transform=ax.transAxes)
    ax.set(ylabel=ylabel, title=title)
    ax.axhline(0.0, color="grey", linewidth=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
