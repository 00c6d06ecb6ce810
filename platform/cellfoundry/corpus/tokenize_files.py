"""``cellfoundry tokenize``: single-cell files -> rank value tokens with Geneformer dictionaries.

Genes: ``var["ensembl_id"]`` when present, else the var names as symbols. Following the
reference tokenizer, IDs are upper-cased and collapsed through the dictionaries'
``ensembl_mapping_dict``; counts of genes that collapse to one ID are summed. Symbols are
resolved by the mapping dictionary (which holds upper-cased symbols and aliases), then by
``gene_name_id_dict``, then by the offline gene table. ``n_counts`` is ``obs["n_counts"]``
when present, else the cell's total raw count over all genes of its file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cellfoundry import artifacts
from cellfoundry.corpus import sources
from cellfoundry.corpus.cells import list_array, remap_csr, row_sums
from cellfoundry.corpus.encode import RankEncoder
from cellfoundry.corpus.filemap import PerItem, part_name, resolve, run_per_item, write_table_atomic
from cellfoundry.corpus.ingest import file_signature
from cellfoundry.corpus.tokenized import length_histogram, merge_histograms
from cellfoundry.genes import GeneformerDictionaries, GeneTable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DictionaryGenes:
    """The tokenisable genes of a dictionary set, and how names resolve to them."""

    dictionaries: GeneformerDictionaries
    genes: list[str]  # eligible Ensembl IDs, sorted
    encoder: RankEncoder

    @classmethod
    def load(
        cls, path: str | Path, mode: str, model_input_size: int | None = None
    ) -> DictionaryGenes:
        d = GeneformerDictionaries.load(path)
        if d.version != mode:
            raise ValueError(
                f"--dictionaries {path} holds {d.version} dictionaries but --mode is {mode}; "
                f"pass the {mode} dictionaries or --mode {d.version}"
            )
        genes, token_ids, medians = d.vocabulary_arrays()
        size = model_input_size or (4096 if mode == "v2" else 2048)
        encoder = RankEncoder(
            token_ids=token_ids,
            medians=medians,
            max_genes=size - (2 if mode == "v2" else 0),
            cls_id=d.token_dictionary["<cls>"] if mode == "v2" else None,
            eos_id=d.token_dictionary["<eos>"] if mode == "v2" else None,
        )
        return cls(d, list(genes), encoder)

    def column_map(
        self, names: Sequence[str], kind: str, table: GeneTable | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """int32 [n_names] -> position in ``genes`` (-1: not tokenised), and a mapping report."""
        position = {g: i for i, g in enumerate(self.genes)}
        mapping = self.dictionaries.ensembl_mapping
        name_id = self.dictionaries.gene_name_id

        def collapse(gene_id: str | None) -> str | None:
            if not gene_id:
                return None
            key = (
                gene_id.upper().split(".")[0]
                if gene_id.upper().startswith("ENS")
                else gene_id.upper()
            )
            return mapping.get(key) if mapping else key

        if kind == "ensembl":
            ids = [collapse(n) for n in names]
        else:
            ids = [collapse(n) or collapse(name_id.get(n)) for n in names]
            missing = [i for i, g in enumerate(ids) if g is None]
            if missing and table is not None:
                mapped = table.map_genes([names[i] for i in missing], kind="symbol").ensembl_ids
                for i, g in zip(missing, mapped, strict=True):
                    ids[i] = collapse(g)
        col_map = np.array([position.get(g, -1) if g else -1 for g in ids], dtype=np.int32)
        unmapped = [n for n, g in zip(names, ids, strict=True) if g is None]
        report = {
            "n_genes": len(names),
            "n_mapped": len(names) - len(unmapped),
            "n_in_vocabulary": int((col_map >= 0).sum()),
            "unmapped_examples": unmapped[:50],
        }
        return col_map, report


class TokenizeChunks(PerItem):
    """Ray Data UDF: one (file, cell range) in, one token shard out."""

    def __init__(self, plan: Any, encoder: Any) -> None:
        self.plan: dict[str, Any] = resolve(plan)
        self.encoder: RankEncoder = resolve(encoder)
        self.max_length = self.encoder.max_genes + (2 if self.encoder.special else 0)

    def process(self, item: dict[str, Any]) -> dict[str, Any]:
        uri, start, stop = str(item["uri"]), int(item["start"]), int(item["stop"])
        p = self.plan[uri]
        try:
            chunk = sources.read_chunk(uri, p["format"], start, stop)
        except (sources.SourceError, ValueError, OSError) as exc:
            # One bad file must not take down the others: report it, write nothing.
            logger.error("%s, cells %d-%d: %s", uri, start, stop, exc)
            return {"uri": uri, "error": str(exc), "rows": 0}
        n_counts = chunk.n_counts_obs
        if n_counts is None:  # the cell's total raw count over all genes of its file
            n_counts = row_sums(chunk.indptr, chunk.data.astype(np.float64))
        ptr, idx, cnt = remap_csr(
            chunk.indptr, chunk.indices, chunk.data, p["col_map"], len(self.encoder.token_ids)
        )
        offsets, tokens = self.encoder.encode(ptr, idx, cnt, n_counts)
        table = pa.table({
            "cell_id": pa.array(chunk.barcodes.astype(str), pa.string()),
            "source": pa.array([uri] * len(chunk.barcodes), pa.string()),
            "input_ids": list_array(offsets, tokens, pa.int32()),
            "length": pa.array(np.diff(offsets), pa.int64()),
        })  # fmt: skip
        write_table_atomic(table, Path(item["out_dir"]) / part_name(p["index"], start))
        return {
            "uri": uri,
            "error": "",
            "rows": table.num_rows,
            "lengths": length_histogram(np.diff(offsets), self.max_length),
        }


def tokenize_files(
    inputs: Sequence[str],
    *,
    dictionaries: str | Path,
    mode: str,
    output: str | Path,
    model_input_size: int | None = None,
    rows_per_chunk: int = 4096,
    gene_table: str | None = None,
) -> dict[str, Any]:
    """Tokenise files into ``output/*.parquet`` (cell_id, source, input_ids, length) + manifest.

    Ray must be initialised. A file that cannot be read is skipped and reported in the
    manifest's ``quarantined``; the others are written. Returns the manifest.
    """

    from cellfoundry.runtime import configure_data_context

    configure_data_context()  # output rows in input order
    dg = DictionaryGenes.load(dictionaries, mode, model_input_size)
    table: GeneTable | None = None
    plan, items, quarantined, reports = {}, [], {}, {}
    for uri in inputs:
        try:
            info = sources.probe(uri)
            if info.gene_id_kind != "ensembl" and table is None:
                table = GeneTable.load(gene_table)
            col_map, report = dg.column_map(info.gene_names, info.gene_id_kind, table)
            if report["n_in_vocabulary"] == 0:
                raise sources.SourceError(
                    uri, "var",
                    f"none of its {info.n_genes} genes (e.g. {info.gene_names[:3]}) is in the {mode} vocabulary",
                    "add var['ensembl_id'] with Ensembl gene IDs",
                )  # fmt: skip
        except (sources.SourceError, ValueError, OSError) as exc:
            logger.error("skipping %s: %s", uri, exc)
            quarantined[uri] = str(exc)
            continue
        reports[uri] = report
        plan[uri] = {"format": info.format, "col_map": col_map, "index": len(plan)}
        rows = info.n_cells if info.format in sources.WHOLE_FILE_FORMATS else rows_per_chunk
        items += [
            {"uri": uri, "start": s, "stop": t} for s, t in sources.chunk_ranges(info.n_cells, rows)
        ]
    config = {"inputs": list(inputs), "signatures": [file_signature(u) for u in inputs],
              "dictionaries": str(Path(dictionaries).resolve()), "mode": mode,
              "model_input_size": model_input_size, "gene_table": gene_table}  # fmt: skip
    out = Path(output)
    fp = artifacts.fingerprint("tokenized", config, {})
    previous = artifacts.reusable(out, "tokenized", fp)
    if previous and not previous["counts"]["quarantined"]:
        logger.info("tokenize: reusing %s", out)
        return previous
    with artifacts.write_artifact(out, "tokenized", config) as w:
        for item in items:
            item["out_dir"] = str(w.dir)
        results = run_per_item(items, TokenizeChunks, plan=plan, encoder=dg.encoder)
        for r in results:
            if r["error"] and r["uri"] not in quarantined:
                quarantined[r["uri"]] = r["error"]
                # No half-tokenised file: drop the shards of a file that failed mid-way.
                for shard in w.dir.glob(f"part-{plan[r['uri']]['index']:05d}-*.parquet"):
                    shard.unlink()
        good = [r["lengths"] for r in results if not r["error"] and r["uri"] not in quarantined]
        max_length = dg.encoder.max_genes + (2 if mode == "v2" else 0)
        hist = (
            merge_histograms(good) if good else length_histogram(np.zeros(0, np.int64), max_length)
        )
        w.counts = {
            "cells": hist["cells"],
            "files": len(plan) - len(set(quarantined) & set(plan)),
            "quarantined": quarantined,
        }
        w.extra["genes"] = reports
        w.extra["length_histogram"] = hist
    return artifacts.read_manifest(out)
