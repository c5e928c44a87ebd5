"""hpcdl/data.py and `hpcdl prepare`: sources, splits, the dataset file, the sharded reader."""

from __future__ import annotations

import io
import itertools
import json
import re
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import make_idx_dir, run_hpcdl, write_idx, write_sweep_config
from hpcdl import cli, config, data


def prepare(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run `hpcdl prepare` in-process; returns exit code and stderr."""
    code = cli.main(["prepare", *args])
    return code, capsys.readouterr().err


# ---------------------------------------------------------------- good inputs


@pytest.mark.parametrize("gz", [False, True])
def test_prepare_idx_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], gz: bool
) -> None:
    source = make_idx_dir(tmp_path / "idx", n_train=200, n_test=50, gz=gz)
    out = tmp_path / "mnist.h5"
    code, err = prepare(capsys, "mnist", "--source", str(source), "--out", str(out))
    assert code == 0, err
    info = data.dataset_info(out)
    assert info.sizes == {"train": 180, "val": 20, "test": 50}
    assert info.sample_shape == (28, 28, 1) and info.dtype == "uint8"
    assert info.n_classes == 10 and info.class_names == tuple("0123456789")
    with h5py.File(out) as f:
        val_y = f["val/y"][:]
        assert np.bincount(val_y, minlength=10).tolist() == [2] * 10  # stratified
        assert f["train/x"].chunks[1:] == (28, 28, 1)  # chunked along N only
        assert f["train/x"].compression is None  # benchmark 8
        checksums = json.loads(f.attrs["checksums_sha256"])
        assert set(checksums) == set(data.IDX_FILES.values())
        assert f.attrs["hpcdl_version"] == data.__version__
        # test kept as given, in order
        assert f["test/y"][:].tolist() == (np.arange(50) % 10).tolist()


def test_split_is_seeded(tmp_path: Path, capsys: pytest.CaptureFixture[str], idx_dir: Path) -> None:
    outs = []
    for i, seed in enumerate(("1", "1", "2")):
        outs.append(tmp_path / f"{i}.h5")
        assert (
            prepare(
                capsys, "mnist", "--source", str(idx_dir), "--out", str(outs[-1]), "--seed", seed
            )[0]
            == 0
        )
    trains = [h5py.File(o)["train/x"][:] for o in outs]
    assert np.array_equal(trains[0], trains[1])
    assert not np.array_equal(trains[0], trains[2])


def test_user_npz_calorimeter_like(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(1)
    source = tmp_path / "showers.npz"
    np.savez(
        source, images=rng.random((300, 32, 32, 1)).astype(np.float32), labels=np.arange(300) % 2
    )
    out = tmp_path / "showers.h5"
    code, err = prepare(
        capsys, f"npz:{source}", "--x-key", "images", "--y-key", "labels", "--out", str(out)
    )
    assert code == 0, err
    info = data.dataset_info(out)
    assert info.sample_shape == (32, 32, 1) and info.dtype == "float32" and info.n_classes == 2
    assert sum(info.sizes.values()) == 300 and info.sizes["test"] == 60


def test_user_hdf5_galaxy_like_with_test_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(2)
    source = tmp_path / "galaxies.h5"
    with h5py.File(source, "w") as f:
        f["train/images"] = rng.integers(0, 256, (120, 64, 64, 3), dtype=np.uint8)
        f["train/labels"] = np.arange(120) % 3
        f["x_test"] = rng.integers(0, 256, (30, 64, 64, 3), dtype=np.uint8)
        f["y_test"] = np.arange(30) % 3
    out = tmp_path / "galaxies-ds.h5"
    code, err = prepare(
        capsys,
        f"hdf5:{source}",
        "--x-key",
        "train/images",
        "--y-key",
        "train/labels",
        "--out",
        str(out),
    )
    assert code == 0, err
    info = data.dataset_info(out)
    assert info.sample_shape == (64, 64, 3) and info.sizes == {"train": 108, "val": 12, "test": 30}


def test_digits(digits_h5: Path) -> None:
    info = data.dataset_info(digits_h5)
    assert info.sample_shape == (8, 8, 1) and info.n_classes == 10
    assert sum(info.sizes.values()) == 1797


def test_existing_output_kept_unless_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], idx_dir: Path
) -> None:
    out = tmp_path / "d.h5"
    out.write_text("precious")
    code, err = prepare(capsys, "mnist", "--source", str(idx_dir), "--out", str(out))
    assert code == 2 and str(out) in err and "--force" in err
    assert out.read_text() == "precious"
    assert prepare(capsys, "mnist", "--source", str(idx_dir), "--out", str(out), "--force")[0] == 0
    assert data.dataset_info(out).sizes["test"] == 50


def test_interrupted_write_leaves_no_file(tmp_path: Path, idx_dir: Path) -> None:
    arrays = data.load_source("mnist", data.SourceOptions(source=str(idx_dir)))
    out = tmp_path / "d.h5"

    def interrupt(rows: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        data.write_dataset(arrays, out, 0.1, 0, progress=interrupt)
    assert list(tmp_path.iterdir()) == [idx_dir]


@pytest.mark.slow
def test_prepare_fashion_mnist_from_debian(tmp_path: Path) -> None:
    out = tmp_path / "fashion_mnist.h5"
    result = run_hpcdl("prepare", "fashion_mnist", "--out", str(out))
    assert result.returncode == 0, result.stderr
    info = data.dataset_info(out)
    assert info.sizes["train"] + info.sizes["val"] == 60000 and info.sizes["test"] == 10000
    assert info.sample_shape == (28, 28, 1) and info.n_classes == 10
    assert info.class_names[9] == "Ankle boot"
    header = subprocess.run(["h5dump", "-H", str(out)], capture_output=True, text=True, check=True)
    assert 'DATASET "x"' in header.stdout and "( 10000, 28, 28, 1 )" in header.stdout
    assert "checksums_sha256" in header.stdout
    assert_dataset_layout(out)


# what the README's "File layouts" promises of every dataset file
ROOT_ATTRIBUTES = {"format", "format_version", "name", "source", "n_classes", "class_names",
                   "shapes", "checksums_sha256", "val_fraction", "split_seed", "hpcdl_version"}


def h5dump_dataset(path: Path, dataset: str) -> str:
    """`h5dump -H -p` of one dataset: its type, shape, chunking and filters."""
    return subprocess.run(["h5dump", "-H", "-p", "-d", dataset, str(path)], capture_output=True,
                          text=True, check=True).stdout


def assert_dataset_layout(path: Path) -> None:
    """Images chunked along N only (chunks of at most 1 MiB, as many rows as fit), no filter
    (benchmark 8); labels int64; the listed root attributes, the JSON ones parseable."""
    with h5py.File(path) as f:
        assert set(f.attrs) == ROOT_ATTRIBUTES and f.attrs["format"] == "hpcdl-dataset"
        shapes = json.loads(f.attrs["shapes"])
        assert len(json.loads(f.attrs["class_names"])) == f.attrs["n_classes"]
        assert isinstance(json.loads(f.attrs["checksums_sha256"]), dict)  # {} for digits
        for split in ("train", "val", "test"):
            x, y = f[f"{split}/x"], f[f"{split}/y"]
            assert list(x.shape) == shapes[split] and len(y) == len(x)
            row_bytes = int(np.prod(x.shape[1:])) * x.dtype.itemsize
            rows = min(len(x), (1 << 20) // row_bytes)
            assert x.chunks == (rows, *x.shape[1:]), (split, x.chunks)
            assert (x.compression, x.compression_opts, x.shuffle) == (None, None, False)
            assert y.dtype == np.int64
            dumped = h5dump_dataset(path, f"/{split}/x")
            assert f"CHUNKED ( {', '.join(map(str, x.chunks))} )" in dumped, dumped
            assert re.search(r"FILTERS \{\s+NONE\s+\}", dumped), dumped  # no filter
            assert "DATATYPE  H5T_STD_I64LE" in h5dump_dataset(path, f"/{split}/y")


def test_digits_file_layout(digits_h5: Path) -> None:
    assert_dataset_layout(digits_h5)


def test_prepare_with_config_writes_the_configs_dataset_file(tmp_path: Path) -> None:
    cfg_path = write_sweep_config(tmp_path)
    result = run_hpcdl("prepare", "--config", str(cfg_path))
    assert result.returncode == 0, result.stderr[-2000:]
    written = config.load(cfg_path).dataset_file
    assert written == tmp_path / "data" / "digits.h5"
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["digits.h5"]  # nothing else
    info = data.dataset_info(written)
    # the config's dataset section: digits, val_fraction 0.1 of what test_fraction 0.2 leaves
    assert info.name == "digits" and info.sizes == {"train": 1293, "val": 144, "test": 360}


# ---------------------------------------------------------------- bad inputs


def test_missing_source_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = prepare(
        capsys, "mnist", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o.h5")
    )
    assert code == 2 and "nope" in err and "does not exist" in err
    assert "Traceback" not in err and len([ln for ln in err.splitlines() if "error" in ln]) == 1


def test_missing_idx_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], idx_dir: Path
) -> None:
    (idx_dir / "t10k-labels-idx1-ubyte").unlink()
    code, err = prepare(capsys, "mnist", "--source", str(idx_dir), "--out", str(tmp_path / "o.h5"))
    assert code == 2 and "t10k-labels-idx1-ubyte" in err and "missing" in err


def test_wrong_magic(tmp_path: Path, capsys: pytest.CaptureFixture[str], idx_dir: Path) -> None:
    write_idx(idx_dir / "train-images-idx3-ubyte", np.zeros((200, 28, 28)), magic=0x0801)
    code, err = prepare(capsys, "mnist", "--source", str(idx_dir), "--out", str(tmp_path / "o.h5"))
    assert code == 2 and "train-images-idx3-ubyte" in err and "magic" in err and "0x00000803" in err


def test_truncated_idx(tmp_path: Path, capsys: pytest.CaptureFixture[str], idx_dir: Path) -> None:
    path = idx_dir / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    code, err = prepare(capsys, "mnist", "--source", str(idx_dir), "--out", str(tmp_path / "o.h5"))
    assert code == 2 and str(path) in err and "truncated" in err


def test_truncated_gzip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = make_idx_dir(tmp_path / "gz", gz=True)
    path = source / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-50])
    code, err = prepare(capsys, "mnist", "--source", str(source), "--out", str(tmp_path / "o.h5"))
    assert code == 2 and str(path) in err and "truncated" in err


def test_count_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str], idx_dir: Path) -> None:
    write_idx(idx_dir / "train-labels-idx1-ubyte", np.arange(150) % 10)
    code, err = prepare(capsys, "mnist", "--source", str(idx_dir), "--out", str(tmp_path / "o.h5"))
    assert code == 2 and "200 images but 150 labels" in err


def test_fashion_mnist_checksum_mismatch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], idx_dir: Path
) -> None:
    code, err = prepare(
        capsys, "fashion_mnist", "--source", str(idx_dir), "--out", str(tmp_path / "o.h5")
    )
    assert code == 2 and "checksum mismatch" in err and "train-images-idx3-ubyte" in err
    assert data.FASHION_MNIST_SHA256["train-images-idx3-ubyte"] in err
    assert not (tmp_path / "o.h5").exists()


def test_npz_without_named_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "a.npz"
    np.savez(source, images=np.zeros((10, 4, 4)), labels=np.zeros(10, dtype=int))
    code, err = prepare(capsys, f"npz:{source}", "--out", str(tmp_path / "o.h5"))
    assert code == 2 and "'x'" in err and "images" in err and "--x-key" in err


def test_h5_without_named_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "a.h5"
    with h5py.File(source, "w") as f:
        f["x"] = np.zeros((10, 4, 4))
    code, err = prepare(capsys, f"hdf5:{source}", "--out", str(tmp_path / "o.h5"))
    assert code == 2 and "'y'" in err and str(source) in err


def test_labels_not_integers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "a.npz"
    np.savez(source, x=np.zeros((10, 4, 4)), y=np.linspace(0, 1, 10))
    code, err = prepare(capsys, f"npz:{source}", "--out", str(tmp_path / "o.h5"))
    assert code == 2 and "'y'" in err and "integers" in err


def test_xy_length_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "a.npz"
    np.savez(source, x=np.zeros((10, 4, 4)), y=np.zeros(9, dtype=int))
    code, err = prepare(capsys, f"npz:{source}", "--out", str(tmp_path / "o.h5"))
    assert code == 2 and "9 labels" in err and "10 images" in err


def test_missing_user_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = prepare(capsys, f"npz:{tmp_path / 'gone.npz'}", "--out", str(tmp_path / "o.h5"))
    assert code == 2 and "gone.npz" in err and "does not exist" in err


@pytest.mark.parametrize("where", ["parent_is_file", "proc"])
def test_unwritable_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], idx_dir: Path, where: str
) -> None:
    if where == "parent_is_file":
        (tmp_path / "afile").write_text("")
        out = tmp_path / "afile" / "o.h5"
    else:
        out = Path("/proc/hpcdl-test/o.h5")
    code, err = prepare(capsys, "mnist", "--source", str(idx_dir), "--out", str(out))
    assert code == 2 and str(out) in err and "cannot write" in err


def test_unknown_dataset(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = prepare(capsys, "cifar")
    assert code == 2 and "'cifar'" in err and "fashion_mnist" in err


def test_not_a_dataset_file(tmp_path: Path) -> None:
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = [1]
    with pytest.raises(data.DatasetError, match="not an hpcdl dataset file"):
        data.dataset_info(other)
    with pytest.raises(data.DatasetError, match="does not exist"):
        data.dataset_info(tmp_path / "missing.h5")


# ---------------------------------------------------------------- sharded reader


@pytest.mark.parametrize("n", [0, 1, 7, 100, 1617])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 8])
def test_shard_bounds(n: int, size: int) -> None:
    equal = [data.shard_bounds(n, r, size) for r in range(size)]
    assert len({stop - start for start, stop in equal}) == 1  # same steps on every rank
    assert all(a[1] == b[0] for a, b in itertools.pairwise(equal))  # disjoint, in order
    assert n - equal[-1][1] < size  # at most size-1 rows left out
    uneven = [data.shard_bounds(n, r, size, equal=False) for r in range(size)]
    covered = [i for start, stop in uneven for i in range(start, stop)]
    assert covered == list(range(n))


def test_read_shard_partitions_the_data(digits_h5: Path) -> None:
    with h5py.File(digits_h5) as f:
        all_x, all_y = f["train/x"][:], f["train/y"][:]
    shards = [data.read_shard(digits_h5, "train", r, 3) for r in range(3)]
    per_rank = len(all_y) // 3
    assert all(len(x) == len(y) == per_rank for x, y in shards)
    assert np.array_equal(np.concatenate([x for x, _ in shards]), all_x[: 3 * per_rank])
    evals = [data.read_shard(digits_h5, "test", r, 3, equal=False) for r in range(3)]
    assert sum(len(y) for _, y in evals) == data.dataset_info(digits_h5).sizes["test"]


class CountingFile(io.FileIO):
    """A file that counts the bytes h5py reads through it."""

    bytes_read = 0

    def readinto(self, buffer):  # type: ignore[no-untyped-def]
        n = super().readinto(buffer)
        self.bytes_read += n or 0
        return n


def test_read_shard_reads_only_its_share(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    arrays = data.Arrays(
        "noise",
        "test",
        rng.random((4000, 32, 32, 1)).astype(np.float32),
        np.arange(4000) % 4,
        rng.random((40, 32, 32, 1)).astype(np.float32),
        np.arange(40) % 4,
        ("a", "b", "c", "d"),
    )
    path = tmp_path / "noise.h5"
    data.write_dataset(arrays, path, val_fraction=0.1, seed=0)
    file_size = path.stat().st_size
    with CountingFile(path, "rb") as handle:
        x, _ = data.read_shard(handle, "train", rank=1, size=4)
        bytes_read = handle.bytes_read
    assert len(x) == 900
    with h5py.File(path) as f:
        assert np.array_equal(x, f["train/x"][900:1800])
    # one rank of four reads about a quarter of the file (its chunks, plus metadata)
    assert bytes_read < 0.35 * file_size, (bytes_read, file_size)


def nan_arrays(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Float images with one NaN at [137, 2, 3] (past the first HDF5 block of 64 rows), labels."""
    rng = np.random.default_rng(3)
    x = rng.random((n, 8, 8)).astype(np.float32)
    x[137, 2, 3] = np.nan
    return x, np.arange(n) % 2


@pytest.mark.parametrize("kind", ["hdf5", "npz"])
def test_nonfinite_images_are_refused_unless_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    x, y = nan_arrays()
    source = tmp_path / f"nan.{'h5' if kind == 'hdf5' else 'npz'}"
    if kind == "hdf5":
        with h5py.File(source, "w") as f:
            f.create_dataset("pixels", data=x, chunks=(64, 8, 8))
            f["y"] = y
    else:
        np.savez(source, pixels=x, y=y)
    out = tmp_path / "o.h5"
    code, err = prepare(capsys, f"{kind}:{source}", "--x-key", "pixels", "--out", str(out))
    assert code == 2
    assert [ln for ln in err.splitlines() if "error" in ln] == [
        f"hpcdl prepare: error: {source}: 'pixels' has a non-finite value (nan) at index "
        "[137, 2, 3]; clean the data, or pass --allow-nonfinite (dataset.allow_nonfinite: "
        "true) to keep it"]
    assert not out.exists()
    code, err = prepare(capsys, f"{kind}:{source}", "--x-key", "pixels", "--out", str(out),
                        "--allow-nonfinite")
    assert code == 0, err
    assert data.dataset_info(out).sizes == {"train": 144, "val": 16, "test": 40}


def test_nonfinite_test_images_and_the_config_switch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x, y = nan_arrays()
    x[137, 2, 3] = 0.5
    test_x = x[:40].copy()
    test_x[5, 0, 0] = np.inf
    source = tmp_path / "inf.npz"
    np.savez(source, x=x, y=y, x_test=test_x, y_test=y[:40])
    cfg = write_sweep_config(tmp_path, name="s", dataset={"name": "inf",
                                                          "source": f"npz:{source}"})
    code, err = prepare(capsys, "--config", str(cfg))
    assert code == 2
    assert f"{source}: 'x_test' has a non-finite value (inf) at index [5, 0, 0]" in err
    assert not (tmp_path / "data" / "inf.h5").exists()
    code, err = prepare(capsys, "--config", str(cfg), "--set", "dataset.allow_nonfinite=true")
    assert code == 0, err
    assert (tmp_path / "data" / "inf.h5").exists()
