"""A real state database (SQLite file) in a fresh data directory per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkeep.engine.state import StateDB


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def db(data_dir: Path) -> Iterator[StateDB]:
    state = StateDB.open(data_dir)
    yield state
    state.close()
