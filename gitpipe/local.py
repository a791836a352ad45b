"""`gitpipe exec`: the pipeline of the current working copy, run here before pushing.

The working copy (uncommitted and untracked files included) is snapshot as a dangling
commit, then run by the same daemon code in burst mode, in a throw-away home: the same
worktree isolation, artifacts and output, and nothing recorded in the host's history.
The pipeline's [[notify]] targets are told nothing unless `--notify` asks for it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import threading
import tomllib
from pathlib import Path

from gitpipe import ansi, api, follow, git, progress, queue, triggers
from gitpipe import pipeline as pipeline_mod
from gitpipe import settings as settings_mod
from gitpipe.daemon import Daemon
from gitpipe.errors import ConfigError, UsageError
from gitpipe.models import ActionSpec, Pipeline
from gitpipe.secrets import Masker
from gitpipe.store import Store
from gitpipe.trust import Trust


class ExecTrust(Trust):
    """On the user's own machine: secrets come from the caller's environment, no ref checks."""

    def require(self, repo: str, repo_path: str, ref: str, what: str) -> None:
        return None

    def for_action(self, repo: str, repo_path: str, ref: str,
                   names: tuple[str, ...]) -> tuple[dict[str, str], Masker]:
        missing = [n for n in names if n not in os.environ]
        if missing:
            raise ConfigError(f"secret(s) {', '.join(missing)} not set",
                              hint="gitpipe exec passes secrets from your environment: export them first")
        values = {n: os.environ[n] for n in names}
        return values, Masker(list(values.values()))


def selection(pipe: Pipeline, stage: str | None, action: str | None):  # type: ignore[no-untyped-def]
    """Which actions run: the named stage/action and the producers of their inputs."""
    names = {(s.name, a.name) for s in pipe.stages for a in s.actions}
    if stage and stage not in {s for s, _ in names}:
        raise UsageError(f'the pipeline has no stage "{stage}" (stages: {", ".join(s.name for s in pipe.stages)})')
    if action and action not in {a for _, a in names}:
        known = ", ".join(f"{s.name}/{a.name}" for s in pipe.stages for a in s.actions)
        raise UsageError(f'the pipeline has no action "{action}" (actions: {known})')
    wanted = {(s.name, a.name) for s in pipe.stages for a in s.actions
              if (stage is None or s.name == stage) and (action is None or a.name == action)}
    producers = {name: (s.name, a) for s in pipe.stages for a in s.actions for name, _ in a.outputs}
    todo = [a for s in pipe.stages for a in s.actions if (s.name, a.name) in wanted]
    while todo:
        for name in todo.pop().inputs:
            if name in producers and (producers[name][0], producers[name][1].name) not in wanted:
                wanted.add((producers[name][0], producers[name][1].name))
                todo.append(producers[name][1])

    def select(stage_name: str, spec: ActionSpec) -> str | None:
        if (stage_name, spec.name) not in wanted:
            return "not selected (gitpipe exec --stage/--action)"
        if spec.type in ("deploy", "approval") and spec.name != action:
            return f"{spec.type} actions run in exec only when named with --action"
        return None

    return select


def host_sandbox(home: str | None) -> dict[str, object]:
    """The [sandbox] table of this machine's gitpipe home, when it has one: exec confines the same."""
    path = settings_mod.resolve_home(home) / settings_mod.CONFIG_NAME
    if not path.exists():
        return {}
    settings_mod.load(path.parent)  # an invalid one is said here, with its line
    table: dict[str, object] = tomllib.loads(path.read_text(encoding="utf-8")).get("sandbox", {})
    return table


def run_exec(workdir: Path, stage: str | None, action: str | None, keep: bool, home: str | None = None,
             notify: bool = False) -> int:
    """Run the working copy's pipeline here; 0 when it succeeded. Its [[notify]] only with `notify`."""
    git_dir, ref, sha = git.snapshot(workdir)
    name = Path(git.open_repo(git_dir).workdir or workdir).name
    text = (Path(git.open_repo(git_dir).workdir or workdir) / queue.PIPELINE_FILE)
    if not text.exists():
        raise UsageError(f"no {queue.PIPELINE_FILE} in {text.parent}")
    pipe = pipeline_mod.parse(text.read_text(), file=str(text), default_name=name)
    root = Path(tempfile.mkdtemp(prefix="gitpipe-exec-"))
    try:
        sandbox = host_sandbox(home)
        if sandbox:
            import tomli_w

            (root / settings_mod.CONFIG_NAME).write_text(tomli_w.dumps({"sandbox": sandbox}))
        api.init_home(str(root))
        # A local run listens on no control socket: the host's daemon may own /run/gitpipe.
        conf = dataclasses.replace(settings_mod.load(root), control_socket=None)
        store = Store(conf)
        store.add_repo(name, str(git_dir))
        run_id = store.create_runs([queue.NewRun(repo=name, pipeline=pipe.name, ref=ref, sha=sha,
                                                 trigger=triggers.MANUAL, pipeline_text=text.read_text(),
                                                 pusher=api.user())])[0]
        print(f"gitpipe exec: {pipe.name} on the working copy of {git_dir.parent} ({ref.split('/')[-1]} + changes)")
        daemon = Daemon(conf, burst=True)
        daemon.trust_factory = ExecTrust
        daemon.select = selection(pipe, stage, action)
        daemon.run_schedules = False
        daemon.notify = notify  # a try-out on a laptop posts nothing to the team's chat unless asked
        thread = threading.Thread(target=_stream, args=(conf, store, run_id), daemon=True)
        thread.start()
        daemon.serve()
        thread.join(10)
        progress.Board(print, False).draw(store.actions(run_id))
        run = store.run(run_id)
        print(f"gitpipe exec: {run.status.value}" + (f" ({ansi.strip(run.error)})" if run.error else ""))
        for art in store.artifacts(run_id):
            where = f" in {art.path}" if keep else ""
            print(f"  artifact {art.name}: {art.files} file(s), {art.size} bytes, sha256 {art.sha256}{where}")
        print(f"  logs and artifacts kept in {root}" if keep else "  (--keep keeps logs and artifacts)")
        return 0 if run.status.value == "succeeded" else 1
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def _stream(conf: settings_mod.Settings, store: Store, run_id: int) -> None:
    """Print every action's output as it comes, prefixed with its name."""
    try:
        follow.stream_logs(store, conf.logs_dir, run_id, None, True, False,
                           lambda label, line: print(f"[{label}] {ansi.sanitize(line.decode('utf-8', 'replace'))}",
                                                     flush=True))
    except BrokenPipeError:  # the reader left (`gitpipe exec | head`): the main thread ends quietly
        pass
