"""Stage 1 end to end: catalog -> cells -> medians -> vocabulary -> tokenized (Ray Data).

``output_dir`` is a local (or mounted) folder or an object-store prefix
(``s3://bucket/prefix``, ``gs://...``). Each sub-artifact is written with
:func:`cellfoundry.artifacts.write_artifact` (on object storage: data under a run-unique
sub-prefix, the manifest last); Ray tasks read and write through the driver's pyarrow
filesystem, so no node needs a filesystem shared with the driver. Ingest parts and the
duplicates found go to ``<output_dir>/_work`` first, so a crashed run resumes without
reading again what it had read; on object storage that scratch prefix is deleted once the
``cells`` artifact is complete (locally it stays, as it always has).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from cellfoundry import artifacts, storage
from cellfoundry.config.schema import ActorPoolConfig, CorpusConfig
from cellfoundry.corpus import catalog as cat
from cellfoundry.corpus import dedup, ingest, qc, sources, vocab_stage
from cellfoundry.corpus.filemap import part_name, run_per_item
from cellfoundry.corpus.ingest import GeneIndex, ProbedDataset
from cellfoundry.corpus.vocab_stage import Where, child
from cellfoundry.genes import GeneTable

logger = logging.getLogger(__name__)


@dataclass
class CorpusResult:
    """Paths of the artifacts a corpus run produced (or reused) and its counts: ``Path``s
    for a local ``output_dir``, URIs (``str``) for an object-store one."""

    catalog: Where
    cells: Where
    medians: Where
    vocabulary: Where
    tokenized: Where
    counts: dict[str, Any]

    def paths(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items() if k != "counts"}


def _n_partitions(n_rows: int) -> int:
    # Ray Data's default of 200 shuffle partitions is slow on small data (PITFALLS.md).
    return int(max(1, min(200, n_rows // 250_000)))


def _catalog_stage(cfg: CorpusConfig, out: Where) -> tuple[Where, list[cat.DatasetEntry]]:
    entries = cat.load_catalog(cfg.catalog)
    rows = [{**e.to_row(), "signature": ingest.file_signature(e.uri)} for e in entries]
    path = child(out, "catalog")
    fp = artifacts.fingerprint("catalog", rows, {})
    if artifacts.reusable(path, "catalog", fp):
        logger.info("catalog: reusing %s", path)
        return path, entries
    with artifacts.write_artifact(path, "catalog", rows) as w:
        pl.DataFrame([e.to_row() for e in entries]).write_parquet(w.dir / "catalog.parquet")
        w.counts = {"datasets": len(entries)}
    return path, entries


def _probe_all(
    entries: list[cat.DatasetEntry],
    cfg: CorpusConfig,
    genes: GeneIndex,
    table: GeneTable,
    salt: str,
) -> tuple[list[ProbedDataset], dict[str, dict[str, Any]]]:
    """Probe every dataset in its own Ray task; failures are quarantined, not raised."""
    import ray

    probe = ray.remote(num_cpus=1, max_retries=0)(ingest.probe_dataset)
    genes_ref, table_ref = ray.put(genes), ray.put(table)
    refs = {
        e.id: probe.remote(e, i, genes_ref, table_ref, cfg.rows_per_chunk, salt)
        for i, e in enumerate(entries)
    }
    probed, quarantined = [], {}
    for e in entries:
        try:
            probed.append(ray.get(refs[e.id]))
        except ray.exceptions.RayTaskError as exc:
            cause = exc.as_instanceof_cause()
            reason = str(cause.args[0]) if getattr(cause, "args", None) else str(cause)
            logger.error("quarantined dataset %s: %s", e.id, reason)
            n_cells = sources.count_cells(e.uri, e.format, matrix=e.matrix) or 0
            quarantined[e.id] = {"reason": reason, "n_cells": n_cells}
    return probed, quarantined


def _ingest(
    probed: list[ProbedDataset],
    work: Where,
    genes: GeneIndex,
    metadata_columns: list[str],
    pool: ActorPoolConfig,
) -> list[dict[str, Any]]:
    plan = {
        p.entry.id: {
            "entry": p.entry, "index": p.index, "col_map": p.col_map, "n_genes": len(genes),
            "flags": genes.flags, "format": p.gene_report["format"], "metadata_columns": metadata_columns,
        }
        for p in probed
    }  # fmt: skip
    fs = storage.filesystem(work)  # tasks write the parts with the driver's settings
    items = [
        {"dataset_id": p.entry.id, "start": s, "stop": t,
         "part_dir": storage.resolve(ingest.part_dir(work, p))[1]}
        for p in probed
        for s, t in p.chunks
    ]  # fmt: skip
    return run_per_item(items, ingest.IngestChunks, pool=pool, plan=plan, filesystem=fs)


def _part_files(folder: str) -> list[str]:
    """The ``part-*.parquet`` files directly in ``folder`` (a path or URI), in name order."""
    names = storage.list_files(folder, recursive=False)
    return [storage.join(folder, n) for n in names if fnmatch.fnmatch(n, "part-*.parquet")]


def _part_start(file: str) -> int:
    """The first row of an ingest part, from its name ``part-<first row>.parquet``."""
    return int(storage.name(file).removesuffix(".parquet").split("-")[1])


def _cells_stage(
    cfg: CorpusConfig, out: Where, catalog_path: Where, entries: list[cat.DatasetEntry]
) -> Where:
    path, work = child(out, "cells"), child(out, "_work")
    table = GeneTable.load(cfg.gene_table)
    salt = ingest.file_signature(str(table.source)) if getattr(table, "source", None) else "default"
    stage_cfg = {
        "gene_table": cfg.gene_table,
        "rows_per_chunk": cfg.rows_per_chunk,
        "qc": asdict(cfg.qc),
        "salt": salt,
    }
    fp = artifacts.fingerprint("cells", stage_cfg, {"catalog": catalog_path})
    previous = artifacts.reusable(path, "cells", fp)
    if previous and not previous["counts"]["quarantined"]:
        logger.info("cells: reusing %s", path)
        _remove_remote_scratch(work)  # what a run that crashed after the commit left
        return path
    genes = GeneIndex.from_table(table)
    dataset_status: dict[str, dict[str, Any]] = {}
    doi_dups = cat.doi_duplicates(entries)
    to_read = []
    for e in entries:
        reason = cat.exclusion_reason(e, cfg.qc)
        if e.id in doi_dups:
            dataset_status[e.id] = {"status": "duplicate_dataset", "duplicate_of": doi_dups[e.id]}
        elif reason:
            dataset_status[e.id] = {"status": reason}
        else:
            to_read.append(e)
    # Excluded datasets are not read, only probed for their cell counts.
    probed_all, quarantined = _probe_all(entries, cfg, genes, table, salt)
    by_id = {p.entry.id: p for p in probed_all}
    probed = [by_id[e.id] for e in to_read if e.id in by_id]
    metadata_columns = sorted({k for e in to_read for k in e.metadata})
    stats = _ingest(probed, work, genes, metadata_columns, cfg.compute)
    errors: dict[str, str] = {}
    for s in stats:
        if s["error"] and s["dataset_id"] not in errors:
            errors[s["dataset_id"]] = s["error"]
    for ds_id, reason in errors.items():
        quarantined[ds_id] = {"reason": reason, "n_cells": by_id[ds_id].n_cells}
        ingest.remove_parts(work, ds_id)
    for ds_id, q in quarantined.items():
        if ds_id in by_id:
            q["n_cells"] = by_id[ds_id].n_cells
        dataset_status[ds_id] = {"status": "quarantined", **q}
    good = [p for p in probed if p.entry.id not in quarantined]
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for s in stats:
        by_dataset.setdefault(s["dataset_id"], []).append(s)
    thresholds = {}
    for p in good:
        mine = by_dataset[p.entry.id]
        m_counts = ingest.merge_moments([s["n_counts_moments"] for s in mine])
        m_mito = ingest.merge_moments([s["pct_mito_moments"] for s in mine])
        thresholds[p.entry.id] = qc.Thresholds.from_moments(
            m_counts, m_mito, cfg.qc.n_sd, cfg.qc.min_protein_coding_genes
        )
        dataset_status[p.entry.id] = {
            "status": "read",
            "thresholds": thresholds[p.entry.id].to_dict(),
            "genes": p.gene_report,
        }
        _drop_stale_parts(work, p)
    parts = [(p, f) for p in good for f in _part_files(ingest.part_dir(work, p))]
    files = [f for _, f in parts]
    duplicates = dedup.DuplicateIndex()  # where the duplicates are, never them all
    if cfg.qc.deduplicate_cells:
        panels = {
            p.entry.id: np.bincount(p.col_map[p.col_map >= 0], minlength=len(genes)) > 0
            for p in good
        }
        duplicates = dedup.find_duplicates(
            files, panels, min_identity=cfg.qc.duplicate_min_identity,
            num_partitions=_n_partitions(sum(p.n_cells for p in good)),
            out_dir=child(work, "dedup"), n_cells=sum(p.n_cells for p in good),
            single_task_max_cells=cfg.single_task_max_cells,
        )  # fmt: skip
    with artifacts.write_artifact(path, "cells", stage_cfg, {"catalog": catalog_path}) as w:
        genes_table = pa.table({
            "index": pa.array(np.arange(len(genes)), pa.int32()), "ensembl_id": genes.ensembl_ids,
            "symbol": genes.symbols, "biotype": genes.biotypes, "chromosome": genes.chromosomes,
        })  # fmt: skip
        pq.write_table(genes_table, w.dir / "genes.parquet")  # small: staged on the driver
        # Tasks write the parts straight into the artifact's data (a temp folder, or the
        # run's sub-prefix on object storage), through the driver's filesystem.
        fs, data = storage.resolve(storage.join(w.uri, "data"))
        items = [
            {"src": storage.resolve(f)[1], "dataset_id": p.entry.id,
             "dst": f"{data}/{part_name(p.index, _part_start(f))}"}
            for p, f in parts
        ]  # fmt: skip
        results = run_per_item(
            items, dedup.AssignQCParts, pool=cfg.compute, thresholds=thresholds,
            duplicates=duplicates, filesystem=fs,
        )  # fmt: skip
        w.counts = _reconcile(results, entries, dataset_status, by_id)
        w.extra["datasets"] = dataset_status
        summary = w.counts.pop("_per_dataset")
        pl.DataFrame(summary).write_parquet(w.dir / "qc_summary.parquet")
    _remove_remote_scratch(work)
    return path


def _remove_remote_scratch(work: Where) -> None:
    """On object storage, delete the ``_work`` prefix once ``cells`` is complete: nothing
    reads it any more, and objects outside an artifact would stay unseen (and billed) in
    the bucket. A local ``_work`` folder is kept as before."""
    if storage.is_remote(work):
        storage.delete_prefix(work)


def _drop_stale_parts(work: Where, p: ProbedDataset) -> None:
    """Parts from an earlier version of a dataset's file are no longer needed."""
    root = storage.join(work, "ingest", p.entry.id)
    for name, is_dir in storage.list_children(root).items():
        if name != p.fingerprint:
            if is_dir:
                storage.delete_prefix(storage.join(root, name))
            else:
                storage.delete_file(storage.join(root, name))


def _reconcile(
    results: list[dict[str, Any]],
    entries: list[cat.DatasetEntry],
    status: dict[str, dict[str, Any]],
    probed: dict[str, ProbedDataset],
) -> dict[str, Any]:
    """Counts that add up: cells_in = passed + filtered + duplicates + quarantined."""
    outcomes: dict[str, dict[str, int]] = {}
    for r in results:
        mine = outcomes.setdefault(r["dataset_id"], {})
        for outcome, n in r["outcomes"].items():
            mine[outcome] = mine.get(outcome, 0) + int(n)
    filtered: dict[str, int] = {}
    quarantined: dict[str, dict[str, Any]] = {}
    passed = duplicates = cells_in = 0
    rows = []
    for e in entries:
        st = status.get(e.id, {"status": "missing"})
        n = probed[e.id].n_cells if e.id in probed else int(st.get("n_cells", 0))
        cells_in += n
        if st["status"] == "read":
            for outcome, k in sorted(outcomes.get(e.id, {}).items()):
                rows.append({"dataset_id": e.id, "outcome": outcome, "cells": k})
                if outcome == qc.PASSED:
                    passed += k
                elif outcome == qc.DUPLICATE:
                    duplicates += k
                else:
                    filtered[outcome] = filtered.get(outcome, 0) + k
        elif st["status"] == "duplicate_dataset":
            duplicates += n
            rows.append({"dataset_id": e.id, "outcome": "duplicate_dataset", "cells": n})
        elif st["status"] == "quarantined":
            quarantined[e.id] = {"reason": st["reason"], "n_cells": n}
            rows.append({"dataset_id": e.id, "outcome": "quarantined", "cells": n})
        else:
            filtered[st["status"]] = filtered.get(st["status"], 0) + n
            rows.append({"dataset_id": e.id, "outcome": st["status"], "cells": n})
    total = (
        passed
        + duplicates
        + sum(filtered.values())
        + sum(q["n_cells"] for q in quarantined.values())
    )
    assert total == cells_in, f"counts do not reconcile: {total} != {cells_in}"
    return {
        "cells_in": cells_in, "passed": passed, "filtered": filtered, "duplicates": duplicates,
        "quarantined": quarantined, "datasets": len(entries), "_per_dataset": rows,
    }  # fmt: skip


def run_corpus(cfg: CorpusConfig) -> CorpusResult:
    """Run stage 1 (Ray must be initialised); reuses complete artifacts whose inputs are unchanged.

    ``cfg.output_dir`` may be an object-store prefix (``s3://bucket/prefix``): its bucket is
    checked before any work (:class:`~cellfoundry.artifacts.ArtifactError` naming the URI
    and the setting to fix), and the result's paths are then URIs."""
    from cellfoundry.runtime import configure_data_context

    configure_data_context()  # deterministic order: the same outputs on 1 or 100 nodes
    out: Where
    if storage.is_remote(cfg.output_dir):
        out = storage.normalize(cfg.output_dir)
    else:
        out = Path(cfg.output_dir).resolve()
    with contextlib.ExitStack() as claims:  # one writer per output; checked before any work
        for kind in ("catalog", "cells", "medians", "vocabulary", "tokenized"):
            claims.enter_context(
                artifacts.claim_output(child(out, kind), kind, object_storage=True)
            )
        if isinstance(out, Path):
            out.mkdir(parents=True, exist_ok=True)
        catalog_path, entries = _catalog_stage(cfg, out)
        cells_path = _cells_stage(cfg, out, catalog_path, entries)
        medians_path = vocab_stage.medians_stage(cfg, out, cells_path)
        vocab_path = vocab_stage.vocabulary_stage(cfg, out, cells_path, medians_path)
        tokenized_path = vocab_stage.tokenized_stage(cfg, out, cells_path, vocab_path)
    counts = artifacts.read_manifest(cells_path)["counts"]
    counts["tokenized"] = artifacts.read_manifest(tokenized_path)["counts"]
    return CorpusResult(catalog_path, cells_path, medians_path, vocab_path, tokenized_path, counts)


def run_corpus_job(
    config: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> CorpusResult:
    """What ``cellfoundry corpus`` and ``jobs/corpus.py`` do: load the YAML, join Ray, run."""
    from cellfoundry.config import CorpusJobConfig, load_config
    from cellfoundry.runtime import init_ray

    cfg = load_config(CorpusJobConfig, config, overrides)
    init_ray(cfg.ray)
    return run_corpus(cfg.corpus)


__all__ = ["CorpusResult", "run_corpus", "run_corpus_job"]
