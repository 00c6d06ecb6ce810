"""Stage 2 configs: the job YAMLs load, seeds' defaults, and checks that name the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellfoundry.config import ConfigError, PretrainJobConfig, load_config, parse_config
from cellfoundry.model import PRESETS
from cellfoundry.paths import REPO_ROOT

CONFIGS = REPO_ROOT / "jobs" / "configs" / "pretrain"


def minimal(**extra: object) -> dict:
    return {"data": {"tokenized": "/data/tokenized"}, "output_dir": "/out/models/m1", **extra}


def test_defaults_are_the_seeds() -> None:
    cfg = parse_config(PretrainJobConfig, minimal())
    assert (cfg.optim.lr, cfg.optim.warmup_ratio, cfg.optim.weight_decay) == (2e-4, 0.007, 0.044)
    assert cfg.deepspeed.stage == 2 and cfg.deepspeed.dtype == "auto"
    # run name and storage follow output_dir, metrics live in the run folder
    assert cfg.run.name == "m1"
    assert cfg.run.storage_path == "/out/models/runs"
    assert cfg.tracking.log_dir == "/out/models/runs/m1/logs"


def test_overrides_and_round_trip() -> None:
    cfg = parse_config(
        PretrainJobConfig,
        minimal(model={"preset": "gf-104m", "overrides": {"num_hidden_layers": 2}}),
        ["optim.betas=[0.9, 0.98]", "deepspeed.stage=3", "scaling.resources_per_worker={CPU: 2}"],
    )
    assert cfg.optim.betas == (0.9, 0.98)
    assert cfg.deepspeed.stage == 3
    assert cfg.scaling.resources_per_worker == {"CPU": 2.0}
    assert cfg.model.overrides == {"num_hidden_layers": 2}
    from cellfoundry.config import config_to_dict

    assert parse_config(PretrainJobConfig, config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["deepspeed.offload_params=true"], "needs deepspeed.stage: 3"),
        (["deepspeed.stage=0", "deepspeed.offload_optimizer=true"], "stage 1, 2 or 3"),
        (["deepspeed.stage=4"], "is not one of"),
        (["optim.warmup_ratio=1.5"], "warmup_ratio"),
        (["optim.grad_accum=0"], "grad_accum"),
        (["data.max_length=2"], "max_length"),
        (["tracking.log_dir=s3://bucket/logs"], "tracking.log_dir .* is a URI"),
        (["optim.learning_rate=1"], "unknown key"),
        (["stop_at_step=0"], "stop_at_step"),
        (["eval_every=0"], "eval_every"),
        (["data.block_rows=0"], "block_rows"),
        (["data.validation.fraction=1.0"], "validation.fraction"),
        (["data.validation.batches=0"], "validation.batches"),
        (["data.validation.fraction=0.1", "data.validation.tokenized=/v"], "not both"),
    ],
)
def test_bad_settings_name_the_fix(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(PretrainJobConfig, minimal(), overrides)


def test_cloud_storage_with_log_dir() -> None:
    cfg = parse_config(
        PretrainJobConfig,
        minimal(),
        ["run.storage_path=s3://bucket/runs", "tracking.log_dir=/mnt/logs"],
    )
    assert cfg.run.storage_path == "s3://bucket/runs"
    assert cfg.tracking.log_dir == "/mnt/logs"


def test_object_storage_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """output_dir on s3 stays a URI, the runs go beside it, and the metric files default to
    a local cache folder per storage URI and run name (no shared filesystem needed)."""
    monkeypatch.setenv("CELLFOUNDRY_CACHE_DIR", str(tmp_path))
    cfg = parse_config(PretrainJobConfig, minimal(), ["output_dir=s3://bucket/exp/model/"])
    assert cfg.output_dir == "s3://bucket/exp/model"
    assert cfg.run.storage_path == "s3://bucket/exp/runs" and cfg.run.name == "model"
    log_dir = Path(cfg.tracking.log_dir or "")
    assert log_dir.parent.parent == tmp_path / "runs" and log_dir.name == "logs"
    assert log_dir.parent.name.startswith("model-")
    other = parse_config(
        PretrainJobConfig, minimal(), ["output_dir=s3://bucket/exp/model", "run.storage_path=s3://other/runs"]
    )  # fmt: skip
    assert other.tracking.log_dir != cfg.tracking.log_dir


def test_streamed_data_and_validation_settings() -> None:
    cfg = parse_config(PretrainJobConfig, minimal())
    assert not cfg.data.validation.enabled and cfg.data.block_rows == 256
    cfg = parse_config(
        PretrainJobConfig,
        minimal(),
        ["data.tokenized=s3://bucket/tokenized", "data.validation.tokenized=gs://b/val",
         "eval_every=50"],
    )  # fmt: skip
    # URIs stay as they are (pyarrow.fs opens them); local paths become absolute
    assert cfg.data.tokenized == "s3://bucket/tokenized"
    assert cfg.data.validation.tokenized == "gs://b/val" and cfg.data.validation.enabled
    assert cfg.eval_every == 50
    cfg = parse_config(PretrainJobConfig, minimal(), ["data.validation.fraction=0.02"])
    assert cfg.data.validation.enabled and cfg.data.validation.batches == 8


def test_job_configs_load() -> None:
    files = sorted(CONFIGS.glob("*.yaml"))
    names = {f.stem for f in files}
    assert "smoke" in names
    assert {p for p in PRESETS if p != "tiny"} <= names  # one per real preset
    for f in files:
        cfg = load_config(PretrainJobConfig, f)
        if f.stem == "smoke":
            assert cfg.scaling.num_workers == 2 and not cfg.scaling.use_gpu
            assert cfg.deepspeed.stage == 2
        else:
            assert cfg.model.preset == f.stem and cfg.scaling.use_gpu
    assert load_config(PretrainJobConfig, CONFIGS / "gf-316m.yaml").deepspeed.stage == 3
    assert load_config(PretrainJobConfig, CONFIGS / "gf-316m.yaml").scaling.num_workers >= 16
    assert load_config(PretrainJobConfig, CONFIGS / "gf-104m.yaml").scaling.num_workers == 8


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PretrainJobConfig, tmp_path / "nope.yaml")


def test_cli_pretrain_reports_config_errors(tmp_path: Path) -> None:
    from cellfoundry.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {tokenized: /x}\noutput_dir: /o/m\noptim: {lr: -1}\n")
    assert main(["pretrain", "--config", str(bad)]) == 2
    assert main(["pretrain", "--config", str(tmp_path / "missing.yaml")]) == 2
