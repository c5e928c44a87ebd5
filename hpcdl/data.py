"""Dataset sources -> one dataset HDF5 file; and the reader that gives each rank its shard.

Layout (readable with h5dump): /train, /val, /test groups with `x` (N, H, W, C) uint8 or float32,
chunked along N (no filter by default; gzip or lzf on request), and `y` int64; file attributes
describe the data (name, source, n_classes, class_names, shapes, source checksums, split seed,
hpcdl version).

The train split is permuted (seeded) when the file is written, so a contiguous block of rows is
an unbiased sample: each rank reads one contiguous block, touching only its own chunks.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import struct
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import h5py
import numpy as np

from hpcdl import __version__, blockcopy, sources, store
from hpcdl.config import default_dataset_path
from hpcdl.errors import DatasetError

log = logging.getLogger("hpcdl.data")

DATASET_FORMAT = "hpcdl-dataset"
DATASET_FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DIGIT_CLASSES = tuple(str(d) for d in range(10))

IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801

# sha256 of the decompressed files (Zalando's release; Debian recompressed the .gz files).
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

TARGET_CHUNK_BYTES = 1 << 20
COMPRESSIONS = ("gzip", "lzf", "none")


@dataclass(frozen=True)
class WriteOptions:
    """How the dataset file's images are stored: chunk size and filter. Benchmark 8 chose the
    default, none: streaming gzip cost 11-19 % of an epoch where training already uses every
    core, and read a cold file at the CPU's inflate speed, a quarter of the disk's."""

    compression: str = "none"  # gzip | lzf | none
    level: int = 4  # gzip only
    chunk_mb: float = TARGET_CHUNK_BYTES / 2**20

    def dataset_options(self) -> dict[str, Any]:
        """h5py create_dataset keywords of the filter."""
        if self.compression == "none":
            return {}
        if self.compression == "gzip":
            return {"compression": "gzip", "compression_opts": self.level, "shuffle": True}
        return {"compression": "lzf", "shuffle": True}

    def chunk_rows(self, sample_shape: tuple[int, ...], itemsize: int, n_rows: int) -> int:
        row_bytes = max(1, int(np.prod(sample_shape)) * itemsize)
        return max(1, min(n_rows, int(self.chunk_mb * 2**20) // row_bytes))


@dataclass
class Arrays:
    """A dataset in memory before it is split and written: train and test, with provenance."""

    name: str
    source: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: tuple[str, ...]
    checksums: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- sources


def read_idx(path: Path, expected_magic: int) -> tuple[np.ndarray, str]:
    """Read one IDX file (.gz or not): the array, and the sha256 of the decompressed bytes."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read IDX file ({exc.strerror or exc})") from exc
    except gzip.BadGzipFile as exc:
        raise DatasetError(f"{path}: not a valid gzip file ({exc})") from exc
    except EOFError as exc:
        raise DatasetError(f"{path}: gzip stream is truncated") from exc
    if len(raw) < 4:
        raise DatasetError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != expected_magic:
        raise DatasetError(
            f"{path}: wrong IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"({'images' if expected_magic == IDX_IMAGES_MAGIC else 'labels'})"
        )
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DatasetError(f"{path}: IDX header truncated")
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    expected = int(np.prod(dims))
    have = len(raw) - header_len
    if have != expected:
        raise DatasetError(
            f"{path}: truncated or padded IDX data: header says {'x'.join(map(str, dims))} "
            f"= {expected} bytes, file has {have}"
        )
    array = np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)
    return array, hashlib.sha256(raw).hexdigest()


def find_idx_file(directory: Path, stem: str) -> Path:
    """The IDX file `stem` in `directory`, compressed or not."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{directory}: missing IDX file {stem} (or {stem}.gz)")


def load_idx_dataset(
    name: str,
    directory: Path,
    class_names: tuple[str, ...],
    known_sha256: dict[str, str] | None = None,
) -> Arrays:
    """MNIST-style dataset from a directory of the four standard IDX files."""
    if not directory.is_dir():
        raise DatasetError(f"{directory}: source directory for {name} does not exist")
    parts: dict[str, np.ndarray] = {}
    checksums: dict[str, str] = {}
    for part, stem in IDX_FILES.items():
        path = find_idx_file(directory, stem)
        magic = IDX_IMAGES_MAGIC if part.endswith("_x") else IDX_LABELS_MAGIC
        parts[part], checksums[stem] = read_idx(path, magic)
        if known_sha256 and checksums[stem] != known_sha256[stem]:
            raise DatasetError(
                f"{path}: checksum mismatch for {name}: sha256 of the decompressed file is "
                f"{checksums[stem]}, expected {known_sha256[stem]}"
            )
    for split in ("train", "test"):
        n_x, n_y = len(parts[f"{split}_x"]), len(parts[f"{split}_y"])
        if n_x != n_y:
            raise DatasetError(
                f"{directory}: {split} has {n_x} images but {n_y} labels "
                f"({IDX_FILES[split + '_x']} vs {IDX_FILES[split + '_y']})"
            )
    return Arrays(
        name=name,
        source=str(directory.resolve()),
        train_x=parts["train_x"][..., None],
        train_y=parts["train_y"].astype(np.int64),
        test_x=parts["test_x"][..., None],
        test_y=parts["test_y"].astype(np.int64),
        class_names=class_names,
        checksums=checksums,
    )


def load_keras_dataset(name: str, class_names: tuple[str, ...]) -> Arrays:
    """Download through keras' loader: for machines with internet and no local copy."""
    from tensorflow import keras  # Keras 2: hpcdl/__init__ selected tf-keras

    loader = {"fashion_mnist": keras.datasets.fashion_mnist, "mnist": keras.datasets.mnist}[name]
    (train_x, train_y), (test_x, test_y) = loader.load_data()
    return Arrays(
        name,
        f"keras.datasets.{name}",
        train_x[..., None],
        train_y.astype(np.int64),
        test_x[..., None],
        test_y.astype(np.int64),
        class_names,
    )


def load_digits_dataset(test_fraction: float, seed: int) -> Arrays:
    """scikit-learn's 8x8 digits (offline, 1797 images), scaled from 0..16 to 0..255 uint8."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    return Arrays(
        "digits",
        "sklearn.datasets.load_digits",
        images[train_idx],
        labels[train_idx],
        images[test_idx],
        labels[test_idx],
        DIGIT_CLASSES,
    )


def load_user_arrays(
    kind: str,
    path: Path,
    x_key: str,
    y_key: str,
    x_test_key: str,
    y_test_key: str,
    test_fraction: float,
    seed: int,
    allow_nonfinite: bool = False,
) -> Arrays:
    """A user's own arrays from .npz or .h5; test from the test keys if present, else held out.
    NaN or inf in the images is refused unless `allow_nonfinite`: every trial would fail."""
    if not path.is_file():
        raise DatasetError(f"{path}: {kind} file does not exist")
    with _open_arrays(kind, path) as arrays:
        missing = [key for key in (x_key, y_key) if key not in arrays]
        if missing:
            raise DatasetError(
                f"{path}: no array named {', '.join(map(repr, missing))}; "
                f"it has {sorted(arrays.keys())} (choose with --x-key/--y-key)"
            )
        if not allow_nonfinite:
            refuse_nonfinite(path, x_key, arrays[x_key])
        x = _checked_images(path, x_key, np.asarray(arrays[x_key]))
        y = _checked_labels(path, y_key, np.asarray(arrays[y_key]), len(x), x_key)
        has_test = x_test_key in arrays and y_test_key in arrays
        if has_test:
            if not allow_nonfinite:
                refuse_nonfinite(path, x_test_key, arrays[x_test_key])
            test_x = _checked_images(path, x_test_key, np.asarray(arrays[x_test_key]))
            test_y = _checked_labels(
                path, y_test_key, np.asarray(arrays[y_test_key]), len(test_x), x_test_key
            )
            if test_x.shape[1:] != x.shape[1:]:
                raise DatasetError(
                    f"{path}: {x_test_key!r} images are {test_x.shape[1:]}, "
                    f"but {x_key!r} images are {x.shape[1:]}"
                )
    if not has_test:
        train_idx, test_idx = stratified_split(y, test_fraction, seed)
        x, y, test_x, test_y = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    n_classes = int(max(y.max(), test_y.max())) + 1
    return Arrays(
        path.stem,
        f"{kind}:{path.resolve()}",
        x,
        y,
        test_x,
        test_y,
        tuple(str(c) for c in range(n_classes)),
        {path.name: _sha256_file(path)},
    )


@contextmanager
def _open_arrays(kind: str, path: Path) -> Iterator[dict[str, np.ndarray] | h5py.File]:
    try:
        if kind == "npz":
            with np.load(path, allow_pickle=False) as npz:
                yield {key: npz[key] for key in npz.files}
        else:
            with h5py.File(path, "r") as h5:
                yield h5
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot open as {kind} ({exc})") from exc


def first_nonfinite(x: np.ndarray | h5py.Dataset) -> tuple[int, ...] | None:
    """Index of the first NaN or inf in `x`, looked for block by block: of an HDF5 dataset only
    one block is in memory at a time, and no second full copy of an array is made."""
    if not np.issubdtype(x.dtype, np.floating) or x.ndim == 0:
        return None
    rows = _chunk_rows(x.shape[1:], x.dtype.itemsize, len(x))
    for start in range(0, len(x), rows):
        bad = ~np.isfinite(x[start : start + rows])
        if bad.any():
            first = np.unravel_index(int(np.argmax(bad)), bad.shape)
            return (start + int(first[0]), *(int(i) for i in first[1:]))
    return None


def refuse_nonfinite(path: Path, key: str, x: np.ndarray | h5py.Dataset) -> None:
    """DatasetError naming the file, key and first index of a NaN or inf image value."""
    index = first_nonfinite(x)
    if index is not None:
        raise DatasetError(
            f"{path}: {key!r} has a non-finite value ({x[index]}) at index {list(index)}; "
            "clean the data, or pass --allow-nonfinite (dataset.allow_nonfinite: true) to keep it"
        )


def _image_layout(path: Path, key: str, x: np.ndarray | h5py.Dataset) -> tuple[
        tuple[int, ...], np.dtype]:
    """The (N, H, W, C) shape and dtype (uint8 kept, other numbers float32) images of `x`
    are stored with; DatasetError if `x` holds no images."""
    shape = tuple(x.shape) + ((1,) if x.ndim == 3 else ())
    if len(shape) != 4:
        raise DatasetError(
            f"{path}: {key!r} has shape {x.shape}; expected images (N, H, W) or (N, H, W, C)"
        )
    if x.dtype == np.uint8:
        return shape, np.dtype(np.uint8)
    if not np.issubdtype(x.dtype, np.number):
        raise DatasetError(f"{path}: {key!r} has dtype {x.dtype}; expected numbers")
    return shape, np.dtype(np.float32)


def _checked_images(path: Path, key: str, x: np.ndarray) -> np.ndarray:
    shape, dtype = _image_layout(path, key, x)
    return x.reshape(shape).astype(dtype, copy=False)


def _checked_labels(path: Path, key: str, y: np.ndarray, n_images: int, x_key: str) -> np.ndarray:
    if y.ndim != 1:
        raise DatasetError(f"{path}: {key!r} has shape {y.shape}; expected class labels (N,)")
    if len(y) != n_images:
        raise DatasetError(
            f"{path}: {key!r} has {len(y)} labels but {x_key!r} has {n_images} images"
        )
    integral = np.issubdtype(y.dtype, np.integer) or (
        np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.rint(y))
    )
    if not integral:
        raise DatasetError(
            f"{path}: {key!r} labels must be integers, got dtype {y.dtype} "
            f"with values like {y[:3].tolist()}"
        )
    y = y.astype(np.int64)
    if y.min() < 0:
        raise DatasetError(f"{path}: {key!r} labels must be >= 0 (class indices), found {y.min()}")
    return y


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class SourceOptions:
    """How to read a dataset source: `hpcdl prepare` flags or a config's dataset section."""

    source: str | None = None
    x_key: str = "x"
    y_key: str = "y"
    x_test_key: str = "x_test"
    y_test_key: str = "y_test"
    test_fraction: float = 0.2
    seed: int = 0
    allow_nonfinite: bool = False  # NaN/inf in a user's images (refused by default)


def load_source(spec: str, options: SourceOptions) -> Arrays:
    """Dispatch a DATASET spec: fashion_mnist | mnist | digits | npz:FILE | hdf5:FILE."""
    if spec in ("fashion_mnist", "mnist"):
        classes = FASHION_MNIST_CLASSES if spec == "fashion_mnist" else DIGIT_CLASSES
        if options.source == "keras":
            return load_keras_dataset(spec, classes)
        if options.source is None and spec == "mnist":
            raise DatasetError(
                "mnist: no local copy ships with Debian; pass --source DIR with the "
                "four IDX files, or --source keras to download"
            )
        directory = Path(options.source) if options.source else DEFAULT_FASHION_MNIST_DIR
        known = FASHION_MNIST_SHA256 if spec == "fashion_mnist" else None
        return load_idx_dataset(spec, directory, classes, known)
    if spec == "digits":
        return load_digits_dataset(options.test_fraction, options.seed)
    kind = sources.file_kind(spec)
    if kind:
        return load_user_arrays(
            kind,
            Path(spec.partition(":")[2]),
            options.x_key,
            options.y_key,
            options.x_test_key,
            options.y_test_key,
            options.test_fraction,
            options.seed,
            options.allow_nonfinite,
        )
    raise DatasetError(f"unknown dataset {spec!r}; expected {sources.SPECS}")


# ---------------------------------------------------------------- split and write


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held_out): `fraction` of each class held out, seeded, kept shuffled."""
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"split fraction {fraction} must be in (0, 1)")
    from sklearn.model_selection import train_test_split

    try:
        kept, held = train_test_split(
            np.arange(len(labels)), test_size=fraction, random_state=seed, stratify=labels
        )
    except ValueError as exc:
        raise DatasetError(f"cannot hold out {fraction:.0%} stratified by class: {exc}") from exc
    return np.asarray(kept), np.sort(held)


def _chunk_rows(sample_shape: tuple[int, ...], itemsize: int, n_rows: int) -> int:
    row_bytes = max(1, int(np.prod(sample_shape)) * itemsize)
    return max(1, min(n_rows, TARGET_CHUNK_BYTES // row_bytes))


def _write_attrs(handle: h5py.File, arrays: Arrays, shapes: Mapping[str, tuple[int, ...]],
                 val_fraction: float, seed: int) -> None:
    """The dataset file's attributes describing the data (`arrays`' arrays are not used)."""
    handle.attrs.update(
        {
            "format": DATASET_FORMAT,
            "format_version": DATASET_FORMAT_VERSION,
            "name": arrays.name,
            "source": arrays.source,
            "n_classes": len(arrays.class_names),
            "class_names": json.dumps(list(arrays.class_names)),
            "shapes": json.dumps({s: list(shape) for s, shape in shapes.items()}),
            "checksums_sha256": json.dumps(arrays.checksums, sort_keys=True),
            "val_fraction": val_fraction,
            "split_seed": seed,
            "hpcdl_version": __version__,
        }
    )


def _create_split(handle: h5py.File, split: str, shape: tuple[int, ...], dtype: Any,
                  y: np.ndarray, write: WriteOptions) -> h5py.Dataset:
    """A split's group: empty x (chunked along N, filtered) and its labels y; returns x."""
    group = handle.create_group(split)
    rows = write.chunk_rows(shape[1:], np.dtype(dtype).itemsize, shape[0])
    group.create_dataset("y", data=y.astype(np.int64), chunks=True, compression="gzip",
                         compression_opts=4)
    return group.create_dataset("x", shape=shape, dtype=dtype, chunks=(rows, *shape[1:]),
                                **write.dataset_options())


def _write_splits(
    handle: h5py.File,
    arrays: Arrays,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    val_fraction: float,
    seed: int,
    progress: Callable[[int], None] | None,
    write: WriteOptions,
) -> None:
    """The dataset layout: attributes describing the data, then x (chunked) and y per split."""
    _write_attrs(handle, arrays, {s: x.shape for s, (x, _) in splits.items()}, val_fraction,
                 seed)
    for split, (x, y) in splits.items():
        dset = _create_split(handle, split, x.shape, x.dtype, y, write)
        rows = dset.chunks[0]
        for start in range(0, len(x), rows):
            dset[start : start + rows] = x[start : start + rows]
            if progress:
                progress(min(rows, len(x) - start))


def write_dataset(
    arrays: Arrays,
    out: Path,
    val_fraction: float,
    seed: int,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    write: WriteOptions = WriteOptions(),
) -> dict[str, int]:
    """Split val out of train and write the dataset HDF5 atomically; returns rows per split."""
    if out.exists() and not force:
        raise DatasetError(f"{out}: already exists; pass --force to overwrite it")
    train_idx, val_idx = stratified_split(arrays.train_y, val_fraction, seed)
    # train_idx comes back shuffled: contiguous shards of the written train split are iid.
    splits = {
        "train": (arrays.train_x[train_idx], arrays.train_y[train_idx]),
        "val": (arrays.train_x[val_idx], arrays.train_y[val_idx]),
        "test": (arrays.test_x, arrays.test_y),
    }
    n_classes = len(arrays.class_names)
    for split, (_, y) in splits.items():
        if y.size and y.max() >= n_classes:
            raise DatasetError(f"{arrays.source}: {split} label {y.max()} >= n_classes {n_classes}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"{out}: cannot write here ({exc.strerror or exc})") from exc
    with store.atomic_path(out) as tmp:
        try:
            handle = h5py.File(tmp, "w")
        except OSError as exc:
            raise DatasetError(f"{out}: cannot write here ({exc.strerror or exc})") from exc
        with handle:
            _write_splits(handle, arrays, splits, val_fraction, seed, progress, write)
    return {split: len(y) for split, (_, y) in splits.items()}



def _hdf5_placement(path: Path, h5: h5py.File, options: SourceOptions,
                    val_fraction: float) -> tuple[blockcopy.Placement, np.ndarray, np.ndarray]:
    """Which source rows go to train (permuted), val and test: the splits the in-memory path
    makes (test held out unless the file has test keys); labels of the x and test keys."""
    y = _checked_labels(path, options.y_key, np.asarray(h5[options.y_key]),
                        len(h5[options.x_key]), options.x_key)
    has_test = options.x_test_key in h5 and options.y_test_key in h5
    test_y = np.zeros(0, np.int64)
    if has_test:
        test_x = h5[options.x_test_key]
        test_y = _checked_labels(path, options.y_test_key, np.asarray(h5[options.y_test_key]),
                                 len(test_x), options.x_test_key)
        kept, held = np.arange(len(y)), np.zeros(0, np.int64)
    else:
        kept, held = stratified_split(y, options.test_fraction, options.seed)
    train_pos, val_pos = stratified_split(y[kept], val_fraction, options.seed)
    rows = {"train": kept[train_pos], "val": kept[val_pos]}
    if not has_test:
        rows["test"] = held
    return blockcopy.Placement(rows), y, test_y


def _prepare_hdf5(request: PrepareRequest, out: Path | None,
                  force: bool) -> tuple[Arrays, dict[str, int], Path]:
    """An hdf5: source, copied block by block (blockcopy): only labels are read whole."""
    from rich.progress import Progress

    options, path = request.options, Path(request.spec.partition(":")[2])
    if not path.is_file():
        raise DatasetError(f"{path}: hdf5 file does not exist")
    out = out or default_dataset_path(path.stem)
    if out.exists() and not force:
        raise DatasetError(f"{out}: already exists; pass --force to overwrite it")
    with _open_arrays("hdf5", path) as h5:
        missing = [key for key in (options.x_key, options.y_key) if key not in h5]
        if missing:
            raise DatasetError(f"{path}: no array named {', '.join(map(repr, missing))}; it has "
                               f"{sorted(h5.keys())} (choose with --x-key/--y-key)")
        placement, y, test_y = _hdf5_placement(path, h5, options, request.val_fraction)
        sources_of = {split: (options.x_key, y) for split in placement.rows}
        if "test" not in placement.rows:
            sources_of["test"] = (options.x_test_key, test_y)
        shapes, dtypes = {}, set()
        for split, (key, labels) in sources_of.items():
            shape, dtype = _image_layout(path, key, h5[key])
            count = len(placement.rows.get(split, labels))
            shapes[split], dtypes = (count, *shape[1:]), dtypes | {dtype}
        if len({shape[1:] for shape in shapes.values()}) > 1:
            raise DatasetError(f"{path}: {options.x_test_key!r} images are "
                               f"{shapes['test'][1:]}, but {options.x_key!r} images are "
                               f"{shapes['train'][1:]}")
        n_classes = int(max(y.max(), test_y.max(initial=0))) + 1
        arrays = Arrays(path.stem, f"hdf5:{path.resolve()}", np.empty((0, *shapes["train"][1:])),
                        y[:0], y[:0], y[:0], tuple(str(c) for c in range(n_classes)),
                        {path.name: _sha256_file(path)})
        labels = {split: sources_of[split][1][placement.rows[split]] if split in placement.rows
                  else test_y for split in SPLITS}
        with store.atomic_path(out) as tmp, h5py.File(tmp, "w") as handle, \
                Progress(transient=True) as progress:
            task = progress.add_task(f"writing {out}", total=sum(s[0] for s in shapes.values()))
            _write_attrs(handle, arrays, shapes, request.val_fraction, options.seed)
            dtype = np.uint8 if dtypes == {np.dtype(np.uint8)} else np.float32
            outputs = {split: _create_split(handle, split, shapes[split], dtype, labels[split],
                                            request.write) for split in SPLITS}
            copies = [(options.x_key, placement, [s for s in SPLITS if s in placement.rows])]
            if "test" not in placement.rows:
                copies.append((options.x_test_key,
                               blockcopy.Placement({"test": np.arange(len(test_y))}), ["test"]))
            for key, where, splits in copies:
                check = _nonfinite_check(path, key, options.allow_nonfinite)
                blockcopy.copy_images(path, key, h5[key], where,
                                      {s: outputs[s] for s in splits}, check,
                                      lambda rows: progress.advance(task, rows))
    return arrays, {split: shapes[split][0] for split in SPLITS}, out


def _nonfinite_check(path: Path, key: str, allow: bool) -> Callable[[int, np.ndarray], None]:
    """Refuses a block of `key` (first row `start`) with NaN/inf, as refuse_nonfinite does."""

    def check(start: int, block: np.ndarray) -> None:
        index = None if allow else first_nonfinite(block)
        if index is not None:
            where = (start + index[0], *index[1:])
            raise DatasetError(
                f"{path}: {key!r} has a non-finite value ({block[index]}) at index "
                f"{list(where)}; clean the data, or pass --allow-nonfinite "
                "(dataset.allow_nonfinite: true) to keep it")

    return check


@dataclass(frozen=True)
class PrepareRequest:
    """What `hpcdl prepare` writes: a source, how to read it, the val share and where to."""

    spec: str
    options: SourceOptions
    val_fraction: float
    out: Path | None = None  # None: the default dataset path of the source's name
    write: WriteOptions = WriteOptions()

    @classmethod
    def from_config(cls, section: Mapping[str, Any], out: Path) -> PrepareRequest:
        """From a sweep config's dataset section (defaults filled by the schema)."""
        keys = {k: section[k] for k in ("x_key", "y_key", "x_test_key", "y_test_key")}
        options = SourceOptions(source=section["source_dir"],
                                test_fraction=section["test_fraction"], seed=section["seed"],
                                allow_nonfinite=section["allow_nonfinite"], **keys)
        write = WriteOptions(section["compression"], section["compression_level"],
                             section["chunk_mb"])
        return cls(section["source"], options, section["val_fraction"], out, write)


def prepare(request: PrepareRequest, force: bool = False) -> str:
    """Read the source and write its dataset file with a progress bar; the summary line."""
    from rich.progress import Progress

    out = request.out
    if out is not None and out.exists() and not force:
        raise DatasetError(f"{out}: already exists; pass --force to overwrite it")
    log.info("reading %s", request.spec)
    if sources.file_kind(request.spec) == "hdf5":
        arrays, sizes, out = _prepare_hdf5(request, out, force)
    else:
        arrays = load_source(request.spec, request.options)
        out = out or default_dataset_path(arrays.name)
        total = len(arrays.train_x) + len(arrays.test_x)
        with Progress(transient=True) as progress:
            task = progress.add_task(f"writing {out}", total=total)
            sizes = write_dataset(arrays, out, request.val_fraction, request.options.seed,
                                  force=force, progress=lambda rows: progress.advance(task, rows),
                                  write=request.write)
    shape = "x".join(str(d) for d in arrays.train_x.shape[1:])
    return (f"{out}: {arrays.name} {shape}, {len(arrays.class_names)} classes, "
            + ", ".join(f"{split} {n}" for split, n in sizes.items()))


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class DatasetInfo:
    """What a trainer needs to know about a dataset file without reading its arrays."""

    path: str
    name: str
    n_classes: int
    class_names: tuple[str, ...]
    sample_shape: tuple[int, ...]
    dtype: str
    sizes: dict[str, int]


def dataset_info(path: str | Path) -> DatasetInfo:
    """Open a dataset file and check it is one of ours (DatasetError naming the path if not)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: dataset file does not exist (run `hpcdl prepare`)")
    try:
        with h5py.File(path, "r") as handle:
            if handle.attrs.get("format") != DATASET_FORMAT:
                raise DatasetError(
                    f"{path}: not an hpcdl dataset file (no format={DATASET_FORMAT} "
                    "attribute); write it with `hpcdl prepare`"
                )
            missing = [f"/{s}/{k}" for s in SPLITS for k in ("x", "y") if f"{s}/{k}" not in handle]
            if missing:
                raise DatasetError(f"{path}: dataset file lacks {', '.join(missing)}")
            x = handle["train/x"]
            return DatasetInfo(
                path=str(path),
                name=str(handle.attrs["name"]),
                n_classes=int(handle.attrs["n_classes"]),
                class_names=tuple(json.loads(handle.attrs["class_names"])),
                sample_shape=tuple(int(d) for d in x.shape[1:]),
                dtype=str(x.dtype),
                sizes={s: int(handle[f"{s}/y"].shape[0]) for s in SPLITS},
            )
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read as HDF5 ({exc})") from exc


def check_labels(info: DatasetInfo) -> None:
    """Every label of the file is a class index below its n_classes (the model's outputs): a
    file written by other means than `hpcdl prepare` may not hold to that."""
    with h5py.File(info.path, "r") as handle:
        for split in SPLITS:
            labels = handle[f"{split}/y"]
            for start in range(0, labels.shape[0], 1 << 20):
                block = labels[start : start + (1 << 20)]
                bad = (block < 0) | (block >= info.n_classes)
                if bad.any():
                    index = start + int(np.argmax(bad))
                    raise DatasetError(
                        f"{info.path}: /{split}/y[{index}] is {int(labels[index])}, not a class "
                        f"index 0..{info.n_classes - 1} (attribute n_classes {info.n_classes})"
                    )


def shard_bounds(n: int, rank: int, size: int, equal: bool = True) -> tuple[int, int]:
    """Rows [start, stop) of rank `rank` among `size`.

    equal=True (training): every rank gets n // size rows, so all ranks run the same number of
    steps and no rank waits in an allreduce the others never reach; the last n % size rows
    (fewer than `size`) are not used for training. equal=False (evaluation): the remainder is
    spread over the first ranks, so together the shards cover every row exactly once.
    """
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is outside 0..{size - 1}")
    if equal:
        per_rank = n // size
        return rank * per_rank, (rank + 1) * per_rank
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def read_shard(
    source: str | Path | BinaryIO,
    split: str,
    rank: int,
    size: int,
    equal: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Read only this rank's rows of `split` (hyperslab read: other ranks' chunks stay on disk)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    with h5py.File(source, "r") as handle:
        x_dset, y_dset = handle[f"{split}/x"], handle[f"{split}/y"]
        start, stop = shard_bounds(y_dset.shape[0], rank, size, equal)
        return x_dset[start:stop], y_dset[start:stop]
