"""Tokenize one request cell (gene -> raw count) with the model's own dictionaries.

The server applies the same rank value encoding as the corpus (DESIGN.md): counts of names
that map to the same Ensembl ID are summed, n = the cell's total raw count, score =
count / n * 10,000 / median, genes by score descending, ties by token id, then
``<cls> ... <eos>`` for V2 models.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellfoundry.corpus.encode import RankEncoder
from cellfoundry.genes import GeneTable
from cellfoundry.model import load_token_dictionary_for
from cellfoundry.serve.errors import RequestError

logger = logging.getLogger(__name__)

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{11}(\.\d+)?$", re.IGNORECASE)
_SPECIALS = ("<pad>", "<mask>", "<cls>", "<eos>")


def find_gene_medians(model_dir: str | Path, configured: str | None = None) -> Path:
    """The ``gene_median_dictionary.json`` to tokenize with: ``configured``, else the file
    beside the model, else the vocabulary artifact named in the model's manifest."""
    if configured:
        path = Path(configured)
        if path.is_dir():
            path = path / "gene_median_dictionary.json"
        if not path.is_file():
            raise ValueError(
                f"gene_medians: {path} does not exist; point it at a gene_median_dictionary.json"
            )
        return path
    model_dir = Path(model_dir)
    beside = model_dir / "gene_median_dictionary.json"
    if beside.is_file():
        return beside
    manifest = model_dir / "manifest.json"
    if manifest.is_file():
        vocab = json.loads(manifest.read_text()).get("inputs", {}).get("vocabulary", {}).get("path")
        if vocab and (Path(vocab) / "gene_median_dictionary.json").is_file():
            return Path(vocab) / "gene_median_dictionary.json"
    raise ValueError(
        f"{model_dir}: no gene median dictionary beside the model or in its manifest's vocabulary; "
        "set gene_medians: to the corpus vocabulary's gene_median_dictionary.json"
    )


@dataclass
class CellTokenizer:
    """Turns ``{gene: raw count}`` into the model's ``input_ids`` (int32)."""

    token_dictionary: dict[str, int]
    medians: dict[str, float]
    model_input_size: int
    gene_table: GeneTable | None = None
    min_genes: int = 7
    max_genes: int = 60_000
    v2: bool = field(init=False)

    def __post_init__(self) -> None:
        self.v2 = "<cls>" in self.token_dictionary
        self._symbol_cache: dict[str, str | None] = {}

    @classmethod
    def for_model(
        cls, model_dir: str | Path, *, gene_medians: str | None = None,
        gene_table: str | None = None, min_genes: int = 7, max_genes: int = 60_000,
    ) -> CellTokenizer:  # fmt: skip
        """The tokenizer of a model directory (its token dictionary, position limit and
        the medians found by :func:`find_gene_medians`)."""
        vocab = load_token_dictionary_for(model_dir)
        if vocab is None:
            raise ValueError(
                f"{model_dir}: no token_dictionary.json; save the model with its dictionary"
            )
        medians_path = find_gene_medians(model_dir, gene_medians)
        medians = {k: float(v) for k, v in json.loads(medians_path.read_text()).items()}
        size = json.loads((Path(model_dir) / "config.json").read_text())["max_position_embeddings"]
        try:
            table = GeneTable.load(gene_table)
        except ValueError as exc:  # symbols then cannot be mapped; Ensembl IDs still work
            logger.warning("no gene table (%s): requests must use Ensembl IDs", exc)
            table = None
        logger.info(
            "tokenizer: %d tokens, medians %s, %d positions", len(vocab), medians_path, size
        )
        return cls(vocab, medians, size, table, min_genes, max_genes)

    def _to_ensembl(self, names: list[str]) -> list[str | None]:
        ids: list[str | None] = []
        symbols = [n for n in names if not _ENSEMBL.match(n) and n not in self._symbol_cache]
        if symbols and self.gene_table is not None:
            mapped = self.gene_table.map_genes(symbols, kind="symbol").ensembl_ids
            self._symbol_cache.update(zip(symbols, mapped, strict=True))
        for name in names:
            if _ENSEMBL.match(name):
                ids.append(name.upper().split(".")[0])
            else:
                ids.append(self._symbol_cache.get(name))
        return ids

    def tokenize(self, genes: Any) -> tuple[np.ndarray, dict[str, Any]]:
        """``(input_ids, report)`` of one cell given as ``{gene: raw count}`` (Ensembl IDs or
        symbols). Raises :class:`RequestError` (422) naming what is wrong."""
        if not isinstance(genes, Mapping) or not genes:
            raise RequestError(422, "'genes' must be a non-empty object of gene -> raw count")
        if len(genes) > self.max_genes:
            raise RequestError(
                413, f"{len(genes)} genes in one cell; at most {self.max_genes} are accepted"
            )
        names = [str(k).strip() for k in genes]
        bad = [n for n, v in zip(names, genes.values(), strict=True) if not _is_count(v)]
        if bad:
            raise RequestError(
                422, "counts must be finite, non-negative numbers (raw UMI counts)",
                invalid_genes=bad[:50], n_invalid=len(bad),
            )  # fmt: skip
        counts = np.array([float(v) for v in genes.values()], dtype=np.float64)
        ids = self._to_ensembl(names)
        unmapped = [n for n, i in zip(names, ids, strict=True) if i is None]
        summed: dict[str, float] = {}
        for gene_id, count in zip(ids, counts, strict=True):
            if gene_id is not None:
                summed[gene_id] = summed.get(gene_id, 0.0) + count
        usable = [
            g
            for g, c in summed.items()
            if c > 0 and g in self.token_dictionary and g in self.medians
        ]
        report = {
            "n_genes": len(names),
            "n_mapped": len(names) - len(unmapped),
            "n_used": len(usable),
            "unmapped": unmapped[:50],
            "not_in_vocabulary": [g for g in summed if g not in self.token_dictionary][:50],
        }
        if len(usable) < self.min_genes:
            raise RequestError(
                422, f"only {len(usable)} expressed genes map to the model's vocabulary; at least "
                f"{self.min_genes} are needed (send Ensembl IDs or HGNC symbols)", **report,
            )  # fmt: skip
        encoder = RankEncoder(
            token_ids=np.array([self.token_dictionary[g] for g in usable], dtype=np.int32),
            medians=np.array([self.medians[g] for g in usable], dtype=np.float64),
            max_genes=self.model_input_size - (2 if self.v2 else 0),
            cls_id=self.token_dictionary["<cls>"] if self.v2 else None,
            eos_id=self.token_dictionary["<eos>"] if self.v2 else None,
        )
        _, tokens = encoder.encode(
            np.array([0, len(usable)]), np.arange(len(usable)),
            np.array([summed[g] for g in usable]), np.array([counts.sum()]),
        )  # fmt: skip
        return tokens, report

    def check_ids(self, input_ids: Any) -> np.ndarray:
        """Validate pre-tokenized ``input_ids`` (a list of token ids of this model)."""
        if not isinstance(input_ids, list) or not input_ids:
            raise RequestError(422, "'input_ids' must be a non-empty list of integers")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in input_ids):
            raise RequestError(422, "'input_ids' must hold integers only")
        if len(input_ids) > self.model_input_size:
            raise RequestError(
                413, f"{len(input_ids)} tokens; the model takes at most {self.model_input_size}"
            )
        ids = np.asarray(input_ids, dtype=np.int64)
        n_vocab = max(self.token_dictionary.values()) + 1
        if ids.min() < 0 or ids.max() >= n_vocab:
            raise RequestError(
                422, f"'input_ids' must lie in [0, {n_vocab}) (the model's vocabulary)"
            )
        return ids.astype(np.int32)

    def token_of(self, gene: str) -> int:
        """Token id of one gene (Ensembl ID or symbol), or a 422 naming it."""
        gene_id = self._to_ensembl([str(gene).strip()])[0]
        if gene_id is None or gene_id not in self.token_dictionary or gene_id in _SPECIALS:
            raise RequestError(422, f"gene {gene!r} is not in the model's vocabulary", gene=gene)
        return self.token_dictionary[gene_id]


def _is_count(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )
