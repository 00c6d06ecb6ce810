"""``metric="geneformer"`` against a re-derivation of Geneformer's perturber arithmetic.

The reference below is written from Geneformer's published description, one cell and one
perturbation at a time through the full Hugging Face model: the layer is
``hidden_states[num_layers + emb_layer]``; a V2 cell shift is the cosine of the ``<cls>``
states; a V1 cell shift is the mean over the untouched genes of their per-gene cosines; an
overexpression that pushes ``n_overflow = n_genes + n_inserted - max_genes`` genes out is
compared with the original cut by ``n_overflow`` genes (run as such).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _infer_reference import MAX_POS, random_cells

from cellfoundry.config.infer import emb_layer_of, resolve_layer_convention
from cellfoundry.infer.embed import Embedder
from cellfoundry.infer.perturb import Perturbation, perturb_cells
from cellfoundry.infer.perturb_ops import overflow

ATOL = 2e-5
CLS, EOS = 2, 3


@pytest.fixture(scope="module")
def hf() -> torch.nn.Module:
    """A random 3-layer BERT initialised with std 0.2 (at BERT's 0.02 the random model's
    <cls> cosines all round to 1 in float32; here 1 - cos is ~1e-2, so they are compared)."""
    from cellfoundry.model import bert_config, build_model

    config = bert_config(
        "tiny", vocab_size=104, num_hidden_layers=3, hidden_size=32, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=MAX_POS, initializer_range=0.2,
    )  # fmt: skip
    return build_model(config, seed=0).eval()


def gf_hidden(model: torch.nn.Module, ids: list[int], emb_layer: int) -> torch.Tensor:
    """Geneformer's layer: hidden_states[num_layers + emb_layer] (0: the last layer)."""
    with torch.no_grad():
        out = model.bert(torch.as_tensor(ids)[None], output_hidden_states=True)
    return out.hidden_states[model.config.num_hidden_layers + emb_layer][0].float()


def gf_perturbed(genes: list[int], kind: str, targets: list[int], max_genes: int) -> list[int]:
    if kind == "delete":
        return [g for g in genes if g not in targets]
    if kind == "overexpress":
        return (targets + [g for g in genes if g not in targets])[:max_genes]
    (t,) = targets  # inhibit: one quartile down, list.pop + list.insert
    g, i = list(genes), genes.index(t)
    s = max(1, int(np.floor(0.25 * len(genes) + 0.5)))
    g.pop(i)
    g.insert(min(i + s, len(genes) - 1), t)
    return g


def gf_reference(
    model: torch.nn.Module, cell: np.ndarray, kind: str, targets: list[int], *, v2: bool,
    emb_layer: int,
) -> tuple[float, dict[int, float]]:  # fmt: skip
    """(cell shift as cosine, per-gene cosines of the untouched genes) as Geneformer has them."""
    genes = [int(g) for g in (cell[1:-1] if v2 else cell)]
    max_genes = MAX_POS - (2 if v2 else 0)
    new = gf_perturbed(genes, kind, targets, max_genes)
    original = genes
    if kind == "overexpress":
        n_overflow = len(genes) + len([t for t in targets if t not in genes]) - max_genes
        if n_overflow > 0:  # compare with the original cut by the genes pushed out
            original = genes[: len(genes) - n_overflow]
    wrap = (lambda g: [CLS, *g, EOS]) if v2 else (lambda g: g)
    h0 = gf_hidden(model, wrap(original), emb_layer)
    h1 = gf_hidden(model, wrap(new), emb_layer)
    off = 1 if v2 else 0
    cos = torch.nn.functional.cosine_similarity
    untouched = [g for g in new if g not in targets]
    per_gene = {
        g: float(cos(h0[original.index(g) + off], h1[new.index(g) + off], dim=0)) for g in untouched
    }
    cell_cos = float(cos(h0[0], h1[0], dim=0)) if v2 else float(np.mean(list(per_gene.values())))
    return cell_cos, per_gene


def _cases(cells: list[np.ndarray], v2: bool) -> list[tuple[int, Perturbation]]:
    """(cell, perturbation) pairs: deletions, a combination, overexpression of expressed and
    unexpressed genes in ordinary, full and just-below-full cells, an inhibition."""
    out = []
    for c, ids in enumerate(cells):
        genes = [int(g) for g in (ids[1:-1] if v2 else ids)]
        absent = [g for g in range(4, 104) if g not in genes]
        out += [
            (c, Perturbation("delete", (genes[1],))),
            (c, Perturbation("delete", (genes[0], genes[-1]))),
            (c, Perturbation("overexpress", (genes[-1],))),
            (c, Perturbation("overexpress", (absent[0],))),
            (c, Perturbation("overexpress", (absent[1], genes[2], absent[2]))),
            (c, Perturbation("inhibit", (genes[0],))),
        ]
    return out


def _cells(v2: bool) -> list[np.ndarray]:
    """Random cells, one full (at the cap), one a gene below it, one two genes below it."""
    cap = MAX_POS - 2 if v2 else MAX_POS
    cells = random_cells(4, seed=11, max_genes=40)
    rng = np.random.default_rng(12)
    for n in (cap, cap - 1, cap - 2):
        genes = rng.choice(np.arange(4, 104), size=n, replace=False)
        cells.append(np.concatenate([[CLS], genes, [EOS]]))
    return cells if v2 else [c[1:-1] for c in cells]


@pytest.mark.parametrize("v2", [True, False])
@pytest.mark.parametrize("emb_layer", [-1, 0])
def test_cell_and_gene_shifts_equal_geneformer(
    hf: torch.nn.Module, vocab: dict, v2: bool, emb_layer: int
) -> None:
    vocab = vocab if v2 else {k: v for k, v in vocab.items() if k not in ("<cls>", "<eos>")}
    layer = resolve_layer_convention(None, emb_layer)
    e = Embedder(hf, token_dictionary=vocab, layer=layer, batch_size=6)
    assert e.emb_layer == emb_layer == emb_layer_of(layer)
    cells = _cells(v2)
    for gene_shifts in (True, False):  # V1's cell shift needs the gene cosines either way
        for c, p in _cases(cells, v2):
            row = perturb_cells(e, [cells[c]], [p], gene_shifts=gene_shifts).to_pylist()[0]
            ref_cos, ref_genes = gf_reference(
                hf, cells[c], p.kind, list(p.token_ids), v2=v2, emb_layer=emb_layer
            )
            assert row["cell_cos"] == pytest.approx(ref_cos, abs=ATOL), (c, p)
            if gene_shifts:
                got = dict(zip(row["gene_token_ids"], row["gene_cos"], strict=True))
                assert got.keys() == ref_genes.keys()
                assert [got[g] for g in ref_genes] == pytest.approx(
                    list(ref_genes.values()), abs=ATOL
                )
            else:
                assert row["gene_token_ids"] == [] and row["gene_cos"] == []


def test_overflow_is_exact_at_and_below_the_cap() -> None:
    full, below = np.arange(4, 66), np.arange(4, 65)  # 62 and 61 genes, cap 62
    one, two = Perturbation("overexpress", (99,)), Perturbation("overexpress", (99, 100))
    assert overflow(full, one, 62) == 1 and overflow(below, one, 62) == 0
    assert (
        overflow(below, two, 62) == 1 and overflow(full, Perturbation("overexpress", (5,)), 62) == 0
    )
    assert overflow(full, Perturbation("delete", (5,)), 62) == 0


def test_full_original_differs_from_geneformer_at_the_cap(hf: torch.nn.Module, vocab: dict) -> None:
    """The named alternative: ``pooled`` compares an overexpression at the cap with the whole
    original; Geneformer's cut original gives other numbers for the same sequence."""
    e = Embedder(hf, token_dictionary=vocab, pooling="cls", batch_size=8)
    full = np.concatenate([[CLS], np.arange(4, 66), [EOS]])
    p = Perturbation("overexpress", (99,))
    gf = perturb_cells(e, [full], [p]).to_pylist()[0]
    whole = perturb_cells(e, [full], [p], metric="pooled").to_pylist()[0]
    assert abs(gf["cell_cos"] - whole["cell_cos"]) > 1e-4
    common = dict(zip(gf["gene_token_ids"], gf["gene_cos"], strict=True))
    other = dict(zip(whole["gene_token_ids"], whole["gene_cos"], strict=True))
    assert common.keys() == other.keys()  # the same genes, compared with another original
    assert max(abs(common[g] - other[g]) for g in common) > 1e-6


def test_genome_wide_overexpression_skips_the_top_gene(hf: torch.nn.Module, vocab: dict) -> None:
    cells = random_cells(3, seed=13, max_genes=10)
    e = Embedder(hf, token_dictionary=vocab, batch_size=16)
    screen = perturb_cells(e, cells, genome_wide="overexpress", gene_shifts=False)
    assert screen.num_rows == sum(len(c) - 3 for c in cells)
    for c, ids in enumerate(cells):
        rows = screen.filter(screen["cell_index"].to_numpy() == c)
        tops = [t[0] for t in rows["perturbed_token_ids"].to_pylist()]
        assert tops == ids[2:-1].tolist()  # every gene but the top-ranked one, in rank order
        explicit = perturb_cells(e, [ids], [Perturbation("overexpress", (int(g),)) for g in tops])
        assert np.allclose(rows["cell_cos"].to_numpy(), explicit["cell_cos"].to_numpy(), atol=ATOL)


@pytest.mark.parametrize(
    ("metric", "v2"), [("geneformer", True), ("geneformer", False), ("pooled", True)]
)
def test_results_record_metric_layer_and_pooling(
    hf: torch.nn.Module, vocab: dict, metric: str, v2: bool
) -> None:
    vocab = vocab if v2 else {k: v for k, v in vocab.items() if k not in ("<cls>", "<eos>")}
    e = Embedder(hf, token_dictionary=vocab, layer=-1)
    cell = random_cells(1, seed=14)[0]
    table = perturb_cells(e, [cell if v2 else cell[1:-1]], [Perturbation("delete", (int(cell[3]),))],
                          metric=metric)  # fmt: skip
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    assert meta["metric"] == metric and meta["layer"] == "-1" and meta["emb_layer"] == "0"
    assert meta["pooling"] == "mean"
    expected = {
        ("geneformer", True): "<cls> state",
        ("geneformer", False): "mean of per-gene cosines of the genes left in place",
        ("pooled", True): "mean pooled embedding",
    }
    assert meta["cell_embedding"] == expected[(metric, v2)]


def test_layer_conventions() -> None:
    assert resolve_layer_convention(None, None) == -2
    assert resolve_layer_convention(None, -1) == -2 and resolve_layer_convention(None, 0) == -1
    assert resolve_layer_convention(0, None) == 0  # ours: the first layer
    assert (
        emb_layer_of(-2) == -1 and emb_layer_of(0, num_layers=6) == -5 and emb_layer_of(0) is None
    )
    with pytest.raises(ValueError, match="not both"):
        resolve_layer_convention(-2, -1)
    with pytest.raises(ValueError, match="counts back from the last layer"):
        resolve_layer_convention(None, 1)
