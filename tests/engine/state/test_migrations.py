"""The alembic migrations build exactly the schema the models describe."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from vmkeep.engine.state import StateDB, data_dir
from vmkeep.engine.state.models import Base


def test_migrations_from_an_empty_database_equal_the_models(db: StateDB) -> None:
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        assert context.get_current_revision() is not None
    tables = set(inspect(db.engine).get_table_names())
    assert tables == {*Base.metadata.tables, "alembic_version"}


def test_reopening_is_a_no_op_and_keeps_the_data(data_dir: Path) -> None:
    first = StateDB.open(data_dir)
    with first.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO jobs (name, kind, spec, created, updated) "
            "VALUES ('j', 'backup', '{}', '2024-01-01 00:00:00', '2024-01-01 00:00:00')"
        )
    first.close()
    again = StateDB.open(data_dir)
    with again.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT name FROM jobs").scalars().all() == ["j"]
    again.close()


def test_data_directory_is_private_and_holds_the_database(data_dir: Path) -> None:
    StateDB.open(data_dir).close()
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert (data_dir / "vmkeep.db").is_file()
    engine = create_engine(f"sqlite:///{data_dir / 'vmkeep.db'}")
    assert "runs" in inspect(engine).get_table_names()
    engine.dispose()


def test_data_dir_default_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VMKEEP_DATA_DIR", str(tmp_path / "x"))
    assert data_dir() == tmp_path / "x"
    monkeypatch.delenv("VMKEEP_DATA_DIR")
    expected = (
        Path("/var/lib/vmkeep")
        if os.geteuid() == 0
        else Path(os.path.expanduser("~/.local/share/vmkeep"))
    )
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert data_dir() == expected


def test_database_url_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere.db"
    monkeypatch.setenv("VMKEEP_DATABASE_URL", f"sqlite:///{other}")
    StateDB.open(tmp_path / "data").close()
    assert other.is_file()
    assert not (tmp_path / "data" / "vmkeep.db").exists()
