"""Pretraining input streamed from S3 (moto's real S3 server on 127.0.0.1): the same blocks
and the same micro-batches as from local disk, and only the shards a committed manifest
lists are read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cellfoundry import artifacts, storage
from cellfoundry.config import DataConfig
from cellfoundry.train.data import RowFilter
from cellfoundry.train.stream import BlockIndex, PretrainBatches
from support.s3_server import S3Prefix

VOCAB = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, **{f"G{i}": i for i in range(4, 60)}}


def shard(first: int, n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    cells = [[2, *rng.integers(4, 60, int(rng.integers(3, 30))).tolist(), 3] for _ in range(n)]
    return pa.table({
        "cell_id": [f"c{first + i}" for i in range(n)],
        "split": ["test" if (first + i) % 5 == 0 else "train" for i in range(n)],
        "input_ids": pa.array(cells, pa.list_(pa.int32())),
    })  # fmt: skip


def test_streams_from_s3_as_from_local_disk(s3: S3Prefix, tmp_path: Path) -> None:
    tables = {f"part-{i:05d}-000000000000.parquet": shard(i * 150, 150, i) for i in range(2)}
    local = tmp_path / "tokenized"
    local.mkdir()
    uri = s3.uri("tokenized")
    with artifacts.write_artifact(uri, "tokenized", {"test": "stream"}) as w:
        for name, table in tables.items():
            pq.write_table(table, local / name, row_group_size=40)
            fs, path = storage.resolve(f"{w.uri}/{name}")
            pq.write_table(table, path, filesystem=fs, row_group_size=40)
    # a shard no manifest lists (a crashed writer's leftover) is never read
    fs, path = storage.resolve(s3.uri("tokenized", "part-99999-000000000000.parquet"))
    pq.write_table(shard(0, 500, 9), path, filesystem=fs)

    data = DataConfig(
        tokenized=uri, token_dictionary=None, batch_size=4, megabatch_mult=3, block_rows=25,
        exclude={"split": ["test"]},
    )  # fmt: skip
    row_filter = RowFilter.for_stream(data, "train")
    remote = BlockIndex.build(uri, row_filter, data.block_rows)
    on_disk = BlockIndex.build(str(local), row_filter, data.block_rows)
    assert remote.total == on_disk.total == 240
    assert np.array_equal(remote.kept, on_disk.kept)
    assert all(p.startswith(f"{s3.server.bucket}/{s3.key}/tokenized/cf-run-") for p in remote.paths)
    for rank in (0, 1):
        a, b = (
            PretrainBatches(index, VOCAB, data, max_length=16, seed=5, rank=rank, world_size=2)
            for index in (remote, on_disk)
        )
        for micro in (0, 1, 7, a.micro_per_epoch + 2):
            x, y = a.batch(micro), b.batch(micro)
            assert a.rows(micro) == b.rows(micro)
            assert all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(ValueError, match="cellfoundry tokenize"):
        BlockIndex.build(s3.uri("nothing"), row_filter, data.block_rows)
