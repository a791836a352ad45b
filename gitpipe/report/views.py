"""What each page shows, read from the store into frozen records the templates draw."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from gitpipe import approvals, cache, refs
from gitpipe.models import (
    ActionRecord,
    ActionStatus,
    ApprovalRecord,
    ArtifactRecord,
    AttemptRecord,
    RunRecord,
    RunStatus,
)
from gitpipe.report import charts, files, fmt
from gitpipe.report.logview import TAIL_LINES, Excerpt, LogReader, write_plain
from gitpipe.store import Store

EARLIER_TAIL = 100  # lines shown of an earlier (retried) attempt
RATE_WINDOW = 50  # finished runs the success rate is computed over
TREND = 30  # runs in a pipeline's trend
RECENT = 10  # runs in the top page's "recent runs"
ACTIVE = frozenset({RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.WAITING})


@dataclass(frozen=True)
class RunView:
    """A run as every page shows it."""

    id: int
    repo: str
    pipeline: str
    ref: str  # short: "main", "v1.2"
    ref_kind: str  # "branch", "tag" or "ref"
    sha: str
    status: str
    trigger: str
    pusher: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    seconds: float | None
    title: str  # the commit message's first line (or the run's error)
    message: str
    author: str
    error: str | None
    cancelled_by: str | None
    cancel_reason: str | None
    retry_of: int | None
    href: str  # relative to the site root
    warnings: int = 0  # allowed failures
    reused: int = 0  # actions a `retry --failed` took over

    @property
    def short_sha(self) -> str:
        return self.sha[:8]

    @property
    def finished(self) -> bool:
        return RunStatus(self.status).finished


def run_view(r: RunRecord) -> RunView:
    """The page view of a run record."""
    kind, ref = ref_parts(r.ref)
    message = (r.commit_message or "").strip()
    title = message.splitlines()[0] if message else (r.error or "").split("\n")[0]
    return RunView(
        id=r.id, repo=r.repo, pipeline=r.pipeline, ref=ref, ref_kind=kind, sha=r.sha, status=r.status.value,
        trigger=r.trigger, pusher=r.pusher or "", created_at=r.created_at, started_at=r.started_at,
        finished_at=r.finished_at, seconds=fmt.seconds_between(r.started_at, r.finished_at), title=title,
        message=message, author=r.commit_author or "", error=r.error, cancelled_by=r.cancelled_by,
        cancel_reason=r.cancel_reason, retry_of=r.retry_of, href=files.run_href(r.repo, r.id),
        warnings=r.warnings, reused=r.reused)


def ref_parts(ref: str) -> tuple[str, str]:
    """("branch", "main") for refs/heads/main, ("tag", "v1") for refs/tags/v1."""
    return refs.kind_of(ref)


def point(run: RunView, root: str = "") -> charts.Point:
    """A run on a chart."""
    took = f" in {fmt.duration(run.seconds)}" if run.seconds is not None else ""
    return charts.Point(run.seconds, run.status, f"#{run.id} {run.ref} {run.status}{took}",
                        root + run.href, f"#{run.id}")


# --------------------------------------------------------------------------- the run page


@dataclass(frozen=True)
class AttemptView:
    """One attempt of an action, with its log excerpt."""

    number: int
    status: str
    exit_code: int | None
    seconds: float | None
    excerpt: Excerpt
    full_href: str | None  # relative to the run page; None while running or when pruned
    anchor: str  # prefix of its line ids


@dataclass(frozen=True)
class ActionView:
    """An action on the run page."""

    id: int
    stage: str
    name: str
    type: str
    run_order: int
    status: str
    exit_code: int | None
    seconds: float | None
    attempts: tuple[AttemptView, ...]
    message: str | None
    open: bool
    warning: bool = False  # failed, but allow_failure let the run go on
    group: str | None = None  # the matrix action it is a copy of
    reused_from: int | None = None  # the run whose result `retry --failed` took over
    caches: tuple[tuple[str, str], ...] = ()  # (paths, what was restored and saved)

    @property
    def anchor(self) -> str:
        return f"action-{self.id}"

    @property
    def shown_status(self) -> str:
        """The status its box and icon show: an allowed failure is a warning."""
        return "warning" if self.warning else self.status


@dataclass(frozen=True)
class StageView:
    """A stage with its actions."""

    name: str
    status: str
    seconds: float | None
    actions: tuple[ActionView, ...]


@dataclass(frozen=True)
class ArtifactView:
    """An artifact with its download link."""

    name: str
    action: str
    size: int
    sha256: str
    files: int
    href: str | None  # relative to the run page
    note: str | None = None  # why there is no link


@dataclass(frozen=True)
class RunPage:
    """Everything the page of one run shows."""

    run: RunView
    stages: tuple[StageView, ...]
    graph: charts.Graph | None
    artifacts: tuple[ArtifactView, ...]
    outputs: tuple[tuple[str, str, str], ...]
    approvals: tuple[ApprovalRecord, ...]
    waiting: tuple[ActionView, ...]
    pruned: bool  # keep_runs removed its logs and artifacts
    inputs: tuple[tuple[str, str], ...] = ()  # (name, value); reach scripts only as env vars
    approvers: dict[int, tuple[str, ...]] = field(default_factory=dict)  # waiting approval id -> who may decide


def run_page(store: Store, logs: LogReader, site: Path, run_id: int, unpublished: str | None = None) -> RunPage:
    """Everything the page of one run shows; publishes its logs and artifacts into the site
    (the artifacts only when `unpublished`, the reason not to, is None)."""
    rec = store.run(run_id)
    run = run_view(rec)
    folder = site / files.run_files(rec.repo, run_id)
    pruned = store.pruned(run_id)
    if pruned:
        shutil.rmtree(folder, ignore_errors=True)  # the site's links to the pruned files go too
    records = store.actions(run_id)
    uses: dict[int, list[tuple[str, str]]] = {}
    for u in store.cache_uses(run_id):
        uses.setdefault(u.action_id, []).append((", ".join(u.paths), cache.describe(cache.use_json(u))))
    actions = [replace(action_view(store, logs, a, None if pruned else folder,
                                   rec.status.finished or a.status.finished), caches=tuple(uses.get(a.id, ())))
               for a in records]
    stages = tuple(StageView(s.name, s.status.value, fmt.seconds_between(s.started_at, s.finished_at),
                             tuple(a for a, r in zip(actions, records) if r.stage_idx == s.idx))
                   for s in store.stages(run_id))
    if unpublished is not None:
        shutil.rmtree(folder / "artifacts", ignore_errors=True)  # published before the host said no
    arts = tuple(ArtifactView(a.name, a.action, a.size, a.sha256, a.files,
                              None if pruned or unpublished else _published(a, folder, run_id),
                              "pruned" if pruned else unpublished)
                 for a in store.artifacts(run_id))
    outputs = tuple((o.action, o.key, o.value) for o in store.outputs(run_id))
    waiting = tuple(a for a in actions if a.status == ActionStatus.WAITING.value)
    deciders = {a.id: who for a in waiting
                if (who := approvals.approvers_of(store, run_id, a.stage, a.name)) is not None}
    return RunPage(run, stages, graph(stages), arts, outputs, tuple(store.approvals(run_id)),
                   waiting, pruned, rec.inputs, deciders)


def _published(art: ArtifactRecord, folder: Path, run_id: int) -> str | None:
    rel = files.publish_artifact(art, folder)
    return f"{run_id}/{rel}" if rel else None


def action_view(store: Store, logs: LogReader, a: ActionRecord, folder: Path | None,
                settled: bool) -> ActionView:
    """An action with its attempts' log excerpts (the latest in full, earlier ones shorter)."""
    attempts = store.attempts(a.id)
    views = tuple(attempt_view(logs, att, folder, latest=(att is attempts[-1]), settled=settled)
                  for att in attempts)
    failed = a.status in (ActionStatus.FAILED, ActionStatus.TIMED_OUT)
    return ActionView(a.id, a.stage, a.name, a.type, a.run_order, a.status.value, a.exit_code,
                      fmt.seconds_between(a.started_at, a.finished_at), views, a.message,
                      open=failed or a.status in (ActionStatus.RUNNING, ActionStatus.WAITING),
                      warning=a.warning, group=a.group, reused_from=a.reused_from)


def attempt_view(logs: LogReader, att: AttemptRecord, folder: Path | None, latest: bool,
                 settled: bool) -> AttemptView:
    """One attempt's log: an excerpt inline and, once it ended and if the page shows only part
    of it, the whole log as a text file.

    `folder` is the run's folder in the site (None: publish nothing, the run was pruned).
    """
    src = Path(att.log_path)
    failing = att.status in (ActionStatus.FAILED, ActionStatus.TIMED_OUT)
    excerpt = logs.excerpt(src, failing, TAIL_LINES if latest else EARLIER_TAIL)
    href = None
    if folder is not None and (att.finished_at or settled) and excerpt.truncated:
        name = files.segment(src.name.removesuffix(".log")) + ".txt"
        dest = folder / "logs" / name
        if not dest.exists():
            write_plain(src, dest)
        href = f"{folder.name}/logs/{name}"
    return AttemptView(att.number, att.status.value, att.exit_code,
                       fmt.seconds_between(att.started_at, att.finished_at), excerpt, href,
                       f"a{att.action_id}-{att.number}")


def graph(stages: tuple[StageView, ...]) -> charts.Graph | None:
    """The run as columns of stages and boxes of actions."""
    if not stages:
        return None
    out = []
    for s in stages:
        orders = sorted({a.run_order for a in s.actions})
        groups = tuple(tuple(charts.GraphAction(a.id, a.name, a.shown_status, _detail(a), f"#{a.anchor}",
                                                a.group, f"{a.status}, allowed" if a.warning else a.status)
                             for a in s.actions if a.run_order == order) for order in orders)
        out.append(charts.GraphStage(s.name, s.status, groups))
    return charts.pipeline_graph(out)


def _detail(a: ActionView) -> str:
    parts = [fmt.duration(a.seconds) if a.seconds is not None else a.status]
    if a.warning:
        parts.insert(0, "allowed to fail")
    if a.reused_from:
        parts = [f"reused from #{a.reused_from}"]
    if len(a.attempts) > 1:
        parts.append(f"{len(a.attempts)} attempts")
    return " · ".join(parts)
