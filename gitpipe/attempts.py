"""An action's attempts: numbered, logged and recorded the same way for every kind of action.

A script's attempt (scheduler), a deploy's (delivery) and, for its log's name, a worker host's
(cluster) all open an attempt with `begin` and close it with `end`: the attempt row and the
action's "running" in one transaction, the log masked and bounded by max_log_size, a failure's
reason as the log's last line, then the attempt row's end (and, when it is the last attempt, the
action's end in the same transaction: one synced commit to start an action, one to end it).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from gitpipe import executor
from gitpipe.models import ActionStatus

if TYPE_CHECKING:
    from gitpipe.masking import Masker
    from gitpipe.settings import Settings
    from gitpipe.store import Store


def safe_name(name: str) -> str:
    """An action's name as a file name's part."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:60]


def log_path(settings: Settings, run_id: int, action_id: int, label: str, number: int) -> Path:
    """Where attempt `number` of an action logs: logs/<run>/<action id>-<label>.<number>.log."""
    return settings.logs_dir / str(run_id) / f"{action_id}-{safe_name(label)}.{number}.log"


def begin(store: Store, settings: Settings, run_id: int, action_id: int, label: str, number: int,
          masker: Masker, *, deadline: float | None, token: str) -> executor.LogWriter:
    """Record attempt `number` of an action (the action -> running) and open its log, masked."""
    path = log_path(settings, run_id, action_id, label, number)
    store.start_attempt(action_id, deadline, str(path), token)
    return executor.LogWriter(path, masker.stream(), settings.max_log_size)


def end(store: Store, action_id: int, number: int, writer: executor.LogWriter,
        outcome: executor.Outcome, final: executor.Outcome | None = None, *, stage_ends: bool = False,
        next_stage: bool = False) -> None:
    """Close an attempt: a failure's reason as its log's last line, the log closed, its row ended;
    with `final`, the action's end too, in the same (synced) transaction (and the stage change
    that follows it: see `Store.finish_attempt`)."""
    if outcome.status in (ActionStatus.FAILED, ActionStatus.TIMED_OUT) and outcome.message:
        writer.line(f"gitpipe: attempt {number} {outcome.status.value}: {outcome.message}")
    writer.close()
    if final is None:
        store.finish_attempt(action_id, number, outcome.status, outcome.exit_code)
    else:
        store.finish_attempt(action_id, number, outcome.status, outcome.exit_code, ends=final.status,
                             message=final.message, stage_ends=stage_ends, next_stage=next_stage)
