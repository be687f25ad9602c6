"""Shared fixtures: a throw-away repository on a local remote."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.repository import Repository

PASSPHRASE = b"correct horse battery staple"


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("VMKEEP_CONFIG_DIR", str(tmp_path / "vmkeep-config"))
    # vmkeep's state (database, server key) per test: as root the default is /var/lib/vmkeep
    monkeypatch.setenv("VMKEEP_DATA_DIR", str(tmp_path / "vmkeep-data"))
    monkeypatch.delenv("VMKEEP_PASSPHRASE", raising=False)
    monkeypatch.setenv(
        "VMKEEP_CACHE_DIR", str(tmp_path / "vmkeep-cache")
    )  # point summaries, format 3 index
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never probe 169.254.169.254
    yield


# The unit fixtures below are format 1 (one object per chunk under chunks/) whatever the
# default of `Repository.init` is: many unit tests look at, damage or count chunk objects.
# Format 3 (packs) has its own tests (tests/repository/test_packs.py, tests/e2e/test_format3*).
LAYOUT_FORMAT = 1


@pytest.fixture(params=["aes-256-gcm", "none"])
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Repository:
    return Repository.init(
        LocalRemote(tmp_path / "repo"),
        request.param,
        lambda: PASSPHRASE,
        format_version=LAYOUT_FORMAT,
    )


@pytest.fixture
def encrypted_repo(tmp_path: Path) -> Repository:
    return Repository.init(
        LocalRemote(tmp_path / "repo"),
        "aes-256-gcm",
        lambda: PASSPHRASE,
        format_version=LAYOUT_FORMAT,
    )
