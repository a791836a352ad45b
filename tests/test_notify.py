"""Tests of gitpipe.notify: which stored changes notify, decided by the event's kind."""

from __future__ import annotations

from gitpipe.models import Event
from gitpipe.notify import event_name


def test_the_notification_event_follows_the_kind_not_the_text() -> None:
    assert [event_name(e) for e in (Event.of_run(1, "succeeded"), Event.of_run(1, "failed"),
                                    Event.of_run(1, "cancelled"))] == ["succeeded", "failed", "cancelled"]
    assert event_name(Event.of_action(1, 7, "waiting", "Ship?")) == "approval"  # an approval waits for a person
    assert event_name(Event.of_release(1, "prod", "deployed")) == "deployed"
    assert event_name(Event.of_release(0, "prod", "rolled-back")) == "rolled-back"
    # the same statuses under another kind notify nobody: a stage that failed, an approval decided,
    # a release that failed (its run's "failed" notifies), a run still going
    quiet = [Event.of_stage(1, 0, "failed"), Event.of_approval(1, "rejected", "bob"),
             Event.of_release(1, "prod", "failed"), Event.of_action(1, 7, "failed"), Event.of_run(1, "running"),
             Event.of_run(1, "cancel-requested"), Event.of_approval(1, "waiting")]
    assert [event_name(e) for e in quiet] == [None] * len(quiet)
