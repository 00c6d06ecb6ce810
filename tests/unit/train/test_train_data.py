"""Token shards -> per-rank masked micro-batches that depend only on (seed, epoch, step, rank)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cellfoundry.config import DataConfig
from cellfoundry.model import IGNORE_INDEX
from cellfoundry.train.data import (
    PretrainBatches,
    count_cells,
    derive_seed,
    load_token_corpus,
    resolve_token_dictionary,
    truncate,
)

VOCAB = {
    "<pad>": 0,
    "<mask>": 1,
    "<cls>": 2,
    "<eos>": 3,
    **{f"ENSG{i:011d}": i for i in range(4, 60)},
}


def write_shards(directory: Path, n_cells: int = 90, seed: int = 0) -> list[list[int]]:
    """Two shards of V2-style cells: <cls> genes... <eos>, lengths 5..40."""
    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(n_cells):
        genes = rng.choice(np.arange(4, 60), size=int(rng.integers(3, 39)), replace=False)
        cells.append([2, *genes.tolist(), 3])
    directory.mkdir(parents=True, exist_ok=True)
    half = n_cells // 2
    for i, part in enumerate((cells[:half], cells[half:])):
        table = pa.table(
            {"input_ids": pa.array(part, pa.list_(pa.int32())), "length": [len(c) for c in part]}
        )
        pq.write_table(table, directory / f"part-{i:05d}-000000000000.parquet")
    (directory.parent / "vocabulary").mkdir(exist_ok=True)
    (directory.parent / "vocabulary" / "token_dictionary.json").write_text(json.dumps(VOCAB))
    return cells


@pytest.fixture
def shards(tmp_path: Path) -> tuple[Path, list[list[int]]]:
    cells = write_shards(tmp_path / "tokenized")
    return tmp_path / "tokenized", cells


def test_corpus_reads_every_shard_in_order(shards: tuple[Path, list[list[int]]]) -> None:
    directory, cells = shards
    corpus = load_token_corpus(directory)
    assert len(corpus) == len(cells)
    assert corpus.tokens.dtype == np.int32
    assert [corpus.row(i).tolist() for i in range(len(cells))] == cells
    assert corpus.lengths.tolist() == [len(c) for c in cells]


def test_exclude_leaves_out_held_out_cells(tmp_path: Path) -> None:
    """data.exclude: cells whose metadata names an excluded value never enter pretraining."""
    directory = tmp_path / "tokenized"
    directory.mkdir()
    cells = [[2, 10 + i, 3] for i in range(6)]
    split = ["train", "test", None, "train", "test", "train"]
    pq.write_table(
        pa.table({"input_ids": pa.array(cells, pa.list_(pa.int32())), "split": split}),
        directory / "part-00000-000000000000.parquet",
    )
    corpus = load_token_corpus(directory, {"split": ["test"]})
    assert [corpus.row(i).tolist() for i in range(len(corpus))] == [cells[i] for i in (0, 2, 3, 5)]
    assert count_cells(directory, {"split": ["test"]}) == 4 == len(corpus)
    assert count_cells(directory) == 6
    with pytest.raises(ValueError, match="no column 'donor'"):
        load_token_corpus(directory, {"donor": ["d1"]})


def test_missing_shards_say_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cellfoundry tokenize"):
        load_token_corpus(tmp_path)


def test_token_dictionary_resolution(shards: tuple[Path, list[list[int]]], tmp_path: Path) -> None:
    directory, _ = shards
    path, td = resolve_token_dictionary(DataConfig(tokenized=str(directory)))  # sibling vocabulary/
    assert path.name == "token_dictionary.json" and td == VOCAB
    path, _ = resolve_token_dictionary(
        DataConfig(tokenized=str(directory), token_dictionary=str(path.parent))
    )
    assert path.parent.name == "vocabulary"
    with pytest.raises(ValueError, match="token_dictionary"):
        resolve_token_dictionary(DataConfig(tokenized=str(tmp_path / "x" / "tokenized")))
    with pytest.raises(ValueError, match="holds no token_dictionary"):
        resolve_token_dictionary(
            DataConfig(tokenized=str(directory), token_dictionary=str(directory))
        )


def test_geneformer_dictionary_folder(geneformer_dir: Path, tmp_path: Path) -> None:
    path, td = resolve_token_dictionary(
        DataConfig(tokenized=str(tmp_path), token_dictionary=str(geneformer_dir / "v2"))
    )
    assert path.name.startswith("token_dictionary") and td["<eos>"] == 3 and len(td) > 20_000


def test_truncate_keeps_eos() -> None:
    row = np.array([2, 10, 11, 12, 13, 3])
    assert truncate(row, 4, 3).tolist() == [2, 10, 11, 3]
    assert truncate(row, 4, None).tolist() == [2, 10, 11, 12]
    assert truncate(row, 10, 3) is row
    assert truncate(np.array([5, 6, 7, 8]), 2, 3).tolist() == [5, 6]


def test_derive_seed() -> None:
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    assert len({derive_seed(0, 1, r, m) for r in range(3) for m in range(50)}) == 150
    assert 0 <= derive_seed(7, 1) < 2**63


def make_batches(
    directory: Path, rank: int, world: int = 2, seed: int = 3, **data: object
) -> PretrainBatches:
    cfg = DataConfig(tokenized=str(directory), batch_size=4, megabatch_mult=2, **data)  # type: ignore[arg-type]
    return PretrainBatches(
        load_token_corpus(directory),
        VOCAB,
        cfg,
        max_length=16,
        seed=seed,
        rank=rank,
        world_size=world,
    )


def test_batches_are_a_pure_function_of_seed_step_rank(
    shards: tuple[Path, list[list[int]]],
) -> None:
    directory, _ = shards
    a, b = make_batches(directory, 0), make_batches(directory, 0)
    # b jumps straight to micro-batch 30 (epoch 2), as a resumed run does
    for micro in (30, 0, 1, 11, 12):
        x, y = a.batch(micro), b.batch(micro)
        assert all(torch.equal(x[k], y[k]) for k in x)
    other_seed = make_batches(directory, 0, seed=4)
    assert not torch.equal(a.batch(0)["labels"], other_seed.batch(0)["labels"])


def test_ranks_split_each_step(shards: tuple[Path, list[list[int]]]) -> None:
    directory, cells = shards
    r0, r1 = make_batches(directory, 0), make_batches(directory, 1)
    assert r0.micro_per_epoch == r1.micro_per_epoch == len(cells) // 8
    for micro in range(r0.micro_per_epoch):
        rows0, rows1 = r0.rows(micro), r1.rows(micro)
        assert len(rows0) == len(rows1) == 4 and not set(rows0) & set(rows1)
    epoch0 = [r0.rows(m) for m in range(r0.micro_per_epoch)]
    epoch1 = [r0.rows(m + r0.micro_per_epoch) for m in range(r0.micro_per_epoch)]
    assert epoch0 != epoch1  # reshuffled every epoch


def test_batch_contents(shards: tuple[Path, list[list[int]]]) -> None:
    directory, cells = shards
    batches = make_batches(directory, 0)
    for micro in range(5):
        batch = batches.batch(micro)
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert ids.shape == mask.shape == labels.shape and ids.shape[1] <= 16
        rows = batches.rows(micro)
        for r, i in enumerate(rows):
            n = min(len(cells[i]), 16)
            assert int(mask[r].sum()) == n
            assert int(ids[r, n - 1]) == 3  # <eos> kept after truncation
            assert labels[r][labels[r] != IGNORE_INDEX].ge(4).all()  # only genes are predicted
        assert (labels != IGNORE_INDEX).any(dim=1).all()


def test_too_little_data(shards: tuple[Path, list[list[int]]]) -> None:
    directory, _ = shards
    cfg = DataConfig(tokenized=str(directory), batch_size=64)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PretrainBatches(
            load_token_corpus(directory), VOCAB, cfg, max_length=16, seed=0, rank=0, world_size=2
        )
