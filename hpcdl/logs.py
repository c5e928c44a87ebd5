"""Log format: every line of a multi-rank job says which rank (and host) wrote it."""

from __future__ import annotations

import logging
import sys


def configure(
    rank: int | None = None,
    size: int | None = None,
    host: str | None = None,
    level: int = logging.INFO,
) -> None:
    """Send hpcdl's log lines to stderr, prefixed with rank/size@host when running under MPI."""
    where = f" [rank {rank}/{size}{'@' + host if host else ''}]" if rank is not None else ""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s{where} %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    # TensorFlow logs through absl's Python logger at INFO, e.g. "Sharding callback duration"
    # after every checkpoint write (each epoch): its warnings and errors are enough
    logging.getLogger("absl").setLevel(logging.WARNING)
