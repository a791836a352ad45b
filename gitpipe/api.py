"""What the commands do, as library functions: each CLI command calls one of these."""

from __future__ import annotations

import os
import pwd
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gitpipe import cache as cache_mod
from gitpipe import git, matching, queue, triggers
from gitpipe import pipeline as pipeline_mod
from gitpipe import settings as settings_mod
from gitpipe.durations import parse_duration
from gitpipe.errors import PipelineError, UsageError
from gitpipe.models import ActionRecord, ApprovalRecord, Pipeline, RunRecord, RunStatus
from gitpipe.refs import short_ref
from gitpipe.settings import Settings
from gitpipe.store import Store


def init_home(home: str | None) -> Path:
    """Create the home and a commented gitpipe.toml (an existing one is kept)."""
    root = settings_mod.resolve_home(home)
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root} is a file, not a directory", hint="pass --home a directory (a new one is made)")
    for sub in ("", "logs", "artifacts", "work", "wake", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)  # secrets, history and worktrees: the daemon's user alone
    config = root / settings_mod.CONFIG_NAME
    if not config.exists():
        config.write_text(settings_mod.default_config_text())
    conf = settings_mod.load(root)
    if os.geteuid() == 0 and conf.sandbox.mode == "bwrap":
        from gitpipe.sandbox import ensure_build_user

        ensure_build_user(conf.sandbox.user)  # actions never run as root
    Store(conf).close()
    return config


def user() -> str:
    """The account running this command, from the kernel (never $USER, which anyone can set)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def start_run(settings: Settings, store: Store, repo_name: str, ref: str | None,
              variables: list[tuple[str, str]] | None = None) -> tuple[int, RunRecord]:
    """Queue a run by hand (trigger "manual") with its inputs (`--var KEY=VALUE`, checked against
    the pipeline's [inputs]); a run of an invalid pipeline is recorded as failed at once."""
    repo = git.open_bare(store.repo_path(repo_name))
    full, sha = git.resolve(repo, ref or git.default_branch(repo))
    text = git.read_file(repo, sha, queue.PIPELINE_FILE)
    if text is None:
        raise UsageError(f"{short_ref(full)} @ {sha[:7]} of {repo_name} has no {queue.PIPELINE_FILE}",
                         hint="commit one first (check it with `gitpipe validate`)")
    given = _variables(variables or [])
    error, name, inputs = None, repo_name, tuple(given.items())
    try:
        pipe = pipeline_mod.parse(text, default_name=repo_name)
    except PipelineError as exc:
        error = f"{queue.PIPELINE_FILE} is invalid:\n{exc}"
    else:
        name = pipe.name
        try:
            inputs = matching.input_values(pipe, given, manual=True)
        except ValueError as exc:
            raise UsageError(f"{repo_name} {short_ref(full)} @ {sha[:7]}: {exc}",
                             hint="its [inputs] are in .pipeline.toml; nothing was queued") from None
    author, message = git.commit_info(repo, sha)
    new = queue.NewRun(repo=repo_name, pipeline=name, ref=full, sha=sha, trigger=triggers.MANUAL,
                       pipeline_text=text, pusher=user(), error=error, inputs=inputs,
                       commit_author=author, commit_message=message)
    run_id = store.create_runs([new])[0]
    queue.wake(settings, "run")
    return run_id, store.run(run_id)


def _variables(pairs: list[tuple[str, str]]) -> dict[str, str]:
    given: dict[str, str] = {}
    for key, value in pairs:
        if key in given:
            raise UsageError(f"--var {key} is given twice", hint="give each input once; nothing was queued")
        given[key] = value
    return given


def retry_run(settings: Settings, store: Store, run_id: int, failed: bool = False) -> int:
    """A new run of the same commit and pipeline file (not the branch's head); with `failed`,
    one that takes over what passed before the first failure and runs the rest (reuse.py)."""
    from gitpipe import reuse

    old = store.run(run_id)
    text = store.pipeline_text(run_id)
    error = None
    try:
        pipeline_mod.parse(text or "", default_name=old.repo)
    except PipelineError as exc:
        error = f"{queue.PIPELINE_FILE} is invalid:\n{exc}"
    new = queue.NewRun(repo=old.repo, pipeline=old.pipeline, ref=old.ref, sha=old.sha, trigger=triggers.RETRY,
                       pipeline_text=text, pusher=user(), error=error, retry_of=run_id,
                       before_sha=old.before_sha, commit_author=old.commit_author,
                       commit_message=old.commit_message, inputs=old.inputs)
    if failed and error is None:
        new_id = store.create_retry(new, reuse.plan(store, old))
    else:
        new_id = store.create_runs([new])[0]
    queue.wake(settings, "retry")
    return new_id


def list_runs(store: Store, repo: str | None, limit: int, statuses: list[str] | None = None,
              ref: str | None = None, since: str | None = None, now: float | None = None) -> list[RunRecord]:
    """`gitpipe runs` with its filters; UsageError for a value that is not one (saying which are)."""
    if repo:
        store.repo_path(repo)
    if limit < 1:
        raise UsageError(f"--limit must be at least 1, not {limit}")
    wanted: list[RunStatus] = []
    for text in ",".join(statuses or []).split(","):
        if not text.strip():
            continue
        try:
            wanted.append(RunStatus(text.strip()))
        except ValueError:
            valid = ", ".join(s.value for s in RunStatus)
            raise UsageError(f'--status "{text.strip()}" is not a run status (statuses: {valid})') from None
    refs: tuple[str, ...] = ()
    if ref:
        refs = (ref,) if ref.startswith("refs/") else (f"refs/heads/{ref}", f"refs/tags/{ref}")
    return store.runs(repo, limit=limit, statuses=tuple(wanted), refs=refs,
                      since=since_iso(since, now) if since else None)


def since_iso(text: str, now: float | None = None) -> str:
    """--since as the stored time format: a duration back from now ("30m", "2d") or an ISO 8601
    date or time ("2026-11-01", "2026-11-01T08:00", with a zone or UTC)."""
    import time
    from datetime import datetime, timezone

    from gitpipe.intake import now_iso

    try:
        return now_iso((time.time() if now is None else now) - parse_duration(text))
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(f'--since "{text}" is neither a duration nor a date',
                         hint='write e.g. "30m", "2d", "1h30m", "2026-11-01" or "2026-11-01T08:00:00Z"') from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return now_iso(moment.timestamp())


def cancel_run(settings: Settings, store: Store, run_id: int, reason: str | None) -> RunRecord:
    """Cancel a queued run at once; ask the daemon to stop a running one."""
    run = store.request_cancel(run_id, user(), reason)
    queue.wake(settings, "cancel")
    return run


def run_json(run: RunRecord) -> dict[str, Any]:
    """The stable JSON shape of a run (SPEC section 3)."""
    data = {k: getattr(run, k) for k in ("id", "repo", "pipeline", "ref", "sha", "trigger", "created_at",
                                          "started_at", "finished_at", "error")}
    data["status"] = run.status.value
    data["pusher"] = run.pusher
    data["retry_of"] = run.retry_of
    data["warnings"] = run.warnings
    data["reused"] = run.reused
    data["inputs"] = dict(run.inputs)
    if run.cancel_reason or run.cancelled_by:
        data["cancelled_by"], data["cancel_reason"] = run.cancelled_by, run.cancel_reason
    return data


def waiting_reasons(store: Store) -> dict[int, str]:
    """Run id -> why one of its running actions waits (for a worker, for the broker), for `runs`."""
    return store.waiting_reasons()


def show_json(store: Store, run_id: int) -> dict[str, Any]:
    """`gitpipe show --json`: the run with stages, actions, artifacts and outputs."""
    run = store.run(run_id)
    data = run_json(run)
    data["commit"] = {"author": run.commit_author, "message": run.commit_message}
    actions = store.actions(run_id)
    caches: dict[int, list[dict[str, Any]]] = {}
    for use in store.cache_uses(run_id):
        caches.setdefault(use.action_id, []).append(cache_mod.use_json(use))
    data["stages"] = [
        {"name": s.name, "status": s.status.value, "started_at": s.started_at, "finished_at": s.finished_at,
         "actions": [{**_action_json(a), "caches": caches.get(a.id, [])}
                     for a in actions if a.stage_idx == s.idx]}
        for s in store.stages(run_id)
    ]
    data["artifacts"] = [{"name": a.name, "action": a.action, "size": a.size, "sha256": a.sha256}
                         for a in store.artifacts(run_id)]
    data["outputs"] = [{"action": o.action, "key": o.key, "value": o.value} for o in store.outputs(run_id)]
    data["approvals"] = [{"action": a.action, "message": a.message, "requested_at": a.requested_at,
                          "decision": a.decision, "by": a.by_user, "at": a.at, "comment": a.comment,
                          "note": a.note, "approvers": _approvers(store, run_id, a.action_id),
                          "refused": [{"decision": r.decision, "by": r.by_user, "at": r.at, "reason": r.reason}
                                      for r in a.refused]}
                         for a in store.approvals(run_id)]
    return data


def _approvers(store: Store, run_id: int, action_id: int) -> list[str] | None:
    """Who may decide an approval (`approvers`); None: whoever can open the home."""
    from gitpipe import approvals

    act = store.action(action_id)
    who = approvals.approvers_of(store, run_id, act.stage, act.name)
    return list(who) if who is not None else None


def _action_json(a: ActionRecord) -> dict[str, Any]:
    return {"name": a.name, "type": a.type, "status": a.status.value, "exit_code": a.exit_code,
            "started_at": a.started_at, "finished_at": a.finished_at, "attempts": a.attempts,
            "message": a.message, "allow_failure": a.allow_failure, "warning": a.warning,
            "matrix": {"group": a.group, "values": dict(a.matrix)} if a.group else None,
            "reused_from": a.reused_from}


def find_action(store: Store, run_id: int, name: str | None) -> list[ActionRecord]:
    """Actions whose logs `gitpipe logs` prints: all, or the one named ACTION or STAGE/ACTION."""
    actions = store.actions(run_id)
    if not name:
        return actions
    stage, _, action = name.rpartition("/")
    hits = [a for a in actions if a.name == action and (not stage or a.stage == stage)]
    if not hits:
        known = ", ".join(f"{a.stage}/{a.name}" for a in actions) or "none started yet"
        raise UsageError(f'run #{run_id} has no action "{name}" (actions: {known})')
    if len(hits) > 1:
        raise UsageError(f'run #{run_id} has several actions named "{name}"',
                         hint="name it as STAGE/ACTION: " + ", ".join(f"{a.stage}/{a.name}" for a in hits))
    return hits


def artifacts(store: Store, run_id: int, name: str | None) -> list[Any]:
    """A run's artifacts, or the one named; UsageError naming what exists otherwise."""
    try:
        store.run(run_id)
    except UsageError:
        ids = store.run_id_range()
        known = f"runs #{ids[0]} to #{ids[1]} exist" if ids else "there are no runs yet"
        raise UsageError(f"unknown run #{run_id} ({known})", hint="`gitpipe runs` lists them") from None
    arts = store.artifacts(run_id)
    if name is None:
        return arts
    hits = [a for a in arts if a.name == name]
    if not hits:
        known = ", ".join(a.name for a in arts) or "it has none"
        raise UsageError(f'run #{run_id} has no artifact "{name}" (artifacts: {known})')
    return hits


def download_artifacts(store: Store, run_id: int, name: str | None, out: str) -> list[tuple[Any, list[Path]]]:
    """`gitpipe artifacts RUN [NAME] --out DIR`: one artifact into DIR, or each into DIR/NAME;
    every file checked against its sha256 first (a mismatch writes nothing)."""
    from gitpipe import artifacts as artifacts_mod

    arts = artifacts(store, run_id, name)
    if not arts:
        raise UsageError(f"run #{run_id} has no artifacts")
    pairs = [(a, "" if name else a.name) for a in arts]
    written = artifacts_mod.download(pairs, Path(out))
    return [(a, [p for p in written if p.is_relative_to(Path(out) / prefix)]) for a, prefix in pairs]


def validate_file(path: str) -> Pipeline:
    """Parse a pipeline file; PipelineError lists every problem as FILE:LINE: message."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{path} does not exist", hint="pass the pipeline file, e.g. gitpipe validate .pipeline.toml")
    return pipeline_mod.parse(p.read_text(encoding="utf-8", errors="replace"), file=str(path),
                              default_name=Path.cwd().name)


def repo_list(store: Store) -> list[dict[str, Any]]:
    rows = []
    for r in store.repos():
        last = store.runs(r.name, limit=1)
        rows.append({"name": r.name, "path": r.path, "added_at": r.added_at,
                     "last_run": run_json(last[0]) if last else None})
    return rows


__all__ = ["asdict"]


def decide(settings: Settings, store: Store, run_id: int, approved: bool, comment: str | None) -> ApprovalRecord:
    """Approve or reject the approval a run waits on, as the account running this process."""
    from gitpipe import approvals

    return approvals.decide(settings, store, run_id, approved, comment, approvals.me())


def decide_as_caller(home: str | None, socket_path: str | None, run_id: int, approved: bool,
                     comment: str | None) -> dict[str, Any]:
    """`gitpipe approve/reject`: directly when this account can open the home, else (or with
    `socket_path`) through the daemon's control socket. Returns {action, by}."""
    from gitpipe import control

    root = settings_mod.resolve_home(home)
    try:
        state = "missing" if not root.is_dir() else "open" if os.access(root, os.R_OK | os.W_OK | os.X_OK) \
            else "closed"
    except PermissionError:  # a folder on the way is closed to this account
        state = "closed"
    if socket_path is None and state == "open":
        conf = settings_mod.load(root)
        store = Store(conf)
        try:
            row = decide(conf, store, run_id, approved, comment)
        finally:
            store.close()
        return {"action": row.action, "by": row.by_user}
    path = socket_path or os.environ.get("GITPIPE_SOCKET") or settings_mod.DEFAULTS["control_socket"]
    if socket_path is None and state == "missing" and not os.path.exists(path):
        settings_mod.load(root)  # neither a home nor a daemon here: say the home is missing, and how to fix it
    answer = control.request(Path(path), "approve" if approved else "reject", run_id, comment,
                             root if state != "missing" else None)
    return {"action": answer["action"], "by": answer["by"]}


def pause(settings: Settings, store: Store, paused: bool) -> str | None:
    """Stop / restart taking queued runs; returns who paused it before, if anyone."""
    from gitpipe.intake import now_iso

    before = store.get_state("paused")
    store.set_state("paused", f"{user()} at {now_iso()}" if paused else None)
    queue.wake(settings, "pause")
    return before
