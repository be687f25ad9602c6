"""The run a report describes: a JSON-serializable document the runs ledger produces
(docs/REPORTS.md, "Run document"). Validated here so a malformed run is refused with the
field named, instead of a report that silently says less than it should."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from enum import StrEnum
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from vmkeep.errors import ReportError


class RunState(StrEnum):
    """Final states of a run or task (a report is only made for a finished run)."""

    SUCCESS = "success"
    PARTIAL = "partial"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


class TaskKind(StrEnum):
    RUN = "run"
    VM = "vm"
    TARGET = "target"
    STEP = "step"


class _Strict(BaseModel):
    # Unknown keys are refused: a typo in the ledger's output must show, not vanish.
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskStats(_Strict):
    """Totals of a task's whole subtree; every field optional (a skipped task has none)."""

    bytes_read: int | None = Field(default=None, ge=0)
    bytes_written: int | None = Field(default=None, ge=0)
    bytes_new: int | None = Field(default=None, ge=0)
    seconds: float | None = Field(default=None, ge=0)
    dedup_ratio: float | None = Field(default=None, ge=0)
    compression_ratio: float | None = Field(default=None, ge=0)


class Task(_Strict):
    kind: TaskKind
    label: str
    vm: str | None = None
    target: str | None = None
    state: RunState
    started: AwareDatetime | None = None
    finished: AwareDatetime | None = None
    stats: TaskStats | None = None
    warnings: list[str] = []
    error: str | None = None
    children: list[Task] = []

    def walk(self) -> Iterator[Task]:
        """This task and all its descendants, depth first, in document order."""
        yield self
        for child in self.children:
            yield from child.walk()


class Run(_Strict):
    id: str
    job: str
    schedule: str | None = None
    state: RunState
    trigger: str
    started: AwareDatetime
    finished: AwareDatetime
    tasks: list[Task] = []
    newest_good_points: dict[str, AwareDatetime] = {}

    def walk(self) -> Iterator[Task]:
        for task in self.tasks:
            yield from task.walk()

    def vm_tasks(self) -> list[Task]:
        """The per-VM tasks, wherever they sit in the tree (normally under the run task)."""
        return [t for t in self.walk() if t.kind is TaskKind.VM]

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_run(data: Run | Mapping[str, Any]) -> Run:
    """A validated run; ReportError naming the first bad fields when the document is malformed."""
    if isinstance(data, Run):
        return data
    try:
        return Run.model_validate(data)
    except ValidationError as exc:
        raise ReportError(f"invalid run document: {_one_line(exc)}") from None


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"])
        parts.append(f"{loc.lstrip('.') or 'document'}: {err['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
