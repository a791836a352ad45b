"""`[trigger] schedule`: cron lines (UTC) that run the head of a branch.

The schedule is read from the head of the repo's default branch. A plain cron string runs
that branch; `{ cron = "...", branch = "B" }` runs the head of B with B's own pipeline
file (a branch that is gone, or has no pipeline file, is logged and skipped).

The last slot that fired is stored per repo and cron line, so a slot missed while the
daemon was down fires once when it comes back, not once per missed slot.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from croniter import croniter

from gitpipe import git, pipeline, queue
from gitpipe.errors import GitpipeError, PipelineError
from gitpipe.models import ScheduleSpec, short_ref
from gitpipe.store import Store

if TYPE_CHECKING:
    import pygit2

log = logging.getLogger("gitpipe")


@dataclass(frozen=True)
class Schedule:
    repo: str
    line: str
    ref: str
    sha: str
    text: str
    name: str
    cron: str


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc)


class Scheduler:
    """Knows every repo's cron lines (read from its default branch's head) and fires due slots."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._entries: dict[str, tuple[str, tuple[ScheduleSpec, ...]]] = {}  # repo -> (default head, entries)
        self._heads: dict[tuple[str, str], tuple[str, Schedule | None]] = {}  # (repo, key) -> (head, what runs)

    def schedules(self) -> list[Schedule]:
        found: list[Schedule] = []
        for row in self.store.repos():
            try:
                found += self._of_repo(row["name"], row["path"])
            except (GitpipeError, PipelineError) as exc:
                log.warning("schedules of %s: %s", row["name"], exc)
        return found

    def _of_repo(self, name: str, path: str) -> list[Schedule]:
        repo = git.open_repo(path)
        try:
            _, sha = git.resolve(repo, git.default_branch(repo))
        except GitpipeError:
            return []  # no commit yet
        cached = self._entries.get(name)
        if not cached or cached[0] != sha:
            text = git.read_file(repo, sha, queue.PIPELINE_FILE)
            entries: tuple[ScheduleSpec, ...] = ()
            if text is not None:
                try:
                    entries = pipeline.parse(text, default_name=name).trigger.schedule
                except PipelineError:
                    entries = ()
            cached = self._entries[name] = (sha, entries)
        return [s for s in (self._entry(repo, name, e) for e in cached[1]) if s]

    def _entry(self, repo: pygit2.Repository, name: str, entry: ScheduleSpec) -> Schedule | None:
        """What one entry runs now: its branch's head and that commit's pipeline (None: nothing to run)."""
        branch = git.default_branch(repo) if entry.branch is None else f"refs/heads/{entry.branch}"
        try:
            ref, sha = git.resolve(repo, branch)
        except GitpipeError:
            if entry.branch:
                self._warn(name, entry, f"branch {entry.branch} not found")
            return None
        # The key of a plain entry stays the cron line, as before branches could be named.
        key = entry.cron if entry.branch is None else f"{entry.branch}:{entry.cron}"
        cached = self._heads.get((name, key))
        if cached and cached[0] == sha:
            return cached[1]
        text = git.read_file(repo, sha, queue.PIPELINE_FILE)
        found = None
        if text is None:
            self._warn(name, entry, f"{short_ref(ref)} has no {queue.PIPELINE_FILE}")
        else:
            try:
                pipe_name = pipeline.parse(text, default_name=name).name
            except PipelineError:
                pipe_name = name  # the run records the invalid pipeline and fails, saying why
            found = Schedule(name, key, ref, sha, text, pipe_name, entry.cron)
        self._heads[(name, key)] = (sha, found)
        return found

    def _warn(self, name: str, entry: ScheduleSpec, why: str) -> None:
        log.warning("schedule %r of %s: %s; skipped", entry.cron, name, why)

    def fire_due(self, now: float) -> tuple[list[int], float | None]:
        """Queue one run per cron line whose latest slot has not fired; the next due time."""
        fired, next_due = [], None
        for s in self.schedules():
            key = f"schedule:{s.repo}:{s.line}"
            slot = croniter(s.cron, _utc(now)).get_prev(float)
            last = self.store.get_state(key)
            if last is None:
                self.store.set_state(key, str(slot))  # a new schedule starts from now, not the past
            elif float(last) < slot:
                self.store.set_state(key, str(slot))
                new = queue.NewRun(repo=s.repo, pipeline=s.name, ref=s.ref, sha=s.sha, trigger="schedule",
                                   pipeline_text=s.text, pusher="schedule")
                fired += self.store.create_runs([new])
                log.info("schedule %r of %s: run #%s queued", s.line, s.repo, fired[-1])
            due = croniter(s.cron, _utc(now)).get_next(float)
            next_due = due if next_due is None else min(next_due, due)
        return fired, next_due
