"""BPF C sources of mipmobike, shipped as package data (compiled at run time by bcc)."""

from __future__ import annotations

import pathlib

DIR = pathlib.Path(__file__).resolve().parent


def path(name: str) -> pathlib.Path:
    """Absolute path of a source file in this package (e.g. ``gate.c``)."""
    p = DIR / name
    if not p.is_file():
        raise FileNotFoundError(f"no BPF source {name!r} in {DIR}")
    return p


def read_bytes(name: str) -> bytes:
    return path(name).read_bytes()
