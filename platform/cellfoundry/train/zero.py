"""DeepSpeed ZeRO from the typed config: resolved settings, the config dict, the engine.

The config dict is built here from :class:`cellfoundry.config.DeepSpeedConfig`, the data
and optimizer sections; no JSON file is kept beside it. The optimizer and LR scheduler are
torch objects handed to DeepSpeed (no optimizer op to compile on CPU).
"""

from __future__ import annotations

import importlib
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from cellfoundry.config.train import PretrainJobConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """What a run really uses after checking the hardware."""

    dtype: str
    """"bf16" or "fp32"."""
    offload_optimizer: bool
    offload_params: bool
    notes: tuple[str, ...] = ()
    """One line per setting that was downgraded (logged as warnings)."""


def resolve_settings(
    cfg: PretrainJobConfig, *, on_gpu: bool, bf16_supported: bool = True
) -> Settings:
    """Settings for ``cfg`` on CPU or GPU workers: bf16 needs a GPU that supports it, and CPU
    offload needs a GPU to offload from; otherwise they are downgraded, with a note."""
    ds, notes = cfg.deepspeed, []
    dtype = "bf16" if ds.dtype == "auto" and on_gpu and bf16_supported else ds.dtype
    if dtype == "auto":
        dtype = "fp32"
    if dtype == "bf16" and not on_gpu:
        notes.append("deepspeed.dtype bf16 asked for on CPU workers: training in fp32")
        dtype = "fp32"
    elif dtype == "bf16" and not bf16_supported:
        notes.append("deepspeed.dtype bf16 is not supported by this GPU: training in fp32")
        dtype = "fp32"
    offload_optimizer, offload_params = ds.offload_optimizer, ds.offload_params
    if not on_gpu and (offload_optimizer or offload_params):
        notes.append("deepspeed CPU offload asked for on CPU workers: nothing to offload, ignored")
        offload_optimizer = offload_params = False
    return Settings(dtype, offload_optimizer, offload_params, tuple(notes))


def deepspeed_config(cfg: PretrainJobConfig, settings: Settings) -> dict[str, Any]:
    """DeepSpeed's config dict (the global batch is micro-batch x accumulation x workers)."""
    zero: dict[str, Any] = {"stage": cfg.deepspeed.stage}
    if cfg.deepspeed.stage > 0:
        zero.update(contiguous_gradients=True, overlap_comm=cfg.scaling.use_gpu)
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if settings.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": settings.dtype == "bf16"},
        "zero_allow_untested_optimizer": True,  # a torch AdamW object
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def prepare_deepspeed() -> None:
    """Make ``import deepspeed`` quiet and CPU-safe (PITFALLS.md): skip the shared-memory C++
    op it would otherwise compile for CPU collectives, and silence deprecation warnings of
    torch collectives that DeepSpeed 0.19 still calls."""
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings(
            "ignore", f".*torch.distributed.{name}` is deprecated", FutureWarning
        )
    import deepspeed

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.utils.logger.setLevel(logging.WARNING)


def initialize_engine(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ds_config: dict[str, Any],
) -> Any:
    """A DeepSpeed engine over the process group Ray Train already set up."""
    prepare_deepspeed()
    import deepspeed

    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config,
        dist_init_required=False,
    )
    return engine
