"""Tokenize one request cell (gene -> value) with the model's own dictionaries.

The server applies the same rank value encoding as the corpus (DESIGN.md): values of names
that map to the same Ensembl ID are summed, score = value / n * 10,000 / median, genes by
score descending, ties by token id, then ``<cls> ... <eos>`` for V2 models. The values are
read in one of two ways:

- raw counts (the default): whole numbers in [0, :data:`MAX_COUNT`] (UMI or read counts);
  n = the sum of every value sent, mapped or not (the cell's ``n_counts`` when the whole
  cell is sent; as one number per cell, n changes the order only through rounding).
- ``normalized=True``: depth-normalised expression, i.e. proportional within the cell to
  count / total count (``scanpy.pp.normalize_total`` output, CP10k, CPM; any per-cell scale,
  fractions allowed; not log-transformed: apply ``expm1`` to log1p data first). The cell's
  depth is then already divided out: n is not recomputed from the values sent (which may be
  any subset of the cell), and genes are ranked by value / median. Since a per-cell scale
  never changes the order, this is exactly the ranking of the raw counts: CP10k sent this
  way gives the same tokens as the counts with their total (up to floating-point rounding).

A fractional value without ``normalized`` is refused (422), never taken as a count.

Symbol lookups are cached with bounds: up to ``symbol_cache_size`` names that resolved to an
Ensembl ID (least recently used evicted first) and up to ``unknown_symbol_cache_size`` names
that did not; :meth:`CellTokenizer.cache_info` reports both sizes. Tokenizing is thread-safe,
so the server runs it off its event loop.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellfoundry import artifacts, storage
from cellfoundry.corpus.encode import TARGET_SUM, RankEncoder
from cellfoundry.genes import GeneTable
from cellfoundry.model import load_token_dictionary_for
from cellfoundry.serve.errors import RequestError

logger = logging.getLogger(__name__)

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{11}(\.\d+)?$", re.IGNORECASE)
_SPECIALS = ("<pad>", "<mask>", "<cls>", "<eos>")
MAX_COUNT = 2**31 - 1
"""Largest value accepted per gene (the corpus stores counts as int32); keeps a cell's sum
exact in float64 (60k genes x 2^31 < 2^53)."""
MAX_NAME_CHARS = 128
"""Longest gene name accepted (Ensembl IDs have 15-20 characters, HGNC symbols under 30)."""


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
    model_dir = artifacts.localize(model_dir)
    beside = model_dir / "gene_median_dictionary.json"
    if beside.is_file():
        return beside
    manifest = model_dir / "manifest.json"
    if manifest.is_file():
        vocab = json.loads(manifest.read_text()).get("inputs", {}).get("vocabulary", {}).get("path")
        if vocab and storage.is_remote(vocab):  # a model trained on a corpus in a bucket
            vocab = str(artifacts.localize(vocab))
        if vocab and (Path(vocab) / "gene_median_dictionary.json").is_file():
            return Path(vocab) / "gene_median_dictionary.json"
    raise ValueError(
        f"{model_dir}: no gene median dictionary beside the model or in its manifest's vocabulary; "
        "set gene_medians: to the corpus vocabulary's gene_median_dictionary.json"
    )


@dataclass
class CellTokenizer:
    """Turns ``{gene: raw count}`` (or depth-normalised values) into the model's ``input_ids``."""

    token_dictionary: dict[str, int]
    medians: dict[str, float]
    model_input_size: int
    gene_table: GeneTable | None = None
    min_genes: int = 7
    max_genes: int = 60_000
    symbol_cache_size: int = 100_000
    """Names resolved to an Ensembl ID kept (LRU); the shared table has ~70k symbols."""
    unknown_symbol_cache_size: int = 4_096
    """Names that resolved to nothing kept (LRU), so junk cannot grow the cache."""
    v2: bool = field(init=False)

    def __post_init__(self) -> None:
        self.v2 = "<cls>" in self.token_dictionary
        if self.symbol_cache_size < 0 or self.unknown_symbol_cache_size < 0:
            raise ValueError("symbol_cache_size and unknown_symbol_cache_size must be >= 0")
        self._resolved: OrderedDict[str, str] = OrderedDict()
        self._unresolved: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        # Ensembl ID -> (token, median) of the genes a cell can be ranked by.
        self._rankable = {
            g: (t, self.medians[g])
            for g, t in self.token_dictionary.items()
            if g not in _SPECIALS and g in self.medians
        }
        self._n_vocab = max(self.token_dictionary.values()) + 1

    @classmethod
    def for_model(
        cls, model_dir: str | Path, *, gene_medians: str | None = None,
        gene_table: str | None = None, min_genes: int = 7, max_genes: int = 60_000,
        symbol_cache_size: int = 100_000, unknown_symbol_cache_size: int = 4_096,
    ) -> CellTokenizer:  # fmt: skip
        """The tokenizer of a model directory (its token dictionary, position limit and
        the medians found by :func:`find_gene_medians`); a model URI is read from this
        node's cached copy."""
        model_dir = artifacts.localize(model_dir)
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
        return cls(
            vocab, medians, size, table, min_genes, max_genes,
            symbol_cache_size=symbol_cache_size,
            unknown_symbol_cache_size=unknown_symbol_cache_size,
        )  # fmt: skip

    def cache_info(self) -> dict[str, int]:
        """Sizes of the symbol caches and their bounds: ``resolved``, ``resolved_max``,
        ``unresolved``, ``unresolved_max`` (entries)."""
        with self._lock:
            return {
                "resolved": len(self._resolved),
                "resolved_max": self.symbol_cache_size,
                "unresolved": len(self._unresolved),
                "unresolved_max": self.unknown_symbol_cache_size,
            }

    def _to_ensembl(self, names: Sequence[str]) -> list[str | None]:
        """Ensembl ID of each (stripped) name: IDs directly, symbols through the caches and
        then the gene table; None where a name maps to nothing."""
        out: list[str | None] = [None] * len(names)
        pending: dict[str, list[int]] = {}
        with self._lock:
            resolved, unresolved = self._resolved, self._unresolved
            for i, name in enumerate(names):
                if _ENSEMBL.match(name):
                    out[i] = name.upper().split(".")[0]
                elif (hit := resolved.get(name)) is not None:
                    out[i] = hit
                    resolved.move_to_end(name)
                elif name in unresolved:
                    unresolved.move_to_end(name)
                else:
                    pending.setdefault(name, []).append(i)
        if not pending or self.gene_table is None:
            return out
        symbols = list(pending)
        mapped = self.gene_table.map_genes(symbols, kind="symbol").ensembl_ids
        with self._lock:
            for name, gene_id in zip(symbols, mapped, strict=True):
                for i in pending[name]:
                    out[i] = gene_id
                cache, bound = (
                    (self._resolved, self.symbol_cache_size)
                    if gene_id is not None
                    else (self._unresolved, self.unknown_symbol_cache_size)
                )
                if bound:
                    cache[name] = gene_id
                    if len(cache) > bound:
                        cache.popitem(last=False)
        return out

    def tokenize(
        self, genes: Any, *, normalized: bool = False
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """``(input_ids, report)`` of one cell given as ``{gene: value}`` (Ensembl IDs or
        symbols): raw counts, or depth-normalised values with ``normalized`` (see the module
        docstring). Raises :class:`RequestError` (413 / 422) naming what is wrong."""
        if not isinstance(genes, Mapping) or not genes:
            raise RequestError(422, "'genes' must be a non-empty object of gene -> raw count")
        if len(genes) > self.max_genes:
            raise RequestError(
                413, f"{len(genes)} genes in one cell; at most {self.max_genes} are accepted"
            )
        names = [str(k).strip() for k in genes]
        long_names = [n for n in names if len(n) > MAX_NAME_CHARS]
        if long_names:
            raise RequestError(
                422, f"gene names have at most {MAX_NAME_CHARS} characters",
                too_long=[n[:40] + "..." for n in long_names[:5]], n_too_long=len(long_names),
            )  # fmt: skip
        counts = _values(names, list(genes.values()), normalized)
        ids = self._to_ensembl(names)
        unmapped = [n for n, i in zip(names, ids, strict=True) if i is None]
        summed: dict[str, float] = {}
        for gene_id, count in zip(ids, counts.tolist(), strict=True):
            if gene_id is not None:
                summed[gene_id] = summed.get(gene_id, 0.0) + count
        rankable = self._rankable
        usable = [g for g, c in summed.items() if c > 0 and g in rankable]
        report = {
            "n_genes": len(names),
            "n_mapped": len(names) - len(unmapped),
            "n_used": len(usable),
            "unmapped": [n[:40] for n in unmapped[:50]],
            "not_in_vocabulary": [g for g in summed if g not in self.token_dictionary][:50],
        }
        if len(usable) < self.min_genes:
            raise RequestError(
                422, f"only {len(usable)} expressed genes map to the model's vocabulary; at least "
                f"{self.min_genes} are needed (send Ensembl IDs or HGNC symbols)", **report,
            )  # fmt: skip
        encoder = RankEncoder(
            token_ids=np.array([rankable[g][0] for g in usable], dtype=np.int32),
            medians=np.array([rankable[g][1] for g in usable], dtype=np.float64),
            max_genes=self.model_input_size - (2 if self.v2 else 0),
            cls_id=self.token_dictionary["<cls>"] if self.v2 else None,
            eos_id=self.token_dictionary["<eos>"] if self.v2 else None,
        )
        # Normalised values are already divided by the cell's depth: rank value / median
        # (n = TARGET_SUM cancels the encoder's * 10,000), never n recomputed from a subset.
        total = TARGET_SUM if normalized else float(counts.sum())
        _, tokens = encoder.encode(
            np.array([0, len(usable)]), np.arange(len(usable)),
            np.array([summed[g] for g in usable]), np.array([total]),
        )  # fmt: skip
        return tokens, report

    def check_ids(self, input_ids: Any) -> np.ndarray:
        """Validate pre-tokenized ``input_ids`` (a list of token ids of this model)."""
        if not isinstance(input_ids, list) or not input_ids:
            raise RequestError(422, "'input_ids' must be a non-empty list of integers")
        if len(input_ids) > self.model_input_size:
            raise RequestError(
                413, f"{len(input_ids)} tokens; the model takes at most {self.model_input_size}"
            )
        if not all(type(i) is int for i in input_ids):
            raise RequestError(422, "'input_ids' must hold integers only")
        low, high = min(input_ids), max(input_ids)  # Python ints: no overflow before the check
        if low < 0 or high >= self._n_vocab:
            raise RequestError(
                422, f"'input_ids' must lie in [0, {self._n_vocab}) (the model's vocabulary)",
                field="input_ids", position=input_ids.index(low if low < 0 else high),
            )  # fmt: skip
        return np.asarray(input_ids, dtype=np.int32)

    def tokens_of(self, genes: Sequence[str]) -> list[int]:
        """Token ids of genes (Ensembl IDs or symbols), or a 422 naming those not in the
        model's vocabulary."""
        names = [str(g).strip() for g in genes]
        ids = self._to_ensembl([n if len(n) <= MAX_NAME_CHARS else "" for n in names])
        missing = [
            n[:40] for n, g in zip(names, ids, strict=True)
            if g is None or g not in self.token_dictionary or g in _SPECIALS
        ]  # fmt: skip
        if missing:
            raise RequestError(
                422, f"gene {missing[0]!r} is not in the model's vocabulary",
                gene=missing[0], not_in_vocabulary=missing[:50],
            )  # fmt: skip
        return [self.token_dictionary[g] for g in ids]  # type: ignore[index]

    def token_of(self, gene: str) -> int:
        """Token id of one gene (Ensembl ID or symbol), or a 422 naming it."""
        return self.tokens_of([gene])[0]


def _values(names: list[str], values: list[Any], normalized: bool) -> np.ndarray:
    """The cell's values as float64, or a 422 naming the genes whose value is refused."""
    try:
        if not set(map(type, values)) <= {int, float}:
            raise TypeError
        counts = np.fromiter(values, dtype=np.float64, count=len(values))
    except (TypeError, OverflowError):  # strings, booleans, null, lists, huge ints: name each
        counts = np.array([_as_float(v) for v in values], dtype=np.float64)
    bad = ~(np.isfinite(counts) & (counts >= 0) & (counts <= MAX_COUNT))
    if bad.any():
        which = [names[i] for i in np.flatnonzero(bad)]
        raise RequestError(
            422, f"values must be finite, non-negative numbers, at most {MAX_COUNT} (raw "
            'counts, or depth-normalised values with "normalized": true)',
            invalid_genes=[n[:40] for n in which[:50]], n_invalid=len(which),
        )  # fmt: skip
    if not normalized:
        fractional = counts != np.floor(counts)
        if fractional.any():
            which = [names[i] for i in np.flatnonzero(fractional)]
            raise RequestError(
                422, "raw counts must be whole numbers; send depth-normalised values (e.g. "
                'CP10k) with "normalized": true',
                fractional_genes=[n[:40] for n in which[:50]], n_fractional=len(which),
            )  # fmt: skip
    return counts


def _as_float(value: Any) -> float:
    if type(value) not in (int, float):
        return float("nan")
    try:
        return float(value)
    except OverflowError:
        return float("inf")
