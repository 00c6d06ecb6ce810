"""Token shards -> per-rank streamed micro-batches that depend only on (seed, step, rank).

The streaming contract: each rank reads only its own row groups, holds one window of cells
whatever the corpus size, every rank gets the same number of micro-batches, and a run that
starts at micro-batch k sees the batches an uninterrupted run sees from k on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from cellfoundry.config import DataConfig
from cellfoundry.config.train import ValidationConfig
from cellfoundry.model import IGNORE_INDEX, padding_fraction
from cellfoundry.train.data import (
    RowFilter,
    derive_seed,
    hash_fraction,
    resolve_token_dictionary,
    stable_hash,
    truncate,
)
from cellfoundry.train.stream import TRAIN, VALIDATION, BlockIndex, PretrainBatches

VOCAB = {
    "<pad>": 0,
    "<mask>": 1,
    "<cls>": 2,
    "<eos>": 3,
    **{f"ENSG{i:011d}": i for i in range(4, 60)},
}


def write_shards(
    directory: Path, n_cells: int = 240, seed: int = 0, row_group_size: int = 30
) -> list[list[int]]:
    """Two shards of V2-style cells (<cls> genes... <eos>, lengths 5..40) with cell_id and
    split columns, in row groups of ``row_group_size`` rows."""
    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(n_cells):
        genes = rng.choice(np.arange(4, 60), size=int(rng.integers(3, 39)), replace=False)
        cells.append([2, *genes.tolist(), 3])
    directory.mkdir(parents=True, exist_ok=True)
    half = n_cells // 2
    for i, part in enumerate((cells[:half], cells[half:])):
        first = i * half
        table = pa.table({
            "cell_id": [f"d{seed}:cell{first + j}" for j in range(len(part))],
            "split": ["test" if (first + j) % 7 == 0 else "train" for j in range(len(part))],
            "input_ids": pa.array(part, pa.list_(pa.int32())),
            "length": [len(c) for c in part],
        })  # fmt: skip
        pq.write_table(
            table, directory / f"part-{i:05d}-000000000000.parquet", row_group_size=row_group_size
        )
    (directory.parent / "vocabulary").mkdir(exist_ok=True)
    (directory.parent / "vocabulary" / "token_dictionary.json").write_text(json.dumps(VOCAB))
    return cells


@pytest.fixture
def shards(tmp_path: Path) -> tuple[Path, list[list[int]]]:
    cells = write_shards(tmp_path / "tokenized")
    return tmp_path / "tokenized", cells


def make_data(directory: Path, **data: Any) -> DataConfig:
    options = {"batch_size": 4, "megabatch_mult": 3, "block_rows": 30, **data}
    return DataConfig(tokenized=str(directory), **options)


def make_batches(
    directory: Path,
    rank: int = 0,
    world: int = 2,
    seed: int = 3,
    side: str = "train",
    filesystem: pafs.FileSystem | None = None,
    **data: Any,
) -> PretrainBatches:
    cfg = make_data(directory, **data)
    index = BlockIndex.build(str(directory), RowFilter.for_stream(cfg, side), cfg.block_rows)  # type: ignore[arg-type]
    return PretrainBatches(
        index, VOCAB, cfg, max_length=16, seed=seed, rank=rank, world_size=world,
        stream=TRAIN if side == "train" else VALIDATION, filesystem=filesystem,
    )  # fmt: skip


def epoch_rows(batches: PretrainBatches, epoch: int = 0) -> list[list[int]]:
    n = batches.micro_per_epoch
    return [batches.rows(epoch * n + m) for m in range(n)]


# -- the index and the filters ----------------------------------------------------------


def test_index_cuts_row_groups_into_blocks(shards: tuple[Path, list[list[int]]]) -> None:
    directory, cells = shards
    index = BlockIndex.build(str(directory), RowFilter(), block_rows=12)
    # 2 files x 4 row groups of 30 rows, each cut into 3 blocks of 10
    assert len(index) == 24 and index.total == len(cells)
    assert set(index.stop - index.start) == {10}
    assert index.first_row.tolist() == list(range(0, 240, 10))
    ids, column = index.read(5)
    assert ids.tolist() == list(range(50, 60)) and column.to_pylist() == cells[50:60]
    # the state the driver hands the workers rebuilds the same index
    again = BlockIndex.from_state(index.to_state(), RowFilter())
    assert all(np.array_equal(getattr(again, k), getattr(index, k)) for k in ("kept", "start"))


def test_exclude_leaves_out_held_out_cells(shards: tuple[Path, list[list[int]]]) -> None:
    """data.exclude: cells whose metadata names an excluded value never enter a stream."""
    directory, cells = shards
    index = BlockIndex.build(str(directory), RowFilter({"split": ["test"]}), block_rows=30)
    assert index.total == sum(1 for i in range(len(cells)) if i % 7)
    ids, column = index.read(0)
    assert ids.tolist() == [i for i in range(30) if i % 7]
    assert column.to_pylist() == [cells[i] for i in ids]
    seen = {i for r in (0, 1) for rows in epoch_rows(make_batches(directory, r, exclude={"split": ["test"]})) for i in rows}  # fmt: skip
    assert seen and all(i % 7 for i in seen)
    with pytest.raises(ValueError, match="no column 'donor'"):
        BlockIndex.build(str(directory), RowFilter({"donor": ["d1"]}), block_rows=30)


def test_missing_shards_say_what_to_run(tmp_path: Path) -> None:
    for where in (tmp_path, tmp_path / "absent"):
        with pytest.raises(ValueError, match="cellfoundry tokenize"):
            BlockIndex.build(str(where), RowFilter(), block_rows=30)


def reference_hash(text: str) -> int:
    """stable_hash of one string, one byte at a time in Python integers."""
    m = 2**64
    h = 0
    for byte in text.encode():
        h = (h * 0x100000001B3 + byte) % m
    z = h ^ ((len(text.encode()) + 1) * 0x9E3779B97F4A7C15 % m)
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % m
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB % m
    return z ^ (z >> 31)


def test_stable_hash_is_pinned_and_uniform() -> None:
    """The held-out cells must not change with the machine, process or Python version."""
    ids = pa.array(["AAACCTGAGAAACCAT-1", "", None, "pbmc3k:AAACATACAACCAC-1", "é→x"])
    got = stable_hash(ids).tolist()
    assert got == [reference_hash(s or "") for s in ids.to_pylist()]
    assert got[:4] == [11705472271443360590, 16294208416658607535, 16294208416658607535,
                       4170472560092574322]  # fmt: skip
    assert got == stable_hash(pa.chunked_array([ids[:1], ids[1:]])).tolist()
    assert stable_hash(ids[3:]).tolist() == got[3:]  # slices read their own bytes
    u = hash_fraction(pa.array([f"cell{i}" for i in range(20_000)]))
    assert u.min() >= 0.0 and u.max() < 1.0 and abs((u < 0.1).mean() - 0.1) < 0.01


def test_validation_fraction_splits_cells_by_cell_id(shards: tuple[Path, list[list[int]]]) -> None:
    directory, cells = shards
    data = make_data(directory, validation=ValidationConfig(fraction=0.2), exclude={"split": ["test"]})  # fmt: skip
    train = BlockIndex.build(str(directory), RowFilter.for_stream(data, "train"), 30)
    val = BlockIndex.build(str(directory), RowFilter.for_stream(data, "validation"), 30)
    kept = sum(1 for i in range(len(cells)) if i % 7)
    assert train.total + val.total == kept and 0.1 * kept < val.total < 0.3 * kept
    train_ids = {int(i) for b in range(len(train)) for i in train.read(b)[0]}
    val_ids = {int(i) for b in range(len(val)) for i in val.read(b)[0]}
    assert not train_ids & val_ids and len(train_ids | val_ids) == kept
    with pytest.raises(ValueError, match="no 'cell_id' column"):
        RowFilter(holdout=0.1).check(["input_ids"], "x.parquet")


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
    # tokens in a bucket: the vocabulary beside them there (tests/integration/test_object_storage.py)


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


# -- the per-rank streams ---------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_each_epoch(shards: tuple[Path, list[list[int]]], world: int) -> None:
    """Every rank runs the same number of micro-batches; no cell is used twice in an epoch."""
    directory, cells = shards
    ranks = [make_batches(directory, r, world) for r in range(world)]
    assert {b.micro_per_epoch for b in ranks} == {len(cells) // (4 * world)}
    for epoch in (0, 1):
        rows = [i for b in ranks for batch in epoch_rows(b, epoch) for i in batch]
        assert all(len(batch) == 4 for b in ranks for batch in epoch_rows(b, epoch))
        assert len(rows) == len(set(rows)) == ranks[0].micro_per_epoch * 4 * world
    assert epoch_rows(ranks[0], 0) != epoch_rows(ranks[0], 1)  # reshuffled every epoch


def test_resumed_run_sees_the_batches_of_an_uninterrupted_one(
    shards: tuple[Path, list[list[int]]],
) -> None:
    """A fresh reader that starts at micro-batch k (a resumed run) yields, from k on, the
    tensors of a reader that went through 0..k-1 first, and reads only what it needs."""
    directory, _ = shards
    n = make_batches(directory).micro_per_epoch
    start, stop = n + 7, 2 * n + 5  # mid-window of the second epoch, into the third
    for rank in (0, 1):
        straight, resumed = make_batches(directory, rank), make_batches(directory, rank)
        for micro in range(start):
            straight.batch(micro)
        for micro in range(start, stop):
            x, y = straight.batch(micro), resumed.batch(micro)
            assert all(torch.equal(x[k], y[k]) for k in x), micro
        # it read only the blocks of the windows it ran: from the one holding `start` on
        w0, size = (start - n) // 3, 4 * 3
        needed = {b for b, _, _ in resumed.segments(1, w0 * size, resumed.rows_per_epoch)}
        needed |= {b for b, _, _ in resumed.segments(2, 0, resumed.rows_per_epoch)}
        assert set(resumed.blocks_read) <= needed
        assert len(resumed.blocks_read) < len(straight.blocks_read)
    other_seed = make_batches(directory, seed=4)
    assert not torch.equal(straight.batch(0)["labels"], other_seed.batch(0)["labels"])


def test_batch_contents_and_length_grouping(shards: tuple[Path, list[list[int]]]) -> None:
    directory, cells = shards
    batches = make_batches(directory)
    for micro in range(5):
        batch = batches.batch(micro)
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert ids.shape == mask.shape == labels.shape and ids.shape[1] <= 16
        for r, i in enumerate(batches.rows(micro)):
            n = min(len(cells[i]), 16)
            assert int(mask[r].sum()) == n
            assert int(ids[r, n - 1]) == 3  # <eos> kept after truncation
            assert labels[r][labels[r] != IGNORE_INDEX].ge(4).all()  # only genes are predicted
        assert (labels != IGNORE_INDEX).any(dim=1).all()
    # within each window the longest micro-batch runs first, and grouping saves padding
    lengths = [len(c) for c in cells]
    grouped = make_batches(directory, megabatch_mult=10, block_rows=10)
    plain = make_batches(directory, megabatch_mult=10, block_rows=10, group_by_length=False)
    first = grouped.window(0, 0)
    assert max(len(first.rows[i]) for i in first.batches[0]) == max(len(r) for r in first.rows)
    assert padding_fraction(epoch_rows(grouped), lengths) < padding_fraction(
        epoch_rows(plain), lengths
    )


def test_too_little_data(shards: tuple[Path, list[list[int]]]) -> None:
    directory, _ = shards
    with pytest.raises(ValueError, match="fewer than one global batch"):
        make_batches(directory, batch_size=128)


def test_validation_batches_are_fixed(shards: tuple[Path, list[list[int]]]) -> None:
    directory, _ = shards
    held = {"validation": ValidationConfig(fraction=0.3)}
    a, b = make_batches(directory, side="validation", **held), make_batches(directory, side="validation", **held)  # fmt: skip
    train = make_batches(directory, **held)
    for micro in (2, 0, 1):
        x, y = a.batch(micro), b.batch(micro)
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not set(a.rows(0)) & {i for rows in epoch_rows(train) for i in rows}


# -- bounded memory, bounded reads ------------------------------------------------------


class RecordingFile:
    """A read-only file that logs the byte ranges read from it."""

    def __init__(self, path: str, log: list[tuple[str, int, int]]) -> None:
        self.path, self.log, self.f = path, log, open(path, "rb")  # noqa: SIM115
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        at = self.f.tell()
        data = self.f.read(n)
        self.log.append((self.path, at, len(data)))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        self.closed = True
        self.f.close()


class RecordingHandler(pafs.FileSystemHandler):
    """The local filesystem, recording every read of a file opened for random access."""

    def __init__(self) -> None:
        self.local, self.reads = pafs.LocalFileSystem(), []

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    def get_type_name(self) -> str:
        return "recording"

    def normalize_path(self, path: str) -> str:
        return path

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.local.get_file_info(selector)

    def open_input_file(self, path: str) -> pa.PythonFile:
        return pa.PythonFile(RecordingFile(path, self.reads), mode="r")

    def open_input_stream(self, path: str) -> pa.PythonFile:
        return self.open_input_file(path)

    def _read_only(self, *args: Any) -> None:
        raise OSError("read-only")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = _read_only
    delete_file = move = copy_file = open_output_stream = open_append_stream = _read_only


def token_chunks(path: str) -> list[tuple[int, int]]:
    """Byte range of the input_ids column chunk of each row group of ``path``."""
    meta = pq.ParquetFile(path).metadata
    out = []
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        col = next(rg.column(j) for j in range(rg.num_columns) if rg.column(j).path_in_schema.startswith("input_ids"))  # fmt: skip
        begin = min(o for o in (col.dictionary_page_offset, col.data_page_offset) if o)
        out.append((begin, begin + col.total_compressed_size))
    return out


def test_each_rank_reads_only_its_row_groups(tmp_path: Path) -> None:
    """Counted at the filesystem: the input_ids bytes a rank reads in an epoch all lie in
    the row groups of the blocks the plan gives it, about half of the corpus for 2 ranks."""
    directory = tmp_path / "tokenized"
    write_shards(directory, n_cells=600, row_group_size=20)
    chunks = {str(p): token_chunks(str(p)) for p in sorted(directory.glob("part-*.parquet"))}
    sizes = {path: Path(path).stat().st_size for path in chunks}
    read_groups = []
    for rank in (0, 1):
        handler = RecordingHandler()
        batches = make_batches(
            directory, rank, filesystem=pafs.PyFileSystem(handler), block_rows=20
        )
        for micro in range(batches.micro_per_epoch):
            batches.batch(micro)
        index = batches.index
        assigned = {
            (index.paths[index.file[b]], int(index.group[b]))
            for b, _, _ in batches.segments(0, 0, batches.rows_per_epoch)
        }
        touched = set()
        for path, at, n in handler.reads:
            if at + n == sizes[path]:
                continue  # the footer (pyarrow fetches the file's last 64 KiB at once)
            for g, (begin, end) in enumerate(chunks[path]):
                if at < end and at + n > begin:
                    touched.add((path, g))
        assert touched == assigned
        read_groups.append(touched)
    total = sum(len(c) for c in chunks.values())
    assert all(len(t) <= total // 2 + 1 for t in read_groups)
    assert len(read_groups[0] & read_groups[1]) <= 1  # at most the block at the boundary


def test_resident_rows_do_not_grow_with_the_corpus(tmp_path: Path) -> None:
    """Peak rows held by a rank over an epoch: one window plus two blocks, at 240 and at
    1,200 cells alike."""
    peaks = []
    for n_cells in (240, 1200):
        directory = tmp_path / f"tokenized{n_cells}"
        write_shards(directory, n_cells=n_cells)
        batches = make_batches(directory, block_rows=10)
        for micro in range(batches.micro_per_epoch):
            batches.batch(micro)
        window = 4 * 3
        assert batches.peak_rows <= window + 2 * 10, batches.peak_rows
        # each block is read once per epoch, even one that straddles two windows
        assert len(batches.blocks_read) == len(set(batches.blocks_read))
        peaks.append(batches.peak_rows)
    assert peaks[0] == peaks[1]
