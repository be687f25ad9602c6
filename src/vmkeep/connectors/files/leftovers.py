"""What an interrupted restore leaves behind, made visible and settled.

A restore as a new VM builds it in `target/.vmkeep-new-<name>-<pid>-<random>/`, holding an
owner record (`.vmkeep-owner`: host, boot, pid and the pid's start time). The next restore to
the same target removes such directories whose owner is provably dead (same host, and another
boot or no process of that pid and start time), and reports the ones it cannot judge.

An in-place restore writes the disks of a VM that stays where it is, so a kill leaves disks
that are neither the old nor the restored state. `vm.json.incomplete` next to vm.json is
written before the first write and removed after the last fsync; while it is there the VM is
listed as incomplete and refused by backup."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import stat
from pathlib import Path

from vmkeep.connectors.files.fileio import mkdir_unique
from vmkeep.connectors.files.vmdir import INCOMPLETE, read_small_file
from vmkeep.errors import ConnectorError
from vmkeep.processes import start_time
from vmkeep.safe_files import fsync_dir, write_new

log = logging.getLogger(__name__)

NEW_PREFIX = ".vmkeep-new-"
OWNER = ".vmkeep-owner"
MAX_RECORD = 4096


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def owner_record() -> dict[str, object]:
    """Who this process is, in a form another process can check for liveness."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "boot": _boot_id(),
        "pid": pid,
        "start": start_time(pid) or None,
    }


def make_build_dir(target: Path, name: str) -> Path:
    """A new hidden directory in `target` to build VM `name` in, carrying its owner record."""
    tmp = mkdir_unique(target, f"{NEW_PREFIX}{name}-{os.getpid()}-")
    try:
        write_new(tmp / OWNER, json.dumps(owner_record()).encode())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def drop_owner(build_dir: Path) -> None:
    """Remove the owner record before the directory becomes the VM."""
    (build_dir / OWNER).unlink(missing_ok=True)


def _read_record(path: Path) -> dict[str, object] | None:
    try:
        record = json.loads(read_small_file(path, MAX_RECORD))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _owner_dead(record: dict[str, object]) -> bool | None:
    """True when the recorded process is gone, False when alive, None when it is on
    another host (or the record is unusable) and cannot be told from here. Not
    processes.is_running: the record also names a host and a boot, and without a readable
    /proc/PID (gone, or hidden) the recorded start time decides, where is_running would
    ask kill(pid, 0) (another answer for a hidden process or a record without a start)."""
    pid, start = record.get("pid"), record.get("start")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return None
    if record.get("boot") != _boot_id():
        return True
    return (start_time(pid) or None) != start


def settle_leftovers(target: Path) -> list[str]:
    """Remove build directories of dead restores in `target`; warn about undecidable ones.
    Returns the names removed. Only real directories (not symlinks) are considered."""
    removed: list[str] = []
    try:
        names = [n for n in os.listdir(target) if n.startswith(NEW_PREFIX)]
    except OSError:
        return removed
    for name in sorted(names):
        path = target / name
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                continue
        except OSError:
            continue
        record = _read_record(path / OWNER)
        dead = _owner_dead(record) if record is not None else None
        if dead is None:
            log.warning(
                "warning: %s was left by a restore that vmkeep cannot tell is over "
                "(another host, or no owner record): remove it if no restore is running",
                path,
            )
        elif dead:
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(name)
                log.warning("warning: removed %s, left by a killed restore", path)
    return removed


def mark_incomplete(vm_dir: Path) -> None:
    """Write the marker (atomically, durable) before an in-place restore's first write."""
    data = json.dumps(dict(owner_record(), what="in-place restore")).encode()
    tmp = vm_dir / f".{INCOMPLETE}.{os.urandom(6).hex()}"
    try:
        try:
            write_new(tmp, data)
            os.replace(tmp, vm_dir / INCOMPLETE)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(vm_dir)
    except OSError as exc:
        raise ConnectorError(f"cannot mark {vm_dir} as being restored: {exc.strerror}") from None


def clear_incomplete(vm_dir: Path) -> None:
    """Remove the marker once every disk and vm.json are durable."""
    try:
        (vm_dir / INCOMPLETE).unlink(missing_ok=True)
        fsync_dir(vm_dir)
    except OSError as exc:
        raise ConnectorError(f"cannot clear {vm_dir / INCOMPLETE}: {exc.strerror}") from None


def settle_in_place(vm_dir: Path, qcow2_files: list[str]) -> None:
    """Before an in-place restore: refuse while another one runs on this VM, and remove the
    qcow2 copies (`.<file>.<12 hex>`) a killed one left beside the disks."""
    path = vm_dir / INCOMPLETE
    if not os.path.lexists(path):
        return
    record = _read_record(path) or {}
    dead = _owner_dead(record)
    if dead is False:
        raise ConnectorError(
            f"an in-place restore of {vm_dir} is running (pid {record.get('pid')}): "
            "wait for it to end"
        )
    if dead is None:
        return
    for file in qcow2_files:
        disk = vm_dir / file
        pattern = re.compile(re.escape(f".{disk.name}.") + "[0-9a-f]{12}")
        try:
            names = os.listdir(disk.parent)
        except OSError:
            continue
        for name in names:
            leftover = disk.parent / name
            with contextlib.suppress(OSError):
                if pattern.fullmatch(name) and stat.S_ISREG(os.lstat(leftover).st_mode):
                    leftover.unlink()
                    log.warning("warning: removed %s, left by a killed restore", leftover)


def incomplete_note(vm_dir: Path) -> str | None:
    """Why the VM in `vm_dir` is incomplete, or None when it is not marked."""
    path = vm_dir / INCOMPLETE
    if not os.path.lexists(path):
        return None
    record = _read_record(path) or {}
    pid, host = record.get("pid", "?"), record.get("host", "?")
    return f"an in-place restore (pid {pid} on {host}) did not finish: its disks are incomplete"
