"""What the Slurm cluster offers, asked of it (sinfo) before anything is submitted: a GPU
request no node of the partition can meet would otherwise pend forever ("Resources") or be
refused job by job after the first ones ran."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from typing import Any

from hpcdl.errors import ConfigError

# one GRES entry for GPUs: gpu:N or gpu:<type>:N, maybe followed by a socket list "(S:0-1)"
_GPU_GRES = re.compile(r"(?:^|,)gpu(?::[^:,()]+)?:(\d+)")


def gpus_in_gres(gres: str) -> int:
    """GPUs in a node's GRES as sinfo's %G prints it: 'gpu:2', 'gpu:a100:4(S:0-1)',
    'gpu:a100:2,gpu:v100:2', '(null)'."""
    return sum(int(count) for count in _GPU_GRES.findall(gres))


def partition_gpus(partition: str | None) -> int | None:
    """The most GPUs any node of `partition` (the default partition if None) has; None when
    sinfo cannot tell (no Slurm on this machine, controller down, unknown partition: sbatch
    then says what is wrong in its own words)."""
    try:
        shown = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%P|%G"],
                               capture_output=True, text=True, timeout=60, check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    if shown.returncode != 0:
        return None
    counts = []
    for line in shown.stdout.splitlines():
        name, _, gres = line.partition("|")
        if (name.rstrip("*") == partition) if partition else name.endswith("*"):
            counts.append(gpus_in_gres(gres))
    return max(counts) if counts else None


def check_gpus_per_node(resources: Mapping[str, Any], origin: str) -> None:
    """resources.gpus_per_node is at most what a node of the partition has, per sinfo."""
    wanted = resources["gpus_per_node"]
    if not wanted:
        return
    offered = partition_gpus(resources["partition"])
    if offered is not None and wanted > offered:
        where = f"partition {resources['partition']!r}" if resources["partition"] else (
            "the default partition")
        has = f"at most {offered} per node" if offered else "no GPUs"
        raise ConfigError(f"{origin}: resources.gpus_per_node: {wanted} GPUs per node asked, "
                          f"but the nodes of {where} have {has} (sinfo)")
