"""Stage 1, second half: corpus medians, the vocabulary, and the tokenized shards."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from cellfoundry import artifacts
from cellfoundry.config.schema import CorpusConfig
from cellfoundry.corpus import qc
from cellfoundry.corpus.encode import RankEncoder
from cellfoundry.corpus.filemap import run_per_item
from cellfoundry.corpus.medians import compute_medians, medians_to_table
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


def _cell_files(cells: Path) -> list[str]:
    return [str(f) for f in sorted((cells / "data").glob("part-*.parquet"))]


def _passed_cells(cells: Path, columns: list[str] | None = None):
    import ray

    files = _cell_files(cells)
    if not files:
        raise ValueError(
            f"{cells}: no cell passed QC in any dataset; check the catalog and the cells manifest"
        )
    cols = None if columns is None else [*columns, "qc"]
    return ray.data.read_parquet(files, columns=cols).map_batches(
        qc.is_passed, batch_format="pyarrow"
    )


def medians_stage(cfg: CorpusConfig, out: Path, cells: Path) -> Path:
    """Non-zero median of count / n_counts * 10,000 per corpus gene, over passed cells."""
    path = out / "medians"
    stage_cfg = asdict(cfg.medians)
    fp = artifacts.fingerprint("medians", stage_cfg, {"cells": cells})
    if artifacts.reusable(path, "medians", fp):
        logger.info("medians: reusing %s", path)
        return path
    genes = pq.read_table(cells / "genes.parquet")
    ds = _passed_cells(cells, ["gene_ids", "counts", "n_counts"])
    result = compute_medians(
        ds, genes.num_rows, method=cfg.medians.method, bins=cfg.medians.bins,
        max_values_per_gene=cfg.medians.max_values_per_gene,
    )  # fmt: skip
    with artifacts.write_artifact(path, "medians", stage_cfg, {"cells": cells}) as w:
        table = medians_to_table(result, genes["ensembl_id"].to_pylist())
        pq.write_table(table, w.dir / "medians.parquet")
        w.counts = {"genes_detected": int((result.n_detected > 0).sum()), "passes": result.passes}
        w.extra["method"] = {
            "name": result.method,
            "relative_error_bound": result.relative_error_bound,
        }
    return path


def vocabulary_stage(cfg: CorpusConfig, out: Path, cells: Path, medians: Path) -> Path:
    """token_dictionary.json (+ medians) from the corpus, or from Geneformer dictionaries."""
    path = out / "vocabulary"
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

        table = pl.read_parquet(medians / "medians.parquet").filter(pl.col("n_cells_detected") > 0)
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
    vocab: Path, ensembl_ids: list[str], mode: str, max_genes: int
) -> tuple[RankEncoder, np.ndarray]:
    """Encoder over the vocabulary's genes, and the corpus gene id -> vocabulary position map."""
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


def tokenized_stage(cfg: CorpusConfig, out: Path, cells: Path, vocab: Path) -> Path:
    """Rank value encode every passed cell into Parquet shards + the datasets layout."""
    path = out / "tokenized"
    stage_cfg = asdict(cfg.tokenize)
    inputs = {"cells": cells, "vocabulary": vocab}
    fp = artifacts.fingerprint("tokenized", stage_cfg, inputs)
    if artifacts.reusable(path, "tokenized", fp):
        logger.info("tokenized: reusing %s", path)
        return path
    genes = pq.read_table(cells / "genes.parquet")["ensembl_id"].to_pylist()
    encoder, gene_map = corpus_encoder(vocab, genes, cfg.tokenize.mode, cfg.tokenize.max_genes)
    meta = [c for c in pq.read_schema(_cell_files(cells)[0]).names if c not in _CELL_FIELDS]
    keep = ["cell_id", "dataset_id", *meta]
    with artifacts.write_artifact(path, "tokenized", stage_cfg, inputs) as w:
        items = [{"src": f, "dst": str(w.dir / Path(f).name)} for f in _cell_files(cells)]
        results = run_per_item(
            items, EncodeFiles, pool=cfg.compute, encoder=encoder, gene_map=gene_map,
            keep_columns=keep, max_length=cfg.tokenize.model_input_size,
        )  # fmt: skip
        shards = sorted(w.dir.glob("part-*.parquet"))
        hist = merge_histograms([r["lengths"] for r in results])
        hf = write_hf_layout(shards, w.dir / "hf")
        w.counts = {"cells": hist["cells"], "tokens": hist["tokens"], "shards": len(shards)}
        w.extra["length_histogram"] = hist
        w.extra["hf"] = hf
    return path


_CELL_FIELDS = {
    "cell_id", "dataset_id", "order", "gene_ids", "counts", "n_counts", "n_genes",
    "n_pc_genes", "pct_mito", "content_hash", "dedup_key", "qc",
}  # fmt: skip
