"""Following a run from the command line: wake on file events (watchdog), read what is new.

The one user of watchdog (the daemon waits on its wake and spool folders with `inotify`).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

TYPE_CHECKING = False
if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver
# watchdog (~5 MB resident, 70 modules) is imported on first use: the daemon, which imports
# this module through the CLI, waits with `inotify` and never loads it.

STAMP = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")
SAFETY_NET = 1.0  # seconds; the database (status changes) sends no file event we watch
# What wakes a watcher: a file created, written, closed after writing, or moved (inotify is asked
# for these alone). Never a deletion, and never an open, a read or a close without writing,
# which watchdog reports too unless told: a follower reading a log woke itself with its own
# reads, in a loop that took a whole core, and an observer stopped with such an event still
# queued made watchdog print "InotifyEmitter.queue_events() called when the thread is inactive".


def observe(dirs: list[Path], event: threading.Event, recursive: bool = True) -> BaseObserver:
    """A started observer that sets `event` whenever a file under `dirs` changes (see above)."""
    from watchdog.events import (
        DirCreatedEvent,
        DirMovedEvent,
        FileClosedEvent,
        FileCreatedEvent,
        FileModifiedEvent,
        FileMovedEvent,
        FileSystemEvent,
        FileSystemEventHandler,
    )
    from watchdog.observers import Observer

    class _Set(FileSystemEventHandler):
        def on_any_event(self, _event: FileSystemEvent) -> None:
            event.set()

    changes: list[type[FileSystemEvent]] = [FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent,
                                            DirCreatedEvent, DirMovedEvent]
    observer = Observer()
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        observer.schedule(_Set(), str(d), recursive=recursive, event_filter=changes)
    observer.start()
    return observer


def watch(dirs: list[Path], until: Callable[[], bool], step: Callable[[], None]) -> None:
    """Call `step` on every change under `dirs` (and once a second) until `until()` is true."""
    event = threading.Event()
    observer = observe(dirs, event)
    try:
        while True:
            done = until()
            step()
            if done:
                return
            event.wait(SAFETY_NET)
            event.clear()
    finally:
        observer.stop()
        observer.join()


class Tail:
    """Reads a growing log file from where it last stopped, whole lines only."""

    def __init__(self, path: Path, timestamps: bool) -> None:
        self.path = path
        self.offset = 0
        self.timestamps = timestamps

    def read(self, final: bool = False) -> list[bytes]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        if not final:
            data = data[: data.rfind(b"\n") + 1]
        self.offset += len(data)
        lines = data.splitlines()
        return lines if self.timestamps else [STAMP.sub(b"", line) for line in lines]


def stream_logs(store: Any, logs_dir: Path, run_id: int, only: set[int] | None, live: bool,
                timestamps: bool, emit: Callable[[str, bytes], None]) -> None:
    """Emit (label, line) for every log line of a run's actions (or only some), in order per file;
    with `live`, keep following new attempts and lines until those actions (or the run) end."""
    tails: dict[int, Tail] = {}

    def actions() -> list[Any]:
        return [a for a in store.actions(run_id) if only is None or a.id in only]

    def step(final: bool = False) -> None:
        for a in actions():
            attempts = store.attempts(a.id)
            for att in attempts:
                tail = tails.setdefault(att.id, Tail(Path(att.log_path), timestamps))
                label = f"{a.stage}/{a.name}" + (f" attempt {att.number}" if len(attempts) > 1 else "")
                for line in tail.read(final=final or att.status.value != "running"):
                    emit(label, line)

    def finished() -> bool:
        if only is None:
            return bool(store.run(run_id).status.finished)
        return all(a.status.finished for a in actions())

    if live:
        watch([logs_dir / str(run_id)], finished, step)
    step(final=True)
