"""Tests of gitpipe.store: migrations and state transitions, on a real SQLite file in tmp_path."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import ISO_UTC

from gitpipe import intake, records, settings
from gitpipe.errors import IllegalTransition, TransitionError, UsageError
from gitpipe.models import (
    ActionSpec,
    ActionStatus,
    ArtifactRecord,
    Event,
    EventKind,
    OutputRecord,
    Pipeline,
    RunStatus,
    StageSpec,
    TriggerSpec,
)
from gitpipe.queue import NewRun
from gitpipe.store import MIGRATIONS, Store

PIPE = Pipeline(
    name="shop", timeout=None, trigger=TriggerSpec(), env=(),
    stages=(
        StageSpec("build", 1, (ActionSpec("wheel", 2), ActionSpec("lint", 3), ActionSpec("pack", 4, run_order=2))),
        StageSpec("test", 5, (ActionSpec("unit", 6),)),
    ),
)


def new_run(**fields: object) -> NewRun:
    values: dict[str, object] = {"repo": "shop", "pipeline": "shop", "ref": "refs/heads/main", "sha": "a" * 40,
                                 "trigger": "push", "pipeline_text": "", "pusher": "alice"}
    values.update(fields)
    return NewRun(**values)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(settings.load(tmp_path))
    yield s
    s.close()


def running_run(store: Store) -> int:
    [run_id] = store.create_runs([new_run()])
    store.start_run(run_id, PIPE, None, "A <a@example.com>", "msg")
    return run_id


# ---------------------------------------------------------------------------- migrations


def test_migrations_are_applied_once(tmp_path: Path) -> None:
    conf = settings.load(tmp_path)
    first = Store(conf)
    assert first.migrate() == []
    [run_id] = first.create_runs([new_run()])
    first.close()
    again = Store(conf)  # reopening applies nothing and keeps the data
    assert again.migrate() == []
    assert again.run(run_id).status is RunStatus.QUEUED
    names = [r["name"] for r in again.query("SELECT name FROM migrations ORDER BY rowid")]
    assert names == [name for name, _ in MIGRATIONS]
    again.close()


def test_an_old_database_is_brought_up_to_date(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / "gitpipe.db", isolation_level=None)
    old.execute("CREATE TABLE migrations (name TEXT PRIMARY KEY, at TEXT)")
    old.executescript(MIGRATIONS[0][1])
    old.execute("INSERT INTO migrations VALUES (?, ?)", (MIGRATIONS[0][0], "2020-01-01T00:00:00.000Z"))
    old.execute("INSERT INTO runs (repo, pipeline, ref, sha, status, trigger, created_at) "
                "VALUES ('shop', 'shop', 'refs/heads/main', 'abc', 'succeeded', 'push', 'x')")
    old.close()
    s = Store(settings.load(tmp_path))
    assert s.query("SELECT name FROM migrations ORDER BY rowid")[-1]["name"] == MIGRATIONS[-1][0]
    assert s.run(1).status is RunStatus.SUCCEEDED
    s.close()


def test_two_processes_opening_an_old_database_at_once_both_succeed(tmp_path: Path) -> None:
    """The daemon and a command started together after an upgrade both migrate; neither may fail."""
    db = tmp_path / "gitpipe.db"
    old = sqlite3.connect(db, isolation_level=None)
    old.execute("PRAGMA journal_mode=WAL")
    old.execute("CREATE TABLE migrations (name TEXT PRIMARY KEY, at TEXT)")
    old.executescript(MIGRATIONS[0][1])
    old.execute("INSERT INTO migrations VALUES (?, ?)", (MIGRATIONS[0][0], "2020-01-01T00:00:00.000Z"))
    old.execute("BEGIN IMMEDIATE")  # hold the write lock so both openers queue up behind it
    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            Store(settings.load(tmp_path)).close()
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # lets both read the applied migrations and wait for the lock (not asserted on)
    old.execute("COMMIT")
    old.close()
    for t in threads:
        t.join()
    assert errors == []
    s = Store(settings.load(tmp_path))
    assert len(s.query("SELECT name FROM migrations")) == len(MIGRATIONS)
    s.close()


# ---------------------------------------------------------------------------- runs


def test_a_run_goes_through_its_states_and_refuses_the_others(store: Store) -> None:
    [run_id] = store.create_runs([new_run()])
    assert store.run(run_id).status is RunStatus.QUEUED
    with pytest.raises(IllegalTransition, match=f"run #{run_id} is queued, it cannot become succeeded"):
        store.finish_run(run_id, RunStatus.SUCCEEDED)
    with pytest.raises(IllegalTransition, match=f"run #{run_id} is queued, it cannot become waiting"):
        store.set_run_waiting(run_id, True)
    assert store.run(run_id).status is RunStatus.QUEUED and store.run(run_id).finished_at is None
    store.start_run(run_id, PIPE, None, "A <a@example.com>", "the message")
    run = store.run(run_id)
    assert run.status is RunStatus.RUNNING and ISO_UTC.match(run.started_at or "")
    assert (run.commit_author, run.commit_message) == ("A <a@example.com>", "the message")
    assert [s.name for s in store.stages(run_id)] == ["build", "test"]
    assert [(a.name, a.run_order, a.status) for a in store.actions(run_id)] == [
        ("wheel", 1, ActionStatus.PENDING), ("lint", 1, ActionStatus.PENDING),
        ("pack", 2, ActionStatus.PENDING), ("unit", 1, ActionStatus.PENDING)]
    store.set_run_waiting(run_id, True)
    assert store.run(run_id).status is RunStatus.WAITING
    store.set_run_waiting(run_id, False)
    store.finish_run(run_id, RunStatus.SUCCEEDED)
    run = store.run(run_id)
    assert run.status is RunStatus.SUCCEEDED and ISO_UTC.match(run.finished_at or "")
    for status in RunStatus:  # a finished run never changes again
        with pytest.raises(IllegalTransition):
            store.finish_run(run_id, status)
    with pytest.raises(IllegalTransition):
        store.fail_queued_run(run_id, "too late")
    assert store.run(run_id).status is RunStatus.SUCCEEDED


def test_every_change_is_stored_as_an_event_with_its_time(store: Store) -> None:
    run_id = running_run(store)
    [wheel, *_] = store.actions(run_id)
    store.set_action(wheel.id, ActionStatus.RUNNING)
    store.set_action(wheel.id, ActionStatus.SUCCEEDED, exit_code=0)
    store.finish_run(run_id, RunStatus.FAILED, "because")
    events = store.events(run_id)
    lint, pack, unit = (a.id for a in store.actions(run_id)[1:])
    assert events == [
        Event.of_run(run_id, "queued"), Event.of_run(run_id, "running"), Event.of_action(run_id, wheel.id, "running"),
        Event.of_action(run_id, wheel.id, "succeeded"),
        # what the run left open ends with it (see test_a_run_that_ends_closes_what_it_left_open)
        Event.of_action(run_id, lint, "skipped"), Event.of_action(run_id, pack, "skipped"),
        Event.of_action(run_id, unit, "skipped"), Event.of_stage(run_id, 0, "skipped"),
        Event.of_stage(run_id, 1, "skipped"), Event.of_run(run_id, "failed", "because")]
    assert all(e.at and ISO_UTC.match(e.at) for e in events)
    assert [e.at for e in events] == sorted(e.at or "" for e in events)
    assert store.run(run_id).error == "because"


@pytest.mark.parametrize("status", [RunStatus.CANCELLED, RunStatus.FAILED])
def test_a_run_that_ends_closes_what_it_left_open(store: Store, status: RunStatus) -> None:
    # A full disk once killed an action's thread before it recorded its end, and the run was
    # then cancelled with that action "running" and its attempt open.
    run_id = running_run(store)
    wheel, lint, pack, unit = store.actions(run_id)
    store.set_stage(run_id, 0, ActionStatus.RUNNING)
    store.set_action(lint.id, ActionStatus.RUNNING)
    store.set_action(lint.id, ActionStatus.SUCCEEDED, exit_code=0)
    store.start_attempt(wheel.id, None, "/dev/null", "token")
    store.finish_run(run_id, status, None if status is RunStatus.CANCELLED else "the disk is full")
    cancelled = status is RunStatus.CANCELLED
    by_name = {a.name: a for a in store.actions(run_id)}
    assert by_name["wheel"].status is (ActionStatus.CANCELLED if cancelled else ActionStatus.FAILED)
    assert by_name["wheel"].message == ("not finished: the run was cancelled" if cancelled else
                                        "not finished: the disk is full")
    assert by_name["lint"].status is ActionStatus.SUCCEEDED
    assert {by_name[n].status for n in ("pack", "unit")} == {
        ActionStatus.CANCELLED if cancelled else ActionStatus.SKIPPED}
    assert [a.status for a in store.attempts(wheel.id)] == [by_name["wheel"].status]
    assert [s.status for s in store.stages(run_id)] == (
        [ActionStatus.CANCELLED] * 2 if cancelled else [ActionStatus.FAILED, ActionStatus.SKIPPED])
    assert store.open_attempts() == []


def test_a_refused_change_writes_nothing(store: Store) -> None:
    run_id = running_run(store)
    store.finish_run(run_id, RunStatus.CANCELLED)
    before = store.events(run_id)
    actions = store.actions(run_id)
    with pytest.raises(IllegalTransition):
        store.finish_run(run_id, RunStatus.SUCCEEDED, "nope")
    run = store.run(run_id)
    assert run.status is RunStatus.CANCELLED and run.error is None
    assert store.events(run_id) == before and store.actions(run_id) == actions


def test_listeners_hear_changes_after_commit_and_nothing_of_a_rollback(store: Store) -> None:
    heard: list[Event] = []
    store.listeners.append(heard.append)
    run_id = running_run(store)
    assert [(e.kind, e.status) for e in heard] == [(EventKind.RUN, "queued"), (EventKind.RUN, "running")]
    heard.clear()
    with pytest.raises(RuntimeError), store.tx():
        store.finish_run(run_id, RunStatus.SUCCEEDED)
        raise RuntimeError("something failed after the change")
    assert heard == []
    assert store.run(run_id).status is RunStatus.RUNNING
    assert [e.status for e in store.events(run_id)] == ["queued", "running"]


# ---------------------------------------------------------------------------- status writes checked by lifecycle


def test_a_stage_transition_is_checked_and_a_refused_one_writes_nothing(store: Store) -> None:
    run_id = running_run(store)
    store.set_stage(run_id, 0, ActionStatus.RUNNING)
    store.set_stage(run_id, 0, ActionStatus.RUNNING)  # a restarted daemon goes on with it
    before = store.events(run_id)
    with pytest.raises(IllegalTransition, match=f'stage "build" of run #{run_id} is running, it cannot become '
                                                 "skipped"):
        store.set_stage(run_id, 0, ActionStatus.SKIPPED)
    store.set_stage(run_id, 0, ActionStatus.FAILED)
    with pytest.raises(IllegalTransition, match="is failed, it cannot become failed"):
        store.set_stage(run_id, 0, ActionStatus.FAILED)  # once finished, not even the same status again
    assert [s.status for s in store.stages(run_id)] == [ActionStatus.FAILED, ActionStatus.PENDING]
    assert [(e.kind, e.stage, e.status) for e in store.events(run_id)][len(before):] == [
        (EventKind.STAGE, 0, "failed")]


def test_a_finished_action_is_not_finished_a_second_time(store: Store) -> None:
    run_id = running_run(store)
    wheel = store.actions(run_id)[0]
    store.set_action(wheel.id, ActionStatus.RUNNING)
    store.set_action(wheel.id, ActionStatus.SUCCEEDED, exit_code=0)
    with pytest.raises(IllegalTransition, match="is succeeded, it cannot become succeeded"):
        store.set_action(wheel.id, ActionStatus.SUCCEEDED, message="again")
    assert store.action(wheel.id).message is None


def test_approvals_flip_the_run_through_the_lifecycle(store: Store) -> None:
    run_id = running_run(store)
    _, gate, gate2, _ = store.actions(run_id)  # any action will do: the store does not look at types
    store.request_approval(run_id, gate.id, "lint", "ok?", 1e12)
    store.request_approval(run_id, gate2.id, "pack", "ok?", 1e12)
    assert store.run(run_id).status is RunStatus.WAITING
    store.resolve_approval(run_id, gate.id, ActionStatus.SUCCEEDED, "approved by alice")
    assert store.run(run_id).status is RunStatus.WAITING  # gate2 still waits
    store.resolve_approval(run_id, gate2.id, ActionStatus.FAILED, "rejected by bob")
    assert store.run(run_id).status is RunStatus.RUNNING
    statuses = [e.status for e in store.events(run_id) if e.kind is EventKind.RUN]
    assert statuses == ["queued", "running", "waiting", "running"]


# ---------------------------------------------------------------------------- actions


def test_action_transitions(store: Store) -> None:
    run_id = running_run(store)
    wheel, lint, pack, unit = store.actions(run_id)
    with pytest.raises(IllegalTransition, match='action "wheel" .* is pending, it cannot become succeeded'):
        store.set_action(wheel.id, ActionStatus.SUCCEEDED)
    store.set_action(wheel.id, ActionStatus.RUNNING)
    started = store.action(wheel.id).started_at
    assert started and ISO_UTC.match(started) and store.action(wheel.id).finished_at is None
    store.set_action(wheel.id, ActionStatus.RUNNING)  # a retry stays running, keeps its start
    assert store.action(wheel.id).started_at == started
    store.set_action(wheel.id, ActionStatus.FAILED, exit_code=3, message="exit status 3")
    act = store.action(wheel.id)
    assert (act.status, act.exit_code, act.message) == (ActionStatus.FAILED, 3, "exit status 3")
    assert act.finished_at and act.finished_at >= started
    for status in ActionStatus:
        if status is not ActionStatus.FAILED:
            with pytest.raises(IllegalTransition):
                store.set_action(wheel.id, status)
    store.set_action(pack.id, ActionStatus.SKIPPED)
    skipped = store.action(pack.id)
    assert skipped.started_at is None and skipped.finished_at is not None
    with pytest.raises(IllegalTransition):
        store.set_action(pack.id, ActionStatus.RUNNING)
    store.set_action(lint.id, ActionStatus.RUNNING)
    store.set_action(lint.id, ActionStatus.INTERRUPTED)
    store.set_action(lint.id, ActionStatus.RUNNING)  # an interrupted attempt starts again
    store.set_action(unit.id, ActionStatus.CANCELLED)
    assert store.action(unit.id).status is ActionStatus.CANCELLED


def test_attempts_are_numbered_and_open_ones_are_found(store: Store, tmp_path: Path) -> None:
    run_id = running_run(store)
    wheel = store.actions(run_id)[0]
    assert store.start_attempt(wheel.id, 123.5, str(tmp_path / "1.log"), "tok1") == 1
    store.finish_attempt(wheel.id, 1, ActionStatus.FAILED, 1)
    assert store.start_attempt(wheel.id, None, str(tmp_path / "2.log"), "tok2") == 2
    assert store.action(wheel.id).attempts == 2 and store.action(wheel.id).exit_code is None
    [first, second] = store.attempts(wheel.id)
    assert (first.status, first.exit_code, first.deadline, first.token) == (ActionStatus.FAILED, 1, 123.5, "tok1")
    assert first.finished_at and second.finished_at is None
    assert [(a.action_id, a.number, a.token) for a in store.open_attempts()] == [(wheel.id, 2, "tok2")]


def test_an_actions_end_is_recorded_with_its_last_attempts_in_one_transaction(store: Store,
                                                                               tmp_path: Path) -> None:
    run_id = running_run(store)
    wheel = store.actions(run_id)[0]
    store.start_attempt(wheel.id, None, str(tmp_path / "1.log"), "tok1")
    heard: list[Event] = []
    store.listeners.append(heard.append)
    store.finish_attempt(wheel.id, 1, ActionStatus.FAILED, 3, ends=ActionStatus.FAILED, message="exit status 3")
    act, [attempt] = store.action(wheel.id), store.attempts(wheel.id)
    assert (act.status, act.exit_code, act.message) == (ActionStatus.FAILED, 3, "exit status 3")
    assert act.finished_at and (attempt.status, attempt.exit_code) == (ActionStatus.FAILED, 3)
    assert [(e.kind, e.action_id, e.status, e.detail) for e in heard] == [
        (EventKind.ACTION, wheel.id, "failed", "exit status 3")]
    # A transition the lifecycle forbids records neither: the attempt is still open.
    other = store.actions(run_id)[1]
    store.start_attempt(other.id, None, str(tmp_path / "2.log"), "tok2")
    store.set_action(other.id, ActionStatus.CANCELLED)
    with pytest.raises(IllegalTransition):
        store.finish_attempt(other.id, 1, ActionStatus.SUCCEEDED, 0, ends=ActionStatus.SUCCEEDED)
    assert [(a.action_id, a.number) for a in store.open_attempts()] == [(other.id, 1)]
    assert store.action(other.id).status is ActionStatus.CANCELLED


def test_cancel_records_who_and_why(store: Store) -> None:
    [queued, running, done] = store.create_runs([new_run(), new_run(), new_run()])
    store.start_run(running, PIPE, None, None, None)
    store.start_run(done, PIPE, None, None, None)
    store.finish_run(done, RunStatus.SUCCEEDED)
    now = store.request_cancel(queued, "bob", "wrong branch")
    assert now.status is RunStatus.CANCELLED and now.finished_at
    assert (now.cancelled_by, now.cancel_reason) == ("bob", "wrong branch")
    later = store.request_cancel(running, "carol", None)
    assert later.status is RunStatus.RUNNING and store.cancel_requested(running)
    assert later.cancelled_by == "carol"
    assert store.events(running)[-1].status == "cancel-requested"
    with pytest.raises(TransitionError, match="already succeeded"):
        store.request_cancel(done, "dave", None)
    assert store.run(done).cancelled_by is None


def test_unknown_runs_and_repos_are_usage_errors(store: Store) -> None:
    store.add_repo("shop", "/srv/git/shop.git")
    with pytest.raises(UsageError, match="unknown run #999") as err:
        store.run(999)
    assert err.value.exit_code == 2
    with pytest.raises(UsageError, match=r'unknown repo "nope" \(registered: shop\)'):
        store.repo_path("nope")
    store.remove_repo("shop")
    with pytest.raises(UsageError):
        store.repo_path("shop")


# ---------------------------------------------------------------------------- intake, artifacts, outputs


def test_runs_recorded_by_the_hook_are_read_by_the_store(store: Store) -> None:
    ids: list[int] = []
    lock = threading.Lock()

    def push(n: int) -> None:
        got = intake.record(store.settings.db_path, [
            {"repo": "shop", "pipeline": "shop", "ref": f"refs/heads/b{n}", "sha": "b" * 40, "trigger": "push",
             "pusher": "eve", "pipeline_text": "", "error": None}])
        with lock:
            ids.extend(got)

    threads = [threading.Thread(target=push, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ids) == list(range(1, 21))
    runs = store.runs(limit=100)
    assert {r.ref for r in runs} == {f"refs/heads/b{n}" for n in range(20)}
    assert all(r.status is RunStatus.QUEUED and r.pusher == "eve" for r in runs)
    failed = intake.record(store.settings.db_path, [
        {"repo": "shop", "pipeline": "shop", "ref": "refs/heads/x", "sha": "c" * 40, "trigger": "push",
         "error": ".pipeline.toml is invalid"}])[0]
    run = store.run(failed)
    assert run.status is RunStatus.FAILED and run.finished_at and run.error == ".pipeline.toml is invalid"


def test_artifacts_and_outputs_round_trip(store: Store) -> None:
    run_id = running_run(store)
    art = ArtifactRecord(run_id=run_id, name="wheel", action="wheel", size=10, sha256="f" * 64,
                         path="/x/wheel", files=1)
    store.add_artifact(art)
    store.add_artifact(art)  # the same name again (a retried action) replaces it
    assert store.artifacts(run_id) == [art]
    store.set_outputs(run_id, "wheel", {"version": "1.0", "sha": "abc"})
    store.set_outputs(run_id, "wheel", {"version": "1.1"})
    assert {(o.key, o.value) for o in store.outputs(run_id)} == {("version", "1.1"), ("sha", "abc")}


# ---------------------------------------------------------------------------- retry --failed


def test_a_retry_takes_over_a_result_once_and_only_into_a_pending_action(store: Store) -> None:
    first = running_run(store)
    wheel = store.actions(first)[0]
    store.set_action(wheel.id, ActionStatus.RUNNING)
    store.set_action(wheel.id, ActionStatus.SUCCEEDED, exit_code=0)
    store.set_outputs(first, "wheel", {"VERSION": "1.0"})
    origin = store.action(wheel.id)
    retry = store.create_retry(new_run(trigger="retry", retry_of=first), [(0, 0, wheel.id)])
    assert store.reuse_plan(retry) == {(0, 0): origin}
    store.start_run(retry, PIPE, None, None, None)
    target = store.actions(retry)[0]
    store.reuse_action(target.id, origin, [], {"VERSION": "1.0"})
    taken = store.action(target.id)
    assert taken.status is ActionStatus.SUCCEEDED and taken.reused_from == first
    assert taken.message == f"reused from #{first}" and taken.finished_at == origin.finished_at
    assert store.outputs(retry) == [OutputRecord("wheel", "VERSION", "1.0")]
    assert store.run(retry).reused == 1 and store.run(retry).retry_of == first
    with pytest.raises(TransitionError, match="cannot take over the result"):
        store.reuse_action(target.id, origin, [], {})
    # A result reused twice names the run where it ran.
    again = store.create_retry(new_run(trigger="retry", retry_of=retry), [(0, 0, target.id)])
    store.start_run(again, PIPE, None, None, None)
    store.reuse_action(store.actions(again)[0].id, store.action(target.id), [], {})
    assert store.actions(again)[0].reused_from == first
    assert store.actions(again)[0].message == f"reused from #{first}"


def test_refused_approvals_are_kept_up_to_a_bound(store: Store) -> None:
    """Any local account may try to decide an approval: its refusals are recorded, but never without end."""
    from gitpipe.store import REFUSALS_KEPT

    approval = Pipeline(name="shop", timeout=None, trigger=TriggerSpec(), env=(),
                        stages=(StageSpec("ship", 1, (ActionSpec("gate", 2, type="approval"),)),))
    [run_id] = store.create_runs([new_run()])
    store.start_run(run_id, approval, None, None, None, inputs=(("version", "1.0"),))
    [gate] = store.actions(run_id)
    store.request_approval(run_id, gate.id, "gate", "Ship?", time.time() + 60)
    row = store.pending_approval(run_id)
    for n in range(REFUSALS_KEPT + 5):
        store.refuse_approval(row, "approve", f"user{n}", "not an approver")
    kept = store.approval_refusals(run_id)
    assert len(kept) == REFUSALS_KEPT and kept[0].by_user == "user0"
    assert store.approvals(run_id)[0].refused == tuple(kept)
    assert store.run(run_id).inputs == (("version", "1.0"),)
    assert store.decide(run_id, "approved", "alice", None, action_id=gate.id).by_user == "alice"
    assert store.approval(gate.id) == replace(row, decision="approved", by_user="alice", at=store.approval(gate.id).at,
                                             stage=None)
    with pytest.raises(TransitionError):
        store.pending_approval(run_id)


# ---------------------------------------------------------------------------- issue 15: releases and events


def test_release_origin_is_the_run_that_built_the_release(store: Store) -> None:
    run_id = running_run(store)
    rel = f"{run_id}-aaaaaaa"
    assert store.release_origin("shop", rel) == (run_id, "a" * 40, None)  # from its name, before any row
    store.add_release("shop", "prod", rel, "deployed", ["file:///x"], run_id=run_id, action_id=7, sha="a" * 40,
                      by_run=run_id)
    store.add_release("shop", "prod", rel, "rolled-back", ["file:///x"], run_id=run_id, sha="a" * 40,
                      from_release="9-bbbbbbb")
    assert store.release_origin("shop", rel) == (run_id, "a" * 40, 7)
    assert store.release_origin("shop", "9-bbbbbbb") == (None, None, None)  # unknown run
    assert store.release_origin("shop", "bogus") == (None, None, None)


def test_foreign_events_hands_over_what_other_processes_stored(tmp_path: Path) -> None:
    conf = settings.load(tmp_path)
    daemon, command = Store(conf), Store(conf)
    try:
        heard: list[Event] = []
        daemon.listeners.append(heard.append)
        cursor = daemon.newest_event()
        own = running_run(daemon)
        [queued] = command.create_runs([new_run(ref="refs/heads/other")])  # what the hook does
        command.request_cancel(queued, "bob", "not needed")  # what `gitpipe cancel` does
        found, cursor = daemon.foreign_events(cursor)
        assert found == [Event.of_run(queued, "queued"), Event.of_run(queued, "cancelled")]
        assert any(e.run_id == own for e in heard)  # its own went to the listeners at commit, not again
        assert daemon.foreign_events(cursor) == ([], cursor)
    finally:
        daemon.close()
        command.close()


# ---------------------------------------------------------------------------- typed events and rows


def test_every_event_kind_round_trips_through_its_stored_text() -> None:
    """encode/decode are the only code that knows the stored subject; the format is migration
    0001's ("run", "stage:<idx>", "action:<id>", "approval", "release:<env>"), so older databases
    and the hook's "run" rows read back as the same events."""
    events = [Event.of_run(3, "queued"), Event.of_stage(3, 2, "running"), Event.of_action(3, 41, "waiting", "Ship?"),
              Event.of_approval(3, "approved", "alice"), Event.of_release(0, "prod:eu", "rolled-back", "by hand")]
    assert [records.encode(e) for e in events] == ["run", "stage:2", "action:41", "approval", "release:prod:eu"]
    assert [records.decode(e.run_id, records.encode(e), e.status, e.detail) for e in events] == events
    assert {e.kind for e in events} == set(EventKind)  # a new kind gets a line here
    # a row of a newer gitpipe's kind: still its run's change, so the listeners re-render that run
    assert records.decode(None, "artifact:9", "kept", None) == Event(0, EventKind.RUN, "kept")


def test_events_are_stored_in_the_format_older_databases_hold(store: Store) -> None:
    run_id = running_run(store)
    store.add_release("shop", "prod", f"{run_id}-aaaaaaa", "deployed", ["file:///x"], run_id=run_id, by_run=run_id)
    stored = store.query("SELECT subject, status FROM events WHERE run_id = ? ORDER BY id DESC LIMIT 1", (run_id,))
    assert stored == [{"subject": "release:prod", "status": "deployed"}]
    assert store.events(run_id)[-1] == Event.of_release(run_id, "prod", "deployed")


def test_rows_leave_the_store_as_records(store: Store) -> None:
    run_id = running_run(store)
    store.add_release("shop", "prod", f"{run_id}-aaaaaaa", "deployed", ["ssh://a/srv", "ssh://b/srv"],
                      run_id=run_id, sha="a" * 40, by="alice", by_run=run_id, strategy="rolling")
    [rel] = store.releases("shop")
    assert (rel.environment, rel.release, rel.targets, rel.by_user, rel.strategy, rel.sha) == (
        "prod", f"{run_id}-aaaaaaa", ("ssh://a/srv", "ssh://b/srv"), "alice", "rolling", "a" * 40)
    assert store.release_by_run(run_id, "prod") == rel and store.release_by_run(run_id, "qa") is None
    assert store.has_releases("shop") and store.repos_with_releases() == ["shop"]
    [wheel, *_] = store.actions(run_id)
    store.start_deploy(wheel.id, run_id, "shop", "prod", rel.release, list(rel.targets))
    flight = store.deploy_in_flight(wheel.id)
    assert flight is not None and (flight.environment, flight.targets, flight.finished_at) == (
        "prod", rel.targets, None)
    store.finish_deploy(wheel.id)
    assert store.deploy_in_flight(wheel.id) is None
    store.add_repo("shop", "/srv/git/shop.git")
    assert [(r.name, r.path) for r in store.repos()] == [("shop", "/srv/git/shop.git")]
    assert store.run_ids("shop") == [run_id] and store.repos_of_runs({run_id, 999}) == {run_id: "shop"}
    assert store.run_id_range() == (run_id, run_id) and store.runs_after("shop", 0) == (1, run_id)
    assert not store.pruned(run_id)
