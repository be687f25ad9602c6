"""The private directory of one backup run: the NBD socket and the scratch files are created by
QEMU, which runs as an unprivileged user (libvirt-qemu on Debian), so they live under
/var/lib/libvirt/qemu in a directory that user owns (LIBVIRT-NOTES §4). Short names: a unix
socket path must stay under 108 bytes.

Each directory holds an owner marker (`owner.json`: pid, domain uuid, the checkpoint the run
creates) that the creating process keeps flock()ed until the directory is removed. A run killed
with SIGKILL leaves the directory behind with its lock released: that, and only that, is what
`stale_workdirs` reports, so a live run's directory is never taken for a stale one (the lock is
per open file, so even another session of the same process counts as alive).

A live backup over a remote URI has no run directory on the hypervisor, but makes one here all
the same as its owner record (marker fields `uri`: the libvirt URI, `host`: which hypervisor it
reaches, plus its remote scratch files): `stale_workdirs(uri=..., host=...)` finds the dead ones
for the clean-up of runs over that URI or host (remote_runs.py), and the local clean-up never
sees them."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import re
import secrets
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vmkeep.errors import ConnectorError

ROOT = Path("/var/lib/libvirt/qemu")
PREFIX = "vmkeep-"
NAME_RE = re.compile(r"vmkeep-[0-9a-f]{12}")  # never vmkeep-test-* or other tools' dirs
MARKER = "owner.json"
UNMARKED_GRACE = 3600.0  # a dir without marker younger than this may be one being created
QEMU_USERS = ("libvirt-qemu", "qemu")  # Debian/Ubuntu, Fedora/RHEL

_held: dict[Path, int] = {}  # workdir -> fd of its locked marker, for this process's runs
_held_lock = threading.Lock()


@dataclass(frozen=True)
class StaleWorkdir:
    """A run's directory whose process is gone, with what its marker says."""

    path: Path
    domain_uuid: str
    checkpoint: str | None
    volumes: tuple[tuple[str, str], ...] = ()  # (pool, volume) a restore was creating
    owner: Mapping[str, object] = field(default_factory=dict, compare=False)  # the marker


def make_workdir(
    root: Path = ROOT,
    owner: Mapping[str, object] | None = None,
    *,
    for_qemu: bool = True,
    name: str | None = None,
) -> Path:
    """A new empty directory `root/vmkeep-<random>` QEMU can create files in (unless not
    `for_qemu`: a remote run's record), marked and locked as this process's (`owner`: what a
    later cleanup needs, e.g. domain uuid, checkpoint)."""
    path = root / (name or f"{PREFIX}{secrets.token_hex(6)}")
    try:
        path.mkdir(mode=0o750)
    except OSError as exc:
        raise ConnectorError(
            f"cannot create the backup work directory {path}: {exc.strerror} "
            "(backups through libvirt need root on the libvirt host)"
        ) from None
    try:
        _mark(path, owner or {})
        for user in QEMU_USERS if for_qemu else ():
            with contextlib.suppress(KeyError):
                pw = pwd.getpwnam(user)
                os.chown(path, pw.pw_uid, pw.pw_gid)
                break
        else:  # unknown QEMU user: let anyone create files, nobody else can list them
            if for_qemu:
                path.chmod(0o1733)
    except OSError as exc:
        _release(path)
        shutil.rmtree(path, ignore_errors=True)
        raise ConnectorError(f"cannot prepare {path}: {exc.strerror}") from None
    return path


def reclaim_workdir(path: Path, owner: Mapping[str, object] | None = None) -> Path:
    """The run directory `path` again, for a run that resumes a dead one's work at the same
    paths (instant restore: QEMU's images name sockets in it). A live run's directory is
    refused; a dead run's is emptied first."""
    if not is_workdir(path):
        raise ConnectorError(f"{path} is not one of vmkeep's run directories")
    if path.exists():
        if _stale_owner(path) is None:
            raise ConnectorError(f"{path} belongs to a vmkeep run that is still going")
        shutil.rmtree(path, ignore_errors=True)
    return make_workdir(path.parent, owner, name=path.name)


def _mark(path: Path, owner: Mapping[str, object]) -> None:
    """Write the marker and keep it locked (root-owned 0600: QEMU needs no access)."""
    fd = os.open(path / MARKER, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps({"pid": os.getpid(), **owner}).encode())
    except BaseException:
        os.close(fd)
        raise
    with _held_lock:
        _held[path] = fd


def _release(path: Path) -> None:
    with _held_lock:
        fd = _held.pop(path, None)
    if fd is not None:
        os.close(fd)


def remove_workdir(path: Path, wait_for: list[Path], timeout: float = 15.0) -> bool:
    """Wait (bounded) for libvirt to delete the scratch files it removes asynchronously after
    the job ends, then remove the directory with whatever is left (a stale socket after the
    VM stopped) and release its lock. True when the directory is gone."""
    deadline = time.monotonic() + timeout
    while any(p.exists() for p in wait_for) and time.monotonic() < deadline:
        time.sleep(0.05)
    shutil.rmtree(path, ignore_errors=True)
    _release(path)
    return not path.exists()


def abandon_workdir(path: Path, checkpoint: str | None) -> None:
    """Leave the directory to the next run's cleanup (libvirt is unreachable, so the job cannot
    be ended now): rewrite the marker with the checkpoint that cleanup may delete (None when a
    restore point was saved with it) and release the lock, which makes the directory stale."""
    update_marker(path, {"checkpoint": checkpoint, "abandoned_by": os.getpid()})
    _release(path)


def update_marker(path: Path, fields: Mapping[str, object]) -> None:
    """Merge `fields` into the marker of a directory this process holds (e.g. what a started
    job turned out to be); quietly nothing for one it does not hold."""
    with _held_lock:
        fd = _held.get(path)
    if fd is None:
        return
    try:
        owner = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        owner = {}
    owner = owner if isinstance(owner, dict) else {}
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({**owner, **fields}).encode(), 0)


def stale_workdirs(root: Path = ROOT, uri: str = "", host: str = "") -> list[StaleWorkdir]:
    """Directories of vmkeep runs that died (their marker lock is free), oldest first: of
    local runs, or with `uri` the records of runs over that remote libvirt URI, or over any
    URI reaching the same `host` (marker field `host`, Connection.host_id)."""
    found: list[tuple[float, StaleWorkdir]] = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return []
    for path in entries:
        if not NAME_RE.fullmatch(path.name) or not path.is_dir():
            continue
        owner = _stale_owner(path)
        if owner is None:
            continue
        same_uri = str(owner.get("uri") or "") == uri
        if not same_uri and not (uri and host and owner.get("host") == host):
            continue
        with contextlib.suppress(OSError):
            cp = owner.get("checkpoint")
            stale = StaleWorkdir(
                path,
                str(owner.get("domain_uuid", "")),
                str(cp) if cp else None,
                _volumes(owner.get("volumes")),
                owner,
            )
            found.append((path.stat().st_mtime, stale))
    return [s for _, s in sorted(found, key=lambda t: t[0])]


def _volumes(listed: object) -> tuple[tuple[str, str], ...]:
    """The marker's [[pool, volume], ...], ignoring anything malformed."""
    if not isinstance(listed, list):
        return ()
    return tuple(
        (str(item[0]), str(item[1]))
        for item in listed
        if isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)
    )


def _stale_owner(path: Path) -> dict[str, object] | None:
    """The marker of a dead run's directory; None when a live process holds it (or it is a
    directory being created right now)."""
    with _held_lock:
        if path in _held:
            return None
    try:
        fd = os.open(path / MARKER, os.O_RDONLY)
    except FileNotFoundError:
        try:
            young = time.time() - path.stat().st_mtime < UNMARKED_GRACE
        except OSError:
            return None
        return None if young else {}
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return None  # held: a live run
        try:
            data = json.loads(os.read(fd, 65536) or b"{}")
        except ValueError:
            data = {}
        return data if isinstance(data, dict) else {}
    finally:
        os.close(fd)


def is_workdir(path: Path, root: Path = ROOT) -> bool:
    """Is `path` (e.g. a job's socket directory) one of vmkeep's run directories?"""
    return path.parent == root and NAME_RE.fullmatch(path.name) is not None
