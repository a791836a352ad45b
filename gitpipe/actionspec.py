"""One `[[stage.action]]` table -> its validated `ActionSpec` (one per `matrix` combination).

Part of the validator (gitpipe.pipeline walks the stages and calls `action_specs` for each
action table; the checks across actions, such as artifacts, stay there). Which keys each
action type takes comes from gitpipe/keys.py. Standard library only, as the validator.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import replace
from typing import Any

from gitpipe import keys
from gitpipe.matching import PLACEHOLDERS
from gitpipe.models import ActionSpec, CacheSpec, When
from gitpipe.tomlcheck import ENV_NAME, SAFE_NAME, Report, Table, describe, relative_problem, suggest
from gitpipe.tomllines import KeyPath

BUILTIN_TYPES = keys.ACTION_TYPES
STRATEGIES = keys.find("action", "strategy").choices  # type: ignore[union-attr]
_WHEN_KEYS = keys.names("when")
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
_DEFAULT_TIMEOUT = 30 * 60.0
_APPROVAL_TIMEOUT = 24 * 3600.0
# A Unix user or group name as useradd/groupadd accept them (Debian's default NAME_REGEX, relaxed).
_ACCOUNT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?")
_ARTIFACT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_TARGET = re.compile(r"ssh://(?:[^@/\s]+@)?[^@/:\s]+(?::\d+)?/\S.*|file:///\S.*")
_BRACED = re.compile(r"(?<!\$)\{([A-Za-z_][A-Za-z0-9_]*)\}")
_MATRIX_REF = re.compile(r"\{matrix\.([^{}]*)\}")
_MATRIX_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
Combo = tuple[tuple[str, str], ...]


class PipelineReport(Report):
    """A Report that also keeps what the checks across actions need (gitpipe.pipeline)."""

    def __init__(self, file: str, lines: dict[KeyPath, int]) -> None:
        super().__init__(file, lines)
        # (stage index, label, action, path) of every action parsed, for the artifact checks
        self.actions: list[tuple[int, str, ActionSpec, KeyPath]] = []
        # artifact name of a matrix action as written -> the names of its copies' artifacts
        self.matrix_outputs: dict[str, tuple[str, ...]] = {}
        self._plugins: frozenset[str] | None = None

    def plugin_types(self) -> frozenset[str]:
        """Action types of installed plugins, looked up once per file."""
        if self._plugins is None:
            self._plugins = plugin_types()
        return self._plugins


def plugin_types() -> frozenset[str]:
    """Action types of installed plugins (plugins.py reads them)."""
    from gitpipe import plugins  # only for an action type that is not built in

    return plugins.types()


def action_specs(report: PipelineReport, data: dict[str, Any], path: KeyPath, label: str,
                 stage_index: int) -> list[ActionSpec]:
    """The action of a [[stage.action]] table; one copy per combination of its `matrix`."""
    t = Table(report, data, path, label)
    kind = _action_type(t, report)
    _check_action_keys(t, kind)
    fields = _common_fields(t, kind)
    if kind == "run":
        fields["run"] = t.string("run", "the bash script this action runs")
        fields["network"] = t.get("network", (bool,), "true or false")
        fields["cache"] = _caches(t)
        fields["runs_on"] = labels(t)
    elif kind == "approval":
        fields["message"] = t.string("message")
        check_placeholders(t, "message", fields["message"])
        fields["approvers"] = _approvers(t)
    elif kind == "deploy":
        fields.update(_deploy_fields(t))
    elif kind is not None:  # a plugin: its own keys, but `network` and `cache` are the sandbox's
        fields["network"] = t.get("network", (bool,), "true or false")
        fields["cache"] = _caches(t)
        fields["runs_on"] = labels(t)
        own = {k.name for k in keys.action_keys(kind)}
        fields["extra"] = tuple((k, v) for k, v in data.items() if k not in own)
    spec = ActionSpec(line=report.line(path), **fields)
    copies = _matrix_copies(t, report, spec, () if kind in ("approval", "deploy") else _matrix(t))
    for copy in copies:
        report.actions.append((stage_index, label, copy, path))
    return copies


def check_placeholders(t: Table, key: str, text: str | None, *sub: str | int) -> None:
    """Reports each {name} in `text` that is not one of matching.PLACEHOLDERS."""
    for match in _BRACED.finditer(text or ""):
        if match[1] not in PLACEHOLDERS:
            known = ", ".join(f"{{{p}}}" for p in sorted(PLACEHOLDERS))
            suggestion = suggest(match[1], PLACEHOLDERS)
            t.problem(f'"{key}": unknown placeholder "{match[0]}"{suggestion}; known: {known}', key, *sub)


def _approvers(t: Table) -> tuple[str, ...] | None:
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


def labels(t: Table) -> tuple[str, ...] | None:
    """`runs_on`: worker labels (letters, digits, ".", "_", "-"), sorted and unique; None if absent."""
    labels = t.strings("runs_on")
    if labels is None:
        return None
    for label in labels:
        if not _LABEL.fullmatch(label):
            t.problem(f'"runs_on": label "{label}" may hold only letters, digits, ".", "_" and "-"', "runs_on")
    return tuple(sorted(set(labels)))


def _action_type(t: Table, report: PipelineReport) -> str | None:
    """The action's type: built in or from a plugin; None if it is wrong (and reported)."""
    kind = t.string("type")
    if "type" not in t.data:
        return "run"
    if kind is None or kind in BUILTIN_TYPES:
        return kind
    plugins = report.plugin_types()
    if kind in plugins:
        return kind
    suggestion = suggest(kind, BUILTIN_TYPES + tuple(plugins)).replace(" (", "; ").rstrip(")")
    t.problem(f'unknown action type "{kind}" (built-in types: {", ".join(BUILTIN_TYPES)}){suggestion}', "type")
    return None


def _check_action_keys(t: Table, kind: str | None) -> None:
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
            message = f'unknown key "{key}"{suggest(key, allowed)}'
        t.problem(message, key)


def _common_fields(t: Table, kind: str | None) -> dict[str, Any]:
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
        "env": env_pairs(t.table("env", t.where + ", env")),
        "secrets": _secrets(t),
        "when": None if when is None else _when(when),
        "allow_failure": bool(t.get("allow_failure", (bool,), "true or false")),
    }


def _outputs(t: Table) -> tuple[tuple[str, tuple[str, ...]], ...]:
    table = t.table("outputs", t.where)
    result = []
    for name, value in table.data.items() if table else ():
        globs = value if isinstance(value, list) else [value]
        if not _ARTIFACT.fullmatch(name):
            t.problem(f'artifact name "{name}" may hold only letters, digits, ".", "_" and "-"', "outputs", name)
        if not globs or not all(isinstance(g, str) for g in globs):
            t.problem(
                f'output "{name}" must be a glob or an array of globs, not {describe(value)}', "outputs", name
            )
            continue
        for k, glob in enumerate(globs):
            problem = relative_problem(glob)
            if problem:
                sub = (k,) if isinstance(value, list) else ()
                t.problem(f'output "{name}": glob "{glob}" {problem}', "outputs", name, *sub)
        result.append((name, tuple(globs)))
    return tuple(result)


def _caches(t: Table) -> tuple[CacheSpec, ...]:
    """`cache = [{ key = [...], paths = [...] }]`: key globs and paths inside the worktree or under ~."""
    out: list[CacheSpec] = []
    seen: dict[str, int] = {}
    for index, item in t.tables("cache", "{ key = [...], paths = [...] }"):
        c = Table(t.report, item, t.path + ("cache", index), f"{t.where}, cache {index + 1}")
        c.check_keys(_CACHE_KEYS)
        globs = c.strings("key") or ()
        for k, glob in enumerate(globs):
            problem = relative_problem(glob)
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
    problem = relative_problem(path)
    if problem:
        return problem, path
    norm = posixpath.normpath(path)
    if norm == "." or norm == ".git" or norm.startswith(".git/"):
        return "must name a directory inside the worktree, not the worktree itself or its .git", path
    return None, norm


def _nested(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def env_pairs(t: Table | None) -> tuple[tuple[str, str], ...]:
    """An `env` table as (NAME, value) pairs; booleans as true/false, numbers as written."""
    if t is None:
        return ()
    pairs = []
    for key, value in t.data.items():
        if not ENV_NAME.fullmatch(key):
            t.problem(f'"{key}" is not a valid environment variable name (letters, digits, _)', key)
        elif isinstance(value, bool):
            pairs.append((key, "true" if value else "false"))
        elif isinstance(value, str) and "\0" in value:
            t.problem(f'"{key}" holds a NUL character (\\u0000), which no environment variable can hold', key)
        elif isinstance(value, (str, int, float)):
            pairs.append((key, str(value)))
        else:
            t.problem(f'"{key}" must be a string (or a number or boolean), not {describe(value)}', key)
    return tuple(pairs)


def _secrets(t: Table) -> tuple[str, ...]:
    secrets = t.strings("secrets") or ()
    for index, secret in enumerate(secrets):
        if not ENV_NAME.fullmatch(secret):
            t.problem(f'secret "{secret}" is not a valid environment variable name', "secrets", index)
    return secrets


def _when(t: Table) -> When | None:
    t.check_keys(_WHEN_KEYS)
    branches, tags = t.strings("branches"), t.strings("tags")
    return None if branches is None and tags is None else When(branches=branches, tags=tags)


def _matrix(t: Table) -> tuple[Combo, ...]:
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
            what = "an empty array" if values == [] else describe(values)
            t.problem(f'matrix "{key}" must be a non-empty array of strings, not {what} ({example})', *where)
            continue
        strings: list[str] = []
        for index, value in enumerate(values):
            if not isinstance(value, str):
                t.problem(f'matrix "{key}" must hold strings only, not {describe(value)} (write the values '
                          'in quotes: unquoted, TOML reads 3.10 as the number 3.1)', *where, index)
            elif not value.strip() or not SAFE_NAME.fullmatch(value):
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


def _matrix_copies(t: Table, report: PipelineReport, spec: ActionSpec,
                   combos: tuple[Combo, ...]) -> list[ActionSpec]:
    """The action itself, or one copy per matrix combination, each with its own name and artifacts."""
    refs = _MATRIX_REF.findall(spec.name)
    if not combos:
        if refs and "matrix" not in t.data:
            t.problem(f'"name" uses {{matrix.{refs[0]}}} but the action has no "matrix"', "name")
        return [spec]
    keys = [k for k, _ in combos[0]]
    for ref in dict.fromkeys(refs):
        if ref not in keys:
            t.problem(f'"name": unknown placeholder "{{matrix.{ref}}}"{suggest(ref, keys)}; the matrix '
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
        report.matrix_outputs[art] = tuple(c.outputs[i][0] for c in copies.values())
    return list(copies.values())


def _matrix_value(values: dict[str, str], match: re.Match[str]) -> str:
    return values[match[1]]


def _deploy_fields(t: Table) -> dict[str, Any]:
    source = t.string("source") or "."
    problem = relative_problem(source)
    if problem:
        t.problem(f'"source" {problem}', "source")
    check_placeholders(t, "source", source)
    shared = t.strings("shared") or ()
    for index, path in enumerate(shared):
        problem = relative_problem(path)
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


def _targets(t: Table) -> tuple[str, ...]:
    value = t.data.get("target")
    shape = "ssh://[user@]host[:port]/path or file:///absolute/path"
    if value is None:
        t.problem(f'missing required key "target" ({shape}, or an array of them)')
        return ()
    urls = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    if not urls or not all(isinstance(u, str) for u in urls):
        t.problem(f'"target" must be a URL or a non-empty array of URLs, not {describe(value)}', "target")
        return ()
    for index, url in enumerate(urls):
        sub = (index,) if isinstance(value, list) else ()
        if not _TARGET.fullmatch(url):
            t.problem(f'target "{url}" must look like {shape}', "target", *sub)
        check_placeholders(t, "target", url, *sub)
    return tuple(urls)
