"""Secrets are encrypted at rest under server.key, which must stay private."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from vmkeep.engine.state import SecretStore, ServerKey, StateDB
from vmkeep.errors import NotFoundError, StateError

PLAINTEXT = b"s3cr3t-passphrase-that-must-never-leak"


def test_secrets_round_trip_and_are_never_stored_in_clear(db: StateDB, data_dir: Path) -> None:
    store = SecretStore(db)
    store.put_secret("repo/nas/passphrase", PLAINTEXT)
    store.put_secret("remote/s3/AWS_SECRET_ACCESS_KEY", PLAINTEXT + b"2")
    assert store.get_secret("repo/nas/passphrase") == PLAINTEXT
    assert store.list_secrets() == ["remote/s3/AWS_SECRET_ACCESS_KEY", "repo/nas/passphrase"]
    db.close()
    for path in data_dir.iterdir():  # the database, its WAL, the key: none holds the text
        if path.is_file():
            assert PLAINTEXT not in path.read_bytes(), path
    dump = subprocess.run(
        ["sqlite3", str(data_dir / "vmkeep.db"), ".dump"], capture_output=True, check=True
    ).stdout
    assert b"INSERT INTO secrets" in dump and b"repo/nas/passphrase" in dump
    assert PLAINTEXT not in dump and PLAINTEXT.hex().encode() not in dump.lower()
    assert "s3cr3t" not in repr(store) and "s3cr3t" not in repr(store.key)


def test_replace_and_delete(db: StateDB) -> None:
    store = SecretStore(db)
    store.put_secret("a", b"one")
    store.put_secret("a", b"two")
    assert store.get_secret("a") == b"two"
    store.delete_secret("a")
    with pytest.raises(NotFoundError):
        store.get_secret("a")
    with pytest.raises(NotFoundError):
        store.delete_secret("a")


def test_each_secret_is_bound_to_its_name(db: StateDB) -> None:
    """A blob copied under another name (someone with write access to the DB) does not open."""
    store = SecretStore(db)
    store.put_secret("a", PLAINTEXT)
    with db.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO secrets (name, blob, created, updated) "
            "SELECT 'b', blob, created, updated FROM secrets WHERE name = 'a'"
        )
    with pytest.raises(StateError, match="does not open"):
        store.get_secret("b")


def test_another_key_cannot_read_them(db: StateDB, data_dir: Path) -> None:
    SecretStore(db).put_secret("a", PLAINTEXT)
    (data_dir / "server.key").unlink()
    with pytest.raises(StateError, match=r"'a' does not open with .*server\.key"):
        SecretStore(db).get_secret("a")  # a fresh key was made, the old secrets stay sealed


def test_key_file_is_created_0600_with_32_bytes(data_dir: Path) -> None:
    data_dir.mkdir()
    old = os.umask(0)  # a lax umask must not loosen the key
    try:
        key = ServerKey.load_or_create(data_dir)
    finally:
        os.umask(old)
    info = (data_dir / "server.key").lstat()
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_size == 32
    assert [p.name for p in data_dir.iterdir()] == ["server.key"]  # no temporary left
    again = ServerKey.load_or_create(data_dir)
    nonce = b"\0" * 12
    assert key.aead().encrypt(nonce, b"x", None) == again.aead().encrypt(nonce, b"x", None)


@pytest.mark.parametrize("mode", [0o640, 0o604])
def test_a_key_readable_by_others_is_refused(data_dir: Path, mode: int) -> None:
    data_dir.mkdir()
    ServerKey.load_or_create(data_dir)
    os.chmod(data_dir / "server.key", mode)
    with pytest.raises(StateError, match=f"readable by others \\(mode {mode:o}\\)"):
        ServerKey.load_or_create(data_dir)


def test_a_symlinked_or_damaged_key_is_refused(data_dir: Path, tmp_path: Path) -> None:
    data_dir.mkdir()
    elsewhere = tmp_path / "planted"
    elsewhere.write_bytes(os.urandom(32))
    elsewhere.chmod(0o600)
    (data_dir / "server.key").symlink_to(elsewhere)
    with pytest.raises(StateError, match="symlink"):
        ServerKey.load_or_create(data_dir)
    (data_dir / "server.key").unlink()
    (data_dir / "server.key").write_bytes(b"short")
    (data_dir / "server.key").chmod(0o600)
    with pytest.raises(StateError, match="damaged: 5 bytes"):
        ServerKey.load_or_create(data_dir)
