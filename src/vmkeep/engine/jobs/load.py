"""Load job files (`vmkeep job apply -f FILE`) and export them (`vmkeep job export`).

Every error is one line naming the file, the line and the field, e.g.
`jobs.yaml:14: backup 'nightly': schedules[1].cron: must be a string`. A file loads whole or
not at all: the caller stores nothing unless load_jobs returns."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from vmkeep.engine.jobs.spec import JOB_KINDS, JOB_MODELS, JobSpec, job_to_dict
from vmkeep.engine.jobs.yamlmap import Document, Loc, YamlSyntaxError, locate, parse_documents
from vmkeep.errors import UsageError

MAX_JOB_FILE_BYTES = 4 << 20


class JobSpecError(UsageError):
    """A job file is malformed or inconsistent; the message names file, line and field."""


@dataclass(frozen=True)
class _Loaded:
    spec: JobSpec
    doc: Document

    def where(self, loc: Loc) -> tuple[int, str]:
        return locate(self.doc.node, loc)


_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "model_type": "must be a mapping of keys",
    "model_attributes_type": "must be a mapping of keys",
}


def _message(err: ErrorDetails) -> str:
    text = _MESSAGES.get(err["type"], err["msg"])
    if err["type"] == "literal_error":
        text = f"must be {err.get('ctx', {}).get('expected', 'one of the allowed values')}"
    if err["type"] == "union_tag_invalid":
        ctx = err.get("ctx", {})
        text = f"unknown {ctx.get('discriminator', 'type')} {ctx.get('tag')!r} (known: "
        text = text.replace("'type'", "connector") + f"{ctx.get('expected_tags')})"
    return text.removeprefix("Value error, ")


def _label(data: object, index: int) -> str:
    if isinstance(data, dict):
        kind, name = data.get("kind"), data.get("name")
        if kind in JOB_KINDS and isinstance(name, str):
            return f"{kind} {name!r}"
        if isinstance(name, str):
            return f"job {name!r}"
    return f"document {index}"


def _validate(doc: Document, index: int, filename: str) -> JobSpec:
    label = _label(doc.data, index)
    if not isinstance(doc.data, dict):
        raise JobSpecError(f"{filename}:{doc.line}: {label}: must be a mapping (a job)")
    kind = doc.data.get("kind")
    model = JOB_MODELS.get(kind) if isinstance(kind, str) else None
    if model is None:
        line, _ = locate(doc.node, ["kind"])
        why = "required" if kind is None else f"unknown kind {kind!r}"
        raise JobSpecError(
            f"{filename}:{line}: {label}: kind: {why} (one of: {', '.join(JOB_KINDS)})"
        )
    try:
        spec: JobSpec = model.model_validate(doc.data)  # type: ignore[assignment]
    except ValidationError as exc:
        # A missing key points at its mapping's first line; an unknown key (often the typo
        # of the missing one) says more, so it comes first.
        ordered = sorted(exc.errors(), key=lambda e: e["type"] == "missing")
        errors = [(*locate(doc.node, e["loc"]), _message(e)) for e in ordered]
        line, path, text = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise JobSpecError(
            f"{filename}:{line}: {label}: {path or 'document'}: {text}{more}"
        ) from None
    return spec


def load_jobs(
    text: str,
    filename: str,
    *,
    remotes: Collection[str] | None = None,
    known_jobs: Mapping[str, JobSpec] | None = None,
    report_targets: Collection[str] | None = None,
) -> list[JobSpec]:
    """The jobs of a YAML text (one document or several separated by `---`), checked alone
    and together: duplicate job or schedule names, remotes not in `remotes`, report targets
    not in `report_targets` (each check skipped when its collection is None), sequences
    naming unknown jobs or including themselves, mirrors onto their own source.
    `known_jobs` are the jobs already stored; a job of the file replaces the one of its name."""
    if len(text) > MAX_JOB_FILE_BYTES:
        raise JobSpecError(f"{filename}: too large for a job file (over 4 MiB)")
    try:
        docs = parse_documents(text)
    except YamlSyntaxError as exc:
        raise JobSpecError(f"{filename}:{exc.line}: {exc}") from None
    if not docs:
        raise JobSpecError(f"{filename}: no job in the file")
    loaded = [_Loaded(_validate(doc, i, filename), doc) for i, doc in enumerate(docs, 1)]
    _check_together(loaded, filename, remotes, dict(known_jobs or {}), report_targets)
    return [item.spec for item in loaded]


def _fail(item: _Loaded, filename: str, loc: Loc, text: str) -> JobSpecError:
    line, path = item.where(loc)
    return JobSpecError(f"{filename}:{line}: {item.spec.kind} {item.spec.name!r}: {path}: {text}")


def _check_together(
    loaded: Sequence[_Loaded],
    filename: str,
    remotes: Collection[str] | None,
    known: dict[str, JobSpec],
    targets: Collection[str] | None,
) -> None:
    first: dict[str, int] = {}
    for item in loaded:
        name = item.spec.name
        if name in first:
            raise _fail(item, filename, ["name"], f"job {name!r} is defined twice (first at "
                        f"line {first[name]})")  # fmt: skip
        first[name] = item.where(["name"])[0]
        _check_schedules(item, filename)
        if remotes is not None:
            _check_remotes(item, filename, set(remotes))
        if targets is not None:
            _check_targets(item, filename, set(targets))
        _check_mirror(item, filename)
    jobs = {**known, **{item.spec.name: item.spec for item in loaded}}
    for item in loaded:
        _check_sequence(item, filename, jobs)


def _check_schedules(item: _Loaded, filename: str) -> None:
    seen: set[str] = set()
    for i, schedule in enumerate(item.spec.schedules):
        if schedule.name in seen:
            raise _fail(item, filename, ["schedules", i, "name"],
                        f"schedule {schedule.name!r} is defined twice in this job")  # fmt: skip
        seen.add(schedule.name)


def _remote_fields(spec: JobSpec) -> list[tuple[Loc, str]]:
    """Every remote name a job refers to, with where it is written."""
    if spec.kind == "backup":
        return [(["remotes", i], r) for i, r in enumerate(spec.remotes)]
    if spec.kind == "mirror":
        targets: list[tuple[Loc, str]] = [(["targets", i], r) for i, r in enumerate(spec.targets)]
        return [(["source"], spec.source), *targets]
    if spec.kind == "metadata":
        return [(["remote"], spec.remote)]
    return []


def _check_remotes(item: _Loaded, filename: str, remotes: set[str]) -> None:
    for loc, name in _remote_fields(item.spec):
        if name not in remotes:
            known = ", ".join(sorted(remotes)) or "none yet: vmkeep remote add"
            raise _fail(item, filename, loc, f"unknown remote {name!r} (known: {known})")


def _check_targets(item: _Loaded, filename: str, targets: set[str]) -> None:
    report = getattr(item.spec, "report", None)
    if report is None:
        return
    for field in ("email", "webhook"):
        for i, name in enumerate(getattr(report, field)):
            if name not in targets:
                raise _fail(item, filename, ["report", field, i],
                            f"unknown report target {name!r}")  # fmt: skip


def _check_mirror(item: _Loaded, filename: str) -> None:
    spec = item.spec
    if spec.kind != "mirror":
        return
    for i, target in enumerate(spec.targets):
        if target == spec.source:
            raise _fail(item, filename, ["targets", i],
                        f"{target!r} is the mirror's own source")  # fmt: skip
    seen: set[str] = set()
    for i, target in enumerate(spec.targets):
        if target in seen:
            raise _fail(item, filename, ["targets", i], f"{target!r} is listed twice")
        seen.add(target)


def _check_sequence(item: _Loaded, filename: str, jobs: Mapping[str, JobSpec]) -> None:
    spec = item.spec
    if spec.kind != "sequence":
        return
    for i, name in enumerate(spec.jobs):
        if name not in jobs:
            raise _fail(item, filename, ["jobs", i], f"unknown job {name!r}")
        cycle = _cycle_through(name, spec.name, jobs)
        if cycle is not None:
            path = " -> ".join([spec.name, *cycle])
            raise _fail(item, filename, ["jobs", i], f"the sequence includes itself ({path})")


def _cycle_through(start: str, target: str, jobs: Mapping[str, JobSpec]) -> list[str] | None:
    """The chain of sequence members from `start` back to `target`, if there is one."""
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    visited: set[str] = set()
    while stack:
        name, chain = stack.pop()
        if name == target:
            return chain
        if name in visited:
            continue
        visited.add(name)
        job = jobs.get(name)
        if job is not None and job.kind == "sequence":
            stack.extend((member, [*chain, member]) for member in reversed(job.jobs))
    return None


def dump_jobs(specs: Sequence[JobSpec]) -> str:
    """YAML that load_jobs reads back equal: one document per job, `kind` and `name` first,
    defaults left out, durations and rates in readable units."""
    docs: list[dict[str, Any]] = [job_to_dict(spec) for spec in specs]
    return yaml.safe_dump_all(
        docs, sort_keys=False, default_flow_style=False, allow_unicode=True, explicit_start=True
    )
