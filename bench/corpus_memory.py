"""Stage 1 memory at two corpus sizes: is the peak RSS of the workers and the driver flat?

    .venv/bin/python bench/corpus_memory.py                 # 50k and 200k cells (~5 min, 2 cores)
    .venv/bin/python bench/corpus_memory.py --cells 20000   # 5k and 20k cells (fast check)

The corpus is ``bench/corpus.py``'s (cells resampled from the real ``pbmc_facs`` file, counts
binomially thinned so no two are copies; ``--cells`` in files of ``--cells / 8``), plus, beside
each file, a *copy* dataset holding every ``--copy-every``-th of its cells unchanged: those are
duplicates of cells in another dataset, so the deduplication verifies real candidate groups
(10% of the thinned cells by default). The whole stage (``run_corpus``, exact medians) runs in a
fresh subprocess with a fresh 2-CPU local Ray cluster, once on a quarter of the files and once
on all of them; a thread samples the RSS of the driver and of every Ray worker every 0.2 s, with
peaks per sub-stage (``bench/corpus.py --worker-run``). Writes
``bench/results/corpus_memory.json`` (``--cells`` other than 200,000: ``bench/out/results/``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from _common import OUT_DIR, RESULTS_DIR, command_line, device_string, format_table, write_results
from corpus import CORPUS_DIR, ensure_corpus, size_label, stage_run

DEFAULT_CELLS = 200_000
PHASES = ("cells.probe", "cells.ingest", "cells.dedup", "medians", "tokenized")


def ensure_copies(files: list[Path], every: int) -> list[Path]:
    """Beside each file, a dataset of every ``every``-th of its cells (counts unchanged)."""
    import anndata as ad

    out = []
    for f in files:
        dst = CORPUS_DIR / f"{f.stem}_copy{every}.h5ad"
        if not dst.exists():
            src = ad.read_h5ad(f)
            sub = src[::every].copy()
            tmp = dst.with_suffix(".tmp.h5ad")
            sub.write_h5ad(tmp, compression="gzip")
            os.replace(tmp, dst)
        out.append(dst)
    return out


def run_metrics(r: dict[str, Any], label: str) -> dict[str, Any]:
    """Flat figures of one stage run, names prefixed with its size label."""
    mem, by = r["memory"], r["memory_by_substage"]
    m: dict[str, Any] = {
        f"{label}.cells": r["cells_in"],
        f"{label}.duplicates": r["duplicates"],
        f"{label}.passed": r["passed"],
        f"{label}.wall_s": round(r["stage_s"], 1),
        f"{label}.peak_worker_rss_mb": mem["worker_rss_mb"],
        f"{label}.peak_worker_uss_mb": mem["worker_uss_mb"],
        f"{label}.peak_driver_rss_mb": mem["driver_rss_mb"],
        f"{label}.peak_all_processes_rss_mb": mem["all_rss_mb"],
        f"{label}.host_load_1m_mean": mem["host_load_1m_mean"],
    }
    for phase in PHASES:
        if phase in by:
            m[f"{label}.{phase}.peak_worker_rss_mb"] = by[phase]["worker_rss_mb"]
            m[f"{label}.{phase}.peak_driver_rss_mb"] = by[phase]["driver_rss_mb"]
        if phase in r["substages_s"]:
            m[f"{label}.{phase}.s"] = round(r["substages_s"][phase], 1)
    return m


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cells", type=int, default=DEFAULT_CELLS, help="thinned cells, large run")
    p.add_argument("--copy-every", type=int, default=10, help="copy every n-th cell (duplicates)")
    p.add_argument("--rows-per-chunk", type=int, default=4096)
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--tag", default="", help="suffix of the results file (e.g. 'before')")
    args = p.parse_args()
    files = ensure_corpus(args.cells, 8)
    copies = ensure_copies(files, args.copy_every)
    print(f"device: {device_string()}; load average {os.getloadavg()[0]:.1f}")
    m: dict[str, Any] = {}
    rows = []
    for fs, cs in ((files[:2], copies[:2]), (files, copies)):
        label = size_label(sum(1 for _ in fs) * (args.cells // 8))
        print(f"stage: {len(fs)} files + {len(cs)} copies ({label} thinned cells) ...", flush=True)
        r = stage_run(
            f"memory-{label}", [*fs, *cs], 2, rows_per_chunk=args.rows_per_chunk,
            timeout=args.timeout, keep=False,
        )  # fmt: skip
        if r is None:
            raise SystemExit(f"the {label} run did not finish; see its log under {OUT_DIR}")
        m.update(run_metrics(r, label))
        by = r["memory_by_substage"]
        rows.append([
            label, r["cells_in"], r["duplicates"], round(r["stage_s"], 1),
            r["memory"]["worker_rss_mb"], r["memory"]["worker_uss_mb"], r["memory"]["driver_rss_mb"],
            *(by.get(ph, {}).get("worker_rss_mb", "-") for ph in PHASES),
            r["memory"]["host_load_1m_mean"],
        ])  # fmt: skip
    print(
        format_table(
            rows,
            [
                "run", "cells", "duplicates", "wall s", "worker RSS MB", "worker USS MB",
                "driver RSS MB", *(f"{ph} worker MB" for ph in PHASES), "host load",
            ],
        )
    )  # fmt: skip
    small, big = (size_label(n * (args.cells // 8)) for n in (2, 8))
    m["peak_worker_rss_ratio"] = round(
        m[f"{big}.peak_worker_rss_mb"] / m[f"{small}.peak_worker_rss_mb"], 3
    )
    m["peak_driver_rss_ratio"] = round(
        m[f"{big}.peak_driver_rss_mb"] / m[f"{small}.peak_driver_rss_mb"], 3
    )
    results_dir = RESULTS_DIR if args.cells == DEFAULT_CELLS else OUT_DIR / "results"
    stage = f"corpus_memory{'_' + args.tag if args.tag else ''}"
    path = write_results(stage, m, command=command_line(), results_dir=results_dir)
    print(f"peak worker RSS ratio {big}/{small}: {m['peak_worker_rss_ratio']}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
