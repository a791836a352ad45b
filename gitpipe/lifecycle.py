"""The life of a run, its stages and its actions: which status may follow which, and which
status a stage or a run ends with.

The one owner of the status rules. `store.py` is the one writer of status rows, and it checks
every write here first (`check_run`, `check_stage`, `check_action`); the scheduler and delivery
say *when* something happened (a group finished, an approval was decided, a cancel came in) and
ask here *what* status follows. No I/O: the tables are plain data a test reads.

A stage's status is an `ActionStatus` too (it never times out, waits or is interrupted itself).
"""

from __future__ import annotations

from collections.abc import Iterable

from gitpipe.errors import IllegalTransition
from gitpipe.models import ActionRecord, ActionStatus, RunStatus

A, R = ActionStatus, RunStatus

# A run goes back from waiting to running once no approval waits any more; a running run stays
# "running" across a daemon restart (its actions are marked interrupted and started again).
RUN: dict[RunStatus, frozenset[RunStatus]] = {
    R.QUEUED: frozenset({R.RUNNING, R.FAILED, R.CANCELLED}),
    R.RUNNING: frozenset({R.WAITING, R.SUCCEEDED, R.FAILED, R.CANCELLED}),
    R.WAITING: frozenset({R.RUNNING, R.FAILED, R.CANCELLED}),
    R.SUCCEEDED: frozenset(),
    R.FAILED: frozenset(),
    R.CANCELLED: frozenset(),
}

# A stage still pending can end without running: taken over whole (`retry --failed`), closed
# after an earlier failure (skipped), or after a cancel. A running one ends by what its actions did;
# "running" again is a daemon restart going on with it.
STAGE: dict[ActionStatus, frozenset[ActionStatus]] = {
    A.PENDING: frozenset({A.RUNNING, A.SUCCEEDED, A.FAILED, A.SKIPPED, A.CANCELLED}),
    A.RUNNING: frozenset({A.RUNNING, A.SUCCEEDED, A.FAILED, A.CANCELLED}),
    **{s: frozenset() for s in (A.SUCCEEDED, A.FAILED, A.SKIPPED, A.CANCELLED)},
}

# "running" again is the next attempt of a retry (or a worker host's attempt re-placed);
# running -> pending never happens today but is harmless. An interrupted attempt is started
# again (or closed) when the daemon comes back.
ACTION: dict[ActionStatus, frozenset[ActionStatus]] = {
    A.PENDING: frozenset({A.RUNNING, A.WAITING, A.SKIPPED, A.CANCELLED, A.FAILED}),
    A.RUNNING: frozenset({A.RUNNING, A.SUCCEEDED, A.FAILED, A.TIMED_OUT, A.CANCELLED, A.INTERRUPTED,
                          A.PENDING}),
    A.WAITING: frozenset({A.WAITING, A.SUCCEEDED, A.FAILED, A.TIMED_OUT, A.CANCELLED, A.INTERRUPTED}),
    A.INTERRUPTED: frozenset({A.INTERRUPTED, A.RUNNING, A.WAITING, A.PENDING, A.CANCELLED, A.FAILED,
                              A.SUCCEEDED, A.SKIPPED, A.TIMED_OUT}),
    **{s: frozenset() for s in (A.SUCCEEDED, A.FAILED, A.TIMED_OUT, A.SKIPPED, A.CANCELLED)},
}

# `retry --failed`: only an action still pending takes over a result of the retried run
# (store.reuse_action), straight to that result.
TAKES_OVER = frozenset({A.PENDING})


# ---------------------------------------------------------------------------- checks
def check_run(run_id: int, old: RunStatus, new: RunStatus) -> None:
    """Raise IllegalTransition unless a run may go from `old` to `new`."""
    _check(RUN, old, new, f"run #{run_id}")


def check_stage(run_id: int, name: str, old: ActionStatus, new: ActionStatus) -> None:
    """Raise IllegalTransition unless a stage may go from `old` to `new`."""
    _check(STAGE, old, new, f'stage "{name}" of run #{run_id}')


def check_action(run_id: int, name: str, old: ActionStatus, new: ActionStatus) -> None:
    """Raise IllegalTransition unless an action may go from `old` to `new`."""
    _check(ACTION, old, new, f'action "{name}" of run #{run_id}')


def _check(table: dict, old: RunStatus | ActionStatus, new: RunStatus | ActionStatus, what: str) -> None:
    if new not in table[old]:
        allowed = ", ".join(sorted(s.value for s in table[old])) or "nothing: it has finished"
        raise IllegalTransition(f"{what} is {old.value}, it cannot become {new.value} "
                                f"(allowed after {old.value}: {allowed})")


# ---------------------------------------------------------------------------- what follows
def not_run(cancelled: bool) -> ActionStatus:
    """What an action or stage that will not run any more becomes: cancelled after a cancel, else skipped."""
    return A.CANCELLED if cancelled else A.SKIPPED


def closed_stage(cancelled: bool, actions: Iterable[ActionRecord]) -> ActionStatus:
    """A stage closed without running (the rest of it): cancelled, failed when one of its actions
    did not pass, else skipped."""
    if cancelled:
        return A.CANCELLED
    return A.FAILED if any(not a.passed for a in actions) else A.SKIPPED


def left_open(status: ActionStatus, run_end: RunStatus) -> ActionStatus | None:
    """What an action or stage still open when its run ends becomes (None: it had finished).

    One that never started is skipped (cancelled, if the run was); one that started (running,
    waiting, interrupted) failed (cancelled, if the run was).
    """
    if status.finished:
        return None
    return not_run(run_end is R.CANCELLED) if status is A.PENDING else cut_short(run_end)


def cut_short(run_end: RunStatus) -> ActionStatus:
    """What an action, attempt or stage that started but had not finished becomes when its run
    ends: cancelled with a cancelled run, else failed."""
    return A.CANCELLED if run_end is R.CANCELLED else A.FAILED


def run_end(actions: Iterable[ActionRecord], *, cancelled: bool, failed: bool) -> RunStatus:
    """How a run that walked all its stages ends: cancelled, succeeded when every action passed
    (succeeded, skipped, or failed with allow_failure), else failed."""
    if cancelled:
        return R.CANCELLED
    return R.SUCCEEDED if not failed and all(a.passed for a in actions) else R.FAILED


def while_active(status: RunStatus, waiting: bool) -> RunStatus:
    """An active run is waiting while one of its approvals waits, else running."""
    if status is R.RUNNING and waiting:
        return R.WAITING
    if status is R.WAITING and not waiting:
        return R.RUNNING
    return status


def cancels_at_once(status: RunStatus) -> bool:
    """A queued run is cancelled at once; a running or waiting one by its worker (it has processes)."""
    return status is R.QUEUED
