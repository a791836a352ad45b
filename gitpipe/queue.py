"""What the git hooks call: record queued runs durably, print them, wake the daemon.

This runs inside every `git push`, so it is kept to the standard library (sqlite3,
tomllib, subprocess to the `git` that is running the hook anyway): importing pygit2
or sqlite-utils here would add 70-100 ms to each push. It is the one place besides
store.py that writes the database, and it writes only new run rows (and their
first event), in the schema that store.py's migrations own.
"""

from __future__ import annotations

import sqlite3
import subprocess
from dataclasses import dataclass

from gitpipe import intake
from gitpipe import pipeline as pipeline_mod
from gitpipe.ansi import visible
from gitpipe.errors import PipelineError
from gitpipe.intake import PIPELINE_FILE
from gitpipe.models import RefUpdate
from gitpipe.refs import short_ref
from gitpipe.settings import Settings


@dataclass(frozen=True)
class NewRun:
    """A run to record: everything the hook or a command knows about it."""

    repo: str
    pipeline: str
    ref: str
    sha: str
    trigger: str
    pipeline_text: str | None
    before_sha: str | None = None
    pusher: str | None = None
    error: str | None = None
    retry_of: int | None = None
    commit_author: str | None = None  # known before the daemon starts it: for a run that fails at once
    commit_message: str | None = None
    inputs: tuple[tuple[str, str], ...] = ()  # given with `gitpipe run --var` (or kept by a retry)


def insert_run(conn: sqlite3.Connection, run: NewRun) -> int:
    """Insert one run (queued, or failed at once when it has an error); caller holds the transaction."""
    return intake.insert_run(conn, run.__dict__)


def wake(settings: Settings, name: str = "wake") -> None:
    """Tell a running daemon to look at the queue."""
    intake.wake(str(settings.home), name)


def git_show(git_dir: str, sha: str, path: str) -> str | None:
    """A file's text at a commit through `git cat-file`, or None when the commit has no such file."""
    proc = subprocess.run(
        ["git", f"--git-dir={git_dir}", "cat-file", "blob", f"{sha}:{path}"],
        capture_output=True, check=False,
    )
    if proc.returncode != 0:
        return None
    return proc.stdout.decode("utf-8", errors="replace")


def parse_updates(text: str) -> list[RefUpdate]:
    """The `old new ref` lines git gives a post-receive / pre-receive hook."""
    updates = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            updates.append(RefUpdate(old=parts[0], new=parts[1], ref=parts[2]))
    return updates


def pre_receive(settings: Settings, repo: str, git_dir: str, stdin_text: str) -> tuple[bool, list[str]]:
    """The pre-receive hook: with `reject_invalid`, refuse a push whose new pipeline is invalid."""
    if not settings.repo(repo).reject_invalid:
        return True, []
    lines: list[str] = []
    for up in parse_updates(stdin_text):
        if up.deleted:
            continue
        text = git_show(git_dir, up.new, PIPELINE_FILE)
        if text is None:
            continue
        try:
            pipeline_mod.parse(text, file=PIPELINE_FILE, default_name=repo)
        except PipelineError as exc:
            # The pusher's terminal prints these lines: the ref's controls (C1, bidi) shown, not done.
            lines.append(f"gitpipe: rejecting {visible(short_ref(up.ref))}: {PIPELINE_FILE} is invalid")
            lines += [f"gitpipe:   {p}" for p in exc.problems]
    if lines:
        lines.append("gitpipe: fix the file (check it with `gitpipe validate`) and push again")
    return not lines, lines
