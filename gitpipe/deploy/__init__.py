"""Deploys: releases uploaded to file:// and ssh:// targets, switched atomically, rolled back.

The scheduler calls `deploy` for a deploy action, `rollback` for `gitpipe rollback`, and
`read_current` after a crash to learn what a deploy in flight actually did. A deploy failure
never raises: it comes back as a DeployResult with status "failed" (no target was switched) or
"rolled-back" (targets were switched and then switched back), and a message saying what failed,
where, and how to fix it. DeployError is raised only for misuse (no targets, unknown strategy),
and by `read_current` / `list_releases` / `rollback_goal` when a target cannot be read or there
is nothing to roll back to. A rollback is two calls: `rollback_goal` (which release), then
`rollback` (switch, after_switch, healthcheck).

Modules: targets.py (the Target interface, the layout, FileTarget), ssh.py (SshTarget) and
sshconn.py (connecting, host keys), manifest.py and tarstream.py (what is uploaded), lock.py
(the target lock), session.py (URLs; targets opened and locked together), strategies.py
(rolling, blue-green, the rollback command).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gitpipe.deploy.context import (
    DEPLOYED,
    FAILED,
    ROLLED_BACK,
    DeployContext,
    DeployResult,
    SerialLog,
    TargetOutcome,
    slots,
)
from gitpipe.deploy.manifest import check_shared, scan
from gitpipe.deploy.session import Session, parse
from gitpipe.deploy.strategies import STRATEGIES, Deployment, Scripts, choose_goal, roll_back
from gitpipe.errors import DeployError
from gitpipe.models import ActionSpec

__all__ = [
    "DEPLOYED",
    "FAILED",
    "ROLLED_BACK",
    "DeployContext",
    "DeployResult",
    "TargetOutcome",
    "deploy",
    "list_releases",
    "read_current",
    "rollback",
    "rollback_goal",
    "slots",
]


def deploy(spec: ActionSpec, source_dir: Path, ctx: DeployContext) -> DeployResult:
    """Deploy `source_dir` as release `<run>-<short_sha>` to every target of `spec`."""
    if not spec.targets:
        raise DeployError(f'deploy action "{spec.name}" has no targets')
    if spec.strategy not in STRATEGIES:
        raise DeployError(f'deploy action "{spec.name}": unknown strategy "{spec.strategy}"')
    log = SerialLog(ctx.log)
    session: Session | None = None
    try:
        shared = check_shared(spec.shared)
        for url in spec.targets:
            parse(url)
        if not source_dir.is_dir():
            raise DeployError(f"the release source {source_dir} is not a directory",
                              hint='check the action\'s "source"')
        session = Session(spec.targets, ctx, log, prepare=True)
        # Hash the source while connecting and locking: the two take about as long.
        with ThreadPoolExecutor(max_workers=1) as pool:
            scanned = pool.submit(scan, source_dir, shared, log)
            with session:
                result = STRATEGIES[spec.strategy](Deployment(spec, source_dir, ctx, session, shared, scanned, log))
    except DeployError as e:
        outcomes = session.outcomes() if session else tuple(TargetOutcome(u, None, None) for u in spec.targets)
        result = DeployResult(FAILED, ctx.release, outcomes, f"{e}; current untouched on every target")
    log(result.message)
    return result


def rollback_goal(urls: list[str], ctx: DeployContext, to: str | None = None,
                  candidates: list[str] | None = None) -> str:
    """The release a rollback would go to (see strategies.choose_goal); no lock taken, nothing changed.

    UsageError when `to` is not a complete release on every target (it lists them).
    """
    with Session(urls, ctx, SerialLog(ctx.log), locked=False) as session:
        return choose_goal(session.sites, to, candidates)


def rollback(urls: list[str], ctx: DeployContext, goal: str, spec: ActionSpec | None = None) -> DeployResult:
    """Switch every target to release `goal`; then `spec`'s after_switch and healthcheck, as a deploy does.

    `ctx` carries the goal's own run and sha (the scripts' GITPIPE_RUN, GITPIPE_SHA).
    """
    log = SerialLog(ctx.log)
    session: Session | None = None
    try:
        session = Session(urls, ctx, log)
        with session:
            result = roll_back(session, goal, Scripts(spec, ctx, session, log) if spec else None, log)
    except DeployError as e:
        outcomes = session.outcomes() if session else tuple(TargetOutcome(u, None, None) for u in urls)
        result = DeployResult(FAILED, goal, outcomes, f"{e}; current untouched on every target")
    log(result.message)
    return result


def read_current(urls: list[str], ctx: DeployContext) -> list[TargetOutcome]:
    """Where `current` points on each target (`previous`: where a rollback would go); no lock taken."""
    with Session(urls, ctx, SerialLog(ctx.log), locked=False) as session:
        return [TargetOutcome(s.url, s.state.previous, s.state.current) for s in session.sites]


def list_releases(url: str, ctx: DeployContext) -> list[str]:
    """The complete releases on one target, oldest first."""
    with Session([url], ctx, SerialLog(ctx.log), locked=False) as session:
        return list(session.sites[0].state.complete)
