"""What every run of a process shares: the state database and its stores, and the opened
repositories (each key unwrapped once per process, not once per VM: Argon2 is slow)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from vmkeep.engine.state import DbRemoteRegistry, JobStore, Ledger, SecretStore, StateDB
from vmkeep.errors import NotFoundError, UsageError
from vmkeep.repository.repository import Repository

PASSPHRASE_ENV = "VMKEEP_PASSPHRASE"
REPORT_TARGETS_SECRET = "report/targets"


def passphrase_secret(remote: str) -> str:
    """The secret-store name of a named remote's repository passphrase."""
    return f"remote/{remote}/passphrase"


class EngineContext:
    """The state of one process (a CLI command or the server) for its runs."""

    def __init__(self, db: StateDB) -> None:
        self.db = db
        self.ledger = Ledger(db)
        self.jobs = JobStore(db)
        self.secrets = SecretStore(db)
        self.registry = DbRemoteRegistry(db)
        self._repos: dict[str, Repository] = {}
        self._lock = threading.Lock()
        self._opening: dict[str, threading.Lock] = {}

    @classmethod
    def open(cls, data_dir: Path | None = None) -> EngineContext:
        return cls(StateDB.open(data_dir))

    @property
    def data_dir(self) -> Path:
        return self.db.directory

    def passphrase_for(self, remote_name: str) -> bytes:
        """The remembered passphrase of the remote (secret `remote/<name>/passphrase`), else
        VMKEEP_PASSPHRASE; a run never prompts."""
        try:
            return self.secrets.get_secret(passphrase_secret(remote_name))
        except NotFoundError:
            pass
        env = os.environ.get(PASSPHRASE_ENV)
        if env:
            return os.fsencode(env)
        raise UsageError(
            f"remote {remote_name!r}: no passphrase: `vmkeep remote add --remember-passphrase` "
            f"stores one, or set {PASSPHRASE_ENV}"
        )

    def repository(self, remote_name: str) -> Repository:
        """The named remote's repository, opened (and its key unwrapped) once per process and
        checked against what was recorded when the remote was added. A failed open is not
        cached: the next task tries again (a remote may come back)."""
        with self._lock:
            repo = self._repos.get(remote_name)
            gate = self._opening.setdefault(remote_name, threading.Lock())
        if repo is not None:
            self._apply_lock(remote_name, repo)
            return repo
        with gate:  # two VMs of a run wanting the same remote unwrap its key once
            with self._lock:
                repo = self._repos.get(remote_name)
            if repo is not None:
                return repo
            repo = self._open(remote_name)
            with self._lock:
                self._repos[remote_name] = repo
            return repo

    def _open(self, remote_name: str) -> Repository:
        from vmkeep.engine.state.credentials import stored_credentials
        from vmkeep.remotes.location import open_remote

        entry = self.registry.entry(remote_name)
        if entry is None:
            raise NotFoundError(f"no remote named {remote_name!r} (see `vmkeep remote list`)")
        known = entry.repository.known() if entry.repository else None
        repo = Repository.open(
            open_remote(entry.location, stored_credentials(self.db, remote_name, self.secrets)),
            lambda: self.passphrase_for(remote_name),
            known,
        )
        self._apply_lock(remote_name, repo)
        self.registry.remember(entry.name, repo.known)
        return repo

    def _apply_lock(self, remote_name: str, repo: Repository) -> None:
        """Every point this process writes carries the remote's lock as it is set now (a
        `remote lock` applies to a running server's next task), as a CLI backup's does; gc
        suspends it for what it writes (object_lock.locks_suspended)."""
        from vmkeep.remotes.object_lock import apply_lock_policy

        entry = self.registry.entry(remote_name)
        apply_lock_policy(repo.remote, entry.lock_policy() if entry else None)

    def forget_repository(self, remote_name: str) -> None:
        """Drop a cached repository (after its remote failed, say)."""
        with self._lock:
            self._repos.pop(remote_name, None)

    def report_targets(self) -> list[dict[str, Any]]:
        """The named report targets (SMTP and webhook settings, with their passwords and
        signing secrets), kept encrypted in the secret store as one JSON list."""
        try:
            raw = self.secrets.get_secret(REPORT_TARGETS_SECRET)
        except NotFoundError:
            return []
        data = json.loads(raw)
        return list(data) if isinstance(data, list) else []

    def close(self) -> None:
        with self._lock:
            self._repos.clear()
        self.db.close()

    def __enter__(self) -> EngineContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
