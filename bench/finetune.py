"""Stage 3 (fine-tuning) benchmark: samples/s and peak GPU memory of full fine-tuning vs QLoRA.

    PYTHONPATH=platform python bench/finetune.py              # one GPU -> bench/results/finetune.json
    .venv/bin/python bench/finetune.py --cpu-dry-run           # CPU check -> bench/out/finetune_dry.json

1. Model: a randomly initialised ``--preset`` (default gf-104m: 12 x 768, V2 vocabulary)
   saved once under ``bench/out/``; throughput and memory do not depend on the weights.
   Cell classification head with ``--classes`` classes (10, like pbmc_facs).
2. Inputs: ``--batch-size`` cells of exactly ``--length`` tokens (``<cls>``, random genes,
   ``<eos>``; no padding), random labels; the same batches for both runs.
3. Full fine-tuning: ``BertForSequenceClassification`` (SDPA attention), fp32 master
   weights with bf16 autocast on a bf16 GPU, fused AdamW over every weight.
4. QLoRA, as ``cellfoundry finetune`` builds it (``cellfoundry.tune.models.build_classifier``):
   the base in 4-bit NF4 with double quantization (bitsandbytes), bf16 compute, LoRA r=32,
   alpha=64 on query/key/value; only adapters, head and pooler train (AdamW).
5. Each: ``--warmup`` steps, then ``--steps`` timed steps (forward, backward, optimizer step)
   between two ``torch.cuda.synchronize()``; peak memory is ``max_memory_allocated`` since
   the run's model was built. Both runs happen in one process, full fine-tuning first.
6. On a GPU writes ``bench/results/finetune.json`` and its section of ``bench/RESULTS.md``
   (``--no-record``: ``bench/out/finetune.json`` only). Without CUDA it runs only with
   ``--cpu-dry-run`` (preset tiny, 64 tokens, a few steps; bitsandbytes' CPU backend), which
   checks the code path and writes ``bench/out/finetune_dry.json``.

Needs torch, transformers, peft and bitsandbytes; loads the few cellfoundry modules it uses
(presets, the QLoRA builder, the configs) without the packages' ``__init__`` (which pull in
polars, scikit-learn and Ray), so a GPU image without those runs it.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import sys
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from _common import (
    BENCH_DIR,
    OUT_DIR,
    command_line,
    device_string,
    format_table,
    update_results_section,
    write_results,
)

RESULTS_MD = BENCH_DIR / "RESULTS.md"
V2_VOCAB = 20_275  # Geneformer V2 token dictionary size (4 specials + genes)
CLS_ID, EOS_ID, FIRST_GENE_ID = 2, 3, 4
DRY = {"preset": "tiny", "length": 64, "batch_size": 4, "steps": 3, "warmup": 1}


def load_platform() -> tuple[Any, Any, Any]:
    """``bert_config``, ``build_classifier`` and ``FinetuneModelConfig`` with empty parent
    packages (``cellfoundry.model``'s and ``cellfoundry.tune``'s ``__init__`` import polars)."""
    spec = importlib.util.find_spec("cellfoundry")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("cellfoundry is not importable: run with PYTHONPATH=platform")
    root = Path(next(iter(spec.submodule_search_locations)))
    for sub in ("model", "tune"):
        name = f"cellfoundry.{sub}"
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__path__ = [str(root / sub)]
            sys.modules[name] = stub
    build = importlib.import_module("cellfoundry.model.build")
    sys.modules["cellfoundry.model"].ATTN_IMPLEMENTATION = build.ATTN_IMPLEMENTATION
    presets = importlib.import_module("cellfoundry.model.presets")
    models = importlib.import_module("cellfoundry.tune.models")
    config = importlib.import_module("cellfoundry.config.tune")
    return presets.bert_config, models.build_classifier, config.FinetuneModelConfig


def base_model_dir(bert_config: Any, preset: str, length: int) -> Path:
    """A random-init ``BertForMaskedLM`` of ``preset`` saved under bench/out (once)."""
    import transformers

    directory = OUT_DIR / f"finetune_base_{preset}_{length}"
    if not (directory / "config.json").is_file():
        config = bert_config(preset, vocab_size=V2_VOCAB, max_position_embeddings=max(length, 512))
        torch.manual_seed(0)
        transformers.BertForMaskedLM(config).save_pretrained(directory)
    return directory


def make_batches(
    n: int, batch_size: int, length: int, classes: int
) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(FIRST_GENE_ID, V2_VOCAB, (batch_size, length), generator=g)
        ids[:, 0], ids[:, -1] = CLS_ID, EOS_ID
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": torch.randint(0, classes, (batch_size,), generator=g)})  # fmt: skip
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(
    mode: str, model: torch.nn.Module, batches: list, device: torch.device, warmup: int
) -> dict[str, Any]:
    """Time ``len(batches) - warmup`` training steps of ``model``."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda" and all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and mode == "full")
    model.train()
    start, losses = 0.0, []
    for i, batch in enumerate(batches):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        with autocast:
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    _sync(device)
    seconds = time.perf_counter() - start
    timed = len(batches) - warmup
    cells = timed * batches[0]["input_ids"].shape[0]
    return {
        "samples_per_s": cells / seconds,
        "tokens_per_s": cells * batches[0]["input_ids"].shape[1] / seconds,
        "step_s": seconds / timed,
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None,
        "trainable_params": sum(p.numel() for p in params),
        "precision": ("bf16 autocast" if bf16 else "fp32") if mode == "full" else ("nf4 + bf16 compute" if bf16 else "nf4 + fp32 compute"),
        "final_loss": losses[-1],
    }  # fmt: skip


def measure(
    mode: str,
    args: argparse.Namespace,
    plat: tuple,
    base: Path,
    batches: list,
    device: torch.device,
) -> dict[str, Any]:
    _, build_classifier, FinetuneModelConfig = plat
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    cfg = FinetuneModelConfig(model_dir=str(base), mode=mode)
    names = [f"class{i}" for i in range(args.classes)]
    model = build_classifier(
        cfg, task="cell", label_names=names, seed=0, on_gpu=device.type == "cuda"
    )
    if mode == "full":
        model.to(device)
    result = run(mode, model, batches, device, args.warmup)
    del model
    return result


def update_results_md(doc: dict[str, Any]) -> Path:
    """Replace this GPU's row (or add one) in the fine-tuning section of RESULTS.md."""
    m = doc["metrics"]
    gpu = doc["device"].split(";")[0].removeprefix("gpu: ")
    row = (f"| {doc['date']} | {gpu} | {m['preset']} | {m['batch_size']} x {m['length']} | "
           f"{m['full.samples_per_s']:.1f} | {m['qlora.samples_per_s']:.1f} | "
           f"{m['full.peak_mem_gb']:.2f} | {m['qlora.peak_mem_gb']:.2f} | `{doc['command']}` |")  # fmt: skip
    header = ["## Fine-tuning, one GPU (`bench/finetune.py`)", "",
              "Full fine-tuning (bf16 autocast, fused AdamW) vs QLoRA (4-bit NF4 base, double "
              "quantization, LoRA r=32 on query/key/value), same batches, same run. All figures: "
              "`results/finetune.json`.", "",
              "| date | GPU | preset | cells x tokens | full cells/s | QLoRA cells/s | full peak GB | "
              "QLoRA peak GB | command |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    return update_results_section("finetune", header, row=row, device=gpu)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gf-104m")
    p.add_argument("--length", type=int, default=2048, help="tokens per cell")
    p.add_argument("--batch-size", type=int, default=16, help="cells per step")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-record", action="store_true", help="bench/out/finetune.json only")
    p.add_argument("--cpu-dry-run", action="store_true", help="no GPU: tiny sizes -> bench/out")
    args = p.parse_args(argv)
    if args.cpu_dry_run:
        for k, v in DRY.items():
            setattr(args, k, v)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_dry_run:
        print("bench/finetune.py measures one GPU and no CUDA device is visible; check the code "
              "path on CPU with --cpu-dry-run (writes bench/out/finetune_dry.json only).", file=sys.stderr)  # fmt: skip
        return 2
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(1)
    plat = load_platform()
    base = base_model_dir(plat[0], args.preset, args.length)
    batches = make_batches(args.warmup + args.steps, args.batch_size, args.length, args.classes)
    if cuda:
        props = torch.cuda.get_device_properties(device)
        dev = f"gpu: {props.name} ({props.total_memory / 1024**3:.1f} GiB); torch {torch.__version__}, CUDA {torch.version.cuda}; host {device_string()}"
    else:
        dev = device_string()
    print(
        f"device: {dev}\n{args.preset}: {args.batch_size} cells x {args.length} tokens, {args.steps} timed steps"
    )
    results = {mode: measure(mode, args, plat, base, batches, device) for mode in ("full", "qlora")}
    metrics: dict[str, Any] = {"preset": args.preset, "length": args.length, "batch_size": args.batch_size,
                               "steps": args.steps}  # fmt: skip
    for mode, r in results.items():
        for key, value in r.items():
            if value is not None:
                metrics[f"{mode}.{key}"] = round(value, 4) if isinstance(value, float) else value
    metrics["qlora_vs_full.samples_per_s"] = round(
        results["qlora"]["samples_per_s"] / results["full"]["samples_per_s"], 3
    )
    if cuda:
        metrics["qlora_vs_full.peak_mem"] = round(
            results["qlora"]["peak_mem_gb"] / results["full"]["peak_mem_gb"], 3
        )
    rows = [[m, r["precision"], r["trainable_params"], round(r["samples_per_s"], 2),
             round(r["peak_mem_gb"], 2) if r["peak_mem_gb"] is not None else "-"] for m, r in results.items()]  # fmt: skip
    print(format_table(rows, ["mode", "precision", "trainable", "cells/s", "peak GB"]))
    if not cuda or args.no_record:
        name = "finetune_dry.json" if not cuda else "finetune.json"
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        doc = {"device": dev, "command": command_line(), "metrics": metrics}
        (OUT_DIR / name).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {OUT_DIR / name} (not a recorded result)")
        return 0
    path = write_results("finetune", metrics, device=dev)
    update_results_md(json.loads(path.read_text()))
    print(f"wrote {path} and {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
