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
PIPELINE_FILE = ".pipeline.toml"  # what a pushed commit's pipeline is read from (here: every hook imports this module)
KEY_PREFIX = "recorded:"  # state rows naming a push (or spool entry) already recorded: see record_on
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


def record(db_path: str | os.PathLike[str], runs: list[dict[str, Any]], key: str | None = None) -> list[int]:
    """Insert runs in one durable transaction; returns their ids. See record_on for `key`."""
    conn = connect(db_path, setup=False)
    try:
        return record_on(conn, runs, key)
    finally:
        conn.close()


def record_on(conn: sqlite3.Connection, runs: list[dict[str, Any]], key: str | None = None) -> list[int]:
    """Insert runs in one durable transaction on `conn`; returns their ids.

    With `key` (push_key), a push is recorded once however many try: the key is written in the
    same transaction as the runs, and a second try under the same key (the hook's own fallback
    after the daemon took the push but died before answering, or answered too late) gets the
    ids recorded the first time, and writes nothing.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        row = None if key is None else conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        if row is not None:
            conn.execute("ROLLBACK")
            return recorded_ids(row[0])
        ids = [insert_run(conn, r) for r in runs]
        if key is not None:
            conn.execute("INSERT INTO state (key, value) VALUES (?, ?)", (key, key_value(ids)))
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return ids


def key_value(ids: list[int]) -> str:
    """What a key's state row holds: when (for prune_keys), and the ids of the runs recorded."""
    return f"{int(time.time())} {','.join(map(str, ids))}"


def recorded_ids(value: str) -> list[int]:
    """The run ids of a key's state row (key_value)."""
    return [int(x) for x in str(value).partition(" ")[2].split(",") if x]


def push_key(repo: str, receive_pack: int, hook: int, text: str) -> str:
    """The key a push is recorded under (see record_on): its repo, the pids of git's receive-pack
    and of the post-receive hook (both alive for the whole push, so no two pushes share them at
    once), and a digest of its ref lines (so a pid pair used again later is another push)."""
    try:
        from _sha256 import sha256  # type: ignore[import-not-found]  # hashlib's import costs ~20 ms
    except ImportError:
        from hashlib import sha256
    lines = "\n".join(line for line in text.split("\n") if line.count(" ") == 2)
    digest = sha256(lines.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return f"{KEY_PREFIX}push:{repo}:{receive_pack}:{hook}:{digest}"


def prune_keys(conn: sqlite3.Connection, before: float) -> int:
    """Forget the keys of pushes (and spool entries) recorded before `before` (a Unix time); how many."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        cur = conn.execute("DELETE FROM state WHERE key >= ? AND key < ? AND CAST(value AS INTEGER) < ?",
                           (KEY_PREFIX, KEY_PREFIX[:-1] + chr(ord(KEY_PREFIX[-1]) + 1), int(before)))
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return cur.rowcount


def wake(home: str, name: str = "wake") -> None:
    """Tell a running daemon to look at the queue: a new file in the watched wake/ directory."""
    wake_dir = os.path.join(home, "wake")
    os.makedirs(wake_dir, exist_ok=True)
    path = os.path.join(wake_dir, f"{name}-{os.getpid()}-{time.monotonic_ns()}")
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
