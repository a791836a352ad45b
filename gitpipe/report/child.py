"""The daemon's report, rendered in a child process, so that an idle daemon holds no jinja2.

    reporter = ChildReporter(settings, store)    # the daemon
    store.listeners.append(reporter.on_event)    # each event: one line down a pipe

The first event starts `python -m gitpipe.report.child HOME`: a Reporter of its own, which
renders the pages each event changed, as the daemon's own did (coalesced, see reporter).
The daemon closes the pipe once QUIET seconds pass with no event and no run running
(a running action's log may grow without events: the child re-renders it while it lives);
the child renders what is still marked and exits.

Measured (issue 11): jinja2, the compiled templates and what rendering leaves allocated
kept ~10 MB in the daemon for good after its first run (34 MB idle; 24 MB now). The cost:
each busy spell starts a child (0.15-0.25 s of CPU: the imports, and the compiled templates
read from COMPILED in the home), the first page of a spell appears that much later, and
while the child lives it holds ~31 MB of its own. Rendering also leaves the daemon's GIL.
A weak spot: the child's start (a fork and exec, a few ms) happens in the thread whose
event comes first after a quiet spell, usually the daemon's loop hearing of a push.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from gitpipe import records
from gitpipe.models import Event, RunStatus
from gitpipe.settings import Settings
from gitpipe.store import Store

log = logging.getLogger("gitpipe")
# Seconds without an event and without a running run before the child is let go: runs a few
# seconds apart share one child (a child per run of 20 `true` actions cost 9 ms per action).
QUIET = 10.0
STOP_WAIT = 30  # seconds the daemon waits, when it stops, for the child's last pages
NICENESS = 10  # the child's CPU priority below the daemon's (nice(2)): see main
AUTOGROUP = Path("/proc/self/autogroup")  # see _below_the_runs
AUTOGROUP_TRIES, AUTOGROUP_PAUSE = 50, 0.2  # the kernel's limit is one write per 0.1 s, host-wide
COMPILED = "report-templates"  # in the home: the compiled templates, kept for the next child


class ChildReporter:
    """The daemon's side: hands each event to the rendering child, started when needed."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self._lock = threading.Lock()  # guards the child and its pipe
        self._child: subprocess.Popen[bytes] | None = None
        self._ending: subprocess.Popen[bytes] | None = None  # a child let go, rendering its last marks
        self._last = 0.0  # time.monotonic() of the last event
        self._closed = False

    def on_event(self, event: Event) -> None:
        """Send the event to the child (never raises: the report must not break a run)."""
        line = (json.dumps([event.run_id, records.encode(event), event.status]) + "\n").encode()
        with self._lock:
            if self._closed:
                return
            self._last = time.monotonic()
            for _ in range(2):  # a child that died is started again, once
                try:
                    self._pipe().write(line)
                    return
                except OSError:
                    log.warning("report: the rendering process ended; starting it again")
                    self._child = None
                except Exception:
                    log.exception("report: could not hand run #%s to the rendering process", event.run_id)
                    return

    def _pipe(self) -> IO[bytes]:
        if self._child is None or self._child.poll() is not None:
            if self._ending is not None:  # two children rendering at once could write an older page last
                self._ending.wait()
                self._ending = None
            self._child = subprocess.Popen(
                [sys.executable, "-m", "gitpipe.report.child", str(self.settings.home)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, bufsize=0, close_fds=True)
            threading.Thread(target=self._watch, args=(self._child,), name="report-child", daemon=True).start()
        assert self._child.stdin is not None
        return self._child.stdin

    def _watch(self, child: subprocess.Popen[bytes]) -> None:
        """Let the child go after a quiet spell (this thread lives only as long as the child)."""
        wait = QUIET
        while True:
            time.sleep(wait)
            running = self._running()  # asked outside the lock: events never wait for the store
            with self._lock:
                if self._child is not child:
                    return
                left = self._last + QUIET - time.monotonic()
                if running or left > 0:
                    wait = QUIET if running else max(left, 0.1)
                    continue
                self._child, self._ending = None, child
                _close(child)
            child.wait()
            return

    def _running(self) -> bool:
        try:
            return bool(self.store.runs_with_status(RunStatus.RUNNING))
        except Exception:  # the store is closing: let the child go
            return False

    def close(self) -> None:
        """Let the child render what is marked and wait for it (the daemon calls this when it stops)."""
        with self._lock:
            self._closed = True
            children = [c for c in (self._child, self._ending) if c is not None]
            self._child = self._ending = None
        for child in children:
            _close(child)
            try:
                child.wait(timeout=STOP_WAIT)
            except subprocess.TimeoutExpired:  # stuck (a site on a hung mount): `gitpipe report` redoes it
                log.warning("report: the rendering process did not end in %d s; stopped it", STOP_WAIT)
                child.kill()
                child.wait()


def _close(child: subprocess.Popen[bytes]) -> None:
    try:
        assert child.stdin is not None
        child.stdin.close()
    except OSError:
        pass


def _below_the_runs(niceness: int) -> None:
    """Lower this process's CPU priority below the daemon's and below every action's.

    nice(2) alone ranks it only against the processes of its own session: with the kernel's
    autogroup scheduling (on by default in Debian's kernels, for every process outside a CPU
    cgroup) each session is one scheduling group, weighed equally against each other one. An
    action runs in a session of its own (bwrap --new-session), so the child, in the daemon's
    session, took half a core from a push's first command while it rendered (5 ms of CPU in
    the 34 ms from push to command, measured with perf sched). In a session of its own, whose
    group gets the same niceness, it yields to the actions too.

    The kernel takes one such write per 0.1 s from the whole host (EAGAIN) from a process
    without CAP_SYS_ADMIN, and an action can write its own group's: the write is tried again
    in the background until it passes, the child alone in its group meanwhile (one session's
    share), and said in the log if it never does. Without autogroup, nice is all there is."""
    os.nice(niceness)
    if not AUTOGROUP.is_file():
        return
    try:
        os.setsid()
    except OSError:
        return
    if not _group_niceness(niceness):
        threading.Thread(target=_keep_trying, args=(niceness,), name="autogroup", daemon=True).start()


def _group_niceness(niceness: int) -> bool:
    """Write this session's group niceness: False while the kernel says to try later."""
    try:
        with open(AUTOGROUP, "w") as f:
            f.write(str(niceness))
    except BlockingIOError:
        return False
    except OSError as exc:
        log.warning("report: could not lower the rendering process's CPU share below the actions' (%s: %s)",
                    AUTOGROUP, exc.strerror)
    return True


def _keep_trying(niceness: int) -> None:
    for _ in range(AUTOGROUP_TRIES):
        time.sleep(AUTOGROUP_PAUSE)
        if _group_niceness(niceness):
            return
    log.warning("report: could not lower the rendering process's CPU share below the actions' (%s kept "
                "answering EAGAIN for %.0f s): it renders at one session's share", AUTOGROUP,
                AUTOGROUP_TRIES * AUTOGROUP_PAUSE)


def main(argv: list[str]) -> int:
    """The child: render the pages of the events read from stdin until it closes."""
    from gitpipe import settings
    from gitpipe.report.reporter import Reporter

    # The daemon ends this process by closing the pipe, after the last event: a Ctrl-C meant for
    # the daemon (the terminal signals the whole group) must not lose the pages of its last events.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Pages are background work: a run started meanwhile (a push's, on a 2-core build host) goes
    # first. Rendering is coalesced to once a second while a run is live, and met the next push.
    logging.basicConfig(level=logging.INFO, format="gitpipe: %(message)s", stream=sys.stderr)
    _below_the_runs(NICENESS)
    conf = settings.load(argv[0])
    store = Store(conf)
    reporter = Reporter(conf, store, background=True, compiled=conf.home / COMPILED)
    try:
        for line in sys.stdin.buffer:
            run_id, subject, status = json.loads(line)
            reporter.on_event(records.decode(run_id, subject, status, None))
    finally:
        reporter.close()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
