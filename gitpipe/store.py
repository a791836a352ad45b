"""The database: migrations, every state transition, and the queries the commands need.

The only user of sqlite-utils. Every change of a run, stage or action goes through
one named function here, inside one transaction, checked against the allowed
transitions in lifecycle.py (which also says what status follows what), and written
together with an `events` row; listeners (the report, notifications) hear of it after
the commit.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from gitpipe import intake, lifecycle, queue, records, space
from gitpipe.errors import DiskFullError, TransitionError, UsageError
from gitpipe.intake import now_iso
from gitpipe.models import (
    ActionRecord,
    ActionStatus,
    ApprovalRecord,
    ArtifactRecord,
    AttemptRecord,
    CacheEntry,
    CacheUse,
    DeployRecord,
    Event,
    OutputRecord,
    Pipeline,
    RefusalRecord,
    ReleaseRecord,
    RepoRecord,
    RunRecord,
    RunStatus,
    StageRecord,
)
from gitpipe.queries import Queries
from gitpipe.queue import NewRun
from gitpipe.settings import Settings
from gitpipe.sqlrows import Rows

# Named migrations, applied in order, each once. A shipped migration is never edited:
# add a new one instead.
MIGRATIONS: list[tuple[str, str]] = [
    (
        "0001_core",
        """
        CREATE TABLE repos (name TEXT PRIMARY KEY, path TEXT NOT NULL, added_at TEXT NOT NULL,
                            removed_at TEXT);
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT, repo TEXT NOT NULL, pipeline TEXT NOT NULL,
            ref TEXT NOT NULL, sha TEXT NOT NULL, before_sha TEXT, status TEXT NOT NULL,
            trigger TEXT NOT NULL, pusher TEXT, created_at TEXT NOT NULL, started_at TEXT,
            finished_at TEXT, error TEXT, pipeline_text TEXT, retry_of INTEGER,
            deadline REAL, cancel_requested_at TEXT, cancelled_by TEXT, cancel_reason TEXT,
            commit_author TEXT, commit_message TEXT);
        CREATE INDEX runs_status ON runs(status);
        CREATE INDEX runs_repo ON runs(repo, id);
        CREATE TABLE stages (run_id INTEGER NOT NULL REFERENCES runs(id), idx INTEGER NOT NULL,
            name TEXT NOT NULL, status TEXT NOT NULL, started_at TEXT, finished_at TEXT,
            PRIMARY KEY (run_id, idx));
        CREATE TABLE actions (id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL REFERENCES runs(id),
            stage_idx INTEGER NOT NULL, idx INTEGER NOT NULL, stage TEXT NOT NULL, name TEXT NOT NULL,
            type TEXT NOT NULL, run_order INTEGER NOT NULL, status TEXT NOT NULL, exit_code INTEGER,
            started_at TEXT, finished_at TEXT, attempts INTEGER NOT NULL DEFAULT 0, message TEXT,
            UNIQUE (run_id, stage_idx, idx));
        CREATE TABLE attempts (id INTEGER PRIMARY KEY, action_id INTEGER NOT NULL REFERENCES actions(id),
            number INTEGER NOT NULL, status TEXT NOT NULL, exit_code INTEGER, started_at TEXT NOT NULL,
            finished_at TEXT, deadline REAL, log_path TEXT NOT NULL, token TEXT NOT NULL,
            UNIQUE (action_id, number));
        CREATE TABLE artifacts (id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL REFERENCES runs(id),
            name TEXT NOT NULL, action TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL,
            path TEXT NOT NULL, files INTEGER NOT NULL, UNIQUE (run_id, name));
        CREATE TABLE outputs (run_id INTEGER NOT NULL REFERENCES runs(id), action TEXT NOT NULL,
            key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (run_id, action, key));
        CREATE TABLE events (id INTEGER PRIMARY KEY, run_id INTEGER, at TEXT NOT NULL,
            subject TEXT NOT NULL, status TEXT NOT NULL, detail TEXT);
        CREATE INDEX events_run ON events(run_id);
        CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT);
        """,
    ),
    (
        "0002_delivery",
        """
        CREATE TABLE approvals (id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL REFERENCES runs(id),
            action_id INTEGER NOT NULL UNIQUE REFERENCES actions(id), action TEXT NOT NULL, message TEXT,
            requested_at TEXT NOT NULL, deadline REAL, decision TEXT, by_user TEXT, at TEXT, comment TEXT);
        CREATE TABLE releases (id INTEGER PRIMARY KEY, repo TEXT NOT NULL, environment TEXT NOT NULL,
            run_id INTEGER, action_id INTEGER, sha TEXT, release TEXT NOT NULL, status TEXT NOT NULL,
            at TEXT NOT NULL, by_user TEXT, targets TEXT NOT NULL, message TEXT);
        CREATE INDEX releases_env ON releases(repo, environment, id);
        CREATE TABLE deploys (action_id INTEGER PRIMARY KEY REFERENCES actions(id), run_id INTEGER NOT NULL,
            repo TEXT NOT NULL, environment TEXT NOT NULL, release TEXT NOT NULL, targets TEXT NOT NULL,
            started_at TEXT NOT NULL, finished_at TEXT);
        """,
    ),
    ("0003_retention", "ALTER TABLE runs ADD COLUMN pruned_at TEXT"),
    (
        "0004_allow_failure_matrix_reuse",
        """
        ALTER TABLE actions ADD COLUMN allow_failure INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE actions ADD COLUMN matrix_group TEXT;
        ALTER TABLE actions ADD COLUMN matrix_values TEXT;
        ALTER TABLE actions ADD COLUMN reused_from INTEGER;
        CREATE TABLE reuse (run_id INTEGER NOT NULL REFERENCES runs(id), stage_idx INTEGER NOT NULL,
            idx INTEGER NOT NULL, from_action INTEGER NOT NULL REFERENCES actions(id),
            PRIMARY KEY (run_id, stage_idx, idx));
        """,
    ),
    (
        "0005_inputs_approvers",
        """
        ALTER TABLE runs ADD COLUMN inputs TEXT;
        ALTER TABLE approvals ADD COLUMN note TEXT;
        CREATE TABLE approval_refusals (id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL REFERENCES runs(id),
            action_id INTEGER NOT NULL REFERENCES actions(id), action TEXT NOT NULL, decision TEXT NOT NULL,
            by_user TEXT NOT NULL, at TEXT NOT NULL, reason TEXT NOT NULL);
        CREATE INDEX approval_refusals_run ON approval_refusals(run_id)
        """,
    ),
    (
        "0006_release_details",  # a release row: from where a rollback came, which run did it, the slots
        """
        ALTER TABLE releases ADD COLUMN from_release TEXT;
        ALTER TABLE releases ADD COLUMN by_run INTEGER;
        ALTER TABLE releases ADD COLUMN strategy TEXT;
        ALTER TABLE releases ADD COLUMN live_slot TEXT;
        ALTER TABLE releases ADD COLUMN idle_release TEXT
        """,
    ),
    (
        "0007_cache",
        """
        CREATE TABLE cache_entries (id TEXT PRIMARY KEY, repo TEXT NOT NULL, action TEXT NOT NULL,
            slot TEXT NOT NULL, key TEXT NOT NULL, paths TEXT NOT NULL, protected INTEGER NOT NULL,
            secrets INTEGER NOT NULL, host TEXT NOT NULL, size INTEGER NOT NULL, files INTEGER NOT NULL,
            created_at TEXT NOT NULL, last_used_at TEXT NOT NULL, run_id INTEGER);
        CREATE INDEX cache_entries_slot ON cache_entries(repo, action, slot, created_at);
        CREATE TABLE cache_uses (action_id INTEGER NOT NULL REFERENCES actions(id), attempt INTEGER NOT NULL,
            idx INTEGER NOT NULL, paths TEXT NOT NULL, match TEXT NOT NULL, entry TEXT, restored_size INTEGER,
            restore_seconds REAL, saved_entry TEXT, saved_size INTEGER, save_seconds REAL, note TEXT,
            PRIMARY KEY (action_id, attempt, idx));
        """,
    ),
]
# What `runs` rows are read with: the counts the lists show beside a run's status.
RUN_COLUMNS = """runs.*,
    (SELECT COUNT(*) FROM actions a WHERE a.run_id = runs.id AND a.allow_failure = 1
        AND a.status IN ('failed', 'timed-out')) AS warnings,
    (SELECT COUNT(*) FROM actions a WHERE a.run_id = runs.id AND a.reused_from IS NOT NULL) AS reused"""

Listener = Callable[[Event], None]
REFUSALS_KEPT = 100  # refused attempts recorded per approval


class Store(Queries):
    """One connection to gitpipe.db, shared by the daemon's threads under a lock (the reads
    of the report, retention and the CLI are in queries.py, inherited)."""

    def __init__(self, settings: Settings) -> None:
        settings.home.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.conn = intake.connect(settings.db_path)
        self.db = Rows(self.conn)
        self.lock = threading.RLock()
        self.listeners: list[Listener] = []
        self._pending: list[Event] = []
        self._pending_ids: list[int] = []  # the events table ids of _pending
        self._own: set[int] = set()  # ids of events this connection wrote, not yet past foreign_events' mark
        self._depth = 0
        self.migrate()

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------------ plumbing
    def migrate(self) -> list[str]:
        """Apply the migrations not applied yet; returns their names."""
        with self.lock:
            self.conn.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, at TEXT)")
            done = {r[0] for r in self.conn.execute("SELECT name FROM migrations")}
            applied = []
            for name, sql in MIGRATIONS:
                if name in done:
                    continue
                self.conn.execute("BEGIN IMMEDIATE")
                # Look again under the write lock: another process (the daemon, a command run
                # at the same moment) may have applied it since `done` was read.
                if self.conn.execute("SELECT 1 FROM migrations WHERE name = ?", (name,)).fetchone():
                    self.conn.execute("COMMIT")
                    continue
                try:
                    for statement in sql.split(";"):
                        if statement.strip():
                            self.conn.execute(statement)
                    self.conn.execute("INSERT INTO migrations VALUES (?, ?)", (name, now_iso()))
                except BaseException:
                    self.conn.execute("ROLLBACK")
                    raise
                self.conn.execute("COMMIT")
                applied.append(name)
            return applied

    @contextmanager
    def tx(self, *, synced: bool = True) -> Iterator[Rows]:
        """One write transaction (BEGIN IMMEDIATE); events are sent to listeners after commit.

        On a full disk the whole transaction is rolled back and a DiskFullError raised: a
        change is recorded entirely or not at all.

        `synced=False` commits without waiting for the disk (synchronous=NORMAL): for a change
        the same thread follows at once by a synced commit, whose fsync of the write-ahead log
        makes both durable (a stage starting before its action's attempt, an attempt ending
        before its action). A crash in between loses only what recovery derives again.
        """
        with self.lock:
            if self._depth:  # nested: part of the caller's transaction
                yield self.db
                return
            if not synced:
                self.conn.execute("PRAGMA synchronous=NORMAL")
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                self._depth = 1
                try:
                    yield self.db
                    # Inside the try: a COMMIT that fails (SQLITE_FULL) must not leave the
                    # transaction open, or every later BEGIN of this connection fails too.
                    self.conn.execute("COMMIT")
                except BaseException:
                    if self.conn.in_transaction:  # SQLite may have rolled it back already
                        self.conn.execute("ROLLBACK")
                    self._pending.clear()
                    self._pending_ids.clear()  # rolled back: another process may be given these ids
                    raise
                finally:
                    self._depth = 0
                    if not synced:
                        self.conn.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as exc:
                if space.sqlite_full(exc, self.settings.home):
                    raise DiskFullError(f"the disk holding {self.settings.home} is full: "
                                        f"{self.settings.db_path.name} could not be written, nothing was changed",
                                        hint="free space there, then try again") from exc
                raise
            events, self._pending = self._pending, []
            self._own.update(self._pending_ids)
            self._pending_ids.clear()
        for event in events:
            for listener in list(self.listeners):
                listener(event)

    def _event(self, event: Event) -> None:
        """Store an event with the change it records; listeners hear of it after the commit."""
        cur = self.conn.execute(
            "INSERT INTO events (run_id, at, subject, status, detail) VALUES (?,?,?,?,?)",
            (event.run_id, now_iso(), records.encode(event), event.status, event.detail),
        )
        self._pending.append(event)
        self._pending_ids.append(int(cur.lastrowid or 0))

    def newest_event(self) -> int:
        """The id of the newest event recorded (0 when none)."""
        return int(self.query("SELECT COALESCE(MAX(id), 0) AS top FROM events")[0]["top"])

    def foreign_events(self, after: int) -> tuple[list[Event], int]:
        """The events other processes (the hooks, commands) recorded after the event id `after`,
        and the newest event id: how the daemon hears of changes it did not make itself (a run
        failed at the push, a queued run cancelled by a command).

        Writers take turns (BEGIN IMMEDIATE), so ids grow in commit order and `after` can move
        on to the newest id read.
        """
        with self.lock:
            rows = self.query("SELECT id, run_id, subject, status, detail FROM events WHERE id > ? ORDER BY id",
                              (after,))
            mark = int(rows[-1]["id"]) if rows else after
            found = [records.decode(r["run_id"], r["subject"], r["status"], r["detail"]) for r in rows
                     if r["id"] not in self._own]
            self._own = {i for i in self._own if i > mark}
        return found, mark

    def get_state(self, key: str) -> str | None:
        rows = self.query("SELECT value FROM state WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def set_state(self, key: str, value: str | None) -> None:
        with self.tx() as db:
            if value is None:
                db.execute("DELETE FROM state WHERE key = ?", [key])
            else:
                db.table("state").upsert({"key": key, "value": value}, pk="key")

    # ------------------------------------------------------------------ repos
    def add_repo(self, name: str, path: str) -> None:
        with self.tx() as db:
            db.table("repos").upsert({"name": name, "path": path, "added_at": now_iso(), "removed_at": None},
                               pk="name")

    def remove_repo(self, name: str) -> None:
        self.repo_path(name)
        with self.tx() as db:
            db.table("repos").update(name, {"removed_at": now_iso()})

    def repos(self) -> list[RepoRecord]:
        return [records.repo(r) for r in self.query("SELECT * FROM repos WHERE removed_at IS NULL ORDER BY name")]

    def repo_path(self, name: str) -> str:
        rows = self.query("SELECT path FROM repos WHERE name = ? AND removed_at IS NULL", (name,))
        if not rows:
            known = ", ".join(r.name for r in self.repos()) or "none yet"
            raise UsageError(f'unknown repo "{name}" (registered: {known})',
                             hint="add it with `gitpipe repo add PATH`")
        return str(rows[0]["path"])

    # ------------------------------------------------------------------ runs
    def create_runs(self, runs: list[NewRun]) -> list[int]:
        with self.tx():
            ids = []
            for r in runs:
                ids.append(queue.insert_run(self.conn, r))
                # the run's first event is the last row insert_run wrote
                self._pending_ids.append(int(self.conn.execute("SELECT last_insert_rowid()").fetchone()[0]))
            for run_id, r in zip(ids, runs):
                if r.inputs:  # the hook's intake knows no inputs: a push never has any
                    self.conn.execute("UPDATE runs SET inputs = ? WHERE id = ?", (records.pairs(r.inputs), run_id))
            for run_id, r in zip(ids, runs):
                self._pending.append(Event.of_run(run_id, "failed" if r.error else "queued", r.error))
        return ids

    def create_retry(self, run: NewRun, reuse: list[tuple[int, int, int]]) -> int:
        """Queue a `retry --failed` run with its plan: (stage_idx, idx, action id of the retried run)
        of each action whose result it takes over instead of running it; one transaction."""
        with self.tx() as db:
            run_id = queue.insert_run(self.conn, run)
            self._pending_ids.append(int(self.conn.execute("SELECT last_insert_rowid()").fetchone()[0]))
            if reuse:
                db.table("reuse").insert_all([{"run_id": run_id, "stage_idx": s, "idx": i, "from_action": a}
                                              for s, i, a in reuse])
            self._pending.append(Event.of_run(run_id, "failed" if run.error else "queued", run.error))
        return run_id

    def reuse_plan(self, run_id: int) -> dict[tuple[int, int], ActionRecord]:
        """(stage_idx, idx) -> the action of the retried run whose result this run takes over."""
        rows = self.query("SELECT r.stage_idx AS s, r.idx AS i, a.* FROM reuse r JOIN actions a "
                          "ON a.id = r.from_action WHERE r.run_id = ?", (run_id,))
        return {(r["s"], r["i"]): records.action(r) for r in rows}

    def reuse_action(self, action_id: int, origin: ActionRecord, artifacts: list[ArtifactRecord],
                     outputs: dict[str, str]) -> None:
        """pending -> succeeded without running: the result, artifacts and outputs of `origin`."""
        with self.tx() as db:
            act = self.action(action_id)
            if act.status not in lifecycle.TAKES_OVER:
                raise TransitionError(f'action "{act.name}" of run #{act.run_id} is {act.status.value}; '
                                      f"it cannot take over the result of run #{origin.run_id}")
            for art in artifacts:
                db.table("artifacts").upsert(dict(art.__dict__), pk=("run_id", "name"))
            if outputs:
                self.set_outputs(act.run_id, act.name, outputs)
            from_run = origin.reused_from or origin.run_id  # a result reused twice names where it ran
            message = (origin.message if origin.reused_from else
                       f"reused from #{from_run}" + (f": {origin.message}" if origin.message else ""))
            db.table("actions").update(action_id, {
                "status": ActionStatus.SUCCEEDED.value, "exit_code": origin.exit_code,
                "started_at": origin.started_at, "finished_at": origin.finished_at, "message": message,
                "reused_from": from_run})
            self._event(Event.of_action(act.run_id, action_id, ActionStatus.SUCCEEDED.value, message))

    def run(self, run_id: int) -> RunRecord:
        rows = self.query(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise UsageError(f"unknown run #{run_id}", hint="`gitpipe runs` lists the runs")
        return records.run(rows[0])

    def runs(self, repo: str | None = None, limit: int = 20, offset: int = 0, *,
             statuses: tuple[RunStatus, ...] = (), refs: tuple[str, ...] = (),
             since: str | None = None) -> list[RunRecord]:
        """Runs, newest first; optionally only these statuses, refs matching one of `refs` (full refs
        or globs of them: git forbids `*?[` in ref names, so a plain name matches only itself) and
        runs created at or after `since` (ISO 8601 UTC, the stored format)."""
        clauses: list[str] = []
        params: list[Any] = []
        if repo:
            clauses.append("repo = ?")
            params.append(repo)
        if statuses:
            clauses.append(f"status IN ({','.join('?' for _ in statuses)})")
            params += [s.value for s in statuses]
        if refs:
            clauses.append("(" + " OR ".join("ref GLOB ?" for _ in refs) + ")")
            params += list(refs)
        if since:
            clauses.append("created_at >= ?")
            params.append(since)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self.query(f"SELECT {RUN_COLUMNS} FROM runs {where} ORDER BY id DESC LIMIT ? OFFSET ?",
                          (*params, limit, offset))
        return [records.run(r) for r in rows]

    def last_finished(self, repo: str, ref: str) -> RunRecord | None:
        """The newest run of `ref` that has finished (what a status badge shows)."""
        rows = self.query("SELECT * FROM runs WHERE repo = ? AND ref = ? AND status IN "
                          "('succeeded', 'failed', 'cancelled') ORDER BY id DESC LIMIT 1", (repo, ref))
        return records.run(rows[0]) if rows else None

    def runs_with_status(self, *statuses: RunStatus) -> list[RunRecord]:
        marks = ",".join("?" for _ in statuses)
        rows = self.query(f"SELECT {RUN_COLUMNS} FROM runs WHERE status IN ({marks}) ORDER BY id",
                          tuple(s.value for s in statuses))
        return [records.run(r) for r in rows]

    def pipeline_text(self, run_id: int) -> str | None:
        rows = self.query("SELECT pipeline_text FROM runs WHERE id = ?", (run_id,))
        return rows[0]["pipeline_text"] if rows else None

    def _set_run(self, run_id: int, new: RunStatus, **fields: Any) -> RunRecord:
        run = self.run(run_id)
        lifecycle.check_run(run_id, run.status, new)
        self.db.table("runs").update(run_id, {"status": new.value, **fields})
        self._event(Event.of_run(run_id, new.value, fields.get("error") or fields.get("cancel_reason")))
        return run

    def start_run(self, run_id: int, pipe: Pipeline, deadline: float | None,
                  commit_author: str | None, commit_message: str | None,
                  inputs: tuple[tuple[str, str], ...] = (), first_stage: bool = False) -> None:
        """queued -> running: record the run's inputs (defaults filled in), create the stage and
        action rows of the pipeline; `first_stage`: its first stage starts too (one transaction
        fewer on the way from push to exec).

        Not synced: the first action's start (or the run's end) follows, synced; a crash before
        that leaves the run queued, and the next daemon starts it again, as nothing ran."""
        with self.tx(synced=False) as db:
            self._set_run(run_id, RunStatus.RUNNING, started_at=now_iso(), deadline=deadline,
                          commit_author=commit_author, commit_message=commit_message,
                          inputs=records.pairs(inputs) if inputs else None)
            for s_idx, stage in enumerate(pipe.stages):
                db.table("stages").insert({"run_id": run_id, "idx": s_idx, "name": stage.name,
                                     "status": ActionStatus.PENDING.value})
                for a_idx, action in enumerate(stage.actions):
                    db.table("actions").insert({
                        "run_id": run_id, "stage_idx": s_idx, "idx": a_idx, "stage": stage.name,
                        "name": action.name, "type": action.type, "run_order": action.run_order,
                        "status": ActionStatus.PENDING.value, "attempts": 0,
                        "allow_failure": int(action.allow_failure), "matrix_group": action.group,
                        "matrix_values": json.dumps(action.matrix) if action.group else None})
            if first_stage and pipe.stages:
                self._set_stage(run_id, 0, ActionStatus.RUNNING)

    def fail_queued_run(self, run_id: int, error: str) -> None:
        """queued -> failed before any action ran (invalid pipeline, missing commit)."""
        with self.tx():
            self._set_run(run_id, RunStatus.FAILED, finished_at=now_iso(), error=error)

    def set_run_waiting(self, run_id: int, waiting: bool) -> None:
        with self.tx():
            self._set_run(run_id, RunStatus.WAITING if waiting else RunStatus.RUNNING)

    def finish_run(self, run_id: int, status: RunStatus, error: str | None = None) -> None:
        """A run ends, and what it left open ends with it, in the same transaction.

        The worker closes its actions itself; what is still open here was missed (its thread
        died on a full disk once, and the run was cancelled with its action "running"). One
        transaction: a disk too full to record all of it records none of it.
        """
        with self.tx() as db:
            self._close_open(db, run_id, status, error)
            fields: dict[str, Any] = {"finished_at": now_iso()}
            if error:
                fields["error"] = error
            self._set_run(run_id, status, **fields)

    def _close_open(self, db: Rows, run_id: int, status: RunStatus, error: str | None) -> None:
        why = "the run was cancelled" if status is RunStatus.CANCELLED else error or f"the run {status.value}"
        for act in self.actions(run_id):
            new = lifecycle.left_open(act.status, status)
            if new is not None:  # one that started (running, waiting, interrupted) says why it ended
                said = {} if act.status is ActionStatus.PENDING else {"message": f"not finished: {why}"}
                self.set_action(act.id, new, **said)
        db.execute("UPDATE attempts SET status = ?, finished_at = ? WHERE status = 'running' AND action_id IN "
                   "(SELECT id FROM actions WHERE run_id = ?)", [lifecycle.cut_short(status).value, now_iso(), run_id])
        for stage in self.stages(run_id):
            new = lifecycle.left_open(stage.status, status)
            if new is not None:
                self.set_stage(run_id, stage.idx, new)

    def request_cancel(self, run_id: int, by: str, reason: str | None) -> RunRecord:
        """Record who cancels and why; a queued run is cancelled at once, a running one by the daemon."""
        with self.tx() as db:
            run = self.run(run_id)
            if run.status.finished:
                raise TransitionError(f"run #{run_id} is already {run.status.value}; nothing to cancel")
            db.table("runs").update(run_id, {"cancel_requested_at": now_iso(), "cancelled_by": by,
                                       "cancel_reason": reason})
            if lifecycle.cancels_at_once(run.status):
                self._set_run(run_id, RunStatus.CANCELLED, finished_at=now_iso())
            else:
                self._event(Event.of_run(run_id, "cancel-requested", reason))
        return self.run(run_id)

    def mark_pruned(self, run_id: int) -> None:
        """keep_runs removed the run's files; its summary row stays."""
        with self.tx() as db:
            db.execute("UPDATE runs SET pruned_at = ? WHERE id = ?", [now_iso(), run_id])
            self._event(Event.of_run(run_id, "pruned"))

    def cancel_requested(self, run_id: int) -> bool:
        rows = self.query("SELECT cancel_requested_at FROM runs WHERE id = ?", (run_id,))
        return bool(rows and rows[0]["cancel_requested_at"])

    # ------------------------------------------------------------------ stages and actions
    def stages(self, run_id: int) -> list[StageRecord]:
        rows = self.query("SELECT * FROM stages WHERE run_id = ? ORDER BY idx", (run_id,))
        return [records.stage(r) for r in rows]

    def set_stage(self, run_id: int, idx: int, status: ActionStatus) -> None:
        """Not synced: the stage's first action starting, or the next synced commit, makes it durable
        (and recovery derives a stage's status from its actions again)."""
        with self.tx(synced=False):
            self._set_stage(run_id, idx, status)

    def _set_stage(self, run_id: int, idx: int, status: ActionStatus) -> None:
        [row] = self.query("SELECT name, status FROM stages WHERE run_id = ? AND idx = ?", (run_id, idx))
        lifecycle.check_stage(run_id, row["name"], ActionStatus(row["status"]), status)
        fields: dict[str, Any] = {"status": status.value}
        if status is ActionStatus.RUNNING:
            fields["started_at"] = now_iso()
            fields["finished_at"] = None
        elif status.finished:
            fields["finished_at"] = now_iso()
        self.db.table("stages").update((run_id, idx), fields)
        self._event(Event.of_stage(run_id, idx, status.value))

    def actions(self, run_id: int) -> list[ActionRecord]:
        rows = self.query("SELECT * FROM actions WHERE run_id = ? ORDER BY stage_idx, idx", (run_id,))
        return [records.action(r) for r in rows]

    def actions_of_stage(self, run_id: int, stage_idx: int) -> list[ActionRecord]:
        return [a for a in self.actions(run_id) if a.stage_idx == stage_idx]

    def action(self, action_id: int) -> ActionRecord:
        return records.action(self.query("SELECT * FROM actions WHERE id = ?", (action_id,))[0])

    def set_action(self, action_id: int, new: ActionStatus, **fields: Any) -> None:
        """Change an action's status, checked against the allowed transitions (lifecycle.ACTION)."""
        with self.tx():
            self._set_action(self.action(action_id), new, fields)

    def _set_action(self, act: ActionRecord, new: ActionStatus, fields: dict[str, Any]) -> None:
        """set_action of an action row just read, inside the caller's transaction."""
        lifecycle.check_action(act.run_id, act.name, act.status, new)
        if new is ActionStatus.RUNNING and act.started_at is None:
            fields.setdefault("started_at", now_iso())
        if new.finished:
            fields.setdefault("finished_at", now_iso())
        self.db.table("actions").update(act.id, {"status": new.value, **fields})
        self._event(Event.of_action(act.run_id, act.id, new.value, fields.get("message")))

    def start_attempt(self, action_id: int, deadline: float | None, log_path: str, token: str) -> int:
        """Start the next attempt of an action (action -> running); returns its number."""
        with self.tx() as db:
            act = self.action(action_id)
            number = act.attempts + 1
            db.table("attempts").insert({"action_id": action_id, "number": number, "status": "running",
                                   "started_at": now_iso(), "deadline": deadline,
                                   "log_path": log_path, "token": token})
            self._set_action(act, ActionStatus.RUNNING, {"attempts": number, "exit_code": None, "message": None})
            return number

    def finish_attempt(self, action_id: int, number: int, status: ActionStatus, exit_code: int | None,
                       *, ends: ActionStatus | None = None, message: str | None = None,
                       stage_ends: bool = False, next_stage: bool = False) -> None:
        """An attempt ends. With `ends`, its action ends too (that status, the attempt's exit code and
        `message`), in the same synced transaction: one commit, one fsync, for an action's end.
        Without, not synced: the action's end (or its next attempt) follows at once, synced.

        `stage_ends`: the action was its stage's last and passed, so the stage succeeds with it;
        `next_stage`: and the stage after it starts. The scheduler's stage change then costs no
        transaction of its own (a sequential pipeline's every action ends a stage)."""
        with self.tx(synced=ends is not None) as db:
            db.execute("UPDATE attempts SET status = ?, exit_code = ?, finished_at = ? "
                       "WHERE action_id = ? AND number = ?",
                       [status.value, exit_code, now_iso(), action_id, number])
            if ends is not None:
                act = self.action(action_id)
                self._set_action(act, ends, {"exit_code": exit_code, "message": message})
                if stage_ends:
                    self._set_stage(act.run_id, act.stage_idx, ActionStatus.SUCCEEDED)
                    if next_stage:
                        self._set_stage(act.run_id, act.stage_idx + 1, ActionStatus.RUNNING)

    def attempts(self, action_id: int) -> list[AttemptRecord]:
        rows = self.query("SELECT * FROM attempts WHERE action_id = ? ORDER BY number", (action_id,))
        return [records.attempt(r) for r in rows]

    def open_attempts(self) -> list[AttemptRecord]:
        """Attempts still marked running: after a crash, their processes may be orphans."""
        rows = self.query("SELECT id, action_id, number FROM attempts WHERE status = 'running'")
        return [a for r in rows for a in self.attempts(r["action_id"]) if a.number == r["number"]]

    # ------------------------------------------------------------------ artifacts and outputs
    def add_artifact(self, art: ArtifactRecord) -> None:
        with self.tx() as db:
            db.table("artifacts").upsert(dict(art.__dict__), pk=("run_id", "name"))

    def artifacts(self, run_id: int) -> list[ArtifactRecord]:
        rows = self.query("SELECT run_id, name, action, size, sha256, path, files FROM artifacts "
                          "WHERE run_id = ? ORDER BY id", (run_id,))
        return [ArtifactRecord(**r) for r in rows]

    def set_outputs(self, run_id: int, action: str, values: dict[str, str]) -> None:
        with self.tx() as db:
            for key, value in values.items():
                db.table("outputs").upsert({"run_id": run_id, "action": action, "key": key, "value": value},
                                     pk=("run_id", "action", "key"))

    def outputs(self, run_id: int) -> list[OutputRecord]:
        return [records.output(r) for r in self.query(
            "SELECT action, key, value FROM outputs WHERE run_id = ? ORDER BY rowid", (run_id,))]

    # ------------------------------------------------------------------ build caches
    def cache_candidates(self, repo: str, action: str, slot: str, protected: bool) -> list[CacheEntry]:
        """Entries a run may restore, newest first: a protected run only those protected runs saved;
        any other run also those, unless the attempt that saved them received secrets."""
        trust = "protected = 1" if protected else "(protected = 0 OR secrets = 0)"
        rows = self.query(f"SELECT * FROM cache_entries WHERE repo = ? AND action = ? AND slot = ? AND {trust} "
                          "ORDER BY created_at DESC, rowid DESC", (repo, action, slot))
        return [records.cache_entry(r) for r in rows]

    def add_cache_entry(self, entry: CacheEntry) -> None:
        """Record an entry whose files are complete in place: from now on a restore may pick it."""
        with self.tx() as db:
            db.table("cache_entries").insert({**entry.__dict__, "paths": json.dumps(entry.paths)})

    def touch_cache_entry(self, entry_id: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE cache_entries SET last_used_at = ? WHERE id = ?", [now_iso(), entry_id])

    def remove_cache_entries(self, ids: list[str]) -> None:
        """Forget entries (before their files are removed: no restore picks one half-removed)."""
        with self.tx() as db:
            for entry_id in ids:
                db.execute("DELETE FROM cache_entries WHERE id = ?", [entry_id])

    def cache_entries(self, repo: str | None = None) -> list[CacheEntry]:
        """Every entry (of one repo), least recently used first."""
        where, params = ("WHERE repo = ?", (repo,)) if repo else ("", ())
        rows = self.query(f"SELECT * FROM cache_entries {where} ORDER BY last_used_at, rowid", params)
        return [records.cache_entry(r) for r in rows]

    def record_cache_use(self, use: CacheUse, *, synced: bool = True) -> None:
        """`synced=False`: the attempt's end follows at once, synced (the scheduler's)."""
        with self.tx(synced=synced) as db:
            db.table("cache_uses").upsert({**use.__dict__, "paths": json.dumps(use.paths)},
                                          pk=("action_id", "attempt", "idx"))

    def cache_uses(self, run_id: int) -> list[CacheUse]:
        """Each action's last attempt's cache uses."""
        rows = self.query(
            "SELECT u.* FROM cache_uses u JOIN actions a ON a.id = u.action_id WHERE a.run_id = ? "
            "AND u.attempt = (SELECT MAX(attempt) FROM cache_uses WHERE action_id = u.action_id) "
            "ORDER BY u.action_id, u.idx", (run_id,))
        return [records.cache_use(r) for r in rows]

    # ------------------------------------------------------------------ approvals
    def request_approval(self, run_id: int, action_id: int, name: str, message: str,
                         deadline: float) -> None:
        """An approval action starts waiting: action -> waiting, run -> waiting."""
        with self.tx() as db:
            if not self.query("SELECT 1 FROM approvals WHERE action_id = ?", (action_id,)):
                db.table("approvals").insert({"run_id": run_id, "action_id": action_id, "action": name,
                                        "message": message, "requested_at": now_iso(), "deadline": deadline})
            self.set_action(action_id, ActionStatus.WAITING, message=message)
            self._settle_run(run_id)

    def approval(self, action_id: int) -> ApprovalRecord | None:
        rows = self.query("SELECT * FROM approvals WHERE action_id = ?", (action_id,))
        return records.approval(rows[0]) if rows else None

    def approvals(self, run_id: int) -> list[ApprovalRecord]:
        """A run's approvals, oldest first, each with the refused attempts to decide it."""
        refused = self.approval_refusals(run_id)
        return [records.approval(r, tuple(f for f in refused if f.action == r["action"]))
                for r in self.query("SELECT * FROM approvals WHERE run_id = ? ORDER BY id", (run_id,))]

    def pending_approval(self, run_id: int) -> ApprovalRecord:
        """The approval a run waits on (with its action's stage); TransitionError when it waits on none."""
        run = self.run(run_id)
        rows = self.query("SELECT approvals.*, actions.stage AS stage FROM approvals JOIN actions "
                          "ON actions.id = approvals.action_id WHERE approvals.run_id = ? "
                          "AND decision IS NULL ORDER BY approvals.id", (run_id,))
        if run.status is not RunStatus.WAITING or not rows:
            raise TransitionError(f"run #{run_id} is {run.status.value}, not waiting for an approval",
                                  hint="`gitpipe runs` shows which runs are waiting")
        return records.approval(rows[0])

    def note_approval(self, action_id: int, note: str) -> None:
        """A warning about an approval (an approver unknown on this host), shown with it."""
        with self.tx() as db:
            db.execute("UPDATE approvals SET note = ? WHERE action_id = ?", [note, action_id])

    def refuse_approval(self, row: ApprovalRecord, decision: str, by: str, reason: str) -> None:
        """Audit an attempt to decide an approval by someone who may not (the first
        REFUSALS_KEPT per approval: any local account may try, and must not fill the disk)."""
        with self.tx() as db:
            kept = self.query("SELECT COUNT(*) AS n FROM approval_refusals WHERE action_id = ?",
                              (row.action_id,))[0]["n"]
            if kept >= REFUSALS_KEPT:
                return
            db.table("approval_refusals").insert({
                "run_id": row.run_id, "action_id": row.action_id, "action": row.action,
                "decision": decision, "by_user": by, "at": now_iso(), "reason": reason})
            self._event(Event.of_approval(row.run_id, "refused", f"{by} may not {decision}: {reason}"))

    def approval_refusals(self, run_id: int) -> list[RefusalRecord]:
        return [records.refusal(r) for r in self.query(
            "SELECT action, decision, by_user, at, reason FROM approval_refusals WHERE run_id = ? ORDER BY id",
            (run_id,))]

    def decide(self, run_id: int, decision: str, by: str, comment: str | None,
               action_id: int | None = None) -> ApprovalRecord:
        """Record approve/reject of the approval a run waits on; TransitionError when it waits on none
        (or, with `action_id`, when that one is not the approval it waits on any more)."""
        with self.tx() as db:
            row = self.pending_approval(run_id)
            if action_id is not None and row.action_id != action_id:
                raise TransitionError(f'run #{run_id}: the approval "{row.action}" was decided meanwhile')
            db.table("approvals").update(row.id, {"decision": decision, "by_user": by, "at": now_iso(),
                                               "comment": comment})
            self._event(Event.of_approval(run_id, decision, f"{by}: {comment}" if comment else by))
            return replace(row, decision=decision, by_user=by, comment=comment)

    def time_out_approval(self, run_id: int, action_id: int, text: str) -> bool:
        """No decision by the deadline: record the timeout as the decision (by "gitpipe") and
        end the action timed-out; False when a person decided first (that decision stands)."""
        with self.tx() as db:
            cursor = db.execute("UPDATE approvals SET decision = 'timed-out', by_user = 'gitpipe', at = ?, "
                                "comment = ? WHERE action_id = ? AND decision IS NULL", [now_iso(), text, action_id])
            if cursor.rowcount == 0:
                return False
            self._event(Event.of_approval(run_id, "timed-out", text))
            self.resolve_approval(run_id, action_id, ActionStatus.TIMED_OUT, f"{text}: no decision, rejected")
            return True

    def resolve_approval(self, run_id: int, action_id: int, status: ActionStatus, message: str) -> None:
        """The waiting approval ends: action -> succeeded/failed/timed-out/cancelled, and the run
        back to running when no other approval waits."""
        with self.tx():
            self.set_action(action_id, status, message=message)
            self._settle_run(run_id)

    def _settle_run(self, run_id: int) -> None:
        """An active run is waiting while one of its approvals waits, else running (lifecycle.while_active)."""
        run = self.run(run_id)
        waiting = bool(self.query("SELECT 1 FROM actions WHERE run_id = ? AND status = 'waiting'", (run_id,)))
        new = lifecycle.while_active(run.status, waiting)
        if new is not run.status:
            self._set_run(run_id, new)

    # ------------------------------------------------------------------ environments and releases
    def add_release(self, repo: str, environment: str, release: str, status: str, targets: list[str],
                    *, run_id: int | None = None, action_id: int | None = None, sha: str | None = None,
                    by: str | None = None, message: str | None = None, by_run: int | None = None,
                    from_release: str | None = None, strategy: str | None = None,
                    live_slot: str | None = None, idle_release: str | None = None) -> None:
        """Record a deploy, rollback or failed deploy of an environment (and tell listeners).

        `run_id` and `sha` are the release's own (the run that built it); `by_run` is the run
        whose deploy wrote the row (None: a rollback by hand), and the event goes to that run.
        """
        import json

        with self.tx() as db:
            db.table("releases").insert({"repo": repo, "environment": environment, "run_id": run_id,
                                   "action_id": action_id, "sha": sha, "release": release, "status": status,
                                   "at": now_iso(), "by_user": by, "targets": json.dumps(targets),
                                   "message": message, "by_run": by_run, "from_release": from_release,
                                   "strategy": strategy, "live_slot": live_slot, "idle_release": idle_release})
            self._event(Event.of_release(by_run or 0, environment, status, message))

    def release_origin(self, repo: str, release: str) -> tuple[int | None, str | None, int | None]:
        """The run that built a release, its sha and its deploy action (None where unknown)."""
        rows = self.query("SELECT run_id, sha, action_id FROM releases WHERE repo = ? AND release = ? "
                          "AND run_id IS NOT NULL ORDER BY status = 'deployed' DESC, id LIMIT 1", (repo, release))
        if rows:
            return rows[0]["run_id"], rows[0]["sha"], rows[0]["action_id"]
        head, _, short = release.partition("-")  # "<run>-<short sha>": the run, if it is that commit's
        runs = self.query("SELECT id, sha FROM runs WHERE id = ? AND repo = ?", (int(head), repo)) \
            if head.isdigit() and short else []
        if runs and runs[0]["sha"].startswith(short):
            return runs[0]["id"], runs[0]["sha"], None
        return None, None, None

    def releases(self, repo: str, environment: str | None = None, limit: int = 50) -> list[ReleaseRecord]:
        """A repo's releases (of one environment), newest first."""
        where, params = ("AND environment = ?", (repo, environment)) if environment else ("", (repo,))
        return [records.release(r) for r in self.query(
            f"SELECT * FROM releases WHERE repo = ? {where} ORDER BY id DESC LIMIT ?", (*params, limit))]

    def environments(self, repo: str) -> list[str]:
        return [r["environment"] for r in self.query(
            "SELECT DISTINCT environment FROM releases WHERE repo = ? ORDER BY environment", (repo,))]

    def start_deploy(self, action_id: int, run_id: int, repo: str, environment: str, release: str,
                     targets: list[str]) -> None:
        """Remember a deploy in flight, so a daemon restarted after a crash checks the targets."""
        import json

        with self.tx() as db:
            db.table("deploys").upsert({"action_id": action_id, "run_id": run_id, "repo": repo,
                                  "environment": environment, "release": release,
                                  "targets": json.dumps(targets), "started_at": now_iso(),
                                  "finished_at": None}, pk="action_id")

    def finish_deploy(self, action_id: int) -> None:
        with self.tx() as db:
            db.execute("UPDATE deploys SET finished_at = ? WHERE action_id = ?", [now_iso(), action_id])

    def deploy_in_flight(self, action_id: int) -> DeployRecord | None:
        rows = self.query("SELECT * FROM deploys WHERE action_id = ? AND finished_at IS NULL", (action_id,))
        return records.deploy(rows[0]) if rows else None

    def events(self, run_id: int) -> list[Event]:
        """A run's events, oldest first (with when each was stored)."""
        return [records.decode(r["run_id"], r["subject"], r["status"], r["detail"], r["at"]) for r in self.query(
            "SELECT run_id, at, subject, status, detail FROM events WHERE run_id = ? ORDER BY id", (run_id,))]

