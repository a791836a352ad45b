"""What a validated pipeline means while a run runs: which actions a ref runs (`when`), which
changed paths match, the values of {placeholders}, and the inputs a run gets.

The validator (pipeline.py) checks the file once; these are asked again at run time, by the
scheduler, the deployer and notify. Standard library only.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Iterable

from gitpipe.models import Pipeline, When
from gitpipe.refs import branch_of
from gitpipe.tomlcheck import suggest

PLACEHOLDERS = frozenset({"run", "pipeline", "repo", "ref", "sha", "short_sha", "branch", "environment"})
INPUT_VALUE_LIMIT = 4096  # characters of one input value: a value, not a file
_PLACEHOLDER = re.compile(r"\{(" + "|".join(sorted(PLACEHOLDERS)) + r")\}")


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


def paths_match(patterns: tuple[str, ...], changed: list[str]) -> bool:
    """Whether a changed path matches a path glob (`*` in a segment, `**` across); no patterns: True."""
    if not patterns:
        return True
    regexes = [path_regex(p) for p in patterns]
    return any(r.fullmatch(path) for path in changed for r in regexes)


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


def _any_glob(patterns: Iterable[str], name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def placeholder_values(run_id: int, pipeline: str, repo: str, ref: str, sha: str,
                       environment: str = "") -> dict[str, str]:
    """The value of each of PLACEHOLDERS for one run (`branch` is empty for a tag)."""
    branch = branch_of(ref) or ""
    return {"run": str(run_id), "pipeline": pipeline, "repo": repo, "ref": ref, "sha": sha,
            "short_sha": sha[:7], "branch": branch, "environment": environment}


def expand(template: str, values: dict[str, str]) -> str:
    """`template` with each known {placeholder} replaced; other braces (and absent values) left alone."""
    return _PLACEHOLDER.sub(lambda m: values.get(m[1], m[0]), template)


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
            problems.append(f'unknown input "{name}"{suggest(name, declared)} (inputs of {pipe.name}: {known})')
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
