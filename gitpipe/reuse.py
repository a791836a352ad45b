"""`gitpipe retry RUN --failed`: which actions of a finished run a new run takes over instead
of running them again, and bringing their results (status, artifacts, outputs) into it.

The plan is made when the retry is queued (refusing clearly when it cannot be), stored with
the new run (store.create_retry), and applied by the daemon when the run starts. A reused
action's artifacts are hard-linked (else copied) into the new run's own artifact folder, so
`keep_runs` pruning the old run later never takes them from the new one.

What is reused: every action that succeeded before the first failure, i.e. at a (stage,
run_order) position up to that of the earliest failed, timed-out or cancelled action (its
parallel siblings that succeeded included). Everything from there on runs again, also what
ran after an allowed failure. Same commit, same pipeline file, same ref: the same trust.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from gitpipe.artifacts import MANIFEST
from gitpipe.errors import ActionError, UsageError
from gitpipe.models import ActionRecord, ActionStatus, ArtifactRecord, RunRecord
from gitpipe.settings import Settings
from gitpipe.store import Store

RERUN = frozenset({ActionStatus.FAILED, ActionStatus.TIMED_OUT, ActionStatus.CANCELLED})


def plan(store: Store, run: RunRecord) -> list[tuple[int, int, int]]:
    """(stage_idx, idx, action id) of each action of `run` a `retry --failed` takes over;
    UsageError when the run cannot be retried that way (still running, nothing failed, pruned)."""
    whole = f"`gitpipe retry {run.id}` runs it again whole"
    if not run.status.finished:
        raise UsageError(f"run #{run.id} is still {run.status.value}; only a finished run can be retried",
                         hint=f"wait for it to end, or `gitpipe cancel {run.id}` first")
    actions = store.actions(run.id)
    if not actions:
        raise UsageError(f"run #{run.id} {run.status.value} before any action ran; nothing to reuse",
                         hint=whole)
    failed = [a for a in actions if a.status in RERUN]
    if not failed:
        raise UsageError(f"run #{run.id} has no failed, timed-out or cancelled action (it {run.status.value})",
                         hint=whole)
    if store.pruned(run.id):
        raise UsageError(f"the logs and artifacts of run #{run.id} were pruned (keep_runs); "
                         "there is nothing to reuse", hint=whole)
    first = min((a.stage_idx, a.run_order) for a in failed)
    reused = [a for a in actions
              if a.status is ActionStatus.SUCCEEDED and (a.stage_idx, a.run_order) <= first]
    for art in _artifacts(store, reused):
        if not Path(art.path).is_dir():
            raise UsageError(f'artifact "{art.name}" of run #{run.id} is gone from {art.path}', hint=whole)
    return [(a.stage_idx, a.idx, a.id) for a in reused]


def apply(settings: Settings, store: Store, run_id: int) -> int:
    """Take over the planned results into a started run (again after a restart: only what is
    still pending); how many actions were taken over."""
    current = {(a.stage_idx, a.idx): a for a in store.actions(run_id)}
    done = 0
    for key, origin in sorted(store.reuse_plan(run_id).items()):
        act = current.get(key)
        if act is None or act.name != origin.name:  # same pipeline text: never, unless a bug
            raise ActionError(f'run #{run_id} has no action "{origin.name}" where run #{origin.run_id} had it')
        if act.status is not ActionStatus.PENDING:
            continue
        dest = settings.artifacts_dir / str(run_id)
        arts = [_link(art, dest, run_id) for art in _artifacts(store, [origin])]
        outputs = {o.key: o.value for o in store.outputs(origin.run_id) if o.action == origin.name}
        store.reuse_action(act.id, origin, arts, outputs)
        done += 1
    return done


def _artifacts(store: Store, actions: list[ActionRecord]) -> list[ArtifactRecord]:
    found = []
    for a in actions:
        found += [art for art in store.artifacts(a.run_id) if art.action == a.name]
    return found


def _link(art: ArtifactRecord, dest: Path, run_id: int) -> ArtifactRecord:
    """The artifact's files in the new run's folder: hard links where the file system allows."""
    src = Path(art.path)
    if not src.is_dir():
        raise ActionError(f'artifact "{art.name}" of run #{art.run_id} is gone from {src} (pruned since '
                          "the retry was queued)", hint=f"retry run #{art.run_id} whole")
    target = dest / art.name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(src, target, copy_function=_hardlink)
    manifest = src.parent / f"{art.name}.{MANIFEST}"
    if manifest.exists():
        shutil.copyfile(manifest, dest / manifest.name)
    return ArtifactRecord(run_id=run_id, name=art.name, action=art.action, size=art.size,
                          sha256=art.sha256, path=str(target), files=art.files)


def _hardlink(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
