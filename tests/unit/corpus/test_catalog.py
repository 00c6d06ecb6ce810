from __future__ import annotations

from pathlib import Path

import pytest

from cellfoundry.config import QCConfig
from cellfoundry.corpus.catalog import CatalogError, doi_duplicates, exclusion_reason, load_catalog
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
        ("datasets:\n  - {id: a}\n", "field 'uri' is required"),
        ("datasets:\n  - {id: 'a b', uri: x}\n", "may only hold"),
        ("datasets:\n  - {id: a, uri: x, colour: red}\n", "unknown field"),
        ("datasets:\n  - {id: a, uri: x}\n  - {id: a, uri: y}\n", "appears twice"),
        ("datasets:\n  - {id: a, uri: x, malignant: maybe}\n", "expected true/false"),
        ("datasets: []\n", "lists no datasets"),
        ("items: []\n", "'datasets:' list"),
    ],
)
def test_errors_name_row_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(CatalogError, match=message):
        load_catalog(path)


def test_missing_catalog(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="does not exist"):
        load_catalog(tmp_path / "none.yaml")
