"""Short jobs the daemon runs beside its work (a worktree reset ahead, a launcher parked), on
threads kept between jobs.

`threading.Thread.start` waits until the new thread has run its first lines, which needs the
GIL: in a daemon busy starting a run (the intake, the loop, the run's thread, the reset), py-spy
found 0.5-1.5 ms per start on the way from push to exec. A job here goes to an idle thread
without that wait (a thread is made only when none is idle, up to `THREADS`).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

THREADS = 16  # jobs at once; more wait their turn (a reset ahead per running run, one park)

_jobs = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="gitpipe-job")


def submit(job: Callable[[], None]) -> Future[None]:
    """Run `job` on an idle thread; its exceptions are its own to handle (they are kept, unread)."""
    return _jobs.submit(job)
