"""Entry of the installed git hooks: read stdin, chain an older hook, call queue, print."""

from __future__ import annotations

import os
import subprocess
import sys

from gitpipe import queue, settings
from gitpipe.errors import GitpipeError


def _chained(name: str, data: bytes) -> int:
    """Run the hook that was installed before gitpipe's, with the same input; its exit status."""
    path = os.path.join(os.environ.get("GIT_DIR", "."), "hooks", f"{name}.chained")
    if not os.access(path, os.X_OK):
        return 0
    return subprocess.run([path], input=data, check=False).returncode


def main(name: str, *, home: str, repo: str) -> int:
    """Run hook `name` for `repo` with the gitpipe home it was installed from."""
    data = sys.stdin.buffer.read()
    git_dir = os.environ.get("GIT_DIR", ".")
    try:
        conf = settings.load(home)
        if name == "pre-receive":
            rc = _chained(name, data)
            if rc:
                return rc
            ok, lines = queue.pre_receive(conf, repo, git_dir, data.decode("utf-8", "replace"))
            _print(lines)
            return 0 if ok else 1
        _print(queue.post_receive(conf, repo, git_dir, data.decode("utf-8", "replace")))
    except GitpipeError as exc:
        _print([f"gitpipe: ERROR: {exc}"])
    if name == "post-receive":
        _chained(name, data)
    return 0


def _print(lines: list[str]) -> None:
    if lines:
        sys.stdout.write("".join(line + "\n" for line in lines))
        sys.stdout.flush()
