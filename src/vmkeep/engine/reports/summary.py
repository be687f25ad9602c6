"""Human-readable report of a run: the summary an administrator needs first (state, VM counts,
bytes, duration, age of each VM's newest good restore point), details below. Plain text and
HTML carry the same content. Every string from the run passes `redact` first."""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from vmkeep.engine.reports.model import Run, RunState, Task, TaskStats, parse_run

# scheme://userinfo@ : the userinfo (user, user:password, or a token) is replaced whole. The
# password part may hold a raw `/` (tools print unencoded ones); `host:port/path@x` is then
# over-redacted, which is the safe side.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^\s@/?#]*(?::[^\s@]*)?@")


def redact(text: str) -> str:
    """`text` with the userinfo of any URL in it replaced by `***`."""
    return _USERINFO.sub(r"\1***@", text)


def redact_json(value: Any) -> Any:
    """A copy of a JSON-like value with every string (keys included) redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {redact(str(k)): redact_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_json(v) for v in value]
    return value


def redacted_run(run: Run | Mapping[str, Any]) -> Run:
    """The run with every string redacted (validated again, so the result is a Run)."""
    return parse_run(redact_json(parse_run(run).to_json()))


# ---------------------------------------------------------------------------- formatting


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """The two most significant units: `45 s`, `3 min 2 s`, `2 h 5 min`, `3 d`."""
    s = max(0, round(seconds))
    units = (("d", 86400), ("h", 3600), ("min", 60), ("s", 1))
    i = next(i for i, (_, size) in enumerate(units) if s >= size or size == 1)
    name, size = units[i]
    text = f"{s // size} {name}"
    if i + 1 < len(units):
        sub_name, sub_size = units[i + 1]
        rest = (s % size) // sub_size
        if rest:
            text += f" {rest} {sub_name}"
    return text


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


# ---------------------------------------------------------------------------- content


def subtree_stats(task: Task) -> TaskStats:
    """A task's own stats (they cover its subtree), else the sum of its children's."""
    if task.stats is not None:
        return task.stats
    return _sum_stats(subtree_stats(c) for c in task.children)


def _sum_stats(items: Iterable[TaskStats]) -> TaskStats:
    total: dict[str, int | None] = {"bytes_read": None, "bytes_written": None, "bytes_new": None}
    for st in items:
        for key in total:
            v = getattr(st, key)
            if v is not None:
                total[key] = (total[key] or 0) + v
    return TaskStats(**total)


@dataclass(frozen=True)
class Counts:
    ok: int = 0
    partial: int = 0
    failed: int = 0
    skipped: int = 0

    def line(self) -> str:
        parts = [f"{self.ok} ok"]
        if self.partial:
            parts.append(f"{self.partial} partial")
        parts += [f"{self.failed} failed", f"{self.skipped} skipped"]
        return ", ".join(parts) + f" ({self.ok + self.partial + self.failed + self.skipped} total)"


_BUCKET = {
    RunState.SUCCESS: "ok",
    RunState.PARTIAL: "partial",
    RunState.FAILED: "failed",
    RunState.INTERRUPTED: "failed",
    RunState.SKIPPED: "skipped",
    RunState.CANCELLED: "skipped",
}


def vm_counts(run: Run) -> Counts:
    tally = {"ok": 0, "partial": 0, "failed": 0, "skipped": 0}
    for task in run.vm_tasks():
        tally[_BUCKET[task.state]] += 1
    return Counts(**tally)


def _vm_name(task: Task) -> str:
    return task.vm or task.label


def point_ages(run: Run) -> list[tuple[str, str]]:
    """(vm, age of its newest good point at the end of the run, or `none`), VMs of the run
    first in run order, then any other VM the ledger listed."""
    names = [_vm_name(t) for t in run.vm_tasks()]
    names += sorted(set(run.newest_good_points) - set(names))
    out = []
    for name in dict.fromkeys(names):
        when = run.newest_good_points.get(name)
        out.append((name, "none" if when is None else _age(run.finished, when)))
    return out


def _age(now: datetime, then: datetime) -> str:
    delta = (now - then).total_seconds()
    return human_duration(delta) if delta >= 0 else "in the future (clock skew?)"


def subject(run: Run | Mapping[str, Any]) -> str:
    r = redacted_run(run)
    sched = f" ({r.schedule})" if r.schedule else ""
    return f"[vmkeep] {r.job}{sched}: {r.state.value}"


def _summary_lines(r: Run) -> list[str]:
    total = _sum_stats(subtree_stats(t) for t in r.tasks)
    lines = [
        f"Job {r.job}" + (f", schedule {r.schedule}" if r.schedule else "") + f": {r.state.value}",
        f"VMs: {vm_counts(r).line()}",
        f"Data: read {human_bytes(total.bytes_read)}, written {human_bytes(total.bytes_written)}"
        + (f" (new {human_bytes(total.bytes_new)})" if total.bytes_new is not None else ""),
        f"Duration: {human_duration((r.finished - r.started).total_seconds())}"
        f" (started {_ts(r.started)}, trigger {r.trigger}, run {r.id})",
    ]
    ages = point_ages(r)
    if ages:
        lines.append("Newest good restore point:")
        lines += [f"  {vm}: {age}" for vm, age in ages]
    problems = [t for t in r.walk() if t.error and t.kind.value in ("run", "vm", "target")]
    if problems:
        lines.append("Errors:")
        lines += [f"  {_where(t)}: {t.error}" for t in problems]
    return lines


def _where(t: Task) -> str:
    if t.kind.value == "target":
        return f"{t.vm or '?'} -> {t.target or t.label}"
    return t.vm or t.label


def _ts(d: datetime) -> str:
    return d.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def _task_line(t: Task) -> str:
    st = subtree_stats(t)
    bits = [f"{t.kind.value} {t.label}: {t.state.value}"]
    if t.started and t.finished:
        bits.append(human_duration((t.finished - t.started).total_seconds()))
    if st.bytes_read is not None or st.bytes_written is not None:
        bits.append(f"read {human_bytes(st.bytes_read)}, written {human_bytes(st.bytes_written)}")
    if st.bytes_new is not None:
        bits.append(f"new {human_bytes(st.bytes_new)}")
    if st.seconds and st.bytes_read:
        bits.append(f"{human_bytes(int(st.bytes_read / st.seconds))}/s")
    if st.dedup_ratio is not None or st.compression_ratio is not None:
        bits.append(f"dedup {_ratio(st.dedup_ratio)}, compression {_ratio(st.compression_ratio)}")
    return ", ".join(bits)


def _detail_lines(r: Run) -> list[tuple[int, str, str]]:
    """(depth, kind: task|warning|error, text) for every task below the run task."""
    out: list[tuple[int, str, str]] = []

    def visit(t: Task, depth: int) -> None:
        out.append((depth, "task", _task_line(t)))
        out.extend((depth + 1, "warning", w) for w in t.warnings)
        if t.error:
            out.append((depth + 1, "error", t.error))
        for c in t.children:
            visit(c, depth + 1)

    for top in r.tasks:
        visit(top, 0)
    return out


def summary_text(run: Run | Mapping[str, Any]) -> str:
    """The plain-text report: summary first, then the task tree with stats, warnings, errors."""
    r = redacted_run(run)
    lines = [*_summary_lines(r), "", "Details", "-------"]
    prefix = {"task": "", "warning": "warning: ", "error": "ERROR: "}
    lines += ["  " * d + prefix[k] + text for d, k, text in _detail_lines(r)]
    return "\n".join(lines) + "\n"


def summary_html(run: Run | Mapping[str, Any]) -> str:
    """The same content as `summary_text`, as a small self-contained HTML document."""
    r = redacted_run(run)
    e = html.escape
    summary = "".join(f"<li>{e(line.strip())}</li>" for line in _summary_lines(r))
    style = {"task": "", "warning": "color:#8a6d00", "error": "color:#b00020;font-weight:bold"}
    label = {"task": "", "warning": "warning: ", "error": "error: "}
    details = "".join(
        f'<div style="margin-left:{d * 1.5}em;{style[k]}">{e(label[k] + text)}</div>'
        for d, k, text in _detail_lines(r)
    )
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8">'
        f"<title>{e(subject(r))}</title></head><body>"
        f"<h2>{e(r.job)}: {e(r.state.value)}</h2><ul>{summary}</ul>"
        f"<h3>Details</h3>{details}</body></html>\n"
    )
