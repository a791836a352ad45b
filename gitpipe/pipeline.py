"""`.pipeline.toml` text -> validated, frozen `Pipeline`; every problem reported at once.

The git post-receive hook imports this module, so only the standard library is imported
at module level. croniter (cron lines), importlib.metadata (plugin action types) and
difflib (suggestions) are imported inside the functions that need them, and only when a
pipeline has a schedule, a custom action type or a mistake.

tomllib gives no line numbers, so `_Scanner` walks the (already valid) TOML text once and
records the line of every table header, key and array item; each problem is reported at
the most precise line known for its place, else at its table's header.
"""

from __future__ import annotations

import fnmatch
import functools
import itertools
import re
import tomllib
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, TypeVar

from gitpipe import keys
from gitpipe.errors import PipelineError, Problem
from gitpipe.models import (
    ActionSpec,
    CacheSpec,
    InputSpec,
    NotifySpec,
    Pipeline,
    ScheduleSpec,
    StageSpec,
    TriggerSpec,
    When,
)

Path = tuple[str | int, ...]
_D = TypeVar("_D", float, None)

PLACEHOLDERS = frozenset({"run", "pipeline", "repo", "ref", "sha", "short_sha", "branch", "environment"})
BUILTIN_TYPES = keys.ACTION_TYPES
EVENTS = keys.find("notify", "on").choices  # type: ignore[union-attr]
STRATEGIES = keys.find("action", "strategy").choices  # type: ignore[union-attr]
SUPERSEDED = keys.find("trigger", "superseded").choices  # type: ignore[union-attr]

# The key lists come from gitpipe/keys.py, which also feeds `gitpipe schema` and the editor.
_TOP_KEYS = keys.names("top")
_PIPELINE_KEYS = keys.names("pipeline")
_INPUT_KEYS = keys.names("input")
_TRIGGER_KEYS = keys.names("trigger")
_STAGE_KEYS = keys.names("stage")
_NOTIFY_KEYS = keys.names("notify")
_WHEN_KEYS = keys.names("when")
_SCHEDULE_KEYS = keys.names("schedule")
_CACHE_KEYS = keys.names("cache")
_COMMON_KEYS = tuple(k.name for k in keys.action_keys(None))
_TYPE_KEYS = {kind: keys.type_keys(kind) for kind in BUILTIN_TYPES}
MATRIX_LIMIT = 64  # copies one matrix action may make: more is a mistake, or a job for several actions
_RUN_NOT_ALLOWED = {
    "approval": 'an approval cannot have "run": it waits for a person and runs nothing '
    "(put the script in an action of its own)",
    "deploy": 'a deploy cannot have "run" (use "before_switch"/"after_switch" for commands on the '
    "target, or a separate run action)",
}
# Words carried over from other CI tools, which difflib cannot guess from spelling.
_SYNONYMS = {
    "shell": ("run",), "script": ("run",), "cmd": ("run", "command"), "command": ("run",),
    "steps": ("run",), "needs": ("inputs",), "depends_on": ("inputs",), "artifacts": ("outputs",),
    "order": ("run_order",), "targets": ("target",), "hosts": ("target",), "host": ("target",),
    "if": ("when",), "only": ("when",), "retry": ("retries",), "variables": ("env",),
    "stages": ("stage",), "jobs": ("stage",), "actions": ("action",),
    "events": ("on",), "url": ("webhook",),
}
_DEFAULT_TIMEOUT = 30 * 60.0
_APPROVAL_TIMEOUT = 24 * 3600.0

_DURATION = re.compile(
    r"(?:(\d+(?:\.\d+)?)d)?\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?"
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A Unix user or group name as useradd/groupadd accept them (Debian's default NAME_REGEX, relaxed).
_ACCOUNT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?")
INPUT_VALUE_LIMIT = 4096  # characters of one input value: a value, not a file
_NAME = re.compile(r"[^/\\\x00-\x1f\x7f]+")
_ARTIFACT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_TARGET = re.compile(r"ssh://(?:[^@/\s]+@)?[^@/:\s]+(?::\d+)?/\S.*|file:///\S.*")
_BRACED = re.compile(r"(?<!\$)\{([A-Za-z_][A-Za-z0-9_]*)\}")
_MATRIX_REF = re.compile(r"\{matrix\.([^{}]*)\}")
_MATRIX_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(sorted(PLACEHOLDERS)) + r")\}")
_SYNTAX_AT = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)")


# --------------------------------------------------------------------------- public API


def parse(text: str, *, file: str = ".pipeline.toml", default_name: str = "pipeline") -> Pipeline:
    """The validated `Pipeline` of a `.pipeline.toml` text; `PipelineError` lists every problem."""
    text = text.removeprefix("\ufeff")  # editors on Windows like to add one; tomllib rejects it
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError([_syntax_problem(file, text, exc)]) from None
    report = _Report(file, _Scanner(text).scan())
    pipeline = _pipeline(report, data, default_name)
    if report.problems:
        raise PipelineError(report.problems)
    return pipeline


def key_lines(text: str) -> dict[Path, int]:
    """The line of every table header, key and array item of a valid TOML text, by its path
    (("stage", 0, "action", 1, "name") ...); what the editor pins problems to nodes with."""
    return _Scanner(text.removeprefix("\ufeff")).scan()


def parse_duration(value: str) -> float:
    """Seconds in a duration such as "90s", "10m", "2h", "1d" or "1h30m"."""
    text = value.strip() if isinstance(value, str) else ""
    match = _DURATION.fullmatch(text)
    if match is None or not any(match.groups()):
        hint = f' (no unit: did you mean "{text}s"?)' if re.fullmatch(r"\d+", text) else ""
        raise ValueError(
            f'bad duration "{value}"{hint}: write numbers with units d, h, m or s, '
            'e.g. "90s", "10m", "2h" or "1h30m"'
        )
    return sum(float(n) * unit for n, unit in zip(match.groups(), (86400, 3600, 60, 1)) if n)


def format_duration(seconds: float) -> str:
    """The inverse of parse_duration, in hours at most: 86400 -> "24h", 90 -> "1m30s", 2 -> "2s"."""
    left = round(seconds)
    parts = [f"{n}{unit}" for n, unit in ((left // 3600, "h"), (left % 3600 // 60, "m"), (left % 60, "s")) if n]
    return "".join(parts) or "0s"


def read_trigger(text: str) -> TriggerSpec | None:
    """The [trigger] of a pipeline text even if the rest is invalid; None if it cannot be read."""
    try:
        data = tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError:
        return None
    report = _Report("", {})
    trigger = _trigger(_Table(report, data, (), "").table("trigger", "[trigger]"))
    return None if report.problems else trigger


def ref_triggers(trigger: TriggerSpec, ref: str) -> bool:
    """Whether a push to the full ref name `ref` (refs/heads/..., refs/tags/...) starts a run."""
    if ref.startswith("refs/heads/"):
        return _any_glob(trigger.branches, ref[len("refs/heads/"):])
    if ref.startswith("refs/tags/"):
        return _any_glob(trigger.tags, ref[len("refs/tags/"):])
    return False


def paths_match(patterns: tuple[str, ...], changed: list[str]) -> bool:
    """Whether a changed path matches a path glob (`*` in a segment, `**` across); no patterns: True."""
    if not patterns:
        return True
    regexes = [path_regex(p) for p in patterns]
    return any(r.fullmatch(path) for path in changed for r in regexes)


def when_matches(when: When | None, branch: str | None, tag: str | None) -> bool:
    """Whether an action with this `when` runs for a run of `branch` or of `tag`.

    A condition on branches only does not run the action for a tag (and the other way
    round): "deploy when main" must never fire on a tag push.
    """
    if when is None or (when.branches is None and when.tags is None):
        return True
    if branch is not None and when.branches is not None and _any_glob(when.branches, branch):
        return True
    return tag is not None and when.tags is not None and _any_glob(when.tags, tag)


def placeholder_values(run_id: int, pipeline: str, repo: str, ref: str, sha: str,
                       environment: str = "") -> dict[str, str]:
    """The value of each of PLACEHOLDERS for one run (`branch` is empty for a tag)."""
    branch = ref[len("refs/heads/"):] if ref.startswith("refs/heads/") else ""
    return {"run": str(run_id), "pipeline": pipeline, "repo": repo, "ref": ref, "sha": sha,
            "short_sha": sha[:7], "branch": branch, "environment": environment}


def expand(template: str, values: dict[str, str]) -> str:
    """`template` with each known {placeholder} replaced; other braces (and absent values) left alone."""
    return _PLACEHOLDER.sub(lambda m: values.get(m[1], m[0]), template)


def _any_glob(patterns: Iterable[str], name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@functools.lru_cache(maxsize=256)
def path_regex(pattern: str) -> re.Pattern[str]:
    """Regex of a path glob, anchored at the repository root like GitHub Actions' `paths`."""
    p = pattern.lstrip("/")
    p = p + "**" if p.endswith("/") else p
    out, i = [], 0
    while i < len(p):
        if p.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif p.startswith("**", i):
            out.append(".*")
            i += 2
        elif p[i] in "*?":
            out.append("[^/]*" if p[i] == "*" else "[^/]")
            i += 1
        elif p[i] == "[" and "]" in p[i + 2:]:
            end = p.index("]", i + 2)
            body = p[i + 1:end].replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(p[i]))
            i += 1
    return re.compile("".join(out), re.DOTALL)


# --------------------------------------------------------------------------- line scanner

_KEY_PART = re.compile(r'([A-Za-z0-9_-]+)|"((?:[^"\\\n]|\\.)*)"|\'([^\'\n]*)\'')
_SCALAR = re.compile(r"[^,\]}#\n]*")
_STRINGS = {
    '"': re.compile(r'"(?:[^"\\\n]|\\.)*"?'),
    "'": re.compile(r"'[^'\n]*'?"),
    '"""': re.compile(r'"""(?:[^"\\]|\\.|"(?!""))*""""{0,2}', re.DOTALL),
    "'''": re.compile(r"'''(?:[^']|'(?!''))*''''{0,2}", re.DOTALL),
}


class _Scanner:
    """Records the line of every table header, key and array item of a valid TOML text."""

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.line = 1
        self.lines: dict[Path, int] = {}
        self.arrays: dict[Path, int] = {}  # array of tables -> number of its [[headers]] so far

    def scan(self) -> dict[Path, int]:
        table: Path = ()
        while self._skip(newlines=True):
            start = self.i
            if self.s[self.i] == "[":
                table = self._header()
            else:
                self._keyval(table)
            if self.i == start:  # not valid TOML after all: never loop forever
                self._advance(1)
        return self.lines

    def _advance(self, n: int) -> None:
        self.line += self.s.count("\n", self.i, self.i + n)
        self.i += n

    def _skip(self, newlines: bool) -> bool:
        """Skips blanks and comments (and newlines if asked); False at the end of the text."""
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in " \t\r" or (newlines and c == "\n"):
                self._advance(1)
            elif c == "#":
                end = self.s.find("\n", self.i)
                self.i = len(self.s) if end < 0 else end
            else:
                return True
        return False

    def _record(self, path: Path, line: int) -> None:
        for k in range(1, len(path)):
            self.lines.setdefault(path[:k], line)
        self.lines[path] = line

    def _header(self) -> Path:
        double = self.s.startswith("[[", self.i)
        self._advance(2 if double else 1)
        line, parts = self.line, self._key()
        self._advance(2 if double else 1)
        path: Path = ()
        for part in parts[:-1] if double else parts:
            path += (part,)
            if path in self.arrays:  # a dotted header goes into the latest [[element]]
                path += (self.arrays[path] - 1,)
        if double and parts:
            path += (parts[-1],)
            self.arrays[path] = self.arrays.get(path, 0) + 1
            path += (self.arrays[path] - 1,)
        self._record(path, line)
        return path

    def _key(self) -> list[str]:
        parts: list[str] = []
        while self._skip(newlines=False):
            match = _KEY_PART.match(self.s, self.i)
            if match is None:
                break
            parts.append(next(g for g in match.groups() if g is not None))
            self._advance(match.end() - self.i)
            self._skip(newlines=False)
            if not self.s.startswith(".", self.i):
                break
            self._advance(1)
        return parts

    def _keyval(self, table: Path) -> bool:
        line, parts = self.line, self._key()
        self._skip(newlines=False)
        if not parts or not self.s.startswith("=", self.i):
            return False
        path = table + tuple(parts)
        self._record(path, line)
        self._advance(1)
        self._skip(newlines=False)
        self._value(path)
        return True

    def _value(self, path: Path) -> None:
        s, i = self.s, self.i
        if s.startswith("[", i):
            self._array(path)
        elif s.startswith("{", i):
            self._inline(path)
        else:
            quote = s[i:i + 3] if s.startswith(('"""', "'''"), i) else s[i:i + 1]
            match = (_STRINGS.get(quote) or _SCALAR).match(s, i)
            self._advance(max(match.end() - i, 1) if match else 1)

    def _array(self, path: Path) -> None:
        self._advance(1)
        index = 0
        while self._skip(newlines=True):
            if self.s.startswith("]", self.i):
                self._advance(1)
                return
            self._record(path + (index,), self.line)
            self._value(path + (index,))
            self._skip(newlines=True)
            if self.s.startswith(",", self.i):
                self._advance(1)
                index += 1
            elif not self.s.startswith("]", self.i):
                return

    def _inline(self, path: Path) -> None:
        self._advance(1)
        while self._skip(newlines=True):
            if self.s.startswith("}", self.i):
                self._advance(1)
                return
            if not self._keyval(path):
                return
            self._skip(newlines=True)
            if self.s.startswith(",", self.i):
                self._advance(1)
            elif not self.s.startswith("}", self.i):
                return


# --------------------------------------------------------------------------- validation helpers


class _Report:
    """Collects problems, each at the most precise line known for its place."""

    def __init__(self, file: str, lines: dict[Path, int]) -> None:
        self.file = file
        self.lines = lines
        self.problems: list[Problem] = []
        # (stage index, label, action, path) of every action parsed, for the artifact checks
        self.actions: list[tuple[int, str, ActionSpec, Path]] = []
        # artifact name of a matrix action as written -> the names of its copies' artifacts
        self.matrix_outputs: dict[str, tuple[str, ...]] = {}
        self._plugins: frozenset[str] | None = None

    def line(self, path: Path) -> int:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return 0

    def add(self, path: Path, message: str) -> None:
        self.problems.append(Problem(self.file, self.line(path), message))

    def plugin_types(self) -> frozenset[str]:
        if self._plugins is None:
            self._plugins = plugin_types()
        return self._plugins


def plugin_types() -> frozenset[str]:
    """Action types of installed plugins (entry point group `gitpipe.actions`)."""
    # slow to import: only done for an action type that is not built in
    from importlib.metadata import entry_points

    return frozenset(ep.name for ep in entry_points(group="gitpipe.actions"))


class _Table:
    """One TOML table being validated: getters report a wrong value and return a default."""

    def __init__(self, report: _Report, data: dict[str, Any], path: Path, where: str) -> None:
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
            self.problem(f'unknown key "{key}"{_suggest(key, allowed)}', key)

    def get(self, key: str, types: tuple[type, ...], expected: str) -> Any:
        """The value of `key` if it has one of `types`; None if absent or of another type."""
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            hint = f' (write ["{value}"])' if "array" in expected and isinstance(value, str) else ""
            self.problem(f'"{key}" must be {expected}, not {_describe(value)}{hint}', key)
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
        if value is not None and (not _NAME.fullmatch(value) or value in (".", "..")):
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
                self.problem(f'"{key}" must hold strings only, not {_describe(item)}', key, index)
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
            self.problem(f'"{key}" must be one of {allowed}, not "{value}"{_suggest(value, options)}', key)
            return default
        return default if value is None else value

    def table(self, key: str, where: str) -> _Table | None:
        value = self.get(key, (dict,), "a table")
        return None if value is None else _Table(self.report, value, self.path + (key,), where)

    def tables(self, key: str, header: str) -> list[tuple[int, dict[str, Any]]]:
        """The items of an array of tables, each with its index; other items are reported."""
        value = self.get(key, (list,), f"an array of tables (write {header} headers)")
        items = []
        for index, item in enumerate(value or ()):
            if isinstance(item, dict):
                items.append((index, item))
            else:
                self.problem(f'"{key}" must hold tables only, not {_describe(item)}', key, index)
        return items


def _describe(value: Any) -> str:
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


def _suggest(word: str, choices: Iterable[str]) -> str:
    import difflib  # only needed when something is wrong

    options = list(choices)
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if not close:
        close = [c for c in _SYNONYMS.get(word.lower(), ()) if c in options][:1]
    return f' (did you mean "{close[0]}"?)' if close else ""


def _syntax_problem(file: str, text: str, exc: tomllib.TOMLDecodeError) -> Problem:
    message = str(exc)
    match = _SYNTAX_AT.search(message)
    if match is None:
        return Problem(file, 0, f"invalid TOML: {message}")
    where = f" (column {match[2]})" if match[1] else " (at the end of the file)"
    line = int(match[1]) if match[1] else text.count("\n") + 1
    return Problem(file, line, f"invalid TOML: {message[:match.start()]}{message[match.end():]}{where}")


def _relative_problem(path: str) -> str | None:
    """Why `path` is not a path relative to the worktree, or None if it is one."""
    if not path.strip():
        return "must not be empty"
    if path.startswith(("/", "\\", "~")) or re.match(r"[A-Za-z]:", path):
        return "must be relative to the worktree, not absolute"
    if ".." in re.split(r"[/\\]", path):
        return 'must not contain ".." (it would reach outside the worktree)'
    return None


def _check_placeholders(t: _Table, key: str, text: str | None, *sub: str | int) -> None:
    for match in _BRACED.finditer(text or ""):
        if match[1] not in PLACEHOLDERS:
            known = ", ".join(f"{{{p}}}" for p in sorted(PLACEHOLDERS))
            suggestion = _suggest(match[1], PLACEHOLDERS)
            t.problem(f'"{key}": unknown placeholder "{match[0]}"{suggestion}; known: {known}', key, *sub)


# --------------------------------------------------------------------------- pipeline, trigger, env


def _pipeline(report: _Report, data: dict[str, Any], default_name: str) -> Pipeline:
    top = _Table(report, data, (), "")
    for key in top.unknown_keys(_TOP_KEYS):
        noun = "table" if isinstance(data[key], (dict, list)) else "key"
        top.problem(f'unknown {noun} "{key}"{_suggest(key, _TOP_KEYS)}', key)
    name, timeout, network, runs_on = default_name, None, None, None
    head = top.table("pipeline", "[pipeline]")
    if head is not None:
        head.check_keys(_PIPELINE_KEYS)
        name = head.name("name", "") or default_name
        timeout = head.duration("timeout", None, positive=True)
        network = head.get("network", (bool,), "true or false")
        runs_on = _labels(head)
    pipeline = Pipeline(
        name=name,
        timeout=timeout,
        network=network,
        runs_on=runs_on or (),
        trigger=_trigger(top.table("trigger", "[trigger]")),
        env=_env(top.table("env", "[env]")),
        stages=_stages(top),
        notify=tuple(_notify(report, item, i) for i, item in top.tables("notify", "[[notify]]")),
        inputs=_inputs(top.table("inputs", "[inputs]")),
    )
    _check_artifacts(report)
    return _expand_inputs(report, pipeline)


def _trigger(t: _Table | None) -> TriggerSpec:
    if t is None:
        return TriggerSpec()
    t.check_keys(_TRIGGER_KEYS)
    branches = t.strings("branches")
    schedule = _schedule(t)
    return TriggerSpec(
        branches=("*",) if branches is None else branches,
        tags=t.strings("tags") or (),
        paths=t.strings("paths") or (),
        schedule=schedule,
        superseded=t.choice("superseded", SUPERSEDED, "queue"),
    )


def _schedule(t: _Table) -> tuple[ScheduleSpec, ...]:
    """`schedule`: cron strings (the default branch) or `{ cron = "...", branch = "..." }` tables."""
    value = t.get("schedule", (list,), "an array of cron strings")
    found = []
    for index, item in enumerate(value or ()):
        if isinstance(item, dict):
            entry = _Table(t.report, item, t.path + ("schedule", index), f'{t.where}: "schedule" item {index + 1}')
            entry.check_keys(_SCHEDULE_KEYS)
            cron, branch = entry.string("cron"), entry.string("branch")
            if "cron" not in item:
                entry.problem('missing "cron" (write { cron = "0 3 * * *", branch = "main" })')
            if cron is None or (branch is None and "branch" in item):
                continue
        elif isinstance(item, str):
            cron, branch = item, None
        else:
            t.problem(f'"schedule" must hold cron strings or {{ cron, branch }} tables, not {_describe(item)}',
                      "schedule", index)
            continue
        problem = _cron_problem(cron)
        if problem:
            t.problem(f'"schedule": {problem}', "schedule", index)
            continue
        found.append(ScheduleSpec(cron, branch))
    return tuple(found)


def _cron_problem(line: str) -> str | None:
    """Why `line` is not a cron line croniter accepts, or None."""
    from gitpipe.cron import croniter  # slow (croniter); only with a schedule

    try:
        croniter(line)
    except (ValueError, KeyError) as exc:
        return (
            f'bad cron line "{line}" ({exc}); write minute hour day month weekday, '
            'e.g. "0 3 * * *" for 03:00 UTC every day'
        )
    return None


def _env(t: _Table | None) -> tuple[tuple[str, str], ...]:
    if t is None:
        return ()
    pairs = []
    for key, value in t.data.items():
        if not _ENV_NAME.fullmatch(key):
            t.problem(f'"{key}" is not a valid environment variable name (letters, digits, _)', key)
        elif isinstance(value, bool):
            pairs.append((key, "true" if value else "false"))
        elif isinstance(value, str) and "\0" in value:
            t.problem(f'"{key}" holds a NUL character (\\u0000), which no environment variable can hold', key)
        elif isinstance(value, (str, int, float)):
            pairs.append((key, str(value)))
        else:
            t.problem(f'"{key}" must be a string (or a number or boolean), not {_describe(value)}', key)
    return tuple(pairs)


def _inputs(t: _Table | None) -> tuple[InputSpec, ...]:
    """`[inputs.NAME]` tables: what `gitpipe run --var NAME=VALUE` may set."""
    if t is None:
        return ()
    specs: list[InputSpec] = []
    seen: dict[str, str] = {}
    for name, value in t.data.items():
        where = f'input "{name}"'
        if not _ENV_NAME.fullmatch(name):
            t.problem(f'input name "{name}" may hold only letters, digits and "_" (it becomes '
                      f"$GITPIPE_INPUT_<NAME>)", name)
            continue
        if name.upper() in seen:
            t.problem(f'input "{name}" and input "{seen[name.upper()]}" would both be '
                      f"$GITPIPE_INPUT_{name.upper()}", name)
            continue
        seen[name.upper()] = name
        if not isinstance(value, dict):
            t.problem(f'{where} must be a table ([inputs.{name}] with default, description, options), '
                      f"not {_describe(value)}", name)
            continue
        it = _Table(t.report, value, t.path + (name,), f"[inputs.{name}]")
        it.check_keys(_INPUT_KEYS)
        default, options = it.string("default"), it.strings("options") or ()
        for key, text in (("default", default), *(("options", o) for o in options)):
            if text is not None and "\0" in text:  # it becomes $GITPIPE_INPUT_<NAME>: execve refuses it
                it.problem(f'"{key}" holds a NUL character (\\u0000), which no environment variable can hold', key)
        if "options" in value and not options and isinstance(value["options"], list):
            it.problem('"options" must list at least one value', "options")
        if default is not None and options and default not in options:
            it.problem(f'"default" "{default}" is not one of its options ({", ".join(options)})', "default")
        specs.append(InputSpec(name=name, line=t.report.line(t.path + (name,)), default=default,
                               description=it.string("description") or "", options=options))
    return tuple(specs)


def input_values(pipe: Pipeline, given: dict[str, str], *, manual: bool) -> tuple[tuple[str, str], ...]:
    """A run's inputs: the given values over the defaults, checked; ValueError lists every problem.

    `manual`: a run started by hand must name every required input. A push or a schedule sets
    none, so an input without a default is empty ("") there.
    """
    declared = {i.name: i for i in pipe.inputs}
    problems = []
    for name in given:
        if name not in declared:
            known = ", ".join(declared) or "none: add [inputs.NAME] tables to the pipeline"
            problems.append(f'unknown input "{name}"{_suggest(name, declared)} (inputs of {pipe.name}: {known})')
    values = []
    for spec in pipe.inputs:
        value = given.get(spec.name, spec.default)
        if value is None:
            if manual:
                problems.append(f'input "{spec.name}" is required (it has no default): '
                                f"add --var {spec.name}=VALUE")
            value = ""
        elif spec.options and value not in spec.options:
            problems.append(f'input "{spec.name}": "{value}" is not one of its options: {", ".join(spec.options)}')
        elif len(value) > INPUT_VALUE_LIMIT:
            problems.append(f'input "{spec.name}": the value is longer than {INPUT_VALUE_LIMIT} characters')
        values.append((spec.name, value))
    if problems:
        raise ValueError("; ".join(problems))
    return tuple(values)


def _approvers(t: _Table) -> tuple[str, ...] | None:
    """Who may decide an approval: Unix user names and "group:NAME" entries."""
    approvers = t.strings("approvers")
    if approvers is None:
        return None
    if not approvers and isinstance(t.data.get("approvers"), list):
        t.problem('"approvers" must name at least one user or "group:NAME" (leave it out to let '
                  "whoever can open the gitpipe home decide)", "approvers")
    for index, entry in enumerate(approvers):
        name = entry.removeprefix("group:")
        if not _ACCOUNT.fullmatch(name):
            t.problem(f'approver "{entry}" is not a Unix user name or "group:NAME"', "approvers", index)
    return approvers


def _notify(report: _Report, data: dict[str, Any], index: int) -> NotifySpec:
    path: Path = ("notify", index)
    t = _Table(report, data, path, f"notify #{index + 1}")
    t.check_keys(_NOTIFY_KEYS)
    events = t.strings("on")
    choices = ", ".join(EVENTS)
    if events is None and "on" not in data:
        t.problem(f'missing required key "on" (a list of events: {choices})')
    elif events == ():
        t.problem(f'"on" must list at least one event ({choices})', "on")
    for k, event in enumerate(events or ()):
        if event not in EVENTS:
            t.problem(f'unknown event "{event}"{_suggest(event, EVENTS)} (events: {choices})', "on", k)
    webhook, command = t.string("webhook"), t.string("command")
    if ("webhook" in data) == ("command" in data):
        t.problem('needs exactly one of "webhook" or "command"', "command")
    if webhook and not webhook.startswith(("http://", "https://")):
        t.problem(f'"webhook" must be an http:// or https:// URL, not "{webhook}"', "webhook")
    _check_placeholders(t, "command", command)
    return NotifySpec(on=events or (), line=report.line(path), webhook=webhook, command=command)


# --------------------------------------------------------------------------- stages and actions


def _label(noun: str, name: Any, index: int) -> str:
    return f'{noun} "{name}"' if isinstance(name, str) and name.strip() else f"{noun} #{index + 1}"


def _stages(top: _Table) -> tuple[StageSpec, ...]:
    if "stage" not in top.data or top.data["stage"] == []:  # `stage = []` has no stages either
        top.problem("no stages: add at least one [[stage]] with a [[stage.action]] under it", "stage")
        return ()
    stages: list[StageSpec] = []
    seen: dict[str, int] = {}
    for index, data in top.tables("stage", "[[stage]]"):
        stage = _stage(top.report, data, index)
        if stage.name in seen:
            top.report.add(
                ("stage", index, "name"),
                f'stage "{stage.name}": duplicate stage name (first at line {seen[stage.name]})',
            )
        elif stage.name:
            seen[stage.name] = stage.line
        stages.append(stage)
    return tuple(stages)


def _stage(report: _Report, data: dict[str, Any], index: int) -> StageSpec:
    path: Path = ("stage", index)
    label = _label("stage", data.get("name"), index)
    t = _Table(report, data, path, label)
    t.check_keys(_STAGE_KEYS)
    name = t.name("name", "every stage needs a name") or ""
    if not data.get("action"):
        t.problem("no actions: add a [[stage.action]] under this [[stage]]")
    actions: list[ActionSpec] = []
    seen: dict[str, int] = {}
    for j, item in t.tables("action", "[[stage.action]]"):
        action_label = f"{label}, {_label('action', item.get('name'), j)}"
        for action in _action(report, item, path + ("action", j), action_label, index):
            if action.name in seen:
                report.add(
                    path + ("action", j, "name"),
                    f'{label}: duplicate action name "{action.name}" (first at line {seen[action.name]})',
                )
            elif action.name:
                seen[action.name] = action.line
            actions.append(action)
    return StageSpec(name=name, line=report.line(path), actions=tuple(actions))


def _action(report: _Report, data: dict[str, Any], path: Path, label: str,
            stage_index: int) -> list[ActionSpec]:
    """The action of a [[stage.action]] table; one copy per combination of its `matrix`."""
    t = _Table(report, data, path, label)
    kind = _action_type(t)
    _check_action_keys(t, kind)
    fields = _common_fields(t, kind)
    if kind == "run":
        fields["run"] = t.string("run", "the bash script this action runs")
        fields["network"] = t.get("network", (bool,), "true or false")
        fields["cache"] = _caches(t)
        fields["runs_on"] = _labels(t)
    elif kind == "approval":
        fields["message"] = t.string("message")
        _check_placeholders(t, "message", fields["message"])
        fields["approvers"] = _approvers(t)
    elif kind == "deploy":
        fields.update(_deploy_fields(t))
    elif kind is not None:  # a plugin: its own keys, but `network` and `cache` are the sandbox's
        fields["network"] = t.get("network", (bool,), "true or false")
        fields["cache"] = _caches(t)
        fields["runs_on"] = _labels(t)
        own = {k.name for k in keys.action_keys(kind)}
        fields["extra"] = tuple((k, v) for k, v in data.items() if k not in own)
    spec = ActionSpec(line=report.line(path), **fields)
    copies = _matrix_copies(t, spec, () if kind in ("approval", "deploy") else _matrix(t))
    for copy in copies:
        report.actions.append((stage_index, label, copy, path))
    return copies


_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _labels(t: _Table) -> tuple[str, ...] | None:
    """`runs_on`: worker labels (letters, digits, ".", "_", "-"), sorted and unique; None if absent."""
    labels = t.strings("runs_on")
    if labels is None:
        return None
    for label in labels:
        if not _LABEL.fullmatch(label):
            t.problem(f'"runs_on": label "{label}" may hold only letters, digits, ".", "_" and "-"', "runs_on")
    return tuple(sorted(set(labels)))


def _action_type(t: _Table) -> str | None:
    """The action's type: built in or from a plugin; None if it is wrong (and reported)."""
    kind = t.string("type")
    if "type" not in t.data:
        return "run"
    if kind is None or kind in BUILTIN_TYPES:
        return kind
    plugins = t.report.plugin_types()
    if kind in plugins:
        return kind
    suggestion = _suggest(kind, BUILTIN_TYPES + tuple(plugins)).replace(" (", "; ").rstrip(")")
    t.problem(f'unknown action type "{kind}" (built-in types: {", ".join(BUILTIN_TYPES)}){suggestion}', "type")
    return None


def _check_action_keys(t: _Table, kind: str | None) -> None:
    """Unknown keys of a built-in type (a plugin's own keys go to `extra`, unchecked)."""
    if kind is None or kind not in _TYPE_KEYS:
        return
    allowed = _COMMON_KEYS + _TYPE_KEYS[kind]
    for key in t.unknown_keys(allowed):
        owner = next((k for k, names in _TYPE_KEYS.items() if key in names), None)
        if key == "run":
            message = _RUN_NOT_ALLOWED[kind]
        elif key == "outputs" and kind == "approval":
            message = 'an approval cannot have "outputs": it produces no files'
        elif key == "allow_failure" and kind == "approval":
            message = ('an approval cannot have "allow_failure": a rejection would let the run go on '
                       "(an approval is a gate; leave it out, or drop the approval)")
        elif key == "matrix":
            message = (f'"matrix" is for run actions, not "{kind}" (an approval or a deploy runs once; '
                       "give each environment a deploy action of its own)")
        elif owner:
            message = f'"{key}" is only for actions of type "{owner}", not "{kind}"'
        else:
            message = f'unknown key "{key}"{_suggest(key, allowed)}'
        t.problem(message, key)


def _common_fields(t: _Table, kind: str | None) -> dict[str, Any]:
    when = t.table("when", t.where)
    return {
        "name": t.name("name", "every action needs a name") or "",
        "type": kind or "run",
        "run_order": t.integer("run_order", 1, minimum=1),
        "inputs": t.strings("inputs") or (),
        "outputs": _outputs(t) if kind != "approval" else (),
        "timeout": t.duration(
            "timeout", _APPROVAL_TIMEOUT if kind == "approval" else _DEFAULT_TIMEOUT, positive=True
        ),
        "retries": t.integer("retries", 0, minimum=0),
        "env": _env(t.table("env", t.where + ", env")),
        "secrets": _secrets(t),
        "when": None if when is None else _when(when),
        "allow_failure": bool(t.get("allow_failure", (bool,), "true or false")),
    }


def _outputs(t: _Table) -> tuple[tuple[str, tuple[str, ...]], ...]:
    table = t.table("outputs", t.where)
    result = []
    for name, value in table.data.items() if table else ():
        globs = value if isinstance(value, list) else [value]
        if not _ARTIFACT.fullmatch(name):
            t.problem(f'artifact name "{name}" may hold only letters, digits, ".", "_" and "-"', "outputs", name)
        if not globs or not all(isinstance(g, str) for g in globs):
            t.problem(
                f'output "{name}" must be a glob or an array of globs, not {_describe(value)}', "outputs", name
            )
            continue
        for k, glob in enumerate(globs):
            problem = _relative_problem(glob)
            if problem:
                sub = (k,) if isinstance(value, list) else ()
                t.problem(f'output "{name}": glob "{glob}" {problem}', "outputs", name, *sub)
        result.append((name, tuple(globs)))
    return tuple(result)


def _caches(t: _Table) -> tuple[CacheSpec, ...]:
    """`cache = [{ key = [...], paths = [...] }]`: key globs and paths inside the worktree or under ~."""
    out: list[CacheSpec] = []
    seen: dict[str, int] = {}
    for index, item in t.tables("cache", "{ key = [...], paths = [...] }"):
        c = _Table(t.report, item, t.path + ("cache", index), f"{t.where}, cache {index + 1}")
        c.check_keys(_CACHE_KEYS)
        globs = c.strings("key") or ()
        for k, glob in enumerate(globs):
            problem = _relative_problem(glob)
            if problem:
                c.problem(f'key glob "{glob}" {problem}', "key", k)
        paths = c.strings("paths")
        if paths is None and "paths" not in item:
            c.problem('missing required key "paths" (what to keep, e.g. paths = [".venv", "~/.cache/pip"])')
        elif paths is not None and not paths:
            c.problem('"paths" must name at least one path, e.g. [".venv"]', "paths")
        good = []
        for k, path in enumerate(paths or ()):
            problem, norm = _cache_path_problem(path)
            if problem:
                c.problem(f'path "{path}" {problem}', "paths", k)
                continue
            clash = next((p for p in seen if _nested(p, norm)), None)
            if clash is not None:
                c.problem(f'path "{path}" overlaps "{clash}", already cached by this action; '
                          "name each directory once", "paths", k)
                continue
            seen[norm] = index
            good.append(norm)
        out.append(CacheSpec(key=tuple(globs), paths=tuple(good)))
    return tuple(out)


def _cache_path_problem(path: str) -> tuple[str | None, str]:
    """Why a cache path is not inside the worktree or under ~ (None if it is), and its normal form."""
    import posixpath

    outside = "must be inside the worktree (relative) or under ~ (the attempt's home), e.g. \".venv\" or \"~/.cache/pip\""
    if not path.strip():
        return "must not be empty", path
    if path.startswith("~"):
        if path != "~" and not path.startswith("~/"):
            return f"{outside}; ~user is not allowed", path
        rest = path[2:]
        if ".." in rest.split("/"):
            return 'must not contain ".." (it would reach outside the home)', path
        norm = posixpath.normpath(rest) if rest.strip("/") else ""
        if norm in ("", "."):
            return "must name a directory under ~, not the whole home (e.g. \"~/.cache/pip\")", path
        return None, "~/" + norm
    if path.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", path):
        return outside, path
    problem = _relative_problem(path)
    if problem:
        return problem, path
    norm = posixpath.normpath(path)
    if norm == "." or norm == ".git" or norm.startswith(".git/"):
        return "must name a directory inside the worktree, not the worktree itself or its .git", path
    return None, norm


def _nested(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _secrets(t: _Table) -> tuple[str, ...]:
    secrets = t.strings("secrets") or ()
    for index, secret in enumerate(secrets):
        if not _ENV_NAME.fullmatch(secret):
            t.problem(f'secret "{secret}" is not a valid environment variable name', "secrets", index)
    return secrets


def _when(t: _Table) -> When | None:
    t.check_keys(_WHEN_KEYS)
    branches, tags = t.strings("branches"), t.strings("tags")
    return None if branches is None and tags is None else When(branches=branches, tags=tags)


Combo = tuple[tuple[str, str], ...]


def _matrix(t: _Table) -> tuple[Combo, ...]:
    """Every combination of the action's `matrix` values, in the order written; () if none or wrong."""
    table = t.table("matrix", t.where)
    if table is None:
        return ()
    example = 'e.g. matrix = { python = ["3.11", "3.12"] }'
    before = len(t.report.problems)
    if not table.data:
        t.problem(f'"matrix" is empty: give it at least one key with an array of values, {example}', "matrix")
        return ()
    axes: list[tuple[str, list[str]]] = []
    for key, values in table.data.items():
        where = ("matrix", key)
        if not _MATRIX_KEY.fullmatch(key):
            t.problem(f'matrix key "{key}" may hold only letters, digits and "_" (it becomes the '
                      "environment variable MATRIX_<KEY>)", *where)
        if not isinstance(values, list) or not values:
            what = "an empty array" if values == [] else _describe(values)
            t.problem(f'matrix "{key}" must be a non-empty array of strings, not {what} ({example})', *where)
            continue
        strings: list[str] = []
        for index, value in enumerate(values):
            if not isinstance(value, str):
                t.problem(f'matrix "{key}" must hold strings only, not {_describe(value)} (write the values '
                          'in quotes: unquoted, TOML reads 3.10 as the number 3.1)', *where, index)
            elif not value.strip() or not _NAME.fullmatch(value):
                t.problem(f'matrix "{key}": value "{value}" must not be empty or hold "/", "\\" or '
                          "control characters (it goes into the action's name)", *where, index)
            elif value in strings:
                t.problem(f'matrix "{key}": value "{value}" is listed twice', *where, index)
            else:
                strings.append(value)
        axes.append((key, strings))
    total = 1
    for _, strings in axes:
        total *= len(strings)
    if total > MATRIX_LIMIT:
        sizes = " x ".join(str(len(v)) for _, v in axes)
        t.problem(f'"matrix" makes {total} copies of this action ({sizes}); at most {MATRIX_LIMIT} are '
                  "allowed (split it into several actions)", "matrix")
        return ()
    if len(t.report.problems) > before:
        return ()
    keys = [k for k, _ in axes]
    return tuple(tuple(zip(keys, combo)) for combo in itertools.product(*(v for _, v in axes)))


def _matrix_copies(t: _Table, spec: ActionSpec, combos: tuple[Combo, ...]) -> list[ActionSpec]:
    """The action itself, or one copy per matrix combination, each with its own name and artifacts."""
    refs = _MATRIX_REF.findall(spec.name)
    if not combos:
        if refs and "matrix" not in t.data:
            t.problem(f'"name" uses {{matrix.{refs[0]}}} but the action has no "matrix"', "name")
        return [spec]
    keys = [k for k, _ in combos[0]]
    for ref in dict.fromkeys(refs):
        if ref not in keys:
            t.problem(f'"name": unknown placeholder "{{matrix.{ref}}}"{_suggest(ref, keys)}; the matrix '
                      f'keys are {", ".join(keys)}', "name")
            return [spec]
    copies: dict[str, ActionSpec] = {}
    for combo in combos:
        values = dict(combo)
        name = (_MATRIX_REF.sub(functools.partial(_matrix_value, values), spec.name) if refs
                else f"{spec.name} ({', '.join(values.values())})")
        if name in copies:
            missing = ", ".join(f"{{matrix.{k}}}" for k in keys if k not in refs)
            t.problem(f'two copies of this matrix action would both be named "{name}": put every matrix '
                      f"key in the name (missing: {missing})", "name")
            return list(copies.values())
        suffix = "-".join(re.sub(r"[^A-Za-z0-9._-]", "_", v) for v in values.values())
        outputs = tuple((f"{art}-{suffix}", globs) for art, globs in spec.outputs)
        copies[name] = replace(spec, name=name, group=spec.name, matrix=combo, outputs=outputs)
    for (art, _), i in zip(spec.outputs, itertools.count()):
        t.report.matrix_outputs[art] = tuple(c.outputs[i][0] for c in copies.values())
    return list(copies.values())


def _matrix_value(values: dict[str, str], match: re.Match[str]) -> str:
    return values[match[1]]


def _expand_inputs(report: _Report, pipe: Pipeline) -> Pipeline:
    """A consumer of a matrix action's artifact gets the artifacts of every copy."""
    if not report.matrix_outputs:
        return pipe

    def inputs(spec: ActionSpec) -> tuple[str, ...]:
        names = (report.matrix_outputs.get(n, (n,)) for n in spec.inputs)
        return tuple(dict.fromkeys(x for group in names for x in group))

    stages = tuple(replace(s, actions=tuple(replace(a, inputs=inputs(a)) for a in s.actions))
                   for s in pipe.stages)
    return replace(pipe, stages=stages)


def _deploy_fields(t: _Table) -> dict[str, Any]:
    source = t.string("source") or "."
    problem = _relative_problem(source)
    if problem:
        t.problem(f'"source" {problem}', "source")
    _check_placeholders(t, "source", source)
    shared = t.strings("shared") or ()
    for index, path in enumerate(shared):
        problem = _relative_problem(path)
        if problem:
            t.problem(f'"shared" path "{path}" {problem}', "shared", index)
    return {
        "environment": t.name("environment", 'the environment this deploys to, e.g. "staging"'),
        "targets": _targets(t),
        "source": source,
        "keep": t.integer("keep", 5, minimum=1),
        "shared": shared,
        "before_switch": t.string("before_switch"),
        "after_switch": t.string("after_switch"),
        "healthcheck": t.string("healthcheck"),
        "healthcheck_retries": t.integer("healthcheck_retries", 3, minimum=1),
        "monitor": t.duration("monitor", 0.0),
        "monitor_interval": t.duration("monitor_interval", 10.0, positive=True),
        "strategy": t.choice("strategy", STRATEGIES, "rolling"),
    }


def _targets(t: _Table) -> tuple[str, ...]:
    value = t.data.get("target")
    shape = "ssh://[user@]host[:port]/path or file:///absolute/path"
    if value is None:
        t.problem(f'missing required key "target" ({shape}, or an array of them)')
        return ()
    urls = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    if not urls or not all(isinstance(u, str) for u in urls):
        t.problem(f'"target" must be a URL or a non-empty array of URLs, not {_describe(value)}', "target")
        return ()
    for index, url in enumerate(urls):
        sub = (index,) if isinstance(value, list) else ()
        if not _TARGET.fullmatch(url):
            t.problem(f'target "{url}" must look like {shape}', "target", *sub)
        _check_placeholders(t, "target", url, *sub)
    return tuple(urls)


def _check_artifacts(report: _Report) -> None:
    """Artifact names are unique; every input is an output of an action that runs earlier."""
    producers: dict[str, tuple[int, int, str, Path]] = {}  # artifact -> (stage, run_order, label, path)
    for stage, label, spec, path in report.actions:
        for name, _ in spec.outputs:
            if name in producers:
                first = producers[name][2]
                report.add(path + ("outputs", name), f'{label}: artifact "{name}" is already an output of {first}')
            else:
                producers[name] = (stage, spec.run_order, label, path)
    for group, copies in report.matrix_outputs.items():
        copy = producers.get(copies[0]) if copies else None
        if copy is None:
            continue
        if group in producers:
            report.add(copy[3] + ("outputs", group), f'{copy[2]}: artifact "{group}" (of every matrix copy) '
                       f"is already an output of {producers[group][2]}")
        else:
            producers[group] = copy  # `inputs = ["group"]` takes the artifacts of every copy
    for stage, label, spec, path in report.actions:
        for index, name in enumerate(spec.inputs):
            message = _input_problem(producers, name, stage, spec.run_order, path)
            if message:
                report.add(path + ("inputs", index), f'{label}: input "{name}" {message}')


def _input_problem(
    producers: dict[str, tuple[int, int, str, Path]], name: str, stage: int, run_order: int, path: Path
) -> str | None:
    if name not in producers:
        return f"is not an output of any action{_suggest(name, producers)}"
    p_stage, p_order, p_label, p_path = producers[name]
    if (p_stage, p_order) < (stage, run_order):
        return None
    if p_path == path:
        return "is an output of this same action"
    if (p_stage, p_order) == (stage, run_order):
        return f"comes from {p_label}, which runs in parallel with this one (give this action a higher run_order)"
    return f"comes from {p_label}, which runs later (an input must come from an earlier stage or run_order)"
