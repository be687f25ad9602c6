"""`remote test`: what a user checks before relying on a remote — permissions and throughput."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from vmkeep.errors import ObjectExistsError, VmkeepError
from vmkeep.parallel import ordered_map
from vmkeep.remotes.base import Remote
from vmkeep.remotes.object_lock import LockingRemote

OBJECT_SIZE = 4 * 1024 * 1024


@dataclass
class ProbeReport:
    url: str
    checks: dict[str, str] = field(default_factory=dict)  # name -> "ok" or the error
    write_mb_per_s: float | None = None
    read_mb_per_s: float | None = None
    latency_ms: float | None = None
    free_bytes: int | None = None
    immutable: bool | None = None  # whether the remote is used immutably (then checked)

    @property
    def ok(self) -> bool:
        return all(v == "ok" for v in self.checks.values())

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__, ok=self.ok)


def probe_remote(remote: Remote, size: int = 64 * 1024 * 1024) -> ProbeReport:
    report = ProbeReport(remote.url, free_bytes=remote.free_space())
    prefix = f"vmkeep-probe-{os.urandom(4).hex()}/"
    names = [f"{prefix}{i:04d}" for i in range(max(1, size // OBJECT_SIZE))]
    payload = os.urandom(OBJECT_SIZE)

    def step(name: str, action: Any) -> bool:
        try:
            action()
            report.checks[name] = "ok"
            return True
        except VmkeepError as exc:
            report.checks[name] = str(exc)
            return False

    def create() -> None:
        began = time.monotonic()
        remote.put(prefix + "small", b"vmkeep")
        report.latency_ms = round((time.monotonic() - began) * 1000, 2)

    def read() -> None:
        if remote.get(prefix + "small") != b"vmkeep":
            raise VmkeepError("read back different bytes than written")

    def listing() -> None:
        if prefix + "small" not in {o.name for o in remote.list(prefix)}:
            raise VmkeepError("a written object does not appear in the listing")

    def refuse_overwrite() -> None:
        try:
            remote.put(prefix + "small", b"other", overwrite=False)
        except ObjectExistsError:
            return
        raise VmkeepError("create-if-absent overwrote an existing object")

    def throughput() -> None:
        began = time.monotonic()
        for _ in ordered_map(lambda n: remote.put(n, payload), names):
            pass
        report.write_mb_per_s = round(
            len(names) * OBJECT_SIZE / 1e6 / (time.monotonic() - began), 1
        )
        began = time.monotonic()
        for data in ordered_map(remote.get, names):
            if len(data) != OBJECT_SIZE:
                raise VmkeepError("short read")
        report.read_mb_per_s = round(len(names) * OBJECT_SIZE / 1e6 / (time.monotonic() - began), 1)

    def delete() -> None:
        for name in [*names, prefix + "small"]:
            remote.delete(name)
        if any(True for _ in remote.list(prefix)):
            raise VmkeepError("deleted objects are still listed")

    if step("create", create) and step("read", read):
        step("list", listing)
        step("create-if-absent", refuse_overwrite)
        step("throughput", throughput)
    step("delete", delete)
    if isinstance(remote, LockingRemote):
        check_immutable(remote, report)
    return report


def check_immutable(remote: LockingRemote, report: ProbeReport) -> None:
    """Only remotes used immutably get the check (an Object Lock bucket; a local directory
    with retention records): a delete and an overwrite of a locked object must be refused."""
    try:
        result = remote.check_immutability()
    except VmkeepError as exc:
        result = str(exc)
    report.immutable = result is not None
    if result is not None:
        report.checks["immutable: delete/overwrite refused"] = result
