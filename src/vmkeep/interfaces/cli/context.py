"""State shared by the commands: where the passphrase comes from, how a remote is opened."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vmkeep.connectors.base import Connector
from vmkeep.engine.remote_registry import RemoteRegistry
from vmkeep.errors import UsageError
from vmkeep.remotes.location import open_remote
from vmkeep.repository.repository import Repository

from .output import PassphraseSource


@dataclass
class CliState:
    passphrase: PassphraseSource = field(default_factory=lambda: PassphraseSource(None))
    registry: RemoteRegistry = field(default_factory=RemoteRegistry)

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
