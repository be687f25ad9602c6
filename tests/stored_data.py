"""What a repository stores as data, whatever its format: formats 1/2 keep one object per
chunk under chunks/, format 3 keeps blocks and recipes in pack objects under packs/. Tests
about behaviour (verify, restore, gc, mirror) count or damage "a stored data object" through
these helpers so that they hold for either format."""

from __future__ import annotations

import json
from pathlib import Path

DATA_DIRS = ("chunks", "packs")
# Formats a behaviour test runs on: one object per chunk, and blocks in packs.
BOTH_FORMATS = ("1", "3")


def repo_format(repo: Path) -> int:
    """The repository's format version, from its (plaintext JSON) config."""
    return int(json.loads((repo / "config").read_bytes())["version"])


def data_objects(repo: Path) -> list[Path]:
    """Every stored data object (and data object being written), in name order."""
    found = [p for d in DATA_DIRS if (repo / d).is_dir() for p in (repo / d).rglob("*")]
    return sorted(p for p in found if p.is_file())


def data_names(repo: Path) -> set[str]:
    """The names of the stored data objects (temp files of running writes left out)."""
    return {p.name for p in data_objects(repo) if not p.name.startswith(".tmp")}


def data_bytes(repo: Path) -> int:
    """Bytes of all stored data objects."""
    return sum(p.stat().st_size for p in data_objects(repo))


def flip_byte(path: Path, offset: int = -20) -> None:
    """Damage one stored object in place (an authenticated or hashed byte either way)."""
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0xFF
    path.write_bytes(bytes(blob))
