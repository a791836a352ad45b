"""The `gitpipe` command: parse arguments, call one library function, print.

One place (`main`) turns a GitpipeError into a one-line message and an exit status:
0 success, 1 the thing asked about failed, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gitpipe import __version__, ansi, api, follow
from gitpipe import settings as settings_mod
from gitpipe.errors import ConfigError, GitpipeError, PipelineError, UsageError
from gitpipe.models import ReleaseRecord, RunRecord, RunStatus
from gitpipe.refs import short_ref


class Out:
    """Printing with colours on a terminal, plain text elsewhere, through the filter `logs` uses.

    Whatever a command prints goes through `say`: a run's fields come from pushes (commit text,
    $GITPIPE_OUTPUT values, errors quoting a pipeline, a deploy's output), and on a terminal an
    escape sequence in them would act (a title, a clipboard write, a cleared screen). Only SGR
    colours survive, and only on a terminal.
    """

    def __init__(self, err: bool = False) -> None:
        self.stream = sys.stderr if err else sys.stdout
        self.tty = self.stream.isatty()

    def status(self, status: str) -> str:
        from gitpipe.progress import paint

        return paint(status, self.tty)

    def say(self, text: str = "") -> None:
        """Print a line, filtered."""
        if not self.tty:
            text = ansi.strip(text)
        else:
            text = ansi.sanitize(text)
            if "\x1b[" in text and not text.endswith("\x1b[0m"):
                text += "\x1b[0m"  # a colour from pushed text ends with its line
        print(text, file=self.stream, flush=True)

    def bytes_line(self, data: bytes) -> None:
        self.say(data.decode("utf-8", errors="replace"))


def _one_line(text: str) -> str:
    """A value from a pushed file or a person, on one line: its newlines shown as `\\n`, so it
    cannot print a line of its own (a fake "approved by ...")."""
    return text.replace("\n", "\\n").replace("\r", "\\r")  # the rest: Out's filter, as every field


def say(text: str = "", *, err: bool = False) -> None:
    """Print a line to stdout (or stderr) through Out's filter."""
    Out(err).say(text)


def print_json(data: Any) -> None:
    """JSON as it is stored: ensure_ascii writes every control character (ESC too) and every
    non-ASCII character as a \\u escape, so no raw escape reaches a terminal, and a JSON reader
    gets the exact text back (a consumer printing it raw, `jq -r`, must filter it itself)."""
    print(json.dumps(data, indent=2, ensure_ascii=True))


def _home(args: argparse.Namespace) -> settings_mod.Settings:
    """The settings of an initialised home: only `init` (and `demo`, `exec` in homes of their
    own) make one, never a command pointed at the wrong directory."""
    conf = settings_mod.load(args.home)
    if not conf.db_path.exists():
        raise UsageError(f"{conf.home} is not a gitpipe home (it has no {conf.db_path.name})",
                         hint="run `gitpipe init` to make it one, or pass --home DIR of an existing home")
    return conf


def _store(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from gitpipe.store import Store  # sqlite-utils only for the commands that need it

    conf = _home(args)
    return conf, Store(conf)


# ---------------------------------------------------------------------------- commands
def cmd_init(args: argparse.Namespace) -> int:
    path = api.init_home(args.home)
    say(f"gitpipe home ready: {path.parent}\nconfiguration: {path}")
    return 0


def cmd_repo_add(args: argparse.Namespace) -> int:
    from gitpipe import repos

    conf, store = _store(args)
    name, path = repos.add(conf, store, args.path, args.name, args.create)
    say(f"registered {name} ({path}); hooks installed. Push to it to start runs.")
    return 0


def cmd_repo_list(args: argparse.Namespace) -> int:
    _, store = _store(args)
    rows = api.repo_list(store)
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        say("no repos registered (add one with `gitpipe repo add PATH`)")
    out = Out()
    for r in rows:
        last = r["last_run"]
        tail = f"#{last['id']} {out.status(last['status'])}" if last else "no runs yet"
        say(f"{r['name']:<20} {r['path']}  {tail}")
    return 0


def cmd_repo_remove(args: argparse.Namespace) -> int:
    from gitpipe import repos

    _, store = _store(args)
    repos.remove(store, args.name)
    say(f"unregistered {args.name}; its history is kept")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from gitpipe import daemon

    logging.basicConfig(level=logging.INFO, format="gitpipe: %(message)s", stream=sys.stderr)
    conf = _home(args)
    d = daemon.Daemon(conf, burst=args.burst)
    d.serve()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    conf, store = _store(args)
    run_id, run = api.start_run(conf, store, args.repo, args.ref, args.var)
    if run.status is RunStatus.FAILED:
        say(f"run #{run_id} failed: {run.error}", err=True)
        return 1
    say(f"run #{run_id} queued for {short_ref(run.ref)} @ {run.sha[:7]}")
    if args.wait:
        return _wait(conf, store, run_id)
    return 0


def _wait(conf: settings_mod.Settings, store: Any, run_id: int) -> int:
    from gitpipe import progress

    run = progress.watch_run(conf, store, run_id)
    say(f"run #{run_id} {Out().status(run.status.value)}")
    return 0 if run.status is RunStatus.SUCCEEDED else 1


def cmd_runs(args: argparse.Namespace) -> int:
    _, store = _store(args)
    runs = api.list_runs(store, args.repo, args.limit, args.status, args.ref, args.since)
    if not args.json and store.get_state("paused"):
        say(f"(paused by {store.get_state('paused')}: queued runs wait until `gitpipe resume`)")
    if args.json:
        print_json([api.run_json(r) for r in runs])
        return 0
    out = Out()
    if not runs:
        say("no runs match" if args.status or args.ref or args.since else "no runs yet")
    waits = api.waiting_reasons(store) if any(r.status is RunStatus.RUNNING for r in runs) else {}
    for r in runs:
        wait = f"  ({waits[r.id]})" if r.id in waits else ""
        say(f"#{r.id:<5} {r.repo:<16} {short_ref(r.ref):<20} {r.sha[:7]}  "
              f"{out.status(r.status.value):<10} {r.trigger:<8} {r.created_at[:19].replace('T', ' ')}"
              f"{_duration(r)}{_notes(r)}{wait}")
    return 0


def _warnings(n: int) -> str:
    return f"{n} warning{'' if n == 1 else 's'}"


def _notes(r: RunRecord) -> str:
    """What `runs` adds after a run: its allowed failures, what a retry reused."""
    notes = [_warnings(r.warnings)] if r.warnings else []
    if r.retry_of:
        notes.append(f"retry of #{r.retry_of}" + (f", {r.reused} reused" if r.reused else ""))
    return f"  ({'; '.join(notes)})" if notes else ""


def _duration(r: RunRecord) -> str:
    from gitpipe.progress import seconds

    if not (r.started_at and r.finished_at):
        return ""
    return f"  {seconds(r.started_at, r.finished_at):.1f}s"


def _took(row: dict[str, Any]) -> str:
    """How long a stage or action of `show --json` took (so far, while it runs), as `runs` and
    `run --wait` write it; '' before it started."""
    from gitpipe.progress import seconds

    took = seconds(row["started_at"], row["finished_at"])
    return f"  {took:.1f}s" if took is not None else ""


def cmd_show(args: argparse.Namespace) -> int:
    from gitpipe.cache import describe

    _, store = _store(args)
    data = api.show_json(store, args.run)
    if args.json:
        print_json(data)
        return 0
    out = Out()
    say(f"run #{data['id']}  {data['repo']} ({data['pipeline']})  {short_ref(data['ref'])} @ {data['sha'][:7]}"
          f"  {out.status(data['status'])}")
    retry = f" of #{data['retry_of']}" if data["retry_of"] else ""
    say(f"  trigger {data['trigger']}{retry} by {data['pusher'] or '?'}, created {data['created_at']}")
    if data["warnings"]:
        say(f"  {_warnings(data['warnings'])}: allowed failures, the run went on")
    if data["commit"]["message"]:
        say(f"  commit: {ansi.strip(data['commit']['message'].splitlines()[0])} ({data['commit']['author']})")
    if data.get("cancel_reason") or data.get("cancelled_by"):
        say(f"  cancelled by {data.get('cancelled_by')}: {data.get('cancel_reason') or 'no reason given'}")
    if data["error"]:
        say("  error: " + data["error"].replace("\n", "\n    "))
    for stage in data["stages"]:
        say(f"  stage {stage['name']}: {out.status(stage['status'])}{_took(stage)}")
        for a in stage["actions"]:
            extra = f" exit {a['exit_code']}" if a["exit_code"] not in (None, 0) else ""
            tries = f" ({a['attempts']} attempts)" if a["attempts"] > 1 else ""
            allowed = " (allowed to fail: a warning)" if a["warning"] else ""
            msg = f" - {a['message']}" if a["message"] else ""
            say(f"    {a['name']:<24} {out.status(a['status'])}{allowed}{_took(a)}{extra}{tries}{msg}")
            for c in a["caches"]:
                say(f"      cache {', '.join(c['paths'])}: {describe(c)}")
    for art in data["artifacts"]:
        say(f"  artifact {art['name']} from {art['action']}: {art['size']} bytes sha256 {art['sha256']}")
    for o in data["outputs"]:
        say(f"  output {o['action']}.{o['key']} = {_one_line(o['value'])}")
    for name, value in data["inputs"].items():
        say(f"  input {name} = {_one_line(value)}")
    for ap in data["approvals"]:
        decided = (f"{ap['decision']} by {ap['by']} at {ap['at']}" + (f": {_one_line(ap['comment'])}" if ap["comment"] else "")
                   if ap["decision"] else f"waiting since {ap['requested_at']} (gitpipe approve {data['id']}"
                   + (f"; approvers: {', '.join(ap['approvers'])})" if ap["approvers"] else ")"))
        if ap["decision"] == "timed-out":
            decided = f"{ap['comment']} (at {ap['at']}; no decision, rejected)"
        say(f"  approval {ap['action']}: {decided}")
        if ap["note"]:
            say(f"    warning: {ap['note']}")
        for r in ap["refused"]:
            say(f"    refused: {r['by']} tried to {r['decision']} at {r['at']}: {r['reason']}")
    return 0 if data["status"] != "failed" else 1


def cmd_cache_list(args: argparse.Namespace) -> int:
    from gitpipe import cache

    conf, store = _store(args)
    rows = [{**cache.entry_json(e), "where": "build host"} for e in store.cache_entries(args.repo)]
    unreachable = None
    if conf.cluster is not None:  # each worker keeps its own entries and lists them in its heartbeat
        from gitpipe.cluster import status

        try:
            rows += status.worker_caches(conf.cluster.broker, args.repo)
        except UsageError as exc:
            unreachable = f"warning: the workers' entries are not listed: {exc}"
    if unreachable:
        print(unreachable, file=sys.stderr)
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        say("no cache entries" + (f" of {args.repo}" if args.repo else ""))
    for e in sorted(rows, key=lambda e: e["last_used_at"], reverse=True):  # most recently used first
        trust = "protected" if e["protected"] else "unprotected"
        where = f"build host ({e['host']})" if e["where"] == "build host" else f"worker {e['host']}"
        say(f"{e['id'][:12]}  {e['repo']}  {e['action']}  {', '.join(e['paths'])}  {e['size'] / 1e6:.1f} MB  "
            f"{e['files']} files  {trust}  on {where}  last used {e['last_used_at']}")
    return 0


def cmd_cache_clear(args: argparse.Namespace) -> int:
    from gitpipe import cache

    conf, store = _store(args)
    count, size = cache.clear(conf, store, args.repo)
    say(f"removed {count} cache entr{'y' if count == 1 else 'ies'} ({size / 1e6:.1f} MB)"
        + (f" of {args.repo}" if args.repo else ""))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    conf, store = _store(args)
    run = store.run(args.run)
    out = Out()
    only = {a.id for a in api.find_action(store, args.run, args.action)} if args.action else None
    labels: list[str] = []  # the file being printed, as `tail -f` heads a switch of file
    lines = [0]

    def emit(label: str, line: bytes) -> None:
        if not labels or labels[-1] != label:
            say(f"==> {label} <==")
            labels.append(label)
        lines[0] += 1
        out.bytes_line(line)

    follow.stream_logs(store, conf.logs_dir, run.id, only, args.follow, args.timestamps, emit)
    if not lines[0]:
        say(f"run #{run.id}: no log lines ({store.run(run.id).status.value})", err=True)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    conf, store = _store(args)
    run = api.cancel_run(conf, store, args.run, args.reason)
    state = "cancelled" if run.status is RunStatus.CANCELLED else "cancelling (running actions get SIGTERM)"
    say(f"run #{run.id}: {state}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    conf, store = _store(args)
    new_id = api.retry_run(conf, store, args.run, args.failed)
    reused = len(store.reuse_plan(new_id))
    what = f", failed actions only: {reused} result(s) reused" if args.failed else ""
    say(f"run #{new_id} queued (retry of #{args.run}{what})")
    return 0


def cmd_artifacts(args: argparse.Namespace) -> int:
    _, store = _store(args)
    if args.name is None and args.out is None:
        arts = api.artifacts(store, args.run, None)
        if args.json:
            print_json([{"name": a.name, "action": a.action, "size": a.size, "sha256": a.sha256,
                         "files": a.files} for a in arts])
            return 0
        if not arts:
            say(f"run #{args.run} has no artifacts")
        for a in arts:
            say(f"{a.name:<20} {a.size:>12,} B  {a.files:>4} file(s)  from {a.action:<16} sha256 {a.sha256}")
        return 0
    for art, paths in api.download_artifacts(store, args.run, args.name, args.out or "."):
        say(f"{art.name}: {len(paths)} file(s), {art.size:,} bytes, sha256 checked -> "
            + (str(paths[0]) if len(paths) == 1 else f"{args.out or '.'}"))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    pipe = api.validate_file(args.file)
    actions = sum(len(s.actions) for s in pipe.stages)
    say(f"{args.file}: ok, pipeline {pipe.name}: {len(pipe.stages)} stage(s), {actions} action(s)")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from gitpipe import schema

    print(json.dumps(schema.installed_schema(), indent=2))
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    from gitpipe.editor import server  # werkzeug and tomlkit only for this command

    server.run(Path(args.file), template=args.template, open_browser=not args.no_browser, say=say)
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    row = api.decide_as_caller(args.home, args.socket, args.run, True, args.comment)
    say(f'run #{args.run}: approved "{row["action"]}" as {row["by"]}')
    return 0


def cmd_reject(args: argparse.Namespace) -> int:
    row = api.decide_as_caller(args.home, args.socket, args.run, False, args.comment)
    say(f'run #{args.run}: rejected "{row["action"]}" as {row["by"]}; the run fails')
    return 0


def cmd_environments(args: argparse.Namespace) -> int:
    from gitpipe import releases

    _, store = _store(args)
    envs = releases.environments(store, args.repo)
    if args.json:
        print_json([e.to_json() for e in envs])
        return 0
    if not envs:
        say(f"{args.repo}: no deploys yet")
    out = Out()
    for env in envs:
        cur, latest = env.current, env.latest
        head = f"{cur.release} ({_origin(cur)}, {cur.at}, by {cur.by_user or '?'})" if cur else "nothing deployed"
        say(f"{env.environment}: current {head}")
        if latest and latest.live_slot:
            say(f"  {latest.strategy}: live slot {latest.live_slot}, idle slot holds {latest.idle_release or 'nothing'}")
        elif latest and latest.strategy:
            say(f"  {latest.strategy}")
        for r in env.history[:10]:
            release = f"{r.from_release} -> {r.release}" if r.from_release else r.release
            say(f"  {r.at[:19].replace('T', ' ')}  {out.status(r.status):<12} {release:<22} "
                f"{_origin(r):<18} {r.by_user or ''}  {ansi.strip(r.message or '')[:100]}")
    return 0


def _origin(row: ReleaseRecord) -> str:
    """The run and commit a release came from: "run #12, 1a2b3c4"; "-" when unknown."""
    parts = [f"run #{row.run_id}" if row.run_id else "", (row.sha or "")[:7]]
    return ", ".join(p for p in parts if p) or "-"


def cmd_rollback(args: argparse.Namespace) -> int:
    from gitpipe import releases

    conf, store = _store(args)
    result = releases.rollback(conf, store, args.repo, args.environment, args.to)
    for line in result.log:
        say(f"  {line}")
    say(f"{args.repo} {args.environment}: {result.message}")
    if result.warning:
        say(f"gitpipe: {args.environment} now runs {result.release}, but {result.warning}", err=True)
        return 1
    return 0 if result.status == "rolled-back" else 1


def cmd_pause(args: argparse.Namespace) -> int:
    conf, store = _store(args)
    before = api.pause(conf, store, True)
    say(f"paused since {before}" if before else
          "paused: queued runs wait (pushes are still queued; running runs go on). `gitpipe resume` to go on")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    conf, store = _store(args)
    before = api.pause(conf, store, False)
    say(f"resumed (was paused by {before})" if before else "was not paused")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    from gitpipe import local

    return local.run_exec(Path.cwd(), args.stage, args.action, args.keep, args.home, args.notify)


def cmd_worker(args: argparse.Namespace) -> int:
    from gitpipe.cluster import worker  # Celery only for the cluster's commands

    if not args.broker:
        raise UsageError("no broker given", hint="pass --broker redis://HOST:6379/0 or set GITPIPE_BROKER")

    logging.basicConfig(level=logging.INFO, format="gitpipe worker: %(message)s", stream=sys.stderr)
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    directory = Path(args.dir).expanduser().absolute() if args.dir else settings_mod.resolve_home(None) / "worker"
    max_size = None
    if args.cache_max_size is not None:
        try:
            max_size = settings_mod.parse_size(args.cache_max_size)
        except ValueError as exc:
            raise UsageError(f"--cache-max-size: {exc}") from None
    worker.serve(args.broker, labels, args.slots, args.name, directory, args.coordinator_key, max_size)
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    from gitpipe.cluster import channel, status

    if args.coordinator_key:  # what each worker takes as --coordinator-key: made at first use
        print(channel.signing_text(channel.load_signing(_home(args).home / "coordinator.key")))
        return 0
    rows = status.workers(args.broker or status.broker_of(_home(args)))
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        say("no live worker")
    for row in rows:
        say(f"{row['name']:<16} labels {','.join(row['labels']) or '-':<20} slots {row['slots']:<3} "
            f"running {row['running']:<3} heartbeat {row['heartbeat']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from gitpipe.report import Reporter

    conf, store = _store(args)
    reporter = Reporter(conf, store)
    try:
        pages = reporter.render_all()
    finally:
        reporter.close()
    say(f"{pages} page(s) written; open {conf.site_dir / 'index.html'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gitpipe import demo

    return demo.run_demo()


# ---------------------------------------------------------------------------- parser
COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gitpipe", description="Continuous delivery for your own git server.")
    parser.add_argument("--version", action="version", version=f"gitpipe {__version__}")
    parser.add_argument("--home", default=None, help="gitpipe home (also accepted after the command)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", default=argparse.SUPPRESS, help="gitpipe home (default: $GITPIPE_HOME, /var/lib/gitpipe under "
                                       "systemd, else ~/.local/share/gitpipe)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str,
            parent: Any = sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(func=func)
        COMMANDS[name] = (help, func)
        return p

    add("init", cmd_init, "create the home and a commented default gitpipe.toml")
    repo = sub.add_parser("repo", help="register, list and unregister bare repositories", parents=[common])
    repo_sub = repo.add_subparsers(dest="repo_command", metavar="SUBCOMMAND", required=True)
    p = add("add", cmd_repo_add, "register a bare repo and install its hooks", repo_sub)
    p.add_argument("path")
    p.add_argument("--name", help="name to register it under (default: folder name without .git)")
    p.add_argument("--create", action="store_true", help="create the bare repo (HEAD on main)")
    p = add("list", cmd_repo_list, "list registered repos", repo_sub)
    p.add_argument("--json", action="store_true")
    p = add("remove", cmd_repo_remove, "unregister a repo (its history is kept)", repo_sub)
    p.add_argument("name")
    COMMANDS.pop("add"), COMMANDS.pop("list"), COMMANDS.pop("remove")
    COMMANDS["repo"] = ("register, list and unregister bare repositories", cmd_repo_list)
    p = add("serve", cmd_serve, "run the daemon in the foreground (what systemd runs)")
    p.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    p = add("run", cmd_run, "start a run by hand")
    p.add_argument("repo")
    p.add_argument("--ref", help="branch or tag (default: the repo's HEAD branch)")
    p.add_argument("--wait", action="store_true", help="show progress until the run ends; exit 1 if it fails")
    p.add_argument("--var", action="append", type=_variable, metavar="KEY=VALUE",
                   help="set an input of the pipeline's [inputs] (repeat for more); scripts get it as "
                        "$GITPIPE_INPUT_KEY")
    p = add("runs", cmd_runs, "list runs, newest first")
    p.add_argument("repo", nargs="?")
    p.add_argument("--limit", type=_positive, default=20, help="the most runs to list (default 20)")
    p.add_argument("--status", action="append", metavar="STATUS",
                   help="only runs with this status (repeat, or comma-separated: failed,cancelled)")
    p.add_argument("--ref", help='only runs of this branch or tag ("main", "release/*", or a full refs/... name)')
    p.add_argument("--since", metavar="WHEN", help='only runs created since: a duration ("30m", "2d") or a date '
                   '("2026-11-01", ISO 8601; UTC unless it names a zone)')
    p.add_argument("--json", action="store_true", help="a JSON array of runs")
    p = add("show", cmd_show, "one run: stages, actions, status, durations, artifacts")
    p.add_argument("run", type=_run_id)
    p.add_argument("--json", action="store_true")
    p = add("logs", cmd_logs, "print a run's logs")
    p.add_argument("run", type=_run_id)
    p.add_argument("action", nargs="?", help="ACTION or STAGE/ACTION (default: every action)")
    p.add_argument("--follow", "-f", action="store_true", help="tail a running action until it ends")
    p.add_argument("--timestamps", action="store_true", help="show each line's time")
    p = add("cancel", cmd_cancel, "stop a queued or running run")
    p.add_argument("run", type=_run_id)
    p.add_argument("--reason")
    p = add("retry", cmd_retry, "a new run of the same commit and pipeline")
    p.add_argument("run", type=_run_id)
    p.add_argument("--failed", action="store_true",
                   help="re-run only the failed actions and those after them; reuse what passed")
    p = add("validate", cmd_validate, "check a .pipeline.toml; errors as FILE:LINE: message")
    p.add_argument("file", nargs="?", default=".pipeline.toml")
    add("schema", cmd_schema, "print a JSON Schema of .pipeline.toml (for editor completion and checks)")
    p = add("edit", cmd_edit, "edit a .pipeline.toml in the browser: graph, forms, text, live validation")
    p.add_argument("file", nargs="?", default=".pipeline.toml")
    p.add_argument("--template", choices=("python", "site", "empty"),
                   help="for a new file: start from this template (default: choose in the page)")
    p.add_argument("--no-browser", action="store_true", help="only print the URL")
    p = add("artifacts", cmd_artifacts, "list a run's artifacts, or download them (sha256 checked)")
    p.add_argument("run", type=_run_id)
    p.add_argument("name", nargs="?", help="the artifact to download (default with --out: every one, each into DIR/NAME)")
    p.add_argument("--out", metavar="DIR", help="where to put the files (default: the current directory)")
    p.add_argument("--json", action="store_true", help="the list as a JSON array")
    for name, func, text in (("approve", cmd_approve, "approve the approval a run is waiting on"),
                             ("reject", cmd_reject, "reject the approval a run is waiting on (the run fails)")):
        p = add(name, func, text)
        p.add_argument("run", type=_run_id)
        p.add_argument("--comment")
        p.add_argument("--socket", metavar="PATH", help="ask the daemon at this control socket (default: "
                       "directly when you can open the home, else $GITPIPE_SOCKET or /run/gitpipe/gitpipe.sock)")
    p = add("environments", cmd_environments, "each environment's current release and deploy history")
    p.add_argument("repo")
    p.add_argument("--json", action="store_true")
    p = add("rollback", cmd_rollback, "switch an environment back to its last good (or a named) release; "
                                      "runs after_switch and the healthcheck")
    p.add_argument("repo")
    p.add_argument("environment")
    p.add_argument("--to", metavar="RELEASE",
                   help="release to switch to (default: the last good release live before the current one)")
    add("pause", cmd_pause, "stop taking queued runs (maintenance); pushes are still queued")
    add("resume", cmd_resume, "take queued runs again")
    p = add("exec", cmd_exec, "run the working copy's pipeline here, before pushing (nothing is recorded)")
    p.add_argument("--stage", help="only this stage (and the actions its inputs come from)")
    p.add_argument("--action", help="only this action (and its inputs' producers); also runs deploy/approval")
    p.add_argument("--keep", action="store_true", help="keep the temporary home (logs, artifacts)")
    p.add_argument("--notify", action="store_true", help="send the pipeline's [[notify]] notifications "
                                                         "(default: nobody is told)")
    cache = sub.add_parser("cache", help="list and clear the build caches", parents=[common])
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="SUBCOMMAND", required=True)
    p = add("list", cmd_cache_list, "list the build cache entries, most recently used first", cache_sub)
    p.add_argument("repo", nargs="?", help="only this repo's entries")
    p.add_argument("--json", action="store_true", help="a JSON array of entries")
    p = add("clear", cmd_cache_clear, "remove every build cache entry, or those of one repo", cache_sub)
    p.add_argument("repo", nargs="?")
    COMMANDS.pop("list"), COMMANDS.pop("clear")
    COMMANDS["cache"] = ("list and clear the build caches", cmd_cache_list)
    add("report", cmd_report, "render the static report site now (the daemon keeps it current)")
    add("demo", cmd_demo, "a self-contained tour: a throw-away home, a real push, a live run")
    p = add("worker", cmd_worker, "run a worker host: a Celery worker that runs actions sent by the build host")
    p.add_argument("--broker", default=os.environ.get("GITPIPE_BROKER"),
                   help="the Redis URL of [cluster] broker (redis:// or rediss://; default: $GITPIPE_BROKER, "
                        "which keeps a password out of `ps`)")
    p.add_argument("--labels", default="", help="comma-separated labels pipelines ask for with runs_on")
    p.add_argument("--slots", type=int, default=1, help="actions this worker runs at once (default 1)")
    p.add_argument("--name", help="this worker's name in [cluster.workers] (default: the host name)")
    p.add_argument("--dir", help="its key, repo mirrors, worktrees and build caches (default: <home>/worker)")
    p.add_argument("--cache-max-size", help='the size its build caches may take, least recently used removed '
                                            'first (as [cache] max_size: "20G"; default: [cache] max_size of '
                                            '<dir>/gitpipe.toml, else 20G)')
    p.add_argument("--coordinator-key", default=os.environ.get("GITPIPE_COORDINATOR_KEY"),
                   help="the build host's public key, which signs every job (`gitpipe workers --coordinator-key` "
                        "prints it there; default: $GITPIPE_COORDINATOR_KEY); required")
    p = add("workers", cmd_workers, "list the live workers: name, labels, slots, running attempts, heartbeat")
    p.add_argument("--json", action="store_true")
    p.add_argument("--broker", help="the Redis URL (default: [cluster] broker in gitpipe.toml)")
    p.add_argument("--coordinator-key", action="store_true",
                   help="print the build host's public signing key (each worker's --coordinator-key) and exit")
    return parser


def _positive(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f'"{text}" is not a positive number (how many runs to list, e.g. 20)')
    return number


def _variable(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f'"{text}" is not KEY=VALUE (e.g. --var version=1.2)')
    return key, value


def _run_id(text: str) -> int:
    try:
        return int(text.lstrip("#"))
    except ValueError:
        raise argparse.ArgumentTypeError(f'"{text}" is not a run id (a number like 42 or #42)') from None


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        return _closed_pipe()


def _closed_pipe() -> int:
    """The reader of our output left (`gitpipe runs | head -1`): end quietly, as git does.

    git dies of SIGPIPE, which a shell reports as 141; Python ignores SIGPIPE and raises
    instead, so the same status is returned, and stdout is pointed at /dev/null so that the
    interpreter's last flush at exit does not complain either.
    """
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    os.close(null)
    return 128 + signal.SIGPIPE


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except BrokenPipeError:
        raise  # an OSError too, but not one to report: see _closed_pipe
    except PipelineError as exc:
        for problem in exc.problems:
            say(str(problem), err=True)
        return exc.exit_code
    except ConfigError as exc:  # gitpipe.toml: every problem found, one line each
        for each in exc.problems:
            say(f"gitpipe: error: {each}", err=True)
        return exc.exit_code
    except GitpipeError as exc:
        say(f"gitpipe: error: {exc}", err=True)
        return exc.exit_code
    except OSError as exc:  # a path the user gave that cannot be used: no traceback, say which
        where = f": {exc.filename}" if exc.filename else ""
        say(f"gitpipe: error: {exc.strerror or exc}{where}", err=True)
        return 2
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    sys.exit(main())
