"""Where vmkeep keeps its state: one directory, private to its owner."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from vmkeep.errors import StateError

DATA_DIR_ENV = "VMKEEP_DATA_DIR"
DATABASE_URL_ENV = "VMKEEP_DATABASE_URL"
DATABASE_FILE = "vmkeep.db"
SYSTEM_DATA_DIR = Path("/var/lib/vmkeep")


def data_dir() -> Path:
    """`VMKEEP_DATA_DIR`, else /var/lib/vmkeep for root and ~/.local/share/vmkeep (honouring
    XDG_DATA_HOME) for anyone else."""
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        return Path(configured)
    if os.geteuid() == 0:
        return SYSTEM_DATA_DIR
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "vmkeep"


def ensure_data_dir(path: Path) -> Path:
    """Create the directory 0700 (parents too); an existing one must be a real directory that
    only its owner can enter, since it holds the server key and the secrets."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.lstat()
    except OSError as exc:
        raise StateError(f"cannot create data directory {path}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise StateError(f"data directory {path} is not a directory (a symlink?)")
    if info.st_mode & 0o077:
        try:
            os.chmod(path, 0o700)
        except OSError as exc:
            raise StateError(
                f"data directory {path} is open to others (mode {info.st_mode & 0o777:o}) "
                f"and cannot be tightened: {exc.strerror or exc}"
            ) from None
    return path


def database_url(directory: Path) -> str:
    """`VMKEEP_DATABASE_URL` (e.g. postgresql+psycopg://...), else SQLite in the data dir."""
    return os.environ.get(DATABASE_URL_ENV) or f"sqlite:///{directory / DATABASE_FILE}"
