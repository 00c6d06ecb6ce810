"""Files of the masked-gene evaluation: per_cell.parquet, metrics.json, report.md, accuracy.png."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from cellfoundry import artifacts, storage
from cellfoundry.config.evaluate import MaskedEvalConfig
from cellfoundry.config.loader import config_to_dict
from cellfoundry.evaluate.plots import plot_accuracy
from cellfoundry.evaluate.report import markdown_table, paired_difference, summarize, write_json

__all__ = ["METRICS_FILE", "masked_metrics", "read_metrics", "write_report"]

METRICS_FILE = "metrics.json"


def masked_metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-cell accuracies of the model and the baseline, summarised.

    ``records`` hold per cell ``n_masked``, ``model_correct``, ``baseline_correct`` and
    ``group``. Returns ``model`` and ``baseline`` (summaries of per-cell accuracy: n, mean,
    median, ...), ``difference`` (paired per cell: model - baseline, wins / losses / ties,
    Wilcoxon p), ``pooled`` (all masked genes together) and ``by_group``.
    """
    if not records:
        raise ValueError("no held-out cell with gene tokens was evaluated")
    n = np.array([r["n_masked"] for r in records], dtype=np.float64)
    model = np.array([r["model_correct"] for r in records]) / n
    base = np.array([r["baseline_correct"] for r in records]) / n
    by_group: dict[str, Any] = {}
    groups = np.array([str(r.get("group")) for r in records], dtype=object)
    if any(r.get("group") is not None for r in records):
        for g in sorted(set(groups)):
            sel = groups == g
            by_group[g] = {
                "n": int(sel.sum()), "model_mean": float(model[sel].mean()),
                "baseline_mean": float(base[sel].mean()),
                "difference_mean": float((model[sel] - base[sel]).mean()),
            }  # fmt: skip
    return {
        "model": summarize(model),
        "baseline": summarize(base),
        "difference": paired_difference(model, base),
        "pooled": {
            "n_masked_genes": int(n.sum()),
            "model": float(sum(r["model_correct"] for r in records) / n.sum()),
            "baseline": float(sum(r["baseline_correct"] for r in records) / n.sum()),
        },
        "by_group": by_group,
    }


def _p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.3g}"


def _markdown(metrics: dict[str, Any], cfg: MaskedEvalConfig) -> str:
    m, b, d = metrics["model"], metrics["baseline"], metrics["difference"]
    ctx = metrics["context"]
    text = [
        "# Masked-gene prediction vs the rank baseline\n",
        f"Model `{cfg.model}` on held-out cells of `{cfg.tokenized}` "
        f"({ctx['held_out_cells']} held out, {m['n']} evaluated; rank baseline fit on "
        f"{ctx['training_cells']} training cells). {cfg.mask_fraction:.0%} of each cell's gene "
        f"tokens (at most {ctx['max_length']} tokens per cell) became `<mask>`; seed {cfg.seed}. "
        "This measures generalisation only if the held-out cells were left out of pretraining.\n",
        "## Per-cell accuracy (share of masked genes predicted correctly)\n",
        markdown_table(
            ["", "n cells", "mean", "median", "std", "q25", "q75"],
            [
                [name, s["n"], s["mean"], s["median"], s["std"], s["q25"], s["q75"]]
                for name, s in (
                    ("model", m),
                    ("rank baseline", b),
                    ("model - baseline (paired)", d),
                )
            ],
        ),
        f"\nDifference of means: {d['difference_of_means']:+.4f}. The model beats the baseline "
        f"on {d['wins']} cells, loses on {d['losses']}, ties on {d['ties']} "
        f"(Wilcoxon signed-rank p = {_p(d['wilcoxon_p'])}).\n",
        f"\nPooled over all {metrics['pooled']['n_masked_genes']} masked genes: model "
        f"{metrics['pooled']['model']:.4f}, baseline {metrics['pooled']['baseline']:.4f}.\n",
    ]
    if metrics["by_group"]:
        text += [
            f"\n## By {cfg.group_by}\n",
            markdown_table(
                [cfg.group_by or "group", "n cells", "model", "baseline", "difference"],
                [
                    [g, s["n"], s["model_mean"], s["baseline_mean"], s["difference_mean"]]
                    for g, s in metrics["by_group"].items()
                ],
            ),
        ]
    text.append("\n![per-cell accuracy](accuracy.png)\n")
    return "\n".join(text)


def write_report(
    out: Path, records: Sequence[dict[str, Any]], *, cfg: MaskedEvalConfig, context: dict[str, Any]
) -> dict[str, Any]:
    """Write per_cell.parquet, metrics.json, report.md and accuracy.png into ``out``;
    return the metrics."""
    metrics = masked_metrics(records)
    metrics["context"] = context
    metrics["config"] = config_to_dict(cfg)
    frame = pl.DataFrame(list(records)).with_columns(
        (pl.col("model_correct") / pl.col("n_masked")).alias("model_accuracy"),
        (pl.col("baseline_correct") / pl.col("n_masked")).alias("baseline_accuracy"),
    )
    frame.write_parquet(out / "per_cell.parquet")
    write_json(out / METRICS_FILE, metrics)
    (out / "report.md").write_text(_markdown(metrics, cfg))
    plot_accuracy(
        frame["model_accuracy"].to_numpy(), frame["baseline_accuracy"].to_numpy(),
        out / "accuracy.png", title=f"masked genes, {len(records)} held-out cells",
    )  # fmt: skip
    return metrics


def read_metrics(out: str | Path) -> dict[str, Any]:
    """metrics.json of a written evaluation (a folder, or an artifact on object storage)."""
    return json.loads(storage.read_text(storage.join(artifacts.data_uri(out), METRICS_FILE)))
