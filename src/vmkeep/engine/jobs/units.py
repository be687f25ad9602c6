"""Human-friendly quantities in job files: durations ("90s", "5m", "1h30m") and transfer rates
("50MiB/s", "10MB/s", 1048576). Parsed into integers (seconds, bytes per second) so the runner
never handles text, and printed back in the same readable form so an export loads back equal."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer

_DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_RATE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
}  # fmt: skip
_RATE = re.compile(r"^(\d+(?:\.\d+)?)\s*([a-z]*)(?:/s)?$")
MAX_SECONDS = 366 * 86400
MAX_RATE = 1 << 50


def parse_duration(value: object) -> int:
    """Seconds from an integer or a text like "1h30m"; refuses negatives, zero and nonsense."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 90s, 5m or 1h30m")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if text.isdigit():
            seconds = int(text)
        else:
            match = _DURATION.match(text)
            if not text or not match or not any(match.groups()):
                raise ValueError(f"{value!r} is not a duration such as 90s, 5m or 1h30m")
            seconds = sum(
                int(n) * unit
                for n, unit in zip(match.groups(), _DURATION_UNITS.values(), strict=True)
                if n
            )
    else:
        raise ValueError("must be a duration such as 90s, 5m or 1h30m")
    if not 1 <= seconds <= MAX_SECONDS:
        raise ValueError(f"must be between 1 second and 366 days, got {value!r}")
    return seconds


def format_duration(seconds: int) -> str:
    """The shortest text parse_duration reads back as `seconds` ("1h30m", "45s")."""
    parts = []
    rest = seconds
    for unit, size in _DURATION_UNITS.items():
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts) or "0s"


def parse_rate(value: object) -> int:
    """Bytes per second from an integer or "50MiB/s", "10MB/s", "2G" (SI and binary units)."""
    if isinstance(value, bool):
        raise ValueError("must be a rate such as 50MiB/s")
    if isinstance(value, int):
        rate = value
    elif isinstance(value, str):
        match = _RATE.match(value.strip().lower())
        if not match or match.group(2) not in _RATE_UNITS:
            raise ValueError(f"{value!r} is not a rate such as 50MiB/s, 10MB/s or 1048576")
        rate = int(float(match.group(1)) * _RATE_UNITS[match.group(2)])
    else:
        raise ValueError("must be a rate such as 50MiB/s")
    if not 1 <= rate <= MAX_RATE:
        raise ValueError(f"must be a positive rate of at most 1 PiB/s, got {value!r}")
    return rate


def format_rate(rate: int) -> str | int:
    """ "50MiB/s" when `rate` is a whole number of a binary unit, else the plain integer."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if rate % size == 0:
            return f"{rate // size}{unit}/s"
    return rate


# Integers in Python (what the runner uses), readable text in JSON and YAML exports.
Duration = Annotated[
    int,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
]
Rate = Annotated[
    int,
    BeforeValidator(parse_rate),
    PlainSerializer(format_rate, return_type=str | int, when_used="json"),
]
