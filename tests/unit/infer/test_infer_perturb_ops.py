"""Perturbation ops against plain list operations."""

from __future__ import annotations

import numpy as np
import pytest

from cellfoundry.infer.perturb_ops import Perturbation, apply, perturbation_from_genes, shift_ranks


def plain_move(genes: list[int], gene: int, kind: str, fraction: float) -> list[int]:
    """One gene moved down (inhibit) or up (activate) with list.pop / list.insert."""
    g = list(genes)
    n = len(g)
    s = max(1, int(np.floor(fraction * n + 0.5)))
    i = g.index(gene)
    g.pop(i)
    g.insert(min(i + s, n - 1) if kind == "inhibit" else max(i - s, 0), gene)
    return g


@pytest.mark.parametrize("kind", ["inhibit", "activate"])
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 1.0])
def test_move_matches_pop_insert(kind: str, fraction: float) -> None:
    rng = np.random.default_rng(1)
    for n in (1, 2, 3, 7, 20):
        genes = rng.choice(np.arange(10, 200), n, replace=False)
        for i in range(n):
            new, src = apply(genes, Perturbation(kind, (int(genes[i]),)), fraction=fraction)
            assert new.tolist() == plain_move(genes.tolist(), int(genes[i]), kind, fraction)
            assert (genes[src] == new).all()


def test_delete_single_and_combination() -> None:
    genes = np.array([5, 9, 7, 11, 6])
    new, src = apply(genes, Perturbation("delete", (7,)))
    assert new.tolist() == [5, 9, 11, 6] and src.tolist() == [0, 1, 3, 4]
    new, src = apply(genes, Perturbation("delete", (6, 9)))
    assert new.tolist() == [5, 7, 11] and src.tolist() == [0, 2, 3]
    assert apply(genes, Perturbation("delete", (7, 99))) is None  # not all expressed
    assert apply(genes, Perturbation("inhibit", (99,))) is None


def test_overexpress_front_insert_and_truncate() -> None:
    genes = np.array([5, 9, 7, 11, 6])
    new, src = apply(genes, Perturbation("overexpress", (11, 7)))
    assert new.tolist() == [11, 7, 5, 9, 6] and src.tolist() == [3, 2, 0, 1, 4]
    new, src = apply(genes, Perturbation("overexpress", (42,)), max_genes=5)
    assert new.tolist() == [42, 5, 9, 7, 11] and src.tolist() == [-1, 0, 1, 2, 3]


def test_combination_moves_keep_given_order() -> None:
    genes = np.arange(10, 30)  # 20 genes, s = 5
    new, _ = apply(genes, Perturbation("inhibit", (18, 19)), fraction=0.25)
    assert sorted(new.tolist()) == genes.tolist()
    assert new.tolist()[11:15] == [23, 18, 24, 19]  # each right after the gene s ranks lower
    new, _ = apply(genes, Perturbation("activate", (12, 11)), fraction=0.25)
    assert new.tolist()[:3] == [12, 11, 10]  # both clamp to the top: the given order
    assert shift_ranks(20, 0.25) == 5 and shift_ranks(3, 0.01) == 1


def test_perturbation_validation_and_labels() -> None:
    vocab = {"<pad>": 0, "ENSG1": 4, "ENSG2": 5}
    p = perturbation_from_genes("delete", ["ENSG1", "ENSG2"], vocab)
    assert p.token_ids == (4, 5) and p.label({4: "ENSG1", 5: "ENSG2"}) == "delete:ENSG1+ENSG2"
    with pytest.raises(ValueError, match="not in the model's token dictionary"):
        perturbation_from_genes("delete", ["ENSG9"], vocab)
    with pytest.raises(ValueError, match="kind"):
        Perturbation("knockout", (4,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="twice"):
        Perturbation("delete", (4, 4))
