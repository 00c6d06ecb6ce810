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
