"""`[trigger] schedule`: cron lines (UTC) that run the head of the repo's default branch.

The last slot that fired is stored per repo and cron line, so a slot missed while the
daemon was down fires once when it comes back, not once per missed slot.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from gitpipe import git, pipeline, queue
from gitpipe.errors import GitpipeError, PipelineError
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


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc)


class Scheduler:
    """Knows every repo's cron lines (read from its default branch's head) and fires due slots."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._heads: dict[str, tuple[str, list[Schedule]]] = {}

    def schedules(self) -> list[Schedule]:
        found: list[Schedule] = []
        for row in self.store.repos():
            try:
                found += self._of_repo(row["name"], row["path"])
            except (GitpipeError, PipelineError) as exc:
                log.warning("schedules of %s: %s", row["name"], exc)
        return found

    def _of_repo(self, name: str, path: str) -> list[Schedule]:
        # Every wake looks at every repo: two small files read, no pygit2 (~20 MB) loaded.
        ref, sha = git.branch_head(path) or self._resolved(path)
        if sha is None:
            return []  # no commit yet
        cached = self._heads.get(name)
        if cached and cached[0] == sha:
            return cached[1]
        text = git.show(path, sha, queue.PIPELINE_FILE)
        result: list[Schedule] = []
        if text is not None:
            try:
                pipe = pipeline.parse(text, default_name=name)
                result = [Schedule(name, line, ref, sha, text, pipe.name) for line in pipe.trigger.schedule]
            except PipelineError:
                result = []
        self._heads[name] = (sha, result)
        return result

    @staticmethod
    def _resolved(path: str) -> tuple[str, str | None]:
        """The default branch's head through pygit2, where its files do not tell (reftable, detached)."""
        repo = git.open_repo(path)
        try:
            return git.resolve(repo, git.default_branch(repo))
        except GitpipeError:
            return "", None  # no commit yet

    def fire_due(self, now: float) -> tuple[list[int], float | None]:
        """Queue one run per cron line whose latest slot has not fired; the next due time."""
        fired, next_due = [], None
        for s in self.schedules():
            key = f"schedule:{s.repo}:{s.line}"
            slot = _croniter()(s.line, _utc(now)).get_prev(float)
            last = self.store.get_state(key)
            if last is None:
                self.store.set_state(key, str(slot))  # a new schedule starts from now, not the past
            elif float(last) < slot:
                self.store.set_state(key, str(slot))
                new = queue.NewRun(repo=s.repo, pipeline=s.name, ref=s.ref, sha=s.sha, trigger="schedule",
                                   pipeline_text=s.text, pusher="schedule")
                fired += self.store.create_runs([new])
                log.info("schedule %r of %s: run #%s queued", s.line, s.repo, fired[-1])
            due = _croniter()(s.line, _utc(now)).get_next(float)
            next_due = due if next_due is None else min(next_due, due)
        return fired, next_due


def _croniter():  # type: ignore[no-untyped-def]
    """croniter's class, imported on the first schedule (~5 MB an idle daemon without one never pays)."""
    from croniter import croniter  # type: ignore[import-untyped]

    return croniter
