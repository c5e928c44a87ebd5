"""Memory this rank may use on its node, and the input mode (`train.input`) it implies.

What a rank may use is the least of what the kernel would still give its processes: the node's
MemAvailable and, for every cgroup the process is in (Slurm's job/step cgroups, a container's),
its limit less what is in use (page cache that can be dropped not counted as used). cgroup v1
(memory controller) and v2 (unified) are both read; every ancestor up to the mount counts,
since a parent's limit binds its children. Split evenly over the node's ranks: they start
together and each holds its own shard.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("hpcdl.memory")

INPUT_MODES = ("memory", "stream", "auto")
# auto streams when the shard would take more than this share of the memory a rank may use:
# the rest is for TensorFlow itself (~300 MB a rank on CPU), the model, val/test and the batches
AUTO_STREAM_FRACTION = 0.5
# a v1 limit at or above this is "no limit" (the kernel writes PAGE_COUNTER_MAX pages in bytes)
V1_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class CgroupMount:
    """One mounted cgroup hierarchy that carries the memory controller."""

    version: int  # 1 or 2
    mount_point: Path
    root: str  # the hierarchy path the mount shows at mount_point (/ outside containers)


def memory_mounts(mountinfo: str) -> list[CgroupMount]:
    """The cgroup v1 memory mount and the v2 mount listed in /proc/self/mountinfo's text."""
    mounts = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 10:
            continue
        after = fields[fields.index("-") + 1:]
        fstype, options = after[0], after[2].split(",") if len(after) > 2 else []
        if fstype == "cgroup2":
            mounts.append(CgroupMount(2, Path(fields[4]), fields[3]))
        elif fstype == "cgroup" and "memory" in options:
            mounts.append(CgroupMount(1, Path(fields[4]), fields[3]))
    return mounts


def cgroup_paths(proc_cgroup: str) -> dict[int, str]:
    """{1: path in the v1 memory hierarchy, 2: path in the unified one} from /proc/self/cgroup."""
    paths = {}
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            paths[2] = path
        elif "memory" in controllers.split(","):
            paths[1] = path
    return paths


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text in ("", "max") else int(text)


def _reclaimable(stat_file: Path, key: str) -> int:
    """Inactive page cache of a cgroup: charged to it, dropped before anything is killed."""
    try:
        for line in stat_file.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except OSError:
        pass
    return 0


def cgroup_headroom(mount: CgroupMount, path: str) -> int | None:
    """Bytes the cgroup at `path` and each ancestor (up to the mount) can still be charged;
    the least of them, or None when none of them has a limit."""
    relative = path[len(mount.root):] if path.startswith(mount.root) else path
    directory = mount.mount_point / relative.lstrip("/")
    limit_name, usage_name, stat_key = (
        ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        if mount.version == 1 else ("memory.max", "memory.current", "inactive_file"))
    headrooms = []
    while True:
        limit = _read_int(directory / limit_name)
        if limit is not None and not (mount.version == 1 and limit >= V1_UNLIMITED):
            usage = _read_int(directory / usage_name) or 0
            used = usage - _reclaimable(directory / "memory.stat", stat_key)
            headrooms.append(max(0, limit - max(0, used)))
        if directory == mount.mount_point or mount.mount_point not in directory.parents:
            break
        directory = directory.parent
    return min(headrooms, default=None)


def mem_available(meminfo: str) -> int:
    """MemAvailable of /proc/meminfo's text, in bytes."""
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise ValueError("/proc/meminfo has no MemAvailable line")


@dataclass(frozen=True)
class Budget:
    """Memory this rank may use: the node's, the cgroups', and its share of the least."""

    mem_available: int
    cgroup_headroom: int | None
    local_ranks: int

    @property
    def per_rank(self) -> int:
        node = min(self.mem_available, self.cgroup_headroom or self.mem_available)
        return node // max(1, self.local_ranks)


def budget(local_ranks: int, proc: Path = Path("/proc")) -> Budget:
    """This process's memory budget, read from `proc` (self/mountinfo, self/cgroup, meminfo)."""
    mounts = memory_mounts((proc / "self" / "mountinfo").read_text())
    paths = cgroup_paths((proc / "self" / "cgroup").read_text())
    headrooms = [h for m in mounts if m.version in paths
                 if (h := cgroup_headroom(m, paths[m.version])) is not None]
    return Budget(mem_available((proc / "meminfo").read_text()), min(headrooms, default=None),
                  local_ranks)


@dataclass(frozen=True)
class InputChoice:
    """How one rank reads its training rows, and why: the run file's `input`, one per rank."""

    rank: int
    requested: str
    mode: str  # "memory" or "stream"
    shard_mb: float
    per_rank_mb: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def choose_input(requested: str, shard_bytes: int, per_rank_bytes: int, rank: int) -> InputChoice:
    """memory or stream for this rank: `requested` unless auto, then stream when the shard takes
    more than AUTO_STREAM_FRACTION of what the rank may use."""
    mode = requested
    if requested == "auto":
        too_big = shard_bytes > AUTO_STREAM_FRACTION * per_rank_bytes
        mode = "stream" if too_big else "memory"
    mb = 1 << 20
    return InputChoice(rank, requested, mode, round(shard_bytes / mb, 1),
                       round(per_rank_bytes / mb, 1))
