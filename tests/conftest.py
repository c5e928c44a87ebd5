"""Fixtures: tiny real files (IDX, npz, HDF5), helpers to run hpcdl (also under mpirun), and
real PostgreSQL and MariaDB servers."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent

# Open MPI as root, on one host: allow root; no CMA single-copy (blocked in many containers).
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "PYTHONPATH": str(REPO),
}


def hpcdl_env(**extra: str) -> dict[str, str]:
    """Environment for a child hpcdl process: this tree's code, MPI allowed as root."""
    return {**os.environ, **MPI_ENV, **extra}


def run_hpcdl(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the `hpcdl` console script as a user would."""
    return subprocess.run(
        [shutil.which("hpcdl") or "hpcdl", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=hpcdl_env(**env),
        check=False,
    )


def run_mpi(
    n: int, *command: str, timeout: float = 900, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run `command` under Open MPI's mpirun with n ranks on this machine."""
    return subprocess.run(
        ["mpirun", "-np", str(n), *command],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=hpcdl_env(**env),
        check=False,
    )


def python_cmd(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def write_idx(path: Path, array: np.ndarray, magic: int | None = None, gz: bool = False) -> Path:
    """Write an IDX file (as MNIST ships them); magic defaults to ubyte with array.ndim dims."""
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def make_idx_dir(
    directory: Path, n_train: int = 200, n_test: int = 50, gz: bool = False, seed: int = 0
) -> Path:
    """A directory of the four standard IDX files with random 28x28 images, 10 classes."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            directory / f"{prefix}-images-idx3-ubyte",
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            gz=gz,
        )
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz=gz)
    return directory


@pytest.fixture
def idx_dir(tmp_path: Path) -> Path:
    return make_idx_dir(tmp_path / "idx")


@pytest.fixture(scope="session")
def digits_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits dataset file, written once per test session."""
    from hpcdl import data

    out = tmp_path_factory.mktemp("data") / "digits.h5"
    arrays = data.load_source("digits", data.SourceOptions())
    data.write_dataset(arrays, out, val_fraction=0.1, seed=0)
    return out


def write_sweep_config(results: Path, name: str = "sweep", **sections: dict) -> Path:
    """A sweep config based on configs/smoke.yaml, results under `results`, sections merged."""
    import yaml

    document = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    document.update(name=name, results_dir=str(results))
    # one TF thread per rank: several 2-rank workers share this machine's 2 cores
    document["train"]["intra_op_threads"] = 1
    for section, values in sections.items():
        if isinstance(values, dict):
            document.setdefault(section, {}).update(values)
        else:
            document[section] = values
    path = results / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
def results(tmp_path: Path, digits_h5: Path) -> Path:
    """A results dir holding the digits dataset file where the smoke config expects it."""
    (tmp_path / "data").mkdir()
    shutil.copy(digits_h5, tmp_path / "data" / "digits.h5")
    return tmp_path


def start_worker(config: Path, worker_id: int, ranks: int = 2,
                 log: Path | None = None) -> subprocess.Popen[str]:
    """`mpirun -np ranks hpcdl worker` in its own process group (so a test can kill it all)."""
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        ["mpirun", "-np", str(ranks), "hpcdl", "worker", "--config", str(config),
         "--worker-id", str(worker_id)],
        env=hpcdl_env(), stdout=out, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)


EVALUATE_SCRIPT = """
import json, sys
import h5py, numpy as np, tf_keras
model = tf_keras.models.load_model(sys.argv[1])
with h5py.File(sys.argv[2]) as f:
    x, y = f[sys.argv[3] + "/x"][()], f[sys.argv[3] + "/y"][()]
x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x
model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
loss, accuracy = model.evaluate(x, y, batch_size=len(y), verbose=0)
print(json.dumps({"loss": loss, "accuracy": accuracy, "rows": len(y),
                  "input_shape": list(model.input_shape)}))
"""


def evaluate_model(model: Path, dataset: Path, split: str) -> dict[str, float]:
    """Load a saved .keras model with tf-keras in one plain process (no MPI, no Horovod) and
    evaluate it on a whole split of a dataset file, in one batch: the single-rank reference."""
    import json

    done = subprocess.run([sys.executable, "-c", EVALUATE_SCRIPT, str(model), str(dataset), split],
                          capture_output=True, text=True, timeout=300, check=False,
                          env=hpcdl_env(TF_USE_LEGACY_KERAS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- database servers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_dir(user: str, prefix: str) -> Path:
    """pytest's tmp dirs are private to root; the servers run as their own users."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix=prefix))
    shutil.chown(base, user)
    return base


def _run_as(user: str, *command: str) -> None:
    subprocess.run(["runuser", "-u", user, "--", *command], check=True, capture_output=True,
                   timeout=120)


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A real PostgreSQL server on 127.0.0.1 in its own data directory, stopped afterwards."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not bins:
        pytest.fail("PostgreSQL is not installed (make setup installs Debian's postgresql)")
    bin_dir, base = bins[-1], _server_dir("postgres", "hpcdl-pg-")
    data, port = base / "data", free_port()
    _run_as("postgres", str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    _run_as("postgres", str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w",
            "start", "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1")
    try:
        _run_as("postgres", str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "hpcdl")
        yield f"postgresql://postgres@127.0.0.1:{port}/hpcdl"
    finally:
        _run_as("postgres", str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def mariadb() -> Iterator[str]:
    """A real MariaDB server on 127.0.0.1 in its own data directory, stopped afterwards.
    Without grant tables: anyone on 127.0.0.1 is root, enough for a throw-away test server."""
    import time

    import pymysql

    if not shutil.which("mariadb-install-db") or not Path("/usr/sbin/mariadbd").exists():
        pytest.fail("MariaDB is not installed (make setup installs Debian's mariadb-server)")
    base = _server_dir("mysql", "hpcdl-mariadb-")
    port = free_port()
    _run_as("mysql", "mariadb-install-db", "--no-defaults", f"--datadir={base / 'data'}",
            "--skip-test-db")
    server = subprocess.Popen(
        ["runuser", "-u", "mysql", "--", "/usr/sbin/mariadbd", "--no-defaults",
         f"--datadir={base / 'data'}", f"--port={port}", "--bind-address=127.0.0.1",
         f"--socket={base / 'sock'}", f"--log-error={base / 'error.log'}",
         f"--pid-file={base / 'pid'}", "--skip-grant-tables"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                connection = pymysql.connect(host="127.0.0.1", port=port, user="root")
                break
            except pymysql.err.OperationalError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        with connection:
            connection.cursor().execute("CREATE DATABASE hpcdl")
        yield f"mysql://root@127.0.0.1:{port}/hpcdl"
    finally:
        server.terminate()  # runuser passes SIGTERM on to mariadbd: a clean shutdown
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(base, ignore_errors=True)
