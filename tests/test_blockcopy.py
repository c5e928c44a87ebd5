"""`hpcdl prepare hdf5:` block by block (hpcdl/blockcopy.py): the file it writes is the one the
in-memory path writes from the same arrays, whatever the source's chunks; a source chunk too big
for memory is refused naming the file, key and chunk shape; the output's filter and chunk size
are options. Under a real cgroup memory cap, a source larger than the cap is prepared."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import hpcdl_env
from hpcdl import blockcopy, cli, data

SHAPE = (12, 10)


def prepare(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(["prepare", *args])
    return code, capsys.readouterr().err


def source_arrays(n: int = 2000, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    return rng.integers(0, 256, (n, *SHAPE)).astype(dtype), rng.integers(0, 4, n)


def write_source(path: Path, chunks: tuple[int, ...] | None, dtype: str = "float32") -> Path:
    x, y = source_arrays(dtype=dtype)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("x", data=x, chunks=chunks, compression="gzip" if chunks else None)
        handle["y"] = y
    return path


@pytest.mark.parametrize("chunks", [(1, 12, 10), (50, 1, 5), None],
                         ids=["a chunk a row", "chunked along H and W", "contiguous"])
def test_block_copy_writes_what_the_in_memory_path_writes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        chunks: tuple[int, ...] | None) -> None:
    source = write_source(tmp_path / "source.h5", chunks)
    npz = tmp_path / "source.npz"
    np.savez(npz, **dict(zip("xy", source_arrays(), strict=True)))
    reference = tmp_path / "reference.h5"
    assert prepare(capsys, f"npz:{npz}", "--out", str(reference))[0] == 0
    # small source blocks and bands: many of each, so rows cross bands in both passes
    monkeypatch.setattr(blockcopy, "SOURCE_BLOCK_BYTES", 10_000)
    monkeypatch.setattr(blockcopy, "MIN_BAND_BYTES", 60_000)
    monkeypatch.setattr(blockcopy, "MAX_BAND_BYTES", 60_000)
    out = tmp_path / "out.h5"
    code, err = prepare(capsys, f"hdf5:{source}", "--out", str(out), "--chunk-mb", "0.01")
    assert code == 0, err
    with h5py.File(reference) as expected, h5py.File(out) as written:
        for split in data.SPLITS:
            assert np.array_equal(written[f"{split}/x"][()], expected[f"{split}/x"][()]), split
            assert np.array_equal(written[f"{split}/y"][()], expected[f"{split}/y"][()]), split
            x = written[f"{split}/x"]
            assert x.chunks == (min(len(x), 10485 // (4 * 120)), 12, 10, 1)  # rechunked along N
        assert written.attrs["n_classes"] == expected.attrs["n_classes"] == 4
        assert written.attrs["shapes"] == expected.attrs["shapes"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


@pytest.mark.parametrize(("option", "filters"), [
    (["--compression", "lzf"], ("lzf", None, True)),
    (["--compression", "none"], (None, None, False)),
    (["--compression", "gzip", "--compression-level", "1"], ("gzip", 1, True)),
    ([], (None, None, False))])
def test_output_filter_is_an_option(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    option: list[str], filters: tuple) -> None:
    source = write_source(tmp_path / "source.h5", (100, 12, 10), dtype="uint8")
    out = tmp_path / "out.h5"
    code, err = prepare(capsys, f"hdf5:{source}", "--out", str(out), *option)
    assert code == 0, err
    with h5py.File(out) as handle:
        for split in data.SPLITS:
            x = handle[f"{split}/x"]
            assert (x.compression, x.compression_opts, x.shuffle) == filters
            assert x.dtype == np.uint8


def test_a_source_chunk_bigger_than_memory_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_source(tmp_path / "source.h5", (2000, 12, 10))  # one chunk: 960 kB
    monkeypatch.setattr(blockcopy, "MIN_BAND_BYTES", 100_000)
    monkeypatch.setattr(blockcopy, "MAX_BAND_BYTES", 100_000)
    code, err = prepare(capsys, f"hdf5:{source}", "--out", str(tmp_path / "out.h5"))
    assert code == 2, err
    assert (f"{source}: /x has chunk shape (2000, 12, 10) for shape (2000, 12, 10): the 2000 "
            "rows its chunks span along N take 0.916 MiB, more than the ") in err
    assert (f"MiB prepare may use here; rechunk it along N first, e.g. h5repack -l "
            f"/x:CHUNK=2184x12x10 {source} rechunked.h5") in err
    assert not (tmp_path / "out.h5").exists()


CAP_MB = 256
PREPARE = """
import sys
from hpcdl import cli
sys.exit(cli.main(["prepare", "hdf5:" + sys.argv[1], "--out", sys.argv[2]]))
"""


@pytest.mark.slow
def test_a_source_bigger_than_the_memory_cap_is_prepared_under_it(tmp_path: Path) -> None:
    source, rows = tmp_path / "big-source.h5", 110_000  # 3 KiB a row: 330 MB > 256 MiB
    rng = np.random.default_rng(0)
    with h5py.File(source, "w") as handle:
        x = handle.create_dataset("x", (rows, 32, 32, 3), np.uint8, chunks=(64, 32, 32, 3))
        for start in range(0, rows, 4096):
            x[start:start + 4096] = rng.integers(0, 256, (min(4096, rows - start), 32, 32, 3),
                                                 dtype=np.uint8)
        handle["y"] = rng.integers(0, 10, rows)
    assert source.stat().st_size > CAP_MB << 20
    cgroup = Path("/sys/fs/cgroup/memory") / f"hpcdl-prepare-{os.getpid()}"
    cgroup.mkdir()
    try:
        (cgroup / "memory.limit_in_bytes").write_text(str(CAP_MB << 20))
        out = tmp_path / "out.h5"
        command = [sys.executable, "-c", PREPARE, str(source), str(out)]
        done = subprocess.run(["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh",
                               *command], capture_output=True, text=True, timeout=900,
                              env=hpcdl_env(), check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        assert int((cgroup / "memory.max_usage_in_bytes").read_text()) <= CAP_MB << 20
        with h5py.File(source) as handle:
            y = handle["y"][()]
        kept, _ = data.stratified_split(y, 0.2, 0)
        train_rows = kept[data.stratified_split(y[kept], 0.1, 0)[0]]
        assert not np.all(np.diff(train_rows) > 0)  # the train split is permuted
        with h5py.File(out) as written, h5py.File(source) as handle:
            assert sum(len(written[f"{s}/y"]) for s in data.SPLITS) == rows
            assert np.array_equal(written["train/y"][()], y[train_rows])
            for i in (0, 1, 5000, len(train_rows) - 1):
                assert np.array_equal(written["train/x"][i], handle["x"][train_rows[i]])
    finally:
        cgroup.rmdir()
