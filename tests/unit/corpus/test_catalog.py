from __future__ import annotations

import re
from pathlib import Path
from typing import get_args, get_type_hints

import pytest

from cellfoundry.config import QCConfig
from cellfoundry.corpus.catalog import (
    CatalogError,
    DatasetEntry,
    doi_duplicates,
    exclusion_reason,
    load_catalog,
)
from cellfoundry.corpus.sources import FORMATS
from cellfoundry.paths import shared_dir


def test_yaml_and_csv_agree(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        "datasets:\n"
        "  - {id: a, uri: data/a.h5ad, doi: 10.1/X, metadata: {cell_type: celltype}}\n"
        "  - {id: b, uri: 's3://bucket/b.h5ad', platform: Smart-seq2, malignant: true}\n"
        "  - {id: c, uri: '{shared}/data/h5ad/x.h5ad', doi: 10.1/x, cell_line: yes}\n"
    )
    (tmp_path / "c.csv").write_text(
        "id,uri,doi,platform,malignant,cell_line,metadata\n"
        "a,data/a.h5ad,10.1/X,,,,cell_type=celltype\n"
        "b,s3://bucket/b.h5ad,,Smart-seq2,true,,\n"
        "c,{shared}/data/h5ad/x.h5ad,10.1/x,,,yes,\n"
    )
    yaml_rows, csv_rows = load_catalog(tmp_path / "c.yaml"), load_catalog(tmp_path / "c.csv")
    assert [e.to_row() for e in yaml_rows] == [e.to_row() for e in csv_rows]
    a, b, c = yaml_rows
    assert a.uri == str(tmp_path / "data" / "a.h5ad")  # relative to the catalog
    assert b.uri == "s3://bucket/b.h5ad"
    assert c.uri == str(shared_dir() / "data" / "h5ad" / "x.h5ad")
    assert a.metadata == {"cell_type": "celltype"}
    qc = QCConfig()
    assert [exclusion_reason(e, qc) for e in yaml_rows] == [
        None,
        "excluded_malignant",
        "excluded_cell_line",
    ]
    assert exclusion_reason(b, QCConfig(exclude_malignant=False)) == "excluded_non_droplet"
    assert doi_duplicates(yaml_rows) == {"c": "a"}  # DOIs compare case-insensitively


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("datasets:\n  - {id: a}\n", "dataset 'a': missing required key(s) uri"),
        ("datasets:\n  - {uri: x}\n", "datasets[0]: missing required key(s) id"),
        ("datasets:\n  - {id: 'a b', uri: x}\n", "may only hold"),
        ("datasets:\n  - {id: a, uri: x, colour: red}\n", "dataset 'a': unknown key(s) colour"),
        ("datasets:\n  - {id: a, uri: x}\n  - {id: a, uri: y}\n", "appears twice"),
        ("datasets:\n  - {id: a, uri: x, malignant: maybe}\n", "a'.malignant: expected true or"),
        ("datasets: []\n", "lists no datasets"),
        ("items: []\n", "'datasets:' list"),
        # Wrong types are errors, not strings (which silently excluded the dataset).
        ("datasets:\n  - {id: a, uri: x, organ: [a, b]}\n", "a'.organ: expected a string"),
        ("datasets:\n  - {id: a, uri: x, platform: 5}\n", "a'.platform: expected text, got the"),
        ("datasets:\n  - {id: a, uri: x, doi: 10.1000}\n", "a'.doi: expected text"),
        ("datasets:\n  - {id: a, uri: x, metadata: [x]}\n", "a'.metadata: expected a mapping"),
        ("datasets:\n  - {id: a, uri: x, format: csv}\n", "a'.format: 'csv' is not one of"),
        ("datasets:\n  - {id: a, uri: x}\nversion: 2\n", "unknown key(s) version"),
        ("datasets:\n  - 5\n", "datasets[0] is not a mapping"),
    ],
)
def test_errors_name_row_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(CatalogError, match=re.escape(message)) as err:
        load_catalog(path)
    assert str(path) in str(err.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("datasets:\n  - {id: a, uri: x.h5ad\n  - {id: b, uri: y.h5ad}\n")
    with pytest.raises(CatalogError, match=rf"catalog {path}, line 3, column 5: not valid YAML"):
        load_catalog(path)


def test_csv_cells_are_text_and_empty_cells_take_defaults(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text("id,uri,organ,platform,malignant\n5,x.h5ad,,10x,no\n")
    (e,) = load_catalog(tmp_path / "c.csv")
    assert (e.id, e.organ, e.platform, e.malignant, e.droplet) == (
        "5",
        "unknown",
        "10x",
        False,
        True,
    )
    (tmp_path / "bad.csv").write_text("id,uri,colour\na,x.h5ad,red\n")
    with pytest.raises(CatalogError, match=r"dataset 'a': unknown key\(s\) colour"):
        load_catalog(tmp_path / "bad.csv")


def test_format_choices_are_the_readers_formats() -> None:
    hints = get_type_hints(DatasetEntry)
    (choices,) = (a for a in get_args(hints["format"]) if a is not type(None))
    assert get_args(choices) == FORMATS


def test_missing_catalog(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="does not exist"):
        load_catalog(tmp_path / "none.yaml")
