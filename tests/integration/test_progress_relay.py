"""Visible progress on a real local cluster: workers' lines reach the driver through the
relay actor, Ray Data logs one line per operator without a terminal, and `cellfoundry
tokenize --obs-columns ... --hf` output loads with datasets.load_from_disk."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellfoundry import datalog, progress, runtime
from support.logcollect import Collect

# Ray workers cannot import this test module: pickle its functions and classes by value.
ray_cloudpickle = pytest.importorskip("ray.cloudpickle")
ray_cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _worker(link: progress.ProgressLink | None) -> int:
    from cellfoundry.logs import setup_logging

    setup_logging()
    progress.install(link, tag="rank 0")
    log = logging.getLogger("cellfoundry.train.loop")
    log.info("step 1/2 loss 9.0", extra=progress.PROGRESS)
    log.info("a detail only the worker's log needs")
    log.warning("bf16 asked for on a CPU: fp32")
    log.info("step 2/2 loss 8.5", extra=progress.PROGRESS)  # the last line, just before return
    return 2


def test_worker_lines_reach_the_driver_in_order(ray_local: None) -> None:
    import ray

    with Collect("cellfoundry.train.loop") as got, progress.relay() as link:
        assert link is not None  # the session's cluster runs with log_to_driver=False
        assert ray.get(ray.remote(num_cpus=1)(_worker).remote(link)) == 2
    assert got.messages() == [
        "[rank 0] step 1/2 loss 9.0",
        "[rank 0] bf16 asked for on a CPU: fp32",
        "[rank 0] step 2/2 loss 8.5",
    ]
    assert [r.levelno for r in got.records] == [logging.INFO, logging.WARNING, logging.INFO]
    with progress.relay() as again:  # the same actor serves the next stage
        assert again == link


class AddOne:
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"id": batch["id"] + 1}


def test_operator_lines_without_a_terminal(ray_local: None) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    bars = ctx.enable_progress_bars
    try:
        runtime.configure_data_context(interactive=False)
        with Collect(datalog.logger.name) as got:
            rows = ray.data.range(20, override_num_blocks=2).map_batches(
                AddOne, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1
            ).take_all()  # fmt: skip
    finally:
        runtime.configure_data_context(interactive=bars)
    assert sorted(r["id"] for r in rows) == list(range(1, 21))
    lines = got.messages()
    started = [m for m in lines if m.endswith(" started")]
    done = [m for m in lines if " done: " in m]
    assert any("MapBatches(AddOne)" in m for m in started), lines
    assert any("MapBatches(AddOne) done: 20 rows in " in m for m in done), lines
    assert len(lines) <= 2 * 3  # start and finish per operator, no status dumps


def test_tokenize_obs_columns_load_with_datasets(
    ray_local: None, geneformer_dir: Path, tmp_path: Path
) -> None:
    """What Geneformer's tools read: datasets.load_from_disk(OUT/hf) with input_ids,
    length and the chosen obs columns."""
    from datasets import load_from_disk

    from cellfoundry.cli import main

    vocab = json.loads((geneformer_dir / "v2" / "token_dictionary_gc104M.json").read_text())
    genes = sorted(g for g in vocab if g.startswith("ENSG"))[:50]
    rng = np.random.default_rng(0)
    x = sp.csr_matrix(rng.poisson(1.0, (30, 50)).astype(np.float32))
    obs = pd.DataFrame(
        {"cell_type": [f"type{i % 3}" for i in range(30)], "donor": ["d1", "d2"] * 15},
        index=[f"c{i}" for i in range(30)],
    )
    path = tmp_path / "labelled.h5ad"
    ad.AnnData(x, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    out = tmp_path / "tokens"
    args = ["tokenize", str(path), "--dictionaries", str(geneformer_dir / "v2"), "--mode", "v2",
            "--output", str(out), "--obs-columns", "cell_type,donor", "--hf"]  # fmt: skip
    assert main(args) == 0
    ds = load_from_disk(str(out / "hf"))
    assert {"input_ids", "length", "cell_type", "donor"} <= set(ds.column_names)
    kept = {c: (t, d) for c, t, d in zip(ds["cell_id"], ds["cell_type"], ds["donor"], strict=True)}
    assert kept and all(kept[c] == (obs.loc[c, "cell_type"], obs.loc[c, "donor"]) for c in kept)
    assert all(n == len(ids) for n, ids in zip(ds["length"], ds["input_ids"], strict=True))
    # a column one file lacks: exit code 2 and one line naming file, column and columns
    assert main([*args[:-3], "--obs-columns", "cell_type,age"]) == 2
