"""The rich console every CLI message goes through, in its own module so that rich is imported
only when something is printed (output.LazyConsole)."""

from __future__ import annotations

import re
from typing import Any

from rich.console import Console
from rich.errors import MarkupError
from rich.text import Text

from .output import visible

# Control characters (C0 but tab and newline, DEL, C1): a VM name, disk name, metadata value
# or error text from a remote or a VM directory could carry terminal escape sequences.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class SafeConsole(Console):
    """Every string printed is stripped of raw control characters, and a string whose
    markup does not parse (a `[/]` in a VM name) is printed as plain text instead of
    failing: whatever a caller interpolates, nothing reaches the terminal raw."""

    def render_str(self, text: str, **kwargs: Any) -> Text:
        text = _CONTROL.sub(visible, text)
        try:
            return super().render_str(text, **kwargs)
        except MarkupError:
            return super().render_str(text, **dict(kwargs, markup=False))
