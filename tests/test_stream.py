"""hpcdl/stream.py: the streamed shard holds the in-memory shard's rows, in an order that is a
pure function of (seed, rank, epoch); chunk layouts that would make streaming pathological are
refused with the file, key and chunk shape."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcdl import data, stream
from hpcdl.errors import DatasetError

ROWS = 1000
SAMPLE = (6, 5, 2)


def rows_x(first: int, count: int, dtype: str = "float32") -> np.ndarray:
    """Rows whose every value is (row number mod 251): a row names itself."""
    ids = (np.arange(first, first + count) % 251).astype(dtype)
    return np.broadcast_to(ids[:, None, None, None], (count, *SAMPLE)).copy()


def write_file(path: Path, **layout: object) -> Path:
    """train (ROWS) and val (ROWS // 10) splits; y = the row number, x names it too."""
    with h5py.File(path, "w") as handle:
        for split, n in (("train", ROWS), ("val", ROWS // 10)):
            x = rows_x(0, n, str(layout.get("dtype", "float32")))
            options = {k: v for k, v in layout.items() if k != "dtype"}
            if "chunks" in options:
                options["chunks"] = (min(n, options["chunks"][0]), *options["chunks"][1:])
            handle.create_dataset(f"{split}/x", data=x, **options)
            handle.create_dataset(f"{split}/y", data=np.arange(n, dtype=np.int64))
    return path


LAYOUTS = {
    "gzip+shuffle": {"chunks": (37, *SAMPLE), "compression": "gzip", "shuffle": True},
    "gzip uint8": {"chunks": (64, *SAMPLE), "compression": "gzip", "dtype": "uint8"},
    "lzf (through h5py)": {"chunks": (50, *SAMPLE), "compression": "lzf"},
    "no filter": {"chunks": (10, *SAMPLE)},
    "contiguous": {},
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block_bytes", [1, 3000])
def test_reader_reads_the_shards_rows(tmp_path: Path, layout: str, block_bytes: int,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_file(tmp_path / "d.h5", **LAYOUTS[layout])
    monkeypatch.setattr(stream, "BLOCK_BYTES", block_bytes)  # one chunk, or several, a block
    segments = [("train", 13, 901), ("val", 7, 77)]
    shard = stream.ShardLayout.of(path, segments)
    assert shard.rows == 888 + 70
    with h5py.File(path) as handle:
        chunk = handle["train/x"].chunks
    for block in shard.blocks:  # blocks start and end on the chunk grid, or at the shard's ends
        if chunk and block.split == "train":
            assert block.start in (13,) or block.start % chunk[0] == 0
            assert block.stop in (901,) or block.stop % chunk[0] == 0
    with stream.Reader(shard) as reader:
        x, y = reader.read(shard.blocks)
    expected = np.concatenate([np.arange(13, 901), np.arange(7, 77)])
    assert np.array_equal(y, expected)
    assert np.array_equal(x, np.concatenate([rows_x(13, 888, x.dtype), rows_x(7, 70, x.dtype)]))


def test_epoch_order_is_a_pure_function_of_seed_rank_epoch() -> None:
    blocks = stream.plan_blocks([("train", 5, 1005)], block_rows=64)
    assert [b.rows for b in blocks[:2]] == [59, 64] and blocks[1].offset == 59
    order = np.concatenate(list(stream.epoch_rows(blocks, 3, seed=1, rank=0, epoch=2)))
    assert sorted(order.tolist()) == list(range(1000))  # every row once
    again = np.concatenate(list(stream.epoch_rows(blocks, 3, seed=1, rank=0, epoch=2)))
    assert np.array_equal(order, again)
    for other in ({"seed": 2, "rank": 0, "epoch": 2}, {"seed": 1, "rank": 1, "epoch": 2},
                  {"seed": 1, "rank": 0, "epoch": 3}):
        assert not np.array_equal(order, np.concatenate(list(stream.epoch_rows(blocks, 3,
                                                                               **other))))
    # rows of a window are mixed, not read block after block
    first = next(stream.epoch_rows(blocks, 3, seed=1, rank=0, epoch=2))
    assert len({int(r) // 64 for r in first[:20]}) > 1


def epoch_batches(batches: object, epochs: int) -> list[list[np.ndarray]]:
    """Each epoch's batches (x, y) as numpy, as fit() would draw them."""
    dataset = iter(batches.epochs(0, epochs))
    return [[next(dataset) for _ in range(batches.steps)] for _ in range(epochs)]


@pytest.mark.parametrize("batch_size", [25, 32])
def test_stream_and_memory_give_the_same_rows_per_epoch(tmp_path: Path, batch_size: int,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from hpcdl import train

    monkeypatch.setattr(stream, "BLOCK_BYTES", 1)  # a block per chunk: 10 blocks a shard
    path = write_file(tmp_path / "d.h5", chunks=(37, *SAMPLE), compression="gzip", shuffle=True)
    rank, size = 1, 3
    start, stop = data.shard_bounds(ROWS, rank, size)
    x, y = data.read_shard(path, "train", rank, size)
    in_memory = train.ShardBatches(x, y, batch_size, seed=4, rank=rank)
    streamed = stream.StreamBatches(stream.ShardLayout.of(path, [("train", start, stop)]),
                                    batch_size, seed=4, rank=rank, buffer_mb=0.1)
    assert 1 < streamed.per_window < len(streamed.layout.blocks)  # several windows an epoch
    assert (streamed.n, streamed.steps) == (in_memory.n, in_memory.steps)
    orders = []
    for memory_epoch, stream_epoch in zip(epoch_batches(in_memory, 2),
                                          epoch_batches(streamed, 2), strict=True):
        for batch_x, batch_y in stream_epoch:  # x is still the row y names, normalised alike
            assert batch_x.shape == (batch_size, *SAMPLE)
            assert np.allclose(batch_x.numpy()[:, 0, 0, 0], batch_y.numpy() % 251)
        rows = [np.concatenate([b[1].numpy() for b in epoch])
                for epoch in (memory_epoch, stream_epoch)]
        used = in_memory.steps * batch_size
        assert len(rows[0]) == len(rows[1]) == used
        if used == stop - start:  # batches use every row: the very same rows
            assert Counter(rows[0].tolist()) == Counter(rows[1].tolist())
        assert len(set(rows[1].tolist())) == used and set(rows[1]) <= set(range(start, stop))
        orders.append(rows[1])
    assert not np.array_equal(orders[0], orders[1])  # reshuffled every epoch
    # a resumed run (epochs from 1 on) reads epoch 1 exactly as the uninterrupted run did
    resumed = iter(streamed.epochs(1, 2))
    again = np.concatenate([next(resumed)[1].numpy() for _ in range(streamed.steps)])
    assert np.array_equal(again, orders[1])


def test_evaluation_streams_every_row_once(tmp_path: Path) -> None:
    path = write_file(tmp_path / "d.h5", chunks=(37, *SAMPLE), compression="gzip")
    split = stream.StreamedSplit(stream.ShardLayout.of(path, [("val", 3, 100)]))
    ys = np.concatenate([y.numpy() for _, y in split.dataset(16)])
    assert split.rows == 97 and np.array_equal(ys, np.arange(3, 100))


@pytest.mark.parametrize(("chunks", "problem"), [
    ((100, 6, 1, 2), r"chunked \(100, 6, 1, 2\) for shape \(1000, 6, 5, 2\): along a non-N "
                     r"axis"),
    ((1000, 6, 5, 2), r"chunks of 1000 rows \(0\.2 MiB, chunk shape \(1000, 6, 5, 2\)\)"),
])
def test_pathological_chunk_layouts_are_refused(tmp_path: Path, chunks: tuple[int, ...],
                                                problem: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_file(tmp_path / "d.h5", chunks=chunks, compression="gzip")
    monkeypatch.setattr(stream, "MAX_CHUNK_BYTES", 100_000)  # one whole-dataset chunk is over
    with pytest.raises(DatasetError, match=rf"{path}: /train/x is {problem}|{path}: /train/x "
                                           rf"has {problem}") as error:
        stream.ShardLayout.of(path, [("train", 0, ROWS)])
    assert f"hpcdl prepare hdf5:{path}" in str(error.value)
