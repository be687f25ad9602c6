"""The engine side of the metadata backup: gather vmkeep's configuration from the state
database into a ConfigSnapshot, and apply one back, whole or not at all
(docs/METADATA-BACKUP.md). The repository side is operations/metadata_backup.py."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from vmkeep.engine.remote_registry import RemoteEntry
from vmkeep.errors import IntegrityError, UsageError
from vmkeep.operations.metadata_backup import ConfigSnapshot

from .state import DbRemoteRegistry, JobSpec, JobStore, ScheduleSpec, SecretStore, StateDB
from .state.datadir import DATABASE_FILE, DATABASE_URL_ENV
from .state.jobs import write_job
from .state.models import Job, Remote, Schedule, Secret
from .state.remotes import fill
from .state.secrets import BLOB_VERSION, NONCE_SIZE

SCHEDULE_FIELDS = tuple(f.name for f in fields(ScheduleSpec))


def gather_config(db: StateDB) -> ConfigSnapshot:
    """Remotes (with their repository records), jobs with their schedules, and every secret
    (decrypted with the server key, in memory only)."""
    remotes = [e.model_dump() for e in DbRemoteRegistry(db).load()]
    jobs = [
        {
            "name": job.name,
            "kind": job.kind,
            "spec": job.spec,
            "schedules": [{k: getattr(s, k) for k in SCHEDULE_FIELDS} for s in job.schedules],
        }
        for job in JobStore(db).list_jobs()
    ]
    store = SecretStore(db)
    secrets = {name: store.get_secret(name) for name in store.list_secrets()}
    return ConfigSnapshot(remotes, jobs, secrets)


def configured(db: StateDB) -> dict[str, int]:
    """How many remotes, jobs and secrets the database holds (an empty one is a fresh
    install: all zero)."""
    with db.transaction() as session:
        return {
            "remotes": session.scalar(select(func.count()).select_from(Remote)) or 0,
            "jobs": session.scalar(select(func.count()).select_from(Job)) or 0,
            "secrets": session.scalar(select(func.count()).select_from(Secret)) or 0,
        }


def refuse_configured(directory: Path) -> None:
    """Refuse a data directory that already holds configuration, without creating anything
    (called before the passphrase is asked)."""
    if os.environ.get(DATABASE_URL_ENV) or (directory / DATABASE_FILE).exists():
        db = StateDB.open(directory)
        try:
            _refuse(db)
        finally:
            db.close()


def _refuse(db: StateDB) -> None:
    have = configured(db)
    if any(have.values()):
        listed = ", ".join(f"{n} {k}" for k, n in have.items() if n)
        raise UsageError(
            f"the data directory {db.directory} is not empty ({listed}): restore into an empty "
            "one (VMKEEP_DATA_DIR), or pass --force to replace its configuration"
        )


def apply_config(db: StateDB, snapshot: ConfigSnapshot, force: bool = False) -> None:
    """Write every remote, job, schedule and secret of `snapshot` in ONE transaction, secrets
    sealed under this install's server key. A database that already holds configuration is
    refused unless `force`, which replaces it (the runs ledger stays)."""
    if not force:
        _refuse(db)
    remotes = [_remote_entry(r) for r in snapshot.remotes]
    jobs = [_job_spec(j) for j in snapshot.jobs]
    key = SecretStore(db).key  # created now on a fresh install: the new server key
    with db.transaction() as session:
        if force:
            _clear(session)
        for entry in remotes:
            row = Remote(name=entry.name)
            fill(row, entry)
            session.add(row)
        session.flush()
        for job in jobs:
            write_job(session, job)
        for name, value in sorted(snapshot.secrets.items()):
            nonce = os.urandom(NONCE_SIZE)
            sealed = key.aead().encrypt(nonce, value, name.encode())
            session.add(Secret(name=name, blob=BLOB_VERSION + nonce + sealed))


def _clear(session: Session) -> None:
    for model in (Schedule, Job, Remote, Secret):
        session.execute(delete(model))
    session.flush()


def _remote_entry(data: dict[str, Any]) -> RemoteEntry:
    try:
        return RemoteEntry.model_validate(data)
    except ValidationError as exc:
        raise IntegrityError(
            f"metadata point: remote {data.get('name')!r} is malformed "
            f"({exc.errors()[0].get('loc')})"
        ) from None


def _job_spec(data: dict[str, Any]) -> JobSpec:
    name, kind, spec = data.get("name"), data.get("kind"), data.get("spec")
    scheds = data.get("schedules") or []
    if not (isinstance(name, str) and isinstance(kind, str) and isinstance(spec, dict)):
        raise IntegrityError(f"metadata point: job {name!r} is malformed")
    if not isinstance(scheds, list) or not all(isinstance(s, dict) for s in scheds):
        raise IntegrityError(f"metadata point: the schedules of job {name!r} are malformed")
    try:
        schedules = [ScheduleSpec(**{k: s[k] for k in SCHEDULE_FIELDS if k in s}) for s in scheds]
    except TypeError:
        raise IntegrityError(f"metadata point: a schedule of job {name!r} is malformed") from None
    for sched in schedules:
        sched.check()
    return JobSpec(name, kind, spec, schedules)
