"""The durable intake of runs, with nothing but the standard library's cheapest modules.

Every `git push` pays for what this module imports (measured: `re`/`enum`/`json`/
`subprocess`/`dataclasses` each add 5-15 ms to a hook), so it uses only os, time and
sqlite3. The schema belongs to store.py's migrations; this module only inserts new
runs and their first event, in one BEGIN IMMEDIATE transaction (WAL, synchronous=FULL).
"""

from __future__ import annotations

import os
import time

try:  # the C module itself: `sqlite3` adds datetime adapters this module never uses (~5 ms per push)
    import _sqlite3 as sqlite3
except ImportError:  # another Python implementation
    import sqlite3  # type: ignore[no-redef]
TYPE_CHECKING = False  # not `from typing import ...`: importing typing costs each push ~14 ms
if TYPE_CHECKING:
    from typing import Any

BUSY_TIMEOUT_MS = 30_000
RUN_FIELDS = ("repo", "pipeline", "ref", "sha", "before_sha", "trigger", "pusher", "error",
              "pipeline_text", "retry_of", "commit_author", "commit_message")


def now_iso(t: float | None = None) -> str:
    """A time as ISO 8601 UTC with milliseconds, the format of every stored time."""
    t = time.time() if t is None else t
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % (int(t * 1000) % 1000)


def connect(db_path: str | os.PathLike[str], *, setup: bool = True) -> sqlite3.Connection:
    """A connection for durable writes: WAL, synchronous=FULL, a busy timeout.

    The hook passes setup=False: WAL mode is a property of the database file, set by the
    daemon's connection when it created it, so the hook need not set it again.
    """
    conn = sqlite3.connect(str(db_path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                           check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA synchronous=FULL")
    if setup:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=ON")
    return conn


def insert_run(conn: sqlite3.Connection, run: dict[str, Any]) -> int:
    """Insert one run: queued, or failed at once when it carries an error. Caller holds the transaction."""
    now = now_iso()
    status = "failed" if run.get("error") else "queued"
    values = [run.get(k) for k in RUN_FIELDS]
    cur = conn.execute(
        f"INSERT INTO runs ({', '.join(RUN_FIELDS)}, status, created_at, finished_at) "
        f"VALUES ({', '.join('?' for _ in RUN_FIELDS)}, ?, ?, ?)",
        (*values, status, now, now if run.get("error") else None),
    )
    run_id = int(cur.lastrowid or 0)
    conn.execute("INSERT INTO events (run_id, at, subject, status, detail) VALUES (?,?,?,?,?)",
                 (run_id, now, "run", status, run.get("error")))
    return run_id


def record(db_path: str | os.PathLike[str], runs: list[dict[str, Any]]) -> list[int]:
    """Insert runs in one durable transaction; returns their ids."""
    conn = connect(db_path, setup=False)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            ids = [insert_run(conn, r) for r in runs]
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return ids
    finally:
        conn.close()


def wake(home: str, name: str = "wake") -> None:
    """Tell a running daemon to look at the queue: a new file in the watched wake/ directory."""
    wake_dir = os.path.join(home, "wake")
    os.makedirs(wake_dir, exist_ok=True)
    path = os.path.join(wake_dir, f"{name}-{os.getpid()}-{time.monotonic_ns()}")
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
