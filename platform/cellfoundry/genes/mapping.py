"""Gene-name mapping results, Ensembl ID normalisation, and the optional MyGene.info mapper.

The offline mapper is :meth:`cellfoundry.genes.table.GeneTable.map_genes`; both it and
:class:`MyGeneMapper` return a :class:`GeneMapping`, whose :meth:`GeneMapping.summary` goes
into artifact manifests.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import polars as pl

if TYPE_CHECKING:
    from cellfoundry.genes.table import GeneTable

logger = logging.getLogger(__name__)

__all__ = ["ENSEMBL_PATTERN", "GeneMapping", "MyGeneMapper", "ensembl_expr", "normalize_ensembl"]

#: An Ensembl gene ID (any species; also the legacy ``ENSGR`` IDs of Y PAR genes that the V1
#: dictionary holds), optionally with a version suffix; group 1 is the ID.
ENSEMBL_PATTERN = r"^(ENS[A-Z]*G(?:\d{11}|R\d{10}))(?:\.\d+)?$"
MappingKind = Literal["ensembl", "symbol", "auto"]


def ensembl_expr(col: pl.Expr) -> pl.Expr:
    """Polars expression: the normalised Ensembl gene ID of a str column, null if none."""
    return col.str.strip_chars().str.to_uppercase().str.extract(ENSEMBL_PATTERN, 1)


def normalize_ensembl(ids: Iterable[str | None]) -> list[str | None]:
    """Upper-case, strip whitespace and the version suffix; None where not an Ensembl gene ID.

    ``"ensg00000141510.17"`` -> ``"ENSG00000141510"``; ``"TP53"`` -> None. GENCODE's
    ``_PAR_Y`` copies are not plain gene IDs and also give None.
    """
    s = pl.Series("id", list(ids), dtype=pl.String)
    return s.to_frame().select(ensembl_expr(pl.col("id")))["id"].to_list()


@dataclass(frozen=True)
class GeneMapping:
    """Result of mapping source gene names to Ensembl IDs, one entry per source name."""

    names: list[str]
    """The source names, in their order."""
    ensembl_ids: list[str | None]
    """The Ensembl ID per name, None where unmapped."""
    methods: list[str | None]
    """How each name mapped: ensembl, symbol, symbol_ci, previous, alias, entrez, mygene."""
    reasons: list[str | None]
    """Why a name is unmapped (e.g. "ambiguous symbol", "not in gene table"); None if mapped."""

    @property
    def n_total(self) -> int:
        """Number of source names."""
        return len(self.names)

    @property
    def n_mapped(self) -> int:
        """Number of names mapped to an Ensembl ID."""
        return sum(i is not None for i in self.ensembl_ids)

    @property
    def unmapped(self) -> list[str]:
        """The names that did not map, in their order."""
        return [n for n, i in zip(self.names, self.ensembl_ids, strict=True) if i is None]

    def summary(self) -> dict[str, object]:
        """JSON-ready counts for a manifest: per method, per unmapped reason, names sharing
        an Ensembl ID with another name (their counts get summed), the first 50 unmapped."""
        per_id = Counter(i for i in self.ensembl_ids if i is not None)
        return {
            "n_total": self.n_total,
            "n_mapped": self.n_mapped,
            "n_unmapped": self.n_total - self.n_mapped,
            "fraction_mapped": round(self.n_mapped / self.n_total, 6) if self.n_total else 0.0,
            "by_method": dict(Counter(m for m in self.methods if m is not None)),
            "unmapped_by_reason": dict(Counter(r for r in self.reasons if r is not None)),
            "n_names_sharing_an_id": sum(c for c in per_id.values() if c > 1),
            "unmapped_examples": self.unmapped[:50],
        }


class MyGeneMapper:
    """Map symbols through MyGene.info, cached on disk; IDs and misses use the offline table.

    The optional ``mygene`` client (``pip install 'cellfoundry[online]'``) is imported only
    for symbols absent from the cache ``<cache_dir>/mygene_<species>.json``, which holds
    symbol -> Ensembl ID, or null where MyGene did not name exactly one gene. Only IDs that
    are in the gene table are used; other symbols get the offline table's result.
    """

    def __init__(
        self, cache_dir: str | Path, *, gene_table: GeneTable | None = None, species: str = "human"
    ) -> None:
        if gene_table is None:
            from cellfoundry.genes.table import GeneTable

            gene_table = GeneTable.load()
        self.gene_table = gene_table
        self.species = species
        self.cache_path = Path(cache_dir) / f"mygene_{species}.json"
        self._cache: dict[str, str | None] = {}
        if self.cache_path.is_file():
            try:
                self._cache = json.loads(self.cache_path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"mygene cache {self.cache_path} is not valid JSON ({e}); delete it"
                ) from e

    def map_genes(self, names: Sequence[str], *, kind: MappingKind = "auto") -> GeneMapping:
        """Like :meth:`GeneTable.map_genes`; a symbol MyGene resolves to a gene of the table
        gets method ``"mygene"``."""
        names = list(names)
        offline = self.gene_table.map_genes(names, kind=kind)
        as_symbol = [
            kind == "symbol" or (kind == "auto" and i is None) for i in normalize_ensembl(names)
        ]
        keys = [n.strip() if s else None for n, s in zip(names, as_symbol, strict=True)]
        missing = sorted({k for k in keys if k is not None} - set(self._cache))
        if missing:
            self._query(missing)
        online = [self._cache.get(k) if k is not None else None for k in keys]
        use = self.gene_table.contains(online).tolist()
        rows = zip(use, online, offline.ensembl_ids, offline.methods, offline.reasons, strict=True)
        picked = [(i, "mygene", None) if u else (o, m, r) for u, i, o, m, r in rows]
        return GeneMapping(
            names=names,
            ensembl_ids=[p[0] for p in picked],
            methods=[p[1] for p in picked],
            reasons=[p[2] for p in picked],
        )

    def _query(self, symbols: list[str]) -> None:
        """Ask MyGene.info for ``symbols`` and store the answers in the cache file."""
        try:
            import mygene  # optional dependency: the "online" extra
        except ImportError as e:
            raise ImportError(
                f"MyGeneMapper needs the mygene client for {len(symbols)} symbols not in its "
                f"cache {self.cache_path}: pip install 'cellfoundry[online]' (or map offline "
                "with GeneTable.map_genes)"
            ) from e
        hits = mygene.MyGeneInfo().querymany(
            symbols,
            scopes="symbol,alias",
            fields="ensembl.gene",
            species=self.species,
            returnall=False,
            verbose=False,
        )
        found: dict[str, set[str]] = {s: set() for s in symbols}
        for hit in hits:
            ensembl = [] if hit.get("notfound") else hit.get("ensembl", [])
            for entry in ensembl if isinstance(ensembl, list) else [ensembl]:
                if isinstance(entry, dict) and isinstance(entry.get("gene"), str):
                    found.setdefault(hit["query"], set()).add(entry["gene"])
        for symbol, ids in found.items():
            self._cache[symbol] = next(iter(ids)) if len(ids) == 1 else None
        logger.info("mygene: queried %d symbols; cache %s", len(symbols), self.cache_path)
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self._cache, indent=0, sort_keys=True))
        tmp.replace(self.cache_path)
