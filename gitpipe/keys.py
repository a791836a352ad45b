"""Every key of `.pipeline.toml`, once: its table, kind, allowed values, default and help.

The validator (`pipeline.py`) takes its key lists from here, `gitpipe schema` (`schema.py`)
turns these entries into a JSON Schema, and the editor (`gitpipe edit`) builds its forms and
help texts from them, so the three never disagree on what a key is. A new key is one `Key`
entry in its table's tuple (plus its check in `pipeline.py` when its kind is new).

Only the standard library here: the git hook imports `pipeline.py`, which imports this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PLUGIN = "*"  # in `Key.types`: also allowed for the action types of installed plugins

# What a key's value is; `schema.py` and the editor's form know each kind.
KINDS = (
    "string",    # a non-empty string
    "text",      # a non-empty string, usually several lines (a script)
    "name",      # a non-empty string without "/", "\\" or control characters
    "duration",  # "90s", "10m", "2h", "1h30m"
    "integer",   # with `minimum`
    "boolean",
    "strings",   # an array of strings
    "choice",    # one of `choices`
    "cron",      # an array of cron lines
    "schedule",  # an array of cron lines or of tables with the keys of `table` (cron, branch)
    "env",       # a table of NAME = "value"
    "outputs",   # a table of artifact name = glob or array of globs
    "targets",   # a URL or an array of URLs
    "matrix",    # a table of KEY = array of string values
    "inputs",    # an array of artifact names (outputs of earlier actions)
    "secrets",   # an array of secret names
    "table",     # a sub-table with the keys of `table`
    "tables",    # an array of tables with the keys of `table`
    "named",     # a table of NAME = a table with the keys of `table`
    "caches",    # an array of tables with the keys of `table` (key, paths)
)


@dataclass(frozen=True)
class Key:
    """One key of one table of `.pipeline.toml`."""

    name: str
    kind: str
    help: str
    default: Any = None
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    required: bool = False
    table: str = ""  # for kinds "table" and "tables": the name of the sub-table in TABLES
    types: tuple[str, ...] = ()  # actions only: the types that take this key; () = every type


TOP = (
    Key("pipeline", "table", "name, timeout and network of the whole pipeline", table="pipeline"),
    Key("trigger", "table", "which pushes (branches, tags, paths) and schedules start a run", table="trigger"),
    Key("inputs", "named", "values a run started by hand may set (gitpipe run --var NAME=VALUE); "
        "scripts get them as $GITPIPE_INPUT_<NAME>", table="input"),
    Key("env", "env", "environment variables for every action"),
    Key("stage", "tables", "the stages, run one after the other in file order", required=True, table="stage"),
    Key("notify", "tables", "webhooks and commands told about run events", table="notify"),
)

PIPELINE = (
    Key("name", "name", "the pipeline's name (default: the repository's name)"),
    Key("timeout", "duration", 'the longest a whole run may take, e.g. "1h"'),
    Key("network", "boolean", "whether run actions may reach the network (default: the host's setting)"),
    Key("runs_on", "strings", "worker labels every action needs unless it names its own (SPEC section 13)",
        default=[]),
)

TRIGGER = (
    Key("branches", "strings", "branch globs whose pushes start a run", default=["*"]),
    Key("tags", "strings", "tag globs whose pushes start a run", default=[]),
    Key("paths", "strings", "run only when the push changes a path matching one of these globs", default=[]),
    Key("schedule", "schedule", 'cron lines (UTC) that run the default branch, e.g. "0 3 * * *", or '
        '{ cron = "...", branch = "..." } tables that run another branch', default=[], table="schedule"),
    Key("superseded", "choice", 'runs of the same branch or tag: "queue" waits for the earlier ones, '
        '"cancel" cancels them, "parallel" runs side by side', default="queue",
        choices=("queue", "cancel", "parallel")),
)

INPUT = (
    Key("description", "string", "what the input is for, shown on the run page"),
    Key("default", "string", "the value when none is given; without one, `gitpipe run` must give it"),
    Key("options", "strings", "the only values allowed"),
)

SCHEDULE = (
    Key("cron", "string", 'a cron line (UTC), e.g. "0 3 * * *"', required=True),
    Key("branch", "string", "the branch the schedule runs (default: the repository's default branch)"),
)

CACHE = (
    Key("key", "strings", "globs of the files whose contents make the key (with the repo and action)",
        default=[]),
    Key("paths", "strings", 'what to keep: paths in the worktree or under "~", e.g. ".venv"', required=True),
)

STAGE = (
    Key("name", "name", "the stage's name, unique in the pipeline", required=True),
    Key("action", "tables", "the stage's actions; same run_order = in parallel", required=True, table="action"),
)

ACTION = (
    Key("name", "name", "the action's name, unique in its stage", required=True),
    Key("type", "choice", '"run" a script, wait for an "approval", "deploy" a release, or a plugin type',
        default="run", choices=("run", "approval", "deploy")),
    Key("run_order", "integer", "order inside the stage: a higher run_order starts when every lower "
        "one succeeded", default=1, minimum=1),
    Key("inputs", "inputs", "artifacts of earlier actions restored into this action's worktree", default=[]),
    Key("outputs", "outputs", "artifacts this action makes: name = glob(s) relative to the worktree",
        types=("run", "deploy", PLUGIN)),
    Key("timeout", "duration", 'the longest one attempt may take (default "30m"; an approval "24h")',
        default="30m"),
    Key("retries", "integer", "how many times a failed attempt is run again", default=0, minimum=0),
    Key("env", "env", "environment variables for this action"),
    Key("secrets", "secrets", "secrets of the host given to this action as environment variables",
        default=[]),
    Key("when", "table", "run only for these branches or tags (otherwise skipped)", table="when"),
    Key("allow_failure", "boolean", "a failure of this action is a warning: the stage and the run go on",
        default=False, types=("run", "deploy", PLUGIN)),
    Key("matrix", "matrix", 'one copy of this action per combination of values, in parallel, e.g. '
        '{ python = ["3.11", "3.12"] }; each copy gets MATRIX_<KEY>', types=("run", PLUGIN)),
    Key("run", "text", "the bash script this action runs (bash -eo pipefail)", required=True,
        types=("run",)),
    Key("network", "boolean", "whether this action may reach the network", types=("run", PLUGIN)),
    Key("cache", "caches", "directories kept from run to run: [{ key = [files whose contents name the "
        'entry], paths = [".venv", "~/.cache/pip"] }]', types=("run", PLUGIN), table="cache"),
    Key("runs_on", "strings", 'worker labels: the action runs on a worker host that has every one, e.g. '
        '["linux", "arm64"] ([cluster] in gitpipe.toml)', types=("run", PLUGIN)),
    Key("message", "string", "the question a person answers; placeholders like {short_sha} work",
        types=("approval",)),
    Key("approvers", "strings", 'who may decide: Unix user names and "group:NAME" (default: whoever '
        "can open the gitpipe home)", types=("approval",)),
    Key("environment", "name", 'the environment this deploys to, e.g. "staging"', required=True,
        types=("deploy",)),
    Key("target", "targets", "ssh://[user@]host[:port]/path or file:///path, or an array of them",
        required=True, types=("deploy",)),
    Key("source", "string", "the directory of the worktree that becomes the release", default=".",
        types=("deploy",)),
    Key("keep", "integer", "how many releases are kept on each target", default=5, minimum=1,
        types=("deploy",)),
    Key("shared", "strings", "paths linked from <target>/shared into every release", default=[],
        types=("deploy",)),
    Key("before_switch", "text", "command run on the target in the new release, before the switch",
        types=("deploy",)),
    Key("after_switch", "text", "command run on the target after the switch", types=("deploy",)),
    Key("healthcheck", "text", "command run on the target after the switch; failing it rolls back",
        types=("deploy",)),
    Key("healthcheck_retries", "integer", "tries of the healthcheck before it counts as failed",
        default=3, minimum=1, types=("deploy",)),
    Key("monitor", "duration", "how long the healthcheck keeps running after the switch; a failure "
        "in that window rolls back", default="0s", types=("deploy",)),
    Key("monitor_interval", "duration", "how often the healthcheck runs during the monitor window",
        default="10s", types=("deploy",)),
    Key("strategy", "choice", '"rolling" (release directories and a symlink switch) or "blue-green"',
        default="rolling", choices=("rolling", "blue-green"), types=("deploy",)),
)

NOTIFY = (
    Key("on", "choice", "the events that fire this notification", required=True,
        choices=("succeeded", "failed", "cancelled", "approval", "deployed", "rolled-back")),
    Key("webhook", "string", "an http(s) URL the event is POSTed to as JSON"),
    Key("command", "text", "a command run with the event JSON on stdin"),
)

WHEN = (
    Key("branches", "strings", "branch globs this action runs for"),
    Key("tags", "strings", "tag globs this action runs for"),
)

TABLES: dict[str, tuple[Key, ...]] = {
    "top": TOP, "pipeline": PIPELINE, "input": INPUT, "schedule": SCHEDULE, "cache": CACHE, "trigger": TRIGGER, "stage": STAGE, "action": ACTION,
    "notify": NOTIFY, "when": WHEN,
}


def names(table: str) -> tuple[str, ...]:
    """The key names of one table, in definition order."""
    return tuple(k.name for k in TABLES[table])


def find(table: str, name: str) -> Key | None:
    """The definition of one key, or None."""
    return next((k for k in TABLES[table] if k.name == name), None)


def action_keys(kind: str | None) -> tuple[Key, ...]:
    """The keys an action of type `kind` takes; None: the keys every type takes."""
    if kind is None:
        return tuple(k for k in ACTION if not k.types)
    builtin = kind in ACTION_TYPES
    return tuple(k for k in ACTION if not k.types or kind in k.types or (not builtin and PLUGIN in k.types))


def type_keys(kind: str) -> tuple[str, ...]:
    """The names of the keys only some types take, that type `kind` takes."""
    return tuple(k.name for k in action_keys(kind) if k.types)


ACTION_TYPES = find("action", "type").choices  # type: ignore[union-attr]
