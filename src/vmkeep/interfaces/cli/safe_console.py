"""The rich console every CLI message goes through, in its own module so that rich is imported
only when something is printed (output.LazyConsole)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.errors import MarkupError
from rich.text import Text

from .control_chars import CONTROL, visible


class SafeConsole(Console):
    """Every string printed is stripped of raw control characters, and a string whose
    markup does not parse (a `[/]` in a VM name) is printed as plain text instead of
    failing: whatever a caller interpolates, nothing reaches the terminal raw."""

    def render_str(self, text: str, **kwargs: Any) -> Text:
        text = CONTROL.sub(visible, text)
        try:
            return super().render_str(text, **kwargs)
        except MarkupError:
            return super().render_str(text, **dict(kwargs, markup=False))
