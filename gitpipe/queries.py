"""The store's read-only queries for the report, retention, notifications and the CLI.

Part of the store: `Store` inherits `Queries`, so callers write `store.run_ids(repo)` and
never SQL of their own (tests/test_quality.py checks that only the store's modules hold
SQL). Kept out of store.py, which holds the schema, the writes and the state transitions.
Rows become records in records.py; what is only a number or a name is returned as one.
"""

from __future__ import annotations

import threading
from typing import Any

from gitpipe import records
from gitpipe.models import ReleaseRecord
from gitpipe.refs import short_ref
from gitpipe.sqlrows import Rows


class Queries:
    """Reads on the store's connection, under its lock; no transaction, no events."""

    lock: threading.RLock
    db: Rows

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Rows of one SELECT, as dicts: for the store's own methods (and tests), not for callers."""
        with self.lock:
            return list(self.db.query(sql, params))

    # ------------------------------------------------------------------ runs
    def run_ids(self, repo: str) -> list[int]:
        """Every run of a repo, oldest first."""
        return [r["id"] for r in self.query("SELECT id FROM runs WHERE repo = ? ORDER BY id", (repo,))]

    def run_id_range(self) -> tuple[int, int] | None:
        """The lowest and highest run id (None: no runs yet)."""
        row = self.query("SELECT MIN(id) AS lo, MAX(id) AS hi FROM runs")[0]
        return (int(row["lo"]), int(row["hi"])) if row["hi"] is not None else None

    def runs_after(self, repo: str, after: int) -> tuple[int, int]:
        """How many runs of a repo have an id above `after`, and the highest (0 when none)."""
        row = self.query("SELECT COUNT(*) AS n, COALESCE(MAX(id), 0) AS top FROM runs WHERE repo = ? AND id > ?",
                         (repo, after))[0]
        return int(row["n"]), int(row["top"])

    def repos_of_runs(self, run_ids: set[int]) -> dict[int, str]:
        """The repo of each of these runs that exists."""
        if not run_ids:
            return {}
        marks = ",".join("?" for _ in run_ids)
        rows = self.query(f"SELECT id, repo FROM runs WHERE id IN ({marks})", tuple(run_ids))
        return {r["id"]: r["repo"] for r in rows}

    def repos_with_runs(self) -> list[str]:
        """Every repo that has runs (registered or removed since)."""
        return [r["repo"] for r in self.query("SELECT DISTINCT repo FROM runs ORDER BY repo")]

    def branches_with_runs(self, repo: str) -> list[str]:
        """The branches (short names) a repo has runs of."""
        rows = self.query("SELECT DISTINCT ref FROM runs WHERE repo = ? AND ref LIKE 'refs/heads/%' ORDER BY ref",
                          (repo,))
        return [short_ref(r["ref"]) for r in rows]

    def pruned(self, run_id: int) -> bool:
        """Whether keep_runs removed the run's files (its row stays)."""
        rows = self.query("SELECT pruned_at FROM runs WHERE id = ?", (run_id,))
        return bool(rows and rows[0]["pruned_at"])

    def prunable(self, keep: int) -> list[int]:
        """Finished runs older than the newest `keep` whose files are still there, oldest first."""
        return [r["id"] for r in self.query(
            "SELECT id FROM runs WHERE pruned_at IS NULL AND finished_at IS NOT NULL AND id <= "
            "(SELECT id FROM runs ORDER BY id DESC LIMIT 1 OFFSET ?) ORDER BY id", (keep,))]

    def waiting_reasons(self) -> dict[int, str]:
        """Run id -> why one of its running actions waits (for a worker, for the broker)."""
        rows = self.query("SELECT run_id, message FROM actions WHERE status = 'running' "
                          "AND message LIKE 'waiting for %'")
        return {r["run_id"]: r["message"] for r in rows}

    # ------------------------------------------------------------------ releases
    def repos_with_releases(self) -> list[str]:
        """Every repo that has deployed (or rolled back) anything."""
        return [r["repo"] for r in self.query("SELECT DISTINCT repo FROM releases ORDER BY repo")]

    def has_releases(self, repo: str) -> bool:
        """Whether the repo has deployed anything (its environments page exists)."""
        return bool(self.query("SELECT 1 FROM releases WHERE repo = ? LIMIT 1", (repo,)))

    def release_by_run(self, run_id: int, environment: str) -> ReleaseRecord | None:
        """The newest release row a run's deploy wrote for an environment."""
        rows = self.query("SELECT * FROM releases WHERE by_run = ? AND environment = ? ORDER BY id DESC LIMIT 1",
                          (run_id, environment))
        return records.release(rows[0]) if rows else None
