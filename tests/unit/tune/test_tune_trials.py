"""Trial checkpoints: weights, optimizer, scheduler and epoch round-trip through
``torch.load(weights_only=True)``; a planted pickle is refused and never runs."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import transformers

from cellfoundry.train.optim import param_groups
from cellfoundry.tune.loop import TrainState
from cellfoundry.tune.trials import STATE_FILE, load_trial_state, save_trial_state

IDS = torch.tensor([[2, 5, 9, 11, 30, 3, 0, 0], [2, 7, 8, 11, 12, 13, 14, 3]])
BATCH = {"input_ids": IDS, "attention_mask": (IDS != 0).long(), "labels": torch.tensor([1, 0])}


def classifier(seed: int) -> transformers.BertForSequenceClassification:
    """A tiny cell classifier with frozen embeddings (as ``freeze_layers`` does)."""
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, num_labels=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(config)
    model.bert.embeddings.requires_grad_(False)
    return model


def optimizer_and_scheduler(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, object]:
    """As :func:`cellfoundry.tune.loop.train_classifier` builds them."""
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]}
              for g in param_groups(model, 0.01)]  # fmt: skip
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    scheduler = transformers.get_scheduler(
        "linear", optimizer, num_warmup_steps=2, num_training_steps=10
    )
    return optimizer, scheduler


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: object) -> float:
    loss = model(**BATCH).loss
    loss.backward()
    optimizer.step()
    scheduler.step()  # type: ignore[attr-defined]
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def test_round_trip_restores_weights_optimizer_scheduler_and_epoch(tmp_path: Path) -> None:
    model = classifier(seed=0)
    optimizer, scheduler = optimizer_and_scheduler(model)
    for _ in range(3):
        step(model, optimizer, scheduler)
    state = TrainState(epoch=2, step=3, optimizer=optimizer.state_dict(),
                       scheduler=scheduler.state_dict())  # fmt: skip
    path = tmp_path / STATE_FILE
    save_trial_state(model, state, path)
    saved = torch.load(path, weights_only=True)["weights"]  # plain tensors and values only
    assert saved and not [n for n in saved if n.startswith("bert.embeddings.")]  # frozen

    fresh = classifier(seed=1)
    loaded = load_trial_state(fresh, path)
    assert (loaded.epoch, loaded.step) == (2, 3)
    assert not torch.equal(fresh.classifier.weight, classifier(seed=1).classifier.weight)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q) or not p.requires_grad, name
    fresh.bert.embeddings.load_state_dict(model.bert.embeddings.state_dict())
    opt2, sched2 = optimizer_and_scheduler(fresh)
    opt2.load_state_dict(loaded.optimizer)
    sched2.load_state_dict(loaded.scheduler)
    assert sched2.get_last_lr() == scheduler.get_last_lr()
    # the next step is the one the uninterrupted run takes
    assert step(fresh, opt2, sched2) == step(model, optimizer, scheduler)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


class _Exploit:
    """Runs a shell command when unpickled by an unrestricted unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_planted_pickle_is_refused_and_never_runs(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    payload = {"weights": {}, "epoch": _Exploit(marker), "step": 0, "optimizer": None,
               "scheduler": None}  # fmt: skip
    path = tmp_path / STATE_FILE
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))  # the protocol torch.load expects
    with pytest.raises(ValueError, match=r"refusing to load the trial state .*system") as err:
        load_trial_state(classifier(seed=0), path)
    assert str(path) in str(err.value) and "weights_only=False" not in str(err.value)
    assert not marker.exists()
