"""The offline human gene table: Ensembl IDs, symbols, biotypes, and symbol -> ID mapping.

A symbol maps at the first of these levels where it names any gene: exact current symbol
(Ensembl name, then the HGNC symbol), the same case-insensitively, HGNC previous symbol,
HGNC alias, and for NCBI ``LOC<id>`` / ``GeneID:<id>`` names the gene with that Entrez ID. Among candidates the primary assembly and HGNC-approved names win; a symbol
still naming several genes at its level is ambiguous and stays unmapped (it does not fall
through to a later level). Lookups are polars expressions over whole columns.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from cellfoundry.genes.mapping import GeneMapping, MappingKind, ensembl_expr
from cellfoundry.paths import shared_path

logger = logging.getLogger(__name__)

__all__ = ["GeneTable", "GeneTableError"]

_MAIN_CHROMOSOMES = [str(i) for i in range(1, 23)] + ["X", "Y", "MT"]
_LAYOUTS = {  # source column -> our column: the joined Ensembl/HGNC table, a BioMart export
    "joined": {
        "ensembl_gene_id": "ensembl_id",
        "gene_name": "symbol",
        "chromosome": "chromosome",
        "biotype": "biotype",
    },
    "biomart": {
        "Gene stable ID": "ensembl_id",
        "Gene name": "symbol",
        "Chromosome/scaffold name": "chromosome",
        "Gene type": "biotype",
    },
}
_HGNC_COLUMNS = {
    "hgnc_symbol": "hgnc",
    "hgnc_prev_symbols": "previous",
    "hgnc_alias_symbols": "alias",
    "entrez_id": "entrez",
}
_DEFAULT_TABLE = ("data", "genes", "human_genes_ensembl_hgnc.tsv.gz")
_EXTRA_ID_FILE = "GENCODEv44_Gene_id2name.csv"
_LEVELS = ("symbol", "symbol_ci", "previous", "alias", "entrez")
#: NCBI names that carry an Entrez Gene ID: ``LOC100505874``, ``GeneID:100505874``.
_ENTREZ_NAME = r"^(?:LOC|GENEID:)(\d+)$"
_AMBIGUOUS = ""  # sentinel ensembl_id of a lookup key naming several genes


class GeneTableError(ValueError):
    """The gene table (or an extra ID file) is missing or has an unknown layout."""


def _read_table(path: Path) -> pl.DataFrame:
    """Read a joined Ensembl/HGNC or BioMart TSV into ensembl_id, symbol, chromosome,
    biotype, primary (bool), hgnc, previous, alias, entrez (the last four may be null)."""
    df = pl.read_csv(path, separator="\t", infer_schema=False, quote_char=None)
    layout = next((m for m in _LAYOUTS.values() if set(m) <= set(df.columns)), None)
    if layout is None:
        raise GeneTableError(
            f"{path}: unknown gene table layout (columns {df.columns[:8]}); expected columns "
            f"{list(_LAYOUTS['joined'])} or {list(_LAYOUTS['biomart'])}"
        )
    df = df.rename(layout).select(
        ensembl_expr(pl.col("ensembl_id")).alias("ensembl_id"),
        pl.col("symbol").replace("", None),
        "chromosome",
        "biotype",
        (pl.col("primary_assembly") == "True").alias("primary")
        if "primary_assembly" in df.columns
        else pl.col("chromosome").is_in(_MAIN_CHROMOSOMES).alias("primary"),
        *(
            (pl.col(k) if k in df.columns else pl.lit(None, pl.String)).alias(v)
            for k, v in _HGNC_COLUMNS.items()
        ),
    )
    # Lower rank wins among genes sharing a symbol: primary assembly, then HGNC-approved.
    return df.filter(pl.col("ensembl_id").is_not_null()).with_columns(
        (
            2 * (~pl.col("primary")).cast(pl.Int32)
            + (pl.col("hgnc") != pl.col("symbol")).fill_null(True).cast(pl.Int32)
        ).alias("rank")
    )


def _read_extra(path: Path, known: pl.Series) -> pl.DataFrame:
    """Genes of a headerless ``id,name`` file that are not in ``known`` (biotype unknown)."""
    if not path.is_file():
        raise GeneTableError(f"extra gene ID file {path} does not exist; fix extra_id_files")
    sep = "\t" if path.suffix in (".tsv", ".txt") else ","
    df = pl.read_csv(path, has_header=False, separator=sep, infer_schema=False, quote_char=None)
    if df.width < 2:
        raise GeneTableError(f"{path}: expected two columns (Ensembl ID, gene name)")
    df = (
        df.select(
            ensembl_expr(pl.col(df.columns[0])).alias("ensembl_id"),
            pl.col(df.columns[1]).replace("", None).alias("symbol"),
        )
        .with_columns(  # GENCODE names unnamed genes by their ID: no symbol then
            pl.when(ensembl_expr(pl.col("symbol")).is_null()).then(pl.col("symbol"))
        )
        .filter(pl.col("ensembl_id").is_not_null() & ~pl.col("ensembl_id").is_in(known.implode()))
    )
    return df.unique("ensembl_id", keep="first", maintain_order=True).with_columns(
        biotype=pl.lit("unknown"), primary=pl.lit(True), rank=pl.lit(5, pl.Int32)
    )


def _lookup_table(cands: pl.DataFrame) -> pl.DataFrame:
    """From (key, ensembl_id, rank) candidates keep each key's best rank: key -> ensembl_id,
    or the ambiguous sentinel where that rank holds several genes."""
    best = cands.filter(pl.col("key").is_not_null() & (pl.col("key") != "")).filter(
        pl.col("rank") == pl.col("rank").min().over("key")
    )
    ids = pl.col("ensembl_id").unique()
    return best.group_by("key").agg(
        pl.when(ids.len() == 1).then(ids.first()).otherwise(pl.lit(_AMBIGUOUS)).alias("ensembl_id")
    )


class GeneTable:
    """Human genes: ``frame`` has ensembl_id, symbol, biotype, chromosome, sorted by ID."""

    def __init__(self, genes: pl.DataFrame, source: str) -> None:
        """Build from a frame with ensembl_id, symbol, biotype, chromosome and optionally
        rank (lower wins among genes sharing a symbol), hgnc, previous, alias, entrez."""
        self.source = source
        genes = genes.unique("ensembl_id", keep="first", maintain_order=True).sort("ensembl_id")
        for c in _HGNC_COLUMNS.values():
            if c not in genes.columns:
                genes = genes.with_columns(pl.lit(None, pl.String).alias(c))
        if "rank" not in genes.columns:
            genes = genes.with_columns(pl.lit(0, pl.Int32).alias("rank"))
        self.frame = genes.select("ensembl_id", "symbol", "biotype", "chromosome")
        self._ids = genes["ensembl_id"]
        self._mito = genes.select(
            ((pl.col("chromosome") == "MT") | pl.col("symbol").str.starts_with("MT-")).fill_null(
                False
            )
        ).to_series()
        current = pl.concat(
            [
                genes.select(pl.col("symbol").alias("key"), "ensembl_id", "rank"),
                genes.filter(pl.col("hgnc") != pl.col("symbol")).select(
                    pl.col("hgnc").alias("key"), "ensembl_id", pl.lit(10, pl.Int32).alias("rank")
                ),
            ]
        )
        upper = pl.col("key").str.to_uppercase()
        listed = {
            c: genes.select(
                pl.col(c).str.split("|").alias("key"),
                "ensembl_id",
                pl.lit(0, pl.Int32).alias("rank"),
            )
            .explode("key")
            .with_columns(upper)
            for c in ("previous", "alias")
        }
        entrez = genes.select(
            pl.col("entrez").alias("key"), "ensembl_id", pl.lit(0, pl.Int32).alias("rank")
        )
        candidates = {
            "symbol": current,
            "symbol_ci": current.with_columns(upper),
            **listed,
            "entrez": entrez,
        }
        self._lookups = {level: _lookup_table(candidates[level]) for level in _LEVELS}

    @classmethod
    def load(
        cls, path: str | Path | None = None, *, extra_id_files: Sequence[str | Path] | None = None
    ) -> GeneTable:
        """Load the joined Ensembl/HGNC table (default: the shared
        ``data/genes/human_genes_ensembl_hgnc.tsv.gz``) or a plain BioMart TSV export.

        ``extra_id_files``: headerless ``id,name`` CSVs whose IDs missing from the table are
        added with biotype ``"unknown"``; None means ``GENCODEv44_Gene_id2name.csv`` beside
        the table if it exists, ``()`` means none. Duplicate IDs keep their first row.
        """
        path = Path(path) if path is not None else shared_path(*_DEFAULT_TABLE)
        if not path.is_file():
            raise GeneTableError(
                f"gene table {path} does not exist; pass path= to a BioMart/HGNC gene table "
                "or set CELLFOUNDRY_SHARED to the shared data folder"
            )
        genes = _read_table(path)
        if extra_id_files is None:
            beside = path.parent / _EXTRA_ID_FILE
            extra_id_files = [beside] if beside.is_file() else []
        for extra in extra_id_files:
            genes = pl.concat(
                [genes, _read_extra(Path(extra), genes["ensembl_id"])], how="diagonal"
            )
        logger.debug("gene table %s: %d genes", path, genes.height)
        return cls(genes, str(path))

    def __len__(self) -> int:
        return self.frame.height

    def map_genes(self, names: Sequence[str], *, kind: MappingKind = "auto") -> GeneMapping:
        """Map source gene names to Ensembl IDs of this table (see the module docstring).

        ``kind="ensembl"``: every name is an ID (case and version suffix ignored);
        ``"symbol"``: every name is a symbol; ``"auto"``: Ensembl-looking names are IDs, the
        rest symbols. IDs absent from the table stay unmapped ("not in gene table").
        """
        if kind not in ("ensembl", "symbol", "auto"):
            raise GeneTableError(f"map_genes: kind={kind!r}; use 'ensembl', 'symbol' or 'auto'")
        q = pl.DataFrame({"name": list(names)}, schema={"name": pl.String}).with_columns(
            ensembl_expr(pl.col("name")).alias("id"),
            pl.col("name").str.strip_chars().alias("key"),
        )
        as_id = pl.col("id").is_not_null() if kind == "auto" else pl.lit(kind == "ensembl")
        upper = pl.col("key").str.to_uppercase()
        q = q.with_columns(
            as_id.alias("as_id"),
            upper.alias("upper"),
            upper.str.extract(_ENTREZ_NAME, 1).alias("entrez"),
        )
        hits = {
            "ensembl": pl.when("as_id").then(
                pl.col("id").replace_strict(self._ids, self._ids, default=None)
            )
        }
        for level in _LEVELS:
            table = self._lookups[level]
            key = pl.col({"symbol": "key", "entrez": "entrez"}.get(level, "upper"))
            hits[level] = pl.when(~pl.col("as_id")).then(
                key.replace_strict(table["key"], table["ensembl_id"], default=None)
            )
        first_hit = pl.coalesce(*hits)
        ambiguous = first_hit == _AMBIGUOUS
        method = pl.coalesce(*(pl.when(pl.col(m).is_not_null()).then(pl.lit(m)) for m in hits))
        reason = (
            pl.when(first_hit.is_null() & pl.col("as_id") & pl.col("id").is_null())
            .then(pl.lit("not an Ensembl gene ID"))
            .when(first_hit.is_null() & pl.col("as_id"))
            .then(pl.lit("not in gene table"))
            .when(first_hit.is_null())
            .then(pl.lit("unknown symbol"))
            .when(ambiguous)
            .then(pl.lit("ambiguous symbol"))
        )
        out = q.with_columns(**hits).select(
            "name",
            pl.when(~ambiguous).then(first_hit).alias("ensembl_id"),
            pl.when(~ambiguous).then(method).alias("method"),
            reason.alias("reason"),
        )
        return GeneMapping(
            names=out["name"].to_list(),
            ensembl_ids=out["ensembl_id"].to_list(),
            methods=out["method"].to_list(),
            reasons=out["reason"].to_list(),
        )

    def _lookup(self, ids: Iterable[str | None], values: pl.Series, default: object) -> pl.Series:
        s = ids if isinstance(ids, pl.Series) else pl.Series("id", list(ids), dtype=pl.String)
        return s.replace_strict(self._ids, values, default=default)

    def contains(self, ids: Iterable[str | None]) -> np.ndarray:
        """Bool array (n,): the (already normalised) Ensembl ID is in the table."""
        return self._lookup(ids, pl.repeat(True, len(self._ids), eager=True), False).to_numpy()

    def biotypes(self, ids: Iterable[str | None]) -> np.ndarray:
        """Biotype per Ensembl ID, str array (n,); ``"unknown"`` for IDs not in the table."""
        return self._lookup(ids, self.frame["biotype"], "unknown").to_numpy().astype(str)

    def is_protein_coding(self, ids: Iterable[str | None]) -> np.ndarray:
        """Bool array (n,): biotype is ``protein_coding``."""
        return self.biotypes(ids) == "protein_coding"

    def is_mitochondrial(self, ids: Iterable[str | None]) -> np.ndarray:
        """Bool array (n,): on chromosome MT or with a symbol starting ``MT-``."""
        return self._lookup(ids, self._mito, False).to_numpy()

    def annotate(self, ids: Iterable[str | None]) -> pl.DataFrame:
        """Frame (ensembl_id, symbol, biotype, chromosome) for ``ids`` in their order; IDs not
        in the table get null symbol/chromosome and biotype ``"unknown"``."""
        q = pl.DataFrame({"ensembl_id": list(ids)}, schema={"ensembl_id": pl.String})
        out = q.join(self.frame, on="ensembl_id", how="left", maintain_order="left")
        return out.with_columns(pl.col("biotype").fill_null("unknown"))
