"""A small persisted queue of reports that could not be sent: one JSON file per (run, target)
in a directory. Each file is written whole (a fresh O_EXCL temporary, fsync, then link or
rename), so a crash leaves either the old entry or the new one, never half of one. Entries
hold the target's *name*, never its settings: no secret ever reaches this directory."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError

log = logging.getLogger(__name__)

SUFFIX = ".json"
LOCK_FILE = ".lock"


class OutboxEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str  # also the webhook's X-Vmkeep-Delivery: the same across retries
    target: str
    kind: str
    run: dict[str, Any]  # the redacted run document
    attempts: int
    created: AwareDatetime
    next_attempt: AwareDatetime
    last_error: str


def new_entry_id(run_id: str, target: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{run_id}-{target}")[:100]
    return f"{safe}-{uuid.uuid4().hex[:12]}"


class Outbox:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _write_temp(self, entry: OutboxEntry) -> Path:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path / f".tmp-{uuid.uuid4().hex}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
        try:
            os.write(fd, entry.model_dump_json(indent=1).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    def _sync_dir(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def add(self, entry: OutboxEntry) -> Path:
        """Write a new entry; never overwrites one (link fails on an existing name)."""
        tmp = self._write_temp(entry)
        final = self.path / f"{entry.id}{SUFFIX}"
        try:
            os.link(tmp, final)
        finally:
            tmp.unlink()
        self._sync_dir()
        return final

    def update(self, file: Path, entry: OutboxEntry) -> None:
        os.replace(self._write_temp(entry), file)
        self._sync_dir()

    def remove(self, file: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            file.unlink()
        self._sync_dir()

    def entries(self) -> list[tuple[Path, OutboxEntry]]:
        """Readable entries, oldest first; an unreadable file is renamed `*.bad` and logged."""
        out = []
        try:
            files = sorted(self.path.glob(f"*{SUFFIX}"))
        except FileNotFoundError:
            return []
        for file in files:
            try:
                out.append((file, OutboxEntry.model_validate_json(file.read_bytes())))
            except (OSError, ValidationError, ValueError) as exc:
                log.error("report outbox: %s is unreadable, set aside as .bad (%s)", file, exc)
                with contextlib.suppress(OSError):
                    file.rename(file.with_suffix(".bad"))
        out.sort(key=lambda pair: pair[1].created)
        return out

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[bool]:
        """An advisory lock so two processes never send the same entry; yields False (and
        holds nothing) when another process is already working through the outbox."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    yield False
                    return
                raise
            yield True
        finally:
            os.close(fd)


def due(entry: OutboxEntry, now: datetime) -> bool:
    return entry.next_attempt <= now
