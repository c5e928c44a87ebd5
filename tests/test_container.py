"""containers/hpcdl.def, built the way `apptainer build` builds it, without Apptainer.

Apptainer cannot be installed here (../shared/notes/image-emulation.md), so these tests do what
it does for this definition: a Debian 12 root from `debootstrap` (the definition's header), its
`%files` copied in, its `%post` run in that root (chroot, /proc /sys /dev bound, a clean
environment) and its `%test` run there. Everything is read from hpcdl.def itself, so the tests
cannot drift from the file users build. The finished root is cached by a hash of the header,
%post, the recipe and the pins; each test runs in an overlay on it, copies the current %files
and reruns %post (cheap once built: the recipe finds its venv), then %test.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEFINITION = REPO / "containers" / "hpcdl.def"
CACHE = Path(os.environ.get("HPCDL_CACHE")
             or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hpcdl")
# Only this harness needs them: this machine's HTTPS proxy re-signs certificates with its own CA.
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MPI_AS_ROOT = ("OMPI_ALLOW_RUN_AS_ROOT=1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1",
               "OMPI_MCA_rmaps_base_oversubscribe=1",
               "OMPI_MCA_btl_vader_single_copy_mechanism=none")

# pip in the root verifies against the CA bundle with this machine's CA added (bootstrap()).
HARNESS_ENV = ("PIP_CERT=/etc/ssl/certs/ca-certificates.crt",)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def parse_definition(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """The header (`Key: value` lines) and the sections (`%name` -> body) of a definition."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if match := re.match(r"^%(\w+)\s*$", line):
            current = sections.setdefault(match.group(1), [])
        elif current is not None:
            current.append(line)
        elif match := re.match(r"^(\w+):\s*(.*?)\s*$", line):
            header[match.group(1)] = match.group(2)
    return header, {name: "\n".join(body).strip() + "\n" for name, body in sections.items()}


def file_pairs(files_section: str) -> list[tuple[str, str]]:
    """%files lines: `source [destination]`, the destination defaulting to the source."""
    pairs = []
    for line in files_section.splitlines():
        words = line.split("#")[0].split()
        if words:
            pairs.append((words[0], words[1] if len(words) > 1 else words[0]))
    return pairs


def copy_files(pairs: list[tuple[str, str]], root: Path) -> None:
    for source, destination in pairs:
        target = root / destination.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / source).is_dir():
            shutil.copytree(REPO / source, target, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / source, target)


@contextmanager
def mounted(root: Path) -> Iterator[None]:
    """What Apptainer gives a build: /proc, /sys, /dev, a /dev/shm tmpfs, the host's DNS."""
    shutil.copy2("/etc/resolv.conf", root / "etc" / "resolv.conf")
    done: list[Path] = []
    try:
        for name in ("proc", "sys", "dev"):
            subprocess.run(["mount", "--rbind", f"/{name}", str(root / name)], check=True)
            done.append(root / name)
            # slave, so mounts below (the /dev/shm tmpfs) and unmounts never reach the host's
            subprocess.run(["mount", "--make-rslave", str(root / name)], check=True)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(root / "dev" / "shm")], check=True)
        done.append(root / "dev" / "shm")
        yield
    finally:
        for path in reversed(done):
            subprocess.run(["umount", "-R", "-l", str(path)], check=False)


def in_root(root: Path, script: str, *env: str, timeout: float = 3000,
            shell: str = "/bin/sh") -> subprocess.CompletedProcess[str]:
    """A definition's section run in the root as Apptainer runs it: a clean environment (no host
    PIP_* variables), /bin/sh -e so a failing line fails the section."""
    return subprocess.run(["env", "-i", f"PATH={CHROOT_PATH}", "HOME=/root", "LANG=C.UTF-8",
                           *env, "chroot", str(root), shell, "-ec", script],
                          capture_output=True, text=True, timeout=timeout, check=False)


def root_key(header: dict[str, str], sections: dict[str, str]) -> str:
    """What the cached root depends on: the definition's base and %post, the recipe, the pins,
    debootstrap's version. Not hpcdl's code: each test copies that in again."""
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "debootstrap"],
                             capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256(repr(sorted(header.items())).encode() + sections["post"].encode()
                            + sections["files"].encode() + version.encode())
    for name in ("install.sh", "requirements.lock", "requirements-gpu.txt"):
        digest.update((REPO / name).read_bytes())
    return digest.hexdigest()[:16]


def bootstrap(header: dict[str, str], root: Path) -> None:
    """The definition's `Bootstrap: debootstrap` header, then this machine's CA certificates."""
    assert header["Bootstrap"] == "debootstrap", header
    include = [f"--include={header['Include'].replace(' ', ',')}"] if "Include" in header else []
    subprocess.run(["debootstrap", "--variant=minbase", *include, header["OSVersion"], str(root),
                    header["MirrorURL"]], check=True, capture_output=True, timeout=1200)
    for cert in HOST_CA_DIR.glob("*.crt"):
        shutil.copy2(cert, root / HOST_CA_DIR.relative_to("/") / cert.name)
    result = in_root(root, "update-ca-certificates")
    assert result.returncode == 0, result.stderr


def seed_wheel_cache(root: Path) -> None:
    """The host's Horovod gpu wheels, where %post's install.sh looks (same Debian, Python, MPI
    and pins, so the same key): the image installs the wheel the venv was built from."""
    wheels = root / "root" / ".cache" / "hpcdl" / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for built in (CACHE / "wheels").glob("horovod-gpu-*"):
        if not (wheels / built.name).exists():
            shutil.copytree(built, wheels / built.name)


@pytest.fixture(scope="module")
def definition() -> tuple[dict[str, str], dict[str, str]]:
    return parse_definition(DEFINITION.read_text())


@pytest.fixture(scope="module")
def built_root(definition: tuple[dict[str, str], dict[str, str]]) -> Path:
    """The image's root after %files and %post, built once per key (into a temporary folder,
    renamed when done, so an interrupted build is never taken for a finished one)."""
    if os.geteuid() != 0 or not shutil.which("debootstrap"):
        pytest.skip("needs root and debootstrap (make test installs it: .ci/test-prereqs.sh)")
    header, sections = definition
    root = CACHE / "image-roots" / f"debian12-{root_key(header, sections)}"
    if (root / ".hpcdl-built").exists():
        return root
    tmp = root.with_name(root.name + ".tmp")
    if tmp.exists():
        subprocess.run(["umount", "-R", "-l", str(tmp / "proc")], check=False)
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    bootstrap(header, tmp)
    seed_wheel_cache(tmp)
    copy_files(file_pairs(sections["files"]), tmp)
    with mounted(tmp):
        post = in_root(tmp, sections["post"], *HARNESS_ENV)
    assert post.returncode == 0, post.stdout[-3000:] + post.stderr[-6000:]
    (tmp / ".hpcdl-built").touch()
    tmp.rename(root)
    for stale in root.parent.glob("debian12-*"):  # roots of older definitions: GBs each
        if stale != root and (stale / ".hpcdl-built").exists():
            shutil.rmtree(stale)
    return root


@pytest.fixture()
def image(built_root: Path, definition: tuple[dict[str, str], dict[str, str]],
          tmp_path: Path) -> Iterator[Path]:
    """A throwaway overlay on the built root with this tree's %files and %post applied: the
    image `apptainer build` would make from the definition as it is now."""
    _, sections = definition
    upper, work, merged = (tmp_path / name for name in ("upper", "work", "merged"))
    for path in (upper, work, merged):
        path.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={built_root},upperdir={upper},workdir={work}", str(merged)],
                   check=True)
    try:
        copy_files(file_pairs(sections["files"]), merged)
        with mounted(merged):
            post = in_root(merged, sections["post"], *HARNESS_ENV)
            assert post.returncode == 0, post.stdout[-3000:] + post.stderr[-6000:]
            yield merged
    finally:
        subprocess.run(["umount", "-l", str(merged)], check=False)


def environment(sections: dict[str, str]) -> str:
    """%environment, as Apptainer sources it before %test and every exec."""
    return sections.get("environment", "")


def test_the_images_test_section_passes(image: Path,
                                        definition: tuple[dict[str, str], dict[str, str]]) -> None:
    _, sections = definition
    result = in_root(image, environment(sections) + sections["test"])
    assert result.returncode == 0, result.stdout + result.stderr
    doctor = in_root(image, environment(sections) + "hpcdl doctor --json")
    assert doctor.returncode == 0, doctor.stderr
    assert '"value": "gpu"' in doctor.stdout
    assert "nccl=yes" in doctor.stdout and "mpi=yes" in doctor.stdout


def test_two_ranks_train_the_smoke_config_inside_the_image(
        image: Path, definition: tuple[dict[str, str], dict[str, str]]) -> None:
    """The hybrid model's inside half: the image's Open MPI starts 2 ranks of hpcdl train."""
    _, sections = definition
    config = "--config /opt/hpcdl/configs/smoke.yaml --set results_dir=/tmp/results"
    script = (environment(sections) + f"cd /tmp && hpcdl prepare {config} && mpirun -np 2 "
              f"hpcdl train {config} --set epochs=2 --out /tmp/results/run.h5 "
              "&& test -s /tmp/results/run.h5")
    result = in_root(image, script, *MPI_AS_ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
