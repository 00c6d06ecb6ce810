"""Stage 4 (perturbation) benchmark: perturbed cells/s of a deletion screen on one GPU,
against a reference-style baseline, and the projected cost of the paper's genome-wide screen.

    PYTHONPATH=platform python bench/perturb.py                 # one GPU -> bench/results/perturb.json
    .venv/bin/python bench/perturb.py --cpu-dry-run              # CPU check -> bench/out/perturb_dry.json

1. Cells: ``--cells`` cells of ``--length`` tokens (default 4,096: ``<cls>``, 4,094 distinct
   random genes, ``<eos>``); each deletion gives a 4,095-token sequence. Weights are random
   (``--seed``): throughput does not depend on them. ``--perturbations`` single-gene
   deletions per cell, evenly spaced over the ranks (a sample of the cell's 4,094).
2. Optimized (``--preset``, default gf-316m): ``cellfoundry.infer.perturb_cells`` as the
   screen runs it: bf16 weights, SDPA attention, the encoder stopped at the second-to-last
   layer (no last layer, no MLM head), the original cell run once and reused for every
   perturbation, sequences sorted by length in batches of ``--batch-size`` (halved on
   out-of-memory), optionally ``torch.compile`` of the layers (``--compile``). Timed: the
   whole call (building the perturbed sequences, forward passes, pooling, cosines).
3. Baseline, as the reference code runs: fp32 with TF32 off, eager attention, the full
   ``BertForMaskedLM`` forward with ``output_hidden_states`` (every layer and the MLM head),
   each cell's perturbed copies built with list operations and run ``--baseline-batch`` at a
   time, the second-to-last hidden state mean-pooled, cosine to the original cell. Same
   weights (same seed); its first ``--baseline-perturbations`` deletions are the optimized
   run's first ones, so their cell cosines are compared (``max_abs_cell_cos_diff``).
4. cells/s = perturbed sequences per second (one forward pass each, as the paper counts
   them). Projected screen: 30,000 cells x 4,097 = 122,910,000 forward passes at the
   measured rate, in GPU-days (``screen_h100_days`` when the GPU is an H100). For reference
   (quoted, not measured here): the paper estimates 32.8 days on 12 A100s in full precision
   and 5.9 days in 8-bit.
5. Precision (``--precision``, default on): the same deletions with Geneformer's metric
   (the ``<cls>`` cosine screens report by default) in fp32 and in bf16, on the same
   weights and cells: speed of each, and the Spearman rank correlation, max abs error and
   median relative error of the bf16 cell shifts (1 - cos) against fp32
   (``precision.bf16_vs_fp32.*``). Screens default to fp32 unless that correlation is
   >= 0.99 on the target hardware. The CPU dry run computes it with torch's CPU bf16: a
   check of the code path and a CPU figure, not a GPU one.
6. On a GPU writes ``bench/results/perturb.json`` and its section of ``bench/RESULTS.md``
   (``--no-record``: ``bench/out/perturb.json``). Without CUDA it runs only with
   ``--cpu-dry-run`` (preset tiny, 256 tokens, a few perturbations), which checks the code
   path and writes ``bench/out/perturb_dry.json``.

Needs torch, transformers, numpy and pyarrow only (the GPU image has them): the model is
built through ``bench/pretrain.py``'s loader; ray, polars and deepspeed are never imported.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Sequence
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
    update_results_section,
    write_results,
)
from pretrain import gpu_device_string, load_platform

SCREEN_PASSES = 30_000 * 4_097  # the paper's genome-wide deletion screen: 122,910,000
SPECIALS = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}
HEAVY_MODULES = ("ray", "deepspeed", "polars")
# the dry run checks code paths, not speed: small enough for `make test` on 2 cores
DRY = {"preset": "tiny", "length": 128, "cells": 2, "perturbations": 8, "batch_size": 8,
       "baseline_batch": 4, "baseline_perturbations": 4, "warmup": 4}  # fmt: skip


def make_cells(n: int, length: int, vocab: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``<cls>`` + ``length - 2`` distinct random genes + ``<eos>``."""
    return [
        np.concatenate([[2], rng.choice(np.arange(4, vocab), length - 2, replace=False), [3]])
        for _ in range(n)
    ]


def deletions(cell: np.ndarray, k: int) -> list[int]:
    """``k`` genes of the cell, evenly spaced over its ranks."""
    genes = cell[1:-1]
    return [int(g) for g in genes[np.linspace(0, len(genes) - 1, min(k, len(genes))).astype(int)]]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None


def build(plat: Any, args: argparse.Namespace, attn: str) -> torch.nn.Module:
    """The preset's BertForMaskedLM with seed ``args.seed`` and attention ``attn``."""
    cfg = plat.bert_config(args.preset, max_position_embeddings=max(4096, args.length))
    model = plat.build_model(cfg, seed=args.seed)
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    return model.eval()


def run_optimized(
    plat: Any,
    cells: list[np.ndarray],
    args: argparse.Namespace,
    device: torch.device,
    *,
    fp8: bool = False,
    dtype: str | None = None,
    metric: str = "pooled",
) -> dict[str, Any]:
    """perturb_cells over every cell's deletions; halves the batch on out-of-memory. With
    ``fp8`` the encoder's linear layers run in float8 (``cellfoundry.model.fp8.to_fp8``; on
    CPU emulated, for the dry run); raises ``FP8Unsupported`` on a GPU without FP8.
    ``dtype``: ``fp32`` or ``bf16`` weights (default bf16 on a GPU, fp32 on CPU; bf16 runs
    on CPU too); ``metric``: the cell shift (``pooled``, as the baseline, or ``geneformer``)."""
    from cellfoundry.infer import Embedder, Perturbation, perturb_cells

    dtype = dtype or ("bf16" if device.type == "cuda" else "fp32")
    model = build(plat, args, "sdpa").to(
        device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32
    )
    if fp8:
        from cellfoundry.model.fp8 import to_fp8

        to_fp8(model, allow_cpu=device.type == "cpu")
        dtype = f"fp8 e4m3 linears, {dtype} elsewhere"
    batch = args.batch_size
    while True:
        try:
            e = Embedder(
                model, token_dictionary=SPECIALS, layer=-2, batch_size=batch, compile=args.compile
            )
            warm = [Perturbation("delete", (g,)) for g in deletions(cells[0], args.warmup)]
            for _ in range(2 if args.compile else 1):  # compile: shapes of full and last batches
                perturb_cells(e, cells[:1], warm, gene_shifts=False, metric=metric)
            _sync(device)
            _release(device)
            n, start, tables = 0, time.perf_counter(), []
            for cell in cells:
                perts = [Perturbation("delete", (g,)) for g in deletions(cell, args.perturbations)]
                # pooled: the baseline's quantity; geneformer: the <cls> cosine screens report
                tables.append(perturb_cells(e, [cell], perts, gene_shifts=False, metric=metric))
                n += len(perts)
            _sync(device)
            seconds = time.perf_counter() - start
            break
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            _release(device)
            print(f"  out of memory: batch size {batch}", flush=True)
    cos = np.concatenate([t["cell_cos"].to_numpy() for t in tables])
    out = {"sequences": n, "seconds": seconds, "batch_size": batch, "dtype": dtype,
           "peak_mem_gb": _peak_gb(device), "cell_cos": cos, "layers_run": e.n_layers,
           "layers": model.config.num_hidden_layers}  # fmt: skip
    del e, model
    _release(device)
    return out


def run_baseline(
    plat: Any, cells: list[np.ndarray], args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """The reference's way: fp32, eager, full model with every hidden state, list-built copies."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = build(plat, args, "eager").to(device, dtype=torch.float32)

    def embed(seqs: list[list[int]]) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
        ids = ids.to(device)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=(ids != 0).long(), output_hidden_states=True)
        h = out.hidden_states[-2].float()
        genes = (ids > 3).unsqueeze(-1).float()
        return (h * genes).sum(1) / genes.sum(1)

    def screen(cell: np.ndarray, genes: list[int]) -> list[float]:
        base = embed([cell.tolist()])
        cos = []
        for i in range(0, len(genes), args.baseline_batch):
            seqs = []
            for g in genes[i : i + args.baseline_batch]:
                s = cell.tolist()
                s.remove(g)
                seqs.append(s)
            cos += torch.nn.functional.cosine_similarity(embed(seqs), base).tolist()
        return cos

    screen(cells[0], deletions(cells[0], min(args.warmup, args.baseline_batch)))
    _sync(device)
    _release(device)
    n, cos, start = 0, [], time.perf_counter()
    for cell in cells:
        genes = deletions(cell, args.perturbations)[: args.baseline_perturbations]
        cos += screen(cell, genes)
        n += len(genes)
    _sync(device)
    seconds = time.perf_counter() - start
    out = {"sequences": n, "seconds": seconds, "batch_size": args.baseline_batch, "dtype": "fp32",
           "peak_mem_gb": _peak_gb(device), "cell_cos": np.asarray(cos)}  # fmt: skip
    model = None  # free the weights before the optimized run (embed() is not called again)
    _release(device)
    return out


def metrics_of(
    opt: dict[str, Any], base: dict[str, Any], args: argparse.Namespace, gpu: str
) -> dict[str, Any]:
    p = args.preset
    rate, base_rate = opt["sequences"] / opt["seconds"], base["sequences"] / base["seconds"]
    days_key = screen_days_key(gpu)
    per_cell = args.perturbations
    idx = [
        c * per_cell + j
        for c in range(args.cells)
        for j in range(min(per_cell, args.baseline_perturbations))
    ]
    m: dict[str, Any] = {
        f"{p}.cells_per_s": round(rate, 2),
        "baseline.cells_per_s": round(base_rate, 2),
        f"{p}.speedup_vs_baseline": round(rate / base_rate, 2),
        days_key: round(SCREEN_PASSES / rate / 86_400, 2),
        f"baseline.{days_key}": round(SCREEN_PASSES / base_rate / 86_400, 2),
        f"{p}.sequences_timed": opt["sequences"],
        f"{p}.seconds": round(opt["seconds"], 3),
        f"{p}.batch_size": opt["batch_size"],
        f"{p}.dtype": opt["dtype"],
        f"{p}.layers_run": f"{opt['layers_run']} of {opt['layers']}",
        f"{p}.compiled": int(args.compile),
        "baseline.sequences_timed": base["sequences"],
        "baseline.seconds": round(base["seconds"], 3),
        "baseline.batch_size": base["batch_size"],
        "baseline.precision": "fp32 (TF32 off), eager attention, full BertForMaskedLM with hidden states",
        "max_abs_cell_cos_diff": float(np.abs(opt["cell_cos"][idx] - base["cell_cos"]).max()),
        "tokens_per_cell": args.length,
        "cells": args.cells,
        "perturbations_per_cell": args.perturbations,
        "torch": torch.__version__,
    }
    for key, r in ((p, opt), ("baseline", base)):
        if r["peak_mem_gb"] is not None:
            m[f"{key}.peak_mem_gb"] = round(r["peak_mem_gb"], 2)
    return m


def fp8_metrics(
    fp8: dict[str, Any], ref: dict[str, Any], args: argparse.Namespace, days_key: str
) -> dict[str, Any]:
    """FP8's speed and its accuracy cost against ``ref`` (the bf16 run; fp32 on a CPU dry
    run) on the same cells and deletions: |d cos| of the cell cosines and the relative
    error of the shift 1 - cos (over deletions whose reference shift is > 0)."""
    p = args.preset
    rate = fp8["sequences"] / fp8["seconds"]
    cos8, cos_ref = fp8["cell_cos"].astype(np.float64), ref["cell_cos"].astype(np.float64)
    if cos8.shape != cos_ref.shape:
        raise RuntimeError(f"fp8 gave {cos8.shape} cosines, the reference {cos_ref.shape}")
    dcos = np.abs(cos8 - cos_ref)
    shift8, shift_ref = 1.0 - cos8, 1.0 - cos_ref
    moved = shift_ref > 0  # a zero reference shift has no relative error to speak of
    rel = np.abs(shift8[moved] - shift_ref[moved]) / shift_ref[moved]
    m: dict[str, Any] = {
        f"{p}.fp8.cells_per_s": round(rate, 2),
        f"{p}.fp8.speedup_vs_reference": round(rate / (ref["sequences"] / ref["seconds"]), 3),
        f"fp8.{days_key}": round(SCREEN_PASSES / rate / 86_400, 2),
        f"{p}.fp8.sequences_timed": fp8["sequences"],
        f"{p}.fp8.seconds": round(fp8["seconds"], 3),
        f"{p}.fp8.batch_size": fp8["batch_size"],
        f"{p}.fp8.dtype": fp8["dtype"],
        "fp8.reference": f"{ref['dtype']} run, same weights, cells and deletions",
        "fp8.compared": int(dcos.size),
        "fp8.cell_cos_max_abs_diff": float(dcos.max()),
        "fp8.cell_cos_median_abs_diff": float(np.median(dcos)),
        "fp8.shift_median": float(np.median(shift_ref)),
        "fp8.shift_compared": int(moved.sum()),
        "fp8.shift_spearman": spearman(shift8, shift_ref),
    }
    if moved.any():
        m["fp8.shift_rel_err_median"] = float(np.median(rel))
        m["fp8.shift_rel_err_max"] = float(rel.max())
        m["fp8.shift_rel_err_total"] = float(
            np.abs(shift8 - shift_ref)[moved].sum() / shift_ref[moved].sum()
        )
    if fp8["peak_mem_gb"] is not None:
        m[f"{p}.fp8.peak_mem_gb"] = round(fp8["peak_mem_gb"], 2)
    return m


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties; NumPy only, as the GPU image)."""

    def ranks(x: np.ndarray) -> np.ndarray:
        _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
        last = np.cumsum(counts)  # 1-based rank of each distinct value's last copy
        return (last - (counts - 1) / 2.0)[inv]  # ties share their average rank

    ra, rb = ranks(np.asarray(a, np.float64)), ranks(np.asarray(b, np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def precision_metrics(
    lo: dict[str, Any], ref: dict[str, Any], args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """bf16 (``lo``) against fp32 (``ref``) on the same cells and deletions: speed of each,
    and the Spearman correlation, max abs error and median relative error of the cell
    shifts (1 - cos, Geneformer's metric)."""
    p = args.preset
    s_lo, s_ref = 1.0 - lo["cell_cos"].astype(np.float64), 1.0 - ref["cell_cos"].astype(np.float64)
    if s_lo.shape != s_ref.shape:
        raise RuntimeError(f"bf16 gave {s_lo.shape} shifts, fp32 {s_ref.shape}")
    err = np.abs(s_lo - s_ref)
    moved = s_ref > 0
    rho = spearman(s_lo, s_ref)
    m: dict[str, Any] = {
        "precision.metric": "geneformer (<cls> cosine), shift = 1 - cos",
        "precision.measured_on": (
            "gpu" if device.type == "cuda" else "cpu (torch bf16 on CPU; not a GPU figure)"
        ),
        f"{p}.fp32.cells_per_s": round(ref["sequences"] / ref["seconds"], 2),
        f"{p}.bf16.cells_per_s": round(lo["sequences"] / lo["seconds"], 2),
        "precision.compared": int(err.size),
        "precision.bf16_vs_fp32.shift_spearman": rho,
        "precision.bf16_vs_fp32.shift_max_abs_err": float(err.max()),
        "precision.bf16_vs_fp32.shift_median": float(np.median(s_ref)),
        # the screens' rule (config: compute.dtype): bf16 only at >= 0.99 on the target hardware
        "precision.bf16_vs_fp32.spearman_at_least_0_99": int(bool(rho >= 0.99)),
    }
    if moved.any():
        m["precision.bf16_vs_fp32.shift_rel_err_median"] = float(
            np.median(err[moved] / s_ref[moved])
        )
    return m


def screen_days_key(gpu: str) -> str:
    """``screen_h100_days`` on an H100, ``screen_gpu_days`` on another GPU (its name is in
    the results' ``device``), ``screen_days_this_device`` on a CPU."""
    if "H100" in gpu:
        return "screen_h100_days"
    return "screen_gpu_days" if gpu.startswith("gpu") else "screen_days_this_device"


def update_results_md(doc: dict[str, Any], preset: str) -> None:
    """Replace this GPU's row (or add one) in the perturbation section of RESULTS.md."""
    m = doc["metrics"]
    gpu = doc["device"].split(";")[0].removeprefix("gpu: ")
    days = m.get("screen_h100_days", m.get("screen_gpu_days", "-"))
    row = (f"| {doc['date']} | {gpu} | {m[f'{preset}.cells_per_s']:,.1f} | {m['baseline.cells_per_s']:,.1f} | "
           f"{m[f'{preset}.speedup_vs_baseline']}x | {days} | {m['max_abs_cell_cos_diff']:.2e} | "
           f"{'yes' if m[f'{preset}.compiled'] else 'no'} | `{doc['command']}` |")  # fmt: skip
    header = [
        "## In-silico perturbation throughput, one GPU (`bench/perturb.py`)", "",
        f"{preset}, random weights, cells of 4,096 tokens, single-gene deletions: `perturb_cells` "
        "(bf16, SDPA, encoder stopped at the second-to-last layer, original cell run once) vs "
        "the reference-style baseline (fp32, eager attention, full model), in the same run. "
        "Screen = 122,910,000 forward passes (30,000 cells x 4,097) at the measured rate; the "
        "paper's estimate: 32.8 days on 12 A100s (fp32), 5.9 days 8-bit. Target: 200 cells/s "
        "on one H100. All figures: `results/perturb.json`.", "",
        "| date | GPU | cells/s | baseline cells/s | speedup | screen GPU-days | max cos diff | compiled | command |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    return update_results_section("perturb", header, row=row, device=gpu)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gf-316m")
    p.add_argument("--length", type=int, default=4096, help="tokens per cell (with <cls>/<eos>)")
    p.add_argument("--cells", type=int, default=2)
    p.add_argument("--perturbations", type=int, default=512, help="deletions timed per cell")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--warmup", type=int, default=32, help="warm-up deletions")
    p.add_argument("--baseline-batch", type=int, default=4)
    p.add_argument(
        "--baseline-perturbations", type=int, default=32, help="baseline deletions per cell"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder layers")
    p.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the screen with FP8 linear layers and compare its cell "
                        "cosines with the bf16 run's (default on)")  # fmt: skip
    p.add_argument("--precision", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the deletions in fp32 and bf16 with Geneformer's metric and "
                        "compare the bf16 cell shifts with fp32's (default on)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-record", action="store_true", help="write bench/out/perturb.json only")
    p.add_argument("--cpu-dry-run", action="store_true", help="no GPU: tiny sizes -> bench/out")
    args = p.parse_args(argv)
    if args.cpu_dry_run:
        for k, v in DRY.items():
            setattr(args, k, v)
    args.baseline_perturbations = min(args.baseline_perturbations, args.perturbations)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_dry_run:
        print("bench/perturb.py measures one GPU and no CUDA device is visible. Run it on a GPU "
              "(PYTHONPATH=platform python bench/perturb.py), or check the code path on CPU "
              "with --cpu-dry-run (writes bench/out/perturb_dry.json only).", file=sys.stderr)  # fmt: skip
        return 2
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dev = gpu_device_string(device) if cuda else device_string()
    plat = load_platform()
    vocab = plat.bert_config(args.preset).vocab_size
    cells = make_cells(args.cells, args.length, vocab, np.random.default_rng(args.seed))
    print(f"device: {dev}\n{args.preset}: {args.cells} cells x {args.length} tokens, "
          f"{args.perturbations} deletions each", flush=True)  # fmt: skip
    base = run_baseline(plat, cells, args, device)
    print(f"  baseline: {base['sequences']} sequences in {base['seconds']:.2f} s", flush=True)
    opt = run_optimized(plat, cells, args, device)
    print(f"  optimized: {opt['sequences']} sequences in {opt['seconds']:.2f} s", flush=True)
    metrics = metrics_of(opt, base, args, dev)
    if args.fp8:
        from cellfoundry.model.fp8 import FP8Unsupported

        try:
            fp8 = run_optimized(plat, cells, args, device, fp8=True)
        except FP8Unsupported as e:  # a GPU without FP8: say so, keep the bf16 figures
            print(f"  fp8: not run ({e})", flush=True)
            metrics["fp8.not_run"] = str(e)
        else:
            print(f"  fp8: {fp8['sequences']} sequences in {fp8['seconds']:.2f} s", flush=True)
            metrics.update(fp8_metrics(fp8, opt, args, screen_days_key(dev)))
    if args.precision:
        runs = {}
        for dtype in ("fp32", "bf16"):
            runs[dtype] = run_optimized(plat, cells, args, device, dtype=dtype, metric="geneformer")
            print(f"  {dtype} (geneformer metric): {runs[dtype]['sequences']} sequences in "
                  f"{runs[dtype]['seconds']:.2f} s", flush=True)  # fmt: skip
        metrics.update(precision_metrics(runs["bf16"], runs["fp32"], args, device))
    rows = [[k, v] for k, v in metrics.items() if not isinstance(v, str)]
    print(format_table(rows, ["metric", "value"]))
    if not cuda:
        refuse_imported(HEAVY_MODULES)
        path = write_results("perturb_dry", metrics, device=dev, results_dir=OUT_DIR)
        print(
            f"\ndry run (CPU, preset {args.preset}, not a result): {path.relative_to(BENCH_DIR.parent)}"
        )
        return 0
    spec_run = args.preset == "gf-316m" and args.length == 4096 and not args.cpu_dry_run
    if args.no_record or not spec_run:
        path = write_results("perturb", metrics, device=dev, results_dir=OUT_DIR)
        print(f"\nnot recorded in bench/results (--no-record or not gf-316m at 4,096): {path}")
        return 0
    path = write_results("perturb", metrics, device=dev, command=command_line())
    update_results_md(json.loads(path.read_text()), args.preset)
    print(f"\nwrote {path.relative_to(BENCH_DIR.parent)} and bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
