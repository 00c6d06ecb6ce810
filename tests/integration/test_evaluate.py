"""Evaluation on real PBMC tokens with the tiny model: masked-gene accuracy vs the rank
baseline, and batch metrics of embeddings computed here with plain torch (mean of the
second-to-last hidden layer over gene tokens). Each figure is recomputed independently."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers

from cellfoundry.cli import main
from cellfoundry.config import parse_config
from cellfoundry.config.evaluate import MaskedEvalConfig
from cellfoundry.evaluate.batch import run_batch_job
from cellfoundry.evaluate.masked import run_masked
from cellfoundry.evaluate.masking import mask_positions, special_mask

MAX_CELLS = 40
BATCHES = ("pbmc_facs", "pbmc3k", "pbmc1k_v2_raw", "pbmc1k_v3_filt")
PER_BATCH = 40


def _cells(tokenized: Path) -> pd.DataFrame:
    shards = sorted(tokenized.glob("part-*.parquet"))
    return pd.concat([pq.read_table(f).to_pandas() for f in shards], ignore_index=True)


def _vocab(tiny_model: Path) -> dict[str, int]:
    return json.loads((tiny_model / "token_dictionary.json").read_text())


def test_masked_accuracy_matches_an_independent_recount(
    pbmc_corpus: Any, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = parse_config(MaskedEvalConfig, {
        "model": str(tiny_model), "tokenized": str(pbmc_corpus.tokenized),
        "output_dir": str(tmp_path / "masked"), "batch_size": 16,
        "holdout": {"column": "split", "values": ["test"], "max_cells": MAX_CELLS},
    })  # fmt: skip
    result = run_masked(cfg)
    cells = _cells(pbmc_corpus.tokenized)
    test = cells["split"] == "test"
    m = result.metrics
    assert m["model"]["n"] == MAX_CELLS == m["baseline"]["n"] and test.sum() > MAX_CELLS
    assert m["context"]["training_cells"] == int((~test).sum())  # held-out cells never fit it
    assert set(m["by_group"]) == {"pbmc_facs"}
    per_cell = pq.read_table(tmp_path / "masked" / "per_cell.parquet").to_pandas()
    expected = np.maximum(1, np.floor(0.15 * per_cell["n_genes"] + 0.5)).astype(int)
    assert (per_cell["n_masked"] == expected).all()
    assert m["model"]["mean"] == pytest.approx(per_cell["model_accuracy"].mean())
    assert m["difference"]["mean"] == pytest.approx(m["model"]["mean"] - m["baseline"]["mean"])

    # the rank baseline by hand: most frequent gene per rank over the training cells
    vocab = _vocab(tiny_model)
    special = special_mask(vocab, len(vocab))
    by_rank: dict[int, Counter] = {}
    for ids in cells.loc[~test, "input_ids"]:
        genes = [t for t in ids if not special[t]]
        for r, t in enumerate(genes):
            by_rank.setdefault(r, Counter())[t] += 1
    mode = {r: min(c, key=lambda t: (-c[t], t)) for r, c in by_rank.items()}
    model = transformers.BertForMaskedLM.from_pretrained(tiny_model).eval()
    for row in per_cell.head(6).itertuples():
        ids = np.asarray(cells.loc[cells["cell_id"] == row.cell_id, "input_ids"].iloc[0])
        pos = mask_positions(ids, special, fraction=0.15, seed=0, cell_id=row.cell_id)
        ranks = np.cumsum(~special[ids]) - 1
        assert row.baseline_correct == sum(mode[ranks[p]] == ids[p] for p in pos)
        masked = torch.tensor(ids)[None].clone()
        masked[0, pos] = vocab["<mask>"]
        with torch.no_grad():
            logits = model(input_ids=masked).logits[0]
        logits[:, torch.from_numpy(special)] = float("-inf")
        assert row.model_correct == int((logits.argmax(-1).numpy()[pos] == ids[pos]).sum())

    assert run_masked(cfg).reused
    files = {p.name for p in (tmp_path / "masked").iterdir()}
    assert files >= {"metrics.json", "report.md", "accuracy.png", "per_cell.parquet"}
    argv = ["evaluate", "masked", "--model", str(tiny_model), "--tokens",
            str(pbmc_corpus.tokenized), "--output", str(tmp_path / "cli"),
            "--set", "holdout.mode=hash", "--set", "holdout.fraction=0.01", "--set",
            "holdout.max_cells=8"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_cells"] == 8 and 0.0 <= summary["model_accuracy_mean"] <= 1.0


def _embed(tiny_model: Path, cells: pd.DataFrame, special: np.ndarray) -> tuple:
    """Cell embeddings (mean of hidden_states[-2] over gene tokens) and per-(gene, dataset)
    sums of the genes' contextual embeddings, with plain transformers."""
    model = transformers.BertForMaskedLM.from_pretrained(tiny_model).eval()
    cell_emb, sums, counts = [], {}, Counter()
    for ids, dataset in zip(cells["input_ids"], cells["dataset_id"], strict=True):
        ids = np.asarray(ids)
        with torch.no_grad():
            out = model(input_ids=torch.tensor(ids)[None], output_hidden_states=True)
        hidden = out.hidden_states[-2][0].numpy()  # (L, H)
        genes = ~special[ids]
        cell_emb.append(hidden[genes].mean(0))
        for t, h in zip(ids[genes], hidden[genes], strict=True):
            key = (int(t), dataset)
            sums[key] = sums.get(key, 0.0) + h
            counts[key] += 1
    return np.stack(cell_emb).astype(np.float32), sums, counts


def test_batch_metrics_on_real_embeddings(
    pbmc_corpus: Any, tiny_model: Path, tmp_path: Path
) -> None:
    cells = _cells(pbmc_corpus.tokenized)
    cells = pd.concat([cells[cells["dataset_id"] == b].head(PER_BATCH) for b in BATCHES])
    vocab = _vocab(tiny_model)
    names = {i: t for t, i in vocab.items()}
    special = special_mask(vocab, len(vocab))
    emb, sums, counts = _embed(tiny_model, cells, special)
    obs = pd.DataFrame(
        {
            "dataset_id": cells["dataset_id"].values,
            "cell_type": cells["cell_type"].fillna("").values,
        },
        index=cells["cell_id"].values,
    )
    anndata.AnnData(obs=obs, obsm={"X_cellfoundry": emb}).write_h5ad(tmp_path / "pbmc.h5ad")
    keys = sorted(sums)
    (tmp_path / "pbmc.embeddings").mkdir()
    pq.write_table(pa.table({
        "ensembl_id": [names[t] for t, _ in keys], "token_id": pa.array([t for t, _ in keys], pa.int32()),
        "group": [g for _, g in keys], "n_cells": pa.array([counts[k] for k in keys], pa.int64()),
        "embedding": pa.array([(sums[k] / counts[k]).tolist() for k in keys], pa.list_(pa.float32())),
    }), tmp_path / "pbmc.embeddings" / "genes.parquet")  # fmt: skip

    label_map = {"CD19+ B": "B", "CD56+ NK": "NK", "CD14+ Monocyte": "Mono", "CD14+ Mono": "Mono"}
    sets = [f"embeddings={tmp_path / 'pbmc.h5ad'}", "max_pairs=100000", "max_nn=100000",
            *[f"label_map.{k}={v}" for k, v in label_map.items()]]  # fmt: skip
    summary = run_batch_job(None, sets)
    out = Path(summary["output_dir"])
    m = json.loads((out / "metrics.json").read_text())
    assert {p.name for p in out.iterdir()} >= {
        "report.md",
        "cell_similarity.png",
        "gene_similarity.png",
    }

    # cells, every pair enumerated: recompute each category from the full cosine matrix
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = unit @ unit.T
    batch = obs["dataset_id"].to_numpy()
    label = np.array([label_map.get(x, x) for x in obs["cell_type"]], dtype=object)
    has = label != ""
    upper = np.triu(np.ones_like(cos, dtype=bool), k=1)
    same_b, same_l = batch[:, None] == batch[None, :], label[:, None] == label[None, :]
    both = has[:, None] & has[None, :]
    expect = {
        "different_type": upper & both & ~same_l,
        "same_type_same_batch": upper & both & same_l & same_b,
        "same_type_other_batch": upper & both & same_l & ~same_b,
        "same_batch": upper & same_b,
        "other_batch": upper & ~same_b,
    }
    for name, sel in expect.items():
        got = m["cells"]["categories"][name]
        assert got["n_pairs"] == got["n_possible"] == int(sel.sum()) > 0, name
        assert got["mean"] == pytest.approx(float(cos[sel].mean()), abs=1e-5), name
    assert m["cells"]["batches"] == dict.fromkeys(sorted(BATCHES), PER_BATCH)
    # nearest cell of the same batch, by brute force
    np.fill_diagonal(cos, -np.inf)
    assert m["cells"]["batch_neighbours"]["share"] == pytest.approx(
        float((batch[cos.argmax(1)] == batch).mean())
    )

    # genes: separability index by brute force over all (gene, dataset) rows
    g_emb = np.stack([sums[k] / counts[k] for k in keys]).astype(np.float32)
    g_unit = g_emb / np.linalg.norm(g_emb, axis=1, keepdims=True)
    nearest = []
    for s in range(0, len(keys), 1000):  # (1000, n_rows) at a time
        block = g_unit[s : s + 1000] @ g_unit.T
        block[np.arange(len(block)), s + np.arange(len(block))] = -np.inf
        nearest.append(block.argmax(1))
    gene = np.array([t for t, _ in keys])
    per_gene = Counter(gene.tolist())
    eligible = np.array([per_gene[t] for t in gene]) >= 2
    index = float((gene[np.concatenate(nearest)] == gene)[eligible].mean())
    sep = m["genes"]["separability"]
    assert sep["n_eligible"] == int(eligible.sum()) and sep["index"] == pytest.approx(index)
    assert m["genes"]["groups"] == sorted(BATCHES)
    assert summary["separability_index"] == sep["index"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_masked_on_gpu_agrees_with_cpu(pbmc_corpus: Any, tiny_model: Path, tmp_path: Path) -> None:
    """fp32 on the GPU gives the CPU's predictions (up to argmax ties); bf16 autocast stays close."""
    runs = {}
    for name, device, dtype in (
        ("cpu", "cpu", "fp32"),
        ("gpu", "cuda", "fp32"),
        ("bf16", "cuda", "bf16"),
    ):
        cfg = parse_config(MaskedEvalConfig, {
            "model": str(tiny_model), "tokenized": str(pbmc_corpus.tokenized),
            "output_dir": str(tmp_path / name), "device": device, "dtype": dtype,
            "holdout": {"mode": "hash", "fraction": 0.05, "max_cells": 200},
        })  # fmt: skip
        run_masked(cfg)
        runs[name] = pq.read_table(tmp_path / name / "per_cell.parquet").to_pandas()
    cpu, gpu, bf16 = runs["cpu"], runs["gpu"], runs["bf16"]
    assert (cpu["cell_id"] == gpu["cell_id"]).all() and (cpu["n_masked"] == gpu["n_masked"]).all()
    assert (cpu["baseline_correct"] == bf16["baseline_correct"]).all()
    assert (cpu["model_correct"] == gpu["model_correct"]).mean() >= 0.98
    assert abs(cpu["model_accuracy"].mean() - bf16["model_accuracy"].mean()) < 0.02
