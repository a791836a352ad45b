"""The delivery actions of a run: approvals (wait for a person) and deploys.

Called by scheduler.RunWorker for actions of type "approval" and "deploy", with a `RunContext`:
what of its run an action may see and touch, and nothing else of the worker. This module never
imports the scheduler. Status changes go through the store (checked by lifecycle.py); an
attempt is opened and closed by `attempts`, as a script's is.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gitpipe import approvals, artifacts, attempts, executor
from gitpipe.durations import format_duration
from gitpipe.errors import ActionError, GitpipeError
from gitpipe.intake import now_iso
from gitpipe.matching import expand, placeholder_values
from gitpipe.models import ActionRecord, ActionSpec, ActionStatus, RunRecord

if TYPE_CHECKING:
    from gitpipe import deploy
    from gitpipe.git import WorktreePool
    from gitpipe.settings import Settings
    from gitpipe.store import Store
    from gitpipe.trust import Trust

APPROVAL_RECHECK = 60.0  # seconds; a wake-up normally comes at once through the daemon


@dataclass(frozen=True)
class RunContext:
    """What a delivery action sees of its run: the record, where to write, and its signals."""

    run: RunRecord
    pipeline: str  # the pipeline's name, for placeholders
    store: Store
    settings: Settings
    trust: Trust
    pool: WorktreePool  # the run's worktrees: a deploy checks out its commit to take `source` from
    env_locks: dict[tuple[str, str], FifoLock]  # the host's: one per (repo, environment)
    cancelled: threading.Event
    interrupted: threading.Event  # the daemon stops: an approval keeps waiting, for the next one
    changed: threading.Event  # set on every daemon wake-up: an approval looks for its decision again

    @property
    def halted(self) -> bool:
        return self.cancelled.is_set() or self.interrupted.is_set()


def placeholders(worker: RunContext, environment: str = "") -> dict[str, str]:
    run = worker.run
    return placeholder_values(run.id, worker.pipeline, run.repo, run.ref, run.sha, environment)


# ---------------------------------------------------------------------------- approvals
def run_approval(worker: RunContext, rec: ActionRecord, spec: ActionSpec) -> None:
    """Wait for `gitpipe approve/reject`, the timeout, or a cancel; survives daemon restarts."""
    store = worker.store
    if store.approval(rec.id) is None:
        message = expand(spec.message or f'Approve "{spec.name}" of {worker.pipeline} '
                         f"{{short_sha}}?", placeholders(worker))
        store.request_approval(worker.run.id, rec.id, spec.name, message, time.time() + spec.timeout)
        missing = approvals.unknown(spec.approvers or ())
        if missing and spec.approvers and len(missing) == len(spec.approvers):
            why = (f"nobody can decide it: no approver exists on this host ({', '.join(missing)}); "
                   "fix approvers in .pipeline.toml (or create the account), then retry the run")
            store.decide(worker.run.id, "rejected", "gitpipe", why, action_id=rec.id)  # said, not left "waiting"
            return store.resolve_approval(worker.run.id, rec.id, ActionStatus.FAILED, why)
        if missing:
            store.note_approval(rec.id, f"approvers unknown on this host: {', '.join(missing)}")
    while True:
        appr = store.approval(rec.id)
        if appr is None:  # requested above and never removed: a bug, not a decision
            raise ActionError(f'approval "{spec.name}" of run #{worker.run.id} has no request recorded')
        who = f"{appr.by_user}" + (f": {appr.comment}" if appr.comment else "")
        if appr.decision == "approved":
            return store.resolve_approval(worker.run.id, rec.id, ActionStatus.SUCCEEDED, f"approved by {who}")
        if appr.decision == "rejected":
            return store.resolve_approval(worker.run.id, rec.id, ActionStatus.FAILED, f"rejected by {who}")
        remaining = float(appr.deadline or 0) - time.time()
        if remaining <= 0:
            if store.time_out_approval(worker.run.id, rec.id, f"timed out after {format_duration(spec.timeout)}"):
                return None
            continue  # a decision came in at the last moment: it stands
        if worker.cancelled.is_set():
            return store.resolve_approval(worker.run.id, rec.id, ActionStatus.CANCELLED, "run cancelled")
        if worker.interrupted.is_set():
            return None  # still waiting; the next daemon goes on waiting
        worker.changed.wait(min(remaining, APPROVAL_RECHECK))
        worker.changed.clear()


# ---------------------------------------------------------------------------- deploys
class FifoLock:
    """Deploys to one environment never overlap; the oldest run goes first."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.waiting: list[int] = []
        self.held = False

    def __call__(self, run_id: int) -> _Held:
        return _Held(self, run_id)


class _Held:
    def __init__(self, lock: FifoLock, run_id: int) -> None:
        self.lock, self.run_id = lock, run_id

    def __enter__(self) -> None:
        with self.lock.cond:
            self.lock.waiting.append(self.run_id)
            self.lock.cond.wait_for(lambda: not self.lock.held and min(self.lock.waiting) == self.run_id)
            self.lock.waiting.remove(self.run_id)
            self.lock.held = True

    def __exit__(self, *exc: object) -> None:
        with self.lock.cond:
            self.lock.held = False
            self.lock.cond.notify_all()


def run_deploy(worker: RunContext, rec: ActionRecord, spec: ActionSpec) -> None:
    """Deploy the action's source to its targets; record the release; never re-run blindly."""
    from gitpipe import deploy  # paramiko and friends: loaded when a deploy runs, not at start

    run, store, settings = worker.run, worker.store, worker.settings
    repo_path = store.repo_path(run.repo)
    worker.trust.require(run.repo, repo_path, run.ref, "deploy")
    env = spec.environment or ""
    values = placeholders(worker, env)
    targets = [expand(t, values) for t in spec.targets]
    lock = worker.env_locks.setdefault((run.repo, env), FifoLock())
    with lock(run.id):
        in_flight = store.deploy_in_flight(rec.id)
        if worker.halted and not in_flight:
            return  # cancelled or stopping while it waited for the environment: never deploy now
        number = len(store.attempts(rec.id)) + 1
        _, masker = worker.trust.for_action(run.repo, repo_path, run.ref, ())
        writer = attempts.begin(store, settings, run.id, rec.id, "deploy", number, masker, deadline=None,
                                token="deploy")
        outcome = executor.Outcome(ActionStatus.FAILED, None, "deploy did not finish")
        try:
            ctx = deploy.DeployContext(
                run_id=run.id, sha=run.sha, short_sha=run.sha[:7], environment=env,
                known_hosts=settings.known_hosts, identity=settings.identity, log=writer.line,
                holder=f"run #{run.id} on {socket.gethostname()} pid {os.getpid()} at {now_iso()}")
            if in_flight:
                outcome = _after_crash(worker, rec, targets, ctx)
            else:
                outcome = _deploy(worker, rec, spec, targets, ctx, values)
        except GitpipeError as exc:  # a refused source, an unreachable target after a crash, ...
            outcome = executor.Outcome(ActionStatus.FAILED, None, str(exc))
        finally:
            attempts.end(store, rec.id, number, writer, outcome)  # the failure's reason ends the log
            store.set_action(rec.id, outcome.status, message=masker.mask(outcome.message or ""))


def _deploy(worker: RunContext, rec: ActionRecord, spec: ActionSpec, targets: list[str],
            ctx: deploy.DeployContext, values: dict[str, str]) -> executor.Outcome:
    from gitpipe import deploy

    run, store = worker.run, worker.store
    with worker.pool.checkout(run.sha) as slot:
        artifacts.restore_inputs(store.artifacts(run.id), spec.inputs, slot.tree)
        source = _source(slot.tree, expand(spec.source or ".", values))
        store.start_deploy(rec.id, run.id, run.repo, ctx.environment, ctx.release, targets)
        result = deploy.deploy(replace(spec, targets=tuple(targets)), source, ctx)
        store.finish_deploy(rec.id)
    _record(worker, rec, spec, targets, result, ctx.environment)
    if result.status == deploy.DEPLOYED:
        return executor.Outcome(ActionStatus.SUCCEEDED, None, f"deployed {result.release} to {ctx.environment}")
    return executor.Outcome(ActionStatus.FAILED, None, result.message)


def _source(tree: Path, source: str) -> Path:
    path = (tree / source).resolve()
    if not path.is_relative_to(tree.resolve()):
        raise ActionError(f'deploy source "{source}" reaches outside the worktree')
    if not path.is_dir():
        raise ActionError(f'deploy source "{source}" is not a directory in the worktree',
                          hint="build it in this action's inputs, or fix `source`")
    return path


def _record(worker: RunContext, rec: ActionRecord, spec: ActionSpec, targets: list[str],
            result: deploy.DeployResult, environment: str) -> None:
    """The release rows of a deploy: each names its release's own run and sha.

    Deployed: one row. Failed before any switch: one failed row. Switched back after a
    failure past the switch: a failed row for the release that was live for a while, then a
    rolled-back row for the release restored, naming the one it came from.
    """
    from gitpipe import deploy

    run, store = worker.run, worker.store
    common: dict[str, Any] = {"by": run.pusher, "by_run": run.id, "strategy": spec.strategy,
                              **deploy.slots(result.targets)}
    if result.status == deploy.DEPLOYED:
        store.add_release(run.repo, environment, result.release, deploy.DEPLOYED, targets, run_id=run.id,
                          action_id=rec.id, sha=run.sha, message=result.message, **common)
        return
    message = result.message
    if result.status == deploy.ROLLED_BACK:
        message = f"was live, then switched back: {message}"
    store.add_release(run.repo, environment, result.release, deploy.FAILED, targets, run_id=run.id,
                      action_id=rec.id, sha=run.sha, message=message, **common)
    restored = {t.current for t in result.targets}
    back = restored.pop() if len(restored) == 1 else None
    if result.status == deploy.ROLLED_BACK and back:
        origin_run, origin_sha, origin_action = store.release_origin(run.repo, back)
        store.add_release(run.repo, environment, back, deploy.ROLLED_BACK, targets, run_id=origin_run,
                          action_id=origin_action, sha=origin_sha, from_release=result.release,
                          message=result.message, **common)


def _after_crash(worker: RunContext, rec: ActionRecord, targets: list[str],
                 ctx: deploy.DeployContext) -> executor.Outcome:
    """The daemon stopped mid-deploy: read `current` on each target and record what happened."""
    from gitpipe import deploy

    outcomes = deploy.read_current(targets, ctx)
    store = worker.store
    store.finish_deploy(rec.id)
    where = ", ".join(f"{o.url}: {o.current or 'nothing'}" for o in outcomes)
    if all(o.current == ctx.release for o in outcomes):
        store.add_release(worker.run.repo, ctx.environment, ctx.release, deploy.DEPLOYED, targets,
                          run_id=worker.run.id, action_id=rec.id, sha=worker.run.sha, by=worker.run.pusher,
                          by_run=worker.run.id, message="the deploy finished before the daemon stopped")
        return executor.Outcome(ActionStatus.SUCCEEDED, None,
                                f"the daemon stopped mid-deploy; {ctx.release} is current everywhere")
    message = (f"the daemon stopped mid-deploy and the deploy was not run again; current is {where}; "
               "retry the run to deploy again")
    store.add_release(worker.run.repo, ctx.environment, ctx.release, deploy.FAILED, targets,
                      run_id=worker.run.id, action_id=rec.id, sha=worker.run.sha, by_run=worker.run.id,
                      message=message)
    return executor.Outcome(ActionStatus.FAILED, None, message)
