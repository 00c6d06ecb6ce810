"""The whole mission end to end on one local Ray cluster (what ``make demo`` runs).

corpus -> pretrain (tiny) -> fine-tune + a small HyperOpt search -> embeddings + UMAP ->
a small perturbation screen with statistics -> evaluation -> Serve, queried over HTTP ->
a summary of every artifact and picture. Each step is the same library call its job
entrypoint makes, with the ``smoke`` config of its stage (``jobs/configs/<stage>/smoke.yaml``).
Over the real data in ../shared/data when present; otherwise over generated data
(``cellfoundry synth``). Reruns reuse finished artifacts.

``output`` (``cellfoundry demo --output ROOT``) puts every artifact, run folder and picture
under ROOT instead of ``artifacts/smoke``: another local folder, or an object-store prefix
(``s3://bucket/demo``, with the standard AWS environment), where every stage reads its
inputs from and writes its outputs to the bucket.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellfoundry import artifacts, runtime, storage
from cellfoundry.config import RayConfig
from cellfoundry.paths import REPO_ROOT, shared_path

logger = logging.getLogger(__name__)

CONFIGS = REPO_ROOT / "jobs" / "configs"
SMOKE = REPO_ROOT / "artifacts" / "smoke"
#: How the smoke configs name the demo's output root (rewritten for ``--output``).
SMOKE_PREFIX = "artifacts/smoke"
_ROOT: dict[str, str] = {}  # the output root of the running demo, when not the default
_CONFIG_DIR: list[Path] = []  # where the rewritten configs go (removed when the demo ends)


def _reset_root(root: str | None) -> None:
    _ROOT.clear()
    if root is not None:
        _ROOT["root"] = root
    while _CONFIG_DIR:
        shutil.rmtree(_CONFIG_DIR.pop(), ignore_errors=True)


def _config(stage: str, name: str = "smoke") -> str:
    path = CONFIGS / stage / f"{name}.yaml"
    root = _ROOT.get("root")
    if root is None:
        return str(path)
    # The smoke configs are the demo's single source of truth; only their output root
    # changes, so they are copied with every artifacts/smoke path moved under ``root``.
    if not _CONFIG_DIR:
        _CONFIG_DIR.append(Path(tempfile.mkdtemp(prefix="cf-demo-configs-")))
    out = _CONFIG_DIR[0] / stage / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(path.read_text().replace(SMOKE_PREFIX, root))
    return str(out)


def demo_root() -> str:
    """The output root of the demo being run (``artifacts/smoke`` unless ``--output``)."""
    return _ROOT.get("root") or str(SMOKE)


# The smoke configs name pbmc_facs and real marker genes; on generated data the labelled
# dataset is synth_facs, and the screen deletes every expressed gene of a few cells instead.
SYNTHETIC_OVERRIDES: dict[str, list[str]] = {
    "finetune": ["data.dataset_ids=[synth_facs]"],
    "tune": ["finetune.data.dataset_ids=[synth_facs]"],
    "probe": ["finetune.data.dataset_ids=[synth_facs]"],
    "perturb": [
        "perturbations=[]",
        "genome_wide=delete",
        "max_cells=8",
        "goal.value=CD14 monocytes",
    ],
}


def _step(name: str, fn: Callable[[], Any], timings: dict[str, float]) -> Any:
    logger.info("demo: %s ...", name)
    t0 = time.perf_counter()
    out = fn()
    timings[name] = round(time.perf_counter() - t0, 1)
    logger.info("demo: %s done in %.0f s", name, timings[name])
    return out


def _corpus_step(synthetic: bool) -> dict[str, Any]:
    from cellfoundry.corpus.pipeline import run_corpus_job

    if not synthetic:
        result = run_corpus_job(_config("corpus"), [])
        return {"artifacts": result.paths(), "counts": result.counts}
    from cellfoundry.corpus.synthetic import generate_synthetic

    data = SMOKE.parent / "synthetic" / "data"  # the sources stay local
    gen = generate_synthetic(data)
    result = run_corpus_job(
        _config("corpus", "synthetic"),
        [
            f"corpus.catalog={gen.catalog}",
            f"corpus.gene_table={gen.gene_table}",
            f"corpus.output_dir={demo_root()}",
        ],
    )
    return {"artifacts": result.paths(), "counts": result.counts, "synthetic_data": str(data)}


def query_serve(url: str, cell: dict[str, int], classifier: str | None) -> dict[str, Any]:
    """One request per route against a running API; returns a compact view of the answers."""
    import requests

    out: dict[str, Any] = {"healthz": requests.get(f"{url}/healthz", timeout=30).json()}
    emb = requests.post(f"{url}/embed", json={"genes": cell}, timeout=120).json()
    out["embed"] = {
        "dim": emb["dim"],
        "n_tokens": emb["n_tokens"],
        "genes": {k: emb["genes"][k] for k in ("n_genes", "n_used")},
    }
    from cellfoundry.serve import CellTokenizer

    # the server's tokenizer, in-process (a model on object storage is cached locally first)
    tokenizer = CellTokenizer.for_model(artifacts.localize(storage.join(demo_root(), "model")))
    names = {v: k for k, v in tokenizer.token_dictionary.items()}
    top = [names[int(i)] for i in tokenizer.tokenize(cell)[0][1:3]]  # the two top-ranked genes
    pert = requests.post(
        f"{url}/perturb",
        json={
            "genes": cell,
            "perturbations": [
                {"type": "delete", "genes": [top[0]]},
                {"type": "inhibit", "genes": [top[1]]},
            ],
        },
        timeout=120,
    ).json()
    out["perturb"] = pert.get("results", pert)
    if classifier:
        cls = requests.post(
            f"{url}/classify", json={"genes": cell, "classifier": classifier}, timeout=120
        ).json()
        out["classify"] = {"label": cls.get("label"), "error": cls.get("error")}
    bad = requests.post(f"{url}/embed", json={"genes": {"CD3E": -1}}, timeout=30)
    out["bad_request"] = {"status": bad.status_code, "error": bad.json()["error"]}
    return out


def _serve_step(finetuned: str | None) -> dict[str, Any]:
    import pyarrow.parquet as pq
    from ray import serve

    from cellfoundry.config import load_config
    from cellfoundry.config.serve import ServeJobConfig
    from cellfoundry.serve import run_serve

    overrides = [f"classifiers.cells={finetuned}"] if finetuned else []
    cfg = load_config(ServeJobConfig, _config("serve"), overrides)
    handle = run_serve(cfg)
    try:
        cells = storage.join(demo_root(), "cells")
        fs, path = storage.resolve(artifacts.data_files(cells, "genes.parquet")[0])
        genes = pq.read_table(path, filesystem=fs)["ensembl_id"].to_pylist()
        fs, path = storage.resolve(artifacts.data_files(cells, "data/part-*.parquet")[0])
        row = pq.ParquetFile(path, filesystem=fs).read_row_group(0).slice(0, 1).to_pylist()[0]
        cell = {genes[g]: int(c) for g, c in zip(row["gene_ids"], row["counts"], strict=True)}
        return {"url": handle.url, **query_serve(handle.url, cell, "cells" if finetuned else None)}
    finally:
        serve.shutdown()


def _probe_step(overrides: list[str]) -> dict[str, Any]:
    from cellfoundry.config import ProbeConfig, load_config
    from cellfoundry.evaluate.probe import run_probe

    cfg = load_config(ProbeConfig, _config("evaluate", "probe-smoke"), overrides)
    return {"output_dir": cfg.output_dir, "summary": run_probe(cfg).get("summary")}


def outputs(root: str | Path = SMOKE) -> dict[str, list[str]]:
    """Every artifact (a folder or prefix with manifest.json) and picture (PNG) under
    ``root``; on object storage only pictures inside committed artifacts."""
    names = storage.list_files(root)
    found = sorted(
        storage.parent(storage.join(root, n))
        for n in names
        if storage.name(n) == artifacts.MANIFEST and "_work" not in n.split("/")
    )
    return {
        "artifacts": found,
        "pictures": sorted(storage.join(root, n) for n in names if n.endswith(".png")),
    }


def _scores(summary: dict[str, Any], main: str) -> str:
    """``full: macro F1 0.212, accuracy 0.402 (logreg 0.556, ...)`` from a comparison."""
    first = summary.get(main, {})
    others = [
        f"{name} {m['macro_f1']:.3f}"
        for name, m in summary.items()
        if name != main and isinstance(m, dict) and "macro_f1" in m
    ]
    text = f"{main}: macro F1 {first.get('macro_f1', float('nan')):.3f}, accuracy {first.get('accuracy', float('nan')):.3f}"
    return text + (f" (macro F1 of {', '.join(others)})" if others else "")


def _figures(name: str, r: dict[str, Any]) -> str:
    """The key figures of one demo step's result, in a few words."""
    if r.get("reused"):
        return "reused (same config and inputs)"
    if name == "corpus":
        c = r["counts"]
        tok = c.get("tokenized", {})
        return (
            f"{c['passed']:,} of {c['cells_in']:,} cells passed QC ({c.get('duplicates', 0):,} "
            f"duplicates), {tok.get('tokens', 0):,} tokens in {tok.get('shards', 0)} shards"
        )
    if name == "pretrain":
        return f"{r['steps']} steps, final masked-gene loss {r['final_loss']:.3f}"
    if name in ("finetune", "evaluate_probe"):
        summary = r["summary"]
        return _scores(summary, "probe" if name == "evaluate_probe" else next(iter(summary)))
    if name == "tune":
        best = max((t.get("best_val_macro_f1") or 0.0 for t in r.get("trials", [])), default=0.0)
        return (
            f"{r.get('finished_trials', 0)} trials, best val macro F1 {best:.3f}; test "
            + _scores(r["summary"], next(iter(r["summary"])))
        )
    if name == "embed":
        return f"{r['n_cells']:,} cells -> {r['h5ad']}"
    if name == "perturb":
        c = r["counts"]
        return f"{c['cells_perturbed']:,} cells x {c['perturbations']} perturbations, {c['rows']:,} rows"
    if name == "evaluate_masked":
        return (
            f"masked-gene accuracy {r['model_accuracy_mean']:.4f} vs rank baseline "
            f"{r['baseline_accuracy_mean']:.4f} over {r['n_cells']:,} cells"
        )
    if name == "evaluate_batch":
        return f"{r['n_cells']:,} cells, separability index {r['separability_index']:.3f}"
    if name == "serve":
        label = r.get("classify", {}).get("label")
        return (
            f"{r['url']}: /embed dim {r['embed']['dim']}, /perturb {len(r['perturb'])} results"
            + (f", /classify {label!r}" if label else "")
            + f", a bad request -> {r['bad_request']['status']}"
        )
    return "done"


def summary_text(summary: dict[str, Any]) -> str:
    """The demo's end for a person: each step with its seconds and key figures, where the
    outputs and pictures are, and the JSON file with everything else."""
    seconds = summary.get("seconds", {})
    total = sum(seconds.values())
    root = str(summary.get("output", ""))
    lines = [
        f"demo over {summary.get('data')}: {len(summary.get('steps', {}))} steps in "
        f"{total / 60:.1f} min; outputs under {root}"
    ]
    for name, result in summary.get("steps", {}).items():
        label = name.replace("_", " ")
        try:
            figures = _figures(name, result)
        except (KeyError, TypeError, ValueError, StopIteration):
            figures = "done (see the JSON summary)"
        lines.append(f"  {label:<16} {seconds.get(label, 0):>6.0f} s  {figures}")
    pictures = summary.get("pictures", [])
    lines.append(f"pictures ({len(pictures)}):")
    prefix = root.rstrip("/") + "/"
    lines += [f"  {p[len(prefix) :] if p.startswith(prefix) else p}" for p in pictures]
    lines.append(
        f"artifacts: {len(summary.get('artifacts', []))}; everything in {summary_path(summary)}"
    )
    return "\n".join(lines)


def summary_path(summary: dict[str, Any]) -> str:
    """Where :func:`run_demo` wrote the summary JSON."""
    return storage.join(str(summary.get("output") or demo_root()), SUMMARY_FILE)


SUMMARY_FILE = "demo_summary.json"


def run_demo(
    *, synthetic: bool | None = None, serve_api: bool = True, output: str | None = None
) -> dict[str, Any]:
    """Run every stage's smoke config in order on one local cluster; return the summary
    (per-step results and seconds, every artifact and picture). ``output``: the root of
    every output (a local folder or ``s3://bucket/prefix``) instead of ``artifacts/smoke``."""
    root = None
    if output is not None:
        remote = storage.is_remote(output)
        root = storage.normalize(output) if remote else str(Path(output).resolve())
        if remote:
            storage.check_reachable(root)  # a wrong bucket or endpoint fails before any work
    _reset_root(root)
    try:
        return _run_demo(synthetic, serve_api)
    finally:
        _reset_root(None)


def _run_demo(synthetic: bool | None, serve_api: bool) -> dict[str, Any]:
    from cellfoundry.evaluate.batch import run_batch_job
    from cellfoundry.evaluate.masked import run_masked_job
    from cellfoundry.infer.embed_job import run_embed_job
    from cellfoundry.infer.perturb_job import run_perturb_job
    from cellfoundry.train import run_pretrain_job
    from cellfoundry.tune import run_tune_job
    from cellfoundry.tune.finetune import run_finetune_job

    if synthetic is None:
        synthetic = not shared_path("data", "h5ad").is_dir()
    runtime.init_ray(RayConfig(num_cpus=2, object_store_memory=300 * 1024**2))
    runtime.configure_data_context()
    t: dict[str, float] = {}

    def extra(stage: str) -> list[str]:
        return SYNTHETIC_OVERRIDES.get(stage, []) if synthetic else []

    steps: dict[str, Any] = {}
    steps["corpus"] = _step("corpus", lambda: _corpus_step(synthetic), t)
    steps["pretrain"] = _step("pretrain", lambda: run_pretrain_job(_config("pretrain"), []), t)
    steps["finetune"] = _step(
        "finetune", lambda: run_finetune_job(_config("finetune"), extra("finetune")), t
    )
    steps["tune"] = _step("tune", lambda: run_tune_job(_config("tune"), extra("tune")), t)
    steps["embed"] = _step("embed", lambda: run_embed_job(_config("embed"), []), t)
    steps["perturb"] = _step(
        "perturb", lambda: run_perturb_job(_config("perturb"), extra("perturb")), t
    )
    steps["evaluate_masked"] = _step(
        "evaluate masked", lambda: run_masked_job(_config("evaluate", "masked-smoke"), []), t
    )
    steps["evaluate_batch"] = _step(
        "evaluate batch", lambda: run_batch_job(_config("evaluate", "batch-smoke"), []), t
    )
    steps["evaluate_probe"] = _step("evaluate probe", lambda: _probe_step(extra("probe")), t)
    if serve_api:
        finetuned = storage.join(demo_root(), "finetuned")
        has_classifier = storage.exists(storage.join(finetuned, artifacts.MANIFEST))
        steps["serve"] = _step(
            "serve", lambda: _serve_step(finetuned if has_classifier else None), t
        )
    summary = {
        "data": "synthetic" if synthetic else "../shared/data",
        "seconds": t,
        "steps": steps,
        "output": demo_root(),
        **outputs(demo_root()),
    }
    storage.write_text(summary_path(summary), json.dumps(summary, indent=2, default=str) + "\n")
    return summary
