"""Batched in-silico perturbation: many cells x many perturbations per forward pass.

For every (cell, perturbation) it reports the cell shift ``cell_cos``, optionally the shift
toward a goal state (cos(perturbed, goal) - cos(original, goal), on the embedder's pooled
cell embeddings), and for the genes left in place the cosine of their contextual embeddings
before and after (positions re-aligned after a deletion or a move). ``metric`` says what
``cell_cos`` is:

- ``geneformer`` (the default, Geneformer's perturber): V2 models (a ``<cls>`` token): the
  cosine of the original and perturbed ``<cls>`` states; V1 models: the mean over the genes
  left in place of their per-gene cosines. An overexpression that pushes ``k`` genes out of
  a full cell is compared with the original cut by its last ``k`` genes (run as such).
- ``pooled``: the cosine of the pooled cell embeddings (the embedder's ``pooling``), an
  overexpression compared with the whole original.

Genome-wide overexpression skips each cell's top-ranked gene (a no-op). With an
``anchor_gene``, a genome-wide screen perturbs the anchor together with each other gene of
every cell that expresses the anchor (Geneformer's ``anchor_gene``: ``kind:ANCHOR+GENE``
rows; cells without it give none). ``alternatives`` (state -> embedding) add the shift
toward each alternative state, ``alt_shift:<state>`` (Geneformer's ``alt_states``). With ``null_draws``,
each listed perturbation that applies to a cell also gets that many controls there (rows
with ``control`` true, under the perturbation's label): the same kind on random genes of
about the same ranks, seeded per (cell, perturbation), so a perturbation's null does not
depend on which other perturbations are listed.

Work saved against the one-cell-at-a-time reference: each original cell runs once (not
once per perturbation); the encoder stops at the layer the embedding comes from (no MLM
head, no later layer); sequences of all cells and perturbations are batched together
after sorting by length (little padding). No Ray here: Ray Data and Ray Serve call it.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from cellfoundry.infer.embed import Embedder
from cellfoundry.infer.perturb_ops import Perturbation, apply, matched_control, overflow

logger = logging.getLogger(__name__)

__all__ = [
    "METRICS",
    "RESULT_SCHEMA",
    "Perturbation",
    "alt_column",
    "iter_perturb_cells",
    "perturb_cells",
    "result_metadata",
    "result_schema",
]

METRICS = ("geneformer", "pooled")

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
        ("control", pa.bool_()),
    ]
)
"""One row per (cell, perturbation) that applied, in input cell order then perturbation
order, each followed by its controls (``control`` true: the perturbation's label, the
control's genes in ``perturbed_token_ids``); ``goal_shift`` is null without a goal, the
gene lists are empty without gene shifts. Tables carry :func:`result_metadata`; with
alternative states, :func:`result_schema` adds a column per state."""

ALT_PREFIX = "alt_shift:"


def alt_column(state: str) -> str:
    """The column of the shift toward alternative state ``state``."""
    return f"{ALT_PREFIX}{state}"


def result_schema(alternatives: Sequence[str] = ()) -> pa.Schema:
    """:data:`RESULT_SCHEMA` plus ``alt_shift:<state>`` (float32) per alternative state:
    cos(perturbed, state) - cos(original, state), as the goal shift."""
    schema = RESULT_SCHEMA
    for state in alternatives:
        schema = schema.append(pa.field(alt_column(state), pa.float32()))
    return schema


def precision_of(embedder: Embedder) -> str:
    """The precision the embedder's weights run in (``fp32``, ``bf16``, ``fp16``, or the
    torch dtype's name)."""
    dtype = next(embedder.model.parameters()).dtype
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return names.get(dtype, str(dtype).removeprefix("torch."))


def result_metadata(embedder: Embedder, metric: str) -> dict[str, str]:
    """What a result was computed with (the schema metadata of its tables): ``metric``,
    ``layer`` (ours), ``emb_layer`` (Geneformer's), ``pooling`` (goal shift, and cell shift
    with ``metric="pooled"``), ``cell_embedding`` (what ``cell_cos`` compares),
    ``overexpress_original`` and ``precision`` (of the weights, :func:`precision_of`)."""
    v2 = embedder.cls_id is not None
    if metric == "geneformer":
        cell = "<cls> state" if v2 else "mean of per-gene cosines of the genes left in place"
        original = "cut by the genes pushed out"
    else:
        cell = f"{embedder.pooling} pooled embedding"
        original = "whole"
    return {
        "metric": metric,
        "layer": str(embedder.layer),
        "emb_layer": str(embedder.emb_layer),
        "pooling": embedder.pooling,
        "cell_embedding": cell,
        "overexpress_original": original,
        "precision": precision_of(embedder),
    }


@dataclass
class _Job:
    cell: int  # index of the cell in the chunk
    orig: int  # index of the original sequence it is compared with
    p: Perturbation  # the genes perturbed (a control's random genes)
    label: str  # the listed perturbation's label (also on its controls)
    control: bool
    seq: np.ndarray  # perturbed token ids
    src: np.ndarray  # original gene rank of each new gene, -1 if inserted
    moved: np.ndarray  # bool per new gene: one of the perturbed genes


@dataclass
class _Plan:
    """What to do to every cell (fixed over a call)."""

    perturbations: Sequence[Perturbation]
    genome_wide: str | None
    fraction: float
    metric: str
    null_draws: int
    seed: int
    anchor: int | None
    names: dict[int, str]
    candidates: np.ndarray  # gene token ids (controls of unexpressed genes)
    labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.labels = [p.label(self.names) for p in self.perturbations]


def _split(e: Embedder, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(leading specials, genes, trailing specials) of a prepared cell."""
    head = 1 if e.cls_id is not None and len(ids) and ids[0] == e.cls_id else 0
    tail = 1 if e.eos_id is not None and len(ids) > head and ids[-1] == e.eos_id else 0
    return ids[:head], ids[head : len(ids) - tail], ids[len(ids) - tail :]


def _control_rng(seed: int, label: str, cell_key: str) -> np.random.Generator:
    """A generator per (seed, perturbation, cell): its draws do not depend on the others."""
    return np.random.default_rng([seed, zlib.crc32(label.encode()), zlib.crc32(cell_key.encode())])


def _jobs(
    e: Embedder, plan: _Plan, c: int, ids: np.ndarray, cell_key: str, cuts: list[np.ndarray],
    cut_index: dict[tuple[int, int], int],
) -> list[_Job]:  # fmt: skip
    """The perturbed sequences of cell ``c`` (prepared ids ``ids``). An overexpression
    compared with a cut original appends that original to ``cuts`` (once per cell and cut)
    and refers to it as ``orig = -1 - its index`` (cells are ``orig >= 0``)."""
    head, genes, tail = _split(e, ids)
    max_genes = e.max_length - len(head) - len(tail)
    todo = list(zip(plan.perturbations, plan.labels, strict=True))
    if plan.genome_wide is not None and plan.anchor is not None:
        # the anchor with each other gene; a cell without the anchor: no row (as Geneformer)
        if plan.anchor in genes:
            top = [int(g) for g in genes[:2]]
            for g in genes:
                # overexpressing (anchor, g) where they already lead in that order: a no-op
                if g == plan.anchor or (plan.genome_wide == "overexpress" and top == [plan.anchor, int(g)]):  # fmt: skip
                    continue
                p = Perturbation(plan.genome_wide, (plan.anchor, int(g)))  # type: ignore[arg-type]
                todo.append((p, p.label(plan.names)))
    elif plan.genome_wide is not None:
        # overexpressing the top-ranked gene leaves the cell as it is: no row
        skip = 1 if plan.genome_wide == "overexpress" else 0
        for g in genes[skip:]:
            p = Perturbation(plan.genome_wide, (int(g),))  # type: ignore[arg-type]
            todo.append((p, p.label(plan.names)))
    jobs: list[_Job] = []

    def add(q: Perturbation, label: str, control: bool) -> bool:
        out = apply(genes, q, fraction=plan.fraction, max_genes=max_genes)
        if out is None:  # a gene to delete or move is not expressed: no row
            return False
        new, src = out
        orig = c
        n_out = overflow(genes, q, max_genes) if plan.metric == "geneformer" else 0
        if n_out:  # Geneformer's comparison: the original less the genes pushed out
            if (c, n_out) not in cut_index:
                cut_index[(c, n_out)] = len(cuts)
                cuts.append(np.concatenate([head, genes[: len(genes) - n_out], tail]))
            orig = -1 - cut_index[(c, n_out)]
        seq = np.concatenate([head, new, tail])
        jobs.append(_Job(c, orig, q, label, control, seq, src, np.isin(new, q.token_ids)))
        return True

    for i, (p, label) in enumerate(todo):
        if not add(p, label, False) or i >= len(plan.perturbations) or not plan.null_draws:
            continue  # controls: only where a listed perturbation applied
        rng = _control_rng(plan.seed, label, cell_key)
        for _ in range(plan.null_draws):
            q = matched_control(genes, p, rng, candidates=plan.candidates)
            if q is not None:
                add(q, label, True)
    return jobs


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)


def _run_chunk(
    e: Embedder, origs: list[np.ndarray], jobs: list[_Job], goal: torch.Tensor | None,
    gene_shifts: bool, metric: str, alts: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray], np.ndarray]:  # fmt: skip
    """Cell cosines, goal shifts, per-job (gene ids, gene cosines) and the (jobs, states)
    shifts toward the alternative states ``alts`` (states, hidden) of one chunk."""
    cls_metric = metric == "geneformer" and e.cls_id is not None
    genes_metric = metric == "geneformer" and e.cls_id is None  # V1: mean of gene cosines
    if cls_metric and not all(len(s) and s[0] == e.cls_id for s in origs):
        raise ValueError(
            "metric 'geneformer' on a V2 model compares <cls> states, and a cell has no <cls> "
            "first: tokenize the cells with the model's V2 layout, or use metric 'pooled'"
        )
    need_hidden = gene_shifts or genes_metric
    orig_emb = torch.zeros(len(origs), e.hidden_size, device=e.device)
    orig_cls = torch.zeros(len(origs), e.hidden_size, device=e.device)
    orig_hidden: list[torch.Tensor | None] = [None] * len(origs)
    for b in e.encode(origs):
        rows = torch.as_tensor(b.index, device=e.device)
        orig_emb[rows] = e.pool(b)
        if cls_metric:
            orig_cls[rows] = b.hidden[:, 0].float()
        if need_hidden:
            for r, i in enumerate(b.index):
                orig_hidden[i] = b.hidden[r, : b.lengths[r]].float()
    cell_cos = np.zeros(len(jobs), dtype=np.float32)
    goal_shift = np.full(len(jobs), np.nan, dtype=np.float32)
    n_alts = 0 if alts is None else len(alts)
    alt_shift = np.full((len(jobs), n_alts), np.nan, dtype=np.float32)
    gene_ids: list[np.ndarray] = [np.zeros(0, np.int32)] * len(jobs)
    gene_cos: list[np.ndarray] = [np.zeros(0, np.float32)] * len(jobs)
    for b in e.encode([j.seq for j in jobs]):
        origin = torch.as_tensor([jobs[i].orig for i in b.index], device=e.device)
        emb = e.pool(b)  # (rows, hidden)
        base = orig_emb[origin]
        if cls_metric:
            cell_cos[b.index] = _cos(b.hidden[:, 0].float(), orig_cls[origin]).cpu().numpy()
        elif not genes_metric:
            cell_cos[b.index] = _cos(emb, base).cpu().numpy()
        if goal is not None:
            shift = _cos(emb, goal[None]) - _cos(base, goal[None])
            goal_shift[b.index] = shift.cpu().numpy()
        if alts is not None and n_alts:
            shift = _cos(emb[:, None], alts[None]) - _cos(base[:, None], alts[None])
            alt_shift[b.index] = shift.cpu().numpy()  # (rows, states)
        if not need_hidden:
            continue
        for r, i in enumerate(b.index):
            job = jobs[i]
            offset = 1 if e.cls_id is not None and job.seq[0] == e.cls_id else 0
            keep = np.flatnonzero((job.src >= 0) & ~job.moved)
            new_pos = torch.as_tensor(keep + offset, device=e.device)
            old_pos = torch.as_tensor(job.src[keep] + offset, device=e.device)
            h_new = b.hidden[r].float().index_select(0, new_pos)
            h_old = orig_hidden[job.orig].index_select(0, old_pos)  # type: ignore[union-attr]
            cos = _cos(h_new, h_old).cpu().numpy().astype(np.float32)
            if genes_metric:  # no gene left in place: no shift to average (NaN)
                cell_cos[i] = cos.mean(dtype=np.float64) if len(cos) else np.nan
            if gene_shifts:
                gene_ids[i] = job.seq[keep + offset].astype(np.int32)
                gene_cos[i] = cos
    return cell_cos, goal_shift, gene_ids, gene_cos, alt_shift


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
    metric: str = "geneformer",
    null_draws: int = 0,
    seed: int = 0,
    anchor_gene: int | None = None,
    alternatives: Mapping[str, np.ndarray] | None = None,
    max_sequences: int = 2048,
    progress: bool = False,
) -> Iterator[pa.Table]:
    """:func:`perturb_cells` as a stream of tables (:func:`result_schema` of the
    alternatives), one per chunk of cells whose perturbed sequences number about
    ``max_sequences`` (bounded memory); ``progress``: a tqdm bar over cells."""
    from tqdm.auto import tqdm

    if not perturbations and genome_wide is None:
        raise ValueError("nothing to do: give perturbations, or genome_wide (a kind) for a screen")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction {fraction}: the share of a cell's ranks to move, in (0, 1]")
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: use 'geneformer' or 'pooled'")
    if null_draws < 0:
        raise ValueError(f"null_draws {null_draws}: controls per cell and perturbation, >= 0")
    if cell_ids is not None and len(cell_ids) != len(cells):
        raise ValueError(f"{len(cell_ids)} cell_ids for {len(cells)} cells")
    if anchor_gene is not None and genome_wide is None:
        raise ValueError(
            "anchor_gene perturbs the anchor with every other gene of a genome-wide screen: "
            "give genome_wide (a kind) too"
        )
    goal_t = None
    if goal is not None:
        goal_t = torch.as_tensor(np.asarray(goal, np.float32), device=embedder.device)
        if goal_t.shape != (embedder.hidden_size,):
            raise ValueError(
                f"goal has shape {tuple(goal_t.shape)}, expected ({embedder.hidden_size},)"
            )
    states = list(alternatives or {})
    alts_t = None
    if states:
        alts_t = torch.as_tensor(
            np.stack([np.asarray(alternatives[s], np.float32) for s in states]),  # type: ignore[index]
            device=embedder.device,
        )
        if alts_t.shape != (len(states), embedder.hidden_size):
            raise ValueError(
                f"alternative states have shape {tuple(alts_t.shape)}, expected "
                f"({len(states)}, {embedder.hidden_size})"
            )
    vocab = embedder.token_dictionary
    names = {v: k for k, v in vocab.items()}
    genes = np.array(sorted(v for k, v in vocab.items() if not k.startswith("<")), np.int64)
    anchor = None if anchor_gene is None else int(anchor_gene)
    plan = _Plan(
        perturbations, genome_wide, fraction, metric, null_draws, seed, anchor, names, genes
    )
    meta = result_metadata(embedder, metric)
    bar = tqdm(total=len(cells), unit="cell", desc="perturb", disable=not progress)
    start = 0
    while start < len(cells):
        seqs: list[np.ndarray] = []
        cuts: list[np.ndarray] = []
        cut_index: dict[tuple[int, int], int] = {}
        jobs: list[_Job] = []
        while start + len(seqs) < len(cells) and max(len(jobs), len(seqs)) < max_sequences:
            c = len(seqs)
            seqs.append(embedder.prepare(cells[start + c]))
            key = str(cell_ids[start + c]) if cell_ids is not None else str(start + c)
            jobs += _jobs(embedder, plan, c, seqs[-1], key, cuts, cut_index)
        for j in jobs:  # cut originals run after the cells
            j.orig = j.orig if j.orig >= 0 else len(seqs) - 1 - j.orig
        table = _table(embedder, seqs, seqs + cuts, jobs, start, goal_t, gene_shifts, cell_ids,
                       metric, alts_t, states)  # fmt: skip
        yield table.replace_schema_metadata(meta)
        start += len(seqs)
        bar.update(len(seqs))
    bar.close()


def _table(
    e: Embedder, seqs: list[np.ndarray], origs: list[np.ndarray], jobs: list[_Job], start: int,
    goal: torch.Tensor | None, gene_shifts: bool, cell_ids: Sequence[str] | None, metric: str,
    alts: torch.Tensor | None, states: list[str],
) -> pa.Table:  # fmt: skip
    cos, shift, gids, gcos, alt = _run_chunk(e, origs, jobs, goal, gene_shifts, metric, alts)
    idx = np.array([start + j.cell for j in jobs], dtype=np.int64)
    table = pa.table(
        {
            "cell_index": idx,
            "cell_id": pa.array(
                [cell_ids[i] for i in idx] if cell_ids is not None else [None] * len(idx),
                pa.string(),
            ),
            "perturbation": pa.array([j.label for j in jobs], pa.string()),
            "kind": pa.array([j.p.kind for j in jobs], pa.string()),
            "perturbed_token_ids": pa.array(
                [list(j.p.token_ids) for j in jobs], pa.list_(pa.int32())
            ),
            "n_genes": pa.array([len(_split(e, seqs[j.cell])[1]) for j in jobs], pa.int32()),
            "cell_cos": pa.array(cos, pa.float32(), from_pandas=True),
            "goal_shift": pa.array(shift, pa.float32(), from_pandas=True),
            "gene_token_ids": pa.array(gids, pa.list_(pa.int32())),
            "gene_cos": pa.array(gcos, pa.list_(pa.float32())),
            "control": pa.array([j.control for j in jobs], pa.bool_()),
        },
        schema=RESULT_SCHEMA,
    )
    for k, state in enumerate(states):
        table = table.append_column(
            pa.field(alt_column(state), pa.float32()),
            pa.array(alt[:, k], pa.float32(), from_pandas=True),
        )
    return table


def perturb_cells(
    embedder: Embedder,
    cells: Sequence[np.ndarray],
    perturbations: Sequence[Perturbation] = (),
    **kwargs: object,
) -> pa.Table:
    """Apply each perturbation (or, with ``genome_wide="delete"`` etc., each expressed gene
    singly) to each cell; one :data:`RESULT_SCHEMA` row per (cell, perturbation) that
    applied, in input order. ``fraction``: ranks moved by inhibit/activate (share of the
    cell's genes); ``goal``: (hidden,) goal-state embedding (pooled as the embedder pools);
    ``gene_shifts``: also the per-gene cosines; ``cell_ids``: IDs to carry; ``metric``:
    ``"geneformer"`` or ``"pooled"`` (see the module docstring); ``null_draws``: controls per
    (cell, listed perturbation), drawn with ``seed``; ``anchor_gene``: a token id perturbed
    with every other gene in a genome-wide screen; ``alternatives``: state -> (hidden,)
    embedding, a shift column per state; ``max_sequences``: perturbed sequences held at
    once; ``progress``: a tqdm bar. See :func:`iter_perturb_cells`."""
    tables = list(iter_perturb_cells(embedder, cells, perturbations, **kwargs))  # type: ignore[arg-type]
    if not tables:
        alternatives = kwargs.get("alternatives") or {}
        return result_schema(list(alternatives)).empty_table()  # type: ignore[arg-type]
    return pa.concat_tables(tables).replace_schema_metadata(tables[0].schema.metadata)
