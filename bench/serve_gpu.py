"""The Serve replica's path without Ray: per-request latency of tokenize + batched forward.

    PYTHONPATH=platform python bench/serve_gpu.py                # one GPU -> bench/results/serve_gpu.json
    .venv/bin/python bench/serve_gpu.py --cpu-dry-run             # CPU check -> bench/out/serve_gpu_dry.json

What one ``/embed`` request costs inside the application, minus HTTP and Ray's transport
(``bench/serve.py`` measures the whole HTTP path on CPU; a GPU machine has no Ray):

1. Tokenize, as the ``Api`` ingress does in a worker thread: ``CellTokenizer.tokenize`` of
   ``{Ensembl ID: raw count}`` (the class the server uses, over a vocabulary of the V2 size:
   20,275 tokens, synthetic Ensembl IDs and medians; ranking costs the same).
2. Batched forward, as the ``CellModel`` replica does: requests queue for a batcher thread
   that behaves like ``@serve.batch`` with the serving defaults (``max_batch_size`` 16,
   ``batch_wait_timeout_s`` 0.01: a batch runs when full or 10 ms after its first request,
   one batch at a time), then ``Embedder.embed_cells`` (encoder up to layer -2, mean over
   gene tokens, length-sorted batches) and ``tolist()`` of each row as the replica returns it.
3. Callers: ``--concurrency`` threads (default 1 and 8), each sending its next request when
   the last returns; latency = tokenize start to embedding in hand. p50 / p99 per request
   and requests/s, after warm-up requests.

Cells: genes per cell from the PBMC length distribution (``bench/out/pretrain_lengths.json``,
written by ``bench/pretrain.py``; carry it to a GPU machine), random genes of the vocabulary
with random raw counts. Model: ``--preset`` (default gf-104m) with random weights, bf16 on a
GPU (as ``precision: auto`` serves it). Keys ``<preset>.<precision>.c<N>.{p50_ms,p99_ms,
requests_per_s}``. Without CUDA it runs only with ``--cpu-dry-run`` (preset tiny, fp32, a
few requests), writing ``bench/out/serve_gpu_dry.json``.

Imports no Ray: ``cellfoundry.serve``'s package ``__init__`` (which starts Ray Serve) is
skipped; the tokenizer module needs polars and fastapi, which a GPU machine gets as wheels
(``bench/gpu.sh``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import queue
import sys
import threading
import time
import types
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import (
    BENCH_DIR,
    OUT_DIR,
    command_line,
    device_string,
    format_table,
    refuse_imported,
    write_results,
)

LENGTHS = OUT_DIR / "pretrain_lengths.json"
SPECIALS = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}
MAX_BATCH_SIZE = 16  # ServeJobConfig.batching defaults
BATCH_WAIT_TIMEOUT_S = 0.01
HEAVY_MODULES = ("ray", "deepspeed")
DRY = {"preset": "tiny", "requests": 8, "warmup": 3, "max_genes": 400}


def load_serving() -> tuple[type, type, Any, Any]:
    """``(CellTokenizer, Embedder, bert_config, build_model)`` without ``cellfoundry.serve``'s
    package ``__init__`` (it imports the Ray Serve runner)."""
    spec = importlib.util.find_spec("cellfoundry")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("cellfoundry is not importable: run with PYTHONPATH=platform")
    root = Path(next(iter(spec.submodule_search_locations)))
    if "cellfoundry.serve" not in sys.modules:
        stub = types.ModuleType("cellfoundry.serve")
        stub.__path__ = [str(root / "serve")]
        sys.modules["cellfoundry.serve"] = stub
    try:
        tokenizer = importlib.import_module("cellfoundry.serve.tokenizer")
    except ImportError as e:
        raise SystemExit(
            f"the serving tokenizer needs {e.name!r}: on a GPU machine install the wheels "
            "bench/gpu.sh carries (bench/out/wheels, see bench/README.md)"
        ) from e
    from cellfoundry.infer.embed import Embedder
    from cellfoundry.model import bert_config, build_model

    return tokenizer.CellTokenizer, Embedder, bert_config, build_model


def synthetic_vocab(vocab_size: int, rng: np.random.Generator) -> tuple[dict, dict]:
    """Token dictionary (V2 specials + ``ENSG...`` IDs) and positive medians."""
    tokens = {**SPECIALS, **{f"ENSG{t:011d}": t for t in range(4, vocab_size)}}
    medians = {g: float(m) for g, m in zip(list(tokens)[4:], rng.lognormal(0, 1, vocab_size - 4),
                                           strict=True)}  # fmt: skip
    return tokens, medians


def request_cells(
    n: int, vocab: dict[str, int], max_genes: int, rng: np.random.Generator
) -> tuple[list[dict[str, int]], str]:
    """``n`` request bodies ``{Ensembl ID: raw count}`` with PBMC-like gene counts."""
    genes = [g for g in vocab if g not in SPECIALS]
    if LENGTHS.is_file():
        dist = np.asarray(json.loads(LENGTHS.read_text())["lengths"]) - 2
        source = f"genes per cell resampled from {LENGTHS.name} (PBMC)"
    else:  # no lengths file: a fixed size, said in the results
        dist, source = np.array([1_000]), "1,000 genes per cell (no pretrain_lengths.json)"
    sizes = np.clip(rng.choice(dist, n), 7, max_genes)
    cells = []
    for k in sizes.tolist():
        chosen = rng.choice(len(genes), k, replace=False)
        counts = rng.geometric(0.3, k)  # raw counts >= 1, mostly small as in UMI data
        cells.append({genes[i]: int(c) for i, c in zip(chosen.tolist(), counts.tolist(),
                                                       strict=True)})  # fmt: skip
    return cells, source


class Batcher:
    """``@serve.batch`` for threads: requests wait in a queue; one worker runs ``fn`` on up to
    ``max_batch_size`` of them, as soon as the batch is full or ``wait_s`` after its first."""

    def __init__(self, fn: Any, max_batch_size: int, wait_s: float) -> None:
        self.fn, self.max_batch_size, self.wait_s = fn, max_batch_size, wait_s
        self.queue: queue.Queue[tuple[Any, Future] | None] = queue.Queue()
        self.batch_sizes: list[int] = []
        self.thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self.thread.start()

    def submit(self, item: Any) -> Any:
        """``fn``'s result for ``item`` (blocks until its batch ran)."""
        future: Future = Future()
        self.queue.put((item, future))
        return future.result()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def _run(self) -> None:
        while (first := self.queue.get()) is not None:
            batch = [first]
            deadline = time.perf_counter() + self.wait_s
            while len(batch) < self.max_batch_size:
                try:
                    nxt = self.queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            self.batch_sizes.append(len(batch))
            try:
                out = self.fn([item for item, _ in batch])
                for (_, future), row in zip(batch, out, strict=True):
                    future.set_result(row)
            except Exception as e:  # the callers see it, as Serve's callers would
                for _, future in batch:
                    future.set_exception(e)


def load_test(
    tokenize: Any, batcher: Batcher, cells: Sequence[dict[str, int]], concurrency: int
) -> tuple[np.ndarray, float]:
    """Latencies (s) of every request and the wall seconds, ``concurrency`` callers each
    sending its share of ``cells`` one after the other."""
    latencies: list[float] = []
    lock = threading.Lock()

    def caller(share: Sequence[dict[str, int]]) -> None:
        for genes in share:
            t0 = time.perf_counter()
            ids, _ = tokenize(genes)
            batcher.submit(ids)
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=caller, args=(cells[i::concurrency],))
               for i in range(concurrency)]  # fmt: skip
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return np.asarray(latencies), time.perf_counter() - start


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gf-104m")
    p.add_argument("--concurrency", default="1,8", help="callers, comma-separated")
    p.add_argument("--requests", type=int, default=200, help="timed requests per concurrency")
    p.add_argument("--warmup", type=int, default=20, help="warm-up requests per concurrency")
    p.add_argument("--max-genes", type=int, default=4094, help="genes per cell at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-record", action="store_true", help="write bench/out/serve_gpu.json only")
    p.add_argument("--cpu-dry-run", action="store_true", help="no GPU: tiny sizes -> bench/out")
    args = p.parse_args(argv)
    if args.cpu_dry_run:
        for k, v in DRY.items():
            setattr(args, k, v)
    args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_dry_run:
        print("bench/serve_gpu.py measures one GPU and no CUDA device is visible; check the "
              "code path on CPU with --cpu-dry-run", file=sys.stderr)  # fmt: skip
        return 2
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if cuda:
        from pretrain import gpu_device_string

        dev = gpu_device_string(device)
    else:
        dev = device_string()
    precision = "bf16" if cuda else "fp32"  # what `precision: auto` serves
    CellTokenizer, Embedder, bert_config, build_model = load_serving()
    rng = np.random.default_rng(args.seed)
    cfg = bert_config(args.preset)
    vocab, medians = synthetic_vocab(cfg.vocab_size, rng)
    tokenizer = CellTokenizer(vocab, medians, cfg.max_position_embeddings)
    model = build_model(cfg, seed=args.seed).to(device)
    model = model.to(dtype=torch.bfloat16 if precision == "bf16" else torch.float32).eval()
    embedder = Embedder(model, layer=-2, pooling="mean", batch_size=MAX_BATCH_SIZE,
                        token_dictionary=vocab)  # fmt: skip

    def embed(cells: list[np.ndarray]) -> list[list[float]]:  # CellModel.embed's body
        return [row.tolist() for row in embedder.embed_cells(cells)]

    print(f"device: {dev}\n{args.preset} {precision}, random weights; batch <= "
          f"{MAX_BATCH_SIZE}, wait {BATCH_WAIT_TIMEOUT_S * 1e3:.0f} ms", flush=True)  # fmt: skip
    metrics: dict[str, Any] = {"preset": args.preset, "precision": precision,
                               "max_batch_size": MAX_BATCH_SIZE,
                               "batch_wait_timeout_s": BATCH_WAIT_TIMEOUT_S,
                               "torch": torch.__version__}  # fmt: skip
    rows = []
    for c in args.levels:
        cells, source = request_cells(args.warmup + args.requests, vocab, args.max_genes, rng)
        batcher = Batcher(embed, MAX_BATCH_SIZE, BATCH_WAIT_TIMEOUT_S)
        try:
            load_test(tokenizer.tokenize, batcher, cells[: args.warmup], c)
            batcher.batch_sizes.clear()
            lat, seconds = load_test(tokenizer.tokenize, batcher, cells[args.warmup :], c)
        finally:
            batcher.close()
        key = f"{args.preset}.{precision}.c{c}"
        p50, p99 = (float(np.percentile(lat, q)) * 1e3 for q in (50, 99))
        metrics.update({
            f"{key}.p50_ms": round(p50, 2), f"{key}.p99_ms": round(p99, 2),
            f"{key}.requests_per_s": round(len(lat) / seconds, 2),
            f"{key}.requests": len(lat),
            f"{key}.mean_batch": round(float(np.mean(batcher.batch_sizes)), 2),
        })  # fmt: skip
        metrics["cells.source"] = source
        rows.append([c, len(lat), round(p50, 2), round(p99, 2), round(len(lat) / seconds, 1),
                     round(float(np.mean(batcher.batch_sizes)), 1)])  # fmt: skip
        print(f"  c{c}: p50 {p50:.1f} ms, p99 {p99:.1f} ms", flush=True)
    print(format_table(rows, ["callers", "requests", "p50 ms", "p99 ms", "req/s", "batch"]))
    if not cuda:
        refuse_imported(HEAVY_MODULES)
        path = write_results("serve_gpu_dry", metrics, device=dev, results_dir=OUT_DIR)
        print(f"\ndry run (CPU, not a result): {path.relative_to(BENCH_DIR.parent)}")
        return 0
    if args.no_record or args.preset != "gf-104m":
        path = write_results("serve_gpu", metrics, device=dev, results_dir=OUT_DIR)
    else:
        path = write_results("serve_gpu", metrics, device=dev, command=command_line())
    print(f"\nwrote {path.relative_to(BENCH_DIR.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
