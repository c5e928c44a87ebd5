"""Reading what a Slurm partition offers from sinfo's output; the refusal itself, against the
real test cluster's partitions, is in test_cluster.py."""

from __future__ import annotations

import pytest

from hpcdl import sinfo


@pytest.mark.parametrize(("gres", "gpus"), [
    ("(null)", 0), ("", 0), ("gpu:2", 2), ("gpu:a100:4(S:0-1)", 4), ("gpu:4(S:0,1)", 4),
    ("gpu:a100:2,gpu:v100:2", 4), ("shard:8,gpu:2", 2), ("gpu:tesla:8(S:0-1),mps:800", 8),
    ("mps:100", 0), ("gpumem:16G", 0),
])
def test_gpus_in_gres(gres: str, gpus: int) -> None:
    assert sinfo.gpus_in_gres(gres) == gpus


def test_no_slurm_on_path_means_no_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """A laptop or a login node without sinfo: nothing to ask, the request goes ahead."""
    monkeypatch.setenv("PATH", "/nonexistent")
    assert sinfo.partition_gpus("gpu") is None
    sinfo.check_gpus_per_node({"gpus_per_node": 64, "partition": "gpu"}, "sweep.yaml")
