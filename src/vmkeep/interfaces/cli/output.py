"""Rendering for the CLI: JSON, tables, progress bars (the passphrase sources are in
passphrase.py, control characters in control_chars.py)."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

from .control_chars import plain as plain  # re-exported: the CLI's modules take it from here

if TYPE_CHECKING:
    from rich.progress import Progress
    from rich.table import Table

    from .safe_console import SafeConsole


def shown(text: object) -> str:
    """A value from a remote or a VM, safe inside rich markup: plain(), markup escaped."""
    from rich.markup import escape

    return escape(plain(text))


class LazyConsole:
    """A SafeConsole (safe_console.py) made at its first use: rich's import (~0.02 CPU-s) is
    not paid by a command that prints nothing through it, such as `backup --json` or
    `restore --json` (docs/DATA-PATH.md "Start-up of backup and restore")."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._real: SafeConsole | None = None

    @property
    def real(self) -> SafeConsole:
        if self._real is None:
            from .safe_console import SafeConsole

            self._real = SafeConsole(**self._options)
        return self._real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


# Output to a file or a pipe is for logs: a message stays one line however long (soft_wrap);
# only tables are laid out, 160 columns wide when stdout is not a terminal.
console = LazyConsole(stderr=True, soft_wrap=not sys.stderr.isatty())
stdout = LazyConsole(width=None if sys.stdout.isatty() else 160, soft_wrap=not sys.stdout.isatty())
_json_printed = False


def print_error(message: str) -> None:
    from rich.text import Text

    console.print(Text.assemble(("error: ", "bold red"), plain(message)), soft_wrap=True)


def print_json(data: Any) -> None:
    global _json_printed
    _json_printed = True
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def print_json_error(message: str, exit_code: int) -> None:
    """With --json, a failure is a JSON object on stdout too, unless the command already
    printed its JSON result (then stdout stays one document; the exit code tells)."""
    if not _json_printed:
        print_json({"error": message, "exit_code": exit_code})


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def table(*columns: str, title: str | None = None) -> Table:
    """A listing table; the first column (an ID to copy) never wraps or truncates."""
    from rich.table import Table

    result = Table(title=title)
    for i, name in enumerate(columns):
        result.add_column(name, no_wrap=i == 0, overflow="fold" if i else "ignore")
    return result


LARGE_LISTING = 500  # rows above which a listing is printed as plain columns


def print_plain_table(columns: list[str], rows: list[list[str]], title: str = "") -> None:
    """A long listing as aligned plain columns: rich measures and renders every cell (~7 s
    of CPU for 10,000 restore points), this costs a few milliseconds. Values pass through
    plain(): no control character reaches the terminal."""
    cells = [[plain(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = [title] if title else []
    for row in [columns, *cells]:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    sys.stdout.write("\n".join(lines) + "\n")


class RichProgress:
    """Progress bar with throughput and ETA, on stderr so --json output stays clean."""

    def __init__(self, enabled: bool = True, unit_bytes: bool = True) -> None:
        self.enabled = enabled and console.is_terminal
        self.unit_bytes = unit_bytes
        self._bar: Progress | None = None
        self._task: Any = None

    def start(self, description: str, total: int) -> None:
        self.finish()
        if not self.enabled:
            return
        # rich.progress only when a bar is shown: it is a tenth of rich's import time.
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        columns: list[Any] = [TextColumn("{task.description}"), BarColumn()]
        if self.unit_bytes and description not in ("verify", "gc"):
            columns += [DownloadColumn(binary_units=True), TransferSpeedColumn()]
        else:
            columns += [TextColumn("{task.completed}/{task.total}")]
        columns.append(TimeRemainingColumn())
        self._bar = Progress(*columns, console=console.real, transient=False)
        self._bar.start()
        self._task = self._bar.add_task(shown(description), total=total)

    def advance(self, amount: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, amount)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def note(self, message: str) -> None:
        console.print(f"[yellow]note:[/] {shown(message)}")
