"""State shared by the commands: where the passphrase comes from, how a remote is opened."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from vmkeep.connectors.base import Connector
from vmkeep.engine.remote_registry import RemoteRegistry
from vmkeep.errors import UsageError
from vmkeep.remotes.location import open_remote
from vmkeep.repository.repository import Repository

from .output import PassphraseSource


def default_registry() -> RemoteRegistry:
    """The state database's registry once vmkeep has a state database (its first open
    imports remotes.json and renames it), the JSON file until then. Opened on first use, so
    that a database error is a one-line error of the command, not of the import."""
    from vmkeep.engine.state.datadir import DATABASE_FILE, DATABASE_URL_ENV, data_dir

    if os.environ.get(DATABASE_URL_ENV) or (data_dir() / DATABASE_FILE).exists():
        from vmkeep.engine.state import DbRemoteRegistry, StateDB

        return DbRemoteRegistry(StateDB.open())
    return RemoteRegistry()


@dataclass
class CliState:
    passphrase: PassphraseSource = field(default_factory=lambda: PassphraseSource(None))
    chosen_registry: RemoteRegistry | None = None

    @property
    def registry(self) -> RemoteRegistry:
        if self.chosen_registry is None:
            self.chosen_registry = default_registry()
        return self.chosen_registry

    def open_repository(self, remote_ref: str | None) -> Repository:
        """A named remote's repository is checked against what was recorded when it was added
        (encryption, chunk size, id, MAC), and recorded at its first open if it was not."""
        entry = self.registry.entry(remote_ref)
        location = entry.location if entry else self.registry.resolve(remote_ref)
        known = entry.repository.known() if entry and entry.repository else None
        repo = Repository.open(open_remote(location), self.passphrase, known)
        if entry is not None:
            self.registry.remember(entry.name, repo.known)
        return repo


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
