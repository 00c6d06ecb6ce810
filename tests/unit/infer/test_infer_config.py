"""Stage 4 configs: the shipped YAML files load; bad values fail with the fix in the message."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellfoundry.config import (
    ConfigError,
    EmbedJobConfig,
    PerturbJobConfig,
    load_config,
    parse_config,
)

JOBS = Path(__file__).resolve().parents[3] / "jobs" / "configs"


@pytest.mark.parametrize("name", ["smoke", "gf-104m"])
def test_embed_configs_load(name: str) -> None:
    cfg = load_config(EmbedJobConfig, JOBS / "embed" / f"{name}.yaml")
    assert cfg.output.endswith(".h5ad") and cfg.artifact_dir.endswith(".embeddings")


@pytest.mark.parametrize("name", ["smoke", "genome_wide"])
def test_perturb_configs_load(name: str) -> None:
    cfg = load_config(PerturbJobConfig, JOBS / "perturb" / f"{name}.yaml", ["fraction=0.5"])
    assert cfg.fraction == 0.5 and (cfg.perturbations or cfg.genome_wide == "delete")


def test_bad_values_name_the_fix() -> None:
    base = {"model": "m", "tokenized": "t"}
    with pytest.raises(ConfigError, match=r"must end with \.h5ad"):
        parse_config(EmbedJobConfig, {**base, "output": "x.parquet"})
    with pytest.raises(ConfigError, match="give perturbations"):
        parse_config(PerturbJobConfig, {**base, "output_dir": "o"})
    with pytest.raises(ConfigError, match="fraction must lie"):
        parse_config(
            PerturbJobConfig, {**base, "output_dir": "o", "genome_wide": "delete", "fraction": 0}
        )
    with pytest.raises(ConfigError, match="is not one of"):
        parse_config(
            PerturbJobConfig,
            {**base, "output_dir": "o", "perturbations": [{"kind": "knockout", "genes": ["G"]}]},
        )
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config(EmbedJobConfig, {**base, "output": "x.h5ad", "compute": {"gpus": 1}})


@pytest.mark.parametrize(
    ("compute", "bounds"),
    [
        ({}, (1, float("inf"))),  # default: autoscale from 1 actor with the cluster
        ({"min_actors": 2, "max_actors": 8}, (2, 8)),
        ({"concurrency": 4}, (4, 4)),  # the fixed-size shorthand
    ],
)
def test_actor_pool_bounds(compute: dict, bounds: tuple[int, float]) -> None:
    from cellfoundry.infer.common import map_batches_kwargs

    base = {"model": "m", "tokenized": "t", "output": "x.h5ad"}
    cfg = parse_config(EmbedJobConfig, {**base, "compute": compute})
    strategy = map_batches_kwargs(cfg.compute)["compute"]  # Ray Data's ActorPoolStrategy
    assert (strategy.min_size, strategy.max_size) == bounds


@pytest.mark.parametrize(
    ("compute", "message"),
    [
        ({"concurrency": 4, "max_actors": 8}, "not both"),
        ({"min_actors": 4, "max_actors": 2}, r"max_actors \(2\) must be >= compute.min_actors"),
        ({"min_actors": 0}, "min_actors must be >= 1"),
        ({"concurrency": 0}, "concurrency must be >= 1"),
    ],
)
def test_actor_pool_bad_bounds(compute: dict, message: str) -> None:
    base = {"model": "m", "tokenized": "t", "output": "x.h5ad"}
    with pytest.raises(ConfigError, match=message):
        parse_config(EmbedJobConfig, {**base, "compute": compute})
