"""What hooks/pre-receive asks of gitpipe.toml on every push, kept where the shell reads it.

pre-receive starts Python (to validate the pushed pipeline) only where gitpipe.toml sets
`reject_invalid = true`. It found out with `grep` on every push: a process, 1-1.5 ms of every
push's wait and of its way to its run's first command. While a daemon runs, it keeps grep's
answer in `<home>/reject-invalid` ("true" or "false", then what it knew of gitpipe.toml), which
the hook reads with the shell's own `read`.

The hook trusts the answer only while it is newer than gitpipe.toml (`test -nt`): the daemon
dates it from just before it read the file, so an edit since then, even one racing that read,
makes the hook grep again. The daemon looks again when it starts, after each push it answers
and whenever its watch of the home hears gitpipe.toml change, and writes the answer anew when
gitpipe.toml is not the file it read (another inode, size, mtime or ctime: a copy that kept an
older mtime, `mv`, `rsync -a`, `cp -p`, is seen by its ctime, which the hook cannot read: heard
at once, not at the next push, which would take the old answer). A clean stop removes it, so a
push while no daemon runs greps; after a daemon killed with -9, only a gitpipe.toml put back
with an older mtime while none runs could be read wrong, until one starts.

A gitpipe.toml that is a symbolic link or has other hard links (to a file a configuration tool
keeps elsewhere) gets no answer: the watch of the home cannot hear that file written through its
other name, so the hook greps it on every push, as without a daemon. (A file bind-mounted over
gitpipe.toml is not told apart: it is written through the other path unheard too, until the next
push's look.)
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from pathlib import Path

from gitpipe.settings import CONFIG_NAME

log = logging.getLogger("gitpipe")
NAME = "reject-invalid"  # in the home; named in hooks/pre-receive too
# hooks/pre-receive's grep -E '^[[:space:]]*reject_invalid[[:space:]]*=[[:space:]]*true', by line
PATTERN = re.compile(rb"^[ \t\v\f\r]*reject_invalid[ \t\v\f\r]*=[ \t\v\f\r]*true", re.MULTILINE)
# File times come from the kernel's coarse clock, up to a tick (4 ms at HZ=250) behind time.time():
# the answer is dated this much earlier than the read, so no write after the read looks older.
MARGIN_NS = 50_000_000


def refresh(home: Path) -> None:
    """Write the answer anew unless it is of gitpipe.toml as it is (never raises: without it the
    hook greps, as it always did)."""
    config, mark = home / CONFIG_NAME, home / NAME
    try:
        st = os.lstat(config)  # a link's own: one look tells a link, and is the file's otherwise
    except OSError:
        remove(home)  # no gitpipe.toml (all defaults): the hook's test fails and it greps
        return
    if stat.S_ISLNK(st.st_mode) or st.st_nlink > 1:  # its content changes unheard (see above): the hook greps it
        remove(home)
        return
    seen = _identity(st)
    try:
        held = mark.read_text().split()
        if held[1:] == seen and os.stat(mark).st_mtime_ns > int(seen[2]):
            return
    except (OSError, IndexError, ValueError):
        pass
    # Edited less than MARGIN_NS ago (the daemon's watch hears it at once): an answer dated now
    # would look older than the edit, and the hook would grep until the next push; so it waits
    # that long. One dated in the future (a clock set back) no answer now is newer than: the hook
    # greps meanwhile (each write, heard by the watch, would only ask for another).
    wait = int(seen[2]) - (time.time_ns() - MARGIN_NS)
    if wait > MARGIN_NS:
        return
    if wait >= 0:
        time.sleep((wait + 1_000_000) / 1e9)
    read_at = time.time_ns() - MARGIN_NS
    temp = home / f".{NAME}.{os.getpid()}"
    try:
        with open(config, "rb") as f:
            seen = _identity(os.fstat(f.fileno()))  # of the very file read
            answer = "true" if PATTERN.search(f.read()) else "false"
        temp.write_text(" ".join([answer, *seen]) + "\n")
        os.utime(temp, ns=(read_at, read_at))
        os.replace(temp, mark)
    except OSError as exc:  # a full disk: the hook greps meanwhile
        log.warning("could not keep gitpipe.toml's reject_invalid for the hooks in %s (%s): each push greps it",
                    mark, exc)
        temp.unlink(missing_ok=True)


def remove(home: Path) -> None:
    try:
        os.unlink(home / NAME)
    except OSError:
        pass


def _identity(st: os.stat_result) -> list[str]:
    return [str(st.st_ino), str(st.st_size), str(st.st_mtime_ns), str(st.st_ctime_ns)]
