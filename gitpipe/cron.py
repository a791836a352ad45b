"""Cron lines (UTC): the one user of croniter.

croniter is imported on first use: ~5 MB an idle daemon without a schedule never pays, and
validating a pipeline without a `schedule` never loads it either.
"""

from __future__ import annotations

import datetime as dt
from typing import Any


def croniter(line: str, start: dt.datetime | None = None) -> Any:
    """croniter's iterator over a cron line from `start`; ValueError or KeyError for a bad line."""
    from croniter import croniter as iterator  # type: ignore[import-untyped]

    return iterator(line) if start is None else iterator(line, start)
