"""Opening a repository with the key derived in a thread (repository/opening.py): the same
repository as Repository.open, the same errors (raised by result(), in the caller's thread),
the passphrase asked in the caller's thread, no thread for a plain repository."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

import vmkeep.repository.opening as opening_module
from tests.conftest import PASSPHRASE
from vmkeep.errors import RepositoryError, WrongPassphraseError
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.opening import OpeningRepository
from vmkeep.repository.repository import Repository


def make(path: Path, encryption: str = "aes-256-gcm") -> LocalRemote:
    Repository.init(LocalRemote(str(path)), encryption, lambda: PASSPHRASE)
    return LocalRemote(str(path))


class Asked:
    """A passphrase source that records the threads it was called in."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.threads: list[threading.Thread] = []

    def __call__(self) -> bytes:
        self.threads.append(threading.current_thread())
        return self.secret


def test_same_key_as_open_and_derived_in_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = make(tmp_path / "r")
    derived_in: list[threading.Thread] = []
    real = opening_module.unwrap_key

    def spy(*args: Any) -> Any:  # the real derivation, noting where it ran
        derived_in.append(threading.current_thread())
        return real(*args)

    monkeypatch.setattr(opening_module, "unwrap_key", spy)
    asked = Asked(PASSPHRASE)
    opening = OpeningRepository(remote, asked)
    assert asked.threads == [threading.current_thread()]
    repo = opening.result()
    assert [t.name for t in derived_in] == ["vmkeep-kdf"]
    assert repo.key is not None
    plain = Repository.open(remote, lambda: PASSPHRASE)
    assert repo.chunk_id(b"x") == plain.chunk_id(b"x")
    assert repo.config["id"] == plain.config["id"]


def test_wrong_passphrase_raises_at_result(tmp_path: Path) -> None:
    opening = OpeningRepository(make(tmp_path / "r"), Asked(b"not the passphrase"))
    with pytest.raises(WrongPassphraseError):
        opening.result()


def test_altered_config_is_refused_at_result(tmp_path: Path) -> None:
    remote = make(tmp_path / "r")
    path = tmp_path / "r" / "config"
    config = json.loads(path.read_bytes())
    config["created"] = "2000-01-01T00:00:00+00:00"  # covered by the config's MAC
    path.write_text(json.dumps(config))
    opening = OpeningRepository(remote, Asked(PASSPHRASE))
    with pytest.raises(RepositoryError, match=r"MAC|authentic|altered"):
        opening.result()


def test_plain_repository_asks_no_passphrase(tmp_path: Path) -> None:
    asked = Asked(PASSPHRASE)
    repo = OpeningRepository(make(tmp_path / "r", "none"), asked).result()
    assert repo.key is None and asked.threads == []


def test_missing_repository_fails_before_any_thread(tmp_path: Path) -> None:
    asked = Asked(PASSPHRASE)
    with pytest.raises(RepositoryError, match="no vmkeep repository"):
        OpeningRepository(LocalRemote(str(tmp_path / "empty")), asked)
    assert asked.threads == []
