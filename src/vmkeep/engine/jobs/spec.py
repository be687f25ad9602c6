"""Job specifications: the pydantic models of a job YAML document, one model per `kind`.

Pure data with per-field checks; checks that need other jobs or the known remotes (unknown
remote, sequence cycles, duplicates) are in load.py, which also maps errors to file lines.
Unknown keys are refused everywhere, so a typo never silently falls back to a default."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    TypeAdapter,
    ValidationInfo,
    field_validator,
    model_validator,
)

from vmkeep.connectors.base import is_valid_tag
from vmkeep.engine.jobs.units import Duration, Rate

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
JOB_KINDS = ("backup", "replication", "mirror", "metadata", "sequence")


def _check_name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(
            f"{value!r} is not a valid name: letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 128 characters"
        )
    return value


def _check_timezone(value: str) -> str:
    if value == "UTC":
        return value
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(
            f"unknown time zone {value!r}: expected an IANA name such as 'Europe/Paris' or 'UTC'"
        ) from None
    return value


def _check_tag(value: str) -> str:
    if not is_valid_tag(value):
        raise ValueError(f"{value!r} is not a tag: 1-64 printable characters, no spaces or commas")
    return value


def _unique(values: list[str]) -> list[str]:
    seen = set()
    for v in values:
        if v in seen:
            raise ValueError(f"{v!r} is listed twice")
        seen.add(v)
    return values


Name = Annotated[StrictStr, AfterValidator(_check_name)]
TimeZone = Annotated[StrictStr, AfterValidator(_check_timezone)]
Tag = Annotated[StrictStr, AfterValidator(_check_tag)]
Count = Annotated[int, Field(ge=0, le=100_000, strict=True)]
Positive = Annotated[int, Field(ge=1, le=100_000, strict=True)]
NameList = Annotated[list[Name], Field(min_length=1), AfterValidator(_unique)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- schedules and retention -------------------------------------------------------------


class Schedule(_Spec):
    """When a job runs. `cron` is checked by the schedules module (engine/schedules.py)."""

    name: Name
    cron: Annotated[StrictStr, Field(min_length=1, max_length=200)]
    timezone: TimeZone = "UTC"
    enabled: bool = True
    missed: Literal["run-once", "skip"] = "run-once"  # the server was down at the time
    overlap: Literal["skip", "queue"] = "skip"  # the previous run still runs


class BackupSchedule(Schedule):
    """A backup schedule also keeps its own last `keep` restore points (combined retention)."""

    keep: Positive


class LongTermRetention(_Spec):
    """Grandfather-father-son buckets over all of a VM's points in the job; `timezone` None:
    each point is bucketed in the time zone of the schedule that made it."""

    daily: Count = 0
    weekly: Count = 0
    monthly: Count = 0
    yearly: Count = 0
    timezone: TimeZone | None = None


class TargetRetention(LongTermRetention):
    """A mirror's or metadata job's own retention on its targets: last N plus long-term."""

    keep_last: Count = 0

    @model_validator(mode="after")
    def _keeps_something(self) -> TargetRetention:
        if not (self.keep_last or self.daily or self.weekly or self.monthly or self.yearly):
            raise ValueError("keeps nothing: set keep_last or a daily/weekly/monthly/yearly count")
        return self


# --- connectors and VM selection ----------------------------------------------------------


class FilesConnectorSpec(_Spec):
    """The `files` connector: VMs are the directories under `root` holding a vm.json."""

    type: Literal["files"]
    root: Annotated[StrictStr, Field(min_length=1)]


class LibvirtConnectorSpec(_Spec):
    """A libvirt host. `nbd_host`: address the host's NBD export is reached at (remote URIs);
    `offline`: shut running domains down for the read (with `force_off` after the timeout)."""

    type: Literal["libvirt"]
    uri: Annotated[StrictStr, Field(min_length=1)] = "qemu:///system"
    nbd_host: StrictStr | None = None
    nbd_tls: bool = False
    offline: bool = False
    force_off: bool = False
    shutdown_timeout: Duration | None = None


ConnectorSpec = Annotated[FilesConnectorSpec | LibvirtConnectorSpec, Field(discriminator="type")]


class VmMatch(_Spec):
    """One rule: every field given must match (name: glob, uuid: exact, tags: all present)."""

    name: Annotated[StrictStr, Field(min_length=1)] | None = None
    uuid: Annotated[StrictStr, Field(min_length=1)] | None = None
    tags: Annotated[list[Tag], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> VmMatch:
        if self.name is None and self.uuid is None and self.tags is None:
            raise ValueError("a rule needs name, uuid or tags")
        return self


def _names_shorthand(value: Any) -> Any:
    """`vms: [web01, db01]` means `vms: {include: [{name: web01}, {name: db01}]}`."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return {"include": [{"name": v} for v in value]}
    return value


class VmSelection(_Spec):
    """Smart mode, evaluated at every run: VMs matching any include rule and no exclude rule,
    in the given power state; a new VM that matches is picked up without editing the job."""

    include: Annotated[list[VmMatch], Field(min_length=1)]
    exclude: list[VmMatch] = []
    power: Literal["running", "stopped", "any"] = "any"


class PointFilter(_Spec):
    """Which VMs' restore points a mirror copies (by the names and tags the points record)."""

    include: Annotated[list[VmMatch], Field(min_length=1)]
    exclude: list[VmMatch] = []


Selection = Annotated[VmSelection, BeforeValidator(_names_shorthand)]


# --- run settings -------------------------------------------------------------------------


class Concurrency(_Spec):
    """How many VMs a run handles at once; optional caps per hypervisor host and per remote."""

    vms: Positive = 2
    per_host: Positive | None = None
    per_remote: Positive | None = None


class Retries(_Spec):
    """A failed VM is tried again `count` times, waiting `backoff`, doubled each time."""

    count: Annotated[int, Field(ge=0, le=20, strict=True)] = 0
    backoff: Duration = 60


class Report(_Spec):
    """Which runs are reported, and to which named email and webhook targets."""

    when: Literal["never", "always", "failure", "error"] = "failure"
    email: list[Name] = []
    webhook: list[Name] = []


class HealthCheck(_Spec):
    """A backup job's health checks: after a VM's backup in a run fired by one of
    `schedules` (`all`: every run, manual ones too), for the VMs with one of `tags` (none:
    every VM), the new point is restored and checked (operations/healthcheck.py)."""

    schedules: Annotated[list[Name], AfterValidator(_unique)] | Literal["all"] = "all"
    tags: list[Tag] = []
    timeout: Duration = 300
    pool: StrictStr = ""  # libvirt: the storage pool of the throw-away domain ("" = default)


# --- job kinds ----------------------------------------------------------------------------


class _Job(_Spec):
    name: Name
    description: Annotated[StrictStr, Field(max_length=1000)] = ""


class BackupJob(_Job):
    """Back up the selected VMs to every remote in `remotes` (each gets its own copy)."""

    kind: Literal["backup"]
    mode: Literal["full", "delta"] = "delta"
    remotes: NameList
    connector: ConnectorSpec
    vms: Selection
    compression_level: Annotated[int, Field(ge=0, le=22, strict=True)] = 1
    full_interval: Positive | None = None  # every Nth run of a delta job reads in full
    schedules: list[BackupSchedule] = []
    retention: LongTermRetention = LongTermRetention()
    prune: bool = True
    gc: bool = False
    concurrency: Concurrency = Concurrency()
    vm_timeout: Duration | None = None
    retries: Retries = Retries()
    max_rate: Rate | None = None
    report: Report = Report()
    healthcheck: HealthCheck | None = None

    @field_validator("healthcheck")
    @classmethod
    def _known_schedules(cls, hc: HealthCheck | None, info: ValidationInfo) -> HealthCheck | None:
        if hc is not None and hc.schedules != "all":
            known = {s.name for s in info.data.get("schedules", [])}
            for name in hc.schedules:
                if name not in known:
                    raise ValueError(f"schedules: the job has no schedule {name!r}")
        return hc


class ReplicationTarget(_Spec):
    """Where replicas are made: a storage pool, on this host or another libvirt URI."""

    pool: Annotated[StrictStr, Field(min_length=1)]
    uri: StrictStr | None = None


class ReplicationJob(_Job):
    """Keep replica VMs of the selected libvirt domains on a storage target."""

    kind: Literal["replication"]
    mode: Literal["full", "incremental"] = "incremental"
    connector: LibvirtConnectorSpec
    vms: Selection
    target: ReplicationTarget
    keep: Positive = 3
    schedules: list[Schedule] = []
    concurrency: Concurrency = Concurrency()
    vm_timeout: Duration | None = None
    retries: Retries = Retries()
    report: Report = Report()

    @field_validator("keep")
    @classmethod
    def _short_chain(cls, keep: int, info: ValidationInfo) -> int:
        if info.data.get("mode", "incremental") == "incremental" and keep > 9:
            raise ValueError("at most 9 rollback snapshots for an incremental replica")
        return keep


class MirrorJob(_Job):
    """Copy restore points from `source` to each target (re-encrypted with its key)."""

    kind: Literal["mirror"]
    source: Name
    targets: NameList
    mode: Literal["full", "incremental"] = "incremental"
    vms: PointFilter | None = None  # None: every VM's points
    verified_only: bool = False
    retention: TargetRetention | None = None  # None: the targets keep every mirrored point
    schedules: list[Schedule] = []
    concurrency: Concurrency = Concurrency()
    max_rate: Rate | None = None
    report: Report = Report()


class MetadataJob(_Job):
    """vmkeep's own configuration, and optionally the hypervisors' metadata, to a remote."""

    kind: Literal["metadata"]
    remote: Name
    include_hypervisor: bool = False
    libvirt_uris: Annotated[list[StrictStr], Field(min_length=1)] = ["qemu:///system"]
    retention: TargetRetention = TargetRetention(keep_last=7)
    schedules: list[Schedule] = []
    report: Report = Report()


class SequenceJob(_Job):
    """Other jobs run one after another, in order."""

    kind: Literal["sequence"]
    jobs: Annotated[list[Name], Field(min_length=1)]
    on_failure: Literal["stop", "continue"] = "stop"
    schedules: list[Schedule] = []
    report: Report = Report()


JobSpec = Annotated[
    BackupJob | ReplicationJob | MirrorJob | MetadataJob | SequenceJob,
    Field(discriminator="kind"),
]
JOB_MODELS: dict[str, type[BaseModel]] = {
    "backup": BackupJob,
    "replication": ReplicationJob,
    "mirror": MirrorJob,
    "metadata": MetadataJob,
    "sequence": SequenceJob,
}
_ADAPTER: TypeAdapter[JobSpec] = TypeAdapter(JobSpec)


def job_from_dict(data: object) -> JobSpec:
    """A job from its JSON form (what the state store keeps); raises pydantic's error."""
    return _ADAPTER.validate_python(data)


def job_to_dict(job: JobSpec) -> dict[str, Any]:
    """The JSON form of a job, defaults left out; `kind` and `name` first, then the models'
    field order (what `job export` prints)."""
    data = job.model_dump(mode="json", exclude_defaults=True)
    return {"kind": data.pop("kind"), "name": data.pop("name"), **data}
