"""Tests of gitpipe.lifecycle: the status rules, and the store checking every write against them
(on a real SQLite file in tmp_path)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gitpipe import lifecycle, settings
from gitpipe.errors import GitpipeError, IllegalTransition
from gitpipe.models import ActionRecord, ActionSpec, ActionStatus, Pipeline, RunStatus, StageSpec, TriggerSpec
from gitpipe.queue import NewRun
from gitpipe.store import Store

A, R = ActionStatus, RunStatus
PIPE = Pipeline(
    name="shop", timeout=None, trigger=TriggerSpec(), env=(),
    stages=(StageSpec("build", 1, (ActionSpec("wheel", 2), ActionSpec("gate", 3, type="approval"),
                                   ActionSpec("gate2", 4, type="approval"))),
            StageSpec("test", 5, (ActionSpec("unit", 6),))),
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(settings.load(tmp_path))
    yield s
    s.close()


def running_run(store: Store) -> int:
    [run_id] = store.create_runs([NewRun(repo="shop", pipeline="shop", ref="refs/heads/main", sha="a" * 40,
                                         trigger="push", pipeline_text="", pusher="alice")])
    store.start_run(run_id, PIPE, None, "A <a@example.com>", "msg")
    return run_id


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


# ---------------------------------------------------------------------------- the store checks every write


def test_a_stage_transition_is_checked_and_a_refused_one_writes_nothing(store: Store) -> None:
    run_id = running_run(store)
    store.set_stage(run_id, 0, A.RUNNING)
    store.set_stage(run_id, 0, A.RUNNING)  # a restarted daemon goes on with it
    before = store.events(run_id)
    with pytest.raises(IllegalTransition, match=f'stage "build" of run #{run_id} is running, it cannot become '
                                                 "skipped"):
        store.set_stage(run_id, 0, A.SKIPPED)
    store.set_stage(run_id, 0, A.FAILED)
    with pytest.raises(IllegalTransition, match="is failed, it cannot become failed"):
        store.set_stage(run_id, 0, A.FAILED)  # once finished, not even the same status again
    assert [s.status for s in store.stages(run_id)] == [A.FAILED, A.PENDING]
    assert [(e["subject"], e["status"]) for e in store.events(run_id)][len(before):] == [("stage:0", "failed")]


def test_a_finished_action_is_not_finished_a_second_time(store: Store) -> None:
    run_id = running_run(store)
    wheel = store.actions(run_id)[0]
    store.set_action(wheel.id, A.RUNNING)
    store.set_action(wheel.id, A.SUCCEEDED, exit_code=0)
    with pytest.raises(IllegalTransition, match="is succeeded, it cannot become succeeded"):
        store.set_action(wheel.id, A.SUCCEEDED, message="again")
    assert store.action(wheel.id).message is None


def test_approvals_flip_the_run_through_the_lifecycle(store: Store) -> None:
    run_id = running_run(store)
    _, gate, gate2, _ = store.actions(run_id)
    store.request_approval(run_id, gate.id, "gate", "ok?", 1e12)
    store.request_approval(run_id, gate2.id, "gate2", "ok?", 1e12)
    assert store.run(run_id).status is R.WAITING
    store.resolve_approval(run_id, gate.id, A.SUCCEEDED, "approved by alice")
    assert store.run(run_id).status is R.WAITING  # gate2 still waits
    store.resolve_approval(run_id, gate2.id, A.FAILED, "rejected by bob")
    assert store.run(run_id).status is R.RUNNING
    statuses = [e["status"] for e in store.events(run_id) if e["subject"] == "run"]
    assert statuses == ["queued", "running", "waiting", "running"]
