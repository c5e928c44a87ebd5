"""hpcdl/memory.py: the memory a rank may use, from real files laid out as /proc and the cgroup
v1 and v2 file systems show them, and the input mode it implies."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcdl import memory

GIB = 1 << 30
MEMINFO = "MemTotal:       32000000 kB\nMemAvailable:   16777216 kB\n"  # 16 GiB available


def write_files(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def fake_proc(tmp_path: Path, mountinfo: str, cgroup: str) -> Path:
    write_files(tmp_path / "proc", {"self/mountinfo": mountinfo, "self/cgroup": cgroup,
                                    "meminfo": MEMINFO})
    return tmp_path / "proc"


def test_cgroup_v1_limits_of_the_cgroup_and_its_ancestors(tmp_path: Path) -> None:
    mount = tmp_path / "cg" / "memory"
    mountinfo = (f"31 23 0:28 / {tmp_path / 'cg'} rw - tmpfs tmpfs rw\n"
                 f"35 31 0:32 / {mount} rw,relatime - cgroup cgroup rw,memory\n"
                 f"36 31 0:33 / {tmp_path / 'cg' / 'cpu'} rw - cgroup cgroup rw,cpu\n")
    # Slurm's job cgroup caps at 8 GiB with 3 GiB used (1 GiB of it droppable page cache); its
    # step has no limit of its own: the job's binds
    write_files(mount, {
        "memory.limit_in_bytes": str(memory.V1_UNLIMITED + 4096),
        "slurm/job_1/memory.limit_in_bytes": str(8 * GIB),
        "slurm/job_1/memory.usage_in_bytes": str(3 * GIB),
        "slurm/job_1/memory.stat": f"cache 5\ntotal_inactive_file {GIB}\n",
        "slurm/job_1/step_0/memory.limit_in_bytes": "9223372036854771712",
        "slurm/job_1/step_0/memory.usage_in_bytes": str(2 * GIB),
    })
    proc = fake_proc(tmp_path, mountinfo, "5:cpu:/\n4:memory:/slurm/job_1/step_0\n0::/\n")
    budget = memory.budget(local_ranks=3, proc=proc)
    assert budget.mem_available == 16 * GIB and budget.cgroup_headroom == 6 * GIB
    assert budget.per_rank == 2 * GIB


def test_cgroup_v2_in_a_container_whose_mount_shows_its_own_cgroup(tmp_path: Path) -> None:
    mount = tmp_path / "unified"
    mountinfo = f"41 31 0:38 /kubepods/pod7 {mount} rw,relatime - cgroup2 cgroup2 rw\n"
    write_files(mount, {
        "memory.max": str(2 * GIB), "memory.current": str(GIB // 2),
        "memory.stat": "anon 1\ninactive_file 0\n",
        "rank/memory.max": "max", "rank/memory.current": str(GIB // 4),
    })
    proc = fake_proc(tmp_path, mountinfo, "0::/kubepods/pod7/rank\n")
    budget = memory.budget(local_ranks=2, proc=proc)
    assert budget.cgroup_headroom == GIB + GIB // 2 and budget.per_rank == 3 * GIB // 4


def test_no_cgroup_limit_leaves_mem_available(tmp_path: Path) -> None:
    mount = tmp_path / "memory"
    write_files(mount, {"memory.limit_in_bytes": "9223372036854771712"})
    proc = fake_proc(tmp_path, f"35 31 0:32 / {mount} rw - cgroup cgroup rw,memory\n",
                     "4:memory:/\n")
    budget = memory.budget(local_ranks=4, proc=proc)
    assert budget.cgroup_headroom is None and budget.per_rank == 4 * GIB


def test_this_machine_has_a_budget() -> None:
    assert memory.budget(local_ranks=1).per_rank > 0


@pytest.mark.parametrize(("requested", "shard_mb", "mode"), [
    ("auto", 400, "memory"), ("auto", 600, "stream"), ("memory", 5000, "memory"),
    ("stream", 1, "stream")])
def test_auto_streams_a_shard_over_half_the_budget(requested: str, shard_mb: int,
                                                   mode: str) -> None:
    choice = memory.choose_input(requested, shard_mb << 20, 1000 << 20, rank=1)
    assert choice.mode == mode and choice.rank == 1 and choice.requested == requested
    assert choice.as_dict()["shard_mb"] == shard_mb and choice.per_rank_mb == 1000
