"""Batched in-silico perturbation: many cells x many perturbations per forward pass.

For every (cell, perturbation) it reports the cosine similarity of the perturbed and the
original cell embedding, optionally the shift toward a goal state (cos(perturbed, goal) -
cos(original, goal)), and for the genes left in place the cosine of their contextual
embeddings before and after (positions re-aligned after a deletion or a move).

Work saved against the one-cell-at-a-time reference: each original cell runs once (not
once per perturbation); the encoder stops at the layer the embedding comes from (no MLM
head, no later layer); sequences of all cells and perturbations are batched together
after sorting by length (little padding). No Ray here: Ray Data and Ray Serve call it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from cellfoundry.infer.embed import Embedder
from cellfoundry.infer.perturb_ops import Perturbation, apply

logger = logging.getLogger(__name__)

__all__ = ["RESULT_SCHEMA", "Perturbation", "iter_perturb_cells", "perturb_cells"]

RESULT_SCHEMA = pa.schema(
    [
        ("cell_index", pa.int64()),
        ("cell_id", pa.string()),
        ("perturbation", pa.string()),
        ("kind", pa.string()),
        ("perturbed_token_ids", pa.list_(pa.int32())),
        ("n_genes", pa.int32()),
        ("cell_cos", pa.float32()),
        ("goal_shift", pa.float32()),
        ("gene_token_ids", pa.list_(pa.int32())),
        ("gene_cos", pa.list_(pa.float32())),
    ]
)
"""One row per (cell, perturbation) that applied, in input cell order then perturbation
order; ``goal_shift`` is null without a goal, the gene lists are empty without gene shifts."""


@dataclass
class _Job:
    cell: int  # index in the chunk
    p: Perturbation
    seq: np.ndarray  # perturbed token ids
    src: np.ndarray  # original gene rank of each new gene, -1 if inserted
    moved: np.ndarray  # bool per new gene: one of the perturbed genes


def _split(e: Embedder, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(leading specials, genes, trailing specials) of a prepared cell."""
    head = 1 if e.cls_id is not None and len(ids) and ids[0] == e.cls_id else 0
    tail = 1 if e.eos_id is not None and len(ids) > head and ids[-1] == e.eos_id else 0
    return ids[:head], ids[head : len(ids) - tail], ids[len(ids) - tail :]


def _jobs(
    e: Embedder, c: int, ids: np.ndarray, perturbations: Sequence[Perturbation],
    genome_wide: str | None, fraction: float,
) -> list[_Job]:  # fmt: skip
    """The perturbed sequences of cell ``c`` (prepared ids ``ids``)."""
    head, genes, tail = _split(e, ids)
    max_genes = e.max_length - len(head) - len(tail)
    todo = list(perturbations)
    if genome_wide is not None:
        todo += [Perturbation(genome_wide, (int(g),)) for g in genes]  # type: ignore[arg-type]
    jobs = []
    for p in todo:
        out = apply(genes, p, fraction=fraction, max_genes=max_genes)
        if out is not None:
            new, src = out
            jobs.append(
                _Job(c, p, np.concatenate([head, new, tail]), src, np.isin(new, p.token_ids))
            )
    return jobs


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)


def _run_chunk(
    e: Embedder, seqs: list[np.ndarray], jobs: list[_Job], goal: torch.Tensor | None,
    gene_shifts: bool,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray]]:  # fmt: skip
    """Cell cosines, goal shifts and per-job (gene ids, gene cosines) for one chunk."""
    orig_emb = torch.zeros(len(seqs), e.hidden_size, device=e.device)
    orig_hidden: list[torch.Tensor | None] = [None] * len(seqs)
    for b in e.encode(seqs):
        orig_emb[torch.as_tensor(b.index, device=e.device)] = e.pool(b)
        if gene_shifts:
            for r, i in enumerate(b.index):
                orig_hidden[i] = b.hidden[r, : b.lengths[r]].float()
    cell_cos = np.zeros(len(jobs), dtype=np.float32)
    goal_shift = np.full(len(jobs), np.nan, dtype=np.float32)
    gene_ids: list[np.ndarray] = [np.zeros(0, np.int32)] * len(jobs)
    gene_cos: list[np.ndarray] = [np.zeros(0, np.float32)] * len(jobs)
    for b in e.encode([j.seq for j in jobs]):
        cells = torch.as_tensor([jobs[i].cell for i in b.index], device=e.device)
        emb = e.pool(b)  # (rows, hidden)
        base = orig_emb[cells]
        cell_cos[b.index] = _cos(emb, base).cpu().numpy()
        if goal is not None:
            shift = _cos(emb, goal[None]) - _cos(base, goal[None])
            goal_shift[b.index] = shift.cpu().numpy()
        if not gene_shifts:
            continue
        for r, i in enumerate(b.index):
            job = jobs[i]
            offset = 1 if e.cls_id is not None and job.seq[0] == e.cls_id else 0
            keep = np.flatnonzero((job.src >= 0) & ~job.moved)
            new_pos = torch.as_tensor(keep + offset, device=e.device)
            old_pos = torch.as_tensor(job.src[keep] + offset, device=e.device)
            h_new = b.hidden[r].float().index_select(0, new_pos)
            h_old = orig_hidden[job.cell].index_select(0, old_pos)  # type: ignore[union-attr]
            gene_ids[i] = job.seq[keep + offset].astype(np.int32)
            gene_cos[i] = _cos(h_new, h_old).cpu().numpy().astype(np.float32)
    return cell_cos, goal_shift, gene_ids, gene_cos


def iter_perturb_cells(
    embedder: Embedder,
    cells: Sequence[np.ndarray],
    perturbations: Sequence[Perturbation] = (),
    *,
    genome_wide: str | None = None,
    fraction: float = 0.25,
    goal: np.ndarray | None = None,
    gene_shifts: bool = True,
    cell_ids: Sequence[str] | None = None,
    max_sequences: int = 2048,
    progress: bool = False,
) -> Iterator[pa.Table]:
    """:func:`perturb_cells` as a stream of tables (:data:`RESULT_SCHEMA`), one per chunk of
    cells whose perturbed sequences number about ``max_sequences`` (bounded memory);
    ``progress``: a tqdm bar over cells."""
    from tqdm.auto import tqdm

    if not perturbations and genome_wide is None:
        raise ValueError("nothing to do: give perturbations, or genome_wide (a kind) for a screen")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction {fraction}: the share of a cell's ranks to move, in (0, 1]")
    if cell_ids is not None and len(cell_ids) != len(cells):
        raise ValueError(f"{len(cell_ids)} cell_ids for {len(cells)} cells")
    goal_t = None
    if goal is not None:
        goal_t = torch.as_tensor(np.asarray(goal, np.float32), device=embedder.device)
        if goal_t.shape != (embedder.hidden_size,):
            raise ValueError(
                f"goal has shape {tuple(goal_t.shape)}, expected ({embedder.hidden_size},)"
            )
    names = {v: k for k, v in embedder.token_dictionary.items()}
    bar = tqdm(total=len(cells), unit="cell", desc="perturb", disable=not progress)
    start = 0
    while start < len(cells):
        seqs: list[np.ndarray] = []
        jobs: list[_Job] = []
        while start + len(seqs) < len(cells) and max(len(jobs), len(seqs)) < max_sequences:
            c = len(seqs)
            seqs.append(embedder.prepare(cells[start + c]))
            jobs += _jobs(embedder, c, seqs[-1], perturbations, genome_wide, fraction)
        yield _table(embedder, seqs, jobs, start, goal_t, gene_shifts, cell_ids, names)
        start += len(seqs)
        bar.update(len(seqs))
    bar.close()


def _table(e, seqs, jobs, start, goal, gene_shifts, cell_ids, names) -> pa.Table:  # type: ignore[no-untyped-def]
    cos, shift, gids, gcos = _run_chunk(e, seqs, jobs, goal, gene_shifts)
    idx = np.array([start + j.cell for j in jobs], dtype=np.int64)
    return pa.table(
        {
            "cell_index": idx,
            "cell_id": pa.array(
                [cell_ids[i] for i in idx] if cell_ids is not None else [None] * len(idx),
                pa.string(),
            ),
            "perturbation": pa.array([j.p.label(names) for j in jobs], pa.string()),
            "kind": pa.array([j.p.kind for j in jobs], pa.string()),
            "perturbed_token_ids": pa.array(
                [list(j.p.token_ids) for j in jobs], pa.list_(pa.int32())
            ),
            "n_genes": pa.array([len(_split(e, seqs[j.cell])[1]) for j in jobs], pa.int32()),
            "cell_cos": pa.array(cos, pa.float32()),
            "goal_shift": pa.array(shift, pa.float32(), from_pandas=True),
            "gene_token_ids": pa.array(gids, pa.list_(pa.int32())),
            "gene_cos": pa.array(gcos, pa.list_(pa.float32())),
        },
        schema=RESULT_SCHEMA,
    )


def perturb_cells(
    embedder: Embedder,
    cells: Sequence[np.ndarray],
    perturbations: Sequence[Perturbation] = (),
    **kwargs: object,
) -> pa.Table:
    """Apply each perturbation (or, with ``genome_wide="delete"`` etc., each expressed gene
    singly) to each cell; one :data:`RESULT_SCHEMA` row per (cell, perturbation) that
    applied, in input order. ``fraction``: ranks moved by inhibit/activate (share of the
    cell's genes); ``goal``: (hidden,) goal-state embedding; ``gene_shifts``: also the
    per-gene cosines; ``cell_ids``: IDs to carry; ``max_sequences``: perturbed sequences
    held at once; ``progress``: a tqdm bar. See :func:`iter_perturb_cells`."""
    tables = list(iter_perturb_cells(embedder, cells, perturbations, **kwargs))  # type: ignore[arg-type]
    return pa.concat_tables(tables) if tables else RESULT_SCHEMA.empty_table()
