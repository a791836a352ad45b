"""Who may decide an approval, and deciding it: the one place that checks `approvers`.

The person deciding is the Unix account of the process that asks, as the kernel knows it;
never a name from the command line or the environment (`getpass.getuser()` reads $USER,
which anyone can set):
- `gitpipe approve` run by an account that can open the home decides directly, as
  `os.getuid()`;
- every other account asks the daemon through its control socket (control.py), where the
  kernel tells the daemon who connected (SO_PEERCRED).
An account's groups are its groups in the group database (`id NAME` shows the same), not
the ones a session happened to start with: a user removed from a group loses it at once.

Rules (README, "Who may approve"):
- without `approvers`, whoever can open the home decides (root, the daemon's user), as before;
- with `approvers`, only the listed users and members of the listed groups; root is no
  exception (it can always cancel the run). An account that can write gitpipe.db can of
  course forge anything: `approvers` is a hard fence for every other account;
- the sandbox's build user never decides, nor does the daemon's own user through the
  socket (in the unprivileged setup actions run as that user).
Every refusal is recorded (who, when, what they tried, why) and shown with the run.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

from gitpipe import pipeline as pipeline_mod
from gitpipe import queue
from gitpipe.errors import ApprovalRefused, PipelineError
from gitpipe.models import ApprovalRecord
from gitpipe.settings import Settings
from gitpipe.store import Store

COMMENT_LIMIT = 2000  # characters of a decision's comment


@dataclass(frozen=True)
class Person:
    """A Unix account as the kernel and the user/group databases know it."""

    uid: int
    name: str
    groups: tuple[str, ...]
    known: bool = True  # False: a uid with no account in the user database (name = the number)


def person(uid: int) -> Person:
    """The account of `uid`, with the names of its groups (an unnamed uid is its number)."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return Person(uid, str(uid), (), known=False)
    names = []
    for gid in os.getgrouplist(entry.pw_name, entry.pw_gid):
        try:
            names.append(grp.getgrgid(gid).gr_name)
        except KeyError:
            names.append(str(gid))
    return Person(uid, entry.pw_name, tuple(names))


def me() -> Person:
    """The account running this process (its real uid: a setuid bit changes nothing here)."""
    return person(os.getuid())


def unknown(approvers: tuple[str, ...]) -> list[str]:
    """The approvers that name no user or group of this host."""
    missing = []
    for entry in approvers:
        try:
            if entry.startswith("group:"):
                grp.getgrnam(entry.removeprefix("group:"))
            else:
                pwd.getpwnam(entry)
        except KeyError:
            missing.append(entry)
    return missing


def refusal(settings: Settings, approvers: tuple[str, ...] | None, who: Person, action: str,
            via_socket: bool) -> str | None:
    """Why `who` may not decide the approval `action`, or None when they may."""
    if not who.known:  # never matched by name: "1001" in approvers names an account, not a uid
        return f"uid {who.uid} has no account in this host's user database"
    if who.name == settings.sandbox.user:
        return f"{who.name} is the build user that runs pushed scripts; it never decides an approval"
    if via_socket and who.uid == os.geteuid():
        return (f"{who.name} is the daemon's own user, which actions may run as; "
                "it decides with access to the home, not through the socket")
    if approvers is None:
        if not via_socket:
            return None
        return (f'"{action}" names no approvers, so only accounts that can open the gitpipe home may decide it '
                f'(list others in the pipeline: approvers = ["{who.name}"] or ["group:NAME"])')
    groups = {f"group:{g}" for g in who.groups}
    if who.name in approvers or groups & set(approvers):
        return None
    return f'{who.name} is not one of the approvers of "{action}" ({", ".join(approvers)})'


def approvers_of(store: Store, run_id: int, stage: str, action: str) -> tuple[str, ...] | None:
    """The `approvers` of an approval action, from the pipeline file the run runs."""
    try:
        pipe = pipeline_mod.parse(store.pipeline_text(run_id) or "")
        return pipe.action(stage, action).approvers
    except (PipelineError, KeyError):  # cannot be for a waiting run; nobody listed = home only
        return None


def decide(settings: Settings, store: Store, run_id: int, approved: bool, comment: str | None,
           who: Person, *, via_socket: bool = False) -> ApprovalRecord:
    """Approve or reject the approval a run waits on, as `who`; ApprovalRefused (recorded) when
    `who` may not, TransitionError when the run waits on no approval."""
    verb = "approve" if approved else "reject"
    if comment is not None and len(comment) > COMMENT_LIMIT:
        comment = comment[:COMMENT_LIMIT] + "…"
    row = store.pending_approval(run_id)
    why = refusal(settings, approvers_of(store, run_id, row.stage or "", row.action), who, row.action, via_socket)
    if why is not None:
        store.refuse_approval(row, verb, who.name, why)
        queue.wake(settings, "approval")  # the daemon hears the refusal event and renders the page
        raise ApprovalRefused(f'run #{run_id}: {who.name} may not {verb} "{row.action}": {why}',
                              hint="this attempt was recorded")
    decided = store.decide(run_id, "approved" if approved else "rejected", who.name, comment,
                           action_id=row.action_id)
    queue.wake(settings, "approval")
    return decided
