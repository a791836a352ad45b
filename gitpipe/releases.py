"""Environments and their releases: the history `gitpipe environments` shows, and `gitpipe rollback`.

A releases row says what an environment runs after an event, and carries that release's
own run and sha (see store.add_release). "Good" means deployed: a release with a 'deployed'
row passed its healthcheck and monitor window. A rollback without `--to` goes to the
release that was live before the current one and was good, walking the history back.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from gitpipe import pipeline as pipeline_mod
from gitpipe.api import user
from gitpipe.errors import GitpipeError, UsageError
from gitpipe.intake import now_iso
from gitpipe.models import ActionSpec, ReleaseRecord
from gitpipe.settings import Settings
from gitpipe.store import Store

LIVE = ("deployed", "rolled-back")  # the statuses of rows after which the row's release is live


@dataclass(frozen=True)
class Rollback:
    """What `gitpipe rollback` did: status "rolled-back" or "failed"; `warning` when the
    switch happened but after_switch or the healthcheck failed there."""

    status: str
    release: str
    message: str
    warning: str
    log: tuple[str, ...]


@dataclass(frozen=True)
class EnvironmentState:
    """An environment as `gitpipe environments` shows it: the release live now (None: nothing
    deployed), how the newest deploy switched (strategy, blue-green slots) and the history."""

    environment: str
    current: ReleaseRecord | None
    history: tuple[ReleaseRecord, ...]  # newest first

    @property
    def latest(self) -> ReleaseRecord | None:
        return self.history[0] if self.history else None

    def to_json(self) -> dict[str, Any]:
        """The shape of `gitpipe environments --json`."""
        latest = self.latest
        return {"environment": self.environment, "current": _row_json(self.current),
                "strategy": latest.strategy if latest else None, "live_slot": latest.live_slot if latest else None,
                "idle_release": latest.idle_release if latest else None,
                "history": [_row_json(r) for r in self.history]}


def _row_json(row: ReleaseRecord | None) -> dict[str, Any] | None:
    return None if row is None else {**asdict(row), "targets": list(row.targets)}


def environments(store: Store, repo: str) -> list[EnvironmentState]:
    """Each environment of a repo: its current release and history, newest first."""
    store.repo_path(repo)
    out = []
    for env in store.environments(repo):
        history = tuple(store.releases(repo, env))
        out.append(EnvironmentState(env, next((r for r in history if r.status in LIVE), None), history))
    return out


def candidates(history: Sequence[ReleaseRecord]) -> list[str]:
    """Where a rollback may go, best first: the releases live before the current one, newest
    first, that were good (deployed) and are older than it (a rollback never goes forward)."""
    from gitpipe.deploy.targets import release_key

    live = [r.release for r in history if r.status in LIVE]
    if not live:
        return []
    good = {r.release for r in history if r.status == "deployed"}
    current, found = live[0], []
    for release in live[1:]:
        if release in good and release_key(release) < release_key(current) and release not in found:
            found.append(release)
    return found


def rollback(settings: Settings, store: Store, repo: str, environment: str, to: str | None) -> Rollback:
    """Switch an environment to its last good release (or `to`), run after_switch and the
    healthcheck there, record it and re-render the environments page."""
    from gitpipe import deploy

    envs = {e.environment: e for e in environments(store, repo)}
    if environment not in envs:
        known = ", ".join(envs) or "none deployed yet"
        raise UsageError(f'{repo} has no environment "{environment}" (environments: {known})')
    history = envs[environment].history
    targets = list(history[0].targets)
    lines: list[str] = []
    ctx = deploy.DeployContext(run_id=0, sha="", short_sha="", environment=environment,
                               known_hosts=settings.known_hosts, identity=settings.identity, log=lines.append,
                               holder=f"rollback by {user()} on {socket.gethostname()} pid {os.getpid()} "
                                      f"at {now_iso()}")
    goal = deploy.rollback_goal(targets, ctx, to, candidates(history))  # a typo: UsageError, nothing recorded
    run_id, sha, action_id = store.release_origin(repo, goal)
    spec = _deploy_spec(store, run_id, action_id) or _latest_spec(store, history)
    ctx = replace(ctx, run_id=run_id or 0, sha=sha or "", short_sha=(sha or "")[:7])
    result = deploy.rollback(targets, ctx, goal, spec)
    status = "rolled-back" if result.status == deploy.ROLLED_BACK else "failed"
    slots = deploy.slots(result.targets)
    left = {t.previous for t in result.targets}
    strategy = "blue-green" if slots["live_slot"] else spec.strategy if spec else None
    store.add_release(repo, environment, goal, status, targets, run_id=run_id, action_id=action_id, sha=sha,
                      by=user(), message=f"rollback by {user()}: {result.message}",
                      from_release=left.pop() if len(left) == 1 else None, strategy=strategy,
                      live_slot=slots["live_slot"], idle_release=slots["idle_release"])
    _render(settings, store, repo, lines)
    return Rollback(status, goal, result.message, result.warning, tuple(lines))


def _deploy_spec(store: Store, run_id: int | None, action_id: int | None) -> ActionSpec | None:
    """The deploy action that deployed a release, as its run's pipeline file wrote it."""
    if not run_id or not action_id:
        return None
    try:
        action = store.action(action_id)
        pipe = pipeline_mod.parse(store.pipeline_text(run_id) or "")
        spec = pipe.action(action.stage, action.name)
    except (GitpipeError, LookupError):  # the run or action is gone, or the file changed shape
        return None
    return spec if spec is not None and spec.type == "deploy" else None


def _latest_spec(store: Store, history: Sequence[ReleaseRecord]) -> ActionSpec | None:
    """The newest deploy action of the environment, for a release whose own is not known."""
    for row in history:
        spec = _deploy_spec(store, row.run_id, row.action_id)
        if spec:
            return spec
    return None


def _render(settings: Settings, store: Store, repo: str, lines: list[str]) -> None:
    """The environments page shows the rollback at once (the daemon may not be running)."""
    from gitpipe.report import Reporter

    reporter = Reporter(settings, store)
    try:
        reporter.render_environments(repo)
    except (GitpipeError, OSError) as exc:
        lines.append(f"the site could not be updated: {exc} (run `gitpipe report`)")
    finally:
        reporter.close()
