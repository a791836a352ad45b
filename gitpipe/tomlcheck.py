"""The validator's tools: `Report` collects problems at their lines, `Table` reads typed values.

Each getter of `Table` reports a value of the wrong type or shape (at the line of its key,
from gitpipe.tomllines) and returns a default, so validation goes on and every problem
of a file is reported at once. Standard library only (the git hook validates pipelines).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from typing import Any, TypeVar

from gitpipe.durations import parse_duration
from gitpipe.errors import Problem
from gitpipe.tomllines import KeyPath, line_of

_D = TypeVar("_D", float, None)
SAFE_NAME = re.compile(r"[^/\\\x00-\x1f\x7f]+")  # a name: no path separators, no controls
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SYNTAX_AT = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)")
# Words carried over from other CI tools, which difflib cannot guess from spelling.
_SYNONYMS = {
    "shell": ("run",), "script": ("run",), "cmd": ("run", "command"), "command": ("run",),
    "steps": ("run",), "needs": ("inputs",), "depends_on": ("inputs",), "artifacts": ("outputs",),
    "order": ("run_order",), "targets": ("target",), "hosts": ("target",), "host": ("target",),
    "if": ("when",), "only": ("when",), "retry": ("retries",), "variables": ("env",),
    "stages": ("stage",), "jobs": ("stage",), "actions": ("action",),
    "events": ("on",), "url": ("webhook",),
}


class Report:
    """Collects problems, each at the most precise line known for its place."""

    def __init__(self, file: str, lines: dict[KeyPath, int]) -> None:
        self.file = file
        self.lines = lines
        self.problems: list[Problem] = []

    def line(self, path: KeyPath) -> int:
        """The line of `path`, else of its nearest parent written in the file (0: none)."""
        return line_of(self.lines, path)

    def add(self, path: KeyPath, message: str) -> None:
        """A problem at the line of `path`."""
        self.problems.append(Problem(self.file, self.line(path), message))


class Table:
    """One TOML table being validated: getters report a wrong value and return a default."""

    def __init__(self, report: Report, data: dict[str, Any], path: KeyPath, where: str) -> None:
        self.report = report
        self.data = data
        self.path = path
        self.where = where

    def problem(self, message: str, *sub: str | int) -> None:
        self.report.add(self.path + sub, f"{self.where}: {message}" if self.where else message)

    def unknown_keys(self, allowed: Iterable[str]) -> list[str]:
        return [key for key in self.data if key not in allowed]

    def check_keys(self, allowed: tuple[str, ...]) -> None:
        for key in self.unknown_keys(allowed):
            self.problem(f'unknown key "{key}"{suggest(key, allowed)}', key)

    def get(self, key: str, types: tuple[type, ...], expected: str) -> Any:
        """The value of `key` if it has one of `types`; None if absent or of another type."""
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            hint = f' (write ["{value}"])' if "array" in expected and isinstance(value, str) else ""
            self.problem(f'"{key}" must be {expected}, not {describe(value)}{hint}', key)
            return None
        return value

    def string(self, key: str, required: str = "") -> str | None:
        value: str | None = self.get(key, (str,), "a string")
        if key not in self.data and required:
            self.problem(f'missing required key "{key}" ({required})')
        if value is not None and not value.strip():
            self.problem(f'"{key}" must not be empty', key)
            return None
        return value

    def name(self, key: str, required: str) -> str | None:
        value = self.string(key, required)
        if value is not None and (not SAFE_NAME.fullmatch(value) or value in (".", "..")):
            self.problem(f'"{key}" "{value}" must not contain "/", "\\" or control characters', key)
        return value

    def integer(self, key: str, default: int, minimum: int) -> int:
        value = self.get(key, (int,), f"an integer >= {minimum}")
        if value is not None and value < minimum:
            self.problem(f'"{key}" must be an integer >= {minimum}, not {value}', key)
            return default
        return default if value is None else value

    def strings(self, key: str) -> tuple[str, ...] | None:
        value = self.get(key, (list,), "an array of strings")
        if value is None:
            return None
        for index, item in enumerate(value):
            if not isinstance(item, str):
                self.problem(f'"{key}" must hold strings only, not {describe(item)}', key, index)
        return tuple(item for item in value if isinstance(item, str))

    def duration(self, key: str, default: _D, positive: bool = False) -> float | _D:
        value = self.get(key, (str,), 'a duration string such as "90s", "10m" or "2h"')
        if value is None:
            return default
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.problem(f'"{key}": {exc}', key)
            return default
        if positive and seconds <= 0:
            self.problem(f'"{key}" must be longer than 0s', key)
            return default
        return seconds

    def choice(self, key: str, options: tuple[str, ...], default: str) -> str:
        value = self.string(key)
        if value is not None and value not in options:
            allowed = ", ".join(f'"{o}"' for o in options)
            self.problem(f'"{key}" must be one of {allowed}, not "{value}"{suggest(value, options)}', key)
            return default
        return default if value is None else value

    def table(self, key: str, where: str) -> Table | None:
        value = self.get(key, (dict,), "a table")
        return None if value is None else Table(self.report, value, self.path + (key,), where)

    def tables(self, key: str, header: str) -> list[tuple[int, dict[str, Any]]]:
        """The items of an array of tables, each with its index; other items are reported."""
        value = self.get(key, (list,), f"an array of tables (write {header} headers)")
        items = []
        for index, item in enumerate(value or ()):
            if isinstance(item, dict):
                items.append((index, item))
            else:
                self.problem(f'"{key}" must hold tables only, not {describe(item)}', key, index)
        return items


def describe(value: Any) -> str:
    """How a message names a value of the wrong kind: 'the number 3', 'an array' ..."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f'the string "{value if len(value) <= 40 else value[:37] + "..."}"'
    if isinstance(value, list):
        return "an array of tables" if value and all(isinstance(v, dict) for v in value) else "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"  # dates and times


def suggest(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean "x"?)' for a misspelt word (or a word from another CI tool), else ""."""
    import difflib  # only needed when something is wrong

    options = list(choices)
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if not close:
        close = [c for c in _SYNONYMS.get(word.lower(), ()) if c in options][:1]
    return f' (did you mean "{close[0]}"?)' if close else ""


def syntax_problem(file: str, text: str, exc: tomllib.TOMLDecodeError) -> Problem:
    """The Problem of a text tomllib cannot read, at the line (and column) tomllib names."""
    message = str(exc)
    match = _SYNTAX_AT.search(message)
    if match is None:
        return Problem(file, 0, f"invalid TOML: {message}")
    where = f" (column {match[2]})" if match[1] else " (at the end of the file)"
    line = int(match[1]) if match[1] else text.count("\n") + 1
    return Problem(file, line, f"invalid TOML: {message[:match.start()]}{message[match.end():]}{where}")


def relative_problem(path: str) -> str | None:
    """Why `path` is not a path relative to the worktree, or None if it is one."""
    if not path.strip():
        return "must not be empty"
    if path.startswith(("/", "\\", "~")) or re.match(r"[A-Za-z]:", path):
        return "must be relative to the worktree, not absolute"
    if ".." in re.split(r"[/\\]", path):
        return 'must not contain ".." (it would reach outside the worktree)'
    return None
