"""Sending reports without ever failing a run: each target is tried once; a failure is
logged, returned as a DeliveryResult and queued in the outbox; `retry_outbox` later sends
what is due with exponential backoff and drops an entry after `max_attempts`."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from vmkeep.engine.reports.mail import send_email
from vmkeep.engine.reports.model import Run
from vmkeep.engine.reports.outbox import Outbox, OutboxEntry, due, new_entry_id
from vmkeep.engine.reports.policy import ReportWhen, should_report
from vmkeep.engine.reports.summary import redact, redacted_run
from vmkeep.engine.reports.targets import EmailTarget, Target, WebhookTarget
from vmkeep.engine.reports.webhook import post_webhook

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """Attempt n (1-based) that fails waits base * 2**(n-1), at most `max_delay`, before the
    next; after `max_attempts` attempts in all the entry is dropped."""

    max_attempts: int = 8
    base_delay: float = 60.0
    max_delay: float = 3600.0

    def delay(self, attempts: int) -> timedelta:
        return timedelta(seconds=min(self.max_delay, self.base_delay * 2 ** (attempts - 1)))


@dataclass(frozen=True)
class DeliveryResult:
    target: str
    kind: str
    ok: bool
    error: str | None = None
    attempts: int = 1
    queued: Path | None = None  # the outbox entry holding it for a retry
    dropped: bool = False  # retry_outbox gave up on it


def send(run: Run, target: Target, *, delivery_id: str) -> None:
    """One attempt at one target; raises (DeliveryError or anything unexpected) on failure.
    The webhook is signed with the wall clock, not the caller's scheduling `now`: the
    receiver compares it with its own clock."""
    if isinstance(target, EmailTarget):
        send_email(run, target)
    elif isinstance(target, WebhookTarget):
        post_webhook(run, target, now=time.time(), delivery_id=delivery_id)
    else:  # pragma: no cover - the union is closed
        raise TypeError(f"unknown report target {target!r}")


def _attempt(run: Run, target: Target, delivery_id: str) -> str | None:
    """None on success, else the one-line reason (secrets redacted). Never raises."""
    try:
        send(run, target, delivery_id=delivery_id)
        return None
    except Exception as exc:  # a report must never fail the run
        return redact(str(exc) or type(exc).__name__)


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)


def deliver(
    run: Run | Mapping[str, Any],
    targets: Iterable[Target],
    *,
    outbox: Path | None = None,
    now: datetime | None = None,
    policy: RetryPolicy = RetryPolicy(),
) -> list[DeliveryResult]:
    """Send the run's report to every target; never raises. Failures are logged and, when an
    outbox is given, queued there for `retry_outbox`."""
    now = _now(now)
    targets = list(targets)
    try:
        r = redacted_run(run)
    except Exception as exc:  # a malformed run document: say so, per target, and stop
        log.error("report not sent: %s", exc)
        return [DeliveryResult(t.name, t.kind, False, str(exc)) for t in targets]
    results = []
    for target in targets:
        delivery_id = new_entry_id(r.id, target.name)
        error = _attempt(r, target, delivery_id)
        if error is None:
            log.info("report of run %s sent to %s", r.id, target.name)
            results.append(DeliveryResult(target.name, target.kind, True))
            continue
        queued = _queue(outbox, r, target, delivery_id, error, now, policy)
        log.warning(
            "report of run %s to %s failed: %s%s",
            r.id,
            target.name,
            error,
            f"; retry queued for {(now + policy.delay(1)).isoformat()}" if queued else "",
        )
        results.append(DeliveryResult(target.name, target.kind, False, error, queued=queued))
    return results


def _queue(
    outbox: Path | None,
    run: Run,
    target: Target,
    delivery_id: str,
    error: str,
    now: datetime,
    policy: RetryPolicy,
) -> Path | None:
    if outbox is None or policy.max_attempts <= 1:
        return None
    entry = OutboxEntry(
        id=delivery_id,
        target=target.name,
        kind=target.kind,
        run=run.to_json(),
        attempts=1,
        created=now,
        next_attempt=now + policy.delay(1),
        last_error=error,
    )
    try:
        return Outbox(outbox).add(entry)
    except OSError as exc:
        log.error("report of run %s to %s could not be queued: %s", run.id, target.name, exc)
        return None


def report_run(
    run: Run | Mapping[str, Any],
    when: ReportWhen | str,
    targets: Iterable[Target],
    *,
    outbox: Path | None = None,
    now: datetime | None = None,
    policy: RetryPolicy = RetryPolicy(),
) -> list[DeliveryResult]:
    """`deliver` if the `report_when` policy reports this run's state; [] otherwise."""
    try:
        state = redacted_run(run).state
    except Exception as exc:
        log.error("report not sent: %s", exc)
        return []
    if not should_report(when, state):
        return []
    return deliver(run, targets, outbox=outbox, now=now, policy=policy)


def retry_outbox(
    path: Path,
    now: datetime,
    targets: Iterable[Target] | Mapping[str, Target],
    *,
    policy: RetryPolicy = RetryPolicy(),
) -> list[DeliveryResult]:
    """Send every due entry to its target (looked up by name: the outbox holds no settings);
    sent or dropped entries are removed, others rescheduled. Never raises. Returns [] at
    once when another process is working through the same outbox."""
    by_name = dict(targets) if isinstance(targets, Mapping) else {t.name: t for t in targets}
    box = Outbox(path)
    results: list[DeliveryResult] = []
    with box.exclusive() as mine:
        if not mine:
            return results
        for file, entry in box.entries():
            if due(entry, now):
                results.append(_retry_one(box, file, entry, by_name.get(entry.target), now, policy))
    return results


def _retry_one(
    box: Outbox,
    file: Path,
    entry: OutboxEntry,
    target: Target | None,
    now: datetime,
    policy: RetryPolicy,
) -> DeliveryResult:
    attempts = entry.attempts + 1
    if target is None or target.kind != entry.kind:
        box.remove(file)
        reason = f"target {entry.target!r} no longer configured"
        log.error("report %s dropped: %s", entry.id, reason)
        return DeliveryResult(entry.target, entry.kind, False, reason, entry.attempts, dropped=True)
    try:
        run = redacted_run(entry.run)
    except Exception as exc:
        box.remove(file)
        log.error("report %s dropped: its run document is invalid: %s", entry.id, exc)
        return DeliveryResult(entry.target, entry.kind, False, str(exc), attempts, dropped=True)
    error = _attempt(run, target, entry.id)
    if error is None:
        box.remove(file)
        log.info("report of run %s sent to %s at attempt %d", run.id, target.name, attempts)
        return DeliveryResult(target.name, target.kind, True, None, attempts)
    if attempts >= policy.max_attempts:
        box.remove(file)
        log.error(
            "report of run %s to %s dropped after %d attempts; last error: %s",
            run.id,
            target.name,
            attempts,
            error,
        )
        return DeliveryResult(target.name, target.kind, False, error, attempts, dropped=True)
    nxt = now + policy.delay(attempts)
    box.update(
        file,
        entry.model_copy(update={"attempts": attempts, "next_attempt": nxt, "last_error": error}),
    )
    log.warning(
        "report of run %s to %s failed again (attempt %d): %s; next try %s",
        run.id,
        target.name,
        attempts,
        error,
        nxt.isoformat(),
    )
    return DeliveryResult(target.name, target.kind, False, error, attempts, queued=file)
