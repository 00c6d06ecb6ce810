"""The server's tokenizer: bounded symbol caches, raw vs normalised values, named 422s."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from cellfoundry.genes import GeneTable
from cellfoundry.serve.errors import RequestError
from cellfoundry.serve.tokenizer import MAX_COUNT, CellTokenizer


@pytest.fixture(scope="module")
def parts(geneformer_dir: Path) -> tuple[dict[str, int], dict[str, float], GeneTable]:
    """The real Geneformer V2 token and median dictionaries and the shared gene table."""
    vocab = json.loads((geneformer_dir / "v2" / "token_dictionary_gc104M.json").read_text())
    medians = json.loads((geneformer_dir / "v2" / "gene_median_dictionary_gc104M.json").read_text())
    return vocab, {k: float(v) for k, v in medians.items()}, GeneTable.load()


def _tokenizer(parts: tuple, **kw: int) -> CellTokenizer:
    vocab, medians, table = parts
    return CellTokenizer(vocab, medians, 4096, table, **kw)


@pytest.fixture(scope="module")
def symbols(parts: tuple) -> list[str]:
    """2,000 symbols of the table whose genes the V2 dictionary ranks."""
    tok = _tokenizer(parts)
    names = [s for s in parts[2].frame["symbol"].unique(maintain_order=True).to_list() if s]
    names = names[:20_000]
    ids = tok._to_ensembl(names)
    keep = [n for n, i in zip(names, ids, strict=True) if i in tok.token_dictionary]
    return keep[:2_000]


def _error(call: object) -> RequestError:
    with pytest.raises(RequestError) as info:
        call()  # type: ignore[operator]
    return info.value


def test_unknown_names_never_grow_the_cache_past_its_bound(
    parts: tuple, symbols: list[str]
) -> None:
    tok = _tokenizer(parts, symbol_cache_size=500, unknown_symbol_cache_size=100)
    for r in range(5):
        junk = {f"NOPE{r}_{i}": 1 for i in range(2_000)}
        assert _error(lambda j=junk: tok.tokenize(j)).status == 422
    info = tok.cache_info()
    assert info["unresolved"] == 100 and info["resolved"] == 0, info
    counts = {s: 1 + i % 13 for i, s in enumerate(symbols)}
    first = tok.tokenize(counts)[0]
    assert tok.cache_info()["resolved"] == 500  # 2,000 resolved, the 500 most recent kept
    again = tok.tokenize(counts)[0]  # evicted names resolve again, to the same tokens
    uncached = _tokenizer(parts, symbol_cache_size=0, unknown_symbol_cache_size=0)
    assert first.tolist() == again.tolist() == uncached.tokenize(counts)[0].tolist()
    assert uncached.cache_info()["resolved"] == uncached.cache_info()["unresolved"] == 0


def test_concurrent_tokenizing_agrees(parts: tuple, symbols: list[str]) -> None:
    tok = _tokenizer(parts, symbol_cache_size=300, unknown_symbol_cache_size=50)
    cells = [
        {s: 1 + (i * k) % 17 for i, s in enumerate(symbols[k * 100 :])}
        | {f"JUNK{k}_{i}": 1 for i in range(200)}
        for k in range(8)
    ]
    expected = [_tokenizer(parts).tokenize(c)[0].tolist() for c in cells]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: tok.tokenize(c)[0].tolist(), cells * 3))
    assert got == expected * 3
    assert tok.cache_info()["resolved"] <= 300 and tok.cache_info()["unresolved"] <= 50


def test_normalized_values_rank_like_raw_counts(parts: tuple, symbols: list[str]) -> None:
    """CP10k (and fractions) of a cell, sent as normalised values, give the raw counts'
    tokens, whatever the scale and whichever unmapped names carried part of the total."""
    tok = _tokenizer(parts)
    rng = np.random.default_rng(0)
    for _ in range(5):
        raw = {s: int(c) for s, c in zip(symbols, rng.integers(0, 40, len(symbols)), strict=True)}
        raw["NOT_A_GENE_1"] = 5_000
        n = sum(raw.values())
        expected = tok.tokenize(raw)[0].tolist()
        cp10k = {g: c / n * 10_000 for g, c in raw.items() if g != "NOT_A_GENE_1"}
        assert tok.tokenize(cp10k, normalized=True)[0].tolist() == expected
        fractions = {g: c / n for g, c in raw.items()}
        assert tok.tokenize(fractions, normalized=True)[0].tolist() == expected


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (1.5, "normalized"),
        (1e300, "at most"),
        (MAX_COUNT + 1, "at most"),
        (10**400, "at most"),
        (-1, "non-negative"),
        (float("nan"), "finite"),
        (True, "finite"),
        ("3", "finite"),
        (None, "finite"),
    ],
    ids=["fraction", "1e300", "int32+1", "10^400", "negative", "nan", "bool", "string", "null"],
)
def test_refused_values(parts: tuple, symbols: list[str], value: object, needle: str) -> None:
    cell = {s: 3 for s in symbols[:20]} | {symbols[20]: value}
    error = _error(lambda: _tokenizer(parts).tokenize(cell))
    assert error.status == 422 and needle in error.message, error.message
    named = error.details.get("invalid_genes") or error.details.get("fractional_genes")
    assert named == [symbols[20]]


def test_names_ids_and_perturbation_genes(parts: tuple, symbols: list[str]) -> None:
    tok = _tokenizer(parts)
    long_name = _error(lambda: tok.tokenize({"G" * 10_000: 1} | {s: 1 for s in symbols[:10]}))
    assert long_name.status == 422 and "characters" in long_name.message
    for ids in ([2, 10**29], [2, -1], [2, True], [2, 1.0], []):
        assert _error(lambda i=ids: tok.check_ids(i)).status == 422, ids
    assert tok.check_ids([2, 10, 3]).dtype == np.int32
    assert tok.tokens_of(symbols[:3]) == [tok.token_of(s) for s in symbols[:3]]
    missing = _error(lambda: tok.tokens_of([symbols[0], "TP53_NOPE", "x" * 500]))
    assert missing.details["not_in_vocabulary"] == ["TP53_NOPE", "x" * 40]
