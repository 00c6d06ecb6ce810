"""Step plan, warm-up + cosine schedule and AdamW parameter groups."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from cellfoundry.config import OptimConfig
from cellfoundry.model import bert_config, build_model
from cellfoundry.train.optim import (
    WarmupCosine,
    build_optimizer,
    build_scheduler,
    param_groups,
    plan_steps,
)


def test_plan_from_max_steps_or_epochs() -> None:
    plan = plan_steps(OptimConfig(max_steps=1000), micro_per_epoch=50)
    assert (plan.total_steps, plan.warmup_steps, plan.steps_per_epoch) == (1000, 7, 50)
    plan = plan_steps(OptimConfig(epochs=2.5, grad_accum=4), micro_per_epoch=100)
    assert plan.total_steps == math.ceil(2.5 * 100 / 4) and plan.steps_per_epoch == 25
    assert plan_steps(OptimConfig(max_steps=1), micro_per_epoch=3).warmup_steps == 0


def test_warmup_then_cosine() -> None:
    f = WarmupCosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    warm = [f(s) for s in range(10)]
    assert warm == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f(10) == pytest.approx(1.0)
    decay = [f(s) for s in range(10, 110)]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert decay[-1] > 0.1  # the last step still learns
    assert f(110) == pytest.approx(0.1)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert WarmupCosine(0, 5)(0) == pytest.approx(1.0)


def test_param_groups_skip_decay_of_biases_and_layernorm() -> None:
    model = build_model(bert_config("tiny", num_hidden_layers=1, hidden_size=64, num_attention_heads=1,
                                    intermediate_size=64, vocab_size=40), seed=0)  # fmt: skip
    decay, no_decay = param_groups(model, 0.044)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.044 and no_decay["weight_decay"] == 0.0
    assert all("bias" in names[id(p)] or "LayerNorm" in names[id(p)] for p in no_decay["params"])
    assert all(
        "bias" not in names[id(p)] and "LayerNorm" not in names[id(p)] for p in decay["params"]
    )
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def test_scheduler_drives_the_optimizer_lr() -> None:
    model = torch.nn.Linear(3, 2)
    optim = OptimConfig(lr=1e-3, warmup_ratio=0.2, max_steps=10)
    opt = build_optimizer(model, optim)
    sched = build_scheduler(opt, plan_steps(optim, micro_per_epoch=100), optim)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3 / 2) and lrs[1] == pytest.approx(1e-3)
    assert lrs[-1] > 0
    assert isinstance(opt, torch.optim.AdamW)
