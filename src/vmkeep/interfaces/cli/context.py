"""State shared by the commands: where the passphrase comes from, how a remote is opened."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vmkeep.engine.remote_registry import RemoteRegistry
from vmkeep.remotes.location import open_remote
from vmkeep.repository.repository import Repository

from .output import PassphraseSource


@dataclass
class CliState:
    passphrase: PassphraseSource = field(default_factory=lambda: PassphraseSource(None))
    registry: RemoteRegistry = field(default_factory=RemoteRegistry)

    def open_repository(self, remote_ref: str | None) -> Repository:
        location = self.registry.resolve(remote_ref)
        return Repository.open(open_remote(location), self.passphrase)


state = CliState()


def set_passphrase_file(path: Path | None) -> None:
    state.passphrase = PassphraseSource(path)
