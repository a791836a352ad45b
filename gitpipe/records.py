"""Stored rows -> the frozen records of models.py, and events <-> their stored text.

The one place that knows how a row looks: every dict a query returns becomes a record
here, so nothing past the store guesses at column names. No I/O.

An event is stored as (subject, status, detail) with the subject "run", "stage:<idx>",
"action:<id>", "approval" or "release:<environment>" (the format of migration 0001,
kept: old databases and the git hook, which writes "run" rows without importing this
module, stay readable). `encode` and `decode` are the only code that reads or writes it.
"""

from __future__ import annotations

import json
from typing import Any

from gitpipe.models import (
    ActionRecord,
    ActionStatus,
    ApprovalRecord,
    AttemptRecord,
    CacheEntry,
    CacheUse,
    DeployRecord,
    Event,
    EventKind,
    OutputRecord,
    RefusalRecord,
    ReleaseRecord,
    RepoRecord,
    RunRecord,
    RunStatus,
    StageRecord,
)

Row = dict[str, Any]


# ---------------------------------------------------------------------------- events
def encode(event: Event) -> str:
    """The stored subject of an event."""
    if event.kind is EventKind.STAGE:
        return f"stage:{event.stage}"
    if event.kind is EventKind.ACTION:
        return f"action:{event.action_id}"
    if event.kind is EventKind.RELEASE:
        return f"release:{event.environment}"
    return event.kind.value


def decode(run_id: int | None, subject: str, status: str, detail: str | None, at: str | None = None) -> Event:
    """The event a stored row records (a subject of an unknown kind reads as the run's)."""
    head, _, tail = subject.partition(":")
    try:
        kind = EventKind(head)
    except ValueError:  # written by a newer gitpipe: still the run's change, for the listeners
        kind = EventKind.RUN
    return Event(run_id or 0, kind, status, detail,
                 stage=int(tail) if kind is EventKind.STAGE and tail.isdigit() else None,
                 action_id=int(tail) if kind is EventKind.ACTION and tail.isdigit() else None,
                 environment=tail if kind is EventKind.RELEASE else None, at=at)


# ---------------------------------------------------------------------------- rows
def run(r: Row) -> RunRecord:
    return RunRecord(
        id=r["id"], repo=r["repo"], pipeline=r["pipeline"], ref=r["ref"], sha=r["sha"],
        status=RunStatus(r["status"]), trigger=r["trigger"], created_at=r["created_at"],
        started_at=r["started_at"], finished_at=r["finished_at"], error=r["error"], pusher=r["pusher"],
        before_sha=r["before_sha"], retry_of=r["retry_of"], cancelled_by=r["cancelled_by"],
        cancel_reason=r["cancel_reason"], commit_author=r["commit_author"],
        commit_message=r["commit_message"], warnings=r.get("warnings") or 0, reused=r.get("reused") or 0,
        inputs=tuple((str(k), str(v)) for k, v in json.loads(r.get("inputs") or "[]")),
        extra={"deadline": r["deadline"], "cancel_requested_at": r["cancel_requested_at"]},
    )


def stage(r: Row) -> StageRecord:
    return StageRecord(r["run_id"], r["idx"], r["name"], ActionStatus(r["status"]), r["started_at"],
                       r["finished_at"])


def action(r: Row) -> ActionRecord:
    return ActionRecord(
        id=r["id"], run_id=r["run_id"], stage_idx=r["stage_idx"], idx=r["idx"], stage=r["stage"],
        name=r["name"], type=r["type"], run_order=r["run_order"], status=ActionStatus(r["status"]),
        exit_code=r["exit_code"], started_at=r["started_at"], finished_at=r["finished_at"],
        attempts=r["attempts"], message=r["message"], allow_failure=bool(r.get("allow_failure")),
        group=r.get("matrix_group"),
        matrix=tuple((k, v) for k, v in json.loads(r.get("matrix_values") or "[]")),
        reused_from=r.get("reused_from"),
    )


def attempt(r: Row) -> AttemptRecord:
    return AttemptRecord(r["id"], r["action_id"], r["number"], ActionStatus(r["status"]), r["exit_code"],
                         r["started_at"], r["finished_at"], r["deadline"], r["log_path"], r["token"])


def cache_entry(r: Row) -> CacheEntry:
    return CacheEntry(**{**r, "paths": tuple(json.loads(r["paths"])), "protected": bool(r["protected"]),
                         "secrets": bool(r["secrets"])})


def cache_use(r: Row) -> CacheUse:
    return CacheUse(**{**r, "paths": tuple(json.loads(r["paths"]))})


def repo(r: Row) -> RepoRecord:
    return RepoRecord(r["name"], r["path"], r["added_at"])


def output(r: Row) -> OutputRecord:
    return OutputRecord(r["action"], r["key"], r["value"])


def refusal(r: Row) -> RefusalRecord:
    return RefusalRecord(r["action"], r["decision"], r["by_user"], r["at"], r["reason"])


def approval(r: Row, refused: tuple[RefusalRecord, ...] = ()) -> ApprovalRecord:
    return ApprovalRecord(
        id=r["id"], run_id=r["run_id"], action_id=r["action_id"], action=r["action"], message=r["message"],
        requested_at=r["requested_at"], deadline=r["deadline"], decision=r["decision"], by_user=r["by_user"],
        at=r["at"], comment=r["comment"], note=r.get("note"), stage=r.get("stage"), refused=refused)


def release(r: Row) -> ReleaseRecord:
    return ReleaseRecord(
        id=r["id"], repo=r["repo"], environment=r["environment"], release=r["release"], status=r["status"],
        at=r["at"], targets=targets(r["targets"]), run_id=r["run_id"], action_id=r["action_id"], sha=r["sha"],
        by_user=r["by_user"], message=r["message"], by_run=r.get("by_run"), from_release=r.get("from_release"),
        strategy=r.get("strategy"), live_slot=r.get("live_slot"), idle_release=r.get("idle_release"))


def deploy(r: Row) -> DeployRecord:
    return DeployRecord(r["action_id"], r["run_id"], r["repo"], r["environment"], r["release"],
                        targets(r["targets"]), r["started_at"], r["finished_at"])


def targets(value: str | None) -> tuple[str, ...]:
    """A stored targets list (JSON; plain text from a hand-edited row reads as one target)."""
    if not value:
        return ()
    try:
        parsed = json.loads(value)
    except ValueError:
        return (value,)
    return tuple(map(str, parsed)) if isinstance(parsed, list) else (str(parsed),)


def pairs(values: tuple[tuple[str, str], ...]) -> str:
    """A run's inputs as stored: a JSON array of [name, value], in the pipeline's order."""
    return json.dumps([list(p) for p in values])
