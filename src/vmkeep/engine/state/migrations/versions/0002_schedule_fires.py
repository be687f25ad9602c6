"""schedule_fires: each schedule's last fired slot (the server's missed-run memory)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06 04:55:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "schedule_fires",
        sa.Column("schedule", sa.String(length=200), nullable=False),
        sa.Column("last_fire", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["schedule"],
            ["schedules.name"],
            name=op.f("fk_schedule_fires_schedule_schedules"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("schedule", name=op.f("pk_schedule_fires")),
    )


def downgrade() -> None:
    op.drop_table("schedule_fires")
