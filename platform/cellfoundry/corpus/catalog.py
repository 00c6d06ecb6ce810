"""The catalog: one row per source dataset, from YAML or CSV.

YAML::

    datasets:
      - id: pbmc_facs
        uri: ../shared/data/h5ad/pbmc_facs_zheng2017_3874cells.h5ad   # or s3://, gs://
        format: h5ad            # optional: h5ad | loom | 10x_h5 | 10x_mtx (from extension)
        doi: 10.1038/ncomms14049
        organ: blood
        platform: droplet       # anything else counts as non-droplet
        malignant: false
        cell_line: false
        gene_id_column: ensembl_id   # optional var column holding gene IDs or symbols
        matrix: X                    # X | raw/X | layers/<name>
        metadata: {cell_type: celltype}   # output column -> source obs column

CSV has the same columns; ``metadata`` is written ``cell_type=celltype;split=split``.
Relative paths are relative to the catalog file; ``{shared}`` is the shared data folder
(``$CELLFOUNDRY_SHARED`` or ``../shared``) and ``$VARS`` are expanded.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cellfoundry.paths import expand

logger = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9_.\-]+$")
_FIELDS = {
    "id", "uri", "format", "doi", "organ", "platform", "malignant", "cell_line",
    "gene_id_column", "matrix", "metadata",
}  # fmt: skip


class CatalogError(ValueError):
    """The catalog file is malformed; the message names the file, row, field and fix."""


@dataclass(frozen=True)
class DatasetEntry:
    """One source dataset."""

    id: str
    uri: str
    format: str | None = None
    doi: str | None = None
    organ: str = "unknown"
    platform: str = "droplet"
    malignant: bool = False
    cell_line: bool = False
    gene_id_column: str | None = None
    matrix: str = "X"
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def droplet(self) -> bool:
        return self.platform.strip().lower() in {"droplet", "10x", "drop-seq", "indrops"}

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["metadata"] = ";".join(f"{k}={v}" for k, v in self.metadata.items())
        return row


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"", "0", "false", "no", "n"}:
        return False
    if text in {"1", "true", "yes", "y"}:
        return True
    raise CatalogError(f"{where}: expected true/false, got {value!r}")


def _resolve_uri(uri: str, base: Path) -> str:
    # "{shared}" stands for the shared data folder, so a catalog works from any working dir
    # (e.g. a `ray job submit --working-dir` upload); $VARS are expanded too.
    uri = expand(uri)
    if "://" in uri:
        return uri
    path = Path(uri).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _entry(raw: dict[str, Any], base: Path, where: str) -> DatasetEntry:
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise CatalogError(f"{where}: unknown field(s) {unknown}; known: {sorted(_FIELDS)}")
    for required in ("id", "uri"):
        if not raw.get(required):
            raise CatalogError(f"{where}: field {required!r} is required")
    ds_id = str(raw["id"]).strip()
    if not _ID.match(ds_id):
        raise CatalogError(f"{where}: id {ds_id!r} may only hold letters, digits, '_', '.', '-'")
    metadata = raw.get("metadata") or {}
    if isinstance(metadata, str):
        pairs = [p for p in metadata.split(";") if p.strip()]
        if any("=" not in p for p in pairs):
            raise CatalogError(f"{where}: metadata must look like 'cell_type=celltype;split=split'")
        metadata = dict(p.split("=", 1) for p in pairs)
    if not isinstance(metadata, dict):
        raise CatalogError(f"{where}: metadata must map output column -> source column")
    return DatasetEntry(
        id=ds_id,
        uri=_resolve_uri(str(raw["uri"]).strip(), base),
        format=(str(raw["format"]).strip() or None) if raw.get("format") else None,
        doi=(str(raw["doi"]).strip().lower() or None) if raw.get("doi") else None,
        organ=str(raw.get("organ") or "unknown"),
        platform=str(raw.get("platform") or "droplet"),
        malignant=_bool(raw.get("malignant", False), f"{where}.malignant"),
        cell_line=_bool(raw.get("cell_line", False), f"{where}.cell_line"),
        gene_id_column=(str(raw["gene_id_column"]) or None) if raw.get("gene_id_column") else None,
        matrix=str(raw.get("matrix") or "X"),
        metadata={str(k).strip(): str(v).strip() for k, v in metadata.items()},
    )


def load_catalog(path: str | Path) -> list[DatasetEntry]:
    """Read a YAML (``datasets:`` list) or CSV catalog; ids must be unique."""
    path = Path(path)
    if not path.is_file():
        raise CatalogError(
            f"catalog {path} does not exist; write one (see cellfoundry.corpus.catalog)"
        )
    base = path.resolve().parent
    if path.suffix.lower() in {".yaml", ".yml"}:
        doc = yaml.safe_load(path.read_text()) or {}
        rows = doc.get("datasets") if isinstance(doc, dict) else None
        if not isinstance(rows, list):
            raise CatalogError(f"catalog {path}: expected a top-level 'datasets:' list")
    elif path.suffix.lower() in {".csv", ".tsv"}:
        with path.open(newline="") as fh:
            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            rows = [dict(r) for r in csv.DictReader(fh, delimiter=delimiter)]
    else:
        raise CatalogError(f"catalog {path}: use a .yaml/.yml or .csv/.tsv file")
    entries = []
    for i, raw in enumerate(rows):
        if not isinstance(raw, dict):
            raise CatalogError(f"catalog {path}: row {i} is not a mapping")
        entries.append(_entry(raw, base, f"catalog {path}, row {i}"))
    seen: set[str] = set()
    for e in entries:
        if e.id in seen:
            raise CatalogError(
                f"catalog {path}: dataset id {e.id!r} appears twice; ids must be unique"
            )
        seen.add(e.id)
    if not entries:
        raise CatalogError(f"catalog {path}: lists no datasets")
    return entries


def exclusion_reason(entry: DatasetEntry, qc: Any) -> str | None:
    """Why a dataset is excluded by its catalog flags (None when it is kept)."""
    if qc.exclude_malignant and entry.malignant:
        return "excluded_malignant"
    if qc.exclude_cell_line and entry.cell_line:
        return "excluded_cell_line"
    if qc.exclude_non_droplet and not entry.droplet:
        return "excluded_non_droplet"
    return None


def doi_duplicates(entries: list[DatasetEntry]) -> dict[str, str]:
    """Datasets whose DOI an earlier catalog row already has: {dataset id: kept id}."""
    first: dict[str, str] = {}
    dup: dict[str, str] = {}
    for e in entries:
        if e.doi is None:
            continue
        if e.doi in first:
            dup[e.id] = first[e.doi]
        else:
            first[e.doi] = e.id
    return dup
