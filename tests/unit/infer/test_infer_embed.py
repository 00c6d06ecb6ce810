"""Embedder and the batched perturbation core against a plain one-cell-at-a-time computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _infer_reference import MAX_POS, direct_cell_embedding, direct_hidden, random_cells

from cellfoundry.infer.embed import Embedder
from cellfoundry.infer.encoder import length_batches, pad_batch, resolve_layer
from cellfoundry.infer.perturb import RESULT_SCHEMA, Perturbation, perturb_cells
from cellfoundry.model import load_model

ATOL = 2e-5


@pytest.fixture(scope="module")
def hf(small_model: Path) -> torch.nn.Module:
    return load_model(small_model).eval()


def test_layers_and_batches() -> None:
    assert resolve_layer(-2, 6) == 5 and resolve_layer(-1, 6) == 6 and resolve_layer(0, 6) == 1
    with pytest.raises(ValueError, match="does not exist"):
        resolve_layer(6, 6)
    batches = length_batches([5, 50, 7, 50, 1], batch_size=2)
    assert [b.tolist() for b in batches] == [[1, 3], [2, 0], [4]]
    assert [len(b) for b in length_batches([64] * 10, batch_size=8, max_tokens=128)] == [2] * 5
    ids, mask = pad_batch([np.arange(5), np.arange(3)], pad_id=0)
    assert ids.shape == (2, 8) and mask.sum(1).tolist() == [5, 3]
    ids, mask = pad_batch([np.arange(5), np.arange(5)], pad_id=0)
    assert ids.shape == (2, 5) and bool(mask.all())  # one length: no padding, no mask needed


@pytest.mark.parametrize(("layer", "pooling"), [(-2, "mean"), (-1, "mean"), (0, "cls")])
def test_cell_embeddings_equal_direct(
    small_model: Path, hf: torch.nn.Module, layer: int, pooling: str
) -> None:
    cells = random_cells(23, seed=3)
    e = Embedder(small_model, layer=layer, pooling=pooling, batch_size=5)  # type: ignore[arg-type]
    out = e.embed_cells(cells)
    assert out.dtype == np.float32 and out.shape == (23, 32)
    for i, ids in enumerate(cells):  # input order kept although batches are length-sorted
        h = direct_hidden(hf, ids, layer)
        ref = h[0] if pooling == "cls" else direct_cell_embedding(hf, ids, layer)
        assert np.allclose(out[i], ref.numpy(), atol=ATOL)


def test_gene_embeddings_and_loaded_model(
    small_model: Path, hf: torch.nn.Module, vocab: dict
) -> None:
    cells = random_cells(6, seed=4)
    e = Embedder(hf, token_dictionary=vocab, batch_size=4)  # an already-loaded model
    for ids, (genes, emb) in zip(cells, e.embed_genes(cells), strict=True):
        assert genes.tolist() == ids[1:-1].tolist()
        assert np.allclose(emb, direct_hidden(hf, ids, -2)[1:-1].numpy(), atol=ATOL)


def test_v1_cells_and_errors(small_model: Path, hf: torch.nn.Module, vocab: dict) -> None:
    v1 = {k: v for k, v in vocab.items() if k not in ("<cls>", "<eos>")}
    with pytest.raises(ValueError, match="needs a <cls> token"):
        Embedder(hf, token_dictionary=v1, pooling="cls")
    e = Embedder(hf, token_dictionary=v1)
    cells = [c[1:-1] for c in random_cells(3, seed=5)]  # V1 layout: genes only
    out = e.embed_cells(cells)
    for i, ids in enumerate(cells):
        assert np.allclose(out[i], direct_hidden(hf, ids, -2).mean(0).numpy(), atol=ATOL)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        e.embed_cells([np.array([2, 5000, 3])])
    long = np.concatenate([[2], np.arange(4, 104), [3]])  # 102 tokens > 64 positions
    assert e.prepare(long).tolist() == long[:MAX_POS].tolist()  # V1: no <eos> to keep
    v2 = Embedder(hf, token_dictionary=vocab)
    assert v2.prepare(long).tolist() == [*long[: MAX_POS - 1].tolist(), 3]  # keeps <eos>


# ------------------------------------------------------------------ perturbation, plain reference
def plain_perturbed(genes: list[int], p: Perturbation, fraction: float) -> list[int] | None:
    g, t = list(genes), list(p.token_ids)
    if p.kind == "overexpress":
        return (t + [x for x in g if x not in t])[: MAX_POS - 2]
    if not all(x in g for x in t):
        return None
    if p.kind == "delete":
        return [x for x in g if x not in t]
    (gene,) = t  # single-gene moves: list.pop + list.insert
    n, i = len(g), g.index(gene)
    s = max(1, int(np.floor(fraction * n + 0.5)))
    g.pop(i)
    g.insert(min(i + s, n - 1) if p.kind == "inhibit" else max(i - s, 0), gene)
    return g


def plain_screen(hf, cells, perturbations, goal, fraction=0.25):  # type: ignore[no-untyped-def]
    """One cell and one perturbation at a time, full HF model, unpadded."""
    rows = []
    cos = torch.nn.functional.cosine_similarity
    for c, ids in enumerate(cells):
        genes = ids[1:-1].tolist()
        h0 = direct_hidden(hf, ids, -2)
        e0 = h0[1:-1].mean(0)
        for p in perturbations:
            new = plain_perturbed(genes, p, fraction)
            if new is None:
                continue
            seq = np.array([2, *new, 3])
            h1 = direct_hidden(hf, seq, -2)
            e1 = h1[1:-1].mean(0)
            kept = [x for x in new if x in genes and x not in p.token_ids]
            gcos = [float(cos(h0[genes.index(x) + 1], h1[new.index(x) + 1], dim=0)) for x in kept]
            shift = float(cos(e1, goal, dim=0) - cos(e0, goal, dim=0))
            rows.append((c, p.kind, float(cos(e0, e1, dim=0)), shift, kept, gcos))
    return rows


def test_batched_perturbations_equal_one_at_a_time(small_model: Path, hf: torch.nn.Module) -> None:
    cells = random_cells(9, seed=6)
    cells.append(np.concatenate([[2], np.arange(4, 66), [3]]))  # full cell: overexpress truncates
    common = [int(g) for g in cells[0][1:4]]
    absent = next(g for g in range(4, 104) if g not in cells[0])
    perts = [
        Perturbation("delete", (common[0],)),
        Perturbation("delete", (common[0], common[1])),  # combination
        Perturbation("overexpress", (common[2],)),
        Perturbation("overexpress", (absent, common[1])),  # combination, one gene not expressed
        Perturbation("inhibit", (common[1],)),
        Perturbation("activate", (common[2],)),
    ]
    goal = torch.randn(32, generator=torch.Generator().manual_seed(0))
    e = Embedder(small_model, batch_size=7)
    table = perturb_cells(e, cells, perts, goal=goal.numpy(), cell_ids=[f"c{i}" for i in range(10)],
                          max_sequences=13, metric="pooled")  # fmt: skip
    assert table.schema == RESULT_SCHEMA
    ref = plain_screen(hf, cells, perts, goal)
    assert table.num_rows == len(ref) > 10
    got = table.to_pylist()
    for row, (c, kind, cell_cos, shift, kept, gcos) in zip(got, ref, strict=True):
        assert (row["cell_index"], row["kind"], row["cell_id"]) == (c, kind, f"c{c}")
        assert row["cell_cos"] == pytest.approx(cell_cos, abs=ATOL)
        assert row["goal_shift"] == pytest.approx(shift, abs=ATOL)
        assert sorted(row["gene_token_ids"]) == sorted(kept)
        by_gene = dict(zip(row["gene_token_ids"], row["gene_cos"], strict=True))
        assert [by_gene[g] for g in kept] == pytest.approx(gcos, abs=ATOL)


def test_genome_wide_deletion_equals_explicit_list(small_model: Path) -> None:
    cells = random_cells(3, seed=7, max_genes=12)
    e = Embedder(small_model, batch_size=16)
    screen = perturb_cells(e, cells, genome_wide="delete", gene_shifts=False, max_sequences=5)
    assert screen.num_rows == sum(len(c) - 2 for c in cells)
    for c, ids in enumerate(cells):
        explicit = perturb_cells(e, [ids], [Perturbation("delete", (int(g),)) for g in ids[1:-1]])
        rows = screen.filter(screen["cell_index"].to_numpy() == c)
        assert rows["perturbation"].to_pylist() == explicit["perturbation"].to_pylist()
        assert np.allclose(rows["cell_cos"].to_numpy(), explicit["cell_cos"].to_numpy(), atol=ATOL)
    with pytest.raises(ValueError, match="nothing to do"):
        perturb_cells(e, cells)


@pytest.mark.gpu
def test_bf16_on_cuda_close_to_fp32(small_model: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cells = random_cells(16, seed=8)
    ref = Embedder(small_model, device="cpu", dtype="fp32").embed_cells(cells)
    gpu = Embedder(small_model, device="cuda", dtype="bf16").embed_cells(cells)
    cos = (ref * gpu).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(gpu, axis=1)
    assert cos.min() > 0.99


def test_packed_flex_path_equals_the_padded_path(small_model: Path, hf: torch.nn.Module) -> None:
    """The padding-free path (the GPU default): several cells per row under FlexAttention's
    document mask give the padded path's cell and gene embeddings, cell by cell."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    cells = random_cells(23, seed=5)
    padded = Embedder(small_model, batch_size=64, packed=False)
    packed = Embedder(small_model, batch_size=64, packed=True)  # one batch: one compile
    assert not padded.packed and packed.packed
    assert packed.model.config._attn_implementation == "flex_attention"
    cells_a, genes_a = padded.embed(cells, genes=True)
    cells_b, genes_b = packed.embed(cells, genes=True)
    assert np.allclose(cells_a, cells_b, atol=ATOL)
    for (ids_a, emb_a), (ids_b, emb_b) in zip(genes_a or [], genes_b or [], strict=True):
        assert np.array_equal(ids_a, ids_b) and np.allclose(emb_a, emb_b, atol=ATOL)
    for i in (0, 7):
        assert np.allclose(cells_b[i], direct_cell_embedding(hf, cells[i], -2).numpy(), atol=ATOL)
    # a model passed in is left as it is unless packing is asked for
    assert not Embedder(hf, token_dictionary=packed.token_dictionary).packed
