"""Batches of the training loop: padding to a multiple of 8, cell labels, per-token gene
labels of one side only; gene label lists map onto the vocabulary."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from cellfoundry.tune.data import IGNORE_INDEX, LabelledCells, gene_token_classes
from cellfoundry.tune.loop import TaskData, collate

TOKENS = [np.array([2, 5, 6, 3], dtype=np.int32), np.array([2, 7, 3], dtype=np.int32)]


def _data(labels: np.ndarray, gene_classes: dict | None = None) -> TaskData:
    cells = LabelledCells(
        np.array(["a", "b"]), TOKENS, labels, ["x", "y"], pl.DataFrame({"cell_id": ["a", "b"]})
    )
    rows = np.arange(2)
    return TaskData(cells, 0, ["x", "y"], rows, {"val": rows, "test": rows}, gene_classes or {})


def test_cell_batch_pads_and_masks() -> None:
    batch = collate(_data(np.array([1, 0])), np.array([0, 1]), "train")
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][1].tolist() == [2, 7, 3, 0, 0, 0, 0, 0]
    assert batch["attention_mask"].sum(1).tolist() == [4, 3]
    assert batch["labels"].tolist() == [1, 0]


def test_gene_batch_labels_only_that_sides_genes() -> None:
    data = _data(np.array([-1, -1]), {"train": {5: 1, 7: 0}, "val": {6: 0}, "test": {}})
    assert collate(data, np.array([0, 1]), "train")["labels"][:, :3].tolist() == [
        [-100, 1, -100],
        [-100, 0, -100],
    ]
    assert collate(data, np.array([0, 1]), "val")["labels"][0, :4].tolist() == [-100, -100, 0, -100]
    assert (collate(data, np.array([0, 1]), "test")["labels"] == IGNORE_INDEX).all()


def test_gene_token_classes() -> None:
    vocab = {"<pad>": 0, "G1": 4, "G2": 5, "G3": 6}
    names, ids, classes = gene_token_classes({"b": ["G2", "G9"], "a": ["G1", "G3"]}, vocab)
    assert names == ["a", "b"] and ids.tolist() == [4, 6, 5] and classes.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="both"):
        gene_token_classes({"a": ["G1"], "b": ["G1", "G2"]}, vocab)
