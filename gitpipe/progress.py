"""Live progress of a run in a terminal: every action with its status and duration.

On a terminal the block of actions is redrawn in place (cursor up, clear line) as
statuses change and running durations grow; elsewhere each change is one new line.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import datetime, timezone

from gitpipe import ansi, follow
from gitpipe.models import ActionRecord, RunRecord
from gitpipe.settings import Settings
from gitpipe.store import Store

COLORS = {"succeeded": "32", "failed": "31", "timed-out": "31", "cancelled": "35", "running": "36",
          "waiting": "33", "queued": "90", "pending": "90", "skipped": "90", "interrupted": "33"}
ICONS = {"succeeded": "✔", "failed": "✘", "timed-out": "✘", "cancelled": "⊘", "running": "▶",
         "waiting": "⏸", "pending": "·", "skipped": "-", "interrupted": "↻"}
FMT = "%Y-%m-%dT%H:%M:%S.%fZ"


def paint(status: str, tty: bool) -> str:
    return f"\x1b[{COLORS.get(status, '0')}m{status}\x1b[0m" if tty else status


def seconds(start: str | None, end: str | None) -> float | None:
    """Seconds between two stored times (end None: until now)."""
    if not start:
        return None
    begin = datetime.strptime(start, FMT).replace(tzinfo=timezone.utc)
    stop = datetime.strptime(end, FMT).replace(tzinfo=timezone.utc) if end else datetime.now(timezone.utc)
    return (stop - begin).total_seconds()


def action_line(a: ActionRecord, tty: bool) -> str:
    """One action: stage / name, status, duration, attempts, and why it failed or waits."""
    took = seconds(a.started_at, a.finished_at) if a.status.value not in ("pending", "skipped") else None
    extra = f" {took:.1f}s" if took is not None else ""
    tries = f" (attempt {a.attempts})" if a.attempts > 1 else ""
    # The message may quote a deploy's output or the pipeline: its escapes never reach a terminal.
    msg = f"  {ansi.strip(a.message)}" if a.message and (not a.status.ok or a.type != "run") else ""
    icon = ICONS.get(a.status.value, " ") + " " if tty else ""
    name = ansi.strip(f"{a.stage} / {a.name}")
    allowed = " (allowed to fail)" if a.warning else ""
    return f"  {icon}{name:<30} {paint(a.status.value, tty)}{allowed}{extra}{tries}{msg}"


class Board:
    """Draws the actions of a run; in place on a terminal."""

    def __init__(self, write: Callable[[str], None], tty: bool) -> None:
        self.write, self.tty = write, tty
        self.drawn = 0
        self.seen: dict[int, str] = {}

    def draw(self, actions: list[ActionRecord]) -> None:
        if self.tty:
            out = f"\x1b[{self.drawn}F" if self.drawn else ""
            out += "".join(f"{action_line(a, True)}\x1b[K\n" for a in actions)
            sys.stdout.write(out)
            sys.stdout.flush()
            self.drawn = len(actions)
            return
        for a in actions:
            key = f"{a.status.value}/{a.attempts}"
            if self.seen.get(a.id) != key:
                self.seen[a.id] = key
                self.write(action_line(a, False))


def watch_run(settings: Settings, store: Store, run_id: int, write: Callable[[str], None] | None = None,
              until: Callable[[RunRecord], bool] | None = None) -> RunRecord:
    """Show the run's actions as they change until it finishes (or `until` says so)."""
    tty = write is None and sys.stdout.isatty()
    board = Board(write or (lambda line: print(line, flush=True)), tty)
    done = until or (lambda run: run.status.finished)
    follow.watch([settings.logs_dir / str(run_id)], lambda: done(store.run(run_id)),
                 lambda: board.draw(store.actions(run_id)))
    return store.run(run_id)
