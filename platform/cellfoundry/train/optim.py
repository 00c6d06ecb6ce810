"""AdamW with decoupled weight decay and a warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cellfoundry.config.train import OptimConfig

#: Parameters whose name contains one of these are not weight-decayed.
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


@dataclass(frozen=True)
class StepPlan:
    """How long the run is, in optimizer steps."""

    total_steps: int
    warmup_steps: int
    steps_per_epoch: int
    """Optimizer steps per pass over the data (micro-batches per epoch // grad_accum)."""


def plan_steps(optim: OptimConfig, micro_per_epoch: int) -> StepPlan:
    """Total and warm-up steps from ``max_steps`` (or ``epochs``) and the data size."""
    per_epoch = max(1, micro_per_epoch // optim.grad_accum)
    total = optim.max_steps or max(1, math.ceil(optim.epochs * micro_per_epoch / optim.grad_accum))
    warmup = min(total - 1, round(optim.warmup_ratio * total)) if total > 1 else 0
    return StepPlan(total_steps=total, warmup_steps=max(0, warmup), steps_per_epoch=per_epoch)


class WarmupCosine:
    """LR multiplier of step ``s`` (0-based): ``(s + 1) / warmup`` during warm-up, then a
    cosine from 1 towards ``min_ratio``, which step ``total_steps`` would reach (so the last
    step still learns). Picklable (a ``LambdaLR`` lambda)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> None:
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights, and biases / LayerNorm weights without decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name for k in NO_DECAY) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: torch.nn.Module, optim: OptimConfig, *, cpu_adam: bool = False
) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` over :func:`param_groups`; with ``cpu_adam``
    DeepSpeed's ``DeepSpeedCPUAdam`` (AdamW mode), which ZeRO-Offload needs."""
    groups = param_groups(model, optim.weight_decay)
    kwargs = {"lr": optim.lr, "betas": tuple(optim.betas), "eps": optim.eps}
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def build_scheduler(
    optimizer: torch.optim.Optimizer, plan: StepPlan, optim: OptimConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with :class:`WarmupCosine`; DeepSpeed steps it once per optimizer step."""
    schedule = WarmupCosine(plan.warmup_steps, plan.total_steps, optim.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
