"""The daemon loop: wait for a wake-up (inotify file events, see `inotify`; no polling), recover,
claim queued runs, hand them to workers; stop cleanly on SIGTERM.

Shape of rq's worker: a stop flag, a short loop, the first signal lets running
actions finish within the grace period, a second one kills them at once. `burst`
drains the queue and returns, which keeps tests simple.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from gitpipe import executor, git, inotify, intake, lifecycle, queue, retention, space, triggers
from gitpipe import pipeline as pipeline_mod
from gitpipe.backoff import Backoff, RepeatFilter
from gitpipe.cache import Caches
from gitpipe.control import ControlServer
from gitpipe.errors import GitpipeError, PipelineError, TransitionError, UsageError
from gitpipe.headsup import HeadsUp
from gitpipe.intakeserver import IntakeServer, older_hooks, record_once
from gitpipe.models import ActionStatus, Event, RunStatus
from gitpipe.notify import Notifier
from gitpipe.refs import short_ref
from gitpipe.report.child import ChildReporter
from gitpipe.sandbox import Sandbox
from gitpipe.scheduler import Host, RunWorker, first_ahead
from gitpipe.schedules import CronTrigger
from gitpipe.settings import Settings
from gitpipe.store import Store
from gitpipe.trust import Trust

log = logging.getLogger("gitpipe")
STALE_RESERVATION = 3600.0  # seconds: a push's spool reservation its post-receive never took (git refused)
EVENTS_SEEN = "events_seen"  # state key: the newest event id the daemon passed on (see Daemon._hear_others)
SAVE_EVERY = 500  # events
SCHEDULES_AFTER_PUSH = 1.0  # seconds after a push's run started that its repo's cron lines are read again
SWITCH_INTERVAL = 0.001  # seconds a thread holds the GIL while others wait (see serve)
BEGUN_WAIT = 0.2  # seconds the intake's chores after a push wait at most for its run's first command
CLAIM_WAIT_AT_STOP = 10  # seconds a stop waits at most for an intake's claim under way (see _shutdown)


def _heard_elsewhere(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler of SIGTERM/SIGINT: nothing (Daemon._signals acts on them)."""


def daemon_lock(settings: Settings) -> int | None:
    """Take the one-daemon-per-home lock; None when another daemon holds it."""
    settings.home.mkdir(parents=True, exist_ok=True)
    fd = os.open(settings.home / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def daemon_running(settings: Settings) -> bool:
    """Whether a daemon serves this home now."""
    fd = daemon_lock(settings)
    if fd is None:
        return True
    os.close(fd)
    return False


class Daemon:
    def __init__(self, settings: Settings, *, burst: bool = False) -> None:
        self.settings = settings
        self.burst = burst
        self.wake = threading.Event()
        self._wakeup: tuple[int, int, int] | None = None  # signals: read end, write end, the previous wakeup fd
        self._signal_thread: threading.Thread | None = None
        self.foreign = threading.Event()  # another process wrote (a wake file): see _step
        self.foreign.set()  # the start hears what happened while no daemon ran
        # One look at the queue at a time: the loop's, or the intake's at its push (see _claim_pushed).
        self.claiming = threading.Lock()
        self.looping = threading.Event()  # the loop runs (recovery is over): the intake may claim
        self.pushed = threading.Event()  # the intake claimed its push itself: the loop's look is the timer's
        self.claim_due = threading.Event()  # a run ended, a push the intake could not claim: the next look claims
        self.stopping = threading.Event()
        self.signals = 0
        self.workers: dict[int, RunWorker] = {}
        self.early: dict[int, git.WorktreePool] = {}  # run id -> its first worktree, reset since its push
        self.early_lock = threading.Lock()
        # pushes on their way (hooks/pre-receive): their first sandbox made before they arrive
        self.heads = HeadsUp(settings.home / "ahead", lambda: getattr(self, "host", None),
                             lambda: len(self.workers) >= settings.max_parallel)
        self.listeners: list[Callable[[Event], None]] = []
        self.prune_due = True
        self.trust_factory: Callable[[Settings], Trust] = Trust
        self.select: Callable | None = None  # gitpipe exec: which actions run
        self.run_schedules = True
        self.notify = True  # gitpipe exec: notifications only with --notify
        self._policies: dict[int, str] = {}
        self._queue_noted: dict[int, int] = {}  # run id -> the earlier run it was said to wait for
        # A full disk: what failed is tried again later, and a repeated error is logged once.
        self.backoff = Backoff()
        self.repeats = RepeatFilter()
        self.unfinished: dict[int, str] = {}  # run id -> why its worker ended without recording its end
        self.next_due: float | None = None  # the next schedule slot
        self.events_seen = 0  # the newest event id heard of (see _hear_others); saved as state events_seen
        self.events_saved = 0

    # ------------------------------------------------------------------ lifecycle
    def serve(self) -> None:
        """Run until SIGTERM/SIGINT (or, in burst mode, until the queue is empty)."""
        lock = daemon_lock(self.settings)
        if lock is None:
            pid = (self.settings.home / "daemon.lock").read_text().strip()
            raise UsageError(f"another gitpipe daemon (pid {pid}) already serves {self.settings.home}",
                             hint="stop it first (systemctl stop gitpipe)")
        trust = self.trust_factory(self.settings)  # a secrets.toml with loose permissions stops us here
        try:
            sandbox = Sandbox.for_host(self.settings)  # no bwrap, no build user: we stop here
        except GitpipeError:
            os.close(lock)
            raise
        for note in sandbox.notes:
            log.warning("%s", note)
        close_home(self.settings.home)
        # Action threads mostly wait (a process, a pipe); the report thread renders (CPU). With
        # CPython's 5 ms switch interval a render held an action's every wake-up back by up to
        # 5 ms; 1 ms made runs of 20 `true` actions 12-47% faster (3 interleaved pairs, load 9).
        switch = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
        self.store = Store(self.settings)
        self.notifier = Notifier(self.settings, self.store, sandbox)
        if self.notify:
            self.store.listeners.append(self.notifier.on_event)
        self.reporter = ChildReporter(self.settings, self.store)  # renders in a child: no jinja2 when idle
        self.store.listeners.append(self.reporter.on_event)
        self.store.listeners.extend(self.listeners)
        self.events_seen = self.events_saved = self._events_seen_before()
        self.control = ControlServer(self.settings, self.store, self._heard)
        why_not = self.control.start()
        if why_not:
            log.info("%s", why_not)
        self.intake = IntakeServer(self.settings, self.store, self._claim_pushed, self._prepare_early,  # the hooks hand it pushes
                                   self.heads.answered)
        why_not = self.intake.start()
        if why_not:
            log.warning("%s", why_not)
        older = older_hooks(self.store)
        if older:
            log.info("repos with the hook of an older gitpipe (a Python start per push): %s; "
                     "`gitpipe repo add PATH` again installs the current one", ", ".join(older))
        self.schedules = CronTrigger(self.store)
        self.host = Host(self.settings, self.store, threading.BoundedSemaphore(self.settings.max_parallel),
                         trust, sandbox, select=self.select,
                         caches=Caches(self.settings, self.store, sandbox.uid, sandbox.gid,
                                       userns=sandbox.bwrap is not None and sandbox.uid is None))
        if self.settings.cluster is not None:  # only then is Celery imported (SPEC section 13)
            from gitpipe.cluster.dispatch import Cluster

            self.host.cluster = Cluster(self.settings, self.settings.cluster)
        # gitpipe.toml changed (edited, or moved in with an older mtime): pre-receive's answer anew
        # (IN_CREATE: a link made in its place, which the answer must not outlive: see rejectmark)
        home_changes = inotify.IN_CLOSE_WRITE | inotify.IN_MOVED_TO | inotify.IN_ATTRIB | inotify.IN_CREATE
        observer = inotify.observe([self.settings.wake_dir, self.settings.spool_dir], self._heard,
                                   also={self.heads.folder: self.heads.heard, self.settings.home: self.intake.keep_answer},
                                   masks={self.settings.home: home_changes})
        self.intake.keep_answer()  # what changed since the intake wrote it, before the watch
        self.heads.heard()  # what pushes wrote while no daemon ran (a killed one): removed
        old = self._install_signals()
        log.addFilter(self.repeats)
        hook, threading.excepthook = threading.excepthook, self._thread_died
        try:
            self.recover()
            repos = len(self.store.repos())
            log.info("serving %s (%d repo%s), site %s: ready", self.settings.home, repos, "" if repos == 1 else "s",
                     self.settings.site_dir / "index.html")
            notify_systemd("READY=1")
            self.wake.set()  # the startup rescan
            self._loop()
        finally:
            notify_systemd("STOPPING=1")
            self.intake.close()  # pushes from now on: recorded by the hook, which says the daemon is down
            self.control.close()
            self._shutdown()
            observer.stop()
            observer.join()
            self.heads.close()
            self._save_events_seen()
            self.notifier.close()
            self.reporter.close()
            sandbox.close()
            self._uninstall_signals(old)
            threading.excepthook = hook
            self.repeats.flush(force=True)
            log.removeFilter(self.repeats)
            self.store.close()
            os.close(lock)
            sys.setswitchinterval(switch)
            log.info("stopped")

    def _thread_died(self, args: threading.ExceptHookArgs) -> None:
        """An error that ended a thread goes to the log (and its repeats are counted), not to stderr."""
        name = args.thread.name if args.thread else "?"
        log.error("thread %s stopped on an error", name,
                  exc_info=(args.exc_type, args.exc_value, args.exc_traceback))  # type: ignore[arg-type]

    def _install_signals(self) -> dict[signal.Signals, Any]:
        """SIGTERM and SIGINT are heard by a thread of their own, through the signal wakeup fd.

        A Python handler runs only in the main thread, between bytecodes; the kernel may give a
        process's signal to any of its threads, and one given to another thread (say, one
        forking a launcher) did not wake the main thread out of its wait on `wake`: the first
        SIGTERM after a start was lost now and then, and the daemon did not stop. CPython's C
        handler writes every signal to the wakeup fd whichever thread it runs in."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        # The wakeup fd first, then the handlers: a signal caught between the two, the other way
        # round, ran only the Python-level handler (which does nothing) and the daemon went on (a
        # SIGTERM right at a start, under load). Before the handlers, SIGTERM ends the process.
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._wakeup = (read, write, signal.set_wakeup_fd(write, warn_on_full_buffer=False))
        self._signal_thread = threading.Thread(target=self._signals, args=(read,), name="signals", daemon=True)
        self._signal_thread.start()
        old: dict[signal.Signals, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, _heard_elsewhere)
        return old

    def _uninstall_signals(self, old: dict[signal.Signals, Any]) -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if self._wakeup is not None:
            read, write, previous = self._wakeup
            signal.set_wakeup_fd(previous)
            os.close(write)  # the signals thread reads its end and stops
            if self._signal_thread is not None:
                self._signal_thread.join(5)
            os.close(read)
            self._wakeup = None

    def _signals(self, fd: int) -> None:
        """The signals thread: each SIGTERM/SIGINT byte read from the wakeup fd."""
        while data := os.read(fd, 64):
            for signum in data:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        """The first signal stops the daemon (runs get its grace period); a second one does not wait."""
        self.signals += 1
        self.stop()
        if self.signals > 1:  # second signal: do not wait for the grace period
            threading.Thread(target=self._interrupt_all, args=(0.0,), daemon=True).start()

    def _heard(self) -> None:
        """A wake file or spool entry appeared, or a command came over the control socket: look
        at everything, what other processes wrote included (only the intake wakes without it)."""
        self.foreign.set()
        self.wake.set()

    def stop(self) -> None:
        """Ask the loop to stop (what SIGTERM does)."""
        self.stopping.set()
        self.wake.set()

    def _loop(self) -> None:
        ping = watchdog_interval()
        self.looping.set()
        while True:
            due = self.next_due and max(0.0, self.next_due - time.time())
            waits = [x for x in (ping, due, self.backoff.next_in(), self.repeats.next_flush()) if x is not None]
            if not self.wake.wait(min(waits) if waits else None):
                self.foreign.set()  # a timer: look at everything, as a wake file would have it
            self.wake.clear()
            if ping:
                notify_systemd("WATCHDOG=1")
            self.repeats.flush()
            if self.stopping.is_set():
                return
            if self.backoff.waiting("loop"):
                continue
            try:
                with self.claiming:
                    self._step()
            except (GitpipeError, sqlite3.Error, OSError) as exc:  # a full disk: wait, then try again
                self.backoff.failed("loop")
                log.error("daemon: %s; trying again later", exc, exc_info=not isinstance(exc, GitpipeError))
                continue
            self.backoff.succeeded("loop")
            if self.burst and not self.workers and not self._queued():
                return

    def _step(self) -> None:
        """One look at everything: wake files, the spool, schedules, cancels, the queue, retention.
        Woken only by the intake (a push it recorded, with this daemon's own store) or by a run's
        end, nothing another process writes changed: the queue alone is looked at, while the run
        that push queued starts (the rest is for the next look of any other kind); not even that
        when the intake claimed the push itself (`_claim_pushed`). The caller holds `claiming`."""
        foreign = self.foreign.is_set()
        if self.pushed.is_set():  # cleared only when read set, as `foreign` below
            self.pushed.clear()
            if not foreign and not self.claim_due.is_set():  # the intake claimed: the cron lines' timer only
                self._schedules_after_push()
                return
        if self.claim_due.is_set():
            self.claim_due.clear()
        if foreign:  # cleared only when read set: a wake file heard between the two stays heard
            self.foreign.clear()  # set again meanwhile: the next look is a whole one
            self._clear_wake_files()
            self._ingest_spool()
        self._supersede()
        if foreign:
            self._cancel_requested()
            for worker in list(self.workers.values()):
                worker.changed.set()  # approvals decided, cancels requested: let workers look
        self._claim()
        # After the claim: what hooks and commands changed reaches the report, and how far that
        # got is saved (a synced commit), without delaying the start of a run just queued. Not
        # when only the intake woke the loop: its push's events reached the listeners as it
        # wrote them, and looking took the store from the run that push just started.
        if foreign:
            self._hear_others()
        if not self.run_schedules:
            pass
        elif foreign:
            fired, self.next_due = self.schedules.fire_due(time.time())
            if fired:
                self._claim()
        else:
            self._schedules_after_push()
        if self.prune_due:
            self.prune_due = False
            retention.prune(self.settings, self.store)

    def _schedules_after_push(self) -> None:
        """Only the intake (or a run's end) woke the loop: a push moved a head, whose cron lines
        are read a moment later, not while the run it queued starts (a blob read and a parse of
        every repo whose head moved, ~1 ms beside the run's start): the timer's look."""
        if self.run_schedules:
            soon = time.time() + SCHEDULES_AFTER_PUSH
            self.next_due = soon if self.next_due is None else min(self.next_due, soon)

    def _claim_pushed(self) -> None:
        """The intake recorded a push's runs (its thread, once the pusher has the answer): claim
        them here and now, as the loop's look woken by it would (supersede, then claim), without
        waiting for the loop to wake and take the GIL (0.5-1.5 ms on the way from push to exec).
        While the loop looks itself (or before it runs: recovery), or should this fail (a full
        disk), the loop looks again instead. Either way it wakes, for its cron lines' timer."""
        claimed = False
        started: list[RunWorker] = []
        try:
            if self.looping.is_set() and not self.stopping.is_set() and self.claiming.acquire(blocking=False):
                try:
                    # Looked at again under the lock: _shutdown takes it before it lists the runs
                    # it waits for, so a run this claim starts is either listed there or never
                    # started (the daemon stops: it stays queued for the next one).
                    if not self.stopping.is_set() and not self.backoff.waiting("loop"):
                        before = set(self.workers)
                        self._supersede()
                        self._claim()
                        claimed = True
                        started = [w for run_id, w in list(self.workers.items()) if run_id not in before]
                except (GitpipeError, sqlite3.Error, OSError) as exc:
                    log.debug("intake: left its push's claim to the loop: %s", exc)
                finally:
                    self.claiming.release()
            # What is left of this push's work (the loop's timer, the intake's chores) waits until
            # its run's first command is on its way: else it takes the GIL from that run's start.
            for worker in started:
                worker.begun.wait(BEGUN_WAIT)
        finally:  # whatever went wrong (a bug is logged by the intake), the loop claims what is left
            (self.pushed if claimed else self.claim_due).set()  # before the wake, as _worker_done's
            self.wake.set()

    def _hear_others(self) -> None:
        """Pass on to the listeners (the report, the notifier) what hooks and commands changed: a
        run that failed at its push (an invalid pipeline), a queued run cancelled, a run queued or
        retried, an approval decided. Each gets its page and its notification as it happens, not
        at the next `gitpipe report`."""
        events, self.events_seen = self.store.foreign_events(self.events_seen)
        for event in events:
            for listener in list(self.store.listeners):
                try:
                    listener(event)
                except Exception:  # a listener must never stop the loop
                    log.exception("event %s of run #%s: a listener failed", event.status, event.run_id)
        # Saved when others wrote, and now and then: a daemon killed with -9 hears again at most
        # SAVE_EVERY events of its own, which only renders their pages once more.
        if events or self.events_seen - self.events_saved >= SAVE_EVERY:
            self._save_events_seen()

    def _events_seen_before(self) -> int:
        """Where the last daemon stopped hearing of other processes' changes. A home whose site was
        never rendered hears of everything (runs pushed before the first start get their pages);
        one with a site from before this was kept starts at its newest event (its past pages are
        there already, and `gitpipe report` renders them all again)."""
        saved = self.store.get_state(EVENTS_SEEN)
        if saved is not None:
            return int(saved)
        return self.store.newest_event() if (self.settings.site_dir / "index.html").exists() else 0

    def _save_events_seen(self) -> None:
        if self.events_seen == self.events_saved:
            return
        try:
            self.store.set_state(EVENTS_SEEN, str(self.events_seen))
        except (GitpipeError, sqlite3.Error) as exc:  # a full disk: kept in memory, saved later
            log.warning("could not save where the report's catching up stopped: %s", exc)
            return
        self.events_saved = self.events_seen

    def _queued(self) -> bool:
        return self.store.get_state("paused") is None and bool(
            self.store.runs_with_status(RunStatus.QUEUED))

    def _clear_wake_files(self) -> None:
        for entry in os.scandir(self.settings.wake_dir):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------ work
    def _claim(self) -> None:
        """Go on with running runs; start queued ones (oldest first) while there is capacity."""
        try:
            self._claim_queued()
        finally:
            self._drop_early()

    def _claim_queued(self) -> None:
        # one read of the active runs serves the whole claim (each read is ~0.05-0.1 ms on the way
        # from push to exec); read again only when ending an unfinished run changed them
        active = self.store.runs_with_status(RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.WAITING)
        ended = False
        for run in active:
            if run.status is RunStatus.QUEUED or run.id in self.workers or self.backoff.waiting(run.id):
                continue
            if run.id in self.unfinished:
                self._end_unfinished(run.id)
                ended = True
            else:
                self._start_worker(run)
        if self.store.get_state("paused") is not None:
            return
        if ended:
            active = self.store.runs_with_status(RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.WAITING)
        waiting = {r.id for r in active if r.status is RunStatus.WAITING}
        for run in [r for r in active if r.status is RunStatus.QUEUED]:
            busy = sum(1 for run_id in list(self.workers) if run_id not in waiting)
            if busy >= self.settings.max_parallel:
                return
            if run.id in self.workers or self.backoff.waiting(run.id) or self._waits_for_earlier(run, active):
                continue
            self._start_worker(run)

    def _waits_for_earlier(self, run, active) -> bool:  # type: ignore[no-untyped-def]
        """`superseded = "queue"`: a run of a ref starts only when the earlier runs of that ref ended."""
        earlier = [r.id for r in active if r.repo == run.repo and r.ref == run.ref and r.id < run.id]
        if not earlier or self._superseded_policy(run.id) != "queue":
            return False
        if self._queue_noted.get(run.id) != earlier[-1]:  # said once per run it waits for
            self._queue_noted[run.id] = earlier[-1]
            log.info('run #%s: waits for #%s of %s %s (superseded = "queue")', run.id, earlier[-1], run.repo,
                     short_ref(run.ref))
        return True

    def _supersede(self) -> None:
        """`superseded = "cancel"`: a newer run of a ref cancels older ones (a deploy in flight finishes)."""
        active = self.store.runs_with_status(RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.WAITING)
        newest: dict[tuple[str, str], int] = {}
        for run in active:  # only a push supersedes (a retry of an old commit must not cancel a newer one)
            if triggers.supersedes(run.trigger):
                newest[(run.repo, run.ref)] = max(run.id, newest.get((run.repo, run.ref), 0))
        for run in active:
            latest = newest.get((run.repo, run.ref), 0)
            if run.id >= latest or run.extra.get("cancel_requested_at"):
                continue
            if self._superseded_policy(latest) == "cancel":
                try:
                    self.store.request_cancel(run.id, "gitpipe", f"superseded by #{latest}")
                except TransitionError:
                    continue  # it finished (or was cancelled by hand) since we looked
                log.info("run #%s: superseded by #%s, cancelling", run.id, latest)

    def _superseded_policy(self, run_id: int) -> str:
        if run_id not in self._policies:
            try:
                pipe = pipeline_mod.parse(self.store.pipeline_text(run_id) or "")
                self._policies[run_id] = pipe.trigger.superseded
            except PipelineError:
                self._policies[run_id] = "queue"
        return self._policies[run_id]

    def _prepare_early(self, run_id: int, repo: str, ref: str, sha: str, text: str) -> None:
        """Called by the intake once a push's run is recorded (its thread): reset the worktree of
        the run's first action now, while the loop wakes, claims and plans it (see RunWorker.pool),
        and make that action's sandbox meanwhile from the parked launcher (scheduler.first_ahead;
        `text`: the run's pipeline)."""
        self.heads.learned(repo, ref, text)
        early = self.heads.take(repo, ref)  # the slot and sandbox its pre-receive's heads-up made
        host = getattr(self, "host", None)  # the intake listens a moment before the host is made
        # It waits (its worktree would only hold a slot), or the loop, looking meanwhile, started
        # it already with a pool of its own: a slot reset here would hold the one it takes next.
        if host is None or len(self.workers) >= self.settings.max_parallel or run_id in self.workers:
            if early is not None:
                early.close()
            return
        if early is None:  # else the first sandbox is made (the heads-up's): no cgroup move to wait for
            host.sandbox.warm()  # the first cgroup move's wait, from now on, unless a launcher is parked
        pool = early or host.pool(repo, ref)
        pool.prepare_next(sha, during=first_ahead(host, pool, repo, ref, text))
        with self.early_lock:
            late = run_id in self.workers  # the loop started it meanwhile, with a pool of its own
            if not late:
                self.early[run_id] = pool
        if late:  # never to be taken: its slot, and the first sandbox made in it, go now
            pool.close()

    def _drop_early(self) -> None:
        """Let go of the worktrees prepared for runs that did not start (they wait): their runs
        reset one when they start."""
        with self.early_lock:
            stale = [run_id for run_id in self.early if run_id not in self.workers]
            pools = [self.early.pop(run_id) for run_id in stale]
        for pool in pools:
            pool.close()

    def _start_worker(self, run) -> None:  # type: ignore[no-untyped-def]
        with self.early_lock:  # one step with the pop: an early pool stored after it goes (_prepare_early)
            worker = RunWorker(self.host, run, self.early.pop(run.id, None))
            self.workers[run.id] = worker
        worker.on_done = self._worker_done
        log.info("run #%s: %s %s @ %s (%s)", run.id, run.repo, run.ref, run.sha[:7],
                 "resumed" if run.status is not RunStatus.QUEUED else "started")
        self._queue_noted.pop(run.id, None)
        worker.start()

    def _worker_done(self, worker: RunWorker) -> None:
        run_id = worker.run.id
        try:
            status = self.store.run(run_id).status
        except (GitpipeError, sqlite3.Error):
            status = RunStatus.RUNNING
        if status.finished or worker.interrupted.is_set():
            self.backoff.succeeded(run_id)
            log.info("run #%s: %s", run_id, status.value)
        else:
            # It stopped without recording the run's end (a full disk): not started again at
            # once (that looped hot); a queued one is started later, a running one ended later
            # (not resumed: that ran again the action that had filled the disk).
            why = space.full(self.settings.home) or "its worker stopped on an error (see the daemon's log)"
            if status is RunStatus.QUEUED:
                log.warning("run #%s: could not start: %s; trying again later", run_id, why)
            else:
                self.unfinished[run_id] = why
                log.warning("run #%s: its end could not be recorded: %s; trying again later", run_id, why)
            self.backoff.failed(run_id)
        self.workers.pop(run_id, None)
        self.prune_due = True
        self.claim_due.set()  # before the wake: the look it wakes claims (see _step)
        self.wake.set()

    def _end_unfinished(self, run_id: int) -> None:
        """End a run whose worker could not: cancelled if asked, else failed with why."""
        why = self.unfinished[run_id]
        cancel = self.store.cancel_requested(run_id)
        # its processes, if any were left behind
        executor.kill_tokens([attempt.token for attempt in self.store.open_attempts()
                              if self.store.action(attempt.action_id).run_id == run_id])
        try:
            self.store.finish_run(run_id, lifecycle.run_end((), cancelled=cancel, failed=True), None if cancel else
                                  f"{why}: the run's progress could not be recorded, so it was ended (not retried)")
        except (GitpipeError, sqlite3.Error) as exc:
            self.backoff.failed(run_id)
            log.warning("run #%s: its end could not be recorded: %s", run_id, exc)
            return
        del self.unfinished[run_id]
        self.backoff.succeeded(run_id)
        self.prune_due = True
        log.info("run #%s: %s", run_id, "cancelled" if cancel else "failed")

    def _cancel_requested(self) -> None:
        for run_id, worker in list(self.workers.items()):
            if not worker.cancelled.is_set() and self.store.cancel_requested(run_id):
                threading.Thread(target=worker.cancel, daemon=True).start()

    def _ingest_spool(self) -> None:
        """Queue the runs the hook kept in spool/ (the database was busy or full then)."""
        import json

        if self.backoff.waiting("spool"):
            return
        for path in sorted(self.settings.spool_dir.glob("*.json")):
            runs = [self._spooled(queue.NewRun(**r)) for r in json.loads(path.read_text())]
            try:  # under the entry's key: a crash before the unlink below makes no second copy
                record_once(self.store, f"{intake.KEY_PREFIX}spool:{path.name}", runs)
            except GitpipeError as exc:  # a full disk: the file stays, and is read again later
                self.backoff.failed("spool")
                log.warning("the runs kept in %s wait: %s", path, exc)
                return
            path.unlink()
            log.info("queued %d run(s) kept in %s", len(runs), path)
        self.backoff.succeeded("spool")
        self._sweep_reservations()

    def _spooled(self, run: queue.NewRun) -> queue.NewRun:
        """A spooled run, with its pipeline text read again at its commit (the hook leaves it out)."""
        if run.pipeline_text is not None:  # an entry from an older hook
            return run
        try:
            git_dir = self.store.repo_path(run.repo)
        except UsageError:  # removed since the push: its worker fails the run, saying so
            return run
        return dataclasses.replace(run, pipeline_text=queue.git_show(git_dir, run.sha, queue.PIPELINE_FILE))

    def _sweep_reservations(self) -> None:
        """Remove the room pre-receive reserved for pushes git refused after it (no post-receive came)."""
        pending = self.settings.spool_dir / "pending"  # named in hooks/pre-receive and hookmain too
        if not pending.is_dir():
            return
        now = time.time()
        for entry in os.scandir(pending):
            try:
                if now - entry.stat().st_mtime > STALE_RESERVATION:
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass

    def recover(self) -> None:
        """After a stop or a crash: end leftover processes, mark their attempts interrupted."""
        swept = self.host.sandbox.sweep()
        if swept:
            log.info("killed the processes of %d attempt(s) a previous daemon left running", swept)
        self.host.sandbox.park()  # after the sweep, which removes every group of this home
        if self.host.caches is not None and self.host.caches.sweep():
            log.info("cache: removed what a save interrupted by a previous daemon left behind")
        # on a worker host: its run takes it up again (gitpipe.cluster.dispatch)
        left = [attempt for attempt in self.store.open_attempts()
                if self.host.cluster is None or not self.host.cluster.owns(attempt.token)]
        # one scan for them all; after a daemon that did not stop, the sandboxes it made ahead too
        ahead = [self.host.sandbox.ahead_token] if self.heads.unclean and self.host.sandbox.bwrap else []
        counts = executor.kill_tokens([attempt.token for attempt in left] + ahead)
        if ahead and counts[ahead[0]]:
            log.info("killed %d process(es) of sandboxes a killed daemon was making ahead", counts[ahead[0]])
        for attempt in left:
            killed = counts[attempt.token]
            self.store.finish_attempt(attempt.action_id, attempt.number, ActionStatus.INTERRUPTED, None)
            act = self.store.action(attempt.action_id)
            # the $GITPIPE_OUTPUT file it may have left holds unmasked values
            (self.settings.logs_dir / str(act.run_id) / f".{act.id}.{attempt.number}.output").unlink(
                missing_ok=True)
            if act.status in (ActionStatus.RUNNING, ActionStatus.WAITING):
                self.store.set_action(act.id, ActionStatus.INTERRUPTED,
                                      message=f"interrupted (daemon stopped); {killed} leftover process(es) killed")
            log.info("run #%s: attempt %s of %s interrupted", act.run_id, attempt.number, act.name)

    def _shutdown(self) -> None:
        # An intake's claim under way (the intake's close waited 5 s at most) ends first, so that a
        # run it starts is among those listed below; one stuck longer (a store that hangs) does
        # not hold the stop for good: the runs known now are stopped, said in the log.
        claimed = self.claiming.acquire(timeout=CLAIM_WAIT_AT_STOP)
        if not claimed:
            log.warning("stopping: a push's claim of its runs has not ended in %ds; stopping the runs started so far",
                        CLAIM_WAIT_AT_STOP)
        try:
            self._stop_workers()
        finally:
            if claimed:
                self.claiming.release()

    def _stop_workers(self) -> None:
        if not self.workers:
            return
        log.info("stopping: %d run(s) active; grace period %ss", len(self.workers), self.settings.stop_grace)
        deadline_event = threading.Event()
        timer = threading.Timer(self.settings.stop_grace, deadline_event.set)
        timer.start()
        for worker in list(self.workers.values()):
            worker.interrupted.set()  # no new actions start
            worker.changed.set()  # approvals stop waiting at once
        for worker in list(self.workers.values()):
            while not worker.join(0.2) and not deadline_event.is_set():
                pass
        timer.cancel()
        self._interrupt_all(0.0)

    def _interrupt_all(self, grace: float) -> None:
        for worker in list(self.workers.values()):
            worker.interrupt(grace)
        for worker in list(self.workers.values()):
            worker.join(executor.KILL_GRACE + 5)


def close_home(home: Path) -> None:
    """The home is the daemon's alone (mode 0700): secrets, history and repos' caches live there."""
    st = home.stat()
    if st.st_uid == os.geteuid() and st.st_mode & 0o077:
        log.warning("home %s was mode %o; now 0700 (only the daemon's user may enter it)",
                    home, st.st_mode & 0o777)
        os.chmod(home, 0o700)


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec (WATCHDOG_USEC), when systemd asked for pings."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def notify_systemd(message: str) -> None:
    """Send a sd_notify datagram when systemd asked for one (Type=notify)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("could not notify systemd: %s", exc)


__all__ = ["Daemon", "GitpipeError", "Path", "daemon_running"]
