"""Named remotes in the state database: a drop-in for the JSON RemoteRegistry. On first open,
an existing remotes.json (VMKEEP_CONFIG_DIR) is imported once and renamed
remotes.json.migrated, so users keep their named remotes."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmkeep.engine.remote_registry import RemoteEntry, RemoteRegistry, RepositoryRecord, config_dir
from vmkeep.errors import StateError
from vmkeep.remotes.object_lock import LockPolicy
from vmkeep.repository.config_auth import KnownRepository

from .db import StateDB
from .models import Remote

MIGRATED_SUFFIX = ".migrated"


class DbRemoteRegistry(RemoteRegistry):
    """Every public method of RemoteRegistry, each one transaction: the inherited
    read-modify-write logic runs with load() and save() bound to the same session, which holds
    the write lock from its start, so two processes never lose each other's change."""

    def __init__(self, db: StateDB, json_path: Path | None = None) -> None:
        super().__init__(json_path or config_dir() / "remotes.json")
        self.db = db
        self._local = threading.local()
        self.import_json()

    # --- storage: what RemoteRegistry reads and writes ------------------------------------
    def load(self) -> list[RemoteEntry]:
        with self.session() as session:
            return [to_entry(row) for row in session.scalars(select(Remote).order_by(Remote.id))]

    def save(self, entries: list[RemoteEntry]) -> None:
        with self.session() as session:
            rows = {row.name: row for row in session.scalars(select(Remote))}
            wanted = {e.name for e in entries}
            for name, row in rows.items():
                if name not in wanted:
                    session.delete(row)
            for entry in entries:
                row = rows.get(entry.name) or Remote(name=entry.name)
                fill(row, entry)
                session.add(row)
            session.flush()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """The session of the operation in progress, else a transaction of its own."""
        current: Session | None = getattr(self._local, "session", None)
        if current is not None:
            yield current
            return
        with self.db.transaction() as session:
            self._local.session = session
            try:
                yield session
            finally:
                self._local.session = None

    # --- read-modify-write operations, made atomic ----------------------------------------
    def add(
        self,
        name: str,
        location: str,
        lock: LockPolicy | None = None,
        repository: KnownRepository | None = None,
    ) -> None:
        with self.session():
            super().add(name, location, lock, repository)

    def set_lock(self, name: str, lock: LockPolicy | None) -> None:
        with self.session():
            super().set_lock(name, lock)

    def remove(self, name: str) -> None:
        with self.session():
            super().remove(name)

    def remember(self, name: str, repository: KnownRepository) -> None:
        with self.session():
            super().remember(name, repository)

    # --- one-time import --------------------------------------------------------------------
    def import_json(self) -> list[str]:
        """Import remotes.json when present (names already in the database win: a crash
        between the commit and the rename imports nothing twice), then rename it."""
        if not self.path.is_file():
            return []
        entries = RemoteRegistry(self.path).load()  # a malformed file: UsageError naming it
        with self.session():
            have = {e.name for e in self.load()}
            new = [e for e in entries if e.name not in have]
            self.save([*self.load(), *new])
        try:
            os.replace(self.path, self.path.with_name(self.path.name + MIGRATED_SUFFIX))
        except OSError as exc:
            raise StateError(
                f"imported {self.path} but cannot rename it: {exc.strerror or exc}"
            ) from None
        return [e.name for e in new]


def fill(row: Remote, entry: RemoteEntry) -> None:
    row.url = entry.location
    row.settings = {"lock_days": entry.lock_days, "lock_mode": entry.lock_mode}
    row.repository = entry.repository.model_dump() if entry.repository else None


def to_entry(row: Remote) -> RemoteEntry:
    settings = row.settings or {}
    return RemoteEntry(
        name=row.name,
        location=row.url,
        lock_days=settings.get("lock_days"),
        lock_mode=settings.get("lock_mode", "compliance"),
        repository=RepositoryRecord.model_validate(row.repository) if row.repository else None,
    )
