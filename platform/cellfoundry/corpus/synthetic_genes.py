"""The gene panel of the synthetic data: real genes when the shared tables exist, else made up.

With ``../shared/data/genes/human_genes_ensembl_hgnc.tsv.gz`` present the panel holds real
genes (PBMC marker genes, the 13 mitochondrial protein-coding ``MT-`` genes, then random
protein-coding genes, restricted to the Geneformer V2 token dictionary when
``../shared/geneformer/v2`` is present, and a few lncRNAs); otherwise it holds generated
Ensembl-style IDs (``ENSG9`` + 10 digits) with the same marker and ``MT-`` symbols. Either
way the panel is written as a gene table (:func:`write_gene_table`) that
:class:`cellfoundry.genes.GeneTable` loads, so symbols and IDs map consistently.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from cellfoundry.paths import shared_path

logger = logging.getLogger(__name__)

#: Cell types (PBMC-like), their share of cells and marker genes (real symbols).
CELL_TYPES: dict[str, tuple[float, tuple[str, ...]]] = {
    "CD4 T cells": (0.30, ("CD3D", "CD3E", "IL7R", "CD4", "LDHB", "CCR7")),
    "CD8 T cells": (0.15, ("CD3D", "CD3E", "CD8A", "CD8B", "GZMK")),
    "B cells": (0.14, ("MS4A1", "CD79A", "CD79B", "CD19", "BANK1")),
    "NK cells": (0.10, ("NKG7", "GNLY", "KLRD1", "PRF1", "GZMB")),
    "CD14 monocytes": (0.18, ("CD14", "LYZ", "S100A8", "S100A9", "VCAN")),
    "FCGR3A monocytes": (0.07, ("FCGR3A", "MS4A7", "LST1", "IFITM3")),
    "Dendritic cells": (0.04, ("FCER1A", "CST3", "CLEC10A", "CD1C")),
    "Megakaryocytes": (0.02, ("PPBP", "PF4", "GP9")),
}
MITO_SYMBOLS = (
    "MT-ND1", "MT-ND2", "MT-CO1", "MT-CO2", "MT-ATP8", "MT-ATP6", "MT-CO3", "MT-ND3",
    "MT-ND4L", "MT-ND4", "MT-ND5", "MT-ND6", "MT-CYB",
)  # fmt: skip
#: The shared gene table (under ``$CELLFOUNDRY_SHARED``) the real panel is drawn from.
GENE_TABLE = ("data", "genes", "human_genes_ensembl_hgnc.tsv.gz")
_V2_TOKENS = ("geneformer", "v2", "token_dictionary_gc104M.json")
_COLUMNS = (
    "ensembl_gene_id", "gene_name", "chromosome", "biotype", "primary_assembly",
    "hgnc_symbol", "entrez_id", "hgnc_prev_symbols", "hgnc_alias_symbols",
)  # fmt: skip


@dataclass(frozen=True)
class GenePanel:
    """Genes of the synthetic files, in file order (markers first, then MT, then the rest)."""

    table: pl.DataFrame  # one row per gene, columns _COLUMNS (the joined gene-table layout)
    source: str  # "real" (from the shared gene table) or "generated"

    @property
    def ensembl_ids(self) -> np.ndarray:
        return self.table["ensembl_gene_id"].to_numpy().astype(str)

    @property
    def symbols(self) -> np.ndarray:
        return self.table["gene_name"].to_numpy().astype(str)

    @property
    def mitochondrial(self) -> np.ndarray:
        return (self.table["chromosome"] == "MT").to_numpy()

    @property
    def protein_coding(self) -> np.ndarray:
        return (self.table["biotype"] == "protein_coding").to_numpy()

    def index_of(self, symbols: tuple[str, ...]) -> np.ndarray:
        """Positions of the given symbols that are in the panel."""
        pos = {s: i for i, s in enumerate(self.symbols)}
        return np.array([pos[s] for s in symbols if s in pos], dtype=np.int64)


def _markers() -> list[str]:
    return list(dict.fromkeys(m for _, markers in CELL_TYPES.values() for m in markers))


def _real_panel(path: Path, n_genes: int, rng: np.random.Generator) -> GenePanel:
    df = pl.read_csv(path, separator="\t", infer_schema=False, quote_char=None)
    df = df.filter(pl.col("primary_assembly") == "True").unique("ensembl_gene_id", keep="first")
    df = df.filter(pl.col("gene_name").is_not_null()).unique("gene_name", keep="none")
    tokens = shared_path(*_V2_TOKENS)
    if tokens.is_file():  # genes the published V2 model knows, so real dictionaries tokenize them
        known = [k for k in json.loads(tokens.read_text()) if not k.startswith("<")]
        df = df.filter(
            pl.col("ensembl_gene_id").is_in(known) | (pl.col("biotype") != "protein_coding")
        )
    df = df.sort("ensembl_gene_id")
    fixed = _markers() + list(MITO_SYMBOLS)
    head = df.filter(pl.col("gene_name").is_in(fixed))
    head = head.sort(pl.col("gene_name").replace_strict(fixed, range(len(fixed)), default=None))
    rest = df.filter(~pl.col("gene_name").is_in(fixed))
    n_rest = max(0, n_genes - head.height)
    n_lnc = n_rest // 20
    pc, lnc = (
        rest.filter(pl.col("biotype") == "protein_coding"),
        rest.filter(pl.col("biotype") == "lncRNA"),
    )
    pick_pc = np.sort(rng.choice(pc.height, size=min(pc.height, n_rest - n_lnc), replace=False))
    pick_lnc = np.sort(rng.choice(lnc.height, size=min(lnc.height, n_lnc), replace=False))
    table = pl.concat([head, pc[pick_pc], lnc[pick_lnc]]).select(
        *(pl.col(c) if c in df.columns else pl.lit(None, pl.String).alias(c) for c in _COLUMNS)
    )
    return GenePanel(table, "real")


def _generated_panel(n_genes: int, rng: np.random.Generator) -> GenePanel:
    fixed = _markers() + list(MITO_SYMBOLS)
    n = max(n_genes, len(fixed) + 20)
    ids = [f"ENSG9{i:010d}" for i in rng.choice(10**9, size=n, replace=False)]
    symbols = fixed + [f"SYN{i:05d}" for i in range(1, n - len(fixed) + 1)]
    is_mito = np.array([s.startswith("MT-") for s in symbols])
    biotype = np.where(rng.random(n) < 0.95, "protein_coding", "lncRNA")
    biotype[: len(fixed)] = "protein_coding"
    chromosome = np.where(is_mito, "MT", rng.choice([str(c) for c in range(1, 23)], size=n))
    table = pl.DataFrame({
        "ensembl_gene_id": ids, "gene_name": symbols, "chromosome": chromosome.tolist(),
        "biotype": biotype.tolist(), "primary_assembly": ["True"] * n, "hgnc_symbol": symbols,
        "entrez_id": [None] * n, "hgnc_prev_symbols": [None] * n, "hgnc_alias_symbols": [None] * n,
    }, schema={c: pl.String for c in _COLUMNS})  # fmt: skip
    return GenePanel(table, "generated")


def gene_panel(n_genes: int, rng: np.random.Generator, *, real: bool | None = None) -> GenePanel:
    """``n_genes`` genes (at least the markers and MT genes); ``real=None`` uses the shared
    gene table when it exists, True requires it, False always generates IDs."""
    path = shared_path(*GENE_TABLE)
    if real is None:
        real = path.is_file()
    if real and not path.is_file():
        raise ValueError(
            f"gene table {path} does not exist; set CELLFOUNDRY_SHARED or use real=False"
        )
    panel = _real_panel(path, n_genes, rng) if real else _generated_panel(n_genes, rng)
    logger.info("synthetic gene panel: %d %s genes", panel.table.height, panel.source)
    return panel


def write_gene_table(panel: GenePanel, path: Path) -> Path:
    """Write the panel as a tab-separated gene table in the joined Ensembl/HGNC layout."""
    panel.table.sort("ensembl_gene_id").write_csv(path, separator="\t", quote_style="never")
    return path
