"""The host's own programs, found where the system keeps them: never through a pipeline's PATH,
nor the daemon's (a PATH an action could have shaped must not choose what the daemon runs)."""

from __future__ import annotations

import functools
import shutil

SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def find(name: str) -> str | None:
    """The path of the system program `name`, or None when it is not installed."""
    return shutil.which(name, path=SYSTEM_PATH)


@functools.cache
def tool(name: str) -> str:
    """The path of the system program `name` (looked up once per process), else /usr/bin/`name`:
    for a program the caller runs anyway and whose absence its own error then names."""
    return find(name) or f"/usr/bin/{name}"
