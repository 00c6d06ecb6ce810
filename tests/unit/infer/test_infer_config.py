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
