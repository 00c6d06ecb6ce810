"""`bench/gpu.sh --cpu-dry-run`: every part of the GPU proof (pretraining with the packed
FlexAttention path, the perturbation screen with FP8, the Serve replica path, the gpu test
collection) runs on CPU at tiny sizes and writes its dry-run figures to bench/out only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from cellfoundry.paths import REPO_ROOT

OUT = REPO_ROOT / "bench" / "out"
#: dry-run file -> keys it must hold (the GPU keys with preset tiny, fp32 on CPU)
EXPECTED = {
    "pretrain_dry.json": [
        "tiny.mfu",
        "tiny.tokens_per_s",
        "tiny.packed.mfu",
        "tiny.packed.tokens_per_s",
        "baseline.tokens_per_s",
    ],
    "perturb_dry.json": [
        "tiny.cells_per_s",
        "baseline.cells_per_s",
        "screen_days_this_device",
        "tiny.fp8.cells_per_s",
        "fp8.cell_cos_max_abs_diff",
        "fp8.cell_cos_median_abs_diff",
        "fp8.shift_rel_err_median",
        "fp8.shift_rel_err_max",
        "tiny.fp32.cells_per_s",
        "tiny.bf16.cells_per_s",
        "precision.bf16_vs_fp32.shift_spearman",
        "precision.bf16_vs_fp32.shift_max_abs_err",
    ],
    "serve_gpu_dry.json": ["tiny.fp32.c1.p50_ms", "tiny.fp32.c1.p99_ms", "tiny.fp32.c8.p99_ms"],
}


def test_gpu_script_cpu_dry_run() -> None:
    results = REPO_ROOT / "bench" / "results"
    before = {p.name: p.stat().st_mtime for p in results.glob("*.json")}
    start = time.time()
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO_ROOT / "platform")}
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "bench" / "gpu.sh"), "--cpu-dry-run"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    for part in ("pretrain", "perturb", "serve", "tests"):
        assert f"=== {part}: ok" in proc.stdout, part
    for name, keys in EXPECTED.items():
        path = OUT / name
        assert path.stat().st_mtime >= start - 1, f"{name} was not written by this run"
        doc = json.loads(path.read_text())
        assert doc["device"].startswith("cpu"), doc["device"]
        missing = [k for k in keys if k not in doc["metrics"]]
        assert not missing, f"{name} lacks {missing}"
    # a dry run never writes bench/results
    after = {p.name: p.stat().st_mtime for p in results.glob("*.json")}
    assert after == before


def test_gpu_script_refuses_a_cpu_run_without_dry_run() -> None:
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "bench" / "gpu.sh")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "--cpu-dry-run" in proc.stderr
