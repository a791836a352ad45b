"""Durations as pipeline files and gitpipe.toml write them: "90s", "10m", "2h", "1h30m"."""

from __future__ import annotations

import re

_DURATION = re.compile(
    r"(?:(\d+(?:\.\d+)?)d)?\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?"
)


def parse_duration(value: str) -> float:
    """Seconds in a duration such as "90s", "10m", "2h", "1d" or "1h30m"."""
    text = value.strip() if isinstance(value, str) else ""
    match = _DURATION.fullmatch(text)
    if match is None or not any(match.groups()):
        hint = f' (no unit: did you mean "{text}s"?)' if re.fullmatch(r"\d+", text) else ""
        raise ValueError(
            f'bad duration "{value}"{hint}: write numbers with units d, h, m or s, '
            'e.g. "90s", "10m", "2h" or "1h30m"'
        )
    return sum(float(n) * unit for n, unit in zip(match.groups(), (86400, 3600, 60, 1)) if n)


def format_duration(seconds: float) -> str:
    """The inverse of parse_duration, in hours at most: 86400 -> "24h", 90 -> "1m30s", 2 -> "2s"."""
    left = round(seconds)
    parts = [f"{n}{unit}" for n, unit in ((left // 3600, "h"), (left % 3600 // 60, "m"), (left % 60, "s")) if n]
    return "".join(parts) or "0s"
