"""The one error tree of gitpipe.

Every error a user can cause is a `GitpipeError`; the CLI turns it into one line
and an exit status, never a traceback.

- `ConfigError`     gitpipe.toml / secrets.toml is wrong (exit 2). Carries file and line;
                    `problems` holds every problem of gitpipe.toml found at once.
- `UsageError`      a command was asked for something that does not exist or cannot
                    be done now: unknown run id, unknown repo, not a bare repo (exit 2).
- `PipelineError`   a `.pipeline.toml` is invalid; holds every problem found (exit 1).
- `EditError`       `gitpipe edit` was asked for an edit that does not fit the text (it is
                    not TOML, or names a stage or action that is not there); the page says so.
- `ActionError`     an action cannot run as configured (an output glob matched nothing,
                    a path reaching out of the worktree); fails that action, not the daemon.
- `DeployError`     a deploy failed (unreachable host, host key, disk full, healthcheck).
- `TransitionError` a state change that the state machine does not allow (a bug or a race,
                    e.g. approving a run that is not waiting); exit 2 in the CLI.
- `DiskFullError`   the disk holding the home is full: a change could not be recorded, and
                    nothing of it was (the transaction was rolled back); exit 1.
- `ApprovalRefused` the account asking may not decide this approval (`approvers`); the
                    attempt is recorded; exit 1.
- `ArtifactError`   a stored artifact does not match its recorded sha256 (or is gone), so
                    `gitpipe artifacts` refuses it and leaves nothing at the destination; exit 1.

Outside the tree on purpose: `IllegalTransition`, a status change that `lifecycle.py` does not
allow. No user can cause one (a user's own request, e.g. cancelling a finished run, is a
`TransitionError` said first), so it is a bug: a traceback in the CLI, and the run it hits ends
failed with "internal error: ...".
"""

from __future__ import annotations

from dataclasses import dataclass

from gitpipe.ansi import visible


class GitpipeError(Exception):
    """Base of every error gitpipe raises on purpose.

    Its text shows control characters as escapes (`\\x1b`): a message may quote a pushed
    pipeline or a remote's output, and some sinks (the hook's lines a pusher reads) print it as is.
    """

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return visible(f"{self.message} ({self.hint})")
        return visible(self.message)


class ConfigError(GitpipeError):
    """Host configuration is wrong; names the file, line and key."""

    def __init__(
        self, message: str, *, file: str | None = None, line: int | None = None, hint: str | None = None
    ) -> None:
        where = ""
        if file:
            where = f"{file}:{line}: " if line else f"{file}: "
        super().__init__(where + message, hint=hint)
        self.file = file
        self.line = line
        self.problems = [self]  # `every` holds several: one line each, as a PipelineError's

    @classmethod
    def every(cls, problems: list[ConfigError]) -> ConfigError:
        """All the problems of one file at once, in line order; its text holds one per line."""
        ordered = sorted(problems, key=lambda p: (p.line or 0, str(p)))
        error = cls("\n".join(str(p) for p in ordered), line=ordered[0].line)
        error.file, error.problems = ordered[0].file, list(ordered)
        return error


class UsageError(GitpipeError):
    """A command asked for something that does not exist or cannot be done."""


class TransitionError(UsageError):
    """A state change the state machine does not allow."""


class IllegalTransition(Exception):
    """A run, stage or action status change lifecycle.py forbids: a bug in gitpipe, not a GitpipeError."""


@dataclass(frozen=True)
class Problem:
    """One validation problem of a pipeline file, with its line (0 = whole file)."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        """FILE:LINE: message, with control characters shown as escapes (it quotes pushed text)."""
        text = f"{self.file}:{self.line}: {self.message}" if self.line else f"{self.file}: {self.message}"
        return visible(text)


class PipelineError(GitpipeError):
    """A pipeline file is invalid; `problems` holds every one found, in line order."""

    exit_code = 1

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.line, p.message))
        super().__init__("\n".join(str(p) for p in self.problems))


class EditError(GitpipeError):
    """An edit the editor's page asked for cannot be made on this text."""


class ActionError(GitpipeError):
    """An action cannot complete as configured; fails the action with this message."""

    exit_code = 1


class DeployError(GitpipeError):
    """A deploy failed; the message says what, on which target, and how to fix it."""

    exit_code = 1


class DiskFullError(GitpipeError):
    """The disk holding the gitpipe home is full: a change could not be recorded (nothing of it was)."""

    exit_code = 1


class ApprovalRefused(GitpipeError):
    """The account asking may not decide this approval; the attempt was recorded."""

    exit_code = 1


class ArtifactError(GitpipeError):
    """A stored artifact cannot be handed out as recorded (corrupted or gone)."""

    exit_code = 1


class IntakeRefused(Exception):
    """A push the daemon's intake socket does not take (malformed, or of a repo it does not know);
    never shown to a user: the hook then records the push itself, as without a daemon."""
