"""Files of the batch evaluation: metrics.json, report.md, cell_similarity.png, gene_similarity.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cellfoundry import artifacts, storage
from cellfoundry.config.evaluate import BatchEvalConfig
from cellfoundry.evaluate.plots import plot_similarities
from cellfoundry.evaluate.report import markdown_table, write_json

__all__ = ["METRICS_FILE", "read_metrics", "write_report"]

METRICS_FILE = "metrics.json"


def _category_table(categories: dict[str, Any]) -> str:
    return markdown_table(
        ["pairs", "n pairs", "of", "mean", "median", "std", "q25", "q75"],
        [
            [name.replace("_", " "), s["n_pairs"], s["n_possible"], s["mean"], s["median"],
             s["std"], s["q25"], s["q75"]]
            for name, s in categories.items()
        ],
    )  # fmt: skip


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.4f}"


def _share(s: dict[str, Any] | None) -> str:
    return "n/a" if s is None else f"{s['share']:.4f} (chance {s['chance']:.4f}, n={s['n']})"


def _markdown(metrics: dict[str, Any], cfg: BatchEvalConfig) -> str:
    c = metrics["cells"]
    text = [
        "# Batch robustness of embeddings\n",
        f"Cell embeddings `{cfg.embeddings}` (`.obsm[{cfg.obsm_key!r}]`): {c['n_cells']} cells, "
        f"batches from `{cfg.batch_key}`, cell types from `{cfg.label_key}` "
        f"({c['n_labelled']} cells labelled). Cosine similarity of cell pairs; categories with "
        f"more than {cfg.max_pairs} pairs are sampled uniformly (seed {cfg.seed}).\n",
        markdown_table(["batch", "cells"], list(c["batches"].items())),
        "\n## Cell pairs\n",
        _category_table(c["categories"]),
        f"\n- batch gap (same type: same batch - other batch): {_num(c['batch_gap'])} "
        "(near 0: batch-robust)",
        f"- type gap (same type other batch - different type): {_num(c['type_gap'])} "
        "(> 0: types stay apart across batches)",
        f"- label-free batch gap (same batch - other batch): {_num(c['label_free_batch_gap'])}",
        f"- nearest cell of the same type: {_share(c['label_neighbours'])}",
        f"- nearest cell of the same batch: {_share(c['batch_neighbours'])} (near chance: mixed)",
        "\n![cell pairs](cell_similarity.png)\n",
    ]
    g = metrics["genes"]
    if g is not None:
        sep = g["separability"]
        sep_text = (
            f"{sep['index']:.4f} over {sep['n_eligible']} eligible of {sep['n_rows']} rows "
            f"(chance {sep['chance']:.4f})"
            if sep
            else "n/a (needs gene embeddings from at least two groups)"
        )
        text += [
            "## Gene embeddings\n",
            f"`{cfg.gene_embeddings}`: {g['n_rows']} (gene, group) rows, {g['n_genes']} genes, "
            f"groups {', '.join(g['groups'])}.\n",
            _category_table(g["categories"]),
            f"\n- same gene across groups - different genes across groups: {_num(g['gene_gap'])}",
            f"- separability index (share of gene embeddings whose nearest neighbour is the same "
            f"gene from another group): {sep_text}",
            "\n![gene pairs](gene_similarity.png)\n",
        ]
    return "\n".join(text) + "\n"


def write_report(
    out: Path,
    metrics: dict[str, Any],
    cell_sims: dict[str, np.ndarray],
    gene_sims: dict[str, np.ndarray] | None,
    *,
    cfg: BatchEvalConfig,
) -> None:
    """Write metrics.json, report.md and the PNGs into ``out``."""
    write_json(out / METRICS_FILE, metrics)
    (out / "report.md").write_text(_markdown(metrics, cfg))
    plot_similarities(cell_sims, out / "cell_similarity.png", title="cell embeddings")
    if gene_sims is not None:
        plot_similarities(gene_sims, out / "gene_similarity.png", title="gene embeddings")


def read_metrics(out: str | Path) -> dict[str, Any]:
    """metrics.json of a written evaluation (a folder, or an artifact on object storage)."""
    return json.loads(storage.read_text(storage.join(artifacts.data_uri(out), METRICS_FILE)))
