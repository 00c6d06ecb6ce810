"""``cellfoundry demo --output ROOT``: every smoke config's output moves under ROOT."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from cellfoundry import demo


def test_output_root_rewrites_every_smoke_path_and_cleans_up(tmp_path: Path) -> None:
    demo._reset_root("s3://bucket/demo")
    try:
        for stage, name in [("pretrain", "smoke"), ("tune", "smoke"), ("embed", "smoke"),
                            ("evaluate", "probe-smoke"), ("corpus", "smoke")]:  # fmt: skip
            path = Path(demo._config(stage, name))
            text = path.read_text()
            assert demo.SMOKE_PREFIX not in text, (stage, name)
            assert "s3://bucket/demo/" in text or "s3://bucket/demo\n" in text
            yaml.safe_load(text)  # still valid YAML
        assert demo.demo_root() == "s3://bucket/demo"
        written = path
    finally:
        demo._reset_root(None)
    assert not written.exists()  # the rewritten configs are removed with the demo
    assert demo._config("embed") == str(demo.CONFIGS / "embed" / "smoke.yaml")
    assert demo.demo_root() == str(demo.SMOKE)


def test_outputs_lists_artifacts_and_pictures_but_not_work_folders(tmp_path: Path) -> None:
    for d in ("model", "eval/masked", "_work/x"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "manifest.json").write_text(json.dumps({}))
    (tmp_path / "eval" / "masked" / "curve.png").write_bytes(b"png")
    found = demo.outputs(tmp_path)
    assert found["artifacts"] == [str(tmp_path / "eval/masked"), str(tmp_path / "model")]
    assert found["pictures"] == [str(tmp_path / "eval/masked/curve.png")]


def _summary(root: str) -> dict:
    return {
        "data": "../shared/data",
        "seconds": {"corpus": 81.8, "pretrain": 92.5, "evaluate masked": 1.7, "serve": 34.6},
        "steps": {
            "corpus": {
                "counts": {
                    "cells_in": 9568,
                    "passed": 8366,
                    "duplicates": 954,
                    "tokenized": {"cells": 8366, "tokens": 7336166, "shards": 10},
                }
            },
            "pretrain": {"final_loss": 8.68857, "steps": 300, "completed": True},
            "evaluate_masked": {
                "n_cells": 97,
                "model_accuracy_mean": 0.0033,
                "baseline_accuracy_mean": 0.0011,
                "reused": False,
            },
            "serve": {"url": "http://127.0.0.1:8000"},  # an answer missing its figures
        },
        "output": root,
        "artifacts": [f"{root}/model", f"{root}/cells"],
        "pictures": [f"{root}/model/loss_curve.png", "s3://elsewhere/umap.png"],
    }


def test_summary_text_is_short_and_human(tmp_path: Path) -> None:
    """`cellfoundry demo` ends with this instead of ~330 lines of JSON: one line per step
    (seconds, key figures), the pictures relative to the output root, the JSON's path."""
    text = demo.summary_text(_summary(str(tmp_path)))
    lines = text.splitlines()
    assert lines[0] == f"demo over ../shared/data: 4 steps in 3.5 min; outputs under {tmp_path}"
    corpus, pretrain, masked, serve = lines[1:5]
    assert corpus.split()[:3] == ["corpus", "82", "s"]
    assert "8,366 of 9,568 cells passed QC (954 duplicates)" in corpus and "10 shards" in corpus
    assert pretrain.endswith("300 steps, final masked-gene loss 8.689")
    assert masked.split()[:4] == ["evaluate", "masked", "2", "s"] and "vs rank baseline" in masked
    assert serve.endswith("done (see the JSON summary)")  # a missing figure never fails the end
    assert lines[5:8] == ["pictures (2):", "  model/loss_curve.png", "  s3://elsewhere/umap.png"]
    assert lines[-1] == f"artifacts: 2; everything in {tmp_path / 'demo_summary.json'}"
    assert len(lines) == 9 and "{" not in text  # no JSON on the console


def test_summary_text_says_when_a_step_reused_its_artifact(tmp_path: Path) -> None:
    summary = _summary(str(tmp_path))
    summary["steps"]["pretrain"]["reused"] = True
    assert "reused (same config and inputs)" in demo.summary_text(summary).splitlines()[2]
    assert demo.summary_path(summary) == str(tmp_path / demo.SUMMARY_FILE)
