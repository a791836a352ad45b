"""What the report reads of approvals and releases, tolerant of their tables' absence.

The tables come with the migration "0002_delivery"; on a database without them every
function here returns [] (checked in sqlite_master), so the pages render the same
before and after. Columns read (others are ignored; a missing one reads as empty):

- `approvals`: run_id, action (the approval action's name), message, decision
  ('approved' | 'rejected' | ..., NULL while undecided), by_user, at (ISO 8601 UTC), comment.
- `releases`: repo, environment, run_id, sha, release (the release directory name,
  e.g. "42-1a2b3c4"), status ('deployed' | 'rolled-back' | 'failed'), at, by_user,
  targets (a JSON list of URLs, or plain text), message; since "0004_release_details":
  from_release (a rollback's release left), by_run (the run whose deploy wrote the row),
  strategy, live_slot and idle_release (blue-green: the slot live after, what the idle one holds).

A releases row records what an environment runs *after* the event (delivery.py's
convention): a 'deployed' row its new release, a 'rolled-back' row the release it went
back to. So the current release is the newest 'deployed' or 'rolled-back' row's. Every row
names its release's own run and sha.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

HISTORY_LIMIT = 500  # releases per repo read for the environments page


class Queryable(Protocol):
    """What the functions here need of a Store."""

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class Approval:
    """A decision (or a pending one) on an approval action."""

    action: str
    message: str | None
    decision: str  # "pending" while undecided
    by_user: str
    at: str | None
    comment: str | None
    note: str | None = None  # a warning: approvers unknown on this host
    refused: tuple[Refusal, ...] = ()  # attempts by accounts that may not decide it


@dataclass(frozen=True)
class Refusal:
    """An attempt to decide an approval by an account that may not."""

    decision: str  # "approve" or "reject": what they tried
    by_user: str
    at: str
    reason: str


@dataclass(frozen=True)
class Release:
    """One row of an environment's history."""

    environment: str
    run_id: int | None
    sha: str
    release: str
    status: str
    at: str | None
    by_user: str
    targets: str
    message: str | None = None
    from_release: str | None = None
    strategy: str | None = None
    live_slot: str | None = None
    idle_release: str | None = None


@dataclass(frozen=True)
class Environment:
    """An environment: what it runs now and its history."""

    name: str
    current: Release | None  # the row that deployed the release it runs now
    history: tuple[Release, ...]  # newest first
    switched: Release | None = None  # the row that made it current (a rollback, or `current`)


def has_table(db: Queryable, name: str) -> bool:
    """Whether a table exists (the deploy tables arrive with a later migration)."""
    return bool(db.query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)))


def approvals(db: Queryable, run_id: int) -> list[Approval]:
    """The decisions taken on a run's approval actions, oldest first."""
    if not has_table(db, "approvals"):
        return []
    rows = db.query("SELECT * FROM approvals WHERE run_id = ? ORDER BY rowid", (run_id,))
    refused: list[dict[str, Any]] = []
    if has_table(db, "approval_refusals"):
        refused = db.query("SELECT * FROM approval_refusals WHERE run_id = ? ORDER BY id", (run_id,))
    return [Approval(str(r.get("action") or ""), r.get("message"), str(r.get("decision") or "pending"),
                     str(r.get("by_user") or ""), r.get("at"), r.get("comment"), r.get("note"),
                     tuple(Refusal(f["decision"], f["by_user"], f["at"], f["reason"])
                           for f in refused if f["action"] == r.get("action")))
            for r in rows]


def releases(db: Queryable, repo: str) -> list[Release]:
    """A repo's releases, newest first (at most HISTORY_LIMIT)."""
    if not has_table(db, "releases"):
        return []
    rows = db.query("SELECT * FROM releases WHERE repo = ? ORDER BY rowid DESC LIMIT ?",
                    (repo, HISTORY_LIMIT))
    return [_release(r) for r in rows]


def has_releases(db: Queryable, repo: str) -> bool:
    """Whether the repo has deployed anything (its environments page exists)."""
    return has_table(db, "releases") and bool(
        db.query("SELECT 1 FROM releases WHERE repo = ? LIMIT 1", (repo,)))


def environments(db: Queryable, repo: str) -> list[Environment]:
    """Each environment of a repo with its current release and history, by name."""
    by_env: dict[str, list[Release]] = {}
    for rel in releases(db, repo):
        by_env.setdefault(rel.environment, []).append(rel)
    return [Environment(name, current_release(history), tuple(history), _switched(history))
            for name, history in sorted(by_env.items(), key=_env_order)]


def _switched(history: list[Release]) -> Release | None:
    return next((r for r in history if r.status in ("deployed", "rolled-back")), None)


def current_release(history: list[Release]) -> Release | None:
    """The release an environment runs now (history newest first), with the run that deployed it."""
    now = _switched(history)
    if now is None:
        return None
    # The row of the deploy that put the release there (when, by whom), if it is still listed.
    return next((r for r in history if r.status == "deployed" and r.release == now.release), now)


def _env_order(item: tuple[str, list[Release]]) -> tuple[int, str]:
    """Environments in delivery order: staging-like first, production last, others by name."""
    name = item[0].lower()
    rank = 0 if name.startswith(("dev", "test", "qa")) else 1 if name.startswith(("stag", "pre")) else \
        3 if name.startswith("prod") else 2
    return rank, name


def _release(r: dict[str, Any]) -> Release:
    return Release(environment=str(r.get("environment") or ""), run_id=r.get("run_id"),
                   sha=str(r.get("sha") or ""), release=str(r.get("release") or ""),
                   status=str(r.get("status") or ""), at=r.get("at"), by_user=str(r.get("by_user") or ""),
                   targets=_targets(r.get("targets")), message=r.get("message"),
                   from_release=r.get("from_release"), strategy=r.get("strategy"), live_slot=r.get("live_slot"),
                   idle_release=r.get("idle_release"))


def _targets(value: Any) -> str:
    if not value:
        return ""
    try:
        parsed = json.loads(value)
    except (TypeError, ValueError):
        return str(value)
    return ", ".join(map(str, parsed)) if isinstance(parsed, list) else str(parsed)
