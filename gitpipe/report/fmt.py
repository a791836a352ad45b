"""Small formatting helpers for the pages: times, durations, sizes (also jinja filters)."""

from __future__ import annotations

import datetime as _dt


def parse_time(text: str | None) -> _dt.datetime | None:
    """A stored ISO 8601 UTC time ("2026-11-26T10:22:24.123Z") as an aware datetime."""
    if not text:
        return None
    try:
        t = _dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


def seconds_between(start: str | None, end: str | None) -> float | None:
    """Seconds from one stored time to another; None when either is missing."""
    a, b = parse_time(start), parse_time(end)
    if a is None or b is None:
        return None
    return max(0.0, (b - a).total_seconds())


def duration(seconds: float | None) -> str:
    """'0.4s', '42s', '4m 05s', '1h 02m'; '' when unknown."""
    if seconds is None:
        return ""
    if seconds < 0.1:
        return "<0.1s"
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def short_duration(seconds: float) -> str:
    """An axis label: '30s', '2m', '1.5h'."""
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.3g}m"
    return f"{seconds / 3600:.3g}h"


def when(text: str | None) -> str:
    """A stored time as '2026-11-26 10:22 UTC' (site.js turns it into '5 min ago')."""
    t = parse_time(text)
    return t.strftime("%Y-%m-%d %H:%M UTC") if t else ""


def size(n: int | None) -> str:
    """Bytes as '812 B', '4.2 KB', '17.0 MB'."""
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"


def now_iso() -> str:
    """The current time in the stored format."""
    t = _dt.datetime.now(_dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"
