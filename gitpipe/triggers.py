"""Trigger kinds: the one home of what starts a run.

`KINDS` lists each kind: the name a run records (`runs.trigger`), the `[trigger]` keys that
declare it in `.pipeline.toml` (their help text is in gitpipe/keys.py), the function that
validates those keys, who is recorded as starting it, and whether a newer run of the kind
supersedes older runs of its ref (`superseded`). The code that starts a run of a kind asks
here: the push hook (`push_starts`, `hook_fields`), schedules.py, api.py (manual, retry),
and the daemon (`supersedes`).

To add a kind: a row in KINDS, its keys in keys.TRIGGER, a field in models.TriggerSpec, and
the one place that starts it; tests/test_pipeline.py checks that the keys of KINDS are the
keys of keys.TRIGGER.

Every push imports this module through the hook, so its top imports nothing (not even `re`,
`typing` or gitpipe.models): the validator's tools are imported inside the functions that
validate, which the hook calls only for a pipeline blob it has not seen.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not `from typing import ...`: see above
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from gitpipe.models import TriggerSpec
    from gitpipe.tomlcheck import Table

PUSH = "push"
SCHEDULE = "schedule"
MANUAL = "manual"
RETRY = "retry"


class Kind:
    """One trigger kind (plain slots, not a dataclass: see the module's note on imports)."""

    __slots__ = ("name", "keys", "read", "pusher", "supersedes")

    def __init__(self, name: str, keys: tuple[str, ...], read: Callable[[Table], dict[str, Any]] | None,
                 pusher: str | None, supersedes: bool) -> None:
        self.name = name  # what runs.trigger holds, and what the runs list and run pages show
        self.keys = keys  # its keys in [trigger]
        self.read = read  # validates its keys into fields of TriggerSpec (None: no keys)
        self.pusher = pusher  # recorded as who started the run (None: the account that did)
        self.supersedes = supersedes  # a newer run of a ref cancels or waits for older ones


def _read_push(t: Table) -> dict[str, Any]:
    branches = t.strings("branches")
    return {"branches": ("*",) if branches is None else branches,
            "tags": t.strings("tags") or (), "paths": t.strings("paths") or ()}


def _read_schedule(t: Table) -> dict[str, Any]:
    return {"schedule": _schedule(t)}


KINDS: dict[str, Kind] = {k.name: k for k in (
    # Only a push supersedes: a retry of an old commit must not cancel a newer push's run.
    Kind(PUSH, ("branches", "tags", "paths", "superseded"), _read_push, pusher=None, supersedes=True),
    Kind(SCHEDULE, ("schedule",), _read_schedule, pusher="schedule", supersedes=False),
    Kind(MANUAL, (), None, pusher=None, supersedes=False),  # `gitpipe run`, with [inputs]
    Kind(RETRY, (), None, pusher=None, supersedes=False),  # `gitpipe retry`
)}


def supersedes(trigger: str) -> bool:
    """Whether a newer run of this kind supersedes older runs of its ref (`superseded`)."""
    kind = KINDS.get(trigger)
    return kind is not None and kind.supersedes


def trigger_spec(t: Table | None) -> TriggerSpec:
    """The validated `[trigger]` table (problems go to its report); defaults when there is none."""
    from gitpipe import keys
    from gitpipe.models import TriggerSpec

    if t is None:
        return TriggerSpec()
    t.check_keys(keys.names("trigger"))
    fields: dict[str, Any] = {}
    for kind in KINDS.values():
        if kind.read is not None:
            fields.update(kind.read(t))
    superseded = keys.find("trigger", "superseded").choices  # type: ignore[union-attr]
    return TriggerSpec(superseded=t.choice("superseded", superseded, "queue"), **fields)


def read_trigger(text: str) -> TriggerSpec | None:
    """The [trigger] of a pipeline text even if the rest is invalid; None if it cannot be read."""
    import tomllib

    from gitpipe.tomlcheck import Report, Table

    try:
        data = tomllib.loads(text.removeprefix("\ufeff"))
    except (tomllib.TOMLDecodeError, RecursionError):  # nested too deeply: see pipeline.parse
        return None
    report = Report("", {})
    trigger = trigger_spec(Table(report, data, (), "").table("trigger", "[trigger]"))
    return None if report.problems else trigger


# --------------------------------------------------------------------------- matching a push


def ref_triggers(trigger: TriggerSpec, ref: str) -> bool:
    """Whether a push to the full ref name `ref` (refs/heads/..., refs/tags/...) starts a run."""
    return push_starts(hook_fields(trigger), ref)


def hook_fields(trigger: TriggerSpec) -> dict[str, list[str]]:
    """What the push hook caches of a [trigger] (plain lists, for marshal), for `push_starts`.

    The cache outlives an upgrade: a field added here needs hookmain.CACHE_VERSION raised."""
    return {"branches": list(trigger.branches), "tags": list(trigger.tags), "paths": list(trigger.paths)}


def push_starts(fields: dict[str, Any], ref: str) -> bool:
    """Whether a push to `ref` matches the branch or tag globs of `hook_fields` (`paths` aside:
    the hook asks git for the changed paths only when the ref matches)."""
    from gitpipe import refs  # imports nothing

    kind, short = refs.kind_of(ref)
    key = {"branch": "branches", "tag": "tags"}.get(kind)
    return key is not None and any(glob_match(p, short) for p in fields.get(key, ()))


def glob_match(pattern: str, name: str) -> bool:
    """fnmatch.fnmatchcase without importing `re` (*, ?, [seq], [!seq]; `*` matches `/`)."""
    p = s = 0
    star, mark = -1, 0
    while s < len(name):
        if p < len(pattern) and pattern[p] == "*":
            star, mark, p = p, s, p + 1
            continue
        if p < len(pattern):
            ok, nxt = _one(pattern, p, name[s])
            if ok:
                p, s = nxt, s + 1
                continue
        if star < 0:
            return False
        p, mark = star + 1, mark + 1
        s = mark
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def _one(pattern: str, p: int, c: str) -> tuple[bool, int]:
    """Does the pattern item at p match character c; and where the next item starts."""
    if pattern[p] == "?":
        return True, p + 1
    if pattern[p] == "[":
        end = pattern.find("]", p + 2)
        if end > 0:
            body = pattern[p + 1:end]
            negate = body[:1] in ("!",)
            body = body[1:] if negate else body
            hit, i = False, 0
            while i < len(body):
                if i + 2 < len(body) and body[i + 1] == "-":
                    hit = hit or body[i] <= c <= body[i + 2]
                    i += 3
                else:
                    hit = hit or body[i] == c
                    i += 1
            return hit != negate, end + 1
    return pattern[p] == c, p + 1


# --------------------------------------------------------------------------- schedule


def _schedule(t: Table) -> tuple[Any, ...]:
    """`schedule`: cron strings (the default branch) or `{ cron = "...", branch = "..." }` tables."""
    from gitpipe import keys
    from gitpipe.models import ScheduleSpec
    from gitpipe.tomlcheck import Table, describe

    value = t.get("schedule", (list,), "an array of cron strings")
    found = []
    for index, item in enumerate(value or ()):
        if isinstance(item, dict):
            entry = Table(t.report, item, t.path + ("schedule", index), f'{t.where}: "schedule" item {index + 1}')
            entry.check_keys(keys.names("schedule"))
            cron, branch = entry.string("cron"), entry.string("branch")
            if "cron" not in item:
                entry.problem('missing "cron" (write { cron = "0 3 * * *", branch = "main" })')
            if cron is None or (branch is None and "branch" in item):
                continue
        elif isinstance(item, str):
            cron, branch = item, None
        else:
            t.problem(f'"schedule" must hold cron strings or {{ cron, branch }} tables, not {describe(item)}',
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
