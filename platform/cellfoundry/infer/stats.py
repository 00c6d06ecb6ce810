"""Screen statistics: per-perturbation summaries, rank-sum tests with Benjamini-Hochberg FDR,
and gene-embedding shift summaries (polars + NumPy).

The test compares each perturbation's per-cell values (the goal-state shift when the screen
had a goal, else the cell shift ``1 - cell_cos``) with either the pooled values of every
other perturbation or a separate null run's values: a two-sided Wilcoxon rank-sum
(Mann-Whitney U) test, normal approximation with tie correction and no continuity
correction (``scipy.stats.mannwhitneyu(method="asymptotic", use_continuity=False)``),
computed for all perturbations at once from one global ranking.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl
from scipy import stats as sps

logger = logging.getLogger(__name__)

__all__ = [
    "benjamini_hochberg",
    "gene_shift_stats",
    "plot_stats",
    "rank_sum_vs_null",
    "rank_sum_vs_rest",
    "screen_stats",
]


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (FDR q-values); NaN stays NaN."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    q = p[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(q[::-1])[::-1]
    out[order] = np.clip(q, 0.0, 1.0)
    return out


def _z_to_p(
    u: np.ndarray, n1: np.ndarray, n2: np.ndarray, ties: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """z and two-sided p of U statistics (normal approximation, tie-corrected)."""
    n = n1 + n2
    with np.errstate(divide="ignore", invalid="ignore"):
        var = n1 * n2 / 12.0 * ((n + 1) - ties / (n * (n - 1)))
        z = (u - n1 * n2 / 2.0) / np.sqrt(var)
    z = np.where((n1 > 0) & (n2 > 0) & (var > 0), z, np.nan)
    return z, 2.0 * sps.norm.sf(np.abs(z))


def rank_sum_vs_rest(values: np.ndarray, groups: np.ndarray) -> pl.DataFrame:
    """For each group: its values against all other groups' values pooled.
    Returns group, n, n_rest, u, z, pvalue (z > 0: the group's values are larger)."""
    values = np.asarray(values, dtype=np.float64)
    keys, inv = np.unique(np.asarray(groups), return_inverse=True)
    ranks = sps.rankdata(values)  # average ranks over all rows
    _, counts = np.unique(values, return_counts=True)
    ties = float((counts.astype(np.float64) ** 3 - counts).sum())
    n1 = np.bincount(inv, minlength=len(keys)).astype(np.float64)
    r1 = np.bincount(inv, weights=ranks, minlength=len(keys))
    n2 = len(values) - n1
    u = r1 - n1 * (n1 + 1) / 2.0
    z, p = _z_to_p(u, n1, n2, np.full(len(keys), ties))
    return pl.DataFrame(
        {
            "group": keys,
            "n": n1.astype(np.int64),
            "n_rest": n2.astype(np.int64),
            "u": u,
            "z": z,
            "pvalue": p,
        }
    )


def rank_sum_vs_null(values: np.ndarray, groups: np.ndarray, null: np.ndarray) -> pl.DataFrame:
    """For each group: its values against a separate null sample (same columns as
    :func:`rank_sum_vs_rest`; ``n_rest`` is the null's size)."""
    values = np.asarray(values, dtype=np.float64)
    null = np.sort(np.asarray(null, dtype=np.float64))
    _, null_counts = np.unique(null, return_counts=True)
    null_ties = float((null_counts.astype(np.float64) ** 3 - null_counts).sum())
    keys, inv = np.unique(np.asarray(groups), return_inverse=True)
    order = np.argsort(inv, kind="stable")
    bounds = np.searchsorted(inv[order], np.arange(len(keys) + 1))
    u, ties, n1 = np.zeros(len(keys)), np.full(len(keys), null_ties), np.zeros(len(keys))
    for g in range(len(keys)):
        x = values[order[bounds[g] : bounds[g + 1]]]
        below = np.searchsorted(null, x, side="left")
        equal = np.searchsorted(null, x, side="right") - below
        u[g] = (below + 0.5 * equal).sum()
        n1[g] = len(x)
        vals, c = np.unique(x, return_counts=True)
        cn = np.searchsorted(null, vals, side="right") - np.searchsorted(null, vals, side="left")
        t = (c + cn).astype(np.float64)
        ties[g] += float((t**3 - t).sum() - (cn.astype(np.float64) ** 3 - cn).sum())
    n2 = np.full(len(keys), float(len(null)))
    z, p = _z_to_p(u, n1, n2, ties)
    return pl.DataFrame(
        {
            "group": keys,
            "n": n1.astype(np.int64),
            "n_rest": n2.astype(np.int64),
            "u": u,
            "z": z,
            "pvalue": p,
        }
    )


def screen_stats(
    screen: pl.DataFrame | pl.LazyFrame, *, null: np.ndarray | None = None
) -> pl.DataFrame:
    """Per perturbation: n_cells, kind, mean/std of the cell shift (1 - cell_cos) and of
    the goal shift, and the rank-sum test (``tested``: which value) with ``fdr``
    (Benjamini-Hochberg over all perturbations). Sorted by p-value."""
    lf = screen.lazy().select("perturbation", "kind", "cell_cos", "goal_shift")
    df = lf.with_columns(cell_shift=1.0 - pl.col("cell_cos").cast(pl.Float64)).collect()
    has_goal = df["goal_shift"].null_count() < df.height and df.height > 0
    tested = "goal_shift" if has_goal else "cell_shift"
    summary = df.group_by("perturbation").agg(
        pl.first("kind"),
        pl.len().alias("n_cells"),
        pl.col("cell_shift").mean().alias("cell_shift_mean"),
        pl.col("cell_shift").std().alias("cell_shift_std"),
        pl.col("goal_shift").cast(pl.Float64).mean().alias("goal_shift_mean"),
        pl.col("goal_shift").cast(pl.Float64).std().alias("goal_shift_std"),
    )
    if df.height == 0:
        return summary.with_columns(
            pl.lit(tested).alias("tested"),
            *(pl.lit(None, pl.Float64).alias(c) for c in ("z", "pvalue", "fdr")),
        )
    vals = df.drop_nulls(tested)
    x, g = vals[tested].to_numpy(), vals["perturbation"].to_numpy()
    test = rank_sum_vs_null(x, g, null) if null is not None else rank_sum_vs_rest(x, g)
    test = test.with_columns(fdr=pl.Series(benjamini_hochberg(test["pvalue"].to_numpy())))
    test = test.select(pl.col("group").cast(pl.String).alias("perturbation"), "z", "pvalue", "fdr")
    out = summary.join(test, on="perturbation", how="left").with_columns(
        pl.lit(tested).alias("tested")
    )
    return out.sort(["pvalue", "perturbation"], nulls_last=True)


def gene_shift_stats(
    screen: pl.DataFrame | pl.LazyFrame, names: dict[int, str] | None = None
) -> pl.DataFrame:
    """Per (perturbation, affected gene): count, mean and std of the gene-embedding cosine
    over cells (from the per-row ``gene_token_ids`` / ``gene_cos`` lists)."""
    df = (
        screen.lazy()
        .select("perturbation", "gene_token_ids", "gene_cos")
        .explode("gene_token_ids", "gene_cos")
        .drop_nulls("gene_token_ids")
        .group_by("perturbation", "gene_token_ids")
        .agg(
            pl.len().alias("n_cells"),
            pl.col("gene_cos").cast(pl.Float64).mean().alias("gene_cos_mean"),
            pl.col("gene_cos").cast(pl.Float64).std().alias("gene_cos_std"),
        )
        .rename({"gene_token_ids": "token_id"})
        .sort("perturbation", "gene_cos_mean")
        .collect()
    )
    if names:
        ens = [names.get(int(t), "") for t in df["token_id"].to_list()]
        df = df.with_columns(ensembl_id=pl.Series(ens, dtype=pl.String))
    return df


def plot_stats(stats: pl.DataFrame, path: str | Path, *, top: int = 10) -> Path:
    """Mean shift against -log10(FDR), the ``top`` perturbations labelled (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tested = stats["tested"][0] if stats.height else "cell_shift"
    x = stats[f"{tested}_mean"].to_numpy().astype(float)
    y = -np.log10(np.clip(stats["fdr"].fill_null(1.0).to_numpy().astype(float), 1e-300, 1.0))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(x, y, s=8, alpha=0.7)
    for i in range(min(top, stats.height)):
        ax.annotate(stats["perturbation"][i], (x[i], y[i]), fontsize=6)
    ax.axvline(0.0, color="grey", lw=0.5)
    ax.xaxis.set_major_locator(plt.MaxNLocator(5))  # shifts are small: few, readable ticks
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
    ax.set_xlabel(f"mean {tested.replace('_', ' ')}")
    ax.set_ylabel("-log10 FDR")
    ax.set_title(f"{stats.height} perturbations")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
