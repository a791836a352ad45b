"""Tests of gitpipe.lifecycle: the status tables and rules (tests/test_store.py checks that the
store writes no status without them)."""

from __future__ import annotations

import pytest

from gitpipe import lifecycle
from gitpipe.errors import GitpipeError, IllegalTransition
from gitpipe.models import ActionRecord, ActionStatus, RunStatus

A, R = ActionStatus, RunStatus
def record(status: ActionStatus, allow_failure: bool = False) -> ActionRecord:
    return ActionRecord(id=1, run_id=1, stage_idx=0, idx=0, stage="build", name="wheel", type="run", run_order=1,
                        status=status, exit_code=None, started_at=None, finished_at=None, attempts=0, message=None,
                        allow_failure=allow_failure)


# ---------------------------------------------------------------------------- the tables


@pytest.mark.parametrize("table, states", [(lifecycle.RUN, R), (lifecycle.ACTION, A)])
def test_every_status_has_a_row_and_a_finished_one_never_changes(table: dict, states: type) -> None:
    assert set(table) == set(states)
    for old, allowed in table.items():
        assert (allowed == frozenset()) is old.finished, old


def test_a_stage_takes_only_the_statuses_a_stage_can_have() -> None:
    for old, allowed in lifecycle.STAGE.items():
        assert allowed <= set(lifecycle.STAGE), old
        assert (allowed == frozenset()) is old.finished, old
    assert A.SKIPPED not in lifecycle.STAGE[A.RUNNING]  # a stage that started is never "skipped"


def test_an_illegal_transition_is_an_internal_error_that_says_what_was_allowed() -> None:
    with pytest.raises(IllegalTransition) as caught:
        lifecycle.check_run(7, R.SUCCEEDED, R.RUNNING)
    assert str(caught.value) == ("run #7 is succeeded, it cannot become running "
                                 "(allowed after succeeded: nothing: it has finished)")
    assert not isinstance(caught.value, GitpipeError)  # a bug: never shown as a user's mistake
    with pytest.raises(IllegalTransition, match=r'stage "test" of run #3 is pending, it cannot become timed-out '
                                                r"\(allowed after pending: cancelled, failed, running, skipped"):
        lifecycle.check_stage(3, "test", A.PENDING, A.TIMED_OUT)


# ---------------------------------------------------------------------------- what follows


def test_how_a_run_ends() -> None:
    passed = [record(A.SUCCEEDED), record(A.SKIPPED), record(A.FAILED, allow_failure=True)]
    assert lifecycle.run_end(passed, cancelled=False, failed=False) is R.SUCCEEDED
    assert lifecycle.run_end(passed, cancelled=False, failed=True) is R.FAILED
    assert lifecycle.run_end(passed + [record(A.TIMED_OUT)], cancelled=False, failed=False) is R.FAILED
    assert lifecycle.run_end(passed, cancelled=True, failed=False) is R.CANCELLED


def test_how_a_closed_stage_and_what_a_run_left_open_end() -> None:
    assert lifecycle.closed_stage(False, [record(A.SKIPPED)]) is A.SKIPPED
    assert lifecycle.closed_stage(False, [record(A.SKIPPED), record(A.CANCELLED)]) is A.FAILED
    assert lifecycle.closed_stage(True, [record(A.FAILED)]) is A.CANCELLED
    assert [lifecycle.left_open(s, R.FAILED) for s in (A.PENDING, A.RUNNING, A.WAITING, A.SUCCEEDED)] == [
        A.SKIPPED, A.FAILED, A.FAILED, None]
    assert [lifecycle.left_open(s, R.CANCELLED) for s in (A.PENDING, A.INTERRUPTED, A.SKIPPED)] == [
        A.CANCELLED, A.CANCELLED, None]


def test_an_active_run_waits_while_an_approval_waits() -> None:
    assert lifecycle.while_active(R.RUNNING, waiting=True) is R.WAITING
    assert lifecycle.while_active(R.WAITING, waiting=False) is R.RUNNING
    assert lifecycle.while_active(R.WAITING, waiting=True) is R.WAITING
    assert lifecycle.while_active(R.SUCCEEDED, waiting=False) is R.SUCCEEDED  # a finished run stays
    assert lifecycle.cancels_at_once(R.QUEUED) and not lifecycle.cancels_at_once(R.RUNNING)
