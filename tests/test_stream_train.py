"""`hpcdl train` streaming datasets bigger than memory: under a real cgroup memory cap, with
real Horovod ranks (mpirun). The cap must hold two TensorFlow ranks (~300 MB anonymous memory
each, plus the libraries' page cache: 640 MiB was measured too small, 800 MiB enough), so the
dataset file is 4x that: 3.3 GB, written once, uncompressed, and deleted at the end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from conftest import hpcdl_env
from hpcdl import data, store

pytestmark = [pytest.mark.slow, pytest.mark.mpi]

CAP_MB = 800
SHAPE = (32, 32, 3)  # 3 KiB a row
CHUNK_ROWS = 341  # ~1 MiB chunks, as prepare writes them


def write_dataset(path: Path, train_rows: int, seed: int = 0) -> Path:
    """An hpcdl dataset file of random uint8 images (val and test a tenth of train each),
    written block by block: the test process never holds more than a few MB of it."""
    rng = np.random.default_rng(seed)
    sizes = {"train": train_rows, "val": train_rows // 10, "test": train_rows // 10}
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle.attrs.update({
            "format": data.DATASET_FORMAT, "format_version": data.DATASET_FORMAT_VERSION,
            "name": path.stem, "source": "random", "n_classes": 10,
            "class_names": json.dumps([str(c) for c in range(10)]),
            "shapes": json.dumps({s: [n, *SHAPE] for s, n in sizes.items()}),
            "checksums_sha256": "{}", "val_fraction": 0.1, "split_seed": seed,
            "hpcdl_version": "test"})
        for split, n in sizes.items():
            x = handle.create_dataset(f"{split}/x", (n, *SHAPE), np.uint8,
                                      chunks=(CHUNK_ROWS, *SHAPE))
            for start in range(0, n, 16 * CHUNK_ROWS):
                stop = min(n, start + 16 * CHUNK_ROWS)
                x[start:stop] = rng.integers(0, 256, (stop - start, *SHAPE), dtype=np.uint8)
            handle.create_dataset(f"{split}/y", data=rng.integers(0, 10, n))
    return path


def big_config(results: Path, name: str, **train: object) -> Path:
    """A tiny MLP on the dataset `name` in `results`, one epoch, one TF thread per rank."""
    document = {
        "name": name, "results_dir": str(results),
        "dataset": {"name": name, "source": f"hdf5:{results}/source-not-needed.h5"},
        "model": {"family": "mlp", "width": 16, "depth": 1},
        "train": {"epochs": 1, "batch_size": 512, "intra_op_threads": 1, **train},
    }
    path = results / f"{name}-{len(train)}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
def memory_cap() -> Iterator[Path]:
    """A cgroup v1 memory cgroup capped at CAP_MB (this machine mounts v1's controller; its
    unified v2 mount has no memory controller), removed afterwards."""
    root = Path("/sys/fs/cgroup/memory")
    if not (root / "memory.limit_in_bytes").exists():
        pytest.fail("no cgroup v1 memory controller at /sys/fs/cgroup/memory")
    cgroup = root / f"hpcdl-test-{os.getpid()}"
    cgroup.mkdir()
    (cgroup / "memory.limit_in_bytes").write_text(str(CAP_MB << 20))
    try:
        yield cgroup
    finally:
        for pid in (cgroup / "cgroup.procs").read_text().split():
            (root / "cgroup.procs").write_text(pid)
        cgroup.rmdir()


def train_in(cgroup: Path, config: Path, out: Path, timeout: float = 900,
             ranks: int = 2) -> subprocess.CompletedProcess[str]:
    """`mpirun -np ranks hpcdl train` with mpirun and all its ranks inside `cgroup`."""
    command = (f'echo $$ > {cgroup}/cgroup.procs && exec mpirun -np {ranks} hpcdl train '
               f'--config {config} --out {out}')
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                          timeout=timeout, env=hpcdl_env(), check=False)


def test_a_dataset_four_times_the_memory_cap_streams(tmp_path: Path, memory_cap: Path) -> None:
    rows = int(4.1 * (CAP_MB << 20) / (int(np.prod(SHAPE)) * 1.2))  # val, test: +20 %
    dataset = write_dataset(tmp_path / "data" / "big.h5", rows)
    try:
        assert dataset.stat().st_size >= 4 * (CAP_MB << 20)
        # auto: each rank sees its shard far over its share of the cap, and streams
        out = tmp_path / "streamed.h5"
        done = train_in(memory_cap, big_config(tmp_path, "big"), out)
        assert done.returncode == 0, done.stderr[-3000:]
        run = store.read_run(out)
        assert run.attrs["stop_reason"] == "completed"
        assert [(c["rank"], c["mode"], c["requested"]) for c in run.attrs["input"]] == [
            (0, "stream", "auto"), (1, "stream", "auto")]
        assert all(c["shard_mb"] > 2 * c["per_rank_mb"] for c in run.attrs["input"])
        assert len(set(run.attrs["weights_sha256"])) == 1
        failures = int((memory_cap / "memory.failcnt").read_text())
        # the same run reading its shard into memory cannot live under the cap
        killed = train_in(memory_cap, big_config(tmp_path, "big", input="memory"),
                          tmp_path / "in-memory.h5")
        assert killed.returncode != 0
        assert "exited on signal 9 (Killed)" in killed.stderr, killed.stderr[-3000:]
        assert int((memory_cap / "memory.failcnt").read_text()) > failures
    finally:
        dataset.unlink()


def test_peak_memory_of_a_streaming_rank_does_not_grow_with_the_dataset(tmp_path: Path) -> None:
    peaks = {}
    for factor in (1, 8):
        name = f"rows{factor}"
        write_dataset(tmp_path / "data" / f"{name}.h5", 20_000 * factor)
        out = tmp_path / f"{name}-run.h5"
        config = big_config(tmp_path, name, input="stream", stream_buffer_mb=16)
        done = subprocess.run(["mpirun", "-np", "2", "hpcdl", "train", "--config", str(config),
                               "--out", str(out)], capture_output=True, text=True,
                              timeout=900, env=hpcdl_env(), check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        peaks[factor] = store.read_run(out).attrs["peak_rss_mb"]
    # 8x the rows: 480 MB more file, 240 MB more a rank if it were held
    assert all(abs(big - small) < 40 for small, big in zip(peaks[1], peaks[8], strict=True)), peaks
    shutil.rmtree(tmp_path / "data")
