"""DbRemoteRegistry behaves as the JSON RemoteRegistry, and imports remotes.json once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmkeep.engine.remote_registry import RemoteRegistry
from vmkeep.engine.state import DbRemoteRegistry, StateDB
from vmkeep.errors import NotFoundError, UsageError
from vmkeep.remotes.object_lock import LockPolicy
from vmkeep.repository.config_auth import KnownRepository

KNOWN = KnownRepository("r-123", True, 4 << 20, False)


@pytest.fixture(params=["json", "db"])
def registry(request: pytest.FixtureRequest, tmp_path: Path, db: StateDB) -> RemoteRegistry:
    """Every behaviour below runs against both, so the DB one is a drop-in."""
    path = tmp_path / "config" / "remotes.json"
    return RemoteRegistry(path) if request.param == "json" else DbRemoteRegistry(db, path)


def test_add_list_remove(registry: RemoteRegistry) -> None:
    assert registry.load() == []
    registry.add("nas", "/srv/nas", repository=KNOWN)
    registry.add("cloud", "s3://bucket/prefix", LockPolicy.from_days(30, "governance"))
    assert [(e.name, e.location) for e in registry.load()] == [
        ("nas", "/srv/nas"),
        ("cloud", "s3://bucket/prefix"),
    ]
    entry = registry.entry("cloud")
    assert entry is not None and (entry.lock_days, entry.lock_mode) == (30, "governance")
    nas = registry.entry("nas")
    assert nas is not None and nas.repository is not None and nas.repository.known() == KNOWN
    with pytest.raises(UsageError, match="already exists"):
        registry.add("nas", "/elsewhere")
    with pytest.raises(UsageError, match="invalid remote name"):
        registry.add("a/b", "/x")
    registry.remove("nas")
    assert [e.name for e in registry.load()] == ["cloud"]
    with pytest.raises(NotFoundError):
        registry.remove("nas")


def test_resolve_and_the_only_remote(registry: RemoteRegistry) -> None:
    with pytest.raises(UsageError, match="which remote"):
        registry.resolve(None)
    registry.add("nas", "/srv/nas")
    assert registry.resolve(None) == "/srv/nas"
    assert registry.entry(None) is not None
    assert registry.resolve("nas") == "/srv/nas"
    assert registry.resolve("./here") == "./here"
    assert registry.resolve("s3://b/p") == "s3://b/p"
    with pytest.raises(NotFoundError, match="no remote named 'nope'"):
        registry.resolve("nope")
    registry.add("two", "/srv/two")
    assert registry.entry(None) is None
    with pytest.raises(UsageError, match="which remote"):
        registry.resolve(None)


def test_locks(registry: RemoteRegistry) -> None:
    registry.add("vault", "/srv/vault", LockPolicy.from_days(7))
    policy = registry.lock_policy("vault")
    assert policy is not None and policy.seconds == 7 * 86400
    assert registry.lock_policy("vault", days_override=0) is None
    override = registry.lock_policy("vault", days_override=2)
    assert override is not None and override.seconds == 2 * 86400
    registry.set_lock("vault", None)
    assert registry.lock_policy("vault") is None
    with pytest.raises(NotFoundError):
        registry.set_lock("ghost", None)


def test_remember_records_once_and_upgrades_to_authenticated(registry: RemoteRegistry) -> None:
    registry.add("nas", "/srv/nas")
    registry.remember("nas", KNOWN)
    other = KnownRepository("r-other", False, 1 << 16, False)
    registry.remember("nas", other)  # a different repository is never recorded over
    entry = registry.entry("nas")
    assert entry is not None and entry.repository is not None
    assert entry.repository.known() == KNOWN
    authenticated = KnownRepository("r-123", True, 4 << 20, True)
    registry.remember("nas", authenticated)
    entry = registry.entry("nas")
    assert entry is not None and entry.repository is not None
    assert entry.repository.known() == authenticated
    registry.remember("ghost", KNOWN)  # no such remote: nothing happens


def test_remotes_json_is_imported_once(tmp_path: Path, db: StateDB) -> None:
    path = tmp_path / "config" / "remotes.json"
    old = RemoteRegistry(path)
    old.add("nas", "/srv/nas", LockPolicy.from_days(3), KNOWN)
    old.add("cloud", "s3://b/p")
    registry = DbRemoteRegistry(db, path)
    assert not path.exists() and path.with_name("remotes.json.migrated").is_file()
    assert registry.load() == RemoteRegistry(path.with_name("remotes.json.migrated")).load()
    registry.remove("cloud")
    again = DbRemoteRegistry(db, path)  # a second open imports nothing again
    assert [e.name for e in again.load()] == ["nas"]


def test_import_after_a_crash_before_the_rename_adds_no_duplicate(
    tmp_path: Path, db: StateDB
) -> None:
    path = tmp_path / "config" / "remotes.json"
    RemoteRegistry(path).add("nas", "/srv/nas")
    DbRemoteRegistry(db, path)
    path.with_name("remotes.json.migrated").rename(path)  # as if the rename never happened
    RemoteRegistry(path).add("late", "/srv/late")
    assert [e.name for e in DbRemoteRegistry(db, path).load()] == ["nas", "late"]


def test_a_malformed_remotes_json_names_the_file(tmp_path: Path, db: StateDB) -> None:
    path = tmp_path / "config" / "remotes.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"remotes": [{"name": 3}]}))
    with pytest.raises(UsageError, match=r"remotes\.json is malformed"):
        DbRemoteRegistry(db, path)
    assert path.is_file()  # left for the user to fix
