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
    # a NaN p-value counts as 1 (as Geneformer), it is not left out of the m hypotheses
    assert np.allclose(
        benjamini_hochberg(np.array([np.nan, 0.1])), sps.false_discovery_control([1.0, 0.1])
    )


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


def test_genome_wide_goal_test_finds_the_planted_shift() -> None:
    """Genome-wide screens keep the goal-state test against every other gene (Geneformer's)."""
    stats = screen_stats(_screen(goal=True), genome_wide=True)
    assert stats["perturbation"][0] == "delete:UP" and stats["tested"][0] == "goal_shift"
    assert set(stats["test"]) == {"other_genes"} and stats["n_null"][0] == 90
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
    # a targeted screen without controls or null screen: no test, FDR 1 (not vs the others)
    assert set(stats["test"]) == {"none"} and stats["pvalue"].null_count() == 4
    assert (stats["fdr"] == 1.0).all()
    genes = gene_shift_stats(screen, {10: "ENSG10", 11: "ENSG11"})
    row = genes.filter((pl.col("perturbation") == "delete:A") & (pl.col("token_id") == 10)).row(
        0, named=True
    )
    assert row["n_cells"] == 30 and row["ensembl_id"] == "ENSG10"
    assert row["gene_cos_mean"] == pytest.approx(0.5 + 0.01 * 14.5)
    assert row["gene_cos_std"] == pytest.approx(0.01 * np.std(np.arange(30), ddof=1))


# ------------------------------------------------------------------ a null of its own
def _rows(label: str, shift: float, n: int, rng: np.random.Generator, control: bool) -> list:
    return [
        {"perturbation": label, "kind": "delete", "control": control, "goal_shift": None,
         "cell_cos": float(1.0 - shift - 0.01 * abs(rng.normal()))}
        for _ in range(n)
    ]  # fmt: skip


def _frame(rows: list) -> pl.DataFrame:
    return pl.DataFrame(rows, schema_overrides={"cell_cos": pl.Float32, "goal_shift": pl.Float32})


def test_p_value_does_not_depend_on_the_other_perturbations() -> None:
    rng = np.random.default_rng(3)
    a = _rows("delete:A", 0.02, 40, rng, False) + _rows("delete:A", 0.0, 80, rng, True)
    others = []
    for label, shift in (("delete:B", 0.5), ("delete:C", -0.3), ("delete:D", 0.0)):
        others += _rows(label, shift, 40, rng, False) + _rows(label, 0.0, 80, rng, True)
    alone = screen_stats(_frame(a)).row(0, named=True)
    listed = screen_stats(_frame(a + others)).filter(pl.col("perturbation") == "delete:A")
    row = listed.row(0, named=True)
    assert row["test"] == alone["test"] == "matched_controls" and row["n_null"] == 80
    assert row["pvalue"] == alone["pvalue"] and row["z"] == alone["z"] and alone["pvalue"] < 1e-6
    assert row["n_cells"] == 40  # controls are not cells of the perturbation
    # the removed default (each vs the others pooled) moved with the list
    x = np.array([1 - r["cell_cos"] for r in a + others if not r["control"]])
    g = np.array([r["perturbation"] for r in a + others if not r["control"]])
    vs_rest = rank_sum_vs_rest(x, g).filter(pl.col("group") == "delete:A")["pvalue"][0]
    assert abs(np.log10(vs_rest) - np.log10(alone["pvalue"])) > 1


def test_null_screen_uses_the_same_perturbations_values() -> None:
    rng = np.random.default_rng(4)
    screen = _frame(
        _rows("delete:A", 0.05, 30, rng, False) + _rows("delete:B", 0.05, 30, rng, False)
    )
    null = pl.DataFrame({
        "perturbation": ["delete:A"] * 50 + ["delete:B"] * 50 + ["delete:C"] * 50,
        "value": np.concatenate([0.05 + 0.01 * np.abs(rng.normal(size=50)), rng.normal(0.0, 0.01, 50),
                                 rng.normal(0.5, 0.01, 50)]),
    })  # fmt: skip
    stats = screen_stats(screen, null=null)
    by = {r["perturbation"]: r for r in stats.iter_rows(named=True)}
    assert by["delete:A"]["test"] == "null_screen" and by["delete:A"]["n_null"] == 50
    assert by["delete:A"]["pvalue"] > 0.01 and by["delete:B"]["pvalue"] < 1e-6
    x = 1.0 - screen.filter(pl.col("perturbation") == "delete:A")["cell_cos"].to_numpy()
    ref = sps.mannwhitneyu(x, null["value"][:50].to_numpy(), method="asymptotic",
                           use_continuity=False)  # fmt: skip
    assert by["delete:A"]["pvalue"] == pytest.approx(ref.pvalue, rel=1e-9)
    # the same perturbation's null only: adding another gene's rows to the null changes nothing
    more = pl.concat([null, pl.DataFrame({"perturbation": ["delete:D"] * 9, "value": [9.0] * 9})])
    again = screen_stats(screen, null=more).filter(pl.col("perturbation") == "delete:A")
    assert again["pvalue"][0] == by["delete:A"]["pvalue"]
