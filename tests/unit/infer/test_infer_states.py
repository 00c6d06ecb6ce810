"""Goal and start states without Ray: the goal cells are a seeded random sample that does not
depend on shard order, summarised by mean or median; alternative states get a shift column
each; the start state selects the cells perturbed; the manifest record names it all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from _infer_reference import random_cells

from cellfoundry.config import ConfigError, PerturbJobConfig, parse_config
from cellfoundry.infer.embed import Embedder
from cellfoundry.infer.perturb import Perturbation, perturb_cells
from cellfoundry.infer.perturb_job import select_cells, states_record
from cellfoundry.infer.states import sample_state_cells, state_embedding
from cellfoundry.infer.stats import screen_stats


def _cells_table(n: int) -> pa.Table:
    """``n`` cells in states A (half), B and C, with IDs."""
    states = ["A" if i % 2 else ("B" if i % 4 else "C") for i in range(n)]
    return pa.table({"cell_id": [f"cell-{i:04d}" for i in range(n)], "state": states})


def test_goal_sample_is_seeded_and_independent_of_shard_order() -> None:
    table = _cells_table(400)
    whole = sample_state_cells(table, "state", ["A", "B"], 30, seed=7)
    assert whole["state"].to_pylist() == ["A"] * 30 + ["B"] * 30
    # shuffled rows, split into uneven "shards", each sampled, then the samples sampled
    rng = np.random.default_rng(0)
    shuffled = table.take(pa.array(rng.permutation(table.num_rows)))
    shards = [shuffled.slice(0, 50), shuffled.slice(50, 230), shuffled.slice(280)]
    pieces = [sample_state_cells(s, "state", ["A", "B"], 30, seed=7) for s in shards]
    merged = sample_state_cells(pa.concat_tables(pieces), "state", ["A", "B"], 30, seed=7)
    assert merged["cell_id"].to_pylist() == whole["cell_id"].to_pylist()
    again = sample_state_cells(table, "state", ["A", "B"], 30, seed=7)
    assert again["cell_id"].to_pylist() == whole["cell_id"].to_pylist()  # reproducible
    other = sample_state_cells(table, "state", ["A", "B"], 30, seed=8)
    assert set(other["cell_id"].to_pylist()) != set(whole["cell_id"].to_pylist())
    # a random sample, not the first cells of the state in row order
    first_a = [c for c, s in zip(table["cell_id"].to_pylist(), table["state"].to_pylist(), strict=True) if s == "A"][:30]  # fmt: skip
    assert set(whole["cell_id"].to_pylist()[:30]) != set(first_a)
    # fewer cells than asked: all of them
    assert sample_state_cells(table, "state", ["C"], 1000, seed=7).num_rows == 100
    with pytest.raises(ValueError, match="no column 'donor'"):
        sample_state_cells(table, "donor", ["A"], 5, seed=0)


def test_state_embedding_mean_or_median() -> None:
    emb = np.array([[0.0, 1.0], [1.0, 2.0], [2.0, 3.0], [100.0, -50.0]], np.float32)
    assert np.allclose(state_embedding(emb, "mean"), [25.75, -11.0])
    assert np.allclose(state_embedding(emb, "median"), [1.5, 1.5])  # the outlier does not pull
    assert state_embedding(emb, "median").dtype == np.float32
    with pytest.raises(ValueError, match="use mean or median"):
        state_embedding(emb, "mode")
    with pytest.raises(ValueError, match=">= 1 cell"):
        state_embedding(np.zeros((0, 2)), "mean")


def test_alternative_states_get_a_shift_column_each(small_model: Path) -> None:
    e = Embedder(small_model, pooling="cls")
    cells = random_cells(6, seed=3, min_genes=10, max_genes=30)
    others = random_cells(10, seed=4, min_genes=10, max_genes=30)
    b = state_embedding(e.embed_cells(others[:5]), "mean")
    c = state_embedding(e.embed_cells(others[5:]), "median")
    goal = state_embedding(e.embed_cells(cells[:3]), "mean")
    perts = [Perturbation("delete", (int(cells[0][3]),)), Perturbation("overexpress", (50,))]
    table = perturb_cells(e, cells, perts, goal=goal, alternatives={"B": b, "C x": c})
    assert table.column_names[-2:] == ["alt_shift:B", "alt_shift:C x"]
    # the shift toward an alternative is the goal shift with that state as the goal
    as_goal = perturb_cells(e, cells, perts, goal=b)
    assert np.allclose(table["alt_shift:B"].to_numpy(), as_goal["goal_shift"].to_numpy(), atol=1e-6)
    assert not np.allclose(table["alt_shift:B"].to_numpy(), table["goal_shift"].to_numpy())
    stats = screen_stats(pl.from_arrow(table), alternatives=["B", "C x"])
    df = pl.from_arrow(table)
    for state in ("B", "C x"):
        want = df.group_by("perturbation").agg(pl.col(f"alt_shift:{state}").mean())
        got = stats.join(want, on="perturbation")
        assert np.allclose(got[f"alt_shift_mean:{state}"], got[f"alt_shift:{state}"])
        assert f"alt_shift_std:{state}" in stats.columns
    empty = perturb_cells(e, [], perts, alternatives={"B": b})
    assert empty.num_rows == 0 and "alt_shift:B" in empty.column_names


def _cfg(**extra: object) -> PerturbJobConfig:
    base = {"model": "m", "tokenized": "t", "output_dir": "o", "genome_wide": "delete"}
    return parse_config(PerturbJobConfig, {**base, **extra})


def test_start_state_and_goal_settings_are_checked_and_recorded() -> None:
    cfg = _cfg(
        start={"column": "state", "value": "A"}, filter={"donor": ["d1"]},
        goal={"column": "state", "value": "B", "alternatives": ["C"], "statistic": "median",
              "seed": 3, "max_cells": 50},
    )  # fmt: skip
    assert cfg.cell_filter == {"donor": ["d1"], "state": ["A"]}
    table = _cells_table(20).append_column("donor", pa.array(["d1", "d1", "d2", "d2"] * 5))
    picked = select_cells(table, cfg.cell_filter, None)
    assert set(picked["state"].to_pylist()) == {"A"} and set(picked["donor"].to_pylist()) == {"d1"}
    assert picked.num_rows == 5  # odd rows (A) of which every other one is d1
    record = states_record(cfg, {"B": 5, "C": 5})
    assert record["start_state"] == {"column": "state", "value": "A"}
    goal = record["goal_state"]
    assert (goal["value"], goal["alternatives"], goal["statistic"], goal["seed"]) == (
        "B", ["C"], "median", 3,
    )  # fmt: skip
    assert goal["max_cells"] == 50 and goal["cells"] == {"B": 5, "C": 5}
    assert states_record(_cfg(), None) == {"start_state": None, "goal_state": None}
    with pytest.raises(ConfigError, match="give the start state once"):
        _cfg(start={"column": "state", "value": "A"}, filter={"state": ["A", "B"]})
    with pytest.raises(ConfigError, match=r"not goal\.value"):
        _cfg(goal={"column": "state", "value": "B", "alternatives": ["B"]})
    with pytest.raises(ConfigError, match="is not one of"):
        _cfg(goal={"column": "state", "value": "B", "statistic": "mode"})
    with pytest.raises(ValueError, match="no column 'state'"):
        select_cells(pa.table({"cell_id": ["a"], "donor": ["d1"]}), cfg.cell_filter, None)
