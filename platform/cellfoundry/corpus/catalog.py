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
Rows are type-checked like the stage configs (:mod:`cellfoundry.config.loader`): an unknown
key, a value of the wrong type (``organ: [a, b]``; a number where text is expected, such as
``platform: 5``: quote it) or a YAML syntax error is a :class:`CatalogError` naming the file,
the dataset (or its line) and the field.
Relative paths are relative to the catalog file; ``{shared}`` is the shared data folder
(``$CELLFOUNDRY_SHARED`` or ``../shared``) and ``$VARS`` are expanded.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

from cellfoundry.config.loader import ConfigError, parse_config, read_yaml
from cellfoundry.paths import expand

logger = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9_.\-]+$")


class CatalogError(ConfigError):
    """The catalog file is malformed; the message names the file, dataset, field and fix."""


@dataclass(frozen=True)
class DatasetEntry:
    """One source dataset (a row of the catalog); fields are type-checked like stage configs."""

    id: str
    """Unique name: letters, digits, '_', '.', '-'."""
    uri: str
    """Local path (relative to the catalog), ``{shared}/...``, or an s3:// / gs:// URI."""
    format: Literal["h5ad", "loom", "10x_h5", "10x_mtx"] | None = None
    """Source format; None: from the extension (see ``sources.FORMATS``)."""
    doi: str | None = None
    """Publication DOI (compared case-blind): a second dataset with the same DOI is a duplicate."""
    organ: str = "unknown"
    """Major organ, written to the cells as ``organ_major``."""
    platform: str = "droplet"
    """droplet, 10x, drop-seq or indrops count as droplet; anything else is non-droplet."""
    malignant: bool = False
    """Tumour cells (excluded by ``qc.exclude_malignant``)."""
    cell_line: bool = False
    """Cell line (excluded by ``qc.exclude_cell_line``)."""
    gene_id_column: str | None = None
    """var column holding gene IDs or symbols; None: the Ensembl-ID column or the var index."""
    matrix: str = "X"
    """Which matrix holds raw counts: X, raw/X or layers/<name>."""
    metadata: dict[str, str] = field(default_factory=dict)
    """Output column -> source obs column."""

    @property
    def droplet(self) -> bool:
        return self.platform.strip().lower() in {"droplet", "10x", "drop-seq", "indrops"}

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["metadata"] = ";".join(f"{k}={v}" for k, v in self.metadata.items())
        return row


_FIELDS = {f.name for f in dataclasses.fields(DatasetEntry)}
# Fields that hold text: YAML numbers there are errors (`platform: 5`, `doi: 10.1000` -> 10.1).
_TEXT_FIELDS = {
    name for name, tp in get_type_hints(DatasetEntry).items() if tp is str or str in get_args(tp)
}


@dataclass(frozen=True)
class _CatalogFile:
    """A YAML catalog: the ``datasets:`` list and nothing else."""

    datasets: list[dict[str, Any]]


def _bool(value: Any, where: str) -> bool:
    """A CSV cell as a bool (CSV has no types: true/false, yes/no, 1/0, empty)."""
    text = str(value).strip().lower()
    if text in {"", "0", "false", "no", "n"}:
        return False
    if text in {"1", "true", "yes", "y"}:
        return True
    raise CatalogError(f"{where}: expected true or false, got {value!r}")


def _resolve_uri(uri: str, base: Path) -> str:
    # "{shared}" stands for the shared data folder, so a catalog works from any working dir
    # (e.g. a `ray job submit --working-dir` upload); $VARS are expanded too.
    uri = expand(uri)
    if "://" in uri:
        return uri
    path = Path(uri).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _entry(raw: dict[Any, Any], path: Path, row: int, *, from_csv: bool) -> DatasetEntry:
    """Type-check row ``row`` (unknown keys and wrong types are errors) and normalise it."""
    # Empty values (YAML null, an empty CSV cell) take the field's default.
    raw = {k: v for k, v in raw.items() if v is not None and not (isinstance(v, str) and not v)}
    ds_id = raw.get("id")
    named = isinstance(ds_id, str) and ds_id.strip()
    where = f"catalog {path}: " + (f"dataset {ds_id.strip()!r}" if named else f"datasets[{row}]")
    if from_csv:  # every CSV cell is text: read the flags as booleans
        for key in ("malignant", "cell_line"):
            if key in raw:
                raw[key] = _bool(raw[key], f"{where}.{key}")
    for key in sorted(_TEXT_FIELDS & set(raw)):
        value = raw[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise CatalogError(
                f"{where}.{key}: expected text, got the number {value!r}; "
                f'quote it in the YAML ({key}: "{value}")'
            )
    metadata = raw.get("metadata")
    if isinstance(metadata, str):
        pairs = [p for p in metadata.split(";") if p.strip()]
        if any("=" not in p for p in pairs):
            raise CatalogError(
                f"{where}.metadata: must look like 'cell_type=celltype;split=split', "
                f"got {metadata!r}"
            )
        raw["metadata"] = dict(p.split("=", 1) for p in pairs)
    try:
        entry = parse_config(DatasetEntry, raw, where=where)
    except ConfigError as exc:
        raise CatalogError(str(exc)) from None
    ds_id = entry.id.strip()
    if not _ID.match(ds_id):
        raise CatalogError(f"{where}.id: {ds_id!r} may only hold letters, digits, '_', '.', '-'")
    return dataclasses.replace(
        entry,
        id=ds_id,
        uri=_resolve_uri(entry.uri.strip(), path.resolve().parent),
        doi=(entry.doi.strip().lower() or None) if entry.doi else None,
        gene_id_column=(entry.gene_id_column.strip() or None) if entry.gene_id_column else None,
        metadata={str(k).strip(): v.strip() for k, v in entry.metadata.items()},
    )


def _yaml_rows(path: Path) -> list[Any]:
    try:
        doc = read_yaml(path, "catalog")
    except ConfigError as exc:
        raise CatalogError(str(exc)) from None
    if not isinstance(doc, dict) or "datasets" not in doc:
        found = f" (found keys: {', '.join(map(str, doc))})" if isinstance(doc, dict) else ""
        raise CatalogError(f"catalog {path}: expected a top-level 'datasets:' list{found}")
    if not isinstance(doc["datasets"], list):
        raise CatalogError(f"catalog {path}: 'datasets:' must be a list of datasets")
    rows = doc["datasets"]
    for i, raw in enumerate(rows):
        if not isinstance(raw, dict):
            raise CatalogError(f"catalog {path}: datasets[{i}] is not a mapping, got {raw!r}")
    try:
        parse_config(_CatalogFile, doc, where=f"catalog {path}")  # unknown top-level keys
    except ConfigError as exc:
        raise CatalogError(str(exc)) from None
    return rows


def load_catalog(path: str | Path) -> list[DatasetEntry]:
    """Read a YAML (``datasets:`` list) or CSV catalog; ids must be unique.

    Raises :class:`CatalogError` naming the file, the dataset and the field for a YAML
    syntax error (with its line), an unknown key, a value of the wrong type or a missing id/uri.
    """
    path = Path(path)
    if not path.is_file():
        raise CatalogError(
            f"catalog {path} does not exist; write one (see cellfoundry.corpus.catalog)"
        )
    suffix = path.suffix.lower()
    if suffix in {".yaml", ".yml"}:
        rows = _yaml_rows(path)
    elif suffix in {".csv", ".tsv"}:
        with path.open(newline="") as fh:
            delimiter = "\t" if suffix == ".tsv" else ","
            rows = [dict(r) for r in csv.DictReader(fh, delimiter=delimiter)]
    else:
        raise CatalogError(f"catalog {path}: use a .yaml/.yml or .csv/.tsv file")
    from_csv = suffix in {".csv", ".tsv"}
    entries = [_entry(raw, path, i, from_csv=from_csv) for i, raw in enumerate(rows)]
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
