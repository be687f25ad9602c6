"""Named remotes, kept in the user's vmkeep configuration directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ValidationError

from vmkeep.errors import NotFoundError, UsageError
from vmkeep.remotes.object_lock import LockPolicy
from vmkeep.repository.config_auth import KnownRepository
from vmkeep.safe_files import replace_file


class RepositoryRecord(BaseModel):
    """What the client saw of the remote's repository when it was added (or, for a remote
    added by an older vmkeep, first opened): a later config that disagrees is refused, so
    whoever can write the remote cannot make this client write plaintext or cut at another
    chunk size (docs/FORMAT.md §9)."""

    id: str
    encrypted: bool
    chunk_size: int
    authenticated: bool = False

    def known(self) -> KnownRepository:
        return KnownRepository(self.id, self.encrypted, self.chunk_size, self.authenticated)

    @classmethod
    def of(cls, known: KnownRepository) -> RepositoryRecord:
        return cls(
            id=known.id,
            encrypted=known.encrypted,
            chunk_size=known.chunk_size,
            authenticated=known.authenticated,
        )


class RemoteEntry(BaseModel):
    name: str
    location: str
    lock_days: int | None = None  # immutability: restore points locked this many days
    lock_mode: str = "compliance"
    repository: RepositoryRecord | None = None  # None: added by a vmkeep that did not record

    def lock_policy(self) -> LockPolicy | None:
        return LockPolicy.from_days(self.lock_days, self.lock_mode) if self.lock_days else None


def lock_for(entry: RemoteEntry | None, days_override: int | None) -> LockPolicy | None:
    """The lock of a backup to `entry` (None: a path or URL, no named remote): `--lock-days`
    wins (0 = none, in the remote's mode), else the remote's own setting."""
    if days_override is not None:
        return LockPolicy.for_run(days_override, entry.lock_mode if entry else "compliance")
    return entry.lock_policy() if entry else None


class RemoteFile(BaseModel):
    remotes: list[RemoteEntry] = []


def config_dir() -> Path:
    base = os.environ.get("VMKEEP_CONFIG_DIR") or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "vmkeep"
    )
    return Path(base)


class RemoteRegistry:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or config_dir() / "remotes.json"

    def load(self) -> list[RemoteEntry]:
        try:
            return RemoteFile.model_validate_json(self.path.read_bytes()).remotes
        except FileNotFoundError:
            return []
        except (ValidationError, ValueError) as exc:
            raise UsageError(
                f"{self.path} is malformed; fix or remove it ({exc.__class__.__name__})"
            ) from exc

    def save(self, entries: list[RemoteEntry]) -> None:
        """Atomic: a fresh temporary (O_EXCL|O_NOFOLLOW, unpredictable name, so a planted
        symlink is never written through), fsync, rename over the file."""
        data = json.dumps(RemoteFile(remotes=entries).model_dump(), indent=2).encode()
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            replace_file(self.path, data, 0o600)
        except OSError as exc:
            raise UsageError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def add(
        self,
        name: str,
        location: str,
        lock: LockPolicy | None = None,
        repository: KnownRepository | None = None,
    ) -> None:
        entries = self.load()
        if any(e.name == name for e in entries):
            raise UsageError(f"a remote named {name!r} already exists")
        if not name or "/" in name or name.startswith("."):
            raise UsageError(f"invalid remote name {name!r}")
        record = RepositoryRecord.of(repository) if repository else None
        entry = RemoteEntry(name=name, location=location, repository=record)
        if lock is not None:
            entry.lock_days, entry.lock_mode = lock.seconds // 86400, lock.mode
        self.save([*entries, entry])

    def set_lock(self, name: str, lock: LockPolicy | None) -> None:
        """Changes the lock of later backups; what is already locked stays locked."""
        entries = self.load()
        entry = next((e for e in entries if e.name == name), None)
        if entry is None:
            raise NotFoundError(f"no remote named {name!r}")
        entry.lock_days = lock.seconds // 86400 if lock else None
        entry.lock_mode = lock.mode if lock else "compliance"
        self.save(entries)

    def lock_policy(self, ref: str | None, days_override: int | None = None) -> LockPolicy | None:
        """The lock a backup to `ref` gets: `--lock-days` wins (0 = none), else the remote's
        setting; a path or URL that is not a named remote has none of its own."""
        entries = self.load()
        entry = None
        if ref is None and len(entries) == 1:
            entry = entries[0]
        elif ref is not None:
            entry = next((e for e in entries if e.name == ref), None)
        return lock_for(entry, days_override)

    def remove(self, name: str) -> None:
        entries = self.load()
        if not any(e.name == name for e in entries):
            raise NotFoundError(f"no remote named {name!r}")
        self.save([e for e in entries if e.name != name])

    def entry(self, ref: str | None) -> RemoteEntry | None:
        """The named remote `ref` stands for (the only one when None), or None for a path or
        URL, which has no record of its own."""
        entries = self.load()
        if ref is None:
            return entries[0] if len(entries) == 1 else None
        return next((e for e in entries if e.name == ref), None)

    def remember(self, name: str, repository: KnownRepository) -> None:
        """Record what a remote's repository is, when the entry has no record yet, or when its
        config has just been authenticated (format revision 3's one-time upgrade). A record
        never changes otherwise: a change is what check_known refuses."""
        entries = self.load()
        entry = next((e for e in entries if e.name == name), None)
        if entry is None:
            return
        record, old = RepositoryRecord.of(repository), entry.repository
        upgraded = (
            old is not None
            and not old.authenticated
            and old.model_copy(update={"authenticated": True}) == record
        )
        if old is None or upgraded:
            entry.repository = record
            self.save(entries)

    def resolve(self, ref: str | None) -> str:
        """A remote name, a path or URL; with none given, the only configured remote."""
        entries = self.load()
        if ref is None:
            if len(entries) == 1:
                return entries[0].location
            raise UsageError("which remote? give --remote NAME|PATH (see `vmkeep remote list`)")
        for entry in entries:
            if entry.name == ref:
                return entry.location
        if "/" in ref or "://" in ref or ref.startswith("."):
            return ref
        raise NotFoundError(f"no remote named {ref!r} (see `vmkeep remote list`)")
