"""State shared by the commands: where the passphrase comes from, how a remote is opened."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from vmkeep.errors import UsageError

from .early_open import is_location, take
from .passphrase import PassphraseSource

if TYPE_CHECKING:
    from vmkeep.connectors.base import Connector
    from vmkeep.engine.remote_registry import RemoteRegistry
    from vmkeep.engine.state import StateDB
    from vmkeep.remotes.base import Remote
    from vmkeep.remotes.object_lock import LockPolicy
    from vmkeep.repository.repository import Repository


class CliState:
    """The passphrase source and the named remotes. The remotes live in the state database
    (docs/STATE.md), opened only when a command needs them: `vmkeep list --remote /path`
    never imports SQLAlchemy or touches the database."""

    def __init__(
        self, passphrase: PassphraseSource | None = None, registry: RemoteRegistry | None = None
    ) -> None:
        self.passphrase = passphrase or PassphraseSource(None)
        self._registry = registry
        self._db: StateDB | None = None

    @property
    def db(self) -> StateDB:
        """The state database (VMKEEP_DATA_DIR), opened at the first command that needs it."""
        if self._db is None:
            from vmkeep.engine.state import StateDB

            self._db = StateDB.open()
        return self._db

    @property
    def registry(self) -> RemoteRegistry:
        if self._registry is None:
            from vmkeep.engine.state import DbRemoteRegistry

            self._registry = DbRemoteRegistry(self.db)
        return self._registry

    def open_repository(self, remote_ref: str | None) -> Repository:
        """A named remote's repository is checked against what was recorded when it was added
        (encryption, chunk size, id, MAC), and recorded at its first open if it was not."""
        return self.begin_open_repository(remote_ref)()

    def begin_open_repository(self, remote_ref: str | None) -> Callable[[], Repository]:
        """`open_repository` in two steps: the config is read and the key derivation starts
        in a thread (repository/opening.py); calling the result waits for it. A command does
        its imports and connects in between."""
        # Imported at the first open, not at start-up: `--help` needs no crypto or zstd.
        from vmkeep.repository.opening import OpeningRepository

        if remote_ref is not None and is_location(remote_ref):
            early = take(remote_ref, self.passphrase.file)  # begun before typer: early_open.py
            if early is not None:
                return early
            return OpeningRepository(self.open_remote(remote_ref), self.passphrase).result
        entry = self.registry.entry(remote_ref)
        known = entry.repository.known() if entry and entry.repository else None
        opening = OpeningRepository(self.open_remote(remote_ref), self.passphrase, known)

        def opened() -> Repository:
            repo = opening.result()
            if entry is not None:
                self.registry.remember(entry.name, repo.known)
            return repo

        return opened

    def lock_policy(self, remote_ref: str | None, days_override: int | None) -> LockPolicy | None:
        """The lock a backup to `remote_ref` gets (RemoteRegistry.lock_policy). A path or URL
        is no named remote, so only --lock-days counts and neither the state database nor
        the registry's pydantic models are loaded: SQLAlchemy's import was ~0.2 CPU-s of every
        such backup, the models' first use (pydantic's plugin scan) ~0.012 s
        (docs/RUN-OVERHEAD.md)."""
        if remote_ref is not None and is_location(remote_ref):
            from vmkeep.remotes.object_lock import LockPolicy

            return None if days_override is None else LockPolicy.for_run(days_override)
        return self.registry.lock_policy(remote_ref, days_override)

    def open_remote(self, remote_ref: str | None) -> Remote:
        """A path/URL as given, or a named remote with its remembered credentials
        (`remote add --remember-credentials`) in front of the environment."""
        from vmkeep.remotes.location import open_remote

        if remote_ref is not None and is_location(remote_ref):
            return open_remote(remote_ref)
        location = self.registry.resolve(remote_ref)
        entry = self.registry.entry(remote_ref)
        db: StateDB | None = getattr(self.registry, "db", None)  # a JSON registry has no secrets
        if entry is None or db is None:
            return open_remote(location)
        from vmkeep.engine.state.credentials import stored_credentials

        return open_remote(location, stored_credentials(db, entry.name))


state = CliState()

CONNECTORS = ("files", "libvirt")


def connector_for(connector: str, uri: str | None) -> Connector:
    """The connector named on the command line, imported only when asked for (the files
    connector's models cost ~0.14 s of start-up that a libvirt run does not need)."""
    if connector == "files":
        from vmkeep.connectors.files import FilesConnector

        return FilesConnector()
    if connector == "libvirt":
        from vmkeep.connectors.libvirt import LibvirtConnector

        return LibvirtConnector(uri or "qemu:///system")
    raise UsageError(f"unknown connector {connector!r}: choose {' or '.join(CONNECTORS)}")


def set_passphrase_file(path: Path | None) -> None:
    state.passphrase = PassphraseSource(path)
