"""Scale: stage 1 and streaming pretraining at 100k and 1M cells of Genecorpus-like depth.

    .venv/bin/python bench/scale.py      # 1M + 100k cells: estimated 1-2 h on an idle
                                         # 2-core machine (+~15 min to write the corpus once)
    nice -n 10 .venv/bin/python bench/scale.py --cells 4000 --small 1000 \\
        --cells-per-file 1000 --pretrain-steps 3 --batch-size 2   # smoke (5-10 min idle)

Does memory stay flat as the corpus grows 10x, and how close is stage 1 to the I/O floor?

1. Corpus: ``--cells`` synthetic cells (``cellfoundry.corpus.synthetic_scale``: the gene
   panel and cell-type programmes of ``cellfoundry synth``, UMIs drawn per cell so that the
   detected genes per cell are log-normal with mean ``--genes-mean`` 1,400 and sigma
   ``--genes-sigma`` 0.5, like Genecorpus), in gzip-compressed ``.h5ad`` files of
   ``--cells-per-file`` cells (one dataset each), written file by file in bounded memory
   under ``bench/out/scale/`` and reused by later runs. The small corpus is the first
   ``--small / --cells-per-file`` of the same files.
2. For each size (small first), in fresh subprocesses:
   a. read floor: every file's ``X`` (``data``, ``indices``, ``indptr``) read and
      decompressed with h5py in slices, ``--cpus`` processes sharing the files (the same
      cores stage 1 gets); nothing else;
   b. stage 1 (``run_corpus``, exact medians, tokenized V2) with a fresh local Ray cluster
      of ``--cpus`` CPUs (``bench/corpus.py``'s stage run); a thread samples the RSS of the
      driver and of every Ray worker every 0.2 s;
   c. pretraining: the ``tiny`` preset (2 layers, 128 wide, cells up to 4,096 tokens, so
      ~1,400-token cells are not cut), streaming (``cellfoundry.train.stream``), 2 CPU
      workers, ZeRO-2 fp32, batch 8, over that run's tokenized artifact, with a fresh
      cluster, sampled the same way. **Not a full epoch**: one epoch of 1M cells at ~1,400
      tokens would take days on 2 cores (printed, estimated from the measured tokens/s), so
      both sizes run the same ``--pretrain-steps`` optimizer steps: equal work, so the
      memory comparison isolates the corpus size (index, shard count). tokens/s counts real
      (non-pad) tokens of all workers, from the run's metrics rows after the first (which
      holds start-up). A worker's peak RSS there is mostly activations of its longest
      micro-batch (each window runs its longest cells first; padded to up to 4,096 tokens,
      the attention of batch 8 in fp32 takes several GB on CPU, ~6 GB per worker seen in a
      smoke run): both sizes start with such a batch, so the ratio compares like with like,
      but a corpus-size effect smaller than that peak's noise cannot show.
3. Prints the figures, the ratios and the goals (every RSS ratio <= 1.15; stage 1 <= 3x
   the read floor); writes ``bench/results/scale.json`` when the default sizes ran, else
   ``bench/out/results/scale.json``. Ratio keys keep the issue's names
   (``..._1m_vs_100k``) whatever the sizes; ``sizes.*`` records the sizes that ran.
   ``driver.rss_ratio_1m_vs_100k`` compares the larger driver peak of the two stages.

Source files are likely in the page cache for both the floor and the stage (they are
read right after each other): the floor is read + decompression, not disk speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import (
    OUT_DIR,
    RESULTS_DIR,
    MemorySampler,
    command_line,
    device_string,
    format_table,
    timed,
    write_results,
)
from cellfoundry import runtime  # before ray: local clusters listen on 127.0.0.1 only
from corpus import RUNS_DIR, stage_run

DEFAULT_CELLS, DEFAULT_SMALL, DEFAULT_PER_FILE = 1_000_000, 100_000, 50_000
SCALE_DIR = OUT_DIR / "scale"
READ_SLICE = 1 << 22  # elements per h5py read in the floor (16 MiB of int32)
RSS_GOAL, FLOOR_GOAL = 1.15, 3.0


# --------------------------------------------------------------------------------------------
# Read floor (subprocess)
# --------------------------------------------------------------------------------------------


def _read_file(path: str) -> tuple[int, int, int]:
    """Read and decompress all of ``X`` of one h5ad; (cells, non-zeros, decompressed bytes)."""
    import h5py

    with h5py.File(path, "r", locking=False) as h5:
        x = h5["X"]
        indptr = x["indptr"][:]
        nbytes = indptr.nbytes
        for name in ("data", "indices"):
            ds = x[name]
            for start in range(0, ds.shape[0], READ_SLICE):  # bounded memory, every chunk
                nbytes += ds[start : start + READ_SLICE].nbytes
        return len(indptr) - 1, int(indptr[-1]), nbytes


def floor_worker(files: list[str], procs: int, result: str) -> int:
    """``--worker-floor``: read every file with ``procs`` processes; writes ``result`` JSON."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(procs) as pool:
        list(pool.map(len, [[]] * procs))  # start the processes before the clock
        with timed() as t:
            parts = list(pool.map(_read_file, files))
    cells, nnz, nbytes = (sum(p[i] for p in parts) for i in range(3))
    doc = {"s": t["s"], "cells": cells, "nnz": nnz, "bytes": nbytes, "processes": procs}
    Path(result).write_text(json.dumps(doc))
    return 0


# --------------------------------------------------------------------------------------------
# Pretraining (subprocess)
# --------------------------------------------------------------------------------------------


def _tokens_per_s(rows: list[dict[str, str]]) -> float:
    """Real tokens/s of all workers over the metric rows after the first (start-up)."""
    steady = rows[1:] or rows
    tokens = [float(r["tokens"]) for r in rows]
    gained = tokens[-1] - (tokens[0] if len(rows) > 1 else 0.0)
    return gained / sum(float(r["elapsed_s"]) for r in steady)


def pretrain_worker(args: argparse.Namespace) -> int:
    """``--worker-pretrain``: ``run_pretrain`` (tiny, streaming, 2 CPU workers) with a fresh
    local cluster, memory sampled; writes ``--result`` JSON."""
    import pyarrow.parquet as pq
    import ray

    from cellfoundry.config import PretrainJobConfig, parse_config
    from cellfoundry.logs import setup_logging
    from cellfoundry.train.metrics import read_rows
    from cellfoundry.train.trainer import run_pretrain

    setup_logging()
    steps = args.pretrain_steps
    cfg = parse_config(
        PretrainJobConfig,
        {
            "data": {"tokenized": args.tokenized, "batch_size": args.batch_size},
            "output_dir": args.output,
            "model": {"preset": "tiny"},
            "optim": {"max_steps": steps},
            "deepspeed": {"stage": 2, "dtype": "fp32"},
            "scaling": {"num_workers": args.cpus, "resources_per_worker": {"CPU": 1}},
            "checkpoint_every": steps,  # one checkpoint, at the end (outside the timed rows)
            "log_every": max(1, steps // 6),
            "tracking": {"tensorboard": False, "mlflow": False},
            "ray": {"num_cpus": args.cpus, "object_store_memory": 200_000_000},
        },
    )
    shards = sorted(Path(args.tokenized).glob("part-*.parquet"))
    epoch_tokens = sum(
        int(pq.read_table(s, columns=["length"])["length"].to_numpy().sum()) for s in shards
    )
    with MemorySampler(interval=0.2) as mem:
        with timed() as t_init:
            runtime.init_ray(cfg.ray)
        with timed() as t_fit:
            result = run_pretrain(cfg)
    ray.shutdown()
    rows = read_rows(result.metrics_csv)
    doc = {
        "init_s": t_init["s"],
        "fit_s": t_fit["s"],
        "steps": result.steps,
        "final_loss": result.final_loss,
        "tokens": float(rows[-1]["tokens"]) if rows else 0.0,
        "tokens_per_s": _tokens_per_s(rows),
        "epoch_tokens": epoch_tokens,
        "memory": mem.result(),
    }
    Path(args.result).write_text(json.dumps(doc, indent=2))
    return 0


# --------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------


def _subprocess(cmd: list[str], log: Path, timeout: float, what: str) -> bool:
    """Run ``cmd`` in its own session, output to ``log``; False when it ran past ``timeout``."""
    with log.open("w") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # its driver and its raylet
            proc.wait()
            print(f"  {what}: no result after {timeout:.0f} s; stopped (log {log})")
            return False
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise RuntimeError(f"{what} failed (rc {rc}); log {log}:\n{tail}")
    return True


def _retrying(what: str, fn: Callable[[], Any], tries: int = 3) -> Any:
    """``fn()``, run again when its Ray cluster did not start (a busy shared machine's GCS
    or raylet can miss Ray's start-up deadline); any other failure is raised at once."""
    for attempt in range(1, tries + 1):
        try:
            return fn()
        except RuntimeError as e:
            if "timed out during startup" not in str(e) or attempt == tries:
                raise
            print(f"  {what}: the Ray cluster did not start in time; retrying ({attempt}/{tries})")
    raise AssertionError("unreachable")


def read_floor(files: list[Path], procs: int, run_dir: Path) -> dict[str, Any]:
    """Time reading + decompressing ``files`` in a fresh process (and its pool)."""
    result = run_dir / "floor.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-floor", "--result",
           str(result), "--cpus", str(procs), "--files", *map(str, files)]  # fmt: skip
    _subprocess(cmd, run_dir / "floor.log", 3600, "read floor")
    return json.loads(result.read_text())


def pretrain_run(tokenized: Path, run_dir: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    result = run_dir / "pretrain.json"
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker-pretrain",
        "--tokenized", str(tokenized), "--output", str(run_dir / "model"),
        "--result", str(result), "--cpus", str(args.cpus),
        "--pretrain-steps", str(args.pretrain_steps), "--batch-size", str(args.batch_size),
    ]  # fmt: skip
    if not _subprocess(cmd, run_dir / "pretrain.log", args.timeout, "pretraining"):
        return None
    return json.loads(result.read_text())


def run_size(label: str, files: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    """Read floor, stage 1 and pretraining over ``files``; their result dicts."""
    tag = f"scale-{label}-{os.getpid()}"
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    floor_dir = RUNS_DIR / f"{tag}-floor"
    floor_dir.mkdir()
    print(f"[{label}] read floor: {len(files)} files, {args.cpus} processes ...", flush=True)
    floor = read_floor(files, args.cpus, floor_dir)
    print(
        f"  {floor['cells']:,} cells in {floor['s']:.1f} s ({floor['cells'] / floor['s']:,.0f} cells/s)"
    )
    print(f"[{label}] stage 1 (run_corpus, {args.cpus} CPUs) ...", flush=True)
    stage = _retrying(
        "stage 1",
        lambda: stage_run(
            tag,
            files,
            args.cpus,
            rows_per_chunk=args.rows_per_chunk,
            timeout=args.timeout,
            keep=True,
        ),
    )
    run_dir = max(d for d in RUNS_DIR.glob(f"{tag}-*") if d != floor_dir)  # the last try's
    if stage is None:
        raise SystemExit(f"stage 1 at {label} did not finish; see {run_dir / 'log.txt'}")
    print(
        f"  {stage['cells_in']:,} cells in {stage['stage_s']:.1f} s: "
        f"{stage['cells_in'] / stage['stage_s']:,.0f} cells/s; passed {stage['passed']:,}, "
        f"tokenized {stage['tokenized']:,}; peak worker RSS {stage['memory']['worker_rss_mb']:,.0f} MB"
    )
    print(
        f"[{label}] pretraining: tiny, {args.pretrain_steps} steps, {args.cpus} workers ...",
        flush=True,
    )
    pre = _retrying(
        "pretraining", lambda: pretrain_run(run_dir / "artifacts" / "tokenized", run_dir, args)
    )
    if pre is None:
        raise SystemExit(f"pretraining at {label} did not finish; see {run_dir / 'pretrain.log'}")
    print(
        f"  {pre['steps']} steps, {pre['tokens_per_s']:,.0f} tokens/s, peak worker RSS "
        f"{pre['memory']['worker_rss_mb']:,.0f} MB"
    )
    if not args.keep:  # the next size needs the disk (the 1M run's artifacts are tens of GB)
        for sub in ("artifacts", "model", "runs"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
    return {"floor": floor, "stage": stage, "pretrain": pre}


def size_metrics(key: str, r: dict[str, Any], cpus: int) -> dict[str, Any]:
    """Flat figures of one size (``key``: small or large)."""
    fl, st, pre = r["floor"], r["stage"], r["pretrain"]
    m: dict[str, Any] = {
        f"read_floor.{key}.s": round(fl["s"], 2),
        f"read_floor.{key}.cells_per_s": round(fl["cells"] / fl["s"], 1),
        f"read_floor.{key}.decompressed_mb_per_s": round(fl["bytes"] / 2**20 / fl["s"], 1),
        f"corpus.{key}.cells": st["cells_in"],
        f"corpus.{key}.passed": st["passed"],
        f"corpus.{key}.tokenized": st["tokenized"],
        f"corpus.{key}.wall_s": round(st["stage_s"], 1),
        f"corpus.{key}.cells_per_s_per_core": round(st["cells_in"] / st["stage_s"] / cpus, 1),
        f"corpus.{key}.vs_read_floor": round(st["stage_s"] / fl["s"], 2),
        f"corpus.{key}.peak_worker_rss_mb": st["memory"]["worker_rss_mb"],
        f"corpus.{key}.peak_worker_uss_mb": st["memory"]["worker_uss_mb"],
        f"corpus.{key}.peak_driver_rss_mb": st["memory"]["driver_rss_mb"],
        f"corpus.{key}.host_load_1m_mean": st["memory"]["host_load_1m_mean"],
        f"corpus.{key}.artifact_bytes_per_cell": round(
            sum(st["artifact_bytes"].values()) / st["cells_in"], 1
        ),
        f"pretrain.{key}.steps": pre["steps"],
        f"pretrain.{key}.tokens_per_s": round(pre["tokens_per_s"], 1),
        f"pretrain.{key}.fit_s": round(pre["fit_s"], 1),
        f"pretrain.{key}.epoch_tokens": pre["epoch_tokens"],
        f"pretrain.{key}.peak_worker_rss_mb": pre["memory"]["worker_rss_mb"],
        f"pretrain.{key}.peak_driver_rss_mb": pre["memory"]["driver_rss_mb"],
        f"pretrain.{key}.host_load_1m_mean": pre["memory"]["host_load_1m_mean"],
    }
    for sub, secs in st["substages_s"].items():
        m[f"corpus.{key}.{sub}_s"] = round(secs, 1)
    for sub, mm in st["memory_by_substage"].items():
        m[f"corpus.{key}.{sub}.peak_worker_rss_mb"] = mm["worker_rss_mb"]
    return m


def report(m: dict[str, Any], small: dict[str, Any], large: dict[str, Any], cpus: int) -> None:
    """Per-size table, then the issue's figures against their goals."""
    rows = []
    for key, r in (("small", small), ("large", large)):
        rows.append([
            key, r["stage"]["cells_in"], round(r["floor"]["s"], 1), round(r["stage"]["stage_s"], 1),
            m[f"corpus.{key}.cells_per_s_per_core"], m[f"corpus.{key}.vs_read_floor"],
            m[f"corpus.{key}.peak_worker_rss_mb"], m[f"corpus.{key}.peak_driver_rss_mb"],
            m[f"pretrain.{key}.tokens_per_s"], m[f"pretrain.{key}.peak_worker_rss_mb"],
            m[f"pretrain.{key}.peak_driver_rss_mb"],
        ])  # fmt: skip
    print(format_table(rows, [
        "size", "cells", "floor s", "stage 1 s", "cells/s/core", "x floor", "s1 worker MB",
        "s1 driver MB", "pretrain tok/s", "pt worker MB", "pt driver MB",
    ]))  # fmt: skip
    goals = [
        ("corpus.cells_per_s_per_core", None),
        ("corpus.vs_read_floor", FLOOR_GOAL),
        ("corpus.worker_rss_ratio_1m_vs_100k", RSS_GOAL),
        ("driver.rss_ratio_1m_vs_100k", RSS_GOAL),
        ("pretrain.worker_rss_ratio_1m_vs_100k", RSS_GOAL),
        ("pretrain.tokens_per_s", None),
    ]
    print(format_table(
        [[k, m[k], f"<= {g}" if g else "-", ("met" if m[k] <= g else "NOT met") if g else "-"]
         for k, g in goals],
        ["figure", "value", "goal", ""],
    ))  # fmt: skip
    print(
        f"  pretraining ran {m['pretrain.steps']} optimizer steps at both sizes (equal work), "
        f"not an epoch: one epoch of the large corpus ({m['pretrain.large.epoch_tokens']:,} "
        f"tokens) at {m['pretrain.tokens_per_s']:,.0f} tokens/s would take "
        f"~{m['pretrain.epoch_estimate_h']:,.1f} h on {cpus} cores"
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cells", type=int, default=DEFAULT_CELLS, help="large corpus (cells)")
    p.add_argument("--small", type=int, default=DEFAULT_SMALL, help="small corpus (cells)")
    p.add_argument("--cells-per-file", type=int, default=DEFAULT_PER_FILE)
    p.add_argument("--genes-mean", type=float, default=1400.0, help="mean detected genes per cell")
    p.add_argument("--genes-sigma", type=float, default=0.5, help="log-normal sigma of those")
    p.add_argument("--n-genes", type=int, default=20_000, help="gene panel size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gen-procs", type=int, default=2, help="files generated at once")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of each Ray cluster / floor reader")
    p.add_argument("--rows-per-chunk", type=int, default=4096, help="corpus.rows_per_chunk")
    p.add_argument("--pretrain-steps", type=int, default=30, help="optimizer steps per size")
    p.add_argument("--batch-size", type=int, default=8, help="cells per micro-batch per worker")
    p.add_argument("--timeout", type=float, default=7200, help="seconds before a run is stopped")
    p.add_argument("--keep", action="store_true", help="keep the runs' artifacts")
    p.add_argument("--worker-floor", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-pretrain", action="store_true", help=argparse.SUPPRESS)
    for name in ("--result", "--tokenized", "--output"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--files", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    per = args.cells_per_file
    if args.cells % per or args.small % per or not 0 < args.small < args.cells:
        p.error(
            f"--small ({args.small:,}) and --cells ({args.cells:,}) must be multiples of "
            f"--cells-per-file ({per:,}), with 0 < --small < --cells"
        )
    return args


def main() -> int:
    args = parse_args()
    if args.worker_floor:
        return floor_worker(args.files, args.cpus, args.result)
    if args.worker_pretrain:
        return pretrain_worker(args)
    from cellfoundry.corpus.synthetic_scale import ScaleParams, generate_scale_corpus
    from cellfoundry.logs import setup_logging

    setup_logging()
    command, load_start = command_line(), os.getloadavg()[0]
    print(f"device: {device_string()}; load average {load_start:.1f}")
    params = ScaleParams(
        cells_per_file=args.cells_per_file, genes_mean=args.genes_mean,
        genes_sigma=args.genes_sigma, n_genes=args.n_genes, seed=args.seed,
    )  # fmt: skip
    where = SCALE_DIR / (
        f"corpus-c{params.cells_per_file}-g{params.genes_mean:g}-s{params.genes_sigma:g}"
        f"-n{params.n_genes}-seed{params.seed}"
    )
    n_files = args.cells // args.cells_per_file
    print(
        f"corpus: {args.cells:,} cells in {n_files} files of {args.cells_per_file:,} "
        f"(detected genes ~ log-normal, mean {args.genes_mean:g}, sigma {args.genes_sigma:g}) "
        f"in {where}"
    )
    with timed() as t:
        corpus = generate_scale_corpus(where, n_files, params, processes=args.gen_procs)
    print(f"  ready in {t['s']:.1f} s (files written once, then reused)")
    small_files = corpus.files[: args.small // args.cells_per_file]
    res = {
        "small": run_size(f"{args.small // 1000}k", small_files, args),
        "large": run_size(f"{args.cells // 1000}k", corpus.files, args),
    }
    small, large = res["small"], res["large"]
    m: dict[str, Any] = {
        "sizes.small_cells": args.small,
        "sizes.large_cells": args.cells,
        "sizes.cells_per_file": args.cells_per_file,
        "sizes.cpus": args.cpus,
        "corpus.genes_per_cell_mean": round(large["floor"]["nnz"] / large["floor"]["cells"], 1),
        "corpus.source_bytes_per_cell": round(
            sum(f.stat().st_size for f in corpus.files) / args.cells, 1
        ),
    }
    m.update(size_metrics("small", small, args.cpus))
    m.update(size_metrics("large", large, args.cpus))

    def ratio(a: float, b: float) -> float:
        return round(a / b, 3)

    drv = {
        k: max(r["stage"]["memory"]["driver_rss_mb"], r["pretrain"]["memory"]["driver_rss_mb"])
        for k, r in res.items()
    }
    pre_tps = m["pretrain.large.tokens_per_s"]
    m.update({
        "corpus.cells_per_s_per_core": m["corpus.large.cells_per_s_per_core"],
        "corpus.vs_read_floor": m["corpus.large.vs_read_floor"],
        "corpus.worker_rss_ratio_1m_vs_100k": ratio(
            m["corpus.large.peak_worker_rss_mb"], m["corpus.small.peak_worker_rss_mb"]),
        "corpus.driver_rss_ratio_1m_vs_100k": ratio(
            m["corpus.large.peak_driver_rss_mb"], m["corpus.small.peak_driver_rss_mb"]),
        "driver.rss_ratio_1m_vs_100k": ratio(drv["large"], drv["small"]),
        "pretrain.worker_rss_ratio_1m_vs_100k": ratio(
            m["pretrain.large.peak_worker_rss_mb"], m["pretrain.small.peak_worker_rss_mb"]),
        "pretrain.driver_rss_ratio_1m_vs_100k": ratio(
            m["pretrain.large.peak_driver_rss_mb"], m["pretrain.small.peak_driver_rss_mb"]),
        "pretrain.tokens_per_s": pre_tps,
        "pretrain.steps": args.pretrain_steps,
        "pretrain.batch_size": args.batch_size,
        "pretrain.note": "fixed optimizer steps at both sizes, not a full epoch",
        "pretrain.epoch_estimate_h": round(m["pretrain.large.epoch_tokens"] / pre_tps / 3600, 1),
    })  # fmt: skip
    report(m, small, large, args.cpus)
    m["host.loadavg_1m_start"] = round(load_start, 2)
    m["host.loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    full = (args.cells, args.small, args.cells_per_file) == (
        DEFAULT_CELLS, DEFAULT_SMALL, DEFAULT_PER_FILE,
    ) and params == ScaleParams()  # fmt: skip
    results_dir = RESULTS_DIR if full else OUT_DIR / "results"
    path = write_results("scale", m, command=command, results_dir=results_dir)
    print(f"wrote {path}" + ("" if full else " (not the default sizes: not a result)"))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
