"""Stage 5 benchmark: a bounded HTTP load test of the Serve API on 127.0.0.1.

Real cells (pbmc_facs from ../shared/data, raw counts keyed by Ensembl ID) are sent to
``/embed``; the server tokenizes them with the Geneformer V2 dictionaries and embeds them
with dynamic batching. For each setting (model preset x precision) and each concurrency
(simultaneous clients, each sending its next request when the last one returns) it reports
p50 / p99 latency and requests/s over a fixed number of requests.

    PYTHONPATH=platform python bench/serve.py                         # CPU: tiny, fp32 + int8
    PYTHONPATH=platform python bench/serve.py --presets gf-104m --precisions bf16,int8  # GPU

Random weights (throughput does not depend on them). Writes ``bench/results/serve.json``
(keys ``<preset>.<precision>.c<concurrency>.{p50_ms,p99_ms,requests_per_s}``) and the
serving section of ``bench/RESULTS.md``; ``--no-record`` writes ``bench/out/serve.json`` only.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
import cellfoundry.runtime  # noqa: F401  (first: loopback-only Ray)
from _common import (
    OUT_DIR,
    RESULTS_DIR,
    command_line,
    device_string,
    format_table,
    update_results_section,
    write_results,
)


def build_model(preset: str, out: Path) -> Path:
    """A random-weight model of ``preset`` over the Geneformer V2 vocabulary, with its token
    and median dictionaries beside it (what the server tokenizes with)."""
    from cellfoundry.genes import GeneformerDictionaries
    from cellfoundry.model import bert_config, build_model, save_checkpoint
    from cellfoundry.paths import shared_path

    d = GeneformerDictionaries.load(shared_path("geneformer", "v2"))
    model = build_model(
        bert_config(preset, vocab_size=max(d.token_dictionary.values()) + 1), seed=0
    )
    path = save_checkpoint(model, out / preset, token_dictionary=d.token_dictionary)
    (path / "gene_median_dictionary.json").write_text(json.dumps(d.gene_medians))
    return path


def real_cells(n: int) -> list[dict[str, int]]:
    """``n`` pbmc_facs cells as ``{Ensembl ID: raw count}`` request bodies."""
    import anndata

    from cellfoundry.paths import shared_path

    adata = anndata.read_h5ad(shared_path("data", "h5ad", "pbmc_facs_zheng2017_3874cells.h5ad"))
    ids = adata.var["ensembl_id"].astype(str).to_numpy()
    x = adata.X[:n].tocsr()
    return [
        {
            ids[j]: int(v)
            for j, v in zip(
                x.indices[x.indptr[i] : x.indptr[i + 1]],
                x.data[x.indptr[i] : x.indptr[i + 1]],
                strict=True,
            )
        }
        for i in range(x.shape[0])
    ]


def load_test(url: str, bodies: list[bytes], concurrency: int, n_requests: int) -> dict[str, float]:
    """Latency percentiles and throughput of ``n_requests`` POSTs from ``concurrency`` clients."""
    import requests

    def client(k: int) -> list[float]:
        session, times = requests.Session(), []
        for i in range(k, n_requests, concurrency):
            t0 = time.perf_counter()
            r = session.post(url, data=bodies[i % len(bodies)], timeout=300)
            times.append(time.perf_counter() - t0)
            if r.status_code != 200:
                raise RuntimeError(f"{url}: {r.status_code} {r.text[:200]}")
        return times

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = np.concatenate([np.asarray(t) for t in pool.map(client, range(concurrency))])
    wall = time.perf_counter() - t0
    return {
        "p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 2),
        "p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 2),
        "requests_per_s": round(n_requests / wall, 2),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_setting(
    model: Path, precision: str, args: argparse.Namespace, bodies: list[bytes]
) -> dict[str, float]:
    from ray import serve

    from cellfoundry.config import parse_config
    from cellfoundry.config.serve import ServeJobConfig
    from cellfoundry.serve import run_serve

    gpu = args.device == "cuda"
    cfg = parse_config(ServeJobConfig, {
        "model": str(model), "precision": precision, "num_cpus": 1, "num_gpus": 1 if gpu else 0,
        "batching": {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_s},
        "http": {"port": free_port()}, "ray": {"num_cpus": args.num_cpus},
    })  # fmt: skip
    handle = run_serve(cfg)
    out: dict[str, float] = {}
    try:
        load_test(f"{handle.url}/embed", bodies, 2, min(8, args.requests))  # warm-up
        for c in args.concurrency:
            for k, v in load_test(f"{handle.url}/embed", bodies, c, args.requests).items():
                out[f"c{c}.{k}"] = v
    finally:
        serve.shutdown()
    return out


def update_results_md(doc: dict[str, Any]) -> Path:
    """Replace the serving section of RESULTS.md with this run's table."""
    m = doc["metrics"]
    keys = {k.rsplit(".", 1)[0] for k in m if k.endswith(".p50_ms")}
    rows = sorted(keys, key=lambda k: (k.rsplit(".c", 1)[0], int(k.rsplit(".c", 1)[1])))
    lines = [
        "## Stage 5: serving (`bench/serve.py`)",
        "",
        f"`{doc['command']}` on `{doc['device']}`, {doc['date']}. `/embed` with real pbmc_facs "
        "cells as raw counts (tokenized on the server), random weights, dynamic batching; "
        f"{int(m['requests'])} requests per concurrency level, one replica. The clients run on "
        "the same machine as the server, so on a small CPU they compete with it for cores.",
        "",
        "| setting | concurrency | p50 ms | p99 ms | requests/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for key in rows:
        setting, conc = key.rsplit(".c", 1)
        lines.append(
            f"| {setting} | {conc} | {m[key + '.p50_ms']} | {m[key + '.p99_ms']} | {m[key + '.requests_per_s']} |"
        )
    return update_results_section("serve", lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    import torch

    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--presets", default="gf-104m" if gpu else "tiny", help="comma-separated model presets"
    )
    p.add_argument(
        "--precisions", default="bf16,int8" if gpu else "fp32,int8", help="fp32, bf16, int8"
    )
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    p.add_argument(
        "--requests", type=int, default=200 if gpu else 96, help="requests per concurrency level"
    )
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-s", type=float, default=0.01)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster")
    p.add_argument("--no-record", action="store_true", help="write bench/out/serve.json only")
    args = p.parse_args(argv)
    args.device = "cuda" if gpu else "cpu"
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from cellfoundry.logs import setup_logging

    setup_logging("WARNING")
    args = parse_args(argv)
    bodies = [json.dumps({"genes": g}).encode() for g in real_cells(256)]
    metrics: dict[str, Any] = {"requests": args.requests}
    table = []
    for preset in args.presets.split(","):
        model = build_model(preset, OUT_DIR / "serve_models")
        for precision in args.precisions.split(","):
            result = run_setting(model, precision, args, bodies)
            for k, v in result.items():
                metrics[f"{preset}.{precision}.{k}"] = v
            for c in args.concurrency:
                table.append(
                    [
                        f"{preset} {precision}",
                        c,
                        result[f"c{c}.p50_ms"],
                        result[f"c{c}.p99_ms"],
                        result[f"c{c}.requests_per_s"],
                    ]
                )
    print(format_table(table, ["setting", "clients", "p50 ms", "p99 ms", "req/s"]))
    if args.no_record:
        print(write_results("serve", metrics, results_dir=OUT_DIR))
        return 0
    path = write_results("serve", metrics, device=device_string(), command=command_line())
    print(path, update_results_md(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    RESULTS_DIR.mkdir(exist_ok=True)
    sys.exit(main())
