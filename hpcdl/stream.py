"""A rank's shard streamed from the dataset file: chunk-aligned blocks, a bounded buffer, a
background reader that stays ahead of the model.

The rank's rows are the in-memory path's (data.shard_bounds), cut into blocks on the file's chunk
grid, so a block decompresses only its own chunks. An epoch visits the blocks in a seeded
permutation and shuffles rows within windows of several consecutive blocks of that order: a row
can land anywhere in the epoch's order of windows, and next to any row of its window. Window
order and row order are pure functions of (seed, rank, epoch, window), so a resumed run reads
exactly the batches an uninterrupted one would. Not a full shuffle: two rows of one block always
fall in one window, so a batch mixes rows of a window's few blocks, not of the whole shard. The
train split is permuted when written, so each block is already a random sample of the data:
what is lost is only that fixed neighbourhood across epochs (benchmark 8 compares the val
accuracy of both modes). It costs one copy of each window and no extra read.

Reading: gzip (with or without the byte shuffle filter) and uncompressed chunks are read raw
(`read_direct_chunk`, a short call under h5py's global lock) and decoded in a thread pool:
zlib and numpy release the GIL, so decoding runs beside training. Other filters (lzf) go
through h5py, serialised by its lock. Threads, not processes: benchmark 8 in RESULTS.md.
"""

from __future__ import annotations

import queue
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpcdl.errors import DatasetError

# Blocks are whole chunks adding up to about this many bytes: big enough that the per-block
# Python overhead is nothing, small enough that a window holds several of them.
BLOCK_BYTES = 4 << 20
# A chunk bigger than this makes a rank decompress (and hold) too much to read a few rows.
MAX_CHUNK_BYTES = 64 << 20
DECODE_THREADS = 2


@dataclass(frozen=True)
class Block:
    """Rows [start, stop) of one split; `offset` is the first one's place in the shard."""

    split: str
    start: int
    stop: int
    offset: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def check_layout(path: str | Path, key: str, dset: h5py.Dataset) -> int:
    """Rows per chunk of `dset`, refusing layouts that make streaming pathological."""
    row_bytes = int(np.prod(dset.shape[1:], dtype=np.int64)) * dset.dtype.itemsize
    if dset.chunks is None:
        return max(1, BLOCK_BYTES // max(1, row_bytes))  # contiguous: any hyperslab is direct
    fix = f"rewrite it with `hpcdl prepare hdf5:{path}` (which rechunks along N)"
    if tuple(dset.chunks[1:]) != tuple(dset.shape[1:]):
        raise DatasetError(f"{path}: /{key} is chunked {dset.chunks} for shape {dset.shape}: "
                           f"along a non-N axis, every row spans several chunks; {fix}")
    chunk_bytes = dset.chunks[0] * row_bytes
    if chunk_bytes > MAX_CHUNK_BYTES:
        raise DatasetError(f"{path}: /{key} has chunks of {dset.chunks[0]} rows "
                           f"({chunk_bytes / 2**20:.1f} MiB, chunk shape {dset.chunks}): reading "
                           "a few rows decompresses all of them (streaming needs chunks of at "
                           f"most {MAX_CHUNK_BYTES / 2**20:g} MiB); {fix}")
    return int(dset.chunks[0])


def plan_blocks(segments: Sequence[tuple[str, int, int]], block_rows: int) -> list[Block]:
    """The shard (segments of splits, in order) cut at multiples of `block_rows` of each split."""
    blocks, offset = [], 0
    for split, start, stop in segments:
        edge = start
        while edge < stop:
            end = min(stop, (edge // block_rows + 1) * block_rows)
            blocks.append(Block(split, edge, end, offset))
            offset += end - edge
            edge = end
    return blocks


def window_blocks(n_blocks: int, per_window: int, seed: int, rank: int,
                  epoch: int) -> list[np.ndarray]:
    """The epoch's blocks in a seeded order, grouped into windows of `per_window`."""
    order = np.random.default_rng([seed, rank, epoch]).permutation(n_blocks)
    return [order[i:i + per_window] for i in range(0, n_blocks, per_window)]


def window_permutation(rows: int, seed: int, rank: int, epoch: int, window: int) -> np.ndarray:
    """The order of a window's rows (as its blocks were read, in window order)."""
    return np.random.default_rng([seed, rank, epoch, window, 1]).permutation(rows)


def epoch_rows(blocks: Sequence[Block], per_window: int, seed: int, rank: int,
               epoch: int) -> Iterator[np.ndarray]:
    """Shard row numbers in the order the epoch reads them, window by window."""
    for i, members in enumerate(window_blocks(len(blocks), per_window, seed, rank, epoch)):
        rows = np.concatenate([np.arange(blocks[b].offset, blocks[b].offset + blocks[b].rows)
                               for b in members])
        yield rows[window_permutation(len(rows), seed, rank, epoch, i)]


def _chunk_decoder(dset: h5py.Dataset) -> Callable[[bytes], np.ndarray] | None:
    """Raw chunk bytes -> array of the chunk's shape, for the filters decoded here."""
    if dset.chunks is None or dset.scaleoffset or dset.fletcher32 \
            or dset.compression not in (None, "gzip"):
        return None
    gzip, shuffle = dset.compression == "gzip", dset.shuffle and dset.dtype.itemsize > 1
    dtype, shape, itemsize = dset.dtype, dset.chunks, dset.dtype.itemsize

    def decode(raw: bytes) -> np.ndarray:
        data = zlib.decompress(raw) if gzip else raw
        flat = np.frombuffer(data, np.uint8)
        if shuffle:  # HDF5's shuffle filter: all first bytes, then all second bytes...
            flat = np.ascontiguousarray(flat.reshape(itemsize, -1).T)
        return flat.view(dtype).reshape(shape)

    return decode


class SplitReader:
    """Reads blocks of rows of one split's x and y; chunks decoded in a thread pool."""

    def __init__(self, handle: h5py.File, path: str, split: str, pool: ThreadPoolExecutor):
        self.x, self.y = handle[f"{split}/x"], handle[f"{split}/y"]
        self.chunk_rows = check_layout(path, f"{split}/x", self.x)
        self.decode: Callable[[bytes], np.ndarray] | None = _chunk_decoder(self.x)
        self.pool = pool

    def _chunk(self, first: int) -> np.ndarray:
        """The chunk starting at row `first`, decoded here; h5py's calls are short, each
        under its own global lock, the inflating runs in parallel."""
        mask, raw = self.x.id.read_direct_chunk((first,) + (0,) * (self.x.ndim - 1))
        if mask:  # a filter was skipped for this chunk: let HDF5 decode it
            return self.x[first:first + self.chunk_rows]
        return self.decode(raw)

    def read(self, start: int, stop: int, x_out: np.ndarray, y_out: np.ndarray) -> None:
        """Rows [start, stop) into x_out and y_out (of that many rows)."""
        y_out[:] = self.y[start:stop]
        if self.decode is None:  # contiguous, or a filter decoded only by HDF5 (lzf)
            self.x.read_direct(x_out, np.s_[start:stop])
            return
        firsts = range(start // self.chunk_rows * self.chunk_rows, stop, self.chunk_rows)
        for first, chunk in zip(firsts, self.pool.map(self._chunk, firsts), strict=True):
            lo, hi = max(first, start), min(first + self.chunk_rows, stop)
            x_out[lo - start:hi - start] = chunk[lo - first:hi - first]


def _read_ahead(produce: Callable[[Callable[[Any], bool]], None], depth: int) -> Iterator[Any]:
    """Run `produce(put)` in a background thread; yield what it puts, `depth` items ahead at
    most. Closing the iterator (fit() dropping it) stops the thread at its next put."""
    items: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop, done = threading.Event(), object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            produce(put)
            put(done)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)

    thread = threading.Thread(target=run, name="hpcdl-stream", daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


@dataclass(frozen=True)
class ShardLayout:
    """What the reader needs to know of a shard: its blocks and the shape of one row."""

    path: str
    blocks: list[Block]
    sample_shape: tuple[int, ...]
    dtype: np.dtype
    block_bytes: int

    @classmethod
    def of(cls, path: str | Path, segments: Sequence[tuple[str, int, int]]) -> ShardLayout:
        """Blocks of whole chunks (about BLOCK_BYTES) over `segments`, layouts checked."""
        blocks: list[Block] = []
        with h5py.File(path, "r") as handle:
            x = handle[f"{segments[0][0]}/x"]
            row_bytes = int(np.prod(x.shape[1:], dtype=np.int64)) * x.dtype.itemsize
            most = 1
            for split, start, stop in segments:
                if not 0 <= start <= stop <= len(handle[f"{split}/y"]):
                    raise ValueError(f"{path}: rows {start}..{stop} are not all in /{split}")
                chunk_rows = check_layout(path, f"{split}/x", handle[f"{split}/x"])
                block_rows = chunk_rows * max(1, BLOCK_BYTES // (chunk_rows * row_bytes))
                most = max(most, block_rows)
                offset = blocks[-1].offset + blocks[-1].rows if blocks else 0
                blocks += [Block(b.split, b.start, b.stop, b.offset + offset)
                           for b in plan_blocks([(split, start, stop)], block_rows)]
            return cls(str(path), blocks, tuple(x.shape[1:]), x.dtype, most * row_bytes)

    @property
    def rows(self) -> int:
        return sum(b.rows for b in self.blocks)

    def empty(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        return np.empty((rows, *self.sample_shape), self.dtype), np.empty(rows, np.int64)


class Reader:
    """An open dataset file and its decoding threads, for one producer thread."""

    def __init__(self, layout: ShardLayout):
        self.layout = layout
        self.handle = h5py.File(layout.path, "r")
        self.pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="hpcdl-decode")
        self.splits: dict[str, SplitReader] = {}

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown()
        self.handle.close()

    def read(self, blocks: Sequence[Block]) -> tuple[np.ndarray, np.ndarray]:
        """The rows of `blocks`, one after the other."""
        x, y = self.layout.empty(sum(b.rows for b in blocks))
        at = 0
        for block in blocks:
            if block.split not in self.splits:
                self.splits[block.split] = SplitReader(self.handle, self.layout.path,
                                                       block.split, self.pool)
            self.splits[block.split].read(block.start, block.stop, x[at:at + block.rows],
                                          y[at:at + block.rows])
            at += block.rows
        return x, y


def normalise(x: Any) -> Any:
    """uint8 images to float32 in [0, 1], on the fly (float data passes as it is)."""
    import tensorflow as tf

    return tf.cast(x, tf.float32) / 255.0 if x.dtype == tf.uint8 else x


def no_autotune() -> Any:
    """tf.data options without the autotuner thread (train.ShardBatches says why)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return options


class StreamBatches:
    """This rank's training rows streamed from the file: the rows, batch size and steps per
    epoch of train.ShardBatches (ranks stay in lockstep whichever mode each one reads in)."""

    def __init__(self, layout: ShardLayout, batch_size: int, seed: int, rank: int,
                 buffer_mb: float):
        self.layout, self.batch_size, self.seed, self.rank = layout, batch_size, seed, rank
        self.n = layout.rows
        self.steps = self.n // batch_size
        window_bytes = int(buffer_mb * (1 << 20)) // 4
        self.per_window = max(1, window_bytes // layout.block_bytes)

    def _produce(self, start: int, end: int, put: Callable[[Any], bool]) -> None:
        """Per epoch, window by window: whole batches (k, batch, ...) in the epoch's order."""
        blocks, batch = self.layout.blocks, self.batch_size
        with Reader(self.layout) as reader:
            for epoch in range(start, end):
                left = self.steps
                carry_x, carry_y = self.layout.empty(0)
                windows = window_blocks(len(blocks), self.per_window, self.seed, self.rank, epoch)
                for i, members in enumerate(windows):
                    read_x, read_y = reader.read([blocks[b] for b in members])
                    order = window_permutation(len(read_y), self.seed, self.rank, epoch, i)
                    # one copy: the rows left from the last window, then this one's, shuffled
                    x, y = self.layout.empty(len(carry_y) + len(read_y))
                    x[:len(carry_y)], y[:len(carry_y)] = carry_x, carry_y
                    np.take(read_x, order, axis=0, out=x[len(carry_y):])
                    np.take(read_y, order, out=y[len(carry_y):])
                    del read_x, read_y
                    k = min(left, len(y) // batch)
                    used = k * batch
                    if k and not put((x[:used].reshape(k, batch, *x.shape[1:]),
                                      y[:used].reshape(k, batch))):
                        return
                    left -= k
                    carry_x, carry_y = x[used:].copy(), y[used:].copy()  # x itself is handed on
                    if not left:
                        break

    def epochs(self, start: int, end: int) -> Any:
        """Batches of epochs start..end-1 in one dataset, like train.ShardBatches.epochs."""
        import tensorflow as tf

        shape = (None, self.batch_size, *self.layout.sample_shape)
        signature = (tf.TensorSpec(shape, tf.as_dtype(self.layout.dtype)),
                     tf.TensorSpec((None, self.batch_size), tf.int64))
        return (
            tf.data.Dataset.from_generator(
                lambda: _read_ahead(lambda put: self._produce(start, end, put), 1),
                output_signature=signature)
            .flat_map(lambda x, y: tf.data.Dataset.from_tensor_slices((x, y)))
            .map(lambda x, y: (normalise(x), y))
            .prefetch(2)
            .with_options(no_autotune())
        )


class StreamedSplit:
    """Rows of a split for evaluation, streamed block by block in file order."""

    def __init__(self, layout: ShardLayout):
        self.layout = layout
        self.rows = layout.rows

    def _produce(self, put: Callable[[Any], bool]) -> None:
        with Reader(self.layout) as reader:
            for block in self.layout.blocks:
                if not put(reader.read([block])):
                    return

    def dataset(self, batch_size: int) -> Any:
        import tensorflow as tf

        signature = (tf.TensorSpec((None, *self.layout.sample_shape),
                                   tf.as_dtype(self.layout.dtype)),
                     tf.TensorSpec((None,), tf.int64))
        return (
            tf.data.Dataset.from_generator(lambda: _read_ahead(self._produce, 1),
                                           output_signature=signature)
            .flat_map(lambda x, y: tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size))
            .map(lambda x, y: (normalise(x), y))
            .prefetch(2)
            .with_options(no_autotune())
        )
