"""Signed DeepSpeed checkpoints (one CPU process, real DeepSpeed ZeRO-2): a signed checkpoint
resumes exactly; a planted, modified, unsigned or foreign-key one is refused before
DeepSpeed unpickles anything."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from cellfoundry.config import PretrainJobConfig, parse_config
from cellfoundry.integrity import KEY_ENV, key_id, mac_file
from cellfoundry.model import bert_config, build_model
from cellfoundry.train import deepspeed_config, resolve_settings
from cellfoundry.train.checkpoint import (
    DS_DIR,
    load_training_checkpoint,
    save_training_checkpoint,
    sign_training_state,
    step_tag,
)
from cellfoundry.train.objective import MaskedLMObjective
from cellfoundry.train.optim import build_optimizer, build_scheduler, plan_steps
from cellfoundry.train.zero import initialize_engine

VOCAB = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3,
         **{f"ENSG{i:011d}": i for i in range(4, 40)}}  # fmt: skip
STEPS = 3
TAG = step_tag(STEPS)
OPTIM = f"{TAG}/zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def key() -> Iterator[str]:
    """One process as a DeepSpeed world of one (PITFALLS.md), and a key for this module."""
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           KEY_ENV: secrets.token_hex(32)}  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        yield env[KEY_ENV]
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def engine(seed: int) -> Any:
    cfg = parse_config(PretrainJobConfig, {"data": {"tokenized": "/d", "batch_size": 2},
                                           "output_dir": "/o", "optim": {"max_steps": 10}})  # fmt: skip
    config = bert_config("tiny", vocab_size=len(VOCAB), max_position_embeddings=16,
                         hidden_size=32, intermediate_size=64, num_attention_heads=1,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    objective = MaskedLMObjective(build_model(config, seed=seed))
    optimizer = build_optimizer(objective, cfg.optim)
    scheduler = build_scheduler(optimizer, plan_steps(cfg.optim, 10), cfg.optim)
    settings = resolve_settings(cfg, on_gpu=False)
    return initialize_engine(objective, optimizer, scheduler, deepspeed_config(cfg, settings))


def train_step(e: Any, i: int) -> float:
    ids = torch.tensor([[2, 5 + i, 9, 11, 30, 3, 0, 0], [2, 7, 8 + i, 11, 12, 13, 14, 3]])
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    ids = ids.clone()
    ids[:, 2] = 1  # <mask>
    out = e(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels)
    e.backward(out.loss)
    e.step()
    return float(out.loss.detach())


@pytest.fixture(scope="module")
def saved(key: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A checkpoint after STEPS steps and the engine that wrote it."""
    e = engine(seed=0)
    for i in range(STEPS):
        train_step(e, i)
    directory = tmp_path_factory.mktemp("ckpt")
    save_training_checkpoint(e, directory, state={"step": STEPS, "tokens": 42.0},
                             token_dictionary=VOCAB, extra={"step": STEPS}, rank=0)  # fmt: skip
    return directory, e


@pytest.fixture
def ckpt(saved: tuple[Path, Any], tmp_path: Path) -> Path:
    """A copy of the saved checkpoint to tamper with."""
    return Path(shutil.copytree(saved[0], tmp_path / "ckpt"))


class _Exploit:
    """Runs a shell command when unpickled by an unrestricted unpickler (as DeepSpeed's is)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    torch.save({"optimizer_state_dict": _Exploit(marker)}, path)


def test_signed_checkpoint_resumes_exactly(saved: tuple[Path, Any], tmp_path: Path) -> None:
    directory, original = saved
    ds = directory / DS_DIR
    manifest = json.loads((ds / "cellfoundry.hmac.rank0.json").read_text())
    assert manifest["key_id"] == key_id(bytes.fromhex(os.environ[KEY_ENV]))
    assert {"latest", OPTIM, f"{TAG}/mp_rank_00_model_states.pt"} <= set(manifest["files"])
    assert manifest["files"][OPTIM] == mac_file(bytes.fromhex(os.environ[KEY_ENV]), ds, OPTIM)

    resumed = engine(seed=1)
    state = load_training_checkpoint(resumed, directory)
    assert state == {"step": STEPS, "tokens": 42.0}
    assert resumed.global_steps == STEPS and resumed.get_lr() == original.get_lr()
    for p, q in zip(original.module.parameters(), resumed.module.parameters(), strict=True):
        assert torch.equal(p, q)
    # optimizer moments too: the next step is the one the uninterrupted run takes
    assert train_step(resumed, STEPS) == train_step(original, STEPS)
    for p, q in zip(original.module.parameters(), resumed.module.parameters(), strict=True):
        assert torch.equal(p, q)
    # a model artifact's training_state/ (with state.json beside it) loads too
    shutil.copytree(directory / DS_DIR, tmp_path / "model" / "training_state")
    (tmp_path / "model" / "training_state" / "state.json").write_text('{"step": 3}\n')
    assert load_training_checkpoint(engine(seed=2), tmp_path / "model")["step"] == STEPS


def test_replaced_optimizer_state_is_refused_and_never_runs(ckpt: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    planted = ckpt / DS_DIR / OPTIM
    plant(planted, marker)
    with pytest.raises(ValueError, match="HMAC mismatch; it was changed") as err:
        load_training_checkpoint(engine(seed=1), ckpt)
    assert str(planted) in str(err.value)
    assert not marker.exists()
    torch.load(planted, weights_only=False)  # what DeepSpeed would have done: the payload is live
    assert marker.exists()


@pytest.mark.parametrize("forged_manifest", [False, True])
def test_planted_file_is_refused(ckpt: Path, tmp_path: Path, forged_manifest: bool) -> None:
    """A shard file DeepSpeed would read (e.g. with elastic checkpoints) that no rank wrote;
    listing it in a manifest of one's own without the key does not help."""
    marker = tmp_path / "pwned"
    ds = ckpt / DS_DIR
    rel = f"{TAG}/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    plant(ds / rel, marker)
    if forged_manifest:
        forged = {rel: mac_file(b"attacker's own key!", ds, rel)}
        data = json.loads((ds / "cellfoundry.hmac.rank0.json").read_text())
        (ds / "cellfoundry.hmac.rank1.json").write_text(json.dumps({**data, "files": forged}))
    with pytest.raises(ValueError, match="HMAC mismatch" if forged_manifest else "not listed"):
        load_training_checkpoint(engine(seed=1), ckpt)
    assert not marker.exists()


def test_latest_pointing_elsewhere_is_refused(ckpt: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ds = ckpt / DS_DIR
    (ds / "step_99999999").mkdir()
    plant(ds / "step_99999999" / "mp_rank_00_model_states.pt", marker)
    (ds / "latest").write_text("step_99999999")
    with pytest.raises(ValueError, match=f"refusing to load {ds / 'latest'}: HMAC mismatch"):
        load_training_checkpoint(engine(seed=1), ckpt)
    assert not marker.exists()


def test_unsigned_checkpoint_is_refused_until_signed(ckpt: Path) -> None:
    ds = ckpt / DS_DIR
    (ds / "cellfoundry.hmac.rank0.json").unlink()
    with pytest.raises(ValueError, match=r"no HMAC manifest.*sign_training_state") as err:
        load_training_checkpoint(engine(seed=1), ckpt)
    assert str(ds) in str(err.value)
    sign_training_state(ds)  # the owner vouches for it
    assert load_training_checkpoint(engine(seed=1), ckpt)["step"] == STEPS


def test_checkpoint_signed_with_another_key_is_refused(
    ckpt: Path, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = secrets.token_hex(32)
    monkeypatch.setenv(KEY_ENV, other)
    with pytest.raises(ValueError, match="signed with another key") as err:
        load_training_checkpoint(engine(seed=1), ckpt)
    message = str(err.value)
    assert key_id(bytes.fromhex(key)) in message and key_id(bytes.fromhex(other)) in message
    assert KEY_ENV in message and "every node" in message
