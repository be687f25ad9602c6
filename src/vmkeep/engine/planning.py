"""Capacity planning (`vmkeep plan JOB`): how much a backup job will store on each remote at
steady state, and how much each run reads and transfers (docs/PLANNING.md).

The estimate multiplies three things the job already says or the repositories already know:
the VMs' allocated data (read now through the connector's extents), the retention (simulated
over a stretch of the job's real schedule fires, so per-schedule keep-last and long-term rules
combine exactly as the runner will prune them), and a change rate and compression ratio
(measured from the manifests of earlier runs, or given, or a documented default). Pure apart
from reading extents and manifests; the caller opens connectors and repositories."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from vmkeep.connectors.base import Connector, Extent, VmConfig
from vmkeep.connectors.files import FilesConnector
from vmkeep.engine.jobs.load import load_jobs
from vmkeep.engine.jobs.selection import select_configs
from vmkeep.engine.jobs.spec import BackupJob, FilesConnectorSpec, JobSpec, job_from_dict
from vmkeep.errors import NotFoundError, UsageError
from vmkeep.operations.backup import chunk_ranges
from vmkeep.repository.point_cache import point_summaries
from vmkeep.repository.repository import Repository

from .retention_shape import RetentionShape, retention_shape

if TYPE_CHECKING:
    from vmkeep.engine.state.jobs import JobStore

DEFAULT_CHANGE_RATE = 0.02  # of a VM's data, new per run: a common rule of thumb for servers
DEFAULT_COMPRESSION = 1.0  # stored / plain: no compression assumed, so the estimate errs high
DEFAULT_CHUNK_SIZE = 4 << 20  # a new repository's chunk size (docs/FORMAT.md)


@dataclass(frozen=True)
class VmSize:
    """One VM as the planner sees it: virtual size, allocated bytes, and its data extents per
    disk (to round them to any repository's chunk size)."""

    name: str
    uuid: str
    disk_bytes: int
    allocated_bytes: int
    extents: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]  # per disk: size, data extents

    def data_bytes(self, chunk_size: int) -> int:
        """What a full read reads and a first backup stores (before compression): every chunk
        that holds any data; holes are never read."""
        total = 0
        for size, extents in self.extents:
            ranges = chunk_ranges(size, [Extent(o, n) for o, n in extents], chunk_size)
            for start, end in ranges:
                total += min(end * chunk_size, size) - start * chunk_size
        return total


def measure_vms(connector: Connector, vms: Iterable[VmConfig]) -> list[VmSize]:
    """Each VM's allocated data, from the connector's disk readers (SEEK_DATA/SEEK_HOLE for
    files images, allocated clusters for qcow2)."""
    sizes = []
    for vm in vms:
        disks = []
        for disk in vm.disks:
            reader = connector.open_disk(vm, disk)
            try:
                data = tuple((e.offset, e.length) for e in reader.extents() if e.data)
                disks.append((reader.size, data))
            finally:
                reader.close()
        sizes.append(
            VmSize(
                vm.name,
                vm.uuid,
                sum(size for size, _ in disks),
                sum(n for _, data in disks for _, n in data),
                tuple(disks),
            )
        )
    return sizes


# --- retention: how many points a VM keeps, and how far apart --------------------------------


@dataclass(frozen=True)
class Measurement:
    """Rates seen in a repository's manifests (None: nothing to measure from)."""

    change_rate: float | None = None
    compression: float | None = None
    points: int = 0
    chunk_size: int | None = None


def measure_repository(repo: Repository, job: str, vm_uuids: Iterable[str]) -> Measurement:
    """Change rate: mean over the job's non-first points of bytes_new / the point's data
    bytes (a first point of a VM, with no parent, is a full and says nothing about change).
    Compression: bytes_written / bytes_new over every point that stored something. Points of
    the job are used when there are any, else every point of the VMs."""
    uuids = set(vm_uuids)
    mine = [m for m in point_summaries(repo)[0] if m.vm_uuid in uuids]
    if any(m.job == job for m in mine):
        mine = [m for m in mine if m.job == job]
    ratios = []
    written = new = 0
    for m in mine:
        b_new, b_written = m.stats.get("bytes_new"), m.stats.get("bytes_written")
        if not isinstance(b_new, int) or not isinstance(b_written, int):
            continue
        if b_new:
            new += b_new
            written += b_written
        data = m.data_bytes
        if m.parent is not None and data:
            ratios.append(b_new / data)
    return Measurement(
        change_rate=sum(ratios) / len(ratios) if ratios else None,
        compression=written / new if new else None,
        points=len(mine),
        chunk_size=repo.chunk_size,
    )


# --- the estimate ------------------------------------------------------------------------------


@dataclass(frozen=True)
class VmPlan:
    """One VM on one remote, in bytes."""

    name: str
    uuid: str
    disk_bytes: int
    allocated_bytes: int
    data_bytes: int  # chunk-rounded allocated data: a full read
    stored_bytes: int  # steady state, compressed: changes spread at random
    stored_bytes_low: int  # the same blocks rewritten every run: one run's change per point
    read_per_run: int
    transfer_per_run: int  # new data, compressed
    first_transfer: int  # the first run: every data chunk, compressed


@dataclass(frozen=True)
class RemotePlan:
    """The estimate for one of the job's remotes (each remote keeps its own copy)."""

    remote: str
    chunk_size: int
    change_rate: float
    change_source: str  # "given", "measured (N points)" or "default"
    compression: float
    compression_source: str
    vms: tuple[VmPlan, ...]
    notes: tuple[str, ...] = ()

    def total(self, field_name: str) -> int:
        return sum(int(getattr(vm, field_name)) for vm in self.vms)


@dataclass(frozen=True)
class JobPlan:
    """A backup job's estimate on each of its remotes."""

    job: str
    mode: str
    connector: str
    retention: RetentionShape
    remotes: tuple[RemotePlan, ...]
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        shape = self.retention
        remotes: list[dict[str, Any]] = []
        for r in self.remotes:
            stored, per_run = r.total("stored_bytes"), r.total("transfer_per_run")
            remotes.append(
                {
                    "remote": r.remote,
                    "chunk_size": r.chunk_size,
                    "change_rate": round(r.change_rate, 6),
                    "change_rate_source": r.change_source,
                    "compression": round(r.compression, 6),
                    "compression_source": r.compression_source,
                    "stored_bytes": stored,
                    "stored_bytes_low": r.total("stored_bytes_low"),
                    "peak_bytes": stored + per_run,
                    "read_per_run": r.total("read_per_run"),
                    "transfer_per_run": per_run,
                    "transfer_per_day": round(per_run * shape.runs_per_day),
                    "first_transfer": r.total("first_transfer"),
                    "vms": [vm.__dict__ for vm in r.vms],
                    "notes": list(r.notes),
                }
            )
        return {
            "job": self.job,
            "mode": self.mode,
            "connector": self.connector,
            "runs_per_day": round(shape.runs_per_day, 4),
            "retention": {
                "policy": shape.policy,
                "kept_points_per_vm": shape.kept,
                "simulated_days": shape.window_days,
                "notes": list(shape.notes),
            },
            "remotes": remotes,
            "totals": {
                key: sum(int(r[key]) for r in remotes)
                for key in ("stored_bytes", "transfer_per_run", "transfer_per_day")
            },
            "notes": list(self.notes),
        }


def stored_bytes(
    data: int, shape: RetentionShape, change: float, compression: float, spread: bool = True
) -> int:
    """The oldest kept point's data, plus for each later kept point the chunks changed since
    the kept point before it. `spread`: each run rewrites a fraction `change` of the data at
    random, so g runs leave 1 - (1 - change)^g of it new (g * change while that is small);
    else every run rewrites the same hot blocks, and any gap costs one run's change."""
    change = min(max(change, 0.0), 1.0)
    if spread:
        plain = data + sum(data * (1.0 - (1.0 - change) ** gap) for gap in shape.gaps)
    else:
        plain = data + len(shape.gaps) * data * change
    return round(plain * compression)


def read_per_run(data: int, job: BackupJob, change: float, reads_changes_only: bool) -> int:
    """Full mode, and connectors without change tracking (files), read every data chunk each
    run; a delta with dirty bitmaps (libvirt) reads the changed ones, and every
    `full_interval`-th run reads everything."""
    if job.mode == "full" or not reads_changes_only:
        return data
    every = job.full_interval
    if not every:
        return round(data * change)
    return round((data + (every - 1) * data * change) / every)


def _pick(
    given: float | None, measured: float | None, points: int, default: float
) -> tuple[float, str]:
    if given is not None:
        return given, "given"
    if measured is not None:
        return measured, f"measured ({points} points)"
    return default, "default"


def plan_remote(
    job: BackupJob,
    remote: str,
    sizes: Sequence[VmSize],
    shape: RetentionShape,
    measured: Measurement | str | None,
    change_rate: float | None = None,
    compression: float | None = None,
) -> RemotePlan:
    """The estimate on one remote. `measured`: what its repository showed, or why it could not
    be read (a one-line reason, shown as a note), or None when not asked."""
    m = measured if isinstance(measured, Measurement) else Measurement()
    notes = [f"not measured: {measured}"] if isinstance(measured, str) else []
    change, change_source = _pick(change_rate, m.change_rate, m.points, DEFAULT_CHANGE_RATE)
    ratio, ratio_source = _pick(compression, m.compression, m.points, DEFAULT_COMPRESSION)
    chunk_size = m.chunk_size or DEFAULT_CHUNK_SIZE
    libvirt = job.connector.type == "libvirt"
    vms = []
    for vm in sizes:
        data = vm.data_bytes(chunk_size)
        vms.append(
            VmPlan(
                name=vm.name,
                uuid=vm.uuid,
                disk_bytes=vm.disk_bytes,
                allocated_bytes=vm.allocated_bytes,
                data_bytes=data,
                stored_bytes=stored_bytes(data, shape, change, ratio),
                stored_bytes_low=stored_bytes(data, shape, change, ratio, spread=False),
                read_per_run=read_per_run(data, job, change, libvirt),
                transfer_per_run=round(data * min(change, 1.0) * ratio),
                first_transfer=round(data * ratio),
            )
        )
    return RemotePlan(
        remote, chunk_size, change, change_source, ratio, ratio_source, tuple(vms), tuple(notes)
    )


def plan_job(
    job: BackupJob,
    sizes: Sequence[VmSize],
    now: datetime,
    measurements: Mapping[str, Measurement | str] | None = None,
    change_rate: float | None = None,
    compression: float | None = None,
) -> JobPlan:
    """The estimate for every remote of `job`. `change_rate` (a fraction of each VM's data new
    per run) and `compression` (stored / plain) override what `measurements` show; without
    either, the documented defaults are used."""
    if change_rate is not None and not 0.0 <= change_rate <= 1.0:
        raise UsageError("change rate: must be between 0 and 100 percent")
    if compression is not None and not 0.0 < compression <= 2.0:
        raise UsageError("compression: must be a ratio of stored to plain bytes, 0 < R <= 2")
    shape = retention_shape(job, now)
    found = measurements or {}
    remotes = tuple(
        plan_remote(job, name, sizes, shape, found.get(name), change_rate, compression)
        for name in job.remotes
    )
    notes = [] if sizes else ["no VM matches the job's selection now"]
    return JobPlan(job.name, job.mode, job.connector.type, shape, remotes, tuple(notes))


# --- inputs: the job, and its VMs now ---------------------------------------------------------


def backup_job_from_file(path: Path, name: str | None = None) -> BackupJob:
    """The backup job of a job file (the only one, or the one called `name`); one-line errors
    name the file (and line, through load_jobs)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the job file: {exc}") from None
    jobs = load_jobs(text, str(path))
    chosen = [j for j in jobs if name is None or j.name == name]
    if not chosen:
        raise NotFoundError(f"{path}: no job named {name!r} (jobs: {_names(jobs)})")
    if len(chosen) > 1:
        raise UsageError(f"{path} holds several jobs ({_names(jobs)}): name one with --name")
    return _backup_only(chosen[0], str(path))


def backup_job_from_store(store: JobStore, name: str) -> BackupJob:
    """A stored job (`vmkeep job apply`), validated again: a stored spec that no longer
    loads is reported, not trusted."""
    record = store.get_job(name)
    data = {"kind": record.kind, "name": record.name, **record.spec}
    try:
        job = job_from_dict(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "job"
        raise UsageError(f"stored job {name!r}: {where}: {err['msg']}") from None
    return _backup_only(job, f"stored job {name!r}")


def _names(jobs: Sequence[JobSpec]) -> str:
    return ", ".join(j.name for j in jobs)


def _backup_only(job: JobSpec, where: str) -> BackupJob:
    if not isinstance(job, BackupJob):
        raise UsageError(
            f"{where}: {job.kind} {job.name!r} is not a backup job: only backup jobs can be planned"
        )
    return job


def job_vms(job: BackupJob) -> tuple[Connector, list[VmConfig]]:
    """The job's connector and the VMs its selection picks now."""
    if not isinstance(job.connector, FilesConnectorSpec):
        raise UsageError(
            f"backup {job.name!r}: connector: planning reads VM sizes from 'files' connectors "
            f"only (not {job.connector.type!r}) for now"
        )
    connector = FilesConnector(job.connector.root)
    return connector, select_configs(job.vms, connector.list_vms())
