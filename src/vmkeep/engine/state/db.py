"""Open the state database: create the data directory, connect, migrate to head, and turn
database failures into one clear line (StateError) with nothing half-applied."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from vmkeep.errors import StateError, VmkeepError

from .datadir import data_dir, database_url, ensure_data_dir

MIGRATIONS = Path(__file__).with_name("migrations")
# The newest migration's revision: a database already there is opened without importing
# alembic at all (tests/engine/test_runner_cli_state.py checks it against the scripts).
SCHEMA_HEAD = "0002"
BUSY_TIMEOUT_S = 30  # the server and a CLI command may write at the same time


def explain(exc: BaseException) -> str:
    """The cause in the user's words: disk full, read-only, corrupt, locked, or the driver's."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    text = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    lowered = text.lower()
    if "full" in lowered:
        return "the disk is full (free space, then retry)"
    if "readonly" in lowered or "read-only" in lowered:
        return "the database is read-only (check its permissions and the file system)"
    if "not a database" in lowered or "malformed" in lowered:
        return "the file is not a valid database (corrupt? restore it from a backup)"
    if "unable to open" in lowered:
        return "cannot open it (a read-only file system? check the directory's permissions)"
    if "locked" in lowered:
        return f"the database stayed locked by another process for {BUSY_TIMEOUT_S} s"
    return text


class StateDB:
    """One database: an engine, a session factory, and the data directory beside it (which
    holds server.key). Use `transaction()` for every unit of work."""

    def __init__(self, directory: Path, url: str, engine: Engine) -> None:
        self.directory = directory
        self.url = url
        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, directory: Path | None = None, url: str | None = None) -> StateDB:
        """The data directory (VMKEEP_DATA_DIR or the default) and its database (or
        VMKEEP_DATABASE_URL), migrated to the newest schema."""
        directory = ensure_data_dir(directory or data_dir())
        url = url or database_url(directory)
        engine = make_engine(url)
        db = cls(directory, url, engine)
        db.migrate()
        return db

    def where(self) -> str:
        """The database, for messages: the file, or the URL without its password."""
        return (
            str(self.engine.url.database) if self.is_sqlite else self.engine.url.render_as_string()
        )

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def at_head(self) -> bool:
        """One query: is the schema already SCHEMA_HEAD? (no version table: a new database)"""
        with self.guard(), self.engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return False
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars()
            return list(versions) == [SCHEMA_HEAD]

    def migrate(self) -> None:
        """Upgrade to head, in one transaction (SQLite and PostgreSQL have transactional DDL).
        A database already at head costs one query and no alembic import (CLI start-up)."""
        if self.at_head():
            return
        from alembic import command
        from alembic.config import Config
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        head = ScriptDirectory.from_config(config).get_current_head()
        with self.guard(), self.engine.begin() as conn:
            if MigrationContext.configure(conn).get_current_revision() == head:
                return
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Database errors become StateError naming the database and the cause."""
        try:
            yield
        except VmkeepError:
            raise
        except IntegrityError as exc:
            raise StateError(f"state database {self.where()}: refused: {explain(exc)}") from None
        except (SQLAlchemyError, sqlite3.Error) as exc:
            reason = "the file system is read-only" if self.read_only_fs() else explain(exc)
            raise StateError(f"state database {self.where()}: {reason}") from None

    def read_only_fs(self) -> bool:
        """SQLite reports a read-only mount as "unable to open" (its -shm file): ask the OS."""
        try:
            return bool(os.statvfs(self.directory).f_flag & os.ST_RDONLY)
        except OSError:
            return False

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session committed at the end, rolled back whole on any error."""
        with self.guard(), self.sessions.begin() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()


def make_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})
    event.listen(engine, "connect", sqlite_pragmas)
    event.listen(engine, "begin", sqlite_begin)
    return engine


def sqlite_begin(conn: Any) -> None:
    """Every transaction takes the write lock up front (readers still read, in WAL): the
    driver's own deferred BEGIN lets DDL escape the transaction, and a deferred transaction
    that later writes fails at once with "locked" instead of waiting its turn."""
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """Foreign keys on (cascades), and durable commits. WAL lets the CLI read while the server
    writes; a read-only database cannot switch journal mode, which is fine for readers."""
    dbapi_conn.isolation_level = None  # SQLAlchemy's "begin" event issues BEGIN itself
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=FULL")
        with suppress(sqlite3.OperationalError):
            cursor.execute("PRAGMA journal_mode=WAL")
    finally:
        cursor.close()
