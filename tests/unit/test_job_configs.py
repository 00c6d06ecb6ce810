"""Every job config under jobs/configs/ loads into its stage's typed config (unknown keys
and bad values are errors), and the demo's generated-data overrides apply to theirs."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellfoundry.config import (
    BatchEvalConfig,
    CorpusJobConfig,
    EmbedJobConfig,
    FinetuneJobConfig,
    MaskedEvalConfig,
    PerturbJobConfig,
    PretrainJobConfig,
    ProbeConfig,
    TuneJobConfig,
    load_config,
)
from cellfoundry.config.serve import ServeJobConfig
from cellfoundry.demo import SYNTHETIC_OVERRIDES
from cellfoundry.paths import REPO_ROOT

CONFIGS = REPO_ROOT / "jobs" / "configs"
CLASSES = {
    "corpus": CorpusJobConfig,
    "pretrain": PretrainJobConfig,
    "finetune": FinetuneJobConfig,
    "tune": TuneJobConfig,
    "embed": EmbedJobConfig,
    "perturb": PerturbJobConfig,
    "serve": ServeJobConfig,
    "evaluate/masked": MaskedEvalConfig,
    "evaluate/batch": BatchEvalConfig,
    "evaluate/probe": ProbeConfig,
    "evaluate/embed": EmbedJobConfig,
}
FILES = sorted(p for p in CONFIGS.rglob("*.yaml") if not p.name.startswith("catalog."))


def config_class(path: Path) -> type:
    stage = path.parent.name
    key = f"evaluate/{path.stem.split('-')[0]}" if stage == "evaluate" else stage
    return CLASSES[key]


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(CONFIGS)) for p in FILES])
def test_job_config_loads(path: Path) -> None:
    load_config(config_class(path), path)


def test_every_stage_has_a_smoke_config() -> None:
    stages = {p.name for p in CONFIGS.iterdir() if p.is_dir()}
    assert {"corpus", "pretrain", "finetune", "tune", "embed", "perturb", "serve"} <= stages
    for stage in stages - {"evaluate"}:
        assert (CONFIGS / stage / "smoke.yaml").is_file(), stage


@pytest.mark.parametrize("stage", sorted(SYNTHETIC_OVERRIDES))
def test_demo_synthetic_overrides_apply(stage: str) -> None:
    path = (
        CONFIGS / "evaluate" / "probe-smoke.yaml"
        if stage == "probe"
        else CONFIGS / stage / "smoke.yaml"
    )
    cfg = load_config(config_class(path), path, SYNTHETIC_OVERRIDES[stage])
    if stage == "perturb":
        assert cfg.genome_wide == "delete" and cfg.perturbations == []
