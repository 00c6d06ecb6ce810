"""Stage 3 configs: the job configs load, mistakes are errors that say the fix, the search
space becomes nested Ray Tune distributions and trial overrides are validated."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellfoundry.config import (
    ConfigError,
    FinetuneJobConfig,
    TuneJobConfig,
    load_config,
    parse_config,
)
from cellfoundry.paths import REPO_ROOT

JOBS = REPO_ROOT / "jobs" / "configs"
BASE = {"data": {"tokenized": "/x/tokenized"}, "model": {"model_dir": "/x/model"}}


@pytest.mark.parametrize("name", ["smoke", "qlora_smoke", "gf-104m"])
def test_finetune_configs_load(name: str) -> None:
    cfg = load_config(FinetuneJobConfig, JOBS / "finetune" / f"{name}.yaml")
    assert Path(cfg.data.tokenized).is_absolute() and cfg.output_dir


@pytest.mark.parametrize("name", ["smoke", "gf-104m"])
def test_tune_configs_load(name: str) -> None:
    cfg = load_config(TuneJobConfig, JOBS / "tune" / f"{name}.yaml")
    assert {"optim.learning_rate", "optim.warmup_ratio", "optim.lr_scheduler_type", "model.dropout",
            "optim.max_grad_norm", "optim.weight_decay", "seed"} <= set(cfg.space)  # fmt: skip
    assert cfg.run.storage_path and cfg.run.name


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"data": {"tokenized": "/x", "bogus": 1}}, "unknown key"),
        ({"scaling": {"num_workers": 2}}, "num_workers must be 1"),
        ({"optim": {"lr_scheduler_type": "step"}}, "not one of"),
        ({"baselines": {"methods": ["knn"]}}, "unknown"),
        ({"task": {"kind": "gene"}}, "gene_labels"),
        ({"split": {"k_folds": 3, "fold": 3}}, "split.fold"),
    ],
)
def test_finetune_config_errors(change: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(FinetuneJobConfig, {**BASE, **change})


def test_space_errors_and_trial_overrides() -> None:
    from cellfoundry.tune.search import trial_config
    from cellfoundry.tune.trials import search_space

    with pytest.raises(ConfigError, match=r"space\.optim\.learning_rate"):
        parse_config(TuneJobConfig, {"finetune": BASE, "output_dir": "/x/o",
                                     "space": {"optim.learning_rate": {"normal": [0, 1]}}})  # fmt: skip
    space = search_space({"optim.learning_rate": {"loguniform": [1e-5, 1e-3]}, "seed": {"randint": [0, 9]},
                          "optim.lr_scheduler_type": {"choice": ["linear", "cosine"]}})  # fmt: skip
    assert set(space) == {"optim", "seed"} and set(space["optim"]) == {
        "learning_rate",
        "lr_scheduler_type",
    }
    cfg = trial_config(
        BASE, {"optim": {"learning_rate": 3e-4, "lr_scheduler_type": "cosine"}, "seed": 7}
    )
    assert (
        cfg.optim.learning_rate == 3e-4
        and cfg.seed == 7
        and cfg.optim.lr_scheduler_type == "cosine"
    )
    with pytest.raises(ConfigError, match="learning_rate"):
        trial_config(BASE, {"optim": {"learning_rate": -1.0}})
