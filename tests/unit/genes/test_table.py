"""The offline gene table and symbol mapping, on synthetic tables and the real shared data."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from cellfoundry.genes import (
    GeneMapping,
    GeneTable,
    GeneTableError,
    MyGeneMapper,
    normalize_ensembl,
)
from cellfoundry.paths import shared_path

GENES = shared_path("data", "genes")
H5AD = shared_path("data", "h5ad")
needs_genes = pytest.mark.skipif(not GENES.is_dir(), reason=f"shared gene tables absent ({GENES})")
needs_h5ad = pytest.mark.skipif(not H5AD.is_dir(), reason=f"shared h5ad files absent ({H5AD})")

HEADER = (
    "ensembl_gene_id\tgene_name\tchromosome\tstart\tend\tbiotype\tprimary_assembly\t"
    "hgnc_symbol\thgnc_locus_group\thgnc_locus_type\tentrez_id\thgnc_prev_symbols\t"
    "hgnc_alias_symbols"
)
ROWS = [  # id, name, chromosome, biotype, primary, hgnc symbol, entrez, previous, aliases
    ("ENSG00000000001.4", "AAA1", "1", "protein_coding", "True", "AAA1", "11", "OLD1", "X1|SHARED"),
    ("ENSG00000000002", "BBB2", "2", "lncRNA", "True", "", "", "OLD2|OLDDUP", "SHARED|bb-2"),
    ("ENSG00000000003", "DUP", "3", "protein_coding", "True", "", "", "OLDDUP", ""),
    ("ENSG00000000004", "DUP", "4", "protein_coding", "True", "", "", "", ""),
    ("ENSG00000000005", "AAA1", "CHR_HSCHR6_ALT", "protein_coding", "False", "", "", "", ""),
    ("ENSG00000000006", "MT-CO9", "MT", "protein_coding", "True", "MT-CO9", "", "", ""),
    ("ENSG00000000007", "PAIR", "5", "miRNA", "True", "PAIR", "", "", ""),
    ("ENSG00000000008", "PAIR", "6", "miRNA", "True", "", "", "AAA1", ""),
    ("ENSG00000000001", "AAA1-copy", "1", "lncRNA", "True", "", "", "", ""),  # duplicate ID
]


def _write_table(tmp_path: Path) -> Path:
    lines = [HEADER] + [
        "\t".join([i, n, c, "1", "2", b, p, h, "", "", e, prev, alias])
        for i, n, c, b, p, h, e, prev, alias in ROWS
    ]
    path = tmp_path / "genes.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def table() -> GeneTable:
    if not GENES.is_dir():
        pytest.skip(f"shared gene tables absent ({GENES})")
    return GeneTable.load()


def _var_names(path: Path) -> list[str]:
    with h5py.File(path, "r") as f:
        return [v.decode() for v in f["var"][f["var"].attrs["_index"]][:]]


def test_normalize_ensembl() -> None:
    got = normalize_ensembl(
        [
            "ensg00000141510.17",
            " ENSG00000141510 ",
            "TP53",
            None,
            "ENSG0000014151",
            "ENSGR0000002586",
        ]
    )
    assert got == ["ENSG00000141510", "ENSG00000141510", None, None, None, "ENSGR0000002586"]
    assert normalize_ensembl(["ENSG00000002586.20_PAR_Y", "ENSMUSG00000059552.1"]) == [
        None,
        "ENSMUSG00000059552",
    ]


def test_symbol_rules_on_a_small_table(tmp_path: Path) -> None:
    t = GeneTable.load(_write_table(tmp_path), extra_id_files=())
    assert len(t) == 8 and t.frame["ensembl_id"].is_sorted()  # duplicate ID kept once
    assert t.frame.row(0) == ("ENSG00000000001", "AAA1", "protein_coding", "1")
    names = [
        "AAA1",
        "aaa1",
        "OLD1",
        "OLD2",
        "OLDDUP",
        "X1",
        "SHARED",
        "BB-2",
        "DUP",
        "PAIR",
        "LOC11",
        "GeneID:11",
        "ENSG00000000002.3",
        "ENSG00000000099",
        "nothing",
    ]
    m = t.map_genes(names)
    got = {
        n: (i[-1] if i else None, meth, r)
        for n, i, meth, r in zip(m.names, m.ensembl_ids, m.methods, m.reasons, strict=True)
    }
    assert got == {
        "AAA1": ("1", "symbol", None),  # primary assembly beats the alt-scaffold copy
        "aaa1": ("1", "symbol_ci", None),
        "OLD1": ("1", "previous", None),
        "OLD2": ("2", "previous", None),
        "OLDDUP": (None, None, "ambiguous symbol"),
        "X1": ("1", "alias", None),
        "SHARED": (None, None, "ambiguous symbol"),
        "BB-2": ("2", "alias", None),  # aliases match case-insensitively
        "DUP": (None, None, "ambiguous symbol"),  # two primary genes, neither HGNC-approved
        "PAIR": ("7", "symbol", None),  # the HGNC-approved one wins
        "LOC11": ("1", "entrez", None),
        "GeneID:11": ("1", "entrez", None),
        "ENSG00000000002.3": ("2", "ensembl", None),
        "ENSG00000000099": (None, None, "not in gene table"),
        "nothing": (None, None, "unknown symbol"),
    }
    assert m.n_total == 15 and m.n_mapped == 10
    assert m.unmapped == ["OLDDUP", "SHARED", "DUP", "ENSG00000000099", "nothing"]
    summary = m.summary()
    assert summary["by_method"] == {
        "symbol": 2,
        "symbol_ci": 1,
        "previous": 2,
        "alias": 2,
        "entrez": 2,
        "ensembl": 1,
    }
    assert summary["unmapped_by_reason"] == {
        "ambiguous symbol": 3,
        "not in gene table": 1,
        "unknown symbol": 1,
    }
    assert summary["n_names_sharing_an_id"] == 9 and json.dumps(summary)


def test_kinds(tmp_path: Path) -> None:
    t = GeneTable.load(_write_table(tmp_path), extra_id_files=())
    as_ids = t.map_genes(["ENSG00000000002", "BBB2"], kind="ensembl")
    assert as_ids.ensembl_ids == ["ENSG00000000002", None]
    assert as_ids.reasons == [None, "not an Ensembl gene ID"]
    as_symbols = t.map_genes(["ENSG00000000002", "BBB2"], kind="symbol")
    assert as_symbols.ensembl_ids == [None, "ENSG00000000002"]
    with pytest.raises(GeneTableError, match="use 'ensembl', 'symbol' or 'auto'"):
        t.map_genes(["BBB2"], kind="entrez")  # type: ignore[arg-type]
    assert t.map_genes([]).summary()["n_total"] == 0


def test_annotations(tmp_path: Path) -> None:
    t = GeneTable.load(_write_table(tmp_path), extra_id_files=())
    ids = ["ENSG00000000006", "ENSG00000000002", "ENSG00000000099"]
    assert t.biotypes(ids).tolist() == ["protein_coding", "lncRNA", "unknown"]
    assert t.is_protein_coding(ids).tolist() == [True, False, False]
    assert t.is_mitochondrial(ids).tolist() == [True, False, False]
    assert t.contains([*ids, None]).tolist() == [True, True, False, False]
    annotated = t.annotate(ids)
    assert annotated["ensembl_id"].to_list() == ids
    assert annotated["symbol"].to_list() == ["MT-CO9", "BBB2", None]
    assert annotated["biotype"].to_list() == ["protein_coding", "lncRNA", "unknown"]


def test_extra_id_files_and_biomart_layout(tmp_path: Path) -> None:
    biomart = tmp_path / "biomart.tsv"
    biomart.write_text(
        "Gene stable ID\tGene name\tChromosome/scaffold name\tGene start (bp)\tGene end (bp)\t"
        "Gene type\nENSG00000000001\tAAA1\t1\t1\t2\tprotein_coding\n"
        "ENSG00000000002\t\tMT\t1\t2\tMt_tRNA\n"
    )
    extra = tmp_path / "GENCODEv44_Gene_id2name.csv"  # found beside the table by default
    extra.write_text(
        "ENSG00000000001,AAA1\nENSG00000000009.2,NEW9\nENSG00000000010,ENSG00000000010\n"
    )
    t = GeneTable.load(biomart)
    assert t.frame.rows() == [
        ("ENSG00000000001", "AAA1", "protein_coding", "1"),
        ("ENSG00000000002", None, "Mt_tRNA", "MT"),
        ("ENSG00000000009", "NEW9", "unknown", None),
        ("ENSG00000000010", None, "unknown", None),
    ]
    assert t.map_genes(["NEW9"]).methods == ["symbol"]
    assert t.is_mitochondrial(["ENSG00000000002"]).tolist() == [True]
    assert len(GeneTable.load(biomart, extra_id_files=())) == 2


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(GeneTableError, match="does not exist; pass path="):
        GeneTable.load(tmp_path / "missing.tsv")
    (tmp_path / "bad.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(GeneTableError, match="unknown gene table layout"):
        GeneTable.load(tmp_path / "bad.tsv")
    with pytest.raises(GeneTableError, match="extra gene ID file"):
        GeneTable.load(_write_table(tmp_path), extra_id_files=[tmp_path / "none.csv"])


@needs_genes
def test_real_table_loads_fast_and_maps_known_genes(table: GeneTable) -> None:
    start = time.perf_counter()
    GeneTable.load()
    assert time.perf_counter() - start < 2.0
    assert len(table) > 67_130  # BioMart genes plus GENCODE v44 extras
    assert table.frame["ensembl_id"].is_unique().all()
    m = table.map_genes(["TP53", "tp53", "C1orf75", "TSPAN-6", "ENSG00000141510.17", "Y_RNA"])
    assert m.ensembl_ids == [
        "ENSG00000141510",
        "ENSG00000141510",
        "ENSG00000065600",
        "ENSG00000000003",
        "ENSG00000141510",
        None,
    ]
    assert m.methods == ["symbol", "symbol_ci", "previous", "alias", "ensembl", None]
    assert m.reasons[-1] == "ambiguous symbol"  # hundreds of Y_RNA genes
    ids = ["ENSG00000198804", "ENSG00000141510", "ENSG00000284190", "ENSG00000251562"]
    assert table.biotypes(ids).tolist() == ["protein_coding", "protein_coding", "miRNA", "lncRNA"]
    assert table.is_mitochondrial(ids).tolist() == [True, False, False, False]


@needs_genes
@needs_h5ad
@pytest.mark.parametrize(
    "name",
    [
        "pbmc3k_seurat_2638cells",
        "pbmc_facs_zheng2017_3874cells",
        "scirpy_wu2020_200cells",
        "scwg_1k_PBMC_v2_filt",
        "scwg_1k_PBMC_v2_raw",
        "scwg_1k_PBMC_v3_filt",
    ],
)
def test_real_h5ad_var_names_map(table: GeneTable, name: str) -> None:
    m = table.map_genes(_var_names(H5AD / f"{name}.h5ad"))
    summary = m.summary()
    assert summary["fraction_mapped"] >= 0.82, summary
    if name == "scwg_1k_PBMC_v2_raw":
        assert summary["by_method"]["previous"] + summary["by_method"]["alias"] > 50
        assert m.ensembl_ids[m.names.index("CD3E")] == "ENSG00000198851"


def test_mygene_cache_needs_no_client(
    tmp_path: Path, table: GeneTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = {"TP53": "ENSG00000141510", "C1orf75": None, "FOO": "ENSG99999999999", "ZZZ": None}
    (tmp_path / "mygene_human.json").write_text(json.dumps(cache))
    monkeypatch.setitem(sys.modules, "mygene", None)  # any import of the client would fail
    mapper = MyGeneMapper(tmp_path, gene_table=table)
    m = mapper.map_genes(["TP53", "C1orf75", "FOO", "ZZZ", "ENSG00000198804"])
    assert isinstance(m, GeneMapping)
    assert m.ensembl_ids == ["ENSG00000141510", "ENSG00000065600", None, None, "ENSG00000198804"]
    assert m.methods == ["mygene", "previous", None, None, "ensembl"]  # misses fall back offline
    assert m.reasons[2:4] == ["unknown symbol", "unknown symbol"]


@pytest.mark.skipif(importlib.util.find_spec("mygene") is not None, reason="mygene installed")
def test_mygene_missing_is_explained(tmp_path: Path, table: GeneTable) -> None:
    mapper = MyGeneMapper(tmp_path, gene_table=table)
    with pytest.raises(ImportError, match=r"pip install 'cellfoundry\[online\]'"):
        mapper.map_genes(["TP53"])
    assert np.array_equal(mapper.gene_table.contains(["ENSG00000141510"]), [True])
