"""Screen statistics: exact agreement with scipy, and a constructed case with a known answer."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy import stats as sps

from cellfoundry.infer.stats import (
    benjamini_hochberg,
    gene_shift_stats,
    rank_sum_vs_null,
    rank_sum_vs_rest,
    screen_stats,
)


def test_rank_sums_equal_scipy_with_ties() -> None:
    rng = np.random.default_rng(0)
    values = np.round(rng.normal(size=400), 1)  # many ties
    groups = rng.choice(list("abcdef"), 400)
    null = np.round(rng.normal(size=150), 1)
    rest = rank_sum_vs_rest(values, groups)
    vs_null = rank_sum_vs_null(values, groups, null)
    for g in "abcdef":
        x = values[groups == g]
        ref = sps.mannwhitneyu(x, values[groups != g], method="asymptotic", use_continuity=False)
        row = rest.filter(pl.col("group") == g).row(0, named=True)
        assert row["u"] == pytest.approx(ref.statistic) and row["pvalue"] == pytest.approx(
            ref.pvalue, rel=1e-9
        )
        ref = sps.mannwhitneyu(x, null, method="asymptotic", use_continuity=False)
        row = vs_null.filter(pl.col("group") == g).row(0, named=True)
        assert row["u"] == pytest.approx(ref.statistic) and row["pvalue"] == pytest.approx(
            ref.pvalue, rel=1e-9
        )


def test_benjamini_hochberg_equals_scipy() -> None:
    p = np.random.default_rng(1).uniform(size=200) ** 3
    assert np.allclose(benjamini_hochberg(p), sps.false_discovery_control(p))
    assert np.isnan(benjamini_hochberg(np.array([np.nan, 0.1]))[0])


def _screen(goal: bool) -> pl.DataFrame:
    """30 cells x 4 perturbations: only 'delete:UP' shifts cells toward the goal."""
    rng = np.random.default_rng(2)
    rows = []
    for p, mean in (("delete:UP", 0.5), ("delete:A", 0.0), ("delete:B", 0.0), ("delete:C", 0.0)):
        for c in range(30):
            rows.append({
                "perturbation": p, "kind": "delete", "cell_cos": float(0.9 + 0.01 * rng.normal()),
                "goal_shift": float(mean + 0.05 * rng.normal()) if goal else None,
                "gene_token_ids": [10, 11], "gene_cos": [0.5 + 0.01 * c, 1.0],
            })  # fmt: skip
    return pl.DataFrame(rows, schema_overrides={"cell_cos": pl.Float32, "goal_shift": pl.Float32})


def test_screen_stats_finds_the_planted_shift() -> None:
    stats = screen_stats(_screen(goal=True))
    assert stats["perturbation"][0] == "delete:UP" and stats["tested"][0] == "goal_shift"
    top = stats.row(0, named=True)
    assert top["n_cells"] == 30 and top["z"] > 5 and top["fdr"] < 1e-6
    assert top["goal_shift_mean"] == pytest.approx(0.5, abs=0.03)
    others = stats.filter(pl.col("perturbation") != "delete:UP")
    assert (others["z"] < 0).all()  # pooled with the planted group, the others rank lower
    assert np.allclose(stats["fdr"].to_numpy(), benjamini_hochberg(stats["pvalue"].to_numpy()))


def test_screen_stats_without_goal_tests_cell_shift_and_gene_stats() -> None:
    screen = _screen(goal=False)
    stats = screen_stats(screen)
    assert set(stats["tested"]) == {"cell_shift"} and stats["goal_shift_mean"].null_count() == 4
    genes = gene_shift_stats(screen, {10: "ENSG10", 11: "ENSG11"})
    row = genes.filter((pl.col("perturbation") == "delete:A") & (pl.col("token_id") == 10)).row(
        0, named=True
    )
    assert row["n_cells"] == 30 and row["ensembl_id"] == "ENSG10"
    assert row["gene_cos_mean"] == pytest.approx(0.5 + 0.01 * 14.5)
    assert row["gene_cos_std"] == pytest.approx(0.01 * np.std(np.arange(30), ddof=1))
