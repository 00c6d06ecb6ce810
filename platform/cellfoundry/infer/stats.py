"""Screen statistics: per-perturbation summaries, rank-sum tests with Benjamini-Hochberg FDR,
and gene-embedding shift summaries (polars + NumPy).

Each perturbation's per-cell values (the goal-state shift when the screen had a goal, else
the cell shift ``1 - cell_cos``) are tested against a null of its own, never against the
other perturbations of a targeted screen (that made a p-value depend on which others were
listed): the same perturbation in a null screen (Geneformer's ``isp_stats_vs_null``), or
its controls in the same cells (random genes of about the same ranks, see
:mod:`cellfoundry.infer.perturb`); in a genome-wide screen, as Geneformer's goal-state
statistics, against every other gene's values. The test is a two-sided Wilcoxon rank-sum
(Mann-Whitney U), normal approximation with tie correction and no continuity correction
(``scipy.stats.mannwhitneyu(method="asymptotic", use_continuity=False)``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
from scipy import stats as sps

logger = logging.getLogger(__name__)

__all__ = [
    "TESTS",
    "benjamini_hochberg",
    "gene_shift_stats",
    "plot_stats",
    "rank_sum_vs_null",
    "rank_sum_vs_rest",
    "screen_stats",
]


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (FDR q-values). A NaN p-value (no test) counts
    as 1, as in Geneformer: it stays among the hypotheses, so leaving it out cannot make
    the others look stronger."""
    p = np.asarray(p, dtype=np.float64)
    p = np.where(np.isnan(p), 1.0, p)
    m = p.size
    out = np.ones(p.shape)
    if m == 0:
        return out
    order = np.argsort(p, kind="stable")
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


TESTS = ("null_screen", "matched_controls", "other_genes", "none")
"""What a perturbation's values were tested against (the ``test`` column)."""


def screen_stats(
    screen: pl.DataFrame | pl.LazyFrame,
    *,
    null: pl.DataFrame | None = None,
    genome_wide: bool = False,
    alternatives: Sequence[str] = (),
) -> pl.DataFrame:
    """Per perturbation (its controls apart): kind, n_cells, mean/std of the cell shift
    (1 - cell_cos) and of the goal shift, and a rank-sum test of ``tested`` (which value)
    against the perturbation's own null (``test``, ``n_null``):

    - ``null_screen``: ``null``'s values (columns ``perturbation``, ``value``) of the same
      perturbation, as Geneformer's ``isp_stats_vs_null``;
    - ``matched_controls``: its control rows (``control`` true) in the same cells;
    - ``other_genes`` (``genome_wide`` only): every other perturbation without controls,
      pooled, as Geneformer's goal-state statistics;
    - ``none``: no null (p-value NaN).

    ``fdr``: Benjamini-Hochberg over all perturbations, NaN p-values as 1 (as Geneformer).
    ``alternatives``: states whose shift columns (``alt_shift:<state>``) are summarised too,
    as ``alt_shift_mean:<state>`` and ``alt_shift_std:<state>`` (not tested).

    Sorted by p-value. A perturbation's p-value depends only on its own rows and null."""
    lf = screen.lazy()
    has_control = "control" in lf.collect_schema().names()
    control = pl.col("control").fill_null(False) if has_control else pl.lit(False)
    alts = [f"alt_shift:{s}" for s in alternatives]
    df = (
        lf.select("perturbation", "kind", "cell_cos", "goal_shift", *alts, control.alias("control"))
        .with_columns(cell_shift=1.0 - pl.col("cell_cos").cast(pl.Float64))
        .collect()
    )
    has_goal = df["goal_shift"].null_count() < df.height and df.height > 0
    tested = "goal_shift" if has_goal else "cell_shift"
    real = df.filter(~pl.col("control"))
    summary = real.group_by("perturbation").agg(
        pl.first("kind"),
        pl.len().alias("n_cells"),
        pl.col("cell_shift").mean().alias("cell_shift_mean"),
        pl.col("cell_shift").std().alias("cell_shift_std"),
        pl.col("goal_shift").cast(pl.Float64).mean().alias("goal_shift_mean"),
        pl.col("goal_shift").cast(pl.Float64).std().alias("goal_shift_std"),
        *(
            agg
            for s, a in zip(alternatives, alts, strict=True)
            for agg in (
                pl.col(a).cast(pl.Float64).mean().alias(f"alt_shift_mean:{s}"),
                pl.col(a).cast(pl.Float64).std().alias(f"alt_shift_std:{s}"),
            )
        ),
    )
    value = pl.col(tested).cast(pl.Float64)
    values = df.select("perturbation", "control", value.alias("value")).filter(
        pl.col("value").is_not_null() & pl.col("value").is_not_nan()
    )
    test = _tests(values, null, genome_wide)
    out = summary.join(test, on="perturbation", how="left").with_columns(
        pl.lit(tested).alias("tested"),
        pl.col("test").fill_null("none"),
        pl.col("n_null").fill_null(0),
    )
    # every perturbation counts in BH, an untested one with p = 1 (NaN p-values as upstream)
    p = out["pvalue"].fill_null(np.nan).to_numpy()
    out = out.with_columns(fdr=pl.Series(benjamini_hochberg(p), dtype=pl.Float64))
    return out.sort(["pvalue", "perturbation"], nulls_last=True)


def _tests(values: pl.DataFrame, null: pl.DataFrame | None, genome_wide: bool) -> pl.DataFrame:
    """perturbation, test, n_null, z, pvalue for every perturbation of ``values``."""
    real = values.filter(~pl.col("control"))
    own = _by_perturbation(values.filter(pl.col("control")))
    if null is not None:
        own, kind = _by_perturbation(null.select("perturbation", "value")), "null_screen"
    else:
        kind = "matched_controls"
    rows = []
    # only perturbations with a null of their own (a genome-wide screen has none: no loop)
    for key, part in real.filter(pl.col("perturbation").is_in(list(own))).group_by("perturbation"):
        name = str(key[0])
        x = part["value"].to_numpy()
        y = own.get(name)
        if y is None or len(y) == 0:
            continue
        r = rank_sum_vs_null(x, np.zeros(len(x), np.int8), y).row(0, named=True)
        rows.append((name, kind, len(y), r["z"], r["pvalue"]))
    out = pl.DataFrame(
        rows,
        schema={"perturbation": pl.String, "test": pl.String, "n_null": pl.Int64,
                "z": pl.Float64, "pvalue": pl.Float64},
        orient="row",
    )  # fmt: skip
    if genome_wide and null is None:  # the rest: every other gene without controls, pooled
        rest = real.filter(~pl.col("perturbation").is_in(out["perturbation"].implode()))
        if rest.height:
            vs = rank_sum_vs_rest(rest["value"].to_numpy(), rest["perturbation"].to_numpy())
            out = pl.concat([out, vs.select(
                pl.col("group").cast(pl.String).alias("perturbation"),
                pl.lit("other_genes").alias("test"), pl.col("n_rest").alias("n_null"), "z", "pvalue",
            )])  # fmt: skip
    return out


def _by_perturbation(df: pl.DataFrame) -> dict[str, np.ndarray]:
    """Each perturbation's values."""
    return {
        str(k[0]): part["value"].to_numpy().astype(np.float64)
        for k, part in df.group_by("perturbation")
    }


def gene_shift_stats(
    screen: pl.DataFrame | pl.LazyFrame, names: dict[int, str] | None = None
) -> pl.DataFrame:
    """Per (perturbation, affected gene): count, mean and std of the gene-embedding cosine
    over cells (from the per-row ``gene_token_ids`` / ``gene_cos`` lists)."""
    df = (
        screen.lazy()
        .filter(~_is_control(screen))
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


def _is_control(screen: pl.DataFrame | pl.LazyFrame) -> pl.Expr:
    """Control rows (none in a screen without the ``control`` column)."""
    if "control" in screen.lazy().collect_schema().names():
        return pl.col("control").fill_null(False)
    return pl.lit(False)


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
