"""Tests of gitpipe.releases: where a rollback without --to goes."""

from __future__ import annotations

from gitpipe.models import ReleaseRecord
from gitpipe.releases import candidates


def rows(*events: tuple[str, str]) -> list[ReleaseRecord]:
    """History rows, newest first, from (status, release) pairs."""
    return [ReleaseRecord(n, "shop", "prod", release, status, "2026-11-26T10:00:00.000Z", ())
            for n, (status, release) in enumerate(events)]


def test_a_release_switched_back_from_is_never_a_candidate() -> None:
    # deploy 1; deploy 2 fails in its monitor window and is switched back to 1
    history = rows(("rolled-back", "1-a"), ("failed", "2-b"), ("deployed", "1-a"))
    assert candidates(history) == []


def test_the_release_live_before_the_current_one_comes_first() -> None:
    # 1, 2, 3 deployed; rollback --to 1; 4 deployed: back to 1, what ran before 4
    history = rows(("deployed", "4-d"), ("rolled-back", "1-a"), ("deployed", "3-c"), ("deployed", "2-b"),
                   ("deployed", "1-a"))
    assert candidates(history) == ["1-a", "3-c", "2-b"]


def test_a_second_rollback_goes_further_back_never_forward() -> None:
    # 1, 2, 3 deployed; rolled back from 3 to 2: the next rollback goes to 1, not to 3
    history = rows(("rolled-back", "2-b"), ("deployed", "3-c"), ("deployed", "2-b"), ("deployed", "1-a"))
    assert candidates(history) == ["1-a"]


def test_failed_deploys_before_any_switch_change_nothing() -> None:
    history = rows(("failed", "3-c"), ("deployed", "2-b"), ("failed", "1-a"))
    assert candidates(history) == []
    assert candidates(rows(("failed", "1-a"))) == []
