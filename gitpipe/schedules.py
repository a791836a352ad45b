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

from gitpipe import cron, git, pipeline, queue, triggers
from gitpipe.errors import GitpipeError, PipelineError
from gitpipe.models import ScheduleSpec
from gitpipe.refs import short_ref
from gitpipe.store import Store

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


class CronTrigger:
    """The `schedule` trigger: knows every repo's cron lines (read from its default branch's head) and fires due slots."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._entries: dict[str, tuple[str, tuple[ScheduleSpec, ...]]] = {}  # repo -> (default head, entries)
        self._heads: dict[tuple[str, str], tuple[str, Schedule | None]] = {}  # (repo, key) -> (head, what runs)

    def schedules(self) -> list[Schedule]:
        found: list[Schedule] = []
        for row in self.store.repos():
            try:
                found += self._of_repo(row.name, row.path)
            except (GitpipeError, PipelineError) as exc:
                log.warning("schedules of %s: %s", row.name, exc)
        return found

    def _of_repo(self, name: str, path: str) -> list[Schedule]:
        # Every wake looks at every repo: two small files read, no pygit2 (~20 MB) loaded.
        default_ref, sha = git.branch_head(path) or self._resolved(path, None)
        if sha is None:
            return []  # no commit yet
        cached = self._entries.get(name)
        if not cached or cached[0] != sha:
            text = git.show(path, sha, queue.PIPELINE_FILE)
            entries: tuple[ScheduleSpec, ...] = ()
            if text is not None:
                try:
                    entries = pipeline.parse(text, default_name=name).trigger.schedule
                except PipelineError:
                    entries = ()
            cached = self._entries[name] = (sha, entries)
        return [s for s in (self._entry(path, name, default_ref, sha, e) for e in cached[1]) if s]

    def _entry(self, path: str, name: str, default_ref: str, default_sha: str,
               entry: ScheduleSpec) -> Schedule | None:
        """What one entry runs now: its branch's head and that commit's pipeline (None: nothing to run)."""
        ref, sha = default_ref, default_sha
        if entry.branch is not None:
            ref = f"refs/heads/{entry.branch}"
            try:
                found = git.ref_head(path, ref)
            except (OSError, UnicodeDecodeError):
                found = self._resolved(path, ref)[1]
            if found is None:
                self._warn(name, entry, f"branch {entry.branch} not found")
                return None
            sha = found
        # The key of a plain entry stays the cron line, as before branches could be named.
        key = entry.cron if entry.branch is None else f"{entry.branch}:{entry.cron}"
        cached = self._heads.get((name, key))
        if cached and cached[0] == sha:
            return cached[1]
        text = git.show(path, sha, queue.PIPELINE_FILE)
        found_schedule = None
        if text is None:
            self._warn(name, entry, f"{short_ref(ref)} has no {queue.PIPELINE_FILE}")
        else:
            try:
                pipe_name = pipeline.parse(text, default_name=name).name
            except PipelineError:
                pipe_name = name  # the run records the invalid pipeline and fails, saying why
            found_schedule = Schedule(name, key, ref, sha, text, pipe_name, entry.cron)
        self._heads[(name, key)] = (sha, found_schedule)
        return found_schedule

    def _warn(self, name: str, entry: ScheduleSpec, why: str) -> None:
        log.warning("schedule %r of %s: %s; skipped", entry.cron, name, why)

    @staticmethod
    def _resolved(path: str, ref: str | None) -> tuple[str, str | None]:
        """A ref's head through pygit2 (the default branch's when `ref` is None), where the
        repository's files do not tell (reftable, a detached HEAD)."""
        repo = git.open_repo(path)
        try:
            return git.resolve(repo, ref or git.default_branch(repo))
        except GitpipeError:
            return "", None  # no commit yet, or no such branch

    def fire_due(self, now: float) -> tuple[list[int], float | None]:
        """Queue one run per cron line whose latest slot has not fired; the next due time."""
        fired, next_due = [], None
        for s in self.schedules():
            key = f"schedule:{s.repo}:{s.line}"
            slot = cron.croniter(s.cron, _utc(now)).get_prev(float)
            last = self.store.get_state(key)
            if last is None:
                self.store.set_state(key, str(slot))  # a new schedule starts from now, not the past
            elif float(last) < slot:
                self.store.set_state(key, str(slot))
                new = queue.NewRun(repo=s.repo, pipeline=s.name, ref=s.ref, sha=s.sha, trigger=triggers.SCHEDULE,
                                   pipeline_text=s.text, pusher=triggers.KINDS[triggers.SCHEDULE].pusher)
                fired += self.store.create_runs([new])
                log.info("schedule %r of %s: run #%s queued", s.line, s.repo, fired[-1])
            due = cron.croniter(s.cron, _utc(now)).get_next(float)
            next_due = due if next_due is None else min(next_due, due)
        return fired, next_due

