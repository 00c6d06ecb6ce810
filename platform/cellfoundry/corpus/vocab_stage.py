"""Stage 1, second half: corpus medians, the vocabulary, and the tokenized shards.

Each artifact is a local folder or an object-store prefix (``s3://``, ``gs://``; see
:mod:`cellfoundry.artifacts`). Inputs are read through their manifests
(:func:`cellfoundry.artifacts.data_files`); what Ray tasks write goes to the artifact's
:attr:`~cellfoundry.artifacts.ArtifactWriter.uri` through the driver's filesystem, what the
driver writes (medians, dictionaries) to its staging folder
(:attr:`~cellfoundry.artifacts.ArtifactWriter.dir`).
"""

from __future__ import annotations

import fnmatch
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from cellfoundry import artifacts, storage
from cellfoundry.config.schema import CorpusConfig
from cellfoundry.corpus import qc
from cellfoundry.corpus.encode import RankEncoder
from cellfoundry.corpus.filemap import on_filesystem, run_per_item, table_at
from cellfoundry.corpus.medians import MedianResult, TableFiles, compute_medians, medians_to_table
from cellfoundry.corpus.tokenized import EncodeFiles, merge_histograms, write_hf_layout
from cellfoundry.genes import (
    GeneformerDictionaries,
    build_vocabulary,
    load_token_dictionary,
    save_token_dictionary,
)

logger = logging.getLogger(__name__)

MEDIANS_FILE = "gene_median_dictionary.json"
TOKENS_FILE = "token_dictionary.json"


Where = Path | str
"""An artifact's place: a local folder (``Path``) or an object-store URI (``str``)."""


def child(out: Where, name: str) -> Where:
    """``out/name``, a ``Path`` for a local folder and a URI for an object-store prefix."""
    return out / name if isinstance(out, Path) else storage.join(out, name)


def _cell_files(cells: Where) -> list[str]:
    """The cells parts (local paths or URIs), in name order, as the manifest lists them."""
    return artifacts.data_files(cells, "data/part-*.parquet")


def _genes(cells: Where) -> list[str]:
    """The corpus genes' Ensembl IDs, by corpus gene index."""
    return table_at(artifacts.data_files(cells, "genes.parquet")[0])["ensembl_id"].to_pylist()


def _passed_cells(cells: Where, columns: list[str] | None = None):
    import ray

    files = _cell_files(cells)
    if not files:
        raise ValueError(
            f"{cells}: no cell passed QC in any dataset; check the catalog and the cells manifest"
        )
    cols = None if columns is None else [*columns, "qc"]
    fs, paths = on_filesystem(files)  # read tasks use the driver's filesystem
    return ray.data.read_parquet(paths, columns=cols, filesystem=fs).map_batches(
        qc.is_passed, batch_format="pyarrow"
    )


def _medians_in_one_task(
    paths: list[str], filesystem: Any, n_genes: int, options: dict[str, Any]
) -> MedianResult:
    """:func:`compute_medians` over the passed cells of ``paths``, one file at a time."""
    columns = ["gene_ids", "counts", "n_counts"]
    files = TableFiles(
        paths, filesystem, [*columns, "qc"], lambda t: qc.is_passed(t).select(columns)
    )
    return compute_medians(files, n_genes, **options)


def medians_stage(cfg: CorpusConfig, out: Where, cells: Where) -> Where:
    """Non-zero median of count / n_counts * 10,000 per corpus gene, over passed cells."""
    path = child(out, "medians")
    stage_cfg = asdict(cfg.medians)
    fp = artifacts.fingerprint("medians", stage_cfg, {"cells": cells})
    if artifacts.reusable(path, "medians", fp):
        logger.info("medians: reusing %s", path)
        return path
    genes = _genes(cells)
    options = {"method": cfg.medians.method, "bins": cfg.medians.bins,
               "max_values_per_gene": cfg.medians.max_values_per_gene}  # fmt: skip
    passed = int(artifacts.read_manifest(cells, "cells")["counts"]["passed"])
    if 0 < passed <= cfg.single_task_max_cells:
        # A small corpus in one Ray task: no reducer actors to start (same medians, bitwise)
        import ray

        fs, paths = on_filesystem(_cell_files(cells))
        task = ray.remote(num_cpus=1)(_medians_in_one_task)
        result = ray.get(task.remote(paths, fs, len(genes), options))
    else:
        ds = _passed_cells(cells, ["gene_ids", "counts", "n_counts"])
        result = compute_medians(ds, len(genes), **options)
    with artifacts.write_artifact(path, "medians", stage_cfg, {"cells": cells}) as w:
        table = medians_to_table(result, genes)
        pq.write_table(table, w.dir / "medians.parquet")
        w.counts = {"genes_detected": int((result.n_detected > 0).sum()), "passes": result.passes}
        w.extra["method"] = {
            "name": result.method,
            "relative_error_bound": result.relative_error_bound,
        }
    return path


def vocabulary_stage(cfg: CorpusConfig, out: Where, cells: Where, medians: Where) -> Where:
    """token_dictionary.json (+ medians) from the corpus, or from Geneformer dictionaries."""
    path = child(out, "vocabulary")
    stage_cfg = {"mode": cfg.tokenize.mode, "dictionaries": cfg.tokenize.dictionaries}
    inputs = {"cells": cells, "medians": medians}
    fp = artifacts.fingerprint("vocabulary", stage_cfg, inputs)
    if artifacts.reusable(path, "vocabulary", fp):
        logger.info("vocabulary: reusing %s", path)
        return path
    if cfg.tokenize.dictionaries:
        d = GeneformerDictionaries.load(cfg.tokenize.dictionaries)
        if d.version != cfg.tokenize.mode:
            raise ValueError(
                f"tokenize.dictionaries {cfg.tokenize.dictionaries} are {d.version} dictionaries but "
                f"tokenize.mode is {cfg.tokenize.mode}; use matching ones"
            )
        tokens, med = d.token_dictionary, d.gene_medians
        mapping = d.ensembl_mapping
        source = str(d.source)
    else:
        from cellfoundry.genes import GeneTable

        table = pl.from_arrow(table_at(artifacts.data_files(medians, "medians.parquet")[0]))
        assert isinstance(table, pl.DataFrame)
        table = table.filter(pl.col("n_cells_detected") > 0)
        tokens = build_vocabulary(
            table["ensembl_id"].to_list(),
            mode=cfg.tokenize.mode,
            gene_table=GeneTable.load(cfg.gene_table),
        )
        all_med = dict(zip(table["ensembl_id"].to_list(), table["median"].to_list(), strict=True))
        med = {g: all_med[g] for g in tokens if g in all_med}
        mapping, source = {}, "corpus"
    with artifacts.write_artifact(path, "vocabulary", stage_cfg, inputs) as w:
        save_token_dictionary(tokens, w.dir / TOKENS_FILE)
        (w.dir / MEDIANS_FILE).write_text(json.dumps(med))
        if mapping:
            (w.dir / "ensembl_mapping_dict.json").write_text(json.dumps(mapping))
        w.counts = {"tokens": len(tokens), "genes": sum(1 for g in tokens if not g.startswith("<"))}
        w.extra["source"] = source
    return path


def corpus_encoder(
    vocab: Where, ensembl_ids: list[str], mode: str, max_genes: int
) -> tuple[RankEncoder, np.ndarray]:
    """Encoder over the vocabulary's genes, and the corpus gene id -> vocabulary position map.
    ``vocab``: a vocabulary artifact (a remote one is read from this node's cache)."""
    vocab = artifacts.localize(vocab)
    tokens = load_token_dictionary(vocab / TOKENS_FILE)
    med = json.loads((vocab / MEDIANS_FILE).read_text())
    mapping_file = vocab / "ensembl_mapping_dict.json"
    mapping = json.loads(mapping_file.read_text()) if mapping_file.exists() else {}
    genes = sorted(g for g in tokens if not g.startswith("<") and g in med)
    position = {g: i for i, g in enumerate(genes)}
    if mapping:  # Geneformer convention: upper-case, then collapse through the mapping dictionary.
        gene_map = np.array(
            [position.get(mapping.get(g.upper(), ""), -1) for g in ensembl_ids], np.int32
        )
    else:
        gene_map = np.array([position.get(g, -1) for g in ensembl_ids], np.int32)
    encoder = RankEncoder(
        token_ids=np.array([tokens[g] for g in genes], np.int32),
        medians=np.array([med[g] for g in genes], np.float64),
        max_genes=max_genes,
        cls_id=tokens.get("<cls>") if mode == "v2" else None,
        eos_id=tokens.get("<eos>") if mode == "v2" else None,
    )
    return encoder, gene_map


def tokenized_stage(cfg: CorpusConfig, out: Where, cells: Where, vocab: Where) -> Where:
    """Rank value encode every passed cell into Parquet shards + the datasets layout.

    The shards are ``part-*.parquet`` at the top of the artifact's data, as
    ``cellfoundry tokenize`` writes them, so pretraining and inference read either alike."""
    path = child(out, "tokenized")
    stage_cfg = asdict(cfg.tokenize)
    inputs = {"cells": cells, "vocabulary": vocab}
    fp = artifacts.fingerprint("tokenized", stage_cfg, inputs)
    if artifacts.reusable(path, "tokenized", fp):
        logger.info("tokenized: reusing %s", path)
        return path
    genes = _genes(cells)
    encoder, gene_map = corpus_encoder(vocab, genes, cfg.tokenize.mode, cfg.tokenize.max_genes)
    fs, sources = on_filesystem(_cell_files(cells))
    meta = [c for c in pq.read_schema(sources[0], filesystem=fs).names if c not in _CELL_FIELDS]
    keep = ["cell_id", "dataset_id", *meta]
    with artifacts.write_artifact(path, "tokenized", stage_cfg, inputs) as w:
        # Tasks write the shards straight into the artifact's data (a temp folder, or the
        # run's sub-prefix on object storage), through the driver's filesystem.
        out_fs, data = storage.resolve(w.uri)
        items = [
            {"src": src, "dst": f"{data.rstrip('/')}/{src.rpartition('/')[2]}"} for src in sources
        ]
        results = run_per_item(
            items, EncodeFiles, pool=cfg.compute, encoder=encoder, gene_map=gene_map,
            keep_columns=keep, max_length=cfg.tokenize.model_input_size, filesystem=out_fs,
        )  # fmt: skip
        shards = [
            storage.join(w.uri, name)
            for name in storage.list_files(w.uri, recursive=False)
            if fnmatch.fnmatch(name, "part-*.parquet")
        ]
        hist = merge_histograms([r["lengths"] for r in results])
        hf = write_hf_layout(shards, storage.join(w.uri, "hf"))
        w.counts = {"cells": hist["cells"], "tokens": hist["tokens"], "shards": len(shards)}
        w.extra["length_histogram"] = hist
        w.extra["hf"] = hf
    return path


_CELL_FIELDS = {
    "cell_id", "dataset_id", "order", "gene_ids", "counts", "n_counts", "n_genes",
    "n_pc_genes", "pct_mito", "content_hash", "dedup_key", "qc",
}  # fmt: skip
