"""Geneformer dictionary import: real files, the restricted unpickler, directory loading."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from cellfoundry.genes import (
    DictionaryError,
    GeneformerDictionaries,
    UnsafePickleError,
    load_dictionary_file,
)
from cellfoundry.paths import shared_path

GENEFORMER = shared_path("geneformer")
RELEASES = {"v1": "gc30M", "v2": "gc104M"}
NAMES = ("token_dictionary", "gene_median_dictionary", "gene_name_id_dict", "ensembl_mapping_dict")
needs_geneformer = pytest.mark.skipif(
    not GENEFORMER.is_dir(), reason=f"shared Geneformer dictionaries absent ({GENEFORMER})"
)


def _pickle(tmp_path: Path, obj: object, name: str = "d.pkl") -> Path:
    path = tmp_path / name
    path.write_bytes(pickle.dumps(obj, protocol=4))
    return path


@needs_geneformer
@pytest.mark.parametrize("version", sorted(RELEASES))
@pytest.mark.parametrize("name", NAMES)
def test_real_pickles_equal_their_json(version: str, name: str) -> None:
    stem = GENEFORMER / version / f"{name}_{RELEASES[version]}"
    from_pkl = load_dictionary_file(stem.with_suffix(".pkl"))
    from_json = load_dictionary_file(stem.with_suffix(".json"))
    assert list(from_pkl.items()) == list(from_json.items())
    # NumPy scalars in the V1 pickles come back as plain Python numbers.
    assert {type(v) for v in from_pkl.values()} <= {int, float, str}


@needs_geneformer
@pytest.mark.parametrize(
    ("version", "n_tokens", "n_medians", "n_names", "n_mapping", "n_eligible"),
    [
        ("v1", 25_426, 25_424, 40_248, 25_424, 25_424),
        ("v2", 20_275, 42_005, 63_675, 173_697, 20_271),
    ],
)
def test_load_real_release(
    version: str, n_tokens: int, n_medians: int, n_names: int, n_mapping: int, n_eligible: int
) -> None:
    d = GeneformerDictionaries.load(GENEFORMER / version)
    assert d.version == version
    assert d.source == str(GENEFORMER / version)
    sizes = (
        len(d.token_dictionary),
        len(d.gene_medians),
        len(d.gene_name_id),
        len(d.ensembl_mapping),
    )
    assert sizes == (n_tokens, n_medians, n_names, n_mapping)
    ids, tokens, medians = d.vocabulary_arrays()
    assert len(ids) == n_eligible and tokens.shape == medians.shape == (n_eligible,)
    assert tokens.dtype == np.int32 and medians.dtype == np.float64
    assert ids == sorted(ids) and not any(i.startswith("<") for i in ids)
    first = 4 if version == "v2" else 2  # genes follow the special tokens, in ID order
    np.testing.assert_array_equal(tokens, np.arange(first, first + n_eligible))
    assert medians[0] == d.gene_medians[ids[0]] and np.all(medians > 0)


def test_vocabulary_arrays_needs_token_and_median(tmp_path: Path) -> None:
    tokens = {"<pad>": 0, "<mask>": 1, "ENSG00000000005": 2, "ENSG00000000003": 3}
    (tmp_path / "token_dictionary_x.json").write_text(json.dumps(tokens))
    medians = {"ENSG00000000003": 2.5, "ENSG00000000419": 1.0}  # no median for ...005
    (tmp_path / "gene_median_dictionary_x.json").write_text(json.dumps(medians))
    d = GeneformerDictionaries.load(tmp_path)
    ids, tok, med = d.vocabulary_arrays()
    assert (ids, tok.tolist(), med.tolist()) == (["ENSG00000000003"], [3], [2.5])
    assert d.version == "v1" and d.gene_name_id == {} and d.ensembl_mapping == {}


def test_json_preferred_over_pkl(tmp_path: Path) -> None:
    (tmp_path / "token_dictionary_a.json").write_text(json.dumps({"<pad>": 0, "<mask>": 1}))
    _pickle(tmp_path, {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}, "token_dictionary_a.pkl")
    _pickle(tmp_path, {"ENSG00000000003": 1.5}, "gene_median_dictionary_a.pkl")
    d = GeneformerDictionaries.load(tmp_path)
    assert d.version == "v1" and d.gene_medians == {"ENSG00000000003": 1.5}


def test_missing_required_dictionary_is_explained(tmp_path: Path) -> None:
    (tmp_path / "token_dictionary_a.json").write_text(json.dumps({"<pad>": 0, "<mask>": 1}))
    with pytest.raises(DictionaryError, match=r"no gene_median_dictionary\*\.json") as err:
        GeneformerDictionaries.load(tmp_path)
    assert str(tmp_path) in str(err.value) and "geneformer/v2" in str(err.value)
    with pytest.raises(DictionaryError, match="does not exist"):
        GeneformerDictionaries.load(tmp_path / "nope")


def test_missing_optional_dictionaries_warn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "token_dictionary.json").write_text(json.dumps({"<pad>": 0, "<mask>": 1}))
    (tmp_path / "gene_median_dictionary.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="cellfoundry.genes.dictionaries"):
        GeneformerDictionaries.load(tmp_path)
    assert "gene_name_id_dict" in caplog.text and "ensembl_mapping_dict" in caplog.text


def test_two_sets_in_one_directory_are_refused(tmp_path: Path) -> None:
    for s in ("a", "b"):
        (tmp_path / f"token_dictionary_{s}.json").write_text("{}")
    with pytest.raises(DictionaryError, match="several token_dictionary"):
        GeneformerDictionaries.load(tmp_path)


class _Exploit:
    """Runs a shell command when unpickled by an unrestricted unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _pickle(tmp_path, {"ENSG00000000003": _Exploit(marker)})
    with pytest.raises(UnsafePickleError, match=r"refusing to unpickle \w+\.system") as err:
        load_dictionary_file(path)
    assert str(path) in str(err.value) and ".json" in str(err.value)
    assert isinstance(err.value, pickle.UnpicklingError) and isinstance(err.value, ValueError)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (["ENSG00000000003", 1], "holds a list, not a dict"),
        ({"a": [1, 2]}, "value of key 'a' is a list"),
        ({1: 2}, "key 1 is a int"),
        ({"a": True}, "value of key 'a' is a bool"),
        ({"a": np.str_("x")}, "refusing numpy dtype"),  # only numeric NumPy scalars
        ({"a": np.array([1.0])}, r"refusing to unpickle numpy\._?core"),
    ],
)
def test_wrong_content_is_refused(tmp_path: Path, obj: object, message: str) -> None:
    with pytest.raises(DictionaryError, match=message):
        load_dictionary_file(_pickle(tmp_path, obj))


def test_numpy_scalars_become_python_numbers(tmp_path: Path) -> None:
    big_endian = np.array([1.5], dtype=">f8")[0]
    obj = {"f": np.float64(0.25), "i": np.int16(-3), "b": big_endian, "u": np.uint8(7)}
    loaded = load_dictionary_file(_pickle(tmp_path, obj))
    assert loaded == {"f": 0.25, "i": -3, "b": 1.5, "u": 7}
    assert [type(v) for v in loaded.values()] == [float, int, float, int]
    assert np.dtype("f8").byteorder == "=" and np.dtype("f8").isnative  # singleton untouched


def test_bad_files(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("{}")
    with pytest.raises(DictionaryError, match=r"expected \.json or \.pkl"):
        load_dictionary_file(tmp_path / "d.txt")
    (tmp_path / "d.pkl").write_bytes(pickle.dumps({"a": 1})[:-5])
    with pytest.raises(DictionaryError, match="not a readable pickle"):
        load_dictionary_file(tmp_path / "d.pkl")
    (tmp_path / "d.json").write_text("{")
    with pytest.raises(DictionaryError, match="not valid JSON"):
        load_dictionary_file(tmp_path / "d.json")
    with pytest.raises(DictionaryError, match="does not exist"):
        load_dictionary_file(tmp_path / "missing.json")
