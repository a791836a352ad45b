"""Walks one run: its stages in order, run_order groups in parallel (bounded by the
host's max_parallel), `when`, retries, timeouts, artifacts and outputs.

A `RunWorker` is one thread per active run; each action of a group gets a thread of
its own. Every state change goes through the store first, then acts.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from gitpipe import (
    artifacts,
    attempts,
    background,
    delivery,
    executor,
    git,
    lifecycle,
    matching,
    plugins,
    reuse,
    space,
)
from gitpipe import cache as cache_mod
from gitpipe import pipeline as pipeline_mod
from gitpipe.errors import GitpipeError, PipelineError
from gitpipe.launcher import Parked
from gitpipe.models import (
    ActionRecord,
    ActionSpec,
    ActionStatus,
    AttemptRecord,
    CacheUse,
    Pipeline,
    RunRecord,
    RunStatus,
)
from gitpipe.refs import branch_of, tag_of
from gitpipe.sandbox import Confine, Sandbox, empty
from gitpipe.secrets import Masker
from gitpipe.settings import Settings
from gitpipe.store import Store
from gitpipe.trust import Trust

log = logging.getLogger("gitpipe")
DAEMON_ENV_KEEP = ("LANG", "TZ")  # PATH and HOME are the sandbox's, never the daemon's
OUTPUT_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


@dataclass
class Host:
    """What every worker shares: settings, store, the parallelism bound, trust, deploy locks."""

    settings: Settings
    store: Store
    slots: threading.BoundedSemaphore
    trust: Trust
    sandbox: Sandbox
    env_locks: dict[tuple[str, str], delivery.FifoLock] = field(default_factory=dict)
    select: Callable[[str, ActionSpec], str | None] | None = None  # gitpipe exec: why an action is skipped
    caches: cache_mod.Caches | None = None  # build caches (SPEC section 14); None: not kept
    cluster: Any = None  # gitpipe.cluster.dispatch.Cluster when gitpipe.toml has [cluster] (never imported else)

    def pool(self, repo: str, ref: str) -> git.WorktreePool:
        """The worktree slots of a run of `repo` at `ref` (protected refs have slots of their own),
        the first checkout to be prepared ahead (by the intake, or by the run as it starts)."""
        path = self.store.repo_path(repo)
        return git.WorktreePool(self.settings.work_dir, repo, path, settle=self.sandbox.settle,
                                protected=self.trust.is_protected(repo, path, ref), ahead=1)


RUN_THREADS = background.Kept("run")  # the daemon's runs, one each


def env_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", text).upper()


class RunWorker:
    """Runs one run to the end (or until cancelled or interrupted)."""

    def __init__(self, host: Host, run: RunRecord, pool: git.WorktreePool | None = None) -> None:
        """`pool`: the run's worktree pool, its first worktree being reset since the push was
        recorded (the daemon's intake); else made when the run starts."""
        self.host = host
        self.early = pool
        self.store = host.store
        self.run = run
        self.attempts: dict[int, executor.Attempt] = {}
        self.lock = threading.Lock()
        self.cancelled = threading.Event()
        self.interrupted = threading.Event()
        self.changed = threading.Event()  # set by the daemon on every wake-up (approvals wait on it)
        self.launched = False  # an attempt of this run was started (see _execute)
        # Its first command was handed over, or it ended before one: what waited for that may go
        # on (the intake's chores after a push, see Daemon._claim_pushed).
        self.begun = threading.Event()
        self.done = threading.Event()  # its job (_main) returned: nothing of it runs any more
        self.on_done: Callable[[RunWorker], None] | None = None
        # Stage changes recorded with an action's end (see _stage_change), by the action's thread:
        # the stages it ended (succeeded) and the ones it started; read by the run's thread after join.
        self.records: dict[tuple[int, int], ActionRecord] = {}
        self.ended_stages: set[int] = set()
        self.begun_stages: set[int] = set()

    # ------------------------------------------------------------------ control from other threads
    def cancel(self) -> None:
        """Stop the run: running attempts get SIGTERM, then SIGKILL; nothing new starts."""
        self.cancelled.set()
        self.changed.set()
        self._stop_attempts(ActionStatus.CANCELLED, "cancelled", executor.KILL_GRACE)

    def interrupt(self, grace: float = 0.0) -> None:
        """The daemon is stopping: kill what still runs; those attempts start again next time."""
        self.interrupted.set()
        self.changed.set()
        self._stop_attempts(ActionStatus.INTERRUPTED, "daemon stopped", grace)

    def _stop_attempts(self, status: ActionStatus, reason: str, grace: float) -> None:
        with self.lock:
            running = list(self.attempts.values())
        threads = [threading.Thread(target=a.stop, args=(status, reason, grace)) for a in running]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    @property
    def halted(self) -> bool:
        return self.cancelled.is_set() or self.interrupted.is_set()

    # ------------------------------------------------------------------ the run
    def start(self) -> None:
        """Run it on a thread of its own, kept between runs (RUN_THREADS): a push's run waits for
        no thread to be made and started (0.5-0.7 ms on the way from push to exec)."""
        RUN_THREADS.start(self._main)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until it ended (or `timeout` passed): whether it did."""
        return self.done.wait(timeout)

    def _main(self) -> None:
        threading.current_thread().name = f"run-{self.run.id}"
        try:
            self._walk()
        except Exception as exc:  # a bug must not take the daemon down; it fails the run
            log.exception("run #%s crashed", self.run.id)
            try:
                if not self.store.run(self.run.id).status.finished:
                    self.store.finish_run(self.run.id, RunStatus.FAILED, f"internal error: {exc}")
            except GitpipeError:
                pass
        finally:
            self.begun.set()
            try:
                if self.on_done:
                    self.on_done(self)
            finally:
                threading.current_thread().name = "run-idle"
                self.done.set()

    def _walk(self) -> None:
        # The first action's worktree is reset now, in the background, while the run is read,
        # planned and started and its first attempt recorded: off the path from push to exec.
        self.pool = self.early or self.host.pool(self.run.repo, self.run.ref)
        self.pool.prepare_next(self.run.sha)  # nothing when the intake did
        try:
            self._walk_pooled()
        finally:
            self.pool.close()

    def _walk_pooled(self) -> None:
        run = self.store.run(self.run.id)
        pipe = self._pipeline(run)
        if pipe is None:
            return
        if run.status is RunStatus.QUEUED:
            commit = git.commit_of(self.store.repo_path(run.repo), run.sha)  # no pygit2 in the daemon
            if commit is None:
                self.store.fail_queued_run(run.id, f"commit {run.sha[:7]} is not in the repository any more")
                return
            author, message = commit
            deadline = time.time() + pipe.timeout if pipe.timeout else None
            try:  # a push or a schedule gives none: the defaults ("" without one)
                inputs = matching.input_values(pipe, dict(run.inputs), manual=False)
            except ValueError as exc:
                self.store.fail_queued_run(run.id, f"inputs: {exc}")
                return
            self.store.start_run(run.id, pipe, deadline, author, message, inputs, first_stage=True)
            self.begun_stages.add(0)
            run = self.store.run(run.id)
        self.run = run
        self.pipe = pipe
        try:
            reuse.apply(self.host.settings, self.store, run.id)  # `retry --failed`: what passed before
        except (GitpipeError, OSError) as exc:
            self.store.finish_run(run.id, RunStatus.FAILED, f"the results of run #{run.retry_of} could not "
                                  f"be reused: {exc}")
            return
        if self.store.cancel_requested(run.id):
            self.cancelled.set()
        left = sum(1 for a in self.store.actions(run.id) if not a.status.finished and a.type != "approval")
        self.pool.ahead_more(left - 1)  # the first one is being prepared
        self._stages()

    def _pipeline(self, run: RunRecord) -> Pipeline | None:
        text = self.store.pipeline_text(run.id) or ""
        try:
            return pipeline_mod.parsed(text, default_name=run.repo)
        except PipelineError as exc:
            if run.status is RunStatus.QUEUED:
                self.store.fail_queued_run(run.id, f".pipeline.toml is invalid:\n{exc}")
            else:
                self.store.finish_run(run.id, RunStatus.FAILED, f".pipeline.toml is invalid:\n{exc}")
            return None

    def _stages(self) -> None:
        records = self.records = {(a.stage_idx, a.idx): a for a in self.store.actions(self.run.id)}
        failed = False
        for s_idx, stage in enumerate(self.pipe.stages):
            acts = [records[(s_idx, i)] for i in range(len(stage.actions))]
            if all(a.status.finished for a in acts) and not failed:
                # Finished before a restart (or reused): a failure there still stops the run here.
                if not all(a.passed for a in acts):
                    failed = True
                    self._close_stage(s_idx, acts)
                elif not self.store.stages(self.run.id)[s_idx].status.finished:  # taken over whole
                    self.store.set_stage(self.run.id, s_idx, ActionStatus.SUCCEEDED)
                continue
            if failed or self.halted:
                self._close_stage(s_idx, acts)
                continue
            if s_idx not in self.begun_stages:  # else started with the end of the stage before
                self.store.set_stage(self.run.id, s_idx, ActionStatus.RUNNING)
            ok = self._stage(s_idx, acts)
            if self.interrupted.is_set():
                return  # the next daemon goes on from here
            if ok and s_idx not in self.ended_stages:  # one that stopped early was closed by _close_stage
                self.store.set_stage(self.run.id, s_idx, ActionStatus.SUCCEEDED)
            failed = failed or not ok
        self._finish(failed)

    def _stage(self, s_idx: int, acts: list[ActionRecord]) -> bool:
        """Run a stage's run_order groups; False as soon as a group fails."""
        for order in sorted({a.run_order for a in acts}):
            group = [a for a in acts if a.run_order == order and not a.status.finished]
            if len(group) == 1:  # alone: in this thread (a thread's start and join cost ~0.1 ms)
                self._action_here(s_idx, group[0])
            threads = [threading.Thread(target=self._action, args=(s_idx, a), name=f"action-{a.id}")
                       for a in group] if len(group) > 1 else []
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if self.halted:
                self._close_stage(s_idx, self.store.actions_of_stage(self.run.id, s_idx))
                return False
            if s_idx in self.ended_stages:  # its last action passed, and ended it
                return True
            if not all(self.store.action(a.id).passed for a in acts if a.run_order == order):
                self._close_stage(s_idx, self.store.actions_of_stage(self.run.id, s_idx))
                return False
        return True

    def _close_stage(self, s_idx: int, acts: list[ActionRecord]) -> None:
        """Actions that will not run: skipped after a failure, cancelled after a cancel.

        A deploy found in flight (the daemon crashed under it) is first checked on its
        targets and recorded, and an approval still waiting is closed, so a run cancelled
        while the daemon was down ends with its environments and approvals told the truth.
        """
        if self.interrupted.is_set():
            return
        status = lifecycle.not_run(self.cancelled.is_set())
        spec_of = self.pipe.stages[s_idx].actions
        for a in acts:
            if a.type == "deploy" and self.store.deploy_in_flight(a.id):
                self._guarded(a, partial(delivery.run_deploy, self._delivery(), a, spec_of[a.idx]))
            elif a.status is ActionStatus.WAITING:
                self.store.resolve_approval(self.run.id, a.id, ActionStatus.CANCELLED, "run cancelled")
            elif a.status in (ActionStatus.PENDING, ActionStatus.INTERRUPTED):
                self.store.set_action(a.id, status)
        if not self.store.stages(self.run.id)[s_idx].status.finished:
            final = lifecycle.closed_stage(self.cancelled.is_set(), self.store.actions_of_stage(self.run.id, s_idx))
            self.store.set_stage(self.run.id, s_idx, final)

    def _finish(self, failed: bool) -> None:
        if self.interrupted.is_set():
            return
        status = lifecycle.run_end(self.store.actions(self.run.id), cancelled=self.cancelled.is_set(), failed=failed)
        self.store.finish_run(self.run.id, status)

    # ------------------------------------------------------------------ one action
    def _action(self, s_idx: int, rec: ActionRecord) -> None:
        spec = self.pipe.stages[s_idx].actions[rec.idx]
        skip = self.host.select(self.pipe.stages[s_idx].name, spec) if self.host.select else None
        if skip:
            self.store.set_action(rec.id, ActionStatus.SKIPPED, message=skip)
            return None
        if not matching.when_matches(spec.when, branch_of(self.run.ref), tag_of(self.run.ref)):
            self.store.set_action(rec.id, ActionStatus.SKIPPED, message="skipped: `when` does not match")
            return
        missing = self._missing_input(spec)
        if missing:
            self.store.set_action(rec.id, ActionStatus.SKIPPED, message=missing)
            return
        if spec.type == "approval":  # waits for a person; takes no parallel slot
            return self._guarded(rec, lambda: delivery.run_approval(self._delivery(), rec, spec))
        labels = self.host.cluster.place(self.pipe, spec) if self.host.cluster is not None else None
        if labels is not None:  # on a worker host (SPEC section 13): takes no slot here
            remote = partial(self.host.cluster.attempt, self, labels=labels)
            return self._guarded(rec, lambda: self._run_action(rec, spec, remote))
        with self.host.slots:  # bounded by max_parallel across the host
            if self.halted:
                return None
            if spec.type == "deploy":
                return self._guarded(rec, lambda: delivery.run_deploy(self._delivery(), rec, spec))
            return self._guarded(rec, lambda: self._run_action(rec, spec))

    def _action_here(self, s_idx: int, rec: ActionRecord) -> None:
        """`_action` in the run's thread, an error in it ending as in a thread of its own: logged,
        and the action's status (not passed) decides what follows."""
        try:
            self._action(s_idx, rec)
        except Exception:
            log.exception("run #%s action %s crashed", self.run.id, rec.name)

    def _delivery(self) -> delivery.RunContext:
        """What an approval or a deploy sees of this run (nothing else of the worker)."""
        return delivery.RunContext(
            run=self.run, pipeline=self.pipe.name, store=self.store, settings=self.host.settings,
            trust=self.host.trust, pool=self.pool, env_locks=self.host.env_locks, cancelled=self.cancelled,
            interrupted=self.interrupted, changed=self.changed)

    def _missing_input(self, spec: ActionSpec) -> str | None:
        """Why the action is skipped: an input whose producer did not succeed (it failed with
        allow_failure, or was itself skipped), so the artifact does not exist; else None."""
        if not spec.inputs:  # most actions: nothing to read
            return None
        have = {a.name for a in self.store.artifacts(self.run.id)}
        records = {(a.stage, a.name): a for a in self.store.actions(self.run.id)}
        for name in spec.inputs:
            if name in have:
                continue
            for stage in self.pipe.stages:
                producer = next((a for a in stage.actions if name in dict(a.outputs)), None)
                rec = records.get((stage.name, producer.name)) if producer else None
                if rec is not None and rec.status is not ActionStatus.SUCCEEDED:
                    why = "failed, allowed" if rec.warning else rec.status.value
                    return f'skipped: input "{name}" was not produced ("{rec.name}" {why})'
        return None

    def _guarded(self, rec: ActionRecord, body: Callable[[], None]) -> None:
        """Run an action body; an error fails the action (a bug never passes it silently)."""
        try:
            body()
        except GitpipeError as exc:
            self._fail(rec.id, str(exc))
        except Exception as exc:  # a bug fails the action, never silently passes it
            log.exception("run #%s action %s crashed", self.run.id, rec.name)
            self._fail(rec.id, f"internal error: {exc!r}")

    def _fail(self, action_id: int, message: str) -> None:
        act = self.store.action(action_id)
        if not act.status.finished:
            if act.status is ActionStatus.PENDING:
                self.store.set_action(action_id, ActionStatus.RUNNING)
            self.store.set_action(action_id, ActionStatus.FAILED, message=message)

    def _run_action(self, rec: ActionRecord, spec: ActionSpec,
                    attempt: Callable[[ActionRecord, ActionSpec], executor.Outcome] | None = None) -> None:
        """Attempts until one ends the action (retries); `attempt`: a worker host's instead of a local one."""
        previous = self.store.attempts(rec.id) if rec.attempts else []  # none yet: nothing to read
        failures = sum(1 for a in previous if a.status in (ActionStatus.FAILED, ActionStatus.TIMED_OUT))
        while True:
            if attempt is None:  # the action's end is recorded with its last attempt's, in one transaction
                final = self._attempt(rec, spec, previous, failures)
            else:  # a worker host's attempt recorded its own end; the action's is recorded here
                final = self._verdict(spec, attempt(rec, spec), failures)
                if final is not None:
                    self.store.set_action(rec.id, final.status, exit_code=final.exit_code, message=final.message)
            if final is not None:
                return
            failures += 1
            previous = self.store.attempts(rec.id)

    def _verdict(self, spec: ActionSpec, outcome: executor.Outcome, failures: int) -> executor.Outcome | None:
        """What the action ends with after an attempt's `outcome` (`failures`: its failed attempts
        before this one); None: it is tried again."""
        if outcome.status in (ActionStatus.FAILED, ActionStatus.TIMED_OUT) and failures + 1 <= spec.retries:
            full = space.full(self.host.settings.home)
            if full:  # a retry would fail the same way, or fill the disk again (a log flood)
                return _not_retried(outcome, full, self.run.id)
            if not self.halted:
                return None
            if self.interrupted.is_set():  # its retry belongs to the next daemon
                return executor.Outcome(ActionStatus.INTERRUPTED, outcome.exit_code, "daemon stopped before its retry")
        return outcome

    def _attempt(self, rec: ActionRecord, spec: ActionSpec, previous: list[AttemptRecord],
                 failures: int) -> executor.Outcome | None:
        """One local attempt; what the action ends with (recorded with the attempt's end), or None
        when it is tried again (see `_verdict`)."""
        # its wait (an RCU grace period) behind the checkout's, unless a launcher starts it (see
        # _execute). A push's first action whose sandbox its heads-up made moves nothing into a
        # cgroup: begun once its command is on its way, for the next action's sandbox (_execute).
        warm_later = not self.launched and self.pool.made_ahead()
        if not warm_later:
            self.host.sandbox.warm(held=self.launched)
        deadline = self._deadline(spec, previous)
        number = len(previous) + 1
        token = uuid.uuid4().hex
        env, masker = self._env(spec, number)  # before the attempt starts: may refuse secrets
        writer = attempts.begin(self.store, self.host.settings, self.run.id, rec.id, rec.name, number, masker,
                                deadline=deadline, token=token)
        outcome = executor.Outcome(ActionStatus.FAILED, None)
        final: executor.Outcome | None = None
        uses: list[tuple[cache_mod.Plan, CacheUse]] = []
        try:
            with self.pool.checkout(self.run.sha) as slot:
                if spec.inputs:
                    artifacts.restore_inputs(self.store.artifacts(self.run.id), spec.inputs, slot.tree)
                out_file = slot.output  # read, then emptied (below): it may hold secrets
                box = self._box(rec.id, number, spec, slot)
                held = cache_mod.Held(slot.root / "overlay")
                try:
                    if deadline is not None and time.time() >= deadline:
                        outcome = executor.Outcome(ActionStatus.TIMED_OUT, None, "timed out")
                    else:
                        made = _made_for(slot, box)
                        ready = made.ready if made is not None else None
                        if made is None:
                            self.host.sandbox.prepare(box)
                        elif not slot.settled:  # a large tree: its reset did not hand it over
                            try:
                                self.host.sandbox.settle(slot.tree)
                            except BaseException:
                                made.discard()  # taken from the slot: nothing else would end it
                                raise
                        uses = self._restore_caches(spec, slot.tree, box.home, held, writer)
                        box = replace(box, overlays=tuple(held.overlays), binds=tuple(held.mounts))
                        outcome = self._execute(rec, spec, box, env, writer, token, deadline, ready, warm_later)
                    if outcome.status is ActionStatus.SUCCEEDED:
                        outcome = self._collect(rec, spec, slot.tree, out_file, masker, writer)
                    if outcome.status is ActionStatus.SUCCEEDED:
                        uses = self._save_caches(spec, uses, held, writer, box)
                    self._record_caches(rec.id, number, uses)
                finally:
                    try:  # emptied while the slot is this attempt's: the next one's may be made at once
                        empty(out_file)
                    finally:
                        if self.host.caches is not None:
                            self.host.caches.release(held)  # before the slot is free: its overlays go
            final = self._verdict(spec, outcome, failures)
        except (GitpipeError, OSError) as exc:  # an output glob, a full disk while storing artifacts
            writer.line(f"gitpipe: {exc}")
            outcome = executor.Outcome(ActionStatus.FAILED, outcome.exit_code, str(exc))
            final = self._verdict(spec, outcome, failures)
        finally:
            # Anything else raised (a bug): the attempt's end alone; _guarded fails the action, saying why.
            ends, begins = self._stage_change(rec, final)
            attempts.end(self.store, rec.id, number, writer, outcome, final, stage_ends=ends, next_stage=begins)
        if ends:
            self.ended_stages.add(rec.stage_idx)
        if begins:
            self.begun_stages.add(rec.stage_idx + 1)
        return final

    def _stage_change(self, rec: ActionRecord, final: executor.Outcome | None) -> tuple[bool, bool]:
        """Whether an action's end also ends its stage, and starts the next one, in its transaction.

        Only for the stage's last action, alone in its run_order group (the groups before it
        passed, or it would not run) and passing: the stage then succeeds, as _stage would
        find. The next stage starts when it has something to run and the run goes on."""
        if final is None or self.halted or not replace(rec, status=final.status).passed:
            return False, False
        stage = [a for (s, _), a in self.records.items() if s == rec.stage_idx]
        if not stage:  # not walked by _stages
            return False, False
        last = max(a.run_order for a in stage)
        if rec.run_order != last or [a.id for a in stage if a.run_order == last] != [rec.id]:
            return False, False
        after = [a for (s, _), a in self.records.items() if s == rec.stage_idx + 1]
        return True, bool(after) and not all(a.status.finished for a in after)

    # ------------------------------------------------------------------ build caches
    def _protected(self) -> bool:
        return self.host.trust.is_protected(self.run.repo, self.store.repo_path(self.run.repo), self.run.ref)

    def _restore_caches(self, spec: ActionSpec, tree: Path, home: Path, held: cache_mod.Held,
                        writer: executor.LogWriter) -> list[tuple[cache_mod.Plan, CacheUse]]:
        """Before the script: each cache's exact entry, else a warm one, else none (the log says which)."""
        caches = self.host.caches
        if caches is None or not spec.cache:
            return []
        action = f"{self.pipe.stage_of(spec)}/{spec.name}"
        protected = self._protected()
        return [(plan, caches.restore(plan, protected, held, writer.line))
                for plan in cache_mod.plans(spec.cache, self.run.repo, action, tree, home)]

    def _save_caches(self, spec: ActionSpec, uses: list[tuple[cache_mod.Plan, CacheUse]], held: cache_mod.Held,
                     writer: executor.LogWriter, box: Confine) -> list[tuple[cache_mod.Plan, CacheUse]]:
        """After a success: each cache without an exact entry is saved, once no process of the attempt is left."""
        if self.host.caches is None or not uses:
            return uses
        self.host.sandbox.ended(box)
        protected = self._protected()
        return [(plan, self.host.caches.save(plan, use, self.run.id, protected, bool(spec.secrets), held,
                                             writer.line))
                for plan, use in uses]

    def _record_caches(self, action_id: int, number: int, uses: list[tuple[cache_mod.Plan, CacheUse]]) -> None:
        for _plan, use in uses:
            try:
                self.store.record_cache_use(replace(use, action_id=action_id, attempt=number), synced=False)
            except GitpipeError as exc:  # a full disk: the action's result matters more
                log.warning("run #%s: could not record a cache use: %s", self.run.id, exc)

    def _box(self, action_id: int, number: int, spec: ActionSpec, slot: git.Slot) -> Confine:
        """What attempt `number` of an action sees, in `slot`."""
        return confine(self.host, self.pipe, spec, self.run.repo, self._readonly(spec), slot, f"a{action_id}.{number}")

    def _ahead(self, rec: ActionRecord) -> Callable[[git.Slot], _Made | None] | None:
        """What makes the sandbox of the action that follows `rec` in the slot reset for it, while
        `rec` runs; None unless that action is known and plain: alone in the next run_order group
        (of this stage or the next), a first attempt of a `run` script on this host, no cache to
        mount nor inputs to restore, its `when` matching. It is only made ahead: it runs nothing
        before its attempt is recorded and writes its order (and is discarded when none comes)."""
        nxt = self._following(rec)
        if nxt is None or nxt.status.finished or nxt.attempts:
            return None
        spec = self.pipe.stages[nxt.stage_idx].actions[nxt.idx]
        if not plain(self.host, spec, self.run.ref):
            return None

        def make(slot: git.Slot) -> _Made | None:
            if self.halted:
                return None
            box = self._box(nxt.id, 1, spec, slot)
            return _Made.of(box, self.host.sandbox.ready(box, settle=False))

        return make

    def _following(self, rec: ActionRecord) -> ActionRecord | None:
        """The action alone in the run_order group after `rec`'s, in its stage or the next, when
        `rec` is alone in its own (a sibling's checkout could take the slot made ready for it)."""
        if sum(1 for (s, _), a in self.records.items() if s == rec.stage_idx and a.run_order == rec.run_order) != 1:
            return None
        for stage in (rec.stage_idx, rec.stage_idx + 1):
            acts = [a for (s, _), a in self.records.items() if s == stage]
            orders = sorted({a.run_order for a in acts if stage != rec.stage_idx or a.run_order > rec.run_order})
            if orders:
                group = [a for a in acts if a.run_order == orders[0]]
                return group[0] if len(group) == 1 else None
        return None

    def _readonly(self, spec: ActionSpec) -> tuple[Path, ...]:
        """What an attempt sees read-only: the repo's objects; a plugin also its interpreter."""
        paths: tuple[Path, ...] = (self.pool.objects,)
        if spec.type != "run":
            paths += plugins.interpreter_paths(self.host.settings.home)
        return paths

    def _execute(self, rec: ActionRecord, spec: ActionSpec, box: Confine, env: dict[str, str],
                 writer: executor.LogWriter, token: str, deadline: float | None,
                 ready: Parked | None = None, warm: bool = False) -> executor.Outcome:
        """`ready`: the sandbox made ahead for `box` (see `_ahead`), which becomes the script;
        `warm`: begin the next cgroup move's wait once it runs (see `_attempt`)."""
        if spec.type == "run":
            argv = executor.bash(spec.run or "")
        else:  # a plugin type: run in a process of its own, so timeouts and cancels work the same
            argv, env = plugins.command(spec, env)
        # The run's first attempt, the one its push waits for, starts from a parked launcher: no
        # cgroup move, whose wait is longest after a quiet spell. The later ones start in the
        # sandbox made for them while the action before ran, else held.
        parked, self.launched = not self.launched and ready is None, True
        try:
            attempt = executor.start(self.host.sandbox.launch(argv, env, box, prepared=True, parked=parked,
                                                              ready=ready), writer, token)
        finally:
            self.begun.set()
        if warm:
            self.host.sandbox.warm(held=True)
        # the next action's worktree, and its sandbox, while this one runs: bwrap makes its mounts
        # while the reset works on the tree (`during`), or once it is reset when it had none yet
        ahead = self._ahead(rec)
        self.pool.prepare_next(self.run.sha, ahead, during=ahead)
        self.host.sandbox.park_again()  # the next run's, if this run's first sandbox took the parked one
        with self.lock:
            self.attempts[rec.id] = attempt
        if self.cancelled.is_set():
            attempt.stop(ActionStatus.CANCELLED, "cancelled")
        try:
            return executor.wait(attempt, deadline)
        finally:
            with self.lock:
                self.attempts.pop(rec.id, None)

    def _deadline(self, spec: ActionSpec, previous: list) -> float | None:
        """Absolute: an interrupted attempt's deadline carries over to its restart."""
        if previous and previous[-1].status is ActionStatus.INTERRUPTED and previous[-1].deadline:
            deadline = float(previous[-1].deadline)
        else:
            deadline = time.time() + spec.timeout
        run_deadline = self.run.extra.get("deadline")
        return min(deadline, run_deadline) if run_deadline else deadline

    def _collect(self, rec: ActionRecord, spec: ActionSpec, tree: Path, out_file: Path | None,
                 masker: Masker, writer: executor.LogWriter) -> executor.Outcome:
        dest = self.host.settings.artifacts_dir / str(self.run.id)
        budget = artifacts.Budget(self.host.settings.max_artifact_size)
        for name, patterns in spec.outputs:
            art = artifacts.store(tree, dest, self.run.id, rec.name, name, patterns, budget)
            self.store.add_artifact(art)
            writer.line(f"gitpipe: artifact {name}: {art.files} file(s), {art.size} bytes, sha256 {art.sha256}")
        values = _read_outputs(out_file)
        for key in [k for k, v in values.items() if "\0" in v]:  # no environment variable can hold it
            writer.line(f"gitpipe: output {key} is not kept: its value holds a NUL byte, which the environment "
                        "of later actions cannot carry (write text, or base64 for binary data)")
            del values[key]
        if values:
            # A secret may be the key too (`echo "$TOKEN=x" >> $GITPIPE_OUTPUT`).
            self.store.set_outputs(self.run.id, rec.name, {masker.mask(k): masker.mask(v) for k, v in values.items()})
        return executor.Outcome(ActionStatus.SUCCEEDED, 0)

    def _env(self, spec: ActionSpec, attempt: int) -> tuple[dict[str, str], Masker]:
        run = self.run
        env = {k: os.environ[k] for k in DAEMON_ENV_KEEP if k in os.environ}
        env.update({
            "CI": "true", "GITPIPE_RUN": str(run.id), "GITPIPE_REPO": run.repo,
            "GITPIPE_PIPELINE": self.pipe.name, "GITPIPE_REF": run.ref,
            "GITPIPE_BRANCH": branch_of(run.ref) or "", "GITPIPE_TAG": tag_of(run.ref) or "",
            "GITPIPE_SHA": run.sha, "GITPIPE_STAGE": self.pipe.stage_of(spec),
            "GITPIPE_ACTION": spec.name, "GITPIPE_ATTEMPT": str(attempt),
        })
        for row in self.store.outputs(run.id):
            env[f"GITPIPE_OUT_{env_name(row.action)}_{env_name(row.key)}"] = row.value
        # a matrix copy's values, named after its keys: python = [...] -> MATRIX_PYTHON
        env.update({f"MATRIX_{env_name(key)}": value for key, value in spec.matrix})
        # Inputs reach scripts only as variables, after the GITPIPE_ ones (a name cannot shadow them:
        # each is GITPIPE_INPUT_<NAME>) and before [env] (a pipeline's own settings win).
        env.update({f"GITPIPE_INPUT_{name.upper()}": value for name, value in run.inputs})
        env.update(dict(self.pipe.env))
        env.update(dict(spec.env))
        values, masker = self.host.trust.for_action(run.repo, self.store.repo_path(run.repo), run.ref,
                                                    spec.secrets)
        env.update(values)
        return env, masker


def plain(host: Host, spec: ActionSpec, ref: str) -> bool:
    """Whether an action's sandbox may be made before its attempt is recorded (see RunWorker._ahead
    and `first_ahead`): a `run` script on this host, no cache to mount nor inputs to restore, its
    `when` matching."""
    return (spec.type == "run" and not spec.cache and not spec.inputs and host.cluster is None
            and host.select is None and matching.when_matches(spec.when, branch_of(ref), tag_of(ref)))


def confine(host: Host, pipe: Pipeline, spec: ActionSpec, repo: str, readonly: tuple[Path, ...], slot: git.Slot,
            key: str) -> Confine:
    """What an attempt of `spec` sees in `slot` (`key`: names its cgroup)."""
    return Confine(key=key, home=slot.home, tree=slot.tree, name=repo, output=slot.output,
                   readonly=readonly, network=host.sandbox.network(pipe.network, spec.network),
                   fresh=bool(spec.secrets))


def first_ahead(host: Host, pool: git.WorktreePool, repo: str, ref: str,
                text: str) -> Callable[[git.Slot], _Made | None] | None:
    """What makes the sandbox of a pushed run's first action from the parked launcher while its
    first worktree is reset (`pool.prepare_next(during=...)`, from the intake): the path from push
    to exec then waits for neither bwrap's mounts nor a cgroup move. None unless that action is
    known and plain (see `plain`): alone in the first run_order group of the first stage."""
    try:
        pipe = pipeline_mod.parsed(text, default_name=repo)
    except PipelineError:
        return None
    acts = pipe.stages[0].actions if pipe.stages else []
    first = [a for a in acts if a.run_order == min((b.run_order for b in acts), default=0)]
    if len(first) != 1 or not plain(host, first[0], ref):
        return None
    spec = first[0]

    def make(slot: git.Slot) -> _Made | None:
        box = confine(host, pipe, spec, repo, (pool.objects,), slot, FIRST)
        made, slot.ahead = slot.ahead, None
        if isinstance(made, _Made) and made.box == box and made.ready.proc.poll() is None:
            return made  # made at the push's heads-up (headsup.py) for this very box: kept
        if made is not None:
            made.discard()
        # it took the parked launcher and parked none (see Sandbox.ready): a discard parks one
        return _Made.of(box, host.sandbox.ready(box, parked=True), let_go=host.sandbox.park_again)

    return make


@dataclass
class _Made:
    """A sandbox made ahead for `box` (see RunWorker._ahead, `first_ahead`): a slot's `ahead`,
    made while (or just after) the slot's tree was reset, never handed over by itself (the reset
    does, else the launch); `tree`: the tree's (device, inode)."""

    box: Confine
    ready: Parked
    tree: tuple[int, int]
    let_go: Callable[[], None] | None = None  # after a discard: the first action's parks a launcher again

    @classmethod
    def of(cls, box: Confine, ready: Parked | None, let_go: Callable[[], None] | None = None) -> _Made | None:
        if ready is None:
            return None
        try:
            st = os.stat(box.tree or box.home)
        except BaseException:
            ready.discard()
            raise
        return cls(box, ready, (st.st_dev, st.st_ino), let_go)

    def discard(self) -> None:
        try:
            self.ready.discard()
        finally:
            if self.let_go is not None:
                self.let_go()


FIRST = "first"  # the key of the box `first_ahead` makes: the first action's id is not known yet


def _made_for(slot: git.Slot, box: Confine) -> _Made | None:
    """The sandbox made ahead in `slot` for exactly `box` (the first action's: but its cgroup's
    name, made before its id was known), taken; any other is discarded, and so is one that ended
    meanwhile (killed from outside: its order would go into a dead pipe) or whose tree is not the
    slot's any more (its bind would show the old one). Another attempt's never: a retry taking the
    next action's would miss its own cache mounts, which are added to its box after this."""
    made, slot.ahead = slot.ahead, None
    if isinstance(made, _Made) and made.ready.proc.poll() is not None:
        _said_why_it_ended(made)
    elif isinstance(made, _Made) and made.box == (box if made.box.key != FIRST else replace(box, key=FIRST)):
        try:
            st = os.stat(slot.tree)
        except OSError:
            st = None
        if st is not None and (st.st_dev, st.st_ino) == made.tree:
            return made
    if made is not None:
        made.discard()
    return None


def _said_why_it_ended(made: _Made) -> None:
    """A sandbox made ahead that ended before its order (bwrap could not make it, its launcher
    could not become the build user, it was killed): its output into the daemon's log. The
    action starts a sandbox itself, as it would without one made ahead."""
    out = made.ready.proc.stdout
    said = b""
    if out is not None:
        try:
            os.set_blocking(out.fileno(), False)
            said = os.read(out.fileno(), 4096)
        except (BlockingIOError, OSError, ValueError):
            pass
    log.warning("a sandbox made ahead for %s ended before its order (exit %s%s): its action starts one itself",
                made.box.key, made.ready.proc.returncode,
                f": {said.decode(errors='replace').strip()}" if said.strip() else "")


def _not_retried(outcome: executor.Outcome, why: str, run_id: int) -> executor.Outcome:
    return executor.Outcome(outcome.status, outcome.exit_code,
                            f"{outcome.message or outcome.status.value}; not retried: {why} "
                            f"(free space there, then `gitpipe retry {run_id}`)")


OUTPUT_LIMIT = 1 << 20  # bytes of $GITPIPE_OUTPUT read: small values, as the name says


def _read_outputs(path: Path | None) -> dict[str, str]:
    """KEY=VALUE lines an action appended to $GITPIPE_OUTPUT (other lines are ignored).

    The file is the action's: opened without following a link, and read up to a bound.
    """
    if path is None:
        return {}
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return {}
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return {}
        text = f.read(OUTPUT_LIMIT).decode("utf-8", errors="replace")
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and OUTPUT_KEY.match(key.strip()):
            values[key.strip()] = value
    return values


__all__ = ["Host", "RunWorker"]
