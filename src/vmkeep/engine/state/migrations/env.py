"""Alembic environment: always driven programmatically by vmkeep.engine.state.db with an open
connection in `config.attributes["connection"]` (no alembic.ini, no logging set-up)."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from vmkeep.engine.state.models import Base

config = context.config


def run_migrations_online() -> None:
    connection: Connection = config.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()
