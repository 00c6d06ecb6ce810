"""Stage 2 on a local Ray cluster: 2 CPU workers, DeepSpeed ZeRO, real PBMC tokens
streamed from the shards, 10% of cells held out for validation.

One uninterrupted ZeRO-2 run is the reference: its training and validation losses go down
and its checkpoint loads with plain transformers. A run stopped after 10 steps, resumed,
and hit by a worker failure must reproduce the reference's per-step loss and its
validation losses; ZeRO-1 and ZeRO-3 reproduce its first steps.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from cellfoundry.config import PretrainJobConfig, parse_config
from cellfoundry.integrity import KEY_ENV, KEY_FILE_ENV
from cellfoundry.model import load_model
from cellfoundry.train import FAIL_ONCE_ENV, PretrainResult, run_pretrain
from cellfoundry.train.checkpoint import verify_training_state
from cellfoundry.train.metrics import read_rows

STEPS, CHECKPOINT_EVERY, EVAL_EVERY = 30, 10, 10


@pytest.fixture(scope="module", autouse=True)
def checkpoint_key_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The checkpoint key in a temp file rather than ~/.config: the trainer hands
    CELLFOUNDRY_CHECKPOINT_KEY_FILE on to the workers (the key itself it never forwards)."""
    path = tmp_path_factory.mktemp("key") / "checkpoint.key"
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(KEY_ENV, raising=False)
        mp.setenv(KEY_FILE_ENV, str(path))
        yield path


@pytest.fixture(scope="module")
def tokens(
    ray_local: None,
    real_h5ad: list[Path],
    geneformer_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """pbmc3k tokenized with the real V2 dictionaries at 64 tokens per cell."""
    from cellfoundry.corpus.tokenize_files import tokenize_files

    source = next(p for p in real_h5ad if p.name.startswith("pbmc3k"))
    out = tmp_path_factory.mktemp("pretrain") / "tokenized"
    tokenize_files(
        [str(source)],
        dictionaries=geneformer_dir / "v2",
        mode="v2",
        output=out,
        model_input_size=64,
    )
    return out


def make_cfg(tokens: Path, root: Path, name: str, *overrides: str) -> PretrainJobConfig:
    """A 2-layer, 64-wide BERT on 2 CPU workers (ZeRO-2), 8 cells x 64 tokens per worker."""
    data = {
        "data": {"tokenized": str(tokens), "token_dictionary": "{shared}/geneformer/v2", "max_length": 64, "batch_size": 8,
                 "validation": {"fraction": 0.1, "batches": 2}},
        "model": {"preset": "tiny", "overrides": {"hidden_size": 64, "num_attention_heads": 1, "intermediate_size": 128,
                                                  "max_position_embeddings": 64}},
        "optim": {"lr": 2e-3, "warmup_ratio": 0.1, "max_steps": STEPS},
        "deepspeed": {"stage": 2},
        "scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 1}},
        "checkpoint_every": CHECKPOINT_EVERY,
        "log_every": 1,
        "eval_every": EVAL_EVERY,
        "tracking": {"tensorboard": False, "mlflow": False},
        "output_dir": str(root / name),
    }  # fmt: skip
    return parse_config(PretrainJobConfig, data, list(overrides))


def losses(result: PretrainResult) -> dict[int, dict[str, float]]:
    """Per step: loss, accuracy, lr, and val_loss / val_accuracy where validated."""
    keys = ("loss", "accuracy", "lr", "val_loss", "val_accuracy")
    return {
        int(r["step"]): {k: float(r[k]) for k in keys if r[k]}
        for r in read_rows(result.metrics_csv)
    }


@pytest.fixture(scope="module")
def reference(tokens: Path) -> tuple[PretrainJobConfig, PretrainResult]:
    """The uninterrupted ZeRO-2 run, with TensorBoard and MLflow on."""
    cfg = make_cfg(
        tokens, tokens.parent, "reference", "tracking.tensorboard=true", "tracking.mlflow=true"
    )
    return cfg, run_pretrain(cfg)


def hf_matches_deepspeed_state(hf_dir: Path, ds_dir: Path) -> None:
    """The HF folder loads with plain transformers and gives the logits of the weights that
    DeepSpeed's own training state holds (consolidated by its zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    model = transformers.BertForMaskedLM.from_pretrained(hf_dir).eval()
    state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir))
    reference = transformers.BertForMaskedLM(transformers.BertConfig.from_pretrained(hf_dir)).eval()
    reference.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=True)
    ids = torch.tensor([[2, *range(100, 160), 3], [2, *range(5000, 5060), 3]])
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_smoke_run_learns_and_checkpoint_loads(
    reference: tuple[PretrainJobConfig, PretrainResult],
) -> None:
    cfg, result = reference
    assert result.completed and result.steps == STEPS and result.model_dir is not None
    rows = losses(result)
    assert sorted(rows) == list(range(1, STEPS + 1))
    first = sum(rows[s]["loss"] for s in range(1, 6)) / 5
    last = sum(rows[s]["loss"] for s in range(STEPS - 4, STEPS + 1)) / 5
    assert last < first - 0.3, (first, last)
    assert result.final_loss == pytest.approx(rows[STEPS]["loss"])
    # held-out cells: scored every EVAL_EVERY steps, and the model improves on them too
    val = {step: row["val_loss"] for step, row in rows.items() if "val_loss" in row}
    assert sorted(val) == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    assert val[STEPS] < val[EVAL_EVERY], val
    assert result.final_val_loss == pytest.approx(val[STEPS])

    model_dir = result.model_dir
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["kind"] == "model" and manifest["counts"]["steps"] == STEPS
    counts = manifest["counts"]
    assert 0.05 < counts["validation_cells"] / (counts["cells"] + counts["validation_cells"]) < 0.15
    assert manifest["inputs"]["tokenized"]["path"] == cfg.data.tokenized
    assert {
        "config.json",
        "model.safetensors",
        "token_dictionary.json",
        "metrics.csv",
        "loss_curve.png",
    } <= {p.name for p in model_dir.iterdir()}
    hf_matches_deepspeed_state(model_dir, model_dir / "training_state")
    assert verify_training_state(model_dir / "training_state") == f"step_{STEPS:08d}"
    ours = load_model(model_dir).eval()
    assert ours.config.vocab_size == 20275 and ours.config.hidden_size == 64
    assert list((result.log_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (result.log_dir / "mlflow_run_id").is_file() and (result.log_dir / "mlruns").is_dir()
    # a rerun with the same config and inputs reuses the artifact without training
    again = run_pretrain(cfg)
    assert again.reused and again.final_loss == result.final_loss


def test_resume_and_worker_failure_reproduce_the_reference(
    tokens: Path,
    reference: tuple[PretrainJobConfig, PretrainResult],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, ref = reference
    cfg = make_cfg(tokens, tokens.parent, "interrupted", "stop_at_step=10")
    stopped = run_pretrain(cfg)
    assert not stopped.completed and stopped.steps == 10 and stopped.model_dir is None
    # rerun with the same run name: resumes at step 11; rank 0 dies once before step 25 and
    # FailureConfig restarts the workers from the step-20 checkpoint
    monkeypatch.setenv(FAIL_ONCE_ENV, "25")
    cfg = make_cfg(tokens, tokens.parent, "interrupted", "failure.max_failures=1")
    resumed = run_pretrain(cfg)
    assert (resumed.log_dir / ".failed_once_at_step_25").is_file()
    assert resumed.completed and resumed.steps == STEPS
    got, want = losses(resumed), losses(ref)
    assert sorted(got) == sorted(want)
    for step in want:
        assert sorted(got[step]) == sorted(want[step]), step
        for key in want[step]:  # validation steps included
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5, abs=1e-7), (step, key)


# ZeRO-1 differs from ZeRO-2 least (optimizer states sharded, gradients not): `make test-all`
@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), 3])
def test_zero_stages_match_zero2(
    tokens: Path, reference: tuple[PretrainJobConfig, PretrainResult], stage: int
) -> None:
    """ZeRO-1 and ZeRO-3 (same schedule, stopped after 4 steps) follow the ZeRO-2 run."""
    _, ref = reference
    cfg = make_cfg(
        tokens, tokens.parent, f"zero{stage}", f"deepspeed.stage={stage}", "stop_at_step=4"
    )
    result = run_pretrain(cfg)
    assert result.steps == 4 and result.checkpoint_path is not None
    got, want = losses(result), losses(ref)
    for step in range(1, 5):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-4), step
    checkpoint = Path(result.checkpoint_path)
    hf_matches_deepspeed_state(checkpoint / "hf", checkpoint / "ds")
    shards = {p.name for p in (checkpoint / "ds" / "step_00000004").iterdir()}
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= shards
    # each rank signed the files it wrote; together they cover the merged checkpoint
    manifests = {p.name for p in (checkpoint / "ds").glob("cellfoundry.hmac.rank*.json")}
    assert manifests == {"cellfoundry.hmac.rank0.json", "cellfoundry.hmac.rank1.json"}
    assert verify_training_state(checkpoint / "ds") == "step_00000004"
    if stage == 3:  # parameters are sharded too
        assert {f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)} <= shards


def test_bad_config_fails_before_any_worker_starts(tokens: Path) -> None:
    cfg: Any = make_cfg(tokens, tokens.parent, "bad", "data.max_length=128")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        run_pretrain(cfg)
