"""install.sh, the one runtime recipe: capability checks, the Horovod wheel cache, both variants.

The cpu runtime under test is the one `make setup` built (its wheel cache is reused here); the
gpu variant is built by a test into the same cache, so only a fresh machine pays for it.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "install.sh"
CACHE = Path(os.environ.get("HPCDL_CACHE")
             or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hpcdl")
USER = "hpcdl-test"
# What a child needs from this machine's set-up: pip's index, proxy and certificates.
PASSED_ON = ("PIP_", "SSL_CERT_", "REQUESTS_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
             "http_proxy", "https_proxy", "no_proxy")
# The tools the recipe's checks look for, by what each test leaves out.
COMPILERS = ("cc", "c++", "gcc", "g++")
MPI = ("mpicc", "mpirun", "ompi_info")
# Two ranks each print 3.0: Horovod's allreduce over MPI works in the runtime.
# One token per rank, printed in one write: mpirun merges the ranks' stdout, and with unbuffered
# output `print(a, b)` is several writes that interleave ("sum 3.0sum 3.0\n\n").
ALLREDUCE = ("import horovod.tensorflow as hvd, tensorflow as tf; hvd.init(); "
             "s = hvd.allreduce(tf.constant(hvd.rank() + 1.0), op=hvd.Sum).numpy(); "
             "print(f'rank{hvd.rank()}-sum={s};', end='', flush=True)")
MPI_AS_ROOT = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def allreduced(stdout: str) -> set[str]:
    """Each rank's token of ALLREDUCE, wherever the merged output put it."""
    return set(re.findall(r"rank\d+-sum=[0-9.]+;", stdout))


def passed_on_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(PASSED_ON)}


def path_without(bin_dir: Path, left_out: tuple[str, ...]) -> str:
    """A directory standing in for /usr/bin on a machine without apt-get/dpkg (RHEL) and without
    `left_out`: links to every other program of /usr/bin and /bin."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for system_dir in (Path("/usr/bin"), Path("/bin")):
        for program in system_dir.iterdir():
            name = program.name
            if (name.startswith(("apt", "dpkg")) or name in left_out
                    or (bin_dir / name).exists()):
                continue
            (bin_dir / name).symlink_to(program)
    return str(bin_dir)


def path_without_venvs() -> str:
    """This PATH as a user's shell has it: `make test` puts .venv/bin first, whose python3.11
    would make the recipe build a venv of its own (the key holds the interpreter)."""
    return ":".join(d for d in os.environ["PATH"].split(":")
                    if not (Path(d).parent / "pyvenv.cfg").exists())


def run_install(*args: str, path: str, cache: Path, user: str | None = None,
                cwd: Path = REPO, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """install.sh with a clean environment (only PATH, HOME, the cache and pip's set-up)."""
    home = pwd.getpwnam(user).pw_dir if user else str(Path.home())
    env = {"PATH": path, "HOME": home, "HPCDL_CACHE": str(cache), "LANG": "C.UTF-8",
           **passed_on_env()}
    command = ["env", "-i", *(f"{k}={v}" for k, v in env.items()), "bash",
               str(cwd / "install.sh"), *args]
    if user:
        command = ["runuser", "-u", user, "--", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          check=False)


@pytest.mark.parametrize(("left_out", "named", "fixes"), [
    (COMPILERS, "C/C++ compiler (cc and c++)", ("apt-get install g++", "dnf install gcc-c++",
                                   "module load gcc")),
    (MPI, "MPI (mpicc and mpirun)", ("apt-get install openmpi-bin libopenmpi-dev libpmix-dev",
                                     "dnf install openmpi-devel pmix-devel",
                                     "module load openmpi")),
    (("make",), "make (CMake's build tool)", ("apt-get install make", "dnf install make")),
])
def test_a_missing_tool_is_named_with_its_fix_before_anything_is_built(
        tmp_path: Path, left_out: tuple[str, ...], named: str, fixes: tuple[str, ...]) -> None:
    """No apt-get on PATH (not Debian): the recipe cannot install, so it says what to do."""
    cache = tmp_path / "cache"
    result = run_install("--variant", "cpu", path=path_without(tmp_path / "bin", left_out),
                         cache=cache, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == f"install.sh: missing: {named}", result.stderr
    for fix in fixes:
        assert any(fix in line for line in lines), (fix, result.stderr)
    assert "Nothing was built" in lines[-1]
    assert not cache.exists()


@pytest.fixture(scope="module")
def unprivileged_tree() -> Iterator[Path]:
    """A copy of this tree owned by an unprivileged user created for the tests (kept, so its
    pip cache makes the next run cheap), in a folder that user may write."""
    if os.geteuid() != 0:
        pytest.skip("creating a user needs root (CI runs as root)")
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", USER], check=True)
    top = Path(tempfile.mkdtemp(prefix="hpcdl-install-", dir="/tmp"))
    tree = top / "hpcdl"
    shutil.copytree(REPO, tree, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "results", "__pycache__", "*.egg-info", ".pytest_cache"))
    (top / "cache" / "wheels").mkdir(parents=True)
    for built in (CACHE / "wheels").glob("horovod-cpu-*"):  # what `make setup` compiled
        shutil.copytree(built, top / "cache" / "wheels" / built.name)
    subprocess.run(["chown", "-R", f"{USER}:{USER}", str(top)], check=True)
    yield tree
    shutil.rmtree(top)


@pytest.mark.slow
def test_an_unprivileged_user_without_apt_gets_a_working_cpu_runtime(
        unprivileged_tree: Path) -> None:
    """The cluster case: no root, no Debian tools, the tools on PATH. The venv is new, Horovod
    comes from the wheel cache (not compiled), and the runtime passes doctor and runs 2 ranks."""
    top = unprivileged_tree.parent
    path = path_without(top / "bin", ())
    result = run_install("--variant", "cpu", path=path, cache=top / "cache", user=USER,
                         cwd=unprivileged_tree, timeout=1800)
    assert result.returncode == 0, result.stderr
    assert "horovod from the wheel cache" in result.stderr, result.stderr
    assert "compiling" not in result.stderr, result.stderr
    venv_bin = unprivileged_tree / ".venv" / "bin"
    assert venv_bin.resolve().parent.parent == top / "cache"

    def as_user(*command: str) -> subprocess.CompletedProcess[str]:
        env = [f"PATH={venv_bin}:{path}", f"HOME={pwd.getpwnam(USER).pw_dir}", "LANG=C.UTF-8"]
        return subprocess.run(["runuser", "-u", USER, "--", "env", "-i", *env, *command],
                              capture_output=True, text=True, timeout=600,
                              cwd=unprivileged_tree, check=False)

    doctor = as_user("hpcdl", "doctor", "--json")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    checks = {c["name"]: c["value"] for c in json.loads(doctor.stdout)["checks"]}
    assert checks["variant"] == "cpu"
    assert "mpi=yes" in checks["horovod"] and "nccl=no" in checks["horovod"]
    ranks = as_user("mpirun", "-np", "2", "--oversubscribe", "python", "-c", ALLREDUCE)
    assert ranks.returncode == 0, ranks.stderr
    assert allreduced(ranks.stdout) == {"rank0-sum=3.0;", "rank1-sum=3.0;"}, ranks.stdout


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_gpu_variant_builds_here_with_nccl_and_a_cuda_tensorflow() -> None:
    """No GPU needed to build it. Cached by its hash like `make setup-gpu`'s: a fresh machine
    pays the download and the compile once (see the README), later runs seconds."""
    result = run_install("--variant", "gpu", "--link", ".venv-gpu", path=path_without_venvs(),
                         cache=CACHE, timeout=3500)
    assert result.returncode == 0, result.stderr
    venv_bin = REPO / ".venv-gpu" / "bin"
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    doctor = subprocess.run([str(venv_bin / "hpcdl"), "doctor", "--json"], capture_output=True,
                            text=True, timeout=600, env=env, check=False)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    checks = {c["name"]: c["value"] for c in json.loads(doctor.stdout)["checks"]}
    assert checks["variant"] == "gpu"
    assert "mpi=yes" in checks["horovod"] and "nccl=yes" in checks["horovod"], checks
    assert checks["tensorflow build"].startswith("CUDA 12."), checks
    assert "the build needs CUDA 13" in checks["nvidia driver"], checks
    ranks = subprocess.run(["mpirun", "-np", "2", "--oversubscribe", "python", "-c", ALLREDUCE],
                           capture_output=True, text=True, timeout=600, check=False,
                           env={**env, **MPI_AS_ROOT})
    assert ranks.returncode == 0, ranks.stderr
    assert allreduced(ranks.stdout) == {"rank0-sum=3.0;", "rank1-sum=3.0;"}, ranks.stdout
