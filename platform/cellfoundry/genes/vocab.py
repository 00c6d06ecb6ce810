"""Token vocabularies: special tokens, then genes sorted by Ensembl ID (the Geneformer layout).

V2 (Genecorpus-104M): ``<pad>``=0, ``<mask>``=1, ``<cls>``=2, ``<eos>``=3, genes from 4.
V1 (Genecorpus-30M): ``<pad>``=0, ``<mask>``=1, genes from 2.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from cellfoundry.genes.dictionaries import load_dictionary_file
from cellfoundry.genes.mapping import ensembl_expr
from cellfoundry.genes.table import GeneTable

logger = logging.getLogger(__name__)

__all__ = [
    "SPECIAL_TOKENS_V1",
    "SPECIAL_TOKENS_V2",
    "VocabularyError",
    "build_vocabulary",
    "load_token_dictionary",
    "save_token_dictionary",
    "special_tokens",
    "validate_token_dictionary",
]

VocabMode = Literal["v1", "v2"]
SPECIAL_TOKENS_V2: dict[str, int] = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}
SPECIAL_TOKENS_V1: dict[str, int] = {"<pad>": 0, "<mask>": 1}
DEFAULT_BIOTYPES = ("protein_coding", "miRNA")


class VocabularyError(ValueError):
    """A token dictionary breaks the layout (ids, special tokens) or has bad gene IDs."""


def special_tokens(mode: VocabMode) -> dict[str, int]:
    """The special tokens of ``mode`` ("v1" or "v2") with their ids."""
    if mode not in ("v1", "v2"):
        raise VocabularyError(f"vocabulary mode {mode!r}; use 'v1' or 'v2'")
    return dict(SPECIAL_TOKENS_V2 if mode == "v2" else SPECIAL_TOKENS_V1)


def build_vocabulary(
    ensembl_ids: Iterable[str],
    *,
    mode: VocabMode = "v2",
    gene_table: GeneTable | None = None,
    biotypes: Sequence[str] | None = DEFAULT_BIOTYPES,
) -> dict[str, int]:
    """Token dictionary for ``ensembl_ids``: the special tokens of ``mode``, then the unique
    IDs (normalised: upper-case, no version) sorted, with consecutive ids.

    With ``gene_table``, only IDs whose biotype is in ``biotypes`` are kept (None keeps all).
    Raises :class:`VocabularyError` for a string that is not an Ensembl gene ID.
    """
    specials = special_tokens(mode)
    ids = pl.DataFrame({"raw": list(ensembl_ids)}, schema={"raw": pl.String}).with_columns(
        ensembl_expr(pl.col("raw")).alias("ensembl_id")
    )
    bad = ids.filter(pl.col("ensembl_id").is_null())["raw"]
    if len(bad):
        raise VocabularyError(
            f"build_vocabulary: {len(bad)} values are not Ensembl gene IDs (e.g. "
            f"{bad.head(5).to_list()}); map symbols first with GeneTable.map_genes"
        )
    genes = ids["ensembl_id"].unique().sort()
    if gene_table is not None and biotypes is not None:
        keep = np.isin(gene_table.biotypes(genes), list(biotypes))
        logger.info(
            "vocabulary: kept %d of %d genes with biotype in %s",
            int(keep.sum()),
            len(genes),
            list(biotypes),
        )
        genes = genes.filter(pl.Series(keep))
    vocab = dict(specials)
    vocab.update(
        zip(genes.to_list(), range(len(specials), len(specials) + len(genes)), strict=True)
    )
    return vocab


def validate_token_dictionary(
    d: Mapping[str, int], *, source: str = "token dictionary"
) -> VocabMode:
    """Check the layout and return the mode ("v2" iff ``<cls>`` is present).

    Token ids must be ints, unique and contiguous from 0; the special tokens of the mode
    must sit at their ids; every other token must be a normalised Ensembl gene ID.
    """
    mode: VocabMode = "v2" if "<cls>" in d else "v1"
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in d.values()):
        raise VocabularyError(f"{source}: token ids must be integers")
    ids = np.fromiter(d.values(), dtype=np.int64, count=len(d))
    if len(np.unique(ids)) != len(ids):
        dup = np.unique(ids)[np.unique(ids, return_counts=True)[1] > 1][:5].tolist()
        raise VocabularyError(f"{source}: token ids are not unique (repeated: {dup})")
    specials = special_tokens(mode)
    if len(ids) and (ids.min() != 0 or ids.max() != len(ids) - 1):
        raise VocabularyError(
            f"{source}: token ids must be contiguous 0..{len(ids) - 1}, got "
            f"{ids.min()}..{ids.max()}; rebuild it with build_vocabulary"
        )
    for token, expected in specials.items():
        if d.get(token) != expected:
            raise VocabularyError(
                f"{source}: {token} must have id {expected} in {mode} layout, got "
                f"{d.get(token)}; rebuild it with build_vocabulary(mode={mode!r})"
            )
    extra = [k for k in d if k.startswith("<") and k.endswith(">") and k not in specials]
    if extra:
        raise VocabularyError(
            f"{source}: unexpected special tokens {extra} for the {mode} layout "
            f"(which has {list(specials)}); remove them or rebuild with build_vocabulary"
        )
    genes = pl.Series("g", [k for k in d if k not in specials], dtype=pl.String)
    normal = genes.to_frame().select(ensembl_expr(pl.col("g")) == pl.col("g")).to_series()
    normal = normal.fill_null(False)
    if not normal.all():
        bad = genes.filter(~normal).head(5).to_list()
        raise VocabularyError(
            f"{source}: gene tokens must be upper-case Ensembl gene IDs without version "
            f"(e.g. {bad}); normalise them with normalize_ensembl"
        )
    return mode


def save_token_dictionary(d: Mapping[str, int], path: str | Path) -> Path:
    """Validate ``d`` and write it as JSON sorted by token id (one entry per line, like the
    published Geneformer ``token_dictionary*.json``); atomic. Returns the path."""
    path = Path(path)
    validate_token_dictionary(d, source=str(path))
    ordered = dict(sorted(d.items(), key=lambda kv: kv[1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(ordered, indent=0) + "\n")
    tmp.replace(path)
    return path


def load_token_dictionary(path: str | Path) -> dict[str, int]:
    """Load a token dictionary from ``.json`` or ``.pkl`` (restricted unpickler), validated
    with :func:`validate_token_dictionary`."""
    d = load_dictionary_file(path)
    validate_token_dictionary(d, source=str(path))
    return d
