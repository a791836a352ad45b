"""Jobs the daemon runs beside its work on threads kept between jobs: short ones (a worktree reset
ahead) through `submit`, and long ones, a run each, through `Kept`.

`threading.Thread.start` waits until the new thread has run its first lines, which needs the
GIL: in a daemon busy starting a run (the intake, the loop, the run's thread, the reset), py-spy
found 0.5-1.5 ms per start on the way from push to exec. A job here goes to an idle thread
without that wait (a thread is made only when none is idle, up to `THREADS`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger("gitpipe")

THREADS = 16  # jobs at once; more wait their turn (a reset ahead per running run, one park)

_jobs: ThreadPoolExecutor | None = None  # made at the first job: an idle daemon loads no concurrent.futures
_jobs_lock = threading.Lock()


def submit(job: Callable[[], None]) -> Future[None]:
    """Run `job` on an idle thread; its exceptions are its own to handle (they are kept, unread)."""
    global _jobs
    with _jobs_lock:
        if _jobs is None:
            from concurrent.futures import ThreadPoolExecutor

            _jobs = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="gitpipe-job")
    return _jobs.submit(job)


class Kept:
    """Threads for long jobs (a run, which may wait days for an approval): each job starts on an
    idle thread when there is one, else on a new one; none is ever queued behind another job.
    Daemon threads: one stuck in a job never holds the process's exit."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.lock = threading.Lock()
        self.idle = 0  # threads waiting for a job that no `start` has promised one yet
        self.made = 0
        self.jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

    def start(self, job: Callable[[], None]) -> None:
        """Run `job` (it handles its own exceptions; one it lets out is logged)."""
        with self.lock:
            spare = self.idle > 0
            if spare:
                self.idle -= 1  # that thread's next job is this one
            else:
                self.made += 1
                name = f"{self.prefix}-{self.made}"
        if spare:
            self.jobs.put(job)
        else:
            threading.Thread(target=self._serve, args=(job,), name=name, daemon=True).start()

    def _serve(self, job: Callable[[], None]) -> None:
        while True:
            try:
                job()
            except BaseException:
                log.exception("a job on thread %s failed", threading.current_thread().name)
            with self.lock:
                self.idle += 1
            job = self.jobs.get()
