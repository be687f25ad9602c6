"""Run reports: a readable summary (text + HTML), a `report_when` policy, delivery by SMTP
email and signed webhook, and a persisted outbox that retries what could not be sent.
Delivery never raises into a run. Pure engine code: no CLI. See docs/REPORTS.md."""

from vmkeep.engine.reports.delivery import (
    DeliveryResult,
    RetryPolicy,
    deliver,
    report_run,
    retry_outbox,
)
from vmkeep.engine.reports.model import Run, RunState, Task, TaskKind, TaskStats, parse_run
from vmkeep.engine.reports.policy import ReportWhen, should_report
from vmkeep.engine.reports.summary import redact, subject, summary_html, summary_text
from vmkeep.engine.reports.targets import EmailTarget, Target, WebhookTarget, load_targets
from vmkeep.engine.reports.webhook import sign, verify_signature, webhook_body

__all__ = [
    "DeliveryResult",
    "EmailTarget",
    "ReportWhen",
    "RetryPolicy",
    "Run",
    "RunState",
    "Target",
    "Task",
    "TaskKind",
    "TaskStats",
    "WebhookTarget",
    "deliver",
    "load_targets",
    "parse_run",
    "redact",
    "report_run",
    "retry_outbox",
    "should_report",
    "sign",
    "subject",
    "summary_html",
    "summary_text",
    "verify_signature",
    "webhook_body",
]
