"""``cellfoundry evaluate probe``: a linear probe on frozen cell embeddings vs the fine-tuned
classifier vs scikit-learn baselines on raw counts, on the same splits.

Built only from the fine-tuning stage (:mod:`cellfoundry.tune`): the same cell selection,
splits, training loop, baselines, metrics and report; nothing is re-implemented here.
Inputs may be ``s3://`` / ``gs://`` URIs as for fine-tuning; so may ``output_dir``: the
report is written to a local temp folder, then uploaded with ``probe_report.json`` last.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cellfoundry import artifacts, storage
from cellfoundry.config.tune import ProbeConfig
from cellfoundry.tune import METHOD_TITLES, compare, load_finetuned, prepare, write_report
from cellfoundry.tune.models import FINETUNE_FILE
from cellfoundry.tune.remote import local_dir, upload_files

logger = logging.getLogger(__name__)

REPORT_JSON = "probe_report.json"
REPORT_MD = "probe_report.md"


def _load_trained(cfg: ProbeConfig, test_ids: np.ndarray) -> dict[str, Any]:
    """The model of ``cfg.finetuned_dir`` by its mode, after checking it was tested on the
    same cells (its ``splits.json``)."""
    if cfg.finetuned_dir is None:
        return {}
    where = cfg.finetuned_dir
    directory = local_dir(where, "finetuned_dir")
    if not (directory / FINETUNE_FILE).is_file():
        raise ValueError(
            f"finetuned_dir {where}: no {FINETUNE_FILE}; run `cellfoundry finetune` first"
        )
    mode = json.loads((directory / FINETUNE_FILE).read_text())["mode"]
    if mode not in cfg.methods:
        raise ValueError(f"finetuned_dir {where} holds a {mode!r} model: add {mode} to methods")
    splits = json.loads((directory / "splits.json").read_text())
    saved = next(iter(splits.values()), {}).get("test", [])
    if sorted(saved) != sorted(test_ids.tolist()):
        raise ValueError(
            f"finetuned_dir {where} was tested on other cells than this config's first split; "
            "use the same data and split settings as its finetune run"
        )
    return {mode: load_finetuned(directory)}


def _check_output(out: str) -> None:
    """``out`` must be new, empty, or an earlier probe report (never someone's own files)."""
    if storage.is_remote(out):
        children = storage.list_children(out)
        ok = not children or REPORT_JSON in children
    else:
        path = Path(out)
        ok = not path.exists() or (
            path.is_dir() and (not any(path.iterdir()) or (path / REPORT_JSON).is_file())
        )
    if not ok:
        raise artifacts.ArtifactError(
            f"output_dir {out} exists and is not an earlier probe report (no {REPORT_JSON}); "
            "choose another output_dir, or an empty or new folder"
        )


@artifacts.holds_output(None, lambda cfg: cfg.output_dir, object_storage=True)
def run_probe(cfg: ProbeConfig) -> dict[str, Any]:
    """Run every method of ``cfg.methods`` and the baselines on the splits of
    ``cfg.finetune``; write probe_report.json, probe_report.md, confusion_matrix.png and
    roc.png into ``cfg.output_dir`` (new, empty, or an earlier probe report: never into
    someone's own folder). Returns the JSON report (per split and method: test accuracy,
    macro F1, one-vs-rest ROC AUC, per-class report; ``summary`` averages)."""
    _check_output(cfg.output_dir)
    ft = cfg.finetune
    prep = prepare(ft)
    trained = _load_trained(cfg, prep.cells.cell_ids[prep.splits[0].test])
    comparison = compare(ft, cfg.methods, prep=prep, trained=trained)
    main = next((m for m in cfg.methods if m != "probe"), cfg.methods[0])
    notes = [f"pretrained model: `{ft.model.model_dir}`"]
    if cfg.finetuned_dir:
        notes.append(f"{METHOD_TITLES[main]}: `{cfg.finetuned_dir}` (first split)")
    remote = storage.is_remote(cfg.output_dir)
    with tempfile.TemporaryDirectory(prefix="cf-probe-") as tmp:
        folder = Path(tmp) if remote else Path(cfg.output_dir)
        report = write_report(
            comparison, folder, title=f"Probe comparison: {ft.data.label_column}",
            main_method=main, notes=notes, metrics_file=REPORT_JSON, report_file=REPORT_MD,
        )  # fmt: skip
        if remote:  # the JSON last: a reader that sees the new one sees its figures too
            upload_files(folder, cfg.output_dir, last=REPORT_JSON)
    logger.info("probe report written to %s", cfg.output_dir)
    return report
