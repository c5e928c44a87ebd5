"""The dataset sources `hpcdl prepare` can read, as names only: data.py dispatches on them and
config.py checks a config against them without importing data.py (which imports config.py,
h5py and numpy)."""

from __future__ import annotations

# datasets known by name (where their files come from is dataset.source_dir / --source)
NAMED = ("fashion_mnist", "mnist", "digits")
# a user's own arrays: KIND:FILE
FILE_KINDS = ("npz", "hdf5", "h5")
SPECS = "fashion_mnist, mnist, digits, npz:FILE or hdf5:FILE"


def file_kind(spec: str) -> str | None:
    """'npz' or 'hdf5' for a KIND:FILE spec naming a file, else None."""
    kind, _, file = spec.partition(":")
    if kind in FILE_KINDS and file:
        return "npz" if kind == "npz" else "hdf5"
    return None


def source_problem(spec: str) -> str | None:
    """Why `spec` names no source `hpcdl prepare` can read (None if it names one). Whether its
    files exist is prepare's to say: the dataset file may have been written already."""
    if spec in NAMED or file_kind(spec):
        return None
    return f"unknown dataset {spec!r}; expected {SPECS}"
