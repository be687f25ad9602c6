"""Named report targets (SMTP email, signed webhook) kept as one JSON list in the secret store
(`report/targets`, encrypted with the server key: passwords and signing secrets are never in
the database in clear). Engine functions shared by `vmkeep report-target` and the REST API;
`list_targets` never returns a secret (docs/RUNS.md §7)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from vmkeep.engine.reports import DeliveryResult, deliver, load_targets
from vmkeep.errors import NotFoundError, UsageError

from .context import REPORT_TARGETS_SECRET, EngineContext

SECRET_FIELDS = ("password", "secret")


def _store(ctx: EngineContext, targets: list[dict[str, Any]]) -> None:
    load_targets(targets)  # ReportError naming the bad target and field: nothing stored
    ctx.secrets.put_secret(REPORT_TARGETS_SECRET, json.dumps(targets).encode())


def add_target(ctx: EngineContext, target: dict[str, Any], *, replace: bool = False) -> None:
    """Add one target (its settings as docs/REPORTS.md names them, secrets included);
    a name already used is refused unless `replace`."""
    name = target.get("name")
    current = ctx.report_targets()
    if any(t.get("name") == name for t in current):
        if not replace:
            raise UsageError(f"report target {name!r} exists: remove it first (or --replace)")
        current = [t for t in current if t.get("name") != name]
    _store(ctx, [*current, target])


def remove_target(ctx: EngineContext, name: str) -> None:
    current = ctx.report_targets()
    if not any(t.get("name") == name for t in current):
        raise NotFoundError(f"no report target named {name!r} (see `vmkeep report-target list`)")
    _store(ctx, [t for t in current if t.get("name") != name])


def list_targets(ctx: EngineContext) -> list[dict[str, Any]]:
    """The targets with their secrets replaced by `set` (what may be printed)."""
    return [
        {k: ("set" if k in SECRET_FIELDS and v is not None else v) for k, v in t.items()}
        for t in ctx.report_targets()
    ]


def test_run_document() -> dict[str, Any]:
    """A run document that says it is a test (what `report-target test` sends)."""
    now = datetime.now(UTC).isoformat()
    return {
        "id": "test",
        "job": "report-target-test",
        "schedule": None,
        "state": "success",
        "trigger": "test",
        "started": now,
        "finished": now,
        "tasks": [],
        "newest_good_points": {},
    }


def send_test(ctx: EngineContext, name: str) -> DeliveryResult:
    """Send a test report to one target now, once (no outbox): the result says whether it
    arrived and, if not, why (secrets redacted)."""
    chosen = [t for t in ctx.report_targets() if t.get("name") == name]
    if not chosen:
        raise NotFoundError(f"no report target named {name!r} (see `vmkeep report-target list`)")
    (result,) = deliver(test_run_document(), load_targets(chosen))
    return result
