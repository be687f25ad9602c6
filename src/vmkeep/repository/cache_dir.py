"""Where vmkeep keeps what it may cache about a repository on this machine: one directory
per repository id (point summaries in `points`, the format 3 blob index in `blobindex` and
index objects waiting to be merged into it in `index/`), so that removing a repository's
cache is removing one directory."""

from __future__ import annotations

import os
import re
from pathlib import Path

import blake3

CACHE_ENV = "VMKEEP_CACHE_DIR"  # overrides the cache directory; "off" disables the cache
_SAFE_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


def cache_root() -> Path | None:
    """$VMKEEP_CACHE_DIR, else $XDG_CACHE_HOME/vmkeep, else ~/.cache/vmkeep; None: off."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit == "off":
        return None
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vmkeep"


def repository_cache(root: Path, repo_id: str) -> Path:
    """The repository's own directory under `root`. A hostile config's id must not name a
    path: anything but a plain token is hashed."""
    name = repo_id if _SAFE_ID.fullmatch(repo_id) else blake3.blake3(repo_id.encode()).hexdigest()
    return root / name
