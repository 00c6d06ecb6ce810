"""DeepSpeed settings: downgrades with notes, and the config dict built from the typed config."""

from __future__ import annotations

from cellfoundry.config import PretrainJobConfig, parse_config
from cellfoundry.train import deepspeed_config, resolve_settings


def cfg_with(*overrides: str) -> PretrainJobConfig:
    base = {"data": {"tokenized": "/d", "batch_size": 6}, "output_dir": "/o/m"}
    return parse_config(PretrainJobConfig, base, list(overrides))


def test_auto_dtype_is_bf16_on_gpu_fp32_on_cpu() -> None:
    cfg = cfg_with()
    assert resolve_settings(cfg, on_gpu=True).dtype == "bf16"
    cpu = resolve_settings(cfg, on_gpu=False)
    assert cpu.dtype == "fp32" and cpu.notes == ()
    old_gpu = resolve_settings(cfg, on_gpu=True, bf16_supported=False)
    assert old_gpu.dtype == "fp32" and old_gpu.notes == ()


def test_downgrades_come_with_a_note() -> None:
    cpu = resolve_settings(cfg_with("deepspeed.dtype=bf16"), on_gpu=False)
    assert cpu.dtype == "fp32"
    assert any("bf16" in n and "CPU" in n for n in cpu.notes)
    gpu = resolve_settings(cfg_with("deepspeed.dtype=bf16"), on_gpu=True, bf16_supported=False)
    assert gpu.dtype == "fp32" and gpu.notes
    offload = cfg_with(
        "deepspeed.stage=3", "deepspeed.offload_optimizer=true", "deepspeed.offload_params=true"
    )
    on_cpu = resolve_settings(offload, on_gpu=False)
    assert not on_cpu.offload_optimizer and not on_cpu.offload_params
    assert any("offload" in n for n in on_cpu.notes)
    on_gpu = resolve_settings(offload, on_gpu=True)
    assert on_gpu.offload_optimizer and on_gpu.offload_params and on_gpu.notes == ()


def test_config_dict_follows_the_typed_config() -> None:
    cfg = cfg_with("deepspeed.stage=3", "optim.grad_accum=4", "optim.grad_clip=0.5",
                   "deepspeed.offload_optimizer=true", "deepspeed.offload_params=true",
                   "scaling.use_gpu=true")  # fmt: skip
    ds = deepspeed_config(cfg, resolve_settings(cfg, on_gpu=True))
    assert ds["train_micro_batch_size_per_gpu"] == 6
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True}
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is True
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"
    assert "optimizer" not in ds and "scheduler" not in ds  # torch objects are passed instead


def test_cpu_config_dict() -> None:
    for stage in (0, 1, 2):
        cfg = cfg_with(f"deepspeed.stage={stage}")
        ds = deepspeed_config(cfg, resolve_settings(cfg, on_gpu=False))
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["bf16"] == {"enabled": False}
        assert "offload_optimizer" not in ds["zero_optimization"]
