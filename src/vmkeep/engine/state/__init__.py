"""vmkeep's persistent state: data directory, database (SQLAlchemy 2 + alembic), secrets at
rest, named remotes, jobs and schedules, and the runs ledger (docs/STATE.md)."""

from __future__ import annotations

from .datadir import data_dir, database_url, ensure_data_dir
from .db import StateDB
from .fires import FireStore
from .jobs import JobRecord, JobSpec, JobStore, ScheduleRecord, ScheduleSpec
from .ledger import Ledger, LogView, RunView, TaskView
from .models import FINISHED, STATES, UNFINISHED
from .remotes import DbRemoteRegistry
from .secrets import SecretStore, ServerKey

__all__ = [
    "FINISHED",
    "STATES",
    "UNFINISHED",
    "DbRemoteRegistry",
    "FireStore",
    "JobRecord",
    "JobSpec",
    "JobStore",
    "Ledger",
    "LogView",
    "RunView",
    "ScheduleRecord",
    "ScheduleSpec",
    "SecretStore",
    "ServerKey",
    "StateDB",
    "TaskView",
    "data_dir",
    "database_url",
    "ensure_data_dir",
]
