"""Training checkpoints: DeepSpeed's engine state for exact resume, plus a consolidated
Hugging Face folder that plain ``BertForMaskedLM.from_pretrained`` loads.

Layout of one checkpoint folder (every rank writes its own shard files into its local
folder; Ray Train merges them into one checkpoint):

    ds/latest, ds/<tag>/...   DeepSpeed engine: weights, ZeRO optimizer shards, LR schedule
    ds/cellfoundry.hmac.rank<N>.json
                              HMAC-SHA256 of every file rank N wrote under ds/
    hf/                       config.json, model.safetensors, token_dictionary.json (rank 0)
    state.json                step and counters (rank 0)
    metrics.csv               the metric rows up to this step (rank 0; never unpickled)

DeepSpeed unpickles its files with ``torch.load(weights_only=False)``, so a file planted in
the run storage would run code in every worker that resumes. Each rank therefore signs the
files it wrote (:mod:`cellfoundry.integrity`; the key never goes to the run storage), and
:func:`load_training_checkpoint` loads nothing unless ``latest`` and every file of the tag
folder are listed in the union of the manifests and match.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cellfoundry import integrity
from cellfoundry.model import save_checkpoint

logger = logging.getLogger(__name__)

DS_DIR, HF_DIR, STATE_FILE = "ds", "hf", "state.json"
#: Keys of the loop's state saved in DeepSpeed's client state (DeepSpeed adds its own).
STATE_KEYS = ("step", "tokens")
#: Per-rank HMAC manifests in the DeepSpeed folder (see :mod:`cellfoundry.integrity`).
MANIFEST_PREFIX, MANIFEST_SUFFIX = "cellfoundry.hmac.rank", ".json"


def step_tag(step: int) -> str:
    """DeepSpeed tag (and Ray checkpoint folder suffix) of ``step``."""
    return f"step_{step:08d}"


def save_training_checkpoint(
    engine: Any,
    directory: Path,
    *,
    state: dict[str, Any],
    token_dictionary: dict[str, int],
    extra: dict[str, Any],
    rank: int,
) -> None:
    """Collective: every rank calls it with its own local ``directory``.

    ``state`` (JSON-able: step, counters) goes into DeepSpeed's client state and, on rank 0,
    ``state.json``; ``extra`` into the HF folder's ``cellfoundry.json``. The rank signs the
    DeepSpeed files it wrote with :func:`cellfoundry.integrity.checkpoint_key`.
    """
    engine.save_checkpoint(str(directory / DS_DIR), tag=step_tag(state["step"]), client_state=state)
    sign_training_state(directory / DS_DIR, rank=rank)
    hf_model = engine.module.model
    if engine.zero_optimization_partition_weights():  # ZeRO-3: gather the full weights
        import deepspeed

        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if rank == 0:
                save_checkpoint(
                    hf_model, directory / HF_DIR, token_dictionary=token_dictionary, extra=extra
                )
    elif rank == 0:
        save_checkpoint(
            hf_model, directory / HF_DIR, token_dictionary=token_dictionary, extra=extra
        )
    if rank == 0:
        (directory / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def training_state_dir(checkpoint_dir: Path) -> Path:
    """The DeepSpeed folder of a Ray checkpoint (``ds/``) or of a model artifact
    (``training_state/``)."""
    for name in (DS_DIR, "training_state"):
        if (checkpoint_dir / name / "latest").is_file():
            return checkpoint_dir / name
    raise ValueError(
        f"{checkpoint_dir} holds no DeepSpeed training state (ds/latest or training_state/latest); "
        "pass a checkpoint of a cellfoundry pretraining run or its model artifact"
    )


def _is_manifest(relpath: str) -> bool:
    return relpath.startswith(MANIFEST_PREFIX) and relpath.endswith(MANIFEST_SUFFIX)


def sign_training_state(ds_dir: Path, *, rank: int = 0) -> Path:
    """Sign every file under the DeepSpeed folder ``ds_dir`` into its manifest
    ``cellfoundry.hmac.rank<rank>.json``; returns the manifest's path.

    :func:`save_training_checkpoint` calls it on each rank's own folder. Call it yourself
    only on a folder whose origin you trust (e.g. one written before checkpoints were
    signed): whatever it holds will then be unpickled on resume.
    """
    ds_dir = Path(ds_dir)
    files = [rel for rel in integrity.list_files(ds_dir) if not _is_manifest(rel)]
    name = f"{MANIFEST_PREFIX}{rank}{MANIFEST_SUFFIX}"
    path = integrity.write_manifest(ds_dir, files, name, integrity.checkpoint_key())
    logger.debug("signed %d files of %s into %s", len(files), ds_dir, name)
    return path


def verify_training_state(ds_dir: Path) -> str:
    """Check the DeepSpeed folder ``ds_dir`` before anything in it is unpickled; returns
    the tag that ``latest`` names.

    ``latest`` and every file under the tag folder must be listed in the union of the
    per-rank manifests and match each listing; a listed file that is present elsewhere in
    ``ds_dir`` (e.g. ``zero_to_fp32.py``) must match too, and one listed under the tag
    folder must be present. Raises :class:`~cellfoundry.integrity.IntegrityError` (a
    ``ValueError``) naming the first file that fails.
    """
    ds_dir = Path(ds_dir)
    names = [p.name for p in ds_dir.iterdir() if p.is_file() and _is_manifest(p.name)]
    if not names:
        raise integrity.IntegrityError(
            f"refusing to load {ds_dir}: it has no HMAC manifest ({MANIFEST_PREFIX}<N>"
            f"{MANIFEST_SUFFIX}), and DeepSpeed's files are pickles that can run code. It was "
            "written before checkpoints were signed, or its manifests were removed. If you "
            'trust where it came from, sign it with `python -c "from cellfoundry.train.checkpoint '
            f"import sign_training_state; sign_training_state('{ds_dir}')\"` and resume again"
        )
    signed = integrity.Manifests.read(ds_dir, names, integrity.checkpoint_key())
    latest = (ds_dir / "latest").read_bytes()  # read once: the tag comes from these bytes
    signed.verify_bytes("latest", latest)
    tag = latest.decode(errors="replace").strip()
    if not tag or tag in (".", "..") or "/" in tag or "\\" in tag or not (ds_dir / tag).is_dir():
        raise integrity.IntegrityError(f"{ds_dir / 'latest'} names no tag folder: {tag!r}")
    under_tag = [f"{tag}/{rel}" for rel in integrity.list_files(ds_dir / tag)]
    for rel in under_tag:
        signed.verify_file(rel)
    present = set(under_tag)
    for rel in sorted(signed.listed):
        if rel in present or rel == "latest":
            continue
        if rel.startswith(f"{tag}/"):
            raise integrity.IntegrityError(
                f"{ds_dir / rel} is listed in the HMAC manifests but missing: the checkpoint is "
                "incomplete; resume from an earlier checkpoint"
            )
        if (ds_dir / rel).is_file():
            signed.verify_file(rel)
    return tag


def load_training_checkpoint(engine: Any, checkpoint_dir: Path) -> dict[str, Any]:
    """Restore weights, optimizer, LR schedule and step; returns the saved ``state``.

    The DeepSpeed files are verified first (:func:`verify_training_state`): an unsigned,
    unlisted or modified file raises a ``ValueError`` naming it, and nothing is unpickled.
    """
    ds_dir = training_state_dir(checkpoint_dir)
    tag = verify_training_state(ds_dir)
    path, client_state = engine.load_checkpoint(
        str(ds_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise ValueError(f"DeepSpeed could not load the training state in {ds_dir}")
    state = {k: v for k, v in (client_state or {}).items() if k in STATE_KEYS}
    if "step" not in state:
        raise ValueError(
            f"{ds_dir}: the training state has no step; it was not written by cellfoundry"
        )
    logger.info("resumed from %s at step %d", path, state["step"])
    return state
