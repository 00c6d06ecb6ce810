"""Batch-robustness metrics of cell and gene embeddings (arrays in, JSON-able dicts out).

Cells, with a batch and (optionally) a cell type each, give five pair categories:

- ``different_type``: cells of different types (any batches);
- ``same_type_same_batch``: cells of one type from one batch;
- ``same_type_other_batch``: cells of one type from two different batches;
- ``same_batch`` / ``other_batch``: any two cells (labelled or not) from one batch / two.

A batch-robust embedding has ``same_type_other_batch`` close to ``same_type_same_batch``
(``batch_gap`` near 0) and well above ``different_type`` (``type_gap`` > 0).

Gene embeddings, one per (gene, group), give ``different_gene_same_group``,
``different_gene_other_group`` and ``same_gene_other_group``, and the separability index
(:func:`separability_index`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cellfoundry.evaluate.pairs import cosine_of_pairs, nearest_neighbours, sample_pairs, unit_rows
from cellfoundry.evaluate.report import summarize

__all__ = ["cell_metrics", "gene_metrics", "neighbour_share", "separability_index"]

CELL_CATEGORIES = (
    "different_type", "same_type_same_batch", "same_type_other_batch", "same_batch", "other_batch",
)  # fmt: skip
GENE_CATEGORIES = (
    "different_gene_same_group",
    "different_gene_other_group",
    "same_gene_other_group",
)


def _codes(values: Sequence[Any]) -> tuple[np.ndarray, list[str]]:
    """int64 codes (-1 for None) and the sorted distinct values."""
    names = sorted({str(v) for v in values if v is not None})
    index = {n: k for k, n in enumerate(names)}
    return np.array([-1 if v is None else index[str(v)] for v in values], dtype=np.int64), names


def _members(keys: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Rows of each distinct key (keys >= 0 only), and those keys."""
    rows = np.flatnonzero(keys >= 0)
    if rows.size == 0:
        return [], np.empty(0, dtype=np.int64)
    rows = rows[np.argsort(keys[rows], kind="stable")]  # grouped by key, ascending rows inside
    uniq, starts = np.unique(keys[rows], return_index=True)
    return np.split(rows, starts[1:]), uniq


def _category(unit, members, blocks, max_pairs, rng, exclude=None) -> tuple[dict, np.ndarray]:
    i, j, n_possible, sampled = sample_pairs(members, blocks, max_pairs, rng, exclude=exclude)
    sims = cosine_of_pairs(unit, i, j)
    stats = summarize(sims)
    stats["n_pairs"] = stats.pop("n")
    stats["n_possible"] = n_possible
    stats["sampled"] = sampled
    return stats, sims


def neighbour_share(neighbours: np.ndarray, codes: np.ndarray) -> dict[str, Any]:
    """Share of rows whose nearest neighbour has the same code, and its chance level
    (the same share for a neighbour drawn uniformly from the other rows)."""
    n = len(codes)
    counts = np.bincount(codes)[codes]  # rows sharing each row's code, itself included
    return {
        "n": int(n),
        "share": float((codes[neighbours] == codes).mean()),
        "chance": float(((counts - 1) / (n - 1)).mean()),
    }


def _mean(stats: dict[str, Any]) -> float | None:
    return stats["mean"]


def _gap(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def cell_metrics(
    embeddings: np.ndarray,
    batches: Sequence[Any],
    labels: Sequence[Any],
    *,
    max_pairs: int = 20000,
    max_nn: int = 20000,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Cosine similarity per pair category (n_pairs, n_possible, mean, median, ...), the
    gaps between them, and nearest-neighbour shares (``label_neighbours``: share of labelled
    cells whose nearest labelled cell has their type; ``batch_neighbours``: share of cells
    whose nearest cell is from their batch; each with its chance level). Cells whose label
    is None only enter ``same_batch`` / ``other_batch``. Also returns the sampled
    similarities per category (for plots)."""
    rng = np.random.default_rng(seed)
    unit = unit_rows(embeddings)  # (n, d)
    b_codes, b_names = _codes(batches)
    l_codes, l_names = _codes(labels)
    if (b_codes < 0).any():
        raise ValueError(f"{int((b_codes < 0).sum())} cells have no batch; fill the batch column")
    labelled = l_codes >= 0
    pair_key = np.where(labelled, l_codes * len(b_names) + b_codes, -1)
    members, keys = _members(pair_key)
    lab = keys // len(b_names)  # type of each (type, batch) group
    g = range(len(keys))
    blocks = {
        "different_type": [(x, y) for x in g for y in g if x < y and lab[x] != lab[y]],
        "same_type_same_batch": [(x, x) for x in g],
        "same_type_other_batch": [(x, y) for x in g for y in g if x < y and lab[x] == lab[y]],
    }
    stats, sims = {}, {}
    for name, bl in blocks.items():
        stats[name], sims[name] = _category(unit, members, bl, max_pairs, rng)
    b_members, _ = _members(b_codes)
    b = range(len(b_members))
    for name, bl in (("same_batch", [(x, x) for x in b]),
                     ("other_batch", [(x, y) for x in b for y in b if x < y])):  # fmt: skip
        stats[name], sims[name] = _category(unit, b_members, bl, max_pairs, rng)

    sub = np.sort(rng.permutation(len(unit))[:max_nn])
    out: dict[str, Any] = {
        "n_cells": len(unit), "n_labelled": int(labelled.sum()),
        "batches": {n: int((b_codes == k).sum()) for k, n in enumerate(b_names)},
        "labels": {n: int((l_codes == k).sum()) for k, n in enumerate(l_names)},
        "categories": stats,
        "batch_gap": _gap(_mean(stats["same_type_same_batch"]), _mean(stats["same_type_other_batch"])),
        "type_gap": _gap(_mean(stats["same_type_other_batch"]), _mean(stats["different_type"])),
        "label_free_batch_gap": _gap(_mean(stats["same_batch"]), _mean(stats["other_batch"])),
        "batch_neighbours": None, "label_neighbours": None,
    }  # fmt: skip
    if sub.size >= 2:
        out["batch_neighbours"] = neighbour_share(nearest_neighbours(unit[sub]), b_codes[sub])
    lab_sub = sub[labelled[sub]]
    if lab_sub.size >= 2:
        out["label_neighbours"] = neighbour_share(
            nearest_neighbours(unit[lab_sub]), l_codes[lab_sub]
        )
    return out, sims


def separability_index(unit: np.ndarray, genes: np.ndarray) -> dict[str, Any] | None:
    """Geometric separability index of gene embeddings.

    Among all (gene, group) embeddings, take those whose gene has an embedding in at least
    one other group (the *eligible* rows); the index is the share of eligible rows whose
    nearest neighbour (highest cosine similarity over all other rows, any gene and group)
    is an embedding of the same gene. 1 means each gene's embeddings from different groups
    (e.g. batches) are closer to one another than to any other gene's. ``chance`` is the
    expected share for a neighbour drawn uniformly from the other rows. None when no gene
    has embeddings from two groups (e.g. a single "all" group).
    """
    codes = np.unique(genes, return_inverse=True)[1].astype(np.int64)
    counts = np.bincount(codes)[codes]
    eligible = counts >= 2
    if not eligible.any():
        return None
    nn = nearest_neighbours(unit)
    same = codes[nn] == codes
    return {
        "index": float(same[eligible].mean()),
        "n_eligible": int(eligible.sum()),
        "n_rows": len(codes),
        "chance": float(((counts[eligible] - 1) / (len(codes) - 1)).mean()),
    }


def gene_metrics(
    embeddings: np.ndarray,
    genes: Sequence[str],
    groups: Sequence[str],
    *,
    max_pairs: int = 20000,
    max_nn: int = 20000,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Cosine similarity per gene pair category and the separability index (computed on
    at most ``max_nn`` rows: whole genes drawn with ``seed``). One row per (gene, group)."""
    rng = np.random.default_rng(seed)
    genes, groups = np.asarray(genes, dtype=object), np.asarray(groups, dtype=object)
    g_codes, g_names = _codes(list(genes))
    p_codes, p_names = _codes(list(groups))
    if len(np.unique(g_codes * len(p_names) + p_codes)) != len(g_codes):
        raise ValueError("gene embeddings must have one row per (gene, group); found duplicates")
    unit = unit_rows(embeddings)
    grp_members, _ = _members(p_codes)
    gene_members, _ = _members(g_codes)
    multi = [m for m in gene_members if len(m) >= 2]
    k = range(len(grp_members))
    stats, sims = {}, {}
    for name, members, blocks, exclude in (
        ("different_gene_same_group", grp_members, [(x, x) for x in k], None),
        ("different_gene_other_group", grp_members, [(x, y) for x in k for y in k if x < y],
         lambda i, j: g_codes[i] == g_codes[j]),
        ("same_gene_other_group", multi, [(x, x) for x in range(len(multi))], None),
    ):  # fmt: skip
        stats[name], sims[name] = _category(unit, members, blocks, max_pairs, rng, exclude)
    # exact: every cross-group pair minus those of one gene (one row per gene and group)
    cross = stats["different_gene_other_group"]
    cross["n_possible"] = (len(unit) ** 2 - sum(len(m) ** 2 for m in grp_members)) // 2 - stats[
        "same_gene_other_group"
    ]["n_possible"]
    rows = np.arange(len(unit))
    if len(unit) > max_nn:  # whole genes, so that same-gene neighbours stay possible
        order = rng.permutation(len(gene_members))
        sizes = np.cumsum([len(gene_members[o]) for o in order])
        rows = np.sort(
            np.concatenate(
                [gene_members[o] for o in order[: np.searchsorted(sizes, max_nn, "right")]]
            )
        )
    sep = separability_index(unit[rows], genes[rows]) if len(rows) >= 2 else None
    out = {
        "n_rows": len(unit), "n_genes": len(g_names), "groups": p_names,
        "categories": stats, "separability": sep,
        "gene_gap": _gap(_mean(stats["same_gene_other_group"]), _mean(stats["different_gene_other_group"])),
    }  # fmt: skip
    return out, sims
