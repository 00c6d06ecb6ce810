"""The table ``bench/gpu.sh`` ends with: the headline figures of its three results files,
and whether each key the GPU issue asks for is there.

    python bench/_gpu_summary.py DRY [SINCE]

``DRY`` 1 reads the dry-run files (``bench/out/<stage>_dry.json``, preset tiny, fp32 on
CPU), 0 the results (``bench/results/<stage>.json``). Files written before ``SINCE`` (epoch
seconds: when gpu.sh started) count as missing, so an earlier run is never reported as
this one's. Exits 1 when a required key is missing.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from _common import OUT_DIR, RESULTS_DIR, format_table

#: stage -> the keys the issue lists (GPU names); alternatives separated by "|"
REQUIRED = {
    "pretrain": ["gf-104m.mfu", "gf-316m.mfu", "gf-316m.tokens_per_s", "baseline.tokens_per_s"],
    "perturb": ["gf-316m.cells_per_s", "baseline.cells_per_s", "screen_h100_days|screen_gpu_days"],
    "serve_gpu": ["gf-104m.bf16.c1.p50_ms", "gf-104m.bf16.c1.p99_ms", "gf-104m.bf16.c8.p99_ms"],
}
#: shown when present, not required
EXTRA = {
    "pretrain": [
        "gf-104m.packed.mfu",
        "gf-316m.packed.mfu",
        "gf-316m.packed.tokens_per_s",
        "baseline.mfu",
    ],
    "perturb": [
        "gf-316m.fp8.cells_per_s",
        "fp8.screen_h100_days|fp8.screen_gpu_days",
        "fp8.cell_cos_max_abs_diff",
        "fp8.cell_cos_median_abs_diff",
        "fp8.shift_rel_err_median",
        "fp8.shift_rel_err_max",
        "fp8.not_run",
    ],
    "serve_gpu": [
        "gf-104m.bf16.c8.p50_ms",
        "gf-104m.bf16.c1.requests_per_s",
        "gf-104m.bf16.c8.requests_per_s",
    ],
}


def dry_name(key: str) -> str:
    """A GPU key as the CPU dry run writes it (preset tiny, fp32, screen days on this CPU)."""
    key = key.replace("gf-104m", "tiny").replace("gf-316m", "tiny").replace(".bf16.", ".fp32.")
    return key.replace("screen_h100_days|screen_gpu_days", "screen_days_this_device")


def load(stage: str, dry: bool, since: float) -> dict[str, Any] | None:
    """The stage's results document, or None when missing or older than ``since``."""
    path = OUT_DIR / f"{stage}_dry.json" if dry else RESULTS_DIR / f"{stage}.json"
    if not path.is_file() or path.stat().st_mtime < since:
        return None
    return json.loads(path.read_text())


def lookup(metrics: dict[str, Any], key: str) -> tuple[str, Any] | None:
    """The first of ``key``'s alternatives present in ``metrics``."""
    for alt in key.split("|"):
        if alt in metrics:
            return alt, metrics[alt]
    return None


def main(argv: list[str]) -> int:
    dry = argv[1:2] == ["1"]
    since = float(argv[2]) if len(argv) > 2 else 0.0
    rows: list[list[Any]] = []
    missing: list[str] = []
    devices = set()
    for stage, required in REQUIRED.items():
        doc = load(stage, dry, since)
        metrics = doc["metrics"] if doc else {}
        if doc:
            devices.add(doc["device"])
        seen = set()  # the dry run names both presets tiny: show each key once
        for key in [*required, *EXTRA[stage]]:
            name = dry_name(key) if dry else key
            if name in seen:
                continue
            seen.add(name)
            hit = lookup(metrics, name)
            if hit is None:
                if key in required:
                    missing.append(f"{stage}: {name}")
                    rows.append([stage, name, "MISSING"])
                continue
            value = hit[1]
            rows.append([stage, hit[0], f"{value:.4g}" if isinstance(value, float) else value])
    print()
    print("dry run (CPU, tiny sizes; not results)" if dry else "results (bench/results)")
    for device in sorted(devices):
        print(f"device: {device}")
    print(format_table(rows, ["stage", "metric", "value"]))
    if missing:
        print(f"missing: {', '.join(missing)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
