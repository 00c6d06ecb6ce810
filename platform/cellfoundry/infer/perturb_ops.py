"""In-silico perturbations of one cell's ranked gene list (NumPy, no model).

A cell is its gene tokens in rank order (specials removed). Each perturbation returns the
new gene order and, for every new position, the original position it came from (-1 for a
gene that was not in the cell), which re-aligns contextual embeddings afterwards.

- ``delete``: the genes are removed.
- ``overexpress``: the genes go to the front (right after ``<cls>``), in the order given;
  genes the cell did not express are inserted there too, and the lowest-ranked genes drop
  out if the cell would exceed the model's input size.
- ``inhibit`` / ``activate``: each gene moves down / up by ``s = max(1, floor(f x n + 0.5))``
  ranks (``n`` genes in the cell, ``f`` the fraction, default a quartile): a gene at rank
  ``i`` is placed right after the unmoved gene of original rank ``min(i + s, n - 1)``
  (inhibit) or right before the one of rank ``max(i - s, 0)`` (activate). For one gene
  this is ``list.pop(i)`` then ``list.insert(min(i + s, n - 1), g)`` (``max(i - s, 0)``).

``delete``, ``inhibit`` and ``activate`` apply only to cells expressing every gene of the
perturbation (other cells give no result); ``overexpress`` applies to every cell.

:func:`overflow` counts the genes an overexpression pushes out of a full cell (Geneformer
compares with the original cut by as many); :func:`matched_control` draws a perturbation's
null in one cell: the same kind on random genes of about the same ranks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

PerturbKind = Literal["delete", "overexpress", "inhibit", "activate"]
KINDS: tuple[str, ...] = ("delete", "overexpress", "inhibit", "activate")


@dataclass(frozen=True)
class Perturbation:
    """One perturbation: a kind and one gene (or a combination) as token ids."""

    kind: PerturbKind
    token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"perturbation kind {self.kind!r}: use one of {', '.join(KINDS)}")
        if not self.token_ids:
            raise ValueError("a perturbation needs at least one gene")
        if len(set(self.token_ids)) != len(self.token_ids):
            raise ValueError(f"perturbation {self.kind} lists a gene twice: {self.token_ids}")

    def label(self, names: Mapping[int, str] | None = None) -> str:
        """``kind:GENE+GENE`` with names (Ensembl IDs) where known, else token ids."""
        genes = "+".join((names or {}).get(t, str(t)) for t in self.token_ids)
        return f"{self.kind}:{genes}"


def perturbation_from_genes(
    kind: str, genes: Sequence[str | int], token_dictionary: Mapping[str, int]
) -> Perturbation:
    """A :class:`Perturbation` from Ensembl IDs (or token ids); unknown genes are an error."""
    ids = []
    for g in genes:
        if isinstance(g, int) or (isinstance(g, str) and g.isdigit()):
            ids.append(int(g))
        elif g in token_dictionary:
            ids.append(int(token_dictionary[g]))
        else:
            raise ValueError(
                f"gene {g!r} is not in the model's token dictionary; give Ensembl IDs (e.g. "
                "ENSG00000141510) of genes in the model's vocabulary"
            )
    return Perturbation(kind, tuple(ids))  # type: ignore[arg-type]


def shift_ranks(n: int, fraction: float) -> int:
    """Ranks an inhibited / activated gene moves in a cell of ``n`` genes."""
    return max(1, int(np.floor(fraction * n + 0.5)))


def apply(
    genes: np.ndarray, p: Perturbation, *, fraction: float = 0.25, max_genes: int | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """(new genes, source position of each new gene or -1), or None where ``p`` does not
    apply to this cell (a gene to delete, inhibit or activate is not expressed)."""
    n = len(genes)
    targets = np.asarray(p.token_ids, dtype=genes.dtype)
    where = _positions(genes, targets)  # (k,) original rank of each target or -1
    if p.kind == "overexpress":
        rest = np.flatnonzero(~np.isin(genes, targets))
        new = np.concatenate([targets, genes[rest]])
        src = np.concatenate([where, rest])
        if max_genes is not None:
            new, src = new[:max_genes], src[:max_genes]
        return new, src
    if (where < 0).any():
        return None
    if p.kind == "delete":
        keep = np.flatnonzero(~np.isin(genes, targets))
        return genes[keep], keep
    s = shift_ranks(n, fraction)
    keys = np.arange(n, dtype=np.float64)
    order = np.arange(len(targets)) * 1e-6  # moved genes landing together keep the given order
    if p.kind == "inhibit":
        keys[where] = np.minimum(where + s, n - 1) + 0.5 + order
    else:
        keys[where] = np.maximum(where - s, 0) - 0.5 + order
    src = np.argsort(keys, kind="stable")
    return genes[src], src


def overflow(genes: np.ndarray, p: Perturbation, max_genes: int | None) -> int:
    """Lowest-ranked genes that overexpressing ``p`` pushes out of a cell of ``genes`` capped
    at ``max_genes``: the cell's genes plus the inserted (unexpressed) ones, less the cap,
    and never below 0; 0 for the other kinds (nothing is added)."""
    if p.kind != "overexpress" or max_genes is None:
        return 0
    inserted = int((_positions(genes, np.asarray(p.token_ids, dtype=genes.dtype)) < 0).sum())
    return max(0, len(genes) + inserted - max_genes)


def matched_control(
    genes: np.ndarray,
    p: Perturbation,
    rng: np.random.Generator,
    *,
    candidates: np.ndarray,
    window: float = 0.05,
) -> Perturbation | None:
    """A null for ``p`` in this cell: the same kind applied to random genes, each perturbed
    gene replaced by a gene of the cell within ``max(1, round(window x n))`` ranks of it
    (``n`` genes), an unexpressed one by a random gene of ``candidates`` the cell does not
    express; all distinct and none of ``p``'s genes. None where no such gene is left."""
    n = len(genes)
    targets = np.asarray(p.token_ids, dtype=genes.dtype)
    where = _positions(genes, targets)
    w = max(1, round(window * n))
    taken = set(int(t) for t in targets)
    out: list[int] = []
    for r in where:
        if r >= 0:
            pool = genes[max(0, r - w) : min(n, r + w + 1)]
        else:
            pool = np.setdiff1d(candidates, genes, assume_unique=False)
        pool = pool[~np.isin(pool, np.fromiter(taken, dtype=np.int64, count=len(taken)))]
        if len(pool) == 0:
            return None
        g = int(pool[int(rng.integers(len(pool)))])
        taken.add(g)
        out.append(g)
    return Perturbation(p.kind, tuple(out))


def _positions(genes: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Rank of each target in ``genes`` (-1 where absent)."""
    out = np.full(len(targets), -1, dtype=np.int64)
    for j, t in enumerate(targets):
        hit = np.flatnonzero(genes == t)
        if len(hit):
            out[j] = hit[0]
    return out
