"""Secrets at rest: remote credentials and repository passphrases, encrypted in the database
with AES-256-GCM under a server key kept beside it in `server.key` (0600)."""

from __future__ import annotations

import os
import stat
from contextlib import suppress
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select

from vmkeep.errors import NotFoundError, StateError, UsageError

from .db import StateDB
from .models import Secret

KEY_FILE = "server.key"
KEY_SIZE = 32
NONCE_SIZE = 12
BLOB_VERSION = b"\x01"


class ServerKey:
    """The 32-byte key. Its repr never shows the bytes (it ends up in tracebacks and logs)."""

    __slots__ = ("_key", "path")

    def __init__(self, key: bytes, path: Path) -> None:
        self._key = key
        self.path = path

    def __repr__(self) -> str:
        return f"ServerKey({str(self.path)!r})"

    def aead(self) -> AESGCM:
        return AESGCM(self._key)

    @classmethod
    def load_or_create(cls, directory: Path) -> ServerKey:
        """Read the key, creating it on first use: written to a fresh temporary (O_EXCL |
        O_NOFOLLOW, 0600), fsynced, then hard-linked into place so a concurrent starter either
        wins or reads a complete key, never a partial one."""
        path = directory / KEY_FILE
        try:
            return cls(read_key(path), path)
        except FileNotFoundError:
            pass
        tmp = directory / f".{KEY_FILE}.tmp-{os.urandom(6).hex()}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600)
            try:
                os.write(fd, os.urandom(KEY_SIZE))
                os.fsync(fd)
            finally:
                os.close(fd)
            with suppress(FileExistsError):  # another process created it first: use theirs
                os.link(tmp, path)
        except OSError as exc:
            raise StateError(f"cannot create {path}: {exc.strerror or exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return cls(read_key(path), path)


def read_key(path: Path) -> bytes:
    """The key, refused if it is a symlink, not a regular file, readable by group or others,
    or not 32 bytes. FileNotFoundError is left for the caller (first start)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror or exc} (a symlink?)") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StateError(f"{path} is not a regular file")
        if info.st_mode & 0o077:
            raise StateError(
                f"{path} is readable by others (mode {info.st_mode & 0o777:o}); "
                f"run `chmod 600 {path}` and check who could have copied it"
            )
        key = os.read(fd, KEY_SIZE + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_SIZE:
        raise StateError(f"{path} is damaged: {len(key)} bytes instead of {KEY_SIZE}")
    return key


class SecretStore:
    """Named secrets, each sealed with a fresh random nonce and its own name as associated
    data (a blob moved to another name does not open)."""

    def __init__(self, db: StateDB, key: ServerKey | None = None) -> None:
        self.db = db
        self.key = key or ServerKey.load_or_create(db.directory)

    def __repr__(self) -> str:
        return f"SecretStore({self.db.where()!r})"

    def put_secret(self, name: str, value: bytes) -> None:
        """Insert or replace."""
        if not name:
            raise UsageError("a secret needs a name")
        nonce = os.urandom(NONCE_SIZE)
        blob = BLOB_VERSION + nonce + self.key.aead().encrypt(nonce, value, name.encode())
        with self.db.transaction() as session:
            row = session.get(Secret, name)
            if row is None:
                session.add(Secret(name=name, blob=blob))
            else:
                row.blob = blob

    def get_secret(self, name: str) -> bytes:
        with self.db.transaction() as session:
            row = session.get(Secret, name)
            blob = row.blob if row else None
        if blob is None:
            raise NotFoundError(f"no secret named {name!r}")
        if blob[:1] != BLOB_VERSION or len(blob) < 1 + NONCE_SIZE + 16:
            raise StateError(f"secret {name!r} is damaged")
        nonce, sealed = blob[1 : 1 + NONCE_SIZE], blob[1 + NONCE_SIZE :]
        try:
            return self.key.aead().decrypt(nonce, sealed, name.encode())
        except InvalidTag:
            raise StateError(
                f"secret {name!r} does not open with {self.key.path}: the key file was "
                "replaced, or the database was tampered with"
            ) from None

    def delete_secret(self, name: str) -> None:
        with self.db.transaction() as session:
            row = session.get(Secret, name)
            if row is None:
                raise NotFoundError(f"no secret named {name!r}")
            session.delete(row)

    def list_secrets(self) -> list[str]:
        """Names only (a metadata backup re-wraps the values itself)."""
        with self.db.transaction() as session:
            return list(session.scalars(select(Secret.name).order_by(Secret.name)))
