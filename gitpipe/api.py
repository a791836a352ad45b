"""What the commands do, as library functions: each CLI command calls one of these."""

from __future__ import annotations

import getpass
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gitpipe import git, queue
from gitpipe import pipeline as pipeline_mod
from gitpipe import settings as settings_mod
from gitpipe.errors import PipelineError, UsageError
from gitpipe.models import ActionRecord, Pipeline, RunRecord, RunStatus, short_ref
from gitpipe.settings import Settings
from gitpipe.store import Store


def init_home(home: str | None) -> Path:
    """Create the home and a commented gitpipe.toml (an existing one is kept)."""
    root = settings_mod.resolve_home(home)
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
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def start_run(settings: Settings, store: Store, repo_name: str, ref: str | None) -> tuple[int, RunRecord]:
    """Queue a run by hand (trigger "manual"); fails at once when the pipeline is invalid."""
    repo = git.open_bare(store.repo_path(repo_name))
    full, sha = git.resolve(repo, ref or git.default_branch(repo))
    text = git.read_file(repo, sha, queue.PIPELINE_FILE)
    if text is None:
        raise UsageError(f"{short_ref(full)} @ {sha[:7]} of {repo_name} has no {queue.PIPELINE_FILE}",
                         hint="commit one first (check it with `gitpipe validate`)")
    error, name = None, repo_name
    try:
        name = pipeline_mod.parse(text, default_name=repo_name).name
    except PipelineError as exc:
        error = f"{queue.PIPELINE_FILE} is invalid:\n{exc}"
    new = queue.NewRun(repo=repo_name, pipeline=name, ref=full, sha=sha, trigger="manual",
                       pipeline_text=text, pusher=user(), error=error)
    run_id = store.create_runs([new])[0]
    queue.wake(settings, "run")
    return run_id, store.run(run_id)


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
    new = queue.NewRun(repo=old.repo, pipeline=old.pipeline, ref=old.ref, sha=old.sha, trigger="retry",
                       pipeline_text=text, pusher=user(), error=error, retry_of=run_id,
                       before_sha=old.before_sha)
    if failed and error is None:
        new_id = store.create_retry(new, reuse.plan(store, old))
    else:
        new_id = store.create_runs([new])[0]
    queue.wake(settings, "retry")
    return new_id


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
    if run.cancel_reason or run.cancelled_by:
        data["cancelled_by"], data["cancel_reason"] = run.cancelled_by, run.cancel_reason
    return data


def waiting_reasons(store: Store) -> dict[int, str]:
    """Run id -> why one of its running actions waits (for a worker, for the broker), for `runs`."""
    rows = store.query("SELECT run_id, message FROM actions WHERE status = 'running' AND message LIKE 'waiting for %'")
    return {r["run_id"]: r["message"] for r in rows}


def show_json(store: Store, run_id: int) -> dict[str, Any]:
    """`gitpipe show --json`: the run with stages, actions, artifacts and outputs."""
    run = store.run(run_id)
    data = run_json(run)
    data["commit"] = {"author": run.commit_author, "message": run.commit_message}
    actions = store.actions(run_id)
    data["stages"] = [
        {"name": s.name, "status": s.status.value,
         "actions": [_action_json(a) for a in actions if a.stage_idx == s.idx]}
        for s in store.stages(run_id)
    ]
    data["artifacts"] = [{"name": a.name, "action": a.action, "size": a.size, "sha256": a.sha256}
                         for a in store.artifacts(run_id)]
    data["outputs"] = store.outputs(run_id)
    data["approvals"] = [{"action": a["action"], "message": a["message"], "requested_at": a["requested_at"],
                          "decision": a["decision"], "by": a["by_user"], "at": a["at"], "comment": a["comment"]}
                         for a in store.approvals(run_id)]
    return data


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
        last = store.runs(r["name"], limit=1)
        rows.append({**r, "last_run": run_json(last[0]) if last else None})
    return rows


def finished(run: RunRecord) -> bool:
    return run.status in (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED)


__all__ = ["asdict"]


def decide(settings: Settings, store: Store, run_id: int, approved: bool, comment: str | None) -> dict[str, Any]:
    """Approve or reject the approval a run waits on; who is the Unix user."""
    row = store.decide(run_id, "approved" if approved else "rejected", user(), comment)
    queue.wake(settings, "approval")
    return row


def environments(store: Store, repo: str) -> list[dict[str, Any]]:
    """Each environment of a repo: its current release and its history, newest first."""
    import json

    store.repo_path(repo)
    out = []
    for env in store.environments(repo):
        history = [{**r, "targets": json.loads(r["targets"])} for r in store.releases(repo, env)]
        current = next((r for r in history if r["status"] in ("deployed", "rolled-back")), None)
        out.append({"environment": env, "current": current, "history": history})
    return out


def rollback(settings: Settings, store: Store, repo: str, environment: str, to: str | None) -> dict[str, Any]:
    """Switch an environment back to its previous (or a named) complete release; recorded."""
    import socket

    from gitpipe import deploy
    from gitpipe.intake import now_iso

    envs = {e["environment"]: e for e in environments(store, repo)}
    if environment not in envs:
        known = ", ".join(envs) or "none deployed yet"
        raise UsageError(f'{repo} has no environment "{environment}" (environments: {known})')
    targets = envs[environment]["history"][0]["targets"]
    lines: list[str] = []
    ctx = deploy.DeployContext(run_id=0, sha="", short_sha="", environment=environment,
                               known_hosts=settings.known_hosts, identity=settings.identity, log=lines.append,
                               holder=f"rollback by {user()} on {socket.gethostname()} pid {os.getpid()} "
                                      f"at {now_iso()}")
    result = deploy.rollback(targets, ctx, to)
    status = "rolled-back" if result.status == deploy.ROLLED_BACK else "failed"
    store.add_release(repo, environment, result.release or (to or "?"), status, targets, by=user(),
                      message=f"rollback by {user()}: {result.message}")
    return {"status": status, "release": result.release, "message": result.message, "log": lines}


def pause(settings: Settings, store: Store, paused: bool) -> str | None:
    """Stop / restart taking queued runs; returns who paused it before, if anyone."""
    from gitpipe.intake import now_iso

    before = store.get_state("paused")
    store.set_state("paused", f"{user()} at {now_iso()}" if paused else None)
    queue.wake(settings, "pause")
    return before
