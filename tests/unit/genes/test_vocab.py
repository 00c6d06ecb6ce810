"""Token vocabularies: the Geneformer layout, building, saving, loading and validation."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from cellfoundry.genes import (
    SPECIAL_TOKENS_V1,
    SPECIAL_TOKENS_V2,
    GeneTable,
    VocabularyError,
    build_vocabulary,
    load_token_dictionary,
    save_token_dictionary,
    special_tokens,
    validate_token_dictionary,
)
from cellfoundry.paths import shared_path

GENEFORMER = shared_path("geneformer")
RELEASES = {"v1": "gc30M", "v2": "gc104M"}
needs_geneformer = pytest.mark.skipif(
    not GENEFORMER.is_dir(), reason=f"shared Geneformer dictionaries absent ({GENEFORMER})"
)
A, B, C = "ENSG00000000003", "ENSG00000000005", "ENSG00000000419"


def test_special_tokens() -> None:
    assert SPECIAL_TOKENS_V2 == {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}
    assert SPECIAL_TOKENS_V1 == {"<pad>": 0, "<mask>": 1}
    assert special_tokens("v1") == SPECIAL_TOKENS_V1
    with pytest.raises(VocabularyError, match="use 'v1' or 'v2'"):
        special_tokens("v3")  # type: ignore[arg-type]


def test_build_normalises_dedups_and_sorts() -> None:
    vocab = build_vocabulary([C, "ensg00000000003.7", A, B + ".1"])
    assert list(vocab.items()) == [*SPECIAL_TOKENS_V2.items(), (A, 4), (B, 5), (C, 6)]
    assert build_vocabulary([B, A], mode="v1") == {"<pad>": 0, "<mask>": 1, A: 2, B: 3}
    assert build_vocabulary([]) == SPECIAL_TOKENS_V2
    with pytest.raises(VocabularyError, match=r"2 values are not Ensembl gene IDs.*TP53"):
        build_vocabulary([A, "TP53", "ENSG123"])


@needs_geneformer
@pytest.mark.parametrize("version", sorted(RELEASES))
def test_build_reproduces_the_real_token_dictionary(version: str) -> None:
    real = load_token_dictionary(
        GENEFORMER / version / f"token_dictionary_{RELEASES[version]}.json"
    )
    genes = [k for k in real if not k.startswith("<")]
    random.Random(0).shuffle(genes)
    built = build_vocabulary(genes, mode=version)  # type: ignore[arg-type]
    assert list(built.items()) == list(real.items())  # same tokens, ids and order


@needs_geneformer
def test_load_real_pickle_token_dictionary() -> None:
    pkl = load_token_dictionary(GENEFORMER / "v1" / "token_dictionary_gc30M.pkl")
    assert validate_token_dictionary(pkl) == "v1" and len(pkl) == 25_426


def test_biotype_filter_with_the_gene_table() -> None:
    if not shared_path("data", "genes").is_dir():
        pytest.skip("shared gene tables absent")
    table = GeneTable.load()
    tp53, mir21, malat1 = "ENSG00000141510", "ENSG00000284190", "ENSG00000251562"
    kept = build_vocabulary([malat1, tp53, mir21], gene_table=table)
    assert list(kept)[4:] == [tp53, mir21]
    assert list(build_vocabulary([malat1, tp53], gene_table=table, biotypes=None))[4:] == [
        tp53,
        malat1,
    ]
    assert list(build_vocabulary([malat1, tp53], gene_table=table, biotypes=["lncRNA"]))[4:] == [
        malat1
    ]


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    vocab = build_vocabulary([B, A, C])
    shuffled = dict(reversed(list(vocab.items())))
    path = save_token_dictionary(shuffled, tmp_path / "vocab" / "token_dictionary.json")
    text = path.read_text()
    assert text.startswith('{\n"<pad>": 0,\n"<mask>": 1,\n"<cls>": 2,')  # the published format
    assert list(json.loads(text).items()) == list(vocab.items())  # sorted by id
    assert list(load_token_dictionary(path).items()) == list(vocab.items())
    assert [p.name for p in path.parent.iterdir()] == ["token_dictionary.json"]  # no temp left


@pytest.mark.parametrize(
    ("vocab", "message"),
    [
        ({"<pad>": 0, "<mask>": 1, A: 3}, r"contiguous 0\.\.2, got 0\.\.3"),
        ({"<pad>": 0, "<mask>": 1, A: 1}, r"not unique \(repeated: \[1\]\)"),
        ({"<pad>": 1, "<mask>": 0, A: 2}, "<pad> must have id 0 in v1 layout"),
        ({"<pad>": 0, "<mask>": 1, "<cls>": 3, "<eos>": 2}, "<cls> must have id 2 in v2"),
        ({"<pad>": 0, "<mask>": 1, "<eos>": 2}, r"unexpected special tokens \['<eos>'\]"),
        (
            {"<pad>": 0, "<mask>": 1, "TP53": 2},
            r"Ensembl gene IDs without version \(e.g. \['TP53'\]",
        ),
        ({"<pad>": 0, "<mask>": 1, A + ".2": 2}, "without version"),
        ({"<pad>": 0, "<mask>": 1, A: 2.0}, "token ids must be integers"),
        ({"<pad>": 0, "<mask>": True}, "token ids must be integers"),
    ],
)
def test_validation_errors(tmp_path: Path, vocab: dict, message: str) -> None:
    with pytest.raises(VocabularyError, match=message):
        validate_token_dictionary(vocab)
    with pytest.raises(VocabularyError, match=message):
        save_token_dictionary(vocab, tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()
    (tmp_path / "t.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match=str(tmp_path / "t.json")):  # the file is named
        load_token_dictionary(tmp_path / "t.json")
