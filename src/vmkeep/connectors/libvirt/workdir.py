"""The private directory of one live backup job: the NBD socket and the scratch files are
created by QEMU, which runs as an unprivileged user (libvirt-qemu on Debian), so they live under
/var/lib/libvirt/qemu in a directory that user owns (LIBVIRT-NOTES §4). Short names: a unix
socket path must stay under 108 bytes."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import time
from pathlib import Path

from vmkeep.errors import ConnectorError

ROOT = Path("/var/lib/libvirt/qemu")
PREFIX = "vmkeep-"
QEMU_USERS = ("libvirt-qemu", "qemu")  # Debian/Ubuntu, Fedora/RHEL


def make_workdir(root: Path = ROOT) -> Path:
    """A new empty directory `root/vmkeep-<random>` QEMU can create files in."""
    path = root / f"{PREFIX}{secrets.token_hex(6)}"
    try:
        path.mkdir(mode=0o750)
    except OSError as exc:
        raise ConnectorError(
            f"cannot create the backup work directory {path}: {exc.strerror} "
            "(live backups need root on the libvirt host)"
        ) from None
    try:
        for user in QEMU_USERS:
            with contextlib.suppress(KeyError):
                pw = pwd.getpwnam(user)
                os.chown(path, pw.pw_uid, pw.pw_gid)
                break
        else:  # unknown QEMU user: let anyone create files, nobody else can list them
            path.chmod(0o1733)
    except OSError as exc:
        shutil.rmtree(path, ignore_errors=True)
        raise ConnectorError(f"cannot prepare {path}: {exc.strerror}") from None
    return path


def remove_workdir(path: Path, wait_for: list[Path], timeout: float = 15.0) -> bool:
    """Wait (bounded) for libvirt to delete the scratch files it removes asynchronously after
    the job ends, then remove the directory with whatever is left (a stale socket after the
    VM stopped). True when the directory is gone."""
    deadline = time.monotonic() + timeout
    while any(p.exists() for p in wait_for) and time.monotonic() < deadline:
        time.sleep(0.05)
    shutil.rmtree(path, ignore_errors=True)
    return not path.exists()
