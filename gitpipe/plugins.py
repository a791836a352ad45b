"""Action types from plugins: entry points in the group `gitpipe.actions`.

A plugin is a callable `action(config, workdir, env, log) -> int | None`: `config` is the
action's table from `.pipeline.toml` (its own keys, as written), `workdir` the action's
worktree (inputs restored), `env` what a script would get, `log` prints one line to the
action's log. It returns an exit status (None = 0) or raises. It runs in a process of its
own (`python -m gitpipe.plugins TYPE`), so a timeout or a cancel stops it like a script.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from gitpipe.models import ActionSpec

CONFIG_VAR = "GITPIPE_PLUGIN_CONFIG"
GROUP = "gitpipe.actions"  # the entry point group of plugin action types


def types() -> frozenset[str]:
    """The action types of installed plugins (the names of the group's entry points)."""
    from importlib.metadata import entry_points  # slow to import: only for a type not built in

    return frozenset(ep.name for ep in entry_points(group=GROUP))


def command(spec: ActionSpec, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The argument list and environment that run plugin `spec.type` for this action."""
    config = {"name": spec.name, **dict(spec.extra)}
    # The plugin process needs this interpreter's import path to find gitpipe and the plugin.
    full = {**env, CONFIG_VAR: json.dumps(config), "PYTHONPATH": os.pathsep.join(import_path())}
    # -P: the worktree (the runner's cwd) never comes first on the path, so a pushed
    # gitpipe/plugins.py cannot stand in for ours.
    return [sys.executable, "-P", "-m", "gitpipe.plugins", spec.type], full


def import_path() -> list[str]:
    """This interpreter's import path, without the daemon's working directory ('' or cwd)."""
    cwd = os.getcwd()
    return [p for p in sys.path if p and os.path.abspath(p) != cwd]


def interpreter_paths(home: Path) -> tuple[Path, ...]:
    """What a plugin process needs to see read-only in its sandbox: this interpreter and its
    import path (gitpipe, the plugins). Never a path that holds the gitpipe home."""
    from importlib.metadata import entry_points

    found: list[Path] = []
    places = [sys.prefix, sys.base_prefix, sys.exec_prefix, *import_path(), str(Path(__file__).parent)]
    for ep in entry_points(group=GROUP):  # an editable or --target install lives elsewhere
        if ep.dist is not None:
            places.append(str(ep.dist.locate_file("")))
    for entry in places:
        if not entry or not os.path.isdir(entry):
            continue
        path = Path(entry).resolve()
        if path.is_relative_to(home) or home.is_relative_to(path) or path == Path("/"):
            continue
        if path.is_relative_to("/usr") or any(path.is_relative_to(p) for p in found):
            continue
        found = [p for p in found if not p.is_relative_to(path)] + [path]
    return tuple(found)


def main(argv: list[str]) -> int:
    """Load the plugin and call it (the plugin process)."""
    from importlib.metadata import entry_points

    name = argv[0]
    found = [ep for ep in entry_points(group="gitpipe.actions") if ep.name == name]
    if not found:
        print(f'gitpipe: no installed plugin provides action type "{name}" (entry point group gitpipe.actions)')
        return 2
    action = found[0].load()
    config = json.loads(os.environ.pop(CONFIG_VAR, "{}"))
    try:
        result = action(config=config, workdir=Path.cwd(), env=dict(os.environ),
                        log=lambda line: print(line, flush=True))
    except Exception:  # the plugin's own error: its traceback goes to the action's log
        traceback.print_exc(file=sys.stdout)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
