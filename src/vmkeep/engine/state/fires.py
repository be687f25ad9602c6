"""Each schedule's last fired slot, kept in the database so that a restarted server knows
what it missed (docs/SCHEDULES.md "Missed runs") and never fires a slot twice."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select

from .db import StateDB
from .models import Schedule, ScheduleFire


class FireStore:
    def __init__(self, db: StateDB) -> None:
        self.db = db

    def last_fires(self) -> dict[str, datetime]:
        """Schedule name → the last slot it fired for (aware, UTC)."""
        with self.db.transaction() as session:
            return {f.schedule: f.last_fire for f in session.scalars(select(ScheduleFire))}

    def record(self, schedule: str, fire: datetime) -> bool:
        """Remember `fire` as the schedule's last slot; False when the schedule no longer
        exists (deleted while the server ran: nothing to remember)."""
        with self.db.transaction() as session:
            if session.scalar(select(Schedule.id).where(Schedule.name == schedule)) is None:
                return False
            row = session.get(ScheduleFire, schedule)
            if row is None:
                session.add(ScheduleFire(schedule=schedule, last_fire=fire))
            else:
                row.last_fire = fire
            return True
