"""A full disk, a read-only file system, a corrupt file: one clear line, nothing half-done.
The file systems are real (a small tmpfs, remounted read-only), hence root."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkeep.engine.state import JobSpec, JobStore, Ledger, ScheduleSpec, StateDB
from vmkeep.errors import StateError

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\xff" * 4096):
            pass
    except OSError:
        pass  # full
    finally:
        os.close(fd)
    return filler


@needs_root
def test_a_full_disk_fails_cleanly_and_applies_nothing(small_fs: Path) -> None:
    db = StateDB.open(small_fs / "data")
    store = JobStore(db)
    store.put_job("keep", "backup", {"v": 1})
    filler = fill(small_fs)
    big = JobSpec("big", "backup", {"blob": "x" * 400_000}, [ScheduleSpec("s", "0 1 * * *")])
    with pytest.raises(StateError) as err:
        store.apply([JobSpec("keep", "backup", {"v": 2}), big])
    assert "the disk is full" in str(err.value) and "\n" not in str(err.value)
    assert str(small_fs / "data" / "vmkeep.db") in str(err.value)
    filler.unlink()
    assert [(j.name, j.spec) for j in store.list_jobs()] == [("keep", {"v": 1})]
    db.close()


@needs_root
def test_a_read_only_database_is_one_clear_line(small_fs: Path) -> None:
    db = StateDB.open(small_fs / "data")
    run = Ledger(db).create_run("j", None, "manual")
    db.close()
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    with pytest.raises(StateError) as err:
        db = StateDB.open(small_fs / "data")
        Ledger(db).finish_run(run, "failed")
    message = str(err.value)
    assert message.startswith("state database ") and "\n" not in message
    assert message.endswith(": the file system is read-only")


def test_a_corrupt_database_file_is_named(data_dir: Path) -> None:
    data_dir.mkdir(mode=0o700)
    (data_dir / "vmkeep.db").write_bytes(b"this is not SQLite\n" * 300)
    with pytest.raises(StateError, match=r"vmkeep\.db: the file is not a valid database"):
        StateDB.open(data_dir)
