"""States and the frozen records everything else passes around.

Which state may follow which is lifecycle.py's to say. No I/O here: this module is imported
by every other one, including the git hook.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from gitpipe.refs import branch_of, tag_of


class RunStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED_RUN


class ActionStatus(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed-out"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    @property
    def finished(self) -> bool:
        return self in FINISHED_ACTION

    @property
    def ok(self) -> bool:
        return self in (ActionStatus.SUCCEEDED, ActionStatus.SKIPPED)

    @property
    def failure(self) -> bool:
        """A failure `allow_failure` can let pass: the script failed or ran out of time (a cancel is none)."""
        return self in (ActionStatus.FAILED, ActionStatus.TIMED_OUT)


FINISHED_RUN = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})
FINISHED_ACTION = frozenset(
    {
        ActionStatus.SUCCEEDED,
        ActionStatus.FAILED,
        ActionStatus.TIMED_OUT,
        ActionStatus.SKIPPED,
        ActionStatus.CANCELLED,
    }
)

# --------------------------------------------------------------------------- pipeline


@dataclass(frozen=True)
class When:
    """Conditions under which an action runs (else it is skipped)."""

    branches: tuple[str, ...] | None = None  # None: no condition on branches
    tags: tuple[str, ...] | None = None


@dataclass(frozen=True)
class CacheSpec:
    """One `cache = [{ key = [...], paths = [...] }]` item of an action (SPEC section 14)."""

    key: tuple[str, ...]  # globs relative to the worktree: their files' contents make the key
    paths: tuple[str, ...]  # relative to the worktree, or "~" / "~/..." (the attempt's home)


@dataclass(frozen=True)
class ActionSpec:
    """One action of a pipeline, as parsed and validated from `.pipeline.toml`."""

    name: str
    line: int
    type: str = "run"  # "run", "approval", "deploy" or a plugin type
    run: str | None = None
    run_order: int = 1
    inputs: tuple[str, ...] = ()
    outputs: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (artifact name, globs)
    timeout: float = 30 * 60.0  # seconds
    retries: int = 0
    env: tuple[tuple[str, str], ...] = ()
    secrets: tuple[str, ...] = ()
    when: When | None = None
    network: bool | None = None  # False: this action runs without network
    runs_on: tuple[str, ...] | None = None  # worker labels (SPEC section 13); None: the pipeline's
    allow_failure: bool = False  # a failure (or timeout) is a warning; the stage and run go on
    # a copy of a `matrix` action: the name as written (the group) and this copy's values
    group: str | None = None
    matrix: tuple[tuple[str, str], ...] = ()
    cache: tuple[CacheSpec, ...] = ()
    # approval
    message: str | None = None
    approvers: tuple[str, ...] | None = None  # None: whoever can open the gitpipe home
    # deploy
    environment: str | None = None
    targets: tuple[str, ...] = ()
    source: str | None = None
    keep: int = 5
    shared: tuple[str, ...] = ()
    before_switch: str | None = None
    after_switch: str | None = None
    healthcheck: str | None = None
    healthcheck_retries: int = 3
    monitor: float = 0.0  # seconds
    monitor_interval: float = 10.0  # seconds between healthchecks of the monitor window
    strategy: str = "rolling"
    # keys of a plugin action type, passed to the plugin as they were written
    extra: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class StageSpec:
    name: str
    line: int
    actions: tuple[ActionSpec, ...]

    def groups(self) -> list[tuple[int, list[ActionSpec]]]:
        """Actions grouped by run_order, lowest first."""
        orders = sorted({a.run_order for a in self.actions})
        return [(o, [a for a in self.actions if a.run_order == o]) for o in orders]


@dataclass(frozen=True)
class ScheduleSpec:
    """One `[trigger] schedule` entry: a cron line (UTC) and the branch it runs (None: the default one)."""

    cron: str
    branch: str | None = None


@dataclass(frozen=True)
class TriggerSpec:
    branches: tuple[str, ...] = ("*",)
    tags: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    schedule: tuple[ScheduleSpec, ...] = ()
    superseded: str = "queue"  # "queue", "cancel" or "parallel"


@dataclass(frozen=True)
class NotifySpec:
    on: tuple[str, ...]
    line: int
    webhook: str | None = None
    command: str | None = None


@dataclass(frozen=True)
class InputSpec:
    """One input of a manual run (`[inputs.NAME]`); required when it has no default."""

    name: str
    line: int
    description: str = ""
    default: str | None = None
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pipeline:
    name: str
    timeout: float | None  # seconds, whole run; None = no limit
    trigger: TriggerSpec
    env: tuple[tuple[str, str], ...]
    stages: tuple[StageSpec, ...]
    notify: tuple[NotifySpec, ...] = ()
    network: bool | None = None  # False: every action runs without network
    inputs: tuple[InputSpec, ...] = ()
    runs_on: tuple[str, ...] = ()  # worker labels of every action that names none

    def action(self, stage: str, name: str) -> ActionSpec:
        for s in self.stages:
            if s.name == stage:
                for a in s.actions:
                    if a.name == name:
                        return a
        raise KeyError(f"{stage}/{name}")

    def stage_of(self, spec: ActionSpec) -> str:
        """The name of the stage that holds this very action spec ("" if none does)."""
        for s in self.stages:
            if any(a is spec for a in s.actions):
                return s.name
        return ""


# --------------------------------------------------------------------------- refs


@dataclass(frozen=True)
class RefUpdate:
    """One line of a post-receive hook's standard input."""

    old: str
    new: str
    ref: str

    @property
    def deleted(self) -> bool:
        return set(self.new) == {"0"}

    @property
    def created(self) -> bool:
        return set(self.old) == {"0"}

    @property
    def branch(self) -> str | None:
        return branch_of(self.ref)

    @property
    def tag(self) -> str | None:
        return tag_of(self.ref)


@dataclass(frozen=True)
class RunRecord:
    """A run as stored, the shape of `gitpipe runs --json`."""

    id: int
    repo: str
    pipeline: str
    ref: str
    sha: str
    status: RunStatus
    trigger: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    error: str | None
    pusher: str | None = None
    before_sha: str | None = None
    retry_of: int | None = None
    cancelled_by: str | None = None
    cancel_reason: str | None = None
    commit_author: str | None = None
    commit_message: str | None = None
    warnings: int = 0  # actions that failed with allow_failure
    reused: int = 0  # actions taken over from the retried run (`retry --failed`)
    inputs: tuple[tuple[str, str], ...] = ()  # (name, value) of a run's inputs
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class StageRecord:
    run_id: int
    idx: int
    name: str
    status: ActionStatus
    started_at: str | None
    finished_at: str | None


@dataclass(frozen=True)
class ActionRecord:
    id: int
    run_id: int
    stage_idx: int
    idx: int
    stage: str
    name: str
    type: str
    run_order: int
    status: ActionStatus
    exit_code: int | None
    started_at: str | None
    finished_at: str | None
    attempts: int
    message: str | None
    allow_failure: bool = False
    group: str | None = None  # the matrix action this is a copy of (its name as written)
    matrix: tuple[tuple[str, str], ...] = ()  # the copy's matrix values
    reused_from: int | None = None  # `retry --failed`: the run whose result this action took over

    @property
    def passed(self) -> bool:
        """Whether the run goes on past this action: it succeeded, was skipped, or failed allowed."""
        return self.status.ok or self.warning

    @property
    def warning(self) -> bool:
        """A failure let pass by `allow_failure`: shown as a warning, the run goes on."""
        return self.allow_failure and self.status.failure


@dataclass(frozen=True)
class AttemptRecord:
    id: int
    action_id: int
    number: int
    status: ActionStatus
    exit_code: int | None
    started_at: str
    finished_at: str | None
    deadline: float | None
    log_path: str
    token: str


@dataclass(frozen=True)
class ArtifactRecord:
    run_id: int
    name: str
    action: str
    size: int
    sha256: str
    path: str
    files: int


@dataclass(frozen=True)
class CacheEntry:
    """A stored build cache entry (SPEC section 14); its files are under build-cache/entries/<id>."""

    id: str
    repo: str
    action: str  # "stage/action"
    slot: str  # hash of the cached paths: entries of one `cache` item of an action
    key: str  # hash of the key files' contents, the repo, the action and the paths
    paths: tuple[str, ...]
    protected: bool  # saved by a run of a protected ref
    secrets: bool  # saved by an attempt that received secrets
    host: str  # the host that holds its files
    size: int
    files: int
    created_at: str
    last_used_at: str
    run_id: int | None


@dataclass(frozen=True)
class CacheUse:
    """What one attempt did with one of its caches: restored (exact/warm/none) and saved."""

    action_id: int
    attempt: int
    idx: int
    paths: tuple[str, ...]
    match: str  # "exact", "warm" or "none"
    entry: str | None = None
    restored_size: int | None = None
    restore_seconds: float | None = None
    saved_entry: str | None = None
    saved_size: int | None = None
    save_seconds: float | None = None
    note: str | None = None


@dataclass(frozen=True)
class RepoRecord:
    """A registered repo."""

    name: str
    path: str
    added_at: str


@dataclass(frozen=True)
class OutputRecord:
    """One output value an action set (`gitpipe-output KEY VALUE`)."""

    action: str
    key: str
    value: str


@dataclass(frozen=True)
class RefusalRecord:
    """An attempt to decide an approval by an account that may not."""

    action: str
    decision: str  # "approve" or "reject": what they tried
    by_user: str
    at: str
    reason: str


@dataclass(frozen=True)
class ApprovalRecord:
    """An approval action's request and its decision (None while undecided)."""

    id: int
    run_id: int
    action_id: int
    action: str
    message: str | None
    requested_at: str
    deadline: float | None
    decision: str | None  # "approved", "rejected", "timed-out"; None while waiting
    by_user: str | None
    at: str | None
    comment: str | None
    note: str | None = None  # a warning: approvers unknown on this host
    stage: str | None = None  # the approval action's stage (pending_approval fills it in)
    refused: tuple[RefusalRecord, ...] = ()  # attempts by accounts that may not (approvals() fills it in)


@dataclass(frozen=True)
class ReleaseRecord:
    """One row of an environment's history: what it runs *after* the event it records.

    A 'deployed' row its new release, a 'rolled-back' row the release it went back to, a
    'failed' row the release that stayed. `run_id` and `sha` are the release's own (the run
    that built it); `by_run` the run whose deploy wrote the row (None: a rollback by hand).
    """

    id: int
    repo: str
    environment: str
    release: str
    status: str  # "deployed", "rolled-back", "failed"
    at: str
    targets: tuple[str, ...]
    run_id: int | None = None
    action_id: int | None = None
    sha: str | None = None
    by_user: str | None = None
    message: str | None = None
    by_run: int | None = None
    from_release: str | None = None  # a rollback's release left
    strategy: str | None = None
    live_slot: str | None = None  # blue-green: the slot live after it
    idle_release: str | None = None  # blue-green: what the idle slot holds


@dataclass(frozen=True)
class DeployRecord:
    """A deploy in flight (or finished): what a daemon restarted after a crash checks."""

    action_id: int
    run_id: int
    repo: str
    environment: str
    release: str
    targets: tuple[str, ...]
    started_at: str
    finished_at: str | None


class EventKind(str, enum.Enum):
    """What a stored change is about; each kind names the ids it carries (see Event)."""

    RUN = "run"  # a run's status (and "cancel-requested", "pruned")
    STAGE = "stage"  # a stage's status: `stage` is its index
    ACTION = "action"  # an action's status: `action_id`
    APPROVAL = "approval"  # a decision on the approval a run waits on: approved, rejected, timed-out, refused
    RELEASE = "release"  # an environment's release: deployed, rolled-back, failed; `environment`


@dataclass(frozen=True)
class Event:
    """A stored change of state, handed to listeners (report, notifications) after commit.

    Build one with its kind's constructor (Event.run, Event.stage, ...); the store writes and
    reads it through events.encode/decode, the one place that knows the stored text.
    """

    run_id: int  # 0: no run (a rollback by hand)
    kind: EventKind
    status: str
    detail: str | None = None
    stage: int | None = None  # STAGE: the stage's index
    action_id: int | None = None  # ACTION
    environment: str | None = None  # RELEASE
    at: str | None = field(default=None, compare=False)  # when it was stored (read back from the store)

    @classmethod
    def of_run(cls, run_id: int, status: str, detail: str | None = None) -> Event:
        return cls(run_id, EventKind.RUN, status, detail)

    @classmethod
    def of_stage(cls, run_id: int, idx: int, status: str) -> Event:
        return cls(run_id, EventKind.STAGE, status, stage=idx)

    @classmethod
    def of_action(cls, run_id: int, action_id: int, status: str, detail: str | None = None) -> Event:
        return cls(run_id, EventKind.ACTION, status, detail, action_id=action_id)

    @classmethod
    def of_approval(cls, run_id: int, status: str, detail: str | None = None) -> Event:
        return cls(run_id, EventKind.APPROVAL, status, detail)

    @classmethod
    def of_release(cls, run_id: int, environment: str, status: str, detail: str | None = None) -> Event:
        return cls(run_id, EventKind.RELEASE, status, detail, environment=environment)
