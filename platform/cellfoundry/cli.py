"""``cellfoundry <stage> ...``: thin commands over the library (each calls one function)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from cellfoundry import artifacts, runtime
from cellfoundry.logs import drop_stderr_lines, no_bars_without_terminal, setup_logging

logger = logging.getLogger("cellfoundry.cli")


def _corpus(args: argparse.Namespace) -> int:
    from cellfoundry.corpus.pipeline import run_corpus_job

    result = run_corpus_job(args.config, args.set)
    print(json.dumps({"artifacts": result.paths(), "counts": result.counts}, indent=2))
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from cellfoundry.train import run_pretrain_job

    print(json.dumps(run_pretrain_job(args.config, args.set), indent=2))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from cellfoundry.tune import run_finetune_job

    print(json.dumps(run_finetune_job(args.config, args.set), indent=2))
    return 0


def _tune(args: argparse.Namespace) -> int:
    from cellfoundry.tune import run_tune_job

    print(json.dumps(run_tune_job(args.config, args.set), indent=2, default=str))
    return 0


def _embed(args: argparse.Namespace) -> int:
    from cellfoundry.infer.embed_job import run_embed_job

    flags = [
        f"{k}={v}"
        for k, v in (("model", args.model), ("tokenized", args.input), ("output", args.output))
        if v
    ]
    print(json.dumps(run_embed_job(args.config, [*flags, *args.set]), indent=2))
    return 0


def _perturb(args: argparse.Namespace) -> int:
    from cellfoundry.infer.perturb_job import run_perturb_job

    print(json.dumps(run_perturb_job(args.config, args.set), indent=2))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from cellfoundry.serve import run_serve_job

    run_serve_job(args.config, args.set, blocking=True)
    return 0


def _evaluate_probe(args: argparse.Namespace) -> int:
    from cellfoundry.config import ProbeConfig, load_config
    from cellfoundry.evaluate.probe import run_probe

    cfg = load_config(ProbeConfig, args.config, args.set)
    report = run_probe(cfg)
    print(
        json.dumps(
            {"output_dir": cfg.output_dir, "summary": report.get("summary")}, indent=2, default=str
        )
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from cellfoundry.demo import run_demo, summary_text

    summary = run_demo(
        synthetic=True if args.synthetic else None,
        serve_api=not args.no_serve,
        output=args.output,
    )
    # a person reads this; the JSON (every step's full result) is in the file it names
    print("\n" + summary_text(summary))
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    from cellfoundry.config import RayConfig
    from cellfoundry.corpus.tokenize_files import tokenize_files

    runtime.init_ray(RayConfig(address=args.address, num_cpus=args.num_cpus))
    runtime.configure_data_context()
    manifest = tokenize_files(
        args.inputs, dictionaries=args.dictionaries, mode=args.mode, output=args.output,
        model_input_size=args.model_input_size, rows_per_chunk=args.rows_per_chunk,
        gene_table=args.gene_table, recompute_n_counts=args.recompute_n_counts,
        obs_columns=args.obs_columns, hf=args.hf,
    )  # fmt: skip
    failed = manifest["counts"]["quarantined"]
    print(
        json.dumps(
            {"output": args.output, "cells": manifest["counts"]["cells"], "failed": failed},
            indent=2,
        )
    )
    return 1 if failed else 0


def _synth(args: argparse.Namespace) -> int:
    from cellfoundry.corpus.synthetic import generate_synthetic

    data = generate_synthetic(args.output, n_cells=args.cells, seed=args.seed, n_genes=args.genes)
    files = {k: str(v) for k, v in data.files.items()}
    print(json.dumps({"catalog": str(data.catalog), "gene_table": str(data.gene_table), "files": files,
                      "expected": data.truth["expected"]}, indent=2))  # fmt: skip
    return 0


def _evaluate_masked(args: argparse.Namespace) -> int:
    from cellfoundry.evaluate.masked import run_masked_job

    flags = {"model": args.model, "tokenized": args.tokens, "output_dir": args.output}
    sets = [f"{k}={v}" for k, v in flags.items() if v is not None] + args.set
    print(json.dumps(run_masked_job(args.config, sets), indent=2))
    return 0


def _evaluate_batch(args: argparse.Namespace) -> int:
    from cellfoundry.evaluate.batch import run_batch_job

    flags = {"embeddings": args.embeddings, "batch_key": args.batch_key, "label_key": args.label_key,
             "gene_embeddings": args.gene_embeddings, "output_dir": args.output}  # fmt: skip
    sets = [f"{k}={v}" for k, v in flags.items() if v is not None] + args.set
    print(json.dumps(run_batch_job(args.config, sets), indent=2))
    return 0


def _config_args(
    p: argparse.ArgumentParser, where: str, example: str, *, required: bool = True
) -> None:
    """``--config FILE`` and repeatable ``--set KEY=VALUE`` overrides."""
    p.add_argument("--config", required=required, default=None, help=f"YAML config (see {where})")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help=f"override, e.g. {example}"
    )


def _overwrite_arg(p: argparse.ArgumentParser) -> None:
    """``--overwrite``: the output may replace an artifact of another kind (never other files)."""
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an artifact of another kind at the output path (files and folders that "
        "are not artifacts are never replaced)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellfoundry", description=__doc__)
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "corpus", help="stage 1: catalog -> cells -> medians -> vocabulary -> tokenized"
    )
    _config_args(p, "jobs/configs/corpus/", "corpus.qc.n_sd=2.5")
    _overwrite_arg(p)
    p.set_defaults(func=_corpus)

    p = sub.add_parser(
        "pretrain", help="stage 2: pretrain a BERT on tokenized cells (Ray Train + DeepSpeed)"
    )
    _config_args(p, "jobs/configs/pretrain/", "optim.lr=1e-4")
    _overwrite_arg(p)
    p.set_defaults(func=_pretrain)

    p = sub.add_parser(
        "finetune",
        help="stage 3: fine-tune a classifier (full, probe, few-shot, QLoRA) + baselines",
    )
    _config_args(p, "jobs/configs/finetune/", "optim.learning_rate=0.0001")
    _overwrite_arg(p)
    p.set_defaults(func=_finetune)

    p = sub.add_parser("tune", help="stage 3: hyperparameter search (Ray Tune + HyperOpt + ASHA)")
    _config_args(p, "jobs/configs/tune/", "tune.num_samples=16")
    _overwrite_arg(p)
    p.set_defaults(func=_tune)

    p = sub.add_parser(
        "embed", help="stage 4: cell (.h5ad) and gene (Parquet) embeddings (Ray Data)"
    )
    p.add_argument("--model", help="model directory")
    p.add_argument("--input", help="tokenized artifact (part-*.parquet shards)")
    p.add_argument("--output", help="AnnData file to write, OUT.h5ad")
    _config_args(p, "jobs/configs/embed/; flags override it", "layer=-1", required=False)
    _overwrite_arg(p)
    p.set_defaults(func=_embed)

    p = sub.add_parser("perturb", help="stage 4: in-silico perturbation screen (Ray Data)")
    _config_args(p, "jobs/configs/perturb/", "fraction=0.5")
    _overwrite_arg(p)
    p.set_defaults(func=_perturb)

    p = sub.add_parser(
        "serve", help="stage 5: the HTTP API (/embed, /classify, /perturb) on Ray Serve"
    )
    _config_args(p, "jobs/configs/serve/", "http.port=8001")
    p.set_defaults(func=_serve)

    p = sub.add_parser(
        "demo", help="every stage's smoke run in order on one local cluster, then a summary"
    )
    p.add_argument(
        "--synthetic", action="store_true", help="use generated data even if ../shared/data exists"
    )
    p.add_argument(
        "--no-serve", action="store_true", help="skip starting and querying the HTTP API"
    )
    p.add_argument(
        "--output",
        metavar="ROOT",
        help="root of every output instead of artifacts/smoke: a folder or s3://bucket/prefix "
        "(endpoint and keys from the AWS environment: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)",
    )
    p.set_defaults(func=_demo)

    p = sub.add_parser("tokenize", help="tokenize h5ad/loom/10x files with Geneformer dictionaries")
    p.add_argument("inputs", nargs="+", help="input files (h5ad, loom, 10x .h5, 10x mtx folders)")
    p.add_argument(
        "--dictionaries", required=True, help="folder with token and median dictionaries"
    )
    p.add_argument("--mode", choices=["v1", "v2"], default="v2")
    p.add_argument(
        "--output", required=True,
        help="output folder or s3:// prefix (Parquet shards + manifest.json)",
    )  # fmt: skip
    p.add_argument(
        "--model-input-size", type=int, default=None, help="default 4096 (v2) / 2048 (v1)"
    )
    p.add_argument("--rows-per-chunk", type=int, default=4096)
    p.add_argument("--gene-table", default=None, help="gene table for symbol lookup")
    p.add_argument(
        "--recompute-n-counts",
        action="store_true",
        help="where obs['n_counts'] is zero, negative or not finite, use the cell's total raw "
        "count (default: such a file fails)",
    )
    p.add_argument(
        "--obs-columns", default=None, metavar="A,B",
        help="obs columns to carry into the shards beside input_ids and length, e.g. "
        "cell_type,donor (every file must have them)",
    )  # fmt: skip
    p.add_argument(
        "--hf", action="store_true",
        help="also write OUT/hf, the rows in datasets.save_to_disk layout (Geneformer's tools "
        "read it with datasets.load_from_disk)",
    )  # fmt: skip
    p.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local cluster")
    _overwrite_arg(p)
    p.set_defaults(func=_tokenize)

    p = sub.add_parser(
        "synth", help="write realistic synthetic h5ad files + catalog (no ../shared/data needed)"
    )
    p.add_argument(
        "--output",
        required=True,
        help="folder for the .h5ad files, genes.tsv, catalog.yaml, truth.json",
    )
    p.add_argument("--cells", type=int, default=3000, help="cells over all files (default 3000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    p.add_argument("--genes", type=int, default=2000, help="genes in the panel (default 2000)")
    p.set_defaults(func=_synth)

    p = sub.add_parser(
        "evaluate", help="evaluation: masked-gene accuracy, batch robustness, probes"
    )
    ev = p.add_subparsers(dest="evaluation", required=True)
    q = ev.add_parser("masked", help="masked-gene accuracy of a model vs the rank baseline")
    q.add_argument("--model", help="model directory (config.json, safetensors, token dictionary)")
    q.add_argument("--tokens", help="tokenized artifact (part-*.parquet shards)")
    q.add_argument("--output", help="report folder (default: <model>-eval-masked beside the model)")
    _config_args(q, "jobs/configs/evaluate/", "holdout.max_cells=500", required=False)
    _overwrite_arg(q)
    q.set_defaults(func=_evaluate_masked)
    q = ev.add_parser("batch", help="cosine similarities of cell / gene pairs across batches")
    q.add_argument("--embeddings", help="cell embeddings .h5ad (.obsm['X_cellfoundry'])")
    q.add_argument("--batch-key", help=".obs column of batches (default dataset_id)")
    q.add_argument("--label-key", help=".obs column of cell types (default cell_type)")
    q.add_argument("--gene-embeddings", help="gene embeddings Parquet (one row per gene and group)")
    q.add_argument("--output", help="report folder (default: <embeddings stem>-eval-batch)")
    _config_args(q, "jobs/configs/evaluate/", "max_pairs=50000", required=False)
    _overwrite_arg(q)
    q.set_defaults(func=_evaluate_batch)
    q = ev.add_parser("probe", help="linear probe on frozen embeddings vs fine-tuned vs baselines")
    _config_args(q, "jobs/configs/evaluate/probe-smoke.yaml", "methods=[probe]")
    q.set_defaults(func=_evaluate_probe)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cellfoundry`` command."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    if argv is None:  # the console command, not a caller (a test) with its own stderr capture
        no_bars_without_terminal()
        drop_stderr_lines()
    try:
        with artifacts.allow_overwrite(getattr(args, "overwrite", False)):
            return int(args.func(args))
    except ValueError as exc:  # user mistakes: one clear line, no traceback
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
