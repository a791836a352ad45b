"""What keeps failing is tried again later and logged once: the daemon's pacing on a full disk.

A worker that could not record its run on a full disk once was started again at once, in a
loop at 100% CPU that wrote 19,000 tracebacks in two minutes. `Backoff` spaces the tries out
(1 s, doubling, up to 30 s); `RepeatFilter` logs a repeated message once, then how many
times it came again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable

FIRST, CAP = 1.0, 30.0  # seconds before the first retry; the longest wait between two


class Backoff:
    """When each failing thing (a run id, "spool", "loop") may be tried again."""

    def __init__(self, first: float = FIRST, cap: float = CAP) -> None:
        self.first, self.cap = first, cap
        self._delay: dict[Hashable, float] = {}
        self._due: dict[Hashable, float] = {}
        self._lock = threading.Lock()  # workers report from their own threads

    def failed(self, key: Hashable) -> float:
        """It failed again: wait twice as long as last time (at most `cap`); that delay."""
        with self._lock:
            delay = min(self.cap, self._delay.get(key, self.first / 2) * 2)
            self._delay[key] = delay
            self._due[key] = time.monotonic() + delay
        return delay

    def succeeded(self, key: Hashable) -> None:
        with self._lock:
            self._delay.pop(key, None)
            self._due.pop(key, None)

    def waiting(self, key: Hashable) -> bool:
        """Whether it must not be tried yet."""
        with self._lock:
            return self._due.get(key, 0.0) > time.monotonic()

    def next_in(self) -> float | None:
        """Seconds until the next retry comes due (None: none is still to come).

        A retry already due is not counted: whoever next looks takes it, and counting it
        would wake the loop at once, again and again, while it cannot be taken (paused).
        """
        now = time.monotonic()
        with self._lock:
            ahead = [due - now for due in self._due.values() if due > now]
        return min(ahead) if ahead else None


class RepeatFilter(logging.Filter):
    """Lets a message (with its error) through once per `window` seconds; counts the rest.

    The count is told in one line when the window ends (`flush`, called from the daemon's
    loop and at its stop), or with the message's next appearance.
    """

    def __init__(self, window: float = 60.0) -> None:
        super().__init__()
        self.window = window
        self._seen: dict[tuple[object, ...], list[float | int]] = {}  # key -> [first time, repeats]
        self._lock = threading.Lock()
        self._summary = logging.getLogger("gitpipe")

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "repeat_summary", False):
            return True
        exc = record.exc_info[1] if record.exc_info else None
        key = (record.levelno, record.getMessage(), type(exc).__name__, str(exc))
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen[0] < self.window:
                seen[1] += 1
                return False
            if len(self._seen) > 1000:  # bounded, whatever the messages
                self._seen.clear()
            self._seen[key] = [now, 0]
        if seen is not None and seen[1]:
            self._tell(record.levelno, record.getMessage(), int(seen[1]), now - seen[0])
        return True

    def next_flush(self) -> float | None:
        """Seconds until the first window with repeats to tell ends (None: none has any)."""
        now = time.monotonic()
        with self._lock:
            ends = [float(seen[0]) + self.window - now for seen in self._seen.values() if seen[1]]
        return max(0.0, min(ends)) if ends else None

    def flush(self, force: bool = False) -> None:
        """Tell the counts of the windows that ended (all of them with `force`)."""
        now = time.monotonic()
        told = []
        with self._lock:
            for key, seen in list(self._seen.items()):
                if force or now - seen[0] >= self.window:
                    del self._seen[key]
                    if seen[1]:
                        told.append((key, int(seen[1]), now - seen[0]))
        for key, count, span in told:
            level, message = key[0], key[1]
            assert isinstance(level, int)
            self._tell(level, str(message), count, span)

    def _tell(self, level: int, message: str, count: int, span: float) -> None:
        first = message.splitlines()[0] if message else ""
        self._summary.log(level, "repeated %d more time(s) in %.0f s: %s", count, span, first,
                          extra={"repeat_summary": True})
