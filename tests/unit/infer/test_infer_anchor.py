"""The anchor-gene combination screen (Geneformer's ``anchor_gene``) on a tiny random model:
the anchor with every other expressed gene of each cell that expresses it, nothing for a
cell without it; the screen job's actor runs it from the config (no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _infer_reference import random_cells

from cellfoundry.config import ConfigError, PerturbJobConfig, config_to_dict, parse_config
from cellfoundry.infer.embed import Embedder
from cellfoundry.infer.perturb import Perturbation, perturb_cells
from cellfoundry.infer.perturb_job import PerturbShards, resolved

ANCHOR = 10


def _cells() -> list[np.ndarray]:
    """Four V2 cells: three express the anchor (at different ranks), the third does not."""
    cells = random_cells(4, seed=5, min_genes=8, max_genes=16)
    out = []
    for i, ids in enumerate(cells):
        genes = [int(g) for g in ids[1:-1] if g != ANCHOR]
        if i != 2:
            genes.insert(i * 3 % len(genes), ANCHOR)
        out.append(np.array([2, *genes, 3], dtype=np.int64))
    return out


@pytest.mark.parametrize("kind", ["delete", "inhibit"])
def test_anchor_with_every_other_gene(small_model: Path, kind: str) -> None:
    e = Embedder(small_model, pooling="cls")
    cells = _cells()
    table = pl.from_arrow(
        perturb_cells(e, cells, genome_wide=kind, anchor_gene=ANCHOR, gene_shifts=False)
    )
    want = [
        (c, (ANCHOR, int(g)))
        for c, ids in enumerate(cells)
        if ANCHOR in ids
        for g in ids[1:-1]
        if g != ANCHOR
    ]
    got = [
        (c, tuple(t))
        for c, t in zip(table["cell_index"], table["perturbed_token_ids"].to_list(), strict=True)
    ]
    assert got == want and 2 not in set(table["cell_index"])  # the cell without the anchor
    assert set(table["kind"]) == {kind}
    assert table["perturbation"][0] == f"{kind}:ENSG{ANCHOR:011d}+ENSG{want[0][1][1]:011d}"
    # each row is the listed combination's number
    pair = Perturbation(kind, want[0][1])  # type: ignore[arg-type]
    direct = perturb_cells(e, cells[:1], [pair], gene_shifts=False)
    assert table["cell_cos"][0] == pytest.approx(direct["cell_cos"][0].as_py(), abs=2e-6)


def test_anchor_needs_a_genome_wide_kind(small_model: Path) -> None:
    e = Embedder(small_model, pooling="cls")
    with pytest.raises(ValueError, match="give genome_wide"):
        perturb_cells(e, _cells(), [Perturbation("delete", (11,))], anchor_gene=ANCHOR)
    base = {"model": "m", "tokenized": "t", "output_dir": "o"}
    with pytest.raises(ConfigError, match="give genome_wide"):
        parse_config(
            PerturbJobConfig,
            {**base, "anchor_gene": "ENSG00000000010",
             "perturbations": [{"kind": "delete", "genes": ["ENSG00000000011"]}]},
        )  # fmt: skip


def test_screen_actor_runs_the_anchor_screen(
    small_model: Path, tmp_path: Path, vocab: dict
) -> None:
    cells = _cells()
    src = tmp_path / "tok" / "part-00000.parquet"
    src.parent.mkdir()
    ids = [f"c{i}" for i in range(len(cells))]
    pq.write_table(pa.table({"cell_id": ids, "input_ids": [c.tolist() for c in cells]}), src)
    cfg = parse_config(
        PerturbJobConfig,
        {"model": str(small_model), "tokenized": str(src.parent),
         "output_dir": str(tmp_path / "screen"), "genome_wide": "delete",
         "anchor_gene": f"ENSG{ANCHOR:011d}", "gene_shifts": False},
    )  # fmt: skip
    dst = tmp_path / "work" / src.name
    cfg = resolved(cfg, vocab)  # as the driver hands it to the actors
    PerturbShards(config_to_dict(cfg), None).process(str(src), str(dst))
    out = pl.read_parquet(dst)
    expected = sum(len(c) - 3 for c in cells if ANCHOR in c)  # genes less the anchor
    assert out.height == expected and "c2" not in set(out["cell_id"])
    assert all(t[0] == ANCHOR and len(t) == 2 for t in out["perturbed_token_ids"].to_list())
