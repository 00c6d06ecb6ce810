"""``cellfoundry tokenize``: single-cell files -> rank value tokens with Geneformer dictionaries.

Genes: ``var["ensembl_id"]`` when present, else the var names as symbols. Following the
reference tokenizer, IDs are upper-cased and collapsed through the dictionaries'
``ensembl_mapping_dict``; counts of genes that collapse to one ID are summed. Symbols are
resolved by the mapping dictionary (which holds upper-cased symbols and aliases), then by
``gene_name_id_dict``, then by the offline gene table. ``n_counts`` is ``obs["n_counts"]``
when present, else the cell's total raw count over all genes of its file. A present column
that is zero, negative or not finite for a cell to tokenise fails that file (it would
mis-rank the cell's genes), unless ``recompute_n_counts``: then such cells use their total
raw count. Cells with no vocabulary gene are dropped and counted, as the corpus stage
filters and counts cells.

``obs_columns`` (``--obs-columns cell_type,donor``) are carried into every shard as string
columns beside ``input_ids`` and ``length``, as Geneformer's ``custom_attr_name_dict`` carries
them, so the output can be fine-tuned on and loads in Geneformer's own tools
(``datasets.load_from_disk(OUT/hf)`` with ``--hf``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cellfoundry import artifacts, storage
from cellfoundry.corpus import sources
from cellfoundry.corpus.cells import list_array, remap_csr, row_sums
from cellfoundry.corpus.encode import RankEncoder
from cellfoundry.corpus.filemap import PerItem, part_name, resolve, run_per_item
from cellfoundry.corpus.ingest import file_signature
from cellfoundry.corpus.tokenized import length_histogram, merge_histograms, write_hf_layout
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


#: Columns every shard has; an obs column may not take one of these names.
SHARD_COLUMNS = ("cell_id", "source", "input_ids", "length")


def check_obs_columns(uri: str, requested: Sequence[str], available: Sequence[str]) -> None:
    """Raise ``ValueError`` naming ``uri``, the requested obs columns it lacks and those it
    has (a user's list checked before any work starts)."""
    missing = [c for c in requested if c not in available]
    if missing:
        raise ValueError(
            f"{uri}: obs has no column {', '.join(map(repr, missing))} (asked for by "
            f"--obs-columns); its obs columns are: {', '.join(available) or 'none'}"
        )


def parse_obs_columns(value: str | Sequence[str] | None) -> list[str]:
    """``"cell_type,donor"`` or a list -> the column names, checked (no duplicates, no name
    of a shard column)."""
    if value is None:
        return []
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [n.strip() for n in names if n.strip()]
    clash = sorted(set(names) & set(SHARD_COLUMNS))
    if clash:
        raise ValueError(
            f"--obs-columns {clash} would replace the shards' own column(s) of that name "
            f"({', '.join(SHARD_COLUMNS)}); rename the obs column in the file"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"--obs-columns names a column twice: {names}")
    return names


#: Why a cell is not tokenised (manifest ``counts["filtered"]``, as the corpus stage counts).
NO_VOCABULARY_GENES = "no_vocabulary_genes"
RECOMPUTE_FIX = (
    "pass --recompute-n-counts (tokenize_files(recompute_n_counts=True)) to use those cells' "
    "total raw count over all genes of the file instead, or fix or drop the column in the file"
)


def check_n_counts(
    n_counts: np.ndarray, totals: np.ndarray, tokenised: np.ndarray, recompute: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``(n_counts to encode with, bad)``: ``bad`` marks the cells to tokenise whose
    ``obs["n_counts"]`` is zero, negative, NaN or infinite; with ``recompute`` their
    ``totals`` (total raw count over all genes of the file) replace those values.

    All float64 / bool [n_cells]; ``tokenised`` marks the cells with a vocabulary gene.
    """
    bad = tokenised & ~(np.isfinite(n_counts) & (n_counts > 0))
    return (np.where(bad, totals, n_counts) if recompute else n_counts), bad


class TokenizeChunks(PerItem):
    """Ray Data UDF: one (file, cell range) in, one token shard out.

    Cells with no vocabulary gene are dropped and counted. Cells whose ``obs["n_counts"]``
    cannot rank genes (zero, negative, NaN, infinite) make the chunk fail and are counted,
    unless ``recompute_n_counts`` (then their total raw count is used, and counted).
    ``obs_columns`` are written as string columns ("" where a value is missing).
    Shards go to ``item["out_dir"]`` within ``filesystem`` (local when None).
    """

    def __init__(
        self, plan: Any, encoder: Any, recompute_n_counts: Any = False, filesystem: Any = None,
        obs_columns: Any = (),
    ) -> None:  # fmt: skip
        self.filesystem = resolve(filesystem)
        self.plan: dict[str, Any] = resolve(plan)
        self.encoder: RankEncoder = resolve(encoder)
        self.recompute: bool = bool(resolve(recompute_n_counts))
        self.obs_columns: list[str] = list(resolve(obs_columns))
        self.max_length = self.encoder.max_genes + (2 if self.encoder.special else 0)

    def process(self, item: dict[str, Any]) -> dict[str, Any]:
        uri, start, stop = str(item["uri"]), int(item["start"]), int(item["stop"])
        p = self.plan[uri]
        result: dict[str, Any] = {"uri": uri, "error": "", "rows": 0, "cells_in": stop - start,
                                  NO_VOCABULARY_GENES: 0, "bad_n_counts": 0, "bad_example": ""}  # fmt: skip
        try:
            chunk = sources.read_chunk(uri, p["format"], start, stop, obs_columns=self.obs_columns)
        except (sources.SourceError, ValueError, OSError) as exc:
            # One bad file must not take down the others: report it, write nothing.
            logger.error("%s, cells %d-%d: %s", uri, start, stop, exc)
            return {**result, "error": str(exc)}
        ptr, idx, cnt = remap_csr(
            chunk.indptr, chunk.indices, chunk.data, p["col_map"], len(self.encoder.token_ids)
        )
        tokenised = np.diff(ptr) > 0  # cells with a vocabulary gene (counts > 0)
        totals = row_sums(chunk.indptr, chunk.data.astype(np.float64))
        n_counts = totals  # no obs["n_counts"]: the cell's total raw count over all genes
        if chunk.n_counts_obs is not None:
            n_counts, bad = check_n_counts(chunk.n_counts_obs, totals, tokenised, self.recompute)
            result["bad_n_counts"] = int(bad.sum())
            if bad.any():
                i = int(np.argmax(bad))
                result["bad_example"] = f"cell {str(chunk.barcodes[i])!r}: {chunk.n_counts_obs[i]}"
                if not self.recompute:
                    return {**result, "error": f"{uri}: obs/n_counts: invalid for "
                                               f"{result['bad_n_counts']} cells"}  # fmt: skip
        result[NO_VOCABULARY_GENES] = int((~tokenised).sum())
        # Dropped cells hold no entries, so only the row pointers change.
        ptr = np.concatenate([[0], ptr[1:][tokenised]])
        offsets, tokens = self.encoder.encode(ptr, idx, cnt, n_counts[tokenised])
        table = pa.table({
            "cell_id": pa.array(chunk.barcodes[tokenised].astype(str), pa.string()),
            "source": pa.array([uri] * int(tokenised.sum()), pa.string()),
            "input_ids": list_array(offsets, tokens, pa.int32()),
            "length": pa.array(np.diff(offsets), pa.int64()),
            **{c: pa.array(chunk.obs[c][tokenised].astype(str), pa.string())
               for c in self.obs_columns},
        })  # fmt: skip
        out = f"{item['out_dir']}/{part_name(p['index'], start)}"
        storage.write_parquet(table, out, self.filesystem)
        return {
            **result,
            "rows": table.num_rows,
            "lengths": length_histogram(np.diff(offsets), self.max_length),
        }


def _file_counts(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per input file: cells in, tokenised, dropped (no vocabulary gene), bad n_counts."""
    files: dict[str, dict[str, Any]] = {}
    for r in results:
        f = files.setdefault(r["uri"], {"cells_in": 0, "cells": 0, NO_VOCABULARY_GENES: 0,
                                        "bad_n_counts": 0, "bad_example": ""})  # fmt: skip
        f["cells_in"] += r["cells_in"]
        f["cells"] += r["rows"]
        f[NO_VOCABULARY_GENES] += r[NO_VOCABULARY_GENES]
        f["bad_n_counts"] += r["bad_n_counts"]
        f["bad_example"] = f["bad_example"] or r["bad_example"]
    return files


@artifacts.holds_output("tokenized", lambda *_, output, **__: output, object_storage=True)
def tokenize_files(
    inputs: Sequence[str],
    *,
    dictionaries: str | Path,
    mode: str,
    output: str | Path,
    model_input_size: int | None = None,
    rows_per_chunk: int = 4096,
    gene_table: str | None = None,
    recompute_n_counts: bool = False,
    obs_columns: str | Sequence[str] | None = None,
    hf: bool = False,
) -> dict[str, Any]:
    """Tokenise files into ``output/*.parquet`` (cell_id, source, input_ids, length and the
    ``obs_columns``) + manifest; with ``hf`` also the same rows in ``output/hf`` in the
    layout ``datasets.save_to_disk`` writes (what Geneformer's tools load).

    ``output`` is a local folder or an object-store prefix (``s3://bucket/prefix``; see
    :mod:`cellfoundry.artifacts` for how it commits there; read the shards back with
    :func:`cellfoundry.artifacts.data_files`). Ray must be initialised. A file that cannot
    be read is skipped and reported in the manifest's ``quarantined``; the others are
    written. So is a file whose ``obs["n_counts"]`` is zero, negative, NaN or infinite for a
    cell to tokenise (it would mis-rank the cell's genes), unless ``recompute_n_counts``:
    then those cells use their total raw count, which is logged and counted
    (``counts["n_counts_recomputed"]``). Cells with no vocabulary gene are dropped and
    counted (``counts["filtered"]``); over the files written,
    ``cells_in = cells + sum(filtered)``. ``obs_columns`` (names, or ``"a,b"``) must exist
    in every readable file: else ``ValueError`` naming the file, the column and the columns
    it has, before any cell is tokenised. Returns the manifest.
    """

    from cellfoundry.runtime import configure_data_context

    configure_data_context()  # output rows in input order
    columns = parse_obs_columns(obs_columns)
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
        # a readable file without a requested column is the user's mistake, not the file's:
        # one clear error before any work rather than an output with that file left out
        check_obs_columns(uri, columns, info.obs_columns)
        reports[uri] = report
        plan[uri] = {"format": info.format, "col_map": col_map, "index": len(plan)}
        rows = info.n_cells if info.format in sources.WHOLE_FILE_FORMATS else rows_per_chunk
        items += [
            {"uri": uri, "start": s, "stop": t} for s, t in sources.chunk_ranges(info.n_cells, rows)
        ]
    config = {"inputs": list(inputs), "signatures": [file_signature(u) for u in inputs],
              "dictionaries": str(Path(dictionaries).resolve()), "mode": mode,
              "model_input_size": model_input_size, "gene_table": gene_table,
              "recompute_n_counts": recompute_n_counts, "obs_columns": columns, "hf": hf}  # fmt: skip
    out = storage.normalize(output) if storage.is_remote(output) else Path(output)
    fp = artifacts.fingerprint("tokenized", config, {})
    previous = artifacts.reusable(out, "tokenized", fp)
    if previous and not previous["counts"]["quarantined"]:
        logger.info("tokenize: reusing %s", out)
        return previous
    with artifacts.write_artifact(out, "tokenized", config) as w:
        fs, out_dir = storage.resolve(w.uri)  # Ray tasks write with the driver's settings
        for item in items:
            item["out_dir"] = out_dir
        results = run_per_item(
            items, TokenizeChunks, plan=plan, encoder=dg.encoder,
            recompute_n_counts=recompute_n_counts, filesystem=fs, obs_columns=columns,
        )  # fmt: skip
        files = _file_counts(results)
        for r in results:
            uri = r["uri"]
            if r["error"] and uri not in quarantined:
                f = files[uri]
                quarantined[uri] = r["error"]
                if f["bad_n_counts"]:  # every chunk's bad cells, in one message
                    quarantined[uri] = str(sources.SourceError(
                        uri, "obs/n_counts",
                        f"is zero, negative or not a finite number for {f['bad_n_counts']} of its "
                        f"{f['cells_in']} cells (e.g. {f['bad_example']}), which would mis-rank "
                        "their genes", RECOMPUTE_FIX,
                    ))  # fmt: skip
                logger.error("skipping %s: %s", uri, quarantined[uri])
                # No half-tokenised file: drop the shards of a file that failed mid-way.
                mine = f"part-{plan[uri]['index']:05d}-"
                for shard in storage.list_files(w.uri, recursive=False):
                    if shard.startswith(mine) and shard.endswith(".parquet"):
                        storage.delete_file(storage.join(w.uri, shard))
        written = {u: f for u, f in files.items() if u not in quarantined}
        for uri, f in written.items():
            if f["bad_n_counts"]:
                logger.warning(
                    "%s: obs['n_counts'] is zero, negative or not finite for %d of %d cells "
                    "(e.g. %s); recomputed from their raw counts (--recompute-n-counts)",
                    uri, f["bad_n_counts"], f["cells_in"], f["bad_example"],
                )  # fmt: skip
            if f[NO_VOCABULARY_GENES]:
                logger.warning(
                    "%s: %d of %d cells have no gene of the %s vocabulary; dropped",
                    uri, f[NO_VOCABULARY_GENES], f["cells_in"], mode,
                )  # fmt: skip
        good = [r["lengths"] for r in results if not r["error"] and r["uri"] not in quarantined]
        max_length = dg.encoder.max_genes + (2 if mode == "v2" else 0)
        hist = (
            merge_histograms(good) if good else length_histogram(np.zeros(0, np.int64), max_length)
        )
        w.counts = {
            "cells_in": sum(f["cells_in"] for f in written.values()),
            "cells": hist["cells"],
            "filtered": {
                NO_VOCABULARY_GENES: sum(f[NO_VOCABULARY_GENES] for f in written.values())
            },
            "n_counts_recomputed": sum(f["bad_n_counts"] for f in written.values()),
            "files": len(plan) - len(set(quarantined) & set(plan)),
            "quarantined": quarantined,
        }
        w.extra["files"] = {
            uri: {"cells_in": f["cells_in"], "cells": f["cells"],
                  "filtered": {NO_VOCABULARY_GENES: f[NO_VOCABULARY_GENES]},
                  "n_counts_recomputed": f["bad_n_counts"]}
            for uri, f in written.items()
        }  # fmt: skip
        w.extra["genes"] = reports
        w.extra["length_histogram"] = hist
        shards = [
            storage.join(w.uri, name)
            for name in sorted(storage.list_files(w.uri, recursive=False))
            if name.startswith("part-") and name.endswith(".parquet")
        ]
        if hf and shards:  # Geneformer's tools read datasets.load_from_disk(OUT/hf)
            w.extra["hf"] = write_hf_layout(shards, storage.join(w.uri, "hf"))
    return artifacts.read_manifest(out)
