"""`hpcdl prepare hdf5:FILE` for sources bigger than memory: copied block by block.

Only the labels are read whole (the stratified splits need them). The images are read once, in
blocks aligned on the source's chunks (so a source chunked along any axis is read chunk by chunk:
this is what rechunks it along N), and written once to the dataset file in its own layout. The
train split is still permuted: an external shuffle. Each source row's place in the output is
known from the splits; pass 1 appends every row, with its place, to the temporary file of its
output band (a band: as many rows as fit in a quarter of the memory this process may use);
pass 2 loads one band at a time, puts its rows in place and writes it. Disk: one temporary copy
of the images beside the output, removed at the end; memory: one band plus one source block.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpcdl import memory
from hpcdl.errors import DatasetError

SOURCE_BLOCK_BYTES = 8 << 20
# a band: a quarter of what the process may use, within these bounds
MIN_BAND_BYTES, MAX_BAND_BYTES = 8 << 20, 1 << 30


@dataclass(frozen=True)
class Placement:
    """Where the source's rows go: per output split, the source row of each output row."""

    rows: dict[str, np.ndarray]  # split -> source row numbers, in output order

    def destinations(self, n_source: int, band_rows: int) -> tuple[np.ndarray, list[tuple]]:
        """Per source row its band (-1: in no split) and place in the band; the bands as
        (split, first output row, rows)."""
        band = np.full(n_source, -1, np.int64)
        place = np.zeros(n_source, np.int64)
        bands: list[tuple[str, int, int]] = []
        for split, rows in self.rows.items():
            positions = np.arange(len(rows))
            band[rows] = len(bands) + positions // band_rows
            place[rows] = positions % band_rows
            bands += [(split, start, min(band_rows, len(rows) - start))
                      for start in range(0, len(rows), band_rows)]
        return np.stack([band, place]), bands


def source_block_rows(path: Path, key: str, x: h5py.Dataset, limit: int) -> int:
    """Rows per source block: whole chunk rows (all chunks along the other axes) of about
    SOURCE_BLOCK_BYTES; refused when one row of chunks alone exceeds `limit` bytes."""
    row_bytes = max(1, int(np.prod(x.shape[1:], dtype=np.int64)) * x.dtype.itemsize)
    chunk_rows = x.chunks[0] if x.chunks else 1
    if chunk_rows * row_bytes > limit:
        raise DatasetError(
            f"{path}: /{key} has chunk shape {x.chunks} for shape {x.shape}: the {chunk_rows} "
            f"rows its chunks span along N take {chunk_rows * row_bytes / 2**20:.3g} MiB, more "
            "than the "
            f"{limit / 2**20:.3g} MiB prepare may use here; rechunk it along N first, e.g. "
            f"h5repack -l /{key}:CHUNK={max(1, (1 << 20) // row_bytes)}x"
            + "x".join(map(str, x.shape[1:])) + f" {path} rechunked.h5")
    return chunk_rows * max(1, SOURCE_BLOCK_BYTES // (chunk_rows * row_bytes))


def band_rows(row_bytes: int, chunk_rows: int) -> int:
    """Output rows a band holds: a multiple of the output chunk, so each chunk is written once."""
    budget = memory.budget(local_ranks=1).per_rank // 4
    band_bytes = min(MAX_BAND_BYTES, max(MIN_BAND_BYTES, budget))
    return chunk_rows * max(1, band_bytes // (chunk_rows * row_bytes))


class Scatter:
    """Pass 1: source blocks -> one temporary file per output band (rows, then their places)."""

    def __init__(self, directory: Path, n_bands: int, row_shape: tuple[int, ...], dtype: Any):
        self.directory, self.row_shape, self.dtype = directory, row_shape, np.dtype(dtype)
        self.rows = [open(directory / f"{b}.rows", "wb") for b in range(n_bands)]  # noqa: SIM115
        self.places = [open(directory / f"{b}.places", "wb") for b in range(n_bands)]  # noqa: SIM115

    def add(self, x: np.ndarray, band: np.ndarray, place: np.ndarray) -> None:
        order = np.argsort(band, kind="stable")
        band, place, x = band[order], place[order], x[order]
        edges = np.flatnonzero(np.diff(band)) + 1
        for lo, hi in zip(np.r_[0, edges], np.r_[edges, len(band)], strict=True):
            if band[lo] >= 0:
                self.rows[band[lo]].write(np.ascontiguousarray(x[lo:hi], self.dtype).tobytes())
                self.places[band[lo]].write(place[lo:hi].tobytes())

    def close(self) -> None:
        for handle in (*self.rows, *self.places):
            handle.close()

    def band(self, index: int, rows: int) -> np.ndarray:
        """Pass 2: band `index` of `rows` rows, each in its place; its files then removed."""
        rows_file, places_file = (self.directory / f"{index}.{kind}" for kind in ("rows",
                                                                                   "places"))
        out = np.empty((rows, *self.row_shape), self.dtype)
        places = np.fromfile(places_file, np.int64)
        out[places] = np.fromfile(rows_file, self.dtype).reshape(len(places), *self.row_shape)
        rows_file.unlink()
        places_file.unlink()
        return out


def copy_images(source: Path, key: str, x: h5py.Dataset, placement: Placement,
                outputs: dict[str, h5py.Dataset], check: Callable[[int, np.ndarray], None],
                progress: Callable[[int], None] | None) -> None:
    """Every placed source row of `x` into its output dataset, in the placement's order."""
    first = next(iter(outputs.values()))
    row_shape, dtype = first.shape[1:], first.dtype
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
    band = band_rows(row_bytes, first.chunks[0])
    block = source_block_rows(source, key, x, band * row_bytes)
    destinations, bands = placement.destinations(len(x), band)
    with tempfile.TemporaryDirectory(prefix=".hpcdl-prepare-",
                                     dir=Path(first.file.filename).parent) as tmp:
        scatter = Scatter(Path(tmp), len(bands), row_shape, dtype)
        try:
            for start in range(0, len(x), block):
                rows = x[start:start + block]
                check(start, rows)
                rows = rows[..., None] if rows.ndim == 3 else rows
                scatter.add(rows, *destinations[:, start:start + block])
        finally:
            scatter.close()
        for index, (split, start, count) in enumerate(bands):
            outputs[split][start:start + count] = scatter.band(index, count)
            if progress:
                progress(count)
