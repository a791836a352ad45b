"""Live progress of a run in a terminal: each action's status and duration as it changes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import datetime

from gitpipe import follow
from gitpipe.models import ActionRecord, RunRecord
from gitpipe.settings import Settings
from gitpipe.store import Store

COLORS = {"succeeded": "32", "failed": "31", "timed-out": "31", "cancelled": "35", "running": "36",
          "waiting": "33", "queued": "90", "pending": "90", "skipped": "90", "interrupted": "33"}
FMT = "%Y-%m-%dT%H:%M:%S.%fZ"


def paint(status: str, tty: bool) -> str:
    return f"\x1b[{COLORS.get(status, '0')}m{status}\x1b[0m" if tty else status


def seconds(start: str | None, end: str | None) -> float | None:
    if not start:
        return None
    stop = datetime.strptime(end, FMT) if end else datetime.utcnow()
    return (stop - datetime.strptime(start, FMT)).total_seconds()


def action_line(a: ActionRecord, tty: bool) -> str:
    took = seconds(a.started_at, a.finished_at) if a.status.finished else None
    extra = f" {took:.1f}s" if took is not None and a.status.value != "skipped" else ""
    tries = f" (attempt {a.attempts})" if a.attempts > 1 else ""
    msg = f"  {a.message}" if a.message and not a.status.ok else ""
    return f"  {a.stage + ' / ' + a.name:<34} {paint(a.status.value, tty)}{extra}{tries}{msg}"


def watch_run(settings: Settings, store: Store, run_id: int, write: Callable[[str], None] | None = None,
              until: Callable[[RunRecord], bool] | None = None) -> RunRecord:
    """Print every change of an action's status until the run finishes (or `until` says so)."""
    out = write or (lambda line: print(line, flush=True))
    tty = sys.stdout.isatty()
    seen: dict[int, str] = {}
    done = until or (lambda run: run.status.finished)

    def step() -> None:
        for a in store.actions(run_id):
            key = f"{a.status.value}/{a.attempts}"
            if seen.get(a.id) != key:
                seen[a.id] = key
                out(action_line(a, tty))

    follow.watch([settings.logs_dir / str(run_id)], lambda: done(store.run(run_id)), step)
    return store.run(run_id)
