"""Control characters in text from a remote or a VM directory (a VM name, disk name,
metadata value or error text could carry terminal escape sequences): shown as \\xNN, never
sent raw. Its own module, without rich, for both output.py and safe_console.py."""

from __future__ import annotations

import re

CONTROL_OR_NEWLINE = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0, DEL, C1
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # the same but tab and newline


def visible(match: re.Match[str]) -> str:
    """A matched control character as the text \\xNN."""
    return f"\\x{ord(match.group()):02x}"


def plain(text: object) -> str:
    """`text` on one line, every control character shown as \\xNN (never sent raw)."""
    return CONTROL_OR_NEWLINE.sub(visible, str(text))
