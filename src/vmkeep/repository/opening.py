"""Opening an encrypted repository with its key derived in a thread.

Argon2id (64 MiB, 3 passes) is ~0.2 CPU-s of every run and runs in C without the GIL, so a
command can import its data path and connect to its hypervisor meanwhile instead of waiting
(docs/RUN-OVERHEAD.md). Only the derivation runs in the thread: the config is read and the
passphrase asked for (a prompt reads the terminal) before it starts, in the caller's thread,
and the thread imports nothing. The config is read by config_read.py, so the derivation
starts before repository.py and the data path are imported."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from vmkeep.remotes.base import Remote
from vmkeep.trace import span

from .config_auth import KnownRepository
from .config_read import read_config
from .crypto import RepositoryKey, unwrap_key

if TYPE_CHECKING:
    from .repository import PassphraseSource, Repository


class OpeningRepository:
    """`Repository.open` in two steps: construct (config read, key derivation started), then
    `result()` (the repository, or the error `open` would have raised)."""

    def __init__(
        self, remote: Remote, passphrase: PassphraseSource, known: KnownRepository | None = None
    ) -> None:
        self.remote = remote
        self.config = read_config(remote, known)
        self._key: RepositoryKey | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if self.config["encryption"] != "none":
            secret = passphrase()
            self._thread = threading.Thread(
                target=self._derive, args=(self.config, secret), name="vmkeep-kdf", daemon=True
            )
            self._thread.start()

    def _derive(self, config: dict[str, Any], secret: bytes) -> None:
        try:
            with span("kdf"):
                self._key, _ = unwrap_key(config["keys"], secret, config["id"])
        except BaseException as exc:  # raised again in the caller's thread by result()
            self._error = exc

    def result(self) -> Repository:
        """The opened repository; a wrong passphrase or a malformed key entry raises here."""
        from .repository import Repository  # imported while the key was being derived

        if self._thread is None:
            return Repository(self.remote, self.config, None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._key is not None
        return Repository.with_key(self.remote, self.config, self._key)
