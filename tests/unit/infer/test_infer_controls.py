"""A targeted screen's null: controls on rank-matched random genes, in the same cells, seeded
per (cell, perturbation), so a perturbation's test does not depend on the others listed."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from _infer_reference import MAX_POS, N_GENES, random_cells

from cellfoundry.infer.embed import Embedder
from cellfoundry.infer.perturb import Perturbation, perturb_cells
from cellfoundry.infer.perturb_ops import matched_control
from cellfoundry.infer.stats import rank_sum_vs_rest, screen_stats

X = 10  # the perturbed gene, expressed by every cell below


def _model(tied: bool) -> torch.nn.Module:
    """A random 3-layer BERT (std 0.2, so shifts are well above float32 noise); ``tied``:
    every gene token has the same embedding, so genes are interchangeable and no
    perturbation of a gene can have an effect of its own."""
    from cellfoundry.model import bert_config, build_model

    config = bert_config(
        "tiny", vocab_size=4 + N_GENES, num_hidden_layers=3, hidden_size=32,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=MAX_POS,
        initializer_range=0.2,
    )  # fmt: skip
    model = build_model(config, seed=1).eval()
    if tied:
        with torch.no_grad():
            words = model.bert.embeddings.word_embeddings.weight
            words[4:] = words[4]
    return model


def _cells(n: int, seed: int) -> list[np.ndarray]:
    """V2 cells that all express gene X, at ranks spread over the cell."""
    rng = np.random.default_rng(seed)
    out = []
    for ids in random_cells(n, seed=seed, min_genes=12, max_genes=40):
        genes = [int(g) for g in ids[1:-1] if g != X]
        genes.insert(int(rng.integers(len(genes) + 1)), X)
        out.append(np.array([2, *genes, 3], dtype=np.int64))
    return out


def test_matched_controls_are_rank_matched_and_seeded() -> None:
    genes = np.arange(4, 44)  # 40 genes, window max(1, round(0.05 * 40)) = 2 ranks
    candidates = np.arange(4, 4 + N_GENES)
    for kind in ("delete", "inhibit", "activate", "overexpress"):
        p = Perturbation(kind, (20, 30))  # type: ignore[arg-type]
        for seed in range(20):
            q = matched_control(genes, p, np.random.default_rng(seed), candidates=candidates)
            assert q is not None and q.kind == kind and not set(q.token_ids) & {20, 30}
            assert abs(q.token_ids[0] - 20) <= 2 and abs(q.token_ids[1] - 30) <= 2
    q = matched_control(genes, Perturbation("overexpress", (90,)), np.random.default_rng(0),
                        candidates=candidates)  # fmt: skip
    assert q is not None and q.token_ids[0] not in genes  # an unexpressed gene for one
    a = matched_control(genes, Perturbation("delete", (20,)), np.random.default_rng(5),
                        candidates=candidates)  # fmt: skip
    b = matched_control(genes, Perturbation("delete", (20,)), np.random.default_rng(5),
                        candidates=candidates)  # fmt: skip
    assert a == b


def test_controls_and_p_value_do_not_depend_on_the_list(vocab: dict) -> None:
    e = Embedder(_model(tied=False), token_dictionary=vocab, batch_size=32)
    cells = _cells(24, seed=21)
    ids = [f"c{i}" for i in range(len(cells))]
    a = Perturbation("delete", (X,))
    others = [Perturbation("overexpress", (50,)), Perturbation("inhibit", (X,))]
    alone = pl.from_arrow(perturb_cells(e, cells, [a], cell_ids=ids, null_draws=3))
    listed = pl.from_arrow(
        perturb_cells(e, cells, [others[0], a, others[1]], cell_ids=ids, null_draws=3)
    )
    label = alone["perturbation"][0]
    mine = listed.filter(pl.col("perturbation") == label)
    assert alone.height == mine.height == 24 * 4 and alone["control"].sum() == 72
    assert alone["perturbed_token_ids"].to_list() == mine["perturbed_token_ids"].to_list()
    assert np.allclose(alone["cell_cos"].to_numpy(), mine["cell_cos"].to_numpy(), atol=2e-6)
    p_alone = screen_stats(alone).row(0, named=True)
    p_listed = screen_stats(listed).filter(pl.col("perturbation") == label).row(0, named=True)
    assert p_alone["test"] == "matched_controls" and p_alone["n_null"] == 72
    assert p_listed["pvalue"] == pytest.approx(p_alone["pvalue"], rel=1e-6)


def test_null_effect_on_an_untrained_model_is_not_significant(vocab: dict) -> None:
    """Untrained, and genes interchangeable: deleting or inhibiting X does what deleting or
    moving any gene of its rank does. The old default (each perturbation against the others
    pooled) called both highly significant; against their own controls neither is."""
    e = Embedder(_model(tied=True), token_dictionary=vocab, batch_size=32)
    cells = _cells(40, seed=22)
    perts = [Perturbation("delete", (X,)), Perturbation("inhibit", (X,))]
    screen = pl.from_arrow(perturb_cells(e, cells, perts, null_draws=3))
    stats = screen_stats(screen)
    assert set(stats["test"]) == {"matched_controls"} and stats["n_cells"].to_list() == [40, 40]
    assert (stats["pvalue"] > 0.05).all() and (stats["fdr"] > 0.05).all()
    real = screen.filter(~pl.col("control"))
    old = rank_sum_vs_rest(1.0 - real["cell_cos"].to_numpy(), real["perturbation"].to_numpy())
    assert (old["pvalue"] < 1e-6).all()
