"""Stage 1 (corpus) benchmark: rank value encoding vs the reference per-cell loop, whole stage.

    .venv/bin/python bench/corpus.py                       # 200,000 cells (~6-7 min on 2 cores)
    .venv/bin/python bench/corpus.py --cells 20000 --quick # fast check

1. Corpus: ``--files`` h5ad files (default 8 x 25,000 = 200,000 cells) resampled with
   replacement from the real ``pbmc_facs`` file (CSR int32, gzip like the source, its var
   with ``ensembl_id``, unique obs names) under bench/out/corpus/ (reused when present).
   Each resampled cell's counts are binomially thinned (each count c -> Binomial(c, 0.9),
   zeros dropped) so copies of one source cell are distinct cells: without it the stage's
   deduplication would drop every copy.
2. Encoding, one process (= per core), on the first ``--encode-cells`` cells of file 0 held
   in memory (no I/O in either timing), Geneformer V2 dictionaries: (a) ``RankEncoder.encode``
   on CSR batches of 4,096 cells (timed without and with the column remap that precedes it),
   (b) the reference tokenizer's loop (chunks of 512 cells, dense normalisation, then one
   argsort per cell), written out below. Both must give identical tokens on cells whose scores
   hold no ties (the reference breaks ties arbitrarily, the encoder by token id).
3. Whole stage (``run_corpus``: catalog, ingest, QC, dedup, exact medians, vocabulary,
   tokenized V2) in fresh subprocesses (``--worker-run``), each with a fresh local Ray cluster
   and a fresh output dir: 2 CPUs and 1 CPU on the whole corpus, and 2 CPUs on a quarter of
   it. A thread samples the RSS of the driver and of every Ray worker every 0.2 s.
4. Prints a table; writes bench/results/corpus.json (``--quick``: bench/out/results/).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from _common import (
    OUT_DIR,
    RESULTS_DIR,
    BackgroundLoop,
    MemorySampler,
    command_line,
    device_string,
    format_table,
    is_ray_worker,
    timed,
    write_results,
)
from cellfoundry import runtime  # before ray: local clusters listen on 127.0.0.1 only
from cellfoundry.paths import shared_path

SOURCE = "data/h5ad/pbmc_facs_zheng2017_3874cells.h5ad"
DICTIONARIES = "geneformer/v2"
THIN_P = 0.9  # binomial thinning of each resampled cell's counts
ENCODE_BATCH = 4096
REFERENCE_CHUNK = 512  # the reference tokenizer's chunk_size
TARGET_SUM = 10_000
OBJECT_STORE_BYTES = 1_000_000_000
CORPUS_DIR = OUT_DIR / "corpus"
RUNS_DIR = OUT_DIR / "runs"


# --------------------------------------------------------------------------------------------
# 1. The resampled corpus
# --------------------------------------------------------------------------------------------


def _write_file(path: Path, n_cells: int, seed: int) -> None:
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    src = ad.read_h5ad(shared_path(SOURCE))
    x = sp.csr_matrix(src.X)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, src.n_obs, n_cells)
    sub = x[rows]
    sub.data = rng.binomial(sub.data.astype(np.int64), THIN_P).astype(np.int32)
    sub.eliminate_zeros()
    sub = sp.csr_matrix(sub, dtype=np.int32)
    obs = src.obs.iloc[rows][["barcode", "celltype", "split"]].copy()
    obs.index = [f"{name}-s{seed}-{i}" for i, name in enumerate(src.obs_names[rows])]
    adata = ad.AnnData(X=sub, obs=obs, var=src.var[["ensembl_id", "gene_symbol"]].copy())
    tmp = path.with_suffix(".tmp.h5ad")
    adata.write_h5ad(tmp, compression="gzip")
    os.replace(tmp, path)


def ensure_corpus(n_cells: int, n_files: int) -> list[Path]:
    """The resampled files (``ceil(n_cells / n_files)`` cells each); written once, then reused."""
    per_file = math.ceil(n_cells / n_files)
    CORPUS_DIR.mkdir(parents=True, exist_ok=True)
    files = [CORPUS_DIR / f"pbmc_facs_x{per_file}_{i:03d}.h5ad" for i in range(n_files)]
    for i, f in enumerate(files):
        if not f.exists():
            with timed() as t:
                _write_file(f, per_file, seed=per_file * 1000 + i)
            print(
                f"  wrote {f.relative_to(OUT_DIR.parent.parent)} ({per_file:,} cells, {t['s']:.1f} s)"
            )
    return files


def write_catalog(files: list[Path], path: Path) -> Path:
    """A catalog YAML listing ``files`` as separate datasets (no DOI: none is a duplicate)."""
    import yaml

    rows = [
        {"id": f.stem, "uri": str(f), "organ": "blood", "metadata": {"cell_type": "celltype"}}
        for f in files
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"datasets": rows}, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------
# 2. Encoding: the vectorised encoder vs the reference tokenizer's per-cell loop
# --------------------------------------------------------------------------------------------


def rank_genes(gene_vector, gene_tokens):
    """The reference tokenizer's ``rank_genes``: tokens by descending normalised expression."""
    import numpy as np

    sorted_indices = np.argsort(-gene_vector)
    return gene_tokens[sorted_indices]


def reference_tokenize(
    x, n_counts, coding_loc, norm_factor_vector, gene_tokens, max_genes, cls_id, eos_id
):
    """The Geneformer reference tokenizer's loop (``tokenize_anndata`` + V2 special tokens).

    ``x``: scipy CSR cells x file genes; ``coding_loc``: file columns in the vocabulary;
    ``norm_factor_vector`` / ``gene_tokens``: their medians and tokens.
    """
    import numpy as np
    import scipy.sparse as sp

    tokenized_cells = []
    for i in range(0, x.shape[0], REFERENCE_CHUNK):
        idx = slice(i, i + REFERENCE_CHUNK)
        n_counts_chunk = n_counts[idx][:, None]
        X_view0 = x[idx, :]
        X_view = X_view0[:, coding_loc]
        X_norm = X_view / n_counts_chunk * TARGET_SUM / norm_factor_vector
        X_norm = sp.csr_matrix(X_norm)
        tokenized_cells += [
            rank_genes(X_norm[j].data, gene_tokens[X_norm[j].indices])
            for j in range(X_norm.shape[0])
        ]
    # tokenize_dataset (special_token=True): truncate to model_input_size - 2, add <cls>/<eos>.
    out = []
    for cell in tokenized_cells:
        cell = cell[0:max_genes]
        cell = np.insert(cell, 0, cls_id)
        cell = np.append(cell, eos_id)
        out.append(cell)
    return out


def bench_encoding(path: Path, n_cells: int, repeats: int) -> dict[str, Any]:
    """Cells/s of the encoder and the reference loop on the same cells, and their agreement."""
    import numpy as np
    import scipy.sparse as sp

    from cellfoundry.corpus import sources
    from cellfoundry.corpus.cells import remap_csr
    from cellfoundry.corpus.tokenize_files import DictionaryGenes

    info = sources.probe(str(path))
    n_cells = min(n_cells, info.n_cells)
    chunk = sources.read_chunk(str(path), info.format, 0, n_cells)
    dg = DictionaryGenes.load(shared_path(DICTIONARIES), "v2")
    enc = dg.encoder
    col_map, _ = dg.column_map(info.gene_names, info.gene_id_kind, None)
    n_counts = np.add.reduceat(chunk.data.astype(np.float64), chunk.indptr[:-1])
    n_counts[np.diff(chunk.indptr) == 0] = 0
    x = sp.csr_matrix(
        (chunk.data.astype(np.int32), chunk.indices, chunk.indptr), shape=(n_cells, info.n_genes)
    )
    n_enc = len(enc.token_ids)
    batches = [(s, min(s + ENCODE_BATCH, n_cells)) for s in range(0, n_cells, ENCODE_BATCH)]

    def remap(s: int, t: int):
        ptr = chunk.indptr[s : t + 1] - chunk.indptr[s]
        sl = slice(chunk.indptr[s], chunk.indptr[t])
        return remap_csr(ptr, chunk.indices[sl], chunk.data[sl], col_map, n_enc)

    remapped = [remap(s, t) for s, t in batches]

    def run_encode():
        return [
            enc.encode(p, i, c, n_counts[s:t])
            for (p, i, c), (s, t) in zip(remapped, batches, strict=True)
        ]

    def run_remap_encode():
        return [enc.encode(*remap(s, t), n_counts[s:t]) for s, t in batches]

    # The reference's sum_ensembl_ids step (once, untimed: a favour to the reference): file
    # columns that collapse to one vocabulary gene are summed; other columns are kept.
    loc = np.flatnonzero(col_map >= 0)
    genes, inverse = np.unique(col_map[loc], return_inverse=True)
    onehot = sp.csr_matrix(
        (np.ones(len(loc), np.int32), (np.arange(len(loc)), inverse)), shape=(len(loc), len(genes))
    )
    x_ref = sp.hstack([x[:, loc] @ onehot, x[:, np.flatnonzero(col_map < 0)]], format="csr")
    coding_loc = np.arange(len(genes))
    norm_factor_vector = enc.medians[genes]
    gene_tokens = enc.token_ids[genes]

    def run_reference():
        return reference_tokenize(
            x_ref,
            n_counts,
            coding_loc,
            norm_factor_vector,
            gene_tokens,
            enc.max_genes,
            enc.cls_id,
            enc.eos_id,
        )

    times: dict[str, list[float]] = {"encode": [], "remap_encode": [], "reference": []}
    encoded = reference = None
    for _ in range(repeats):  # interleaved, so background load hits all three alike
        with timed() as t:
            encoded = run_encode()
        times["encode"].append(t["s"])
        with timed() as t:
            run_remap_encode()
        times["remap_encode"].append(t["s"])
        with timed() as t:
            reference = run_reference()
        times["reference"].append(t["s"])
    assert encoded is not None and reference is not None

    # Agreement: identical tokens wherever the cell's scores hold no ties.
    ours = [tok[off[i] : off[i + 1]] for off, tok in encoded for i in range(len(off) - 1)]
    # The reference's scores, computed sparsely (same operations in the same order).
    xs = sp.csr_matrix(x_ref[:, coding_loc])
    row_of = np.repeat(np.arange(n_cells), np.diff(xs.indptr))
    scores_all = xs.data / n_counts[row_of] * TARGET_SUM / norm_factor_vector[xs.indices]
    no_ties = identical_no_ties = identical_ties = 0
    for i in range(n_cells):
        scores = scores_all[xs.indptr[i] : xs.indptr[i + 1]]
        tied = len(np.unique(scores)) < len(scores)
        same = np.array_equal(ours[i], reference[i])
        if tied:
            identical_ties += same
        else:
            no_ties += 1
            identical_no_ties += same
    if identical_no_ties != no_ties:
        raise AssertionError(
            f"encoder and reference disagree on {no_ties - identical_no_ties} of {no_ties} cells without ties"
        )
    med = {k: float(np.median(v)) for k, v in times.items()}
    genes_per_cell = float(np.mean(np.diff(chunk.indptr)))
    return {
        "cells": n_cells,
        "repeats": repeats,
        "genes_per_cell": genes_per_cell,
        "encode_s": med["encode"],
        "remap_encode_s": med["remap_encode"],
        "reference_s": med["reference"],
        "cells_no_ties": no_ties,
        "identical_no_ties": identical_no_ties,
        "cells_with_ties": n_cells - no_ties,
        "identical_with_ties": int(identical_ties),
        "vocab_columns": len(coding_loc),
        "duplicate_vocab_columns": int(len(coding_loc) - len(np.unique(col_map[coding_loc]))),
    }


# --------------------------------------------------------------------------------------------
# 3. The whole stage, in a subprocess with its own Ray cluster
# --------------------------------------------------------------------------------------------


def _wrap_stages(timings: dict[str, float], mem: MemorySampler) -> None:
    """Time run_corpus's sub-stages (and attribute memory to them) by wrapping the module
    functions it calls; names that no longer exist are skipped."""
    from cellfoundry.corpus import dedup, pipeline, vocab_stage

    targets = [
        (pipeline, "_catalog_stage", "catalog"),
        (pipeline, "_probe_all", "cells.probe"),
        (pipeline, "_ingest", "cells.ingest"),
        (dedup, "find_duplicates", "cells.dedup"),
        (pipeline, "_cells_stage", "cells"),
        (vocab_stage, "medians_stage", "medians"),
        (vocab_stage, "vocabulary_stage", "vocabulary"),
        (vocab_stage, "tokenized_stage", "tokenized"),
    ]
    for module, name, label in targets:
        fn = getattr(module, name, None)
        if fn is None:
            continue

        def wrapper(*a: Any, _fn: Any = fn, _label: str = label, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                with mem.in_phase(_label):
                    return _fn(*a, **k)
            finally:
                timings[_label] = timings.get(_label, 0.0) + time.perf_counter() - start

        setattr(module, name, wrapper)


class WorkerPinner(BackgroundLoop):
    """Pins every thread of every Ray worker this driver's cluster starts to ``cores``
    (re-applied 10x/s, so new workers and threads are caught within 0.1 s).

    The control plane (GCS, raylet) and the driver keep every core: pinned with the workers
    onto one busy core, the raylet missed heartbeats and the node was declared dead.
    """

    def __init__(self, cores: list[int]) -> None:
        import psutil

        self.cores, self.me, self.error = set(cores), psutil.Process(os.getpid()), psutil.Error
        self.interval = 0.1

    def tick(self) -> None:
        for proc in self.me.children(recursive=True):
            if not is_ray_worker(proc):
                continue
            try:
                threads = [t.id for t in proc.threads()]
            except self.error:
                continue
            for tid in threads:  # sched_setaffinity(pid) alone pins only the main thread
                try:
                    if os.sched_getaffinity(tid) != self.cores:
                        os.sched_setaffinity(tid, self.cores)
                except OSError:
                    continue


def worker_run(args: argparse.Namespace) -> int:
    """``--worker-run``: one run_corpus with a fresh local cluster; writes ``--result`` JSON."""
    import ray

    from cellfoundry.config import CorpusJobConfig, parse_config
    from cellfoundry.corpus.pipeline import run_corpus
    from cellfoundry.logs import setup_logging

    setup_logging()
    cfg = parse_config(
        CorpusJobConfig,
        {
            "corpus": {
                "catalog": args.catalog,
                "output_dir": args.output,
                "rows_per_chunk": args.rows_per_chunk,
                # the distributed dedup and medians that scale, whatever the size measured
                "single_task_max_cells": 0,
                "medians": {"method": "exact"},
                "tokenize": {"mode": "v2"},
            },
            "ray": {"num_cpus": args.num_cpus, "object_store_memory": args.object_store},
        },
    )
    if Path(cfg.corpus.output_dir).exists():
        raise SystemExit(
            f"{cfg.corpus.output_dir} exists: a benchmark run needs a fresh output dir"
        )
    timings: dict[str, float] = {}
    pin = sorted(os.sched_getaffinity(0))[: args.pin_cores] if args.pin_cores else None
    with MemorySampler(interval=0.2) as mem, WorkerPinner(pin) if pin else nullcontext():
        _wrap_stages(timings, mem)
        with timed() as t_init:
            runtime.init_ray(cfg.ray)
            runtime.configure_data_context()
        ray.data.DataContext.get_current().enable_progress_bars = False
        with timed() as t_stage:
            result = run_corpus(cfg.corpus)
    ray.shutdown()
    counts = result.counts
    doc = {
        "num_cpus": args.num_cpus,
        "cores": args.pin_cores or args.num_cpus,
        "init_s": t_init["s"],
        "stage_s": t_stage["s"],
        "cells_in": counts["cells_in"],
        "passed": counts["passed"],
        "duplicates": counts["duplicates"],
        "tokenized": counts["tokenized"]["cells"],
        "substages_s": timings,
        "memory": mem.result(),
        "memory_by_substage": mem.phase_result(),
        "samples": mem.samples,
    }
    Path(args.result).write_text(json.dumps(doc, indent=2))
    return 0


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def artifact_bytes(root: Path) -> dict[str, int]:
    """Bytes on disk of each artifact of a run (``tokenized.hf``: the datasets copy, apart)."""
    sizes = {d.name: _du(d) for d in sorted(root.iterdir()) if d.is_dir()}
    if "tokenized" in sizes:
        sizes["tokenized.hf"] = _du(root / "tokenized" / "hf")
        sizes["tokenized"] -= sizes["tokenized.hf"]
    return sizes


def stage_run(
    label: str,
    files: list[Path],
    num_cpus: int,
    *,
    pin_cores: int = 0,
    rows_per_chunk: int,
    timeout: float,
    keep: bool,
) -> dict[str, Any] | None:
    """Run the whole stage in a subprocess; its result JSON, or None when it ran past ``timeout``."""
    run_dir = RUNS_DIR / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True)
    catalog = write_catalog(files, run_dir / "catalog.yaml")
    result = run_dir / "result.json"
    log = run_dir / "log.txt"
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker-run",
        "--catalog", str(catalog), "--output", str(run_dir / "artifacts"),
        "--num-cpus", str(num_cpus), "--object-store", str(OBJECT_STORE_BYTES),
        "--pin-cores", str(pin_cores), "--rows-per-chunk", str(rows_per_chunk),
        "--result", str(result),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        with log.open("w") as fh:
            proc = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)  # the run's driver and its raylet
                proc.wait()
                print(f"  {label}: no result after {timeout:.0f} s; stopped (log {log})")
                return None
        if rc != 0 or not result.exists():
            tail = "\n".join(log.read_text().splitlines()[-40:])
            raise RuntimeError(f"stage run {label} failed (rc {rc}); log {log}:\n{tail}")
        out = json.loads(result.read_text())
        out["artifact_bytes"] = artifact_bytes(run_dir / "artifacts")
        return out
    finally:
        if not keep:
            shutil.rmtree(run_dir / "artifacts", ignore_errors=True)


# --------------------------------------------------------------------------------------------
# 4. Report
# --------------------------------------------------------------------------------------------


def size_label(n: int) -> str:
    return f"{round(n / 1000)}k" if n >= 1000 else str(n)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cells", type=int, default=200_000, help="corpus size (default 200,000)")
    p.add_argument("--files", type=int, default=8, help="h5ad files the corpus is split into")
    p.add_argument(
        "--encode-cells", type=int, default=20_000, help="cells in the encoding comparison"
    )
    p.add_argument("--repeats", type=int, default=3, help="timings per encoding method (median)")
    p.add_argument(
        "--quick", action="store_true", help="fewer encoding cells, 1 repeat; results to bench/out"
    )
    p.add_argument("--skip-stage", action="store_true", help="encoding comparison only")
    p.add_argument(
        "--scaling",
        choices=["full", "small"],
        default="full",
        help="corpus size of the 1- vs 2-core comparison: all of it (default) or the quarter "
        "corpus (faster; fixed per-operator start-up costs weigh more there)",
    )
    p.add_argument(
        "--one-core",
        choices=["ray", "pin"],
        default="ray",
        help="1-core run: a num_cpus=1 cluster (default), or a num_cpus=2 cluster whose Ray "
        "workers are pinned to one core (for library versions where num_cpus=1 hangs)",
    )
    p.add_argument(
        "--rows-per-chunk", type=int, default=4096, help="corpus.rows_per_chunk of the stage runs"
    )
    p.add_argument(
        "--timeout", type=float, default=1800, help="seconds before a stage run is stopped"
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the stage runs' artifacts under bench/out/runs"
    )
    p.add_argument("--worker-run", action="store_true", help=argparse.SUPPRESS)
    for name in ("--catalog", "--output", "--result"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--num-cpus", type=int, help=argparse.SUPPRESS)
    p.add_argument("--object-store", type=int, help=argparse.SUPPRESS)
    p.add_argument("--pin-cores", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args()


def encoding_metrics(e: dict[str, Any]) -> dict[str, Any]:
    n = e["cells"]
    m: dict[str, Any] = {
        "encode.cells": n,
        "encode.genes_per_cell": round(e["genes_per_cell"], 1),
        "encode.batch_cells": ENCODE_BATCH,
        "encode.cells_per_s_per_core": round(n / e["encode_s"], 1),
        "encode.with_remap.cells_per_s_per_core": round(n / e["remap_encode_s"], 1),
        "reference.cells_per_s_per_core": round(n / e["reference_s"], 1),
        "encode.speedup": round(e["reference_s"] / e["encode_s"], 2),
        "encode.with_remap.speedup": round(e["reference_s"] / e["remap_encode_s"], 2),
        "encode.cells_no_ties": e["cells_no_ties"],
        "encode.identical_no_ties": e["identical_no_ties"],
        "encode.cells_with_ties": e["cells_with_ties"],
        "encode.identical_with_ties": e["identical_with_ties"],
    }
    print(
        format_table(
            [
                [
                    "RankEncoder.encode (batches of 4096)",
                    m["encode.cells_per_s_per_core"],
                    m["encode.speedup"],
                ],
                [
                    "remap_csr + encode",
                    m["encode.with_remap.cells_per_s_per_core"],
                    m["encode.with_remap.speedup"],
                ],
                ["reference per-cell loop", m["reference.cells_per_s_per_core"], 1.0],
            ],
            ["method", "cells/s/core", "x reference"],
        )
    )
    print(
        f"  identical tokens: {e['identical_no_ties']:,}/{e['cells_no_ties']:,} cells without ties; "
        f"{e['identical_with_ties']:,}/{e['cells_with_ties']:,} cells with tied scores "
        "(the reference orders ties arbitrarily)"
    )
    return m


def one_label(args: argparse.Namespace) -> str:
    """Name of the 1-core run: ``cpus1`` (a num_cpus=1 cluster) or ``core1`` (workers pinned)."""
    return "cpus1" if args.one_core == "ray" else "core1"


def stage_metrics(
    res: dict[str, dict[str, Any] | None], args: argparse.Namespace, ref_rate: float
) -> dict[str, Any]:
    m: dict[str, Any] = {}
    big, small, one = res["cpus2"], res["cpus2-small"], res[one_label(args)]
    assert big is not None and small is not None
    two = big if args.scaling == "full" else small
    for key, r in (("cpus2", big), ("cpus2.small", small), (one_label(args), one)):
        if r is None:
            continue
        rate = r["cells_in"] / r["stage_s"]
        m[f"stage.{key}.cells"] = r["cells_in"]
        m[f"stage.{key}.wall_s"] = round(r["stage_s"], 1)
        m[f"stage.{key}.cells_per_s"] = round(rate, 1)
        m[f"stage.{key}.cells_per_s_per_core"] = round(rate / r["cores"], 1)
        m[f"stage.{key}.host_load_1m_mean"] = r["memory"]["host_load_1m_mean"]
        for sub, secs in r["substages_s"].items():
            m[f"stage.{key}.{sub}_s"] = round(secs, 1)
    if one is None:
        m[f"stage.{one_label(args)}.stopped_after_s"] = args.timeout
    else:
        m["stage.scaling_efficiency"] = round(
            (two["cells_in"] / two["stage_s"]) / (2 * one["cells_in"] / one["stage_s"]), 3
        )
        m["stage.scaling_cells"] = one["cells_in"]
    m["stage.ray_init_s"] = round(big["init_s"], 1)
    m["stage.passed"] = big["passed"]
    m["stage.duplicates"] = big["duplicates"]
    m["stage.tokenized"] = big["tokenized"]
    m["stage.cpus2.per_core_vs_reference_loop"] = round(
        m["stage.cpus2.cells_per_s_per_core"] / ref_rate, 3
    )
    ls, lb = size_label(small["cells_in"]), size_label(big["cells_in"])
    for r, lab in ((small, ls), (big, lb)):
        m[f"stage.peak_worker_rss_mb.{lab}"] = r["memory"]["worker_rss_mb"]
        m[f"stage.peak_worker_uss_mb.{lab}"] = r["memory"]["worker_uss_mb"]
        m[f"stage.peak_driver_rss_mb.{lab}"] = r["memory"]["driver_rss_mb"]
        m[f"stage.peak_all_processes_rss_mb.{lab}"] = r["memory"]["all_rss_mb"]
        for sub, mm in r["memory_by_substage"].items():
            m[f"stage.peak_worker_rss_mb.{lab}.{sub}"] = mm["worker_rss_mb"]
    m["stage.peak_worker_rss_ratio"] = round(
        big["memory"]["worker_rss_mb"] / small["memory"]["worker_rss_mb"], 3
    )
    if one is not None:
        m[f"stage.peak_worker_rss_mb.{one_label(args)}"] = one["memory"]["worker_rss_mb"]
    for name, size in big["artifact_bytes"].items():
        m[f"stage.bytes_per_cell.{name}"] = round(size / big["cells_in"], 1)
    m["stage.object_store_bytes"] = OBJECT_STORE_BYTES
    m["stage.rows_per_chunk"] = args.rows_per_chunk

    rows = []
    for label in ("cpus2", "cpus2-small", one_label(args)):
        r = res[label]
        if r is None:
            rows.append([label, "-", "-", "stopped", "-", "-", "-", "-", "-", "-"])
            continue
        rate = r["cells_in"] / r["stage_s"]
        rows.append([
            label, r["cores"], r["cells_in"], round(r["stage_s"], 1), round(rate), round(rate / r["cores"]),
            r["memory"]["worker_rss_mb"], r["memory"]["worker_uss_mb"], r["memory"]["driver_rss_mb"],
            r["memory"]["host_load_1m_mean"],
        ])  # fmt: skip
    header = [
        "run", "cores", "cells", "wall s", "cells/s", "cells/s/core",
        "worker RSS MB", "worker USS MB", "driver RSS MB", "host load",
    ]  # fmt: skip
    print(format_table(rows, header))
    labels = [lab for lab in ("cpus2", "cpus2-small", one_label(args)) if res[lab] is not None]
    subs = list(big["substages_s"])
    print(
        format_table(
            [
                [s, *(round(res[lab]["substages_s"].get(s, 0.0), 1) for lab in labels)]
                + [
                    res[lab]["memory_by_substage"].get(s, {}).get("worker_rss_mb", 0.0)
                    for lab in ("cpus2-small", "cpus2")
                ]
                for s in subs
            ],
            [
                "sub-stage",
                *(f"{lab} s" for lab in labels),
                f"worker RSS MB {ls}",
                f"worker RSS MB {lb}",
            ],
        )
    )
    if "stage.scaling_efficiency" in m:
        print(
            f"  scaling 1 -> 2 cores ({size_label(one['cells_in'])} cells): efficiency {m['stage.scaling_efficiency']:.2f}"
        )
    print(
        f"  peak worker RSS {ls} {m[f'stage.peak_worker_rss_mb.{ls}']:,.0f} MB vs "
        f"{lb} {m[f'stage.peak_worker_rss_mb.{lb}']:,.0f} MB (ratio {m['stage.peak_worker_rss_ratio']})"
    )
    return m


def main() -> int:
    args = parse_args()
    if args.worker_run:
        return worker_run(args)
    if args.quick:
        args.encode_cells = min(args.encode_cells, 4096)
        args.repeats = 1
    command = command_line()
    load_start = os.getloadavg()[0]
    print(
        f"device: {device_string()}; load average {load_start:.1f} (other processes share the cores)"
    )
    print(
        f"corpus: {args.cells:,} cells in {args.files} files resampled from {SOURCE}, "
        f"counts thinned (each count c -> Binomial(c, {THIN_P})) so no cell copies another"
    )
    with timed() as t:
        files = ensure_corpus(args.cells, args.files)
    print(f"  corpus ready ({t['s']:.1f} s): {CORPUS_DIR}")
    source_bytes = sum(f.stat().st_size for f in files)

    print(f"encoding: {args.encode_cells:,} cells of file 0, 1 process, median of {args.repeats}")
    e = bench_encoding(files[0], args.encode_cells, args.repeats)
    m = encoding_metrics(e)
    m["corpus.source_bytes_per_cell"] = round(
        source_bytes / (math.ceil(args.cells / args.files) * args.files), 1
    )

    if not args.skip_stage:
        small = files[: max(1, args.files // 4)]
        one_core = (2, 1) if args.one_core == "pin" else (1, 0)  # (num_cpus, pinned cores)
        runs = [
            ("cpus2", files, 2, 0),
            ("cpus2-small", small, 2, 0),
            (one_label(args), files if args.scaling == "full" else small, *one_core),
        ]
        res: dict[str, dict[str, Any] | None] = {}
        for label, fs, cpus, pin in runs:
            print(
                f"stage: {label} ({len(fs)} files, num_cpus={cpus}{f', workers pinned to {pin} core' if pin else ''}) ...",
                flush=True,
            )
            r = stage_run(
                label, fs, cpus, pin_cores=pin, rows_per_chunk=args.rows_per_chunk,
                timeout=args.timeout, keep=args.keep,
            )  # fmt: skip
            res[label] = r
            if r is not None:
                print(
                    f"  {r['cells_in']:,} cells in {r['stage_s']:.1f} s (+{r['init_s']:.1f} s ray.init): "
                    f"{r['cells_in'] / r['stage_s']:,.0f} cells/s; passed {r['passed']:,}, duplicates "
                    f"{r['duplicates']:,}, tokenized {r['tokenized']:,}"
                )
        if res["cpus2"] is None or res["cpus2-small"] is None:
            raise SystemExit("a 2-CPU stage run did not finish; see its log")
        m.update(stage_metrics(res, args, m["reference.cells_per_s_per_core"]))

    # Other processes on the machine slow every figure down; the load average says how much.
    m["host.loadavg_1m_start"] = round(load_start, 2)
    m["host.loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    results_dir = OUT_DIR / "results" if args.quick else RESULTS_DIR
    path = write_results("corpus", m, command=command, results_dir=results_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
