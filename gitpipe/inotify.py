"""The daemon's wake-up: one inotify descriptor on its wake and spool folders, read by one thread.

watchdog (which `follow` uses for `gitpipe logs --follow`) costs an idle daemon ~5 MB resident,
70 modules and five threads (an emitter and a reader per folder, a dispatcher) to watch two
folders non-recursively; this is the same wake-up in one thread and no module beyond ctypes
(which the sandbox loads anyway). What wakes: a file created, written, closed after writing,
or moved in (never a deletion: the daemon deletes the wake files it read), and an event queue
overflow (a lost event must never leave work unseen).
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
import threading
from collections.abc import Callable
from pathlib import Path

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_ONLYDIR = 0x01000000
IN_CLOEXEC = 0o2000000
IN_NONBLOCK = 0o4000
WAKES = IN_CREATE | IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO
EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name


class Watch:
    """A started watch that calls `on_change` whenever a file in one of `dirs` changes (see WAKES),
    and `also[d]` instead whenever one in the folder `d` is closed after writing (or has one of
    the events `masks[d]` names)."""

    def __init__(self, dirs: list[Path], on_change: Callable[[], object],
                 also: dict[Path, Callable[[], object]] | None = None,
                 masks: dict[Path, int] | None = None) -> None:
        libc = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter has loaded
        self.fd = libc.inotify_init1(IN_CLOEXEC | IN_NONBLOCK)
        if self.fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify: {os.strerror(code)}"
                          + (" (raise fs.inotify.max_user_instances)" if code == errno.EMFILE else ""))
        self.calls: dict[int, Callable[[], object]] = {}  # watch descriptor -> its `also` call
        try:
            for d, mask in [*((d, WAKES) for d in dirs),
                            *((d, (masks or {}).get(d, IN_CLOSE_WRITE)) for d in also or {})]:
                d.mkdir(parents=True, exist_ok=True)
                wd = libc.inotify_add_watch(self.fd, os.fsencode(d), mask | IN_ONLYDIR)
                if wd < 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"inotify on {d}: {os.strerror(code)}"
                                  + (" (raise fs.inotify.max_user_watches)" if code == errno.ENOSPC else ""))
                if also and d in also:
                    self.calls[wd] = also[d]
            self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        except BaseException:
            os.close(self.fd)
            raise
        self.on_change = on_change
        self.thread = threading.Thread(target=self._read, name="inotify", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while True:
                ready, _, _ = select.select([self.fd, self._stop_r], [], [])
                if self._stop_r in ready:
                    return
                wds: set[int] = set()
                try:
                    while data := os.read(self.fd, 65536):
                        at = 0
                        while at + EVENT.size <= len(data):
                            wd, _, _, length = EVENT.unpack_from(data, at)
                            wds.add(wd)  # -1: an overflow, a reason for every look
                            at += EVENT.size + length
                except BlockingIOError:
                    pass
                for wd, call in self.calls.items():  # the `also` calls first: the push waits for neither
                    if wd in wds or -1 in wds:
                        call()
                if not wds <= self.calls.keys():  # an overflow (-1) included
                    self.on_change()
        finally:
            os.close(self.fd)
            os.close(self._stop_r)

    def stop(self) -> None:
        os.write(self._stop_w, b"x")

    def join(self) -> None:
        self.thread.join()
        os.close(self._stop_w)


def observe(dirs: list[Path], on_change: Callable[[], object],
            also: dict[Path, Callable[[], object]] | None = None,
            masks: dict[Path, int] | None = None) -> Watch:
    """Call `on_change` (from the watch's thread) on every change of a file directly in `dirs`,
    and `also[d]` when a file directly in `d` was written and closed, or had an event of
    `masks[d]` (all made when missing)."""
    return Watch(dirs, on_change, also, masks)
