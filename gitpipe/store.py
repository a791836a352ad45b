"""The database: migrations, every state transition, and the queries the commands need.

The only user of sqlite-utils. Every change of a run, stage or action goes through
one named function here, inside one transaction, checked against the allowed
transitions in models.py, and written together with an `events` row; listeners
(the report, notifications) hear of it after the commit.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from gitpipe import intake, queue, space
from gitpipe.errors import DiskFullError, TransitionError, UsageError
from gitpipe.intake import now_iso
from gitpipe.models import (
    ActionRecord,
    ActionStatus,
    ArtifactRecord,
    AttemptRecord,
    Event,
    Pipeline,
    RunRecord,
    RunStatus,
    StageRecord,
    action_transition_allowed,
    run_transition_allowed,
)
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
]
# What `runs` rows are read with: the counts the lists show beside a run's status.
RUN_COLUMNS = """runs.*,
    (SELECT COUNT(*) FROM actions a WHERE a.run_id = runs.id AND a.allow_failure = 1
        AND a.status IN ('failed', 'timed-out')) AS warnings,
    (SELECT COUNT(*) FROM actions a WHERE a.run_id = runs.id AND a.reused_from IS NOT NULL) AS reused"""

Listener = Callable[[Event], None]


class Store:
    """One connection to gitpipe.db, shared by the daemon's threads under a lock."""

    def __init__(self, settings: Settings) -> None:
        settings.home.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.conn = intake.connect(settings.db_path)
        self.db = Rows(self.conn)
        self.lock = threading.RLock()
        self.listeners: list[Listener] = []
        self._pending: list[Event] = []
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
        for event in events:
            for listener in list(self.listeners):
                listener(event)

    def _event(self, run_id: int, subject: str, status: str, detail: str | None = None) -> None:
        self.conn.execute(
            "INSERT INTO events (run_id, at, subject, status, detail) VALUES (?,?,?,?,?)",
            (run_id, now_iso(), subject, status, detail),
        )
        self._pending.append(Event(run_id, subject, status, detail))

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.db.query(sql, params))

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

    def repos(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM repos WHERE removed_at IS NULL ORDER BY name")

    def repo_path(self, name: str) -> str:
        rows = self.query("SELECT path FROM repos WHERE name = ? AND removed_at IS NULL", (name,))
        if not rows:
            known = ", ".join(r["name"] for r in self.repos()) or "none yet"
            raise UsageError(f'unknown repo "{name}" (registered: {known})',
                             hint="add it with `gitpipe repo add PATH`")
        return str(rows[0]["path"])

    # ------------------------------------------------------------------ runs
    def create_runs(self, runs: list[NewRun]) -> list[int]:
        with self.tx():
            ids = [queue.insert_run(self.conn, r) for r in runs]
            for run_id, r in zip(ids, runs):
                self._pending.append(Event(run_id, "run", "failed" if r.error else "queued", r.error))
        return ids

    def create_retry(self, run: NewRun, reuse: list[tuple[int, int, int]]) -> int:
        """Queue a `retry --failed` run with its plan: (stage_idx, idx, action id of the retried run)
        of each action whose result it takes over instead of running it; one transaction."""
        with self.tx() as db:
            run_id = queue.insert_run(self.conn, run)
            if reuse:
                db.table("reuse").insert_all([{"run_id": run_id, "stage_idx": s, "idx": i, "from_action": a}
                                              for s, i, a in reuse])
            self._pending.append(Event(run_id, "run", "failed" if run.error else "queued", run.error))
        return run_id

    def reuse_plan(self, run_id: int) -> dict[tuple[int, int], ActionRecord]:
        """(stage_idx, idx) -> the action of the retried run whose result this run takes over."""
        rows = self.query("SELECT r.stage_idx AS s, r.idx AS i, a.* FROM reuse r JOIN actions a "
                          "ON a.id = r.from_action WHERE r.run_id = ?", (run_id,))
        return {(r["s"], r["i"]): _action_record(r) for r in rows}

    def reuse_action(self, action_id: int, origin: ActionRecord, artifacts: list[ArtifactRecord],
                     outputs: dict[str, str]) -> None:
        """pending -> succeeded without running: the result, artifacts and outputs of `origin`."""
        with self.tx() as db:
            act = self.action(action_id)
            if act.status is not ActionStatus.PENDING:
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
            self._event(act.run_id, f"action:{action_id}", ActionStatus.SUCCEEDED.value, message)

    def run(self, run_id: int) -> RunRecord:
        rows = self.query(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise UsageError(f"unknown run #{run_id}", hint="`gitpipe runs` lists the runs")
        return _run_record(rows[0])

    def runs(self, repo: str | None = None, limit: int = 20, offset: int = 0) -> list[RunRecord]:
        where, params = ("WHERE repo = ?", (repo,)) if repo else ("", ())
        rows = self.query(f"SELECT {RUN_COLUMNS} FROM runs {where} ORDER BY id DESC LIMIT ? OFFSET ?",
                          (*params, limit, offset))
        return [_run_record(r) for r in rows]

    def runs_with_status(self, *statuses: RunStatus) -> list[RunRecord]:
        marks = ",".join("?" for _ in statuses)
        rows = self.query(f"SELECT {RUN_COLUMNS} FROM runs WHERE status IN ({marks}) ORDER BY id",
                          tuple(s.value for s in statuses))
        return [_run_record(r) for r in rows]

    def pipeline_text(self, run_id: int) -> str | None:
        rows = self.query("SELECT pipeline_text FROM runs WHERE id = ?", (run_id,))
        return rows[0]["pipeline_text"] if rows else None

    def _set_run(self, run_id: int, new: RunStatus, **fields: Any) -> RunRecord:
        run = self.run(run_id)
        if not run_transition_allowed(run.status, new):
            raise TransitionError(f"run #{run_id} is {run.status.value}, it cannot become {new.value}")
        self.db.table("runs").update(run_id, {"status": new.value, **fields})
        self._event(run_id, "run", new.value, fields.get("error") or fields.get("cancel_reason"))
        return run

    def start_run(self, run_id: int, pipe: Pipeline, deadline: float | None,
                  commit_author: str | None, commit_message: str | None) -> None:
        """queued -> running: create the stage and action rows of the pipeline.

        Not synced: the first action's start (or the run's end) follows, synced; a crash before
        that leaves the run queued, and the next daemon starts it again, as nothing ran."""
        with self.tx(synced=False) as db:
            self._set_run(run_id, RunStatus.RUNNING, started_at=now_iso(), deadline=deadline,
                          commit_author=commit_author, commit_message=commit_message)
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
        cancelled = status is RunStatus.CANCELLED
        why = "the run was cancelled" if cancelled else error or f"the run {status.value}"
        for act in self.actions(run_id):
            if act.status is ActionStatus.PENDING:
                self.set_action(act.id, ActionStatus.CANCELLED if cancelled else ActionStatus.SKIPPED)
            elif not act.status.finished:  # running, waiting or interrupted: it started
                self.set_action(act.id, ActionStatus.CANCELLED if cancelled else ActionStatus.FAILED,
                                message=f"not finished: {why}")
        db.execute("UPDATE attempts SET status = ?, finished_at = ? WHERE status = 'running' AND action_id IN "
                   "(SELECT id FROM actions WHERE run_id = ?)",
                   ["cancelled" if cancelled else "failed", now_iso(), run_id])
        for stage in self.stages(run_id):
            if stage.status is ActionStatus.PENDING:
                self.set_stage(run_id, stage.idx, ActionStatus.CANCELLED if cancelled else ActionStatus.SKIPPED)
            elif not stage.status.finished:
                self.set_stage(run_id, stage.idx, ActionStatus.CANCELLED if cancelled else ActionStatus.FAILED)

    def request_cancel(self, run_id: int, by: str, reason: str | None) -> RunRecord:
        """Record who cancels and why; a queued run is cancelled at once, a running one by the daemon."""
        with self.tx() as db:
            run = self.run(run_id)
            if run.status.finished:
                raise TransitionError(f"run #{run_id} is already {run.status.value}; nothing to cancel")
            db.table("runs").update(run_id, {"cancel_requested_at": now_iso(), "cancelled_by": by,
                                       "cancel_reason": reason})
            if run.status is RunStatus.QUEUED:
                self._set_run(run_id, RunStatus.CANCELLED, finished_at=now_iso())
            else:
                self._event(run_id, "run", "cancel-requested", reason)
        return self.run(run_id)

    def mark_pruned(self, run_id: int) -> None:
        """keep_runs removed the run's files; its summary row stays."""
        with self.tx() as db:
            db.execute("UPDATE runs SET pruned_at = ? WHERE id = ?", [now_iso(), run_id])
            self._event(run_id, "run", "pruned")

    def cancel_requested(self, run_id: int) -> bool:
        rows = self.query("SELECT cancel_requested_at FROM runs WHERE id = ?", (run_id,))
        return bool(rows and rows[0]["cancel_requested_at"])

    # ------------------------------------------------------------------ stages and actions
    def stages(self, run_id: int) -> list[StageRecord]:
        rows = self.query("SELECT * FROM stages WHERE run_id = ? ORDER BY idx", (run_id,))
        return [StageRecord(r["run_id"], r["idx"], r["name"], ActionStatus(r["status"]),
                            r["started_at"], r["finished_at"]) for r in rows]

    def set_stage(self, run_id: int, idx: int, status: ActionStatus) -> None:
        """Not synced: the stage's first action starting, or the next synced commit, makes it durable
        (and recovery derives a stage's status from its actions again)."""
        with self.tx(synced=False) as db:
            fields: dict[str, Any] = {"status": status.value}
            if status is ActionStatus.RUNNING:
                fields["started_at"] = now_iso()
                fields["finished_at"] = None
            elif status.finished:
                fields["finished_at"] = now_iso()
            db.table("stages").update((run_id, idx), fields)
            self._event(run_id, f"stage:{idx}", status.value)

    def actions(self, run_id: int) -> list[ActionRecord]:
        rows = self.query("SELECT * FROM actions WHERE run_id = ? ORDER BY stage_idx, idx", (run_id,))
        return [_action_record(r) for r in rows]

    def actions_of_stage(self, run_id: int, stage_idx: int) -> list[ActionRecord]:
        return [a for a in self.actions(run_id) if a.stage_idx == stage_idx]

    def action(self, action_id: int) -> ActionRecord:
        return _action_record(self.query("SELECT * FROM actions WHERE id = ?", (action_id,))[0])

    def set_action(self, action_id: int, new: ActionStatus, **fields: Any) -> None:
        """Change an action's status, checked against the allowed transitions."""
        with self.tx() as db:
            act = self.action(action_id)
            if act.status is not new and not action_transition_allowed(act.status, new):
                raise TransitionError(f'action "{act.name}" of run #{act.run_id} is {act.status.value}, '
                                      f"it cannot become {new.value}")
            if new is ActionStatus.RUNNING and act.started_at is None:
                fields.setdefault("started_at", now_iso())
            if new.finished:
                fields.setdefault("finished_at", now_iso())
            db.table("actions").update(action_id, {"status": new.value, **fields})
            self._event(act.run_id, f"action:{action_id}", new.value, fields.get("message"))

    def start_attempt(self, action_id: int, deadline: float | None, log_path: str, token: str) -> int:
        """Start the next attempt of an action (action -> running); returns its number."""
        with self.tx() as db:
            act = self.action(action_id)
            number = act.attempts + 1
            db.table("attempts").insert({"action_id": action_id, "number": number, "status": "running",
                                   "started_at": now_iso(), "deadline": deadline,
                                   "log_path": log_path, "token": token})
            fields: dict[str, Any] = {"attempts": number, "exit_code": None, "message": None}
            self.set_action(action_id, ActionStatus.RUNNING, **fields)
            return number

    def finish_attempt(self, action_id: int, number: int, status: ActionStatus,
                       exit_code: int | None) -> None:
        """Not synced: the action's end (or its next attempt) follows at once, synced."""
        with self.tx(synced=False) as db:
            db.execute("UPDATE attempts SET status = ?, exit_code = ?, finished_at = ? "
                       "WHERE action_id = ? AND number = ?",
                       [status.value, exit_code, now_iso(), action_id, number])

    def attempts(self, action_id: int) -> list[AttemptRecord]:
        rows = self.query("SELECT * FROM attempts WHERE action_id = ? ORDER BY number", (action_id,))
        return [AttemptRecord(r["id"], r["action_id"], r["number"], ActionStatus(r["status"]),
                              r["exit_code"], r["started_at"], r["finished_at"], r["deadline"],
                              r["log_path"], r["token"]) for r in rows]

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

    def outputs(self, run_id: int) -> list[dict[str, Any]]:
        return self.query("SELECT action, key, value FROM outputs WHERE run_id = ? ORDER BY rowid",
                          (run_id,))

    # ------------------------------------------------------------------ approvals
    def request_approval(self, run_id: int, action_id: int, name: str, message: str,
                         deadline: float) -> None:
        """An approval action starts waiting: action -> waiting, run -> waiting."""
        with self.tx() as db:
            if not self.query("SELECT 1 FROM approvals WHERE action_id = ?", (action_id,)):
                db.table("approvals").insert({"run_id": run_id, "action_id": action_id, "action": name,
                                        "message": message, "requested_at": now_iso(), "deadline": deadline})
            self.set_action(action_id, ActionStatus.WAITING, message=message)
            if self.run(run_id).status is RunStatus.RUNNING:
                self._set_run(run_id, RunStatus.WAITING)

    def approval(self, action_id: int) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM approvals WHERE action_id = ?", (action_id,))
        return rows[0] if rows else None

    def approvals(self, run_id: int) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM approvals WHERE run_id = ? ORDER BY id", (run_id,))

    def decide(self, run_id: int, decision: str, by: str, comment: str | None) -> dict[str, Any]:
        """Record approve/reject of the approval a run waits on; TransitionError when it waits on none."""
        with self.tx() as db:
            run = self.run(run_id)
            rows = self.query("SELECT * FROM approvals WHERE run_id = ? AND decision IS NULL ORDER BY id",
                              (run_id,))
            if run.status is not RunStatus.WAITING or not rows:
                raise TransitionError(f"run #{run_id} is {run.status.value}, not waiting for an approval",
                                      hint="`gitpipe runs` shows which runs are waiting")
            row = rows[0]
            db.table("approvals").update(row["id"], {"decision": decision, "by_user": by, "at": now_iso(),
                                               "comment": comment})
            self._event(run_id, "approval", decision, f"{by}: {comment}" if comment else by)
            return {**row, "decision": decision, "by_user": by, "comment": comment}

    def resolve_approval(self, run_id: int, action_id: int, status: ActionStatus, message: str) -> None:
        """The waiting approval ends: action -> succeeded/failed/timed-out, run back to running."""
        with self.tx():
            self.set_action(action_id, status, message=message)
            if self.run(run_id).status is RunStatus.WAITING and not self.query(
                    "SELECT 1 FROM actions WHERE run_id = ? AND status = 'waiting'", (run_id,)):
                self._set_run(run_id, RunStatus.RUNNING)

    # ------------------------------------------------------------------ environments and releases
    def add_release(self, repo: str, environment: str, release: str, status: str, targets: list[str],
                    *, run_id: int | None = None, action_id: int | None = None, sha: str | None = None,
                    by: str | None = None, message: str | None = None) -> None:
        """Record a deploy, rollback or failed deploy of an environment (and tell listeners)."""
        import json

        with self.tx() as db:
            db.table("releases").insert({"repo": repo, "environment": environment, "run_id": run_id,
                                   "action_id": action_id, "sha": sha, "release": release, "status": status,
                                   "at": now_iso(), "by_user": by, "targets": json.dumps(targets),
                                   "message": message})
            self._event(run_id or 0, f"release:{environment}", status, message)

    def releases(self, repo: str, environment: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        where, params = ("AND environment = ?", (repo, environment)) if environment else ("", (repo,))
        return self.query(f"SELECT * FROM releases WHERE repo = ? {where} ORDER BY id DESC LIMIT ?",
                          (*params, limit))

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

    def deploy_in_flight(self, action_id: int) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM deploys WHERE action_id = ? AND finished_at IS NULL", (action_id,))
        return rows[0] if rows else None

    def events(self, run_id: int) -> list[dict[str, Any]]:
        return self.query("SELECT at, subject, status, detail FROM events WHERE run_id = ? ORDER BY id",
                          (run_id,))


def _run_record(r: dict[str, Any]) -> RunRecord:
    return RunRecord(
        id=r["id"], repo=r["repo"], pipeline=r["pipeline"], ref=r["ref"], sha=r["sha"],
        status=RunStatus(r["status"]), trigger=r["trigger"], created_at=r["created_at"],
        started_at=r["started_at"], finished_at=r["finished_at"], error=r["error"], pusher=r["pusher"],
        before_sha=r["before_sha"], retry_of=r["retry_of"], cancelled_by=r["cancelled_by"],
        cancel_reason=r["cancel_reason"], commit_author=r["commit_author"],
        commit_message=r["commit_message"], warnings=r.get("warnings") or 0, reused=r.get("reused") or 0,
        extra={"deadline": r["deadline"], "cancel_requested_at": r["cancel_requested_at"]},
    )


def _action_record(r: dict[str, Any]) -> ActionRecord:
    return ActionRecord(
        id=r["id"], run_id=r["run_id"], stage_idx=r["stage_idx"], idx=r["idx"], stage=r["stage"],
        name=r["name"], type=r["type"], run_order=r["run_order"], status=ActionStatus(r["status"]),
        exit_code=r["exit_code"], started_at=r["started_at"], finished_at=r["finished_at"],
        attempts=r["attempts"], message=r["message"], allow_failure=bool(r.get("allow_failure")),
        group=r.get("matrix_group"),
        matrix=tuple((k, v) for k, v in json.loads(r.get("matrix_values") or "[]")),
        reused_from=r.get("reused_from"),
    )
