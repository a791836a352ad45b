"""Notifications: webhooks (JSON POST) and commands (JSON on stdin) for run events.

Sent from a background thread, retried a few times; a failing notification is logged
and never fails or blocks the run.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gitpipe import matching
from gitpipe import pipeline as pipeline_mod
from gitpipe.errors import PipelineError
from gitpipe.models import Event, EventKind, NotifySpec
from gitpipe.settings import Settings

if TYPE_CHECKING:
    from gitpipe.sandbox import Sandbox

log = logging.getLogger("gitpipe")
TIMEOUT = 10.0
ATTEMPTS = 3
BACKOFF = 2.0  # seconds before the 2nd attempt, doubled after


@dataclass(frozen=True)
class Message:
    event: str
    payload: dict[str, Any]
    targets: tuple[NotifySpec, ...]
    network: bool | None = None  # the pipeline's [pipeline] network (False: its commands and webhooks get none)


def event_name(ev: Event) -> str | None:
    """The notification event (SPEC section 9) a stored change is, if any."""
    if ev.kind is EventKind.RUN and ev.status in ("succeeded", "failed", "cancelled"):
        return ev.status
    if ev.kind is EventKind.ACTION and ev.status == "waiting":  # only an approval action waits
        return "approval"
    if ev.kind is EventKind.RELEASE and ev.status in ("deployed", "rolled-back"):
        return ev.status
    return None


def warnings(store: Any, run_id: int) -> list[str]:
    """The run's allowed failures, as "stage/action: status (message)": what a succeeded run warns of."""
    return [f"{a.stage}/{a.name}: {a.status.value}" + (f" ({a.message})" if a.message else "")
            for a in store.actions(run_id) if a.warning]


class Notifier:
    """A store listener: turns events into notifications, sent by one worker thread."""

    def __init__(self, settings: Settings, store: Any, sandbox: Sandbox | None = None) -> None:
        self.settings = settings
        self.store = store
        self.sandbox = sandbox
        self.queue: queue.Queue[Message | None] = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="notify", daemon=True)
        self.thread.start()

    def on_event(self, ev: Event) -> None:
        name = event_name(ev)
        if name is None or not ev.run_id:
            return
        run = self.store.run(ev.run_id)
        found, network = self._targets(run.repo, ev.run_id)
        targets = tuple(t for t in found if name in t.on)
        if not targets:
            return
        url = f"{self.settings.site_url}/{run.repo}/runs/{run.id}.html" if self.settings.site_url else None
        payload = {"event": name, "run": run.id, "repo": run.repo, "pipeline": run.pipeline,
                   "ref": run.ref, "sha": run.sha, "status": run.status.value, "url": url,
                   "detail": ev.detail, "warnings": warnings(self.store, run.id),
                   **self._details(name, ev, run)}
        self.queue.put(Message(name, payload, targets, network))

    def _details(self, name: str, ev: Event, run: Any) -> dict[str, Any]:
        """What the event is about: the environment and release of a deploy event, the failing
        action of `failed`, who cancelled and why for `cancelled`."""
        if ev.kind is EventKind.RELEASE:
            row = self.store.release_by_run(run.id, ev.environment or "")
            return {"environment": ev.environment, "release": row.release if row else None,
                    "from_release": row.from_release if row else None}
        if name == "failed":
            failed = [a for a in self.store.actions(run.id) if a.status.value in ("failed", "timed-out")]
            if not failed:
                return {"action": None}
            first = failed[0]
            return {"action": f"{first.stage}/{first.name}", "detail": ev.detail or first.message}
        if name == "cancelled":
            reason = run.cancel_reason or "no reason given"
            return {"cancelled_by": run.cancelled_by, "reason": reason,
                    "detail": ev.detail or f"cancelled by {run.cancelled_by or '?'}: {reason}"}
        return {}

    def _targets(self, repo: str, run_id: int) -> tuple[list[NotifySpec], bool | None]:
        """The host's [notify] (line 0) and the pipeline's [[notify]]; and the pipeline's network."""
        found = []
        s = self.settings
        if s.notify_on and (s.notify_webhook or s.notify_command):
            found.append(NotifySpec(on=s.notify_on, line=0, webhook=s.notify_webhook or None,
                                    command=s.notify_command or None))
        network = None
        try:
            pipe = pipeline_mod.parse(self.store.pipeline_text(run_id) or "", default_name=repo)
            found += list(pipe.notify)
            network = pipe.network
        except PipelineError:
            pass
        return found, network

    def close(self, timeout: float = 5.0) -> None:
        self.queue.put(None)
        self.thread.join(timeout)

    def _work(self) -> None:
        while (msg := self.queue.get()) is not None:
            for target in msg.targets:
                self._send(target, msg)

    def _send(self, target: NotifySpec, msg: Message) -> None:
        delay = BACKOFF
        for attempt in range(1, ATTEMPTS + 1):
            try:
                if target.webhook and self._may_post(target, msg):
                    post(target.webhook, msg.payload)
                if target.command:
                    self._command(target, msg)
                return
            except Exception as exc:
                where = target.webhook or target.command
                log.warning("notification %s for run #%s to %s failed (attempt %d/%d): %s",
                            msg.event, msg.payload["run"], where, attempt, ATTEMPTS, exc)
                if attempt < ATTEMPTS:
                    time.sleep(delay)
                    delay *= 2


    def _may_post(self, target: NotifySpec, msg: Message) -> bool:
        """A pipeline's webhook is sent by the daemon: it obeys the network its actions get."""
        if target.line == 0 or self.sandbox is None or self.sandbox.network(msg.network):
            return True
        log.warning("notification %s for run #%s: webhook %s not sent: the network is off for this "
                    "pipeline ([sandbox] or [pipeline] network = false)", msg.event, msg.payload["run"],
                    target.webhook)
        return False

    def _command(self, target: NotifySpec, msg: Message) -> None:
        """A host command ([notify] in gitpipe.toml, line 0) runs as the daemon; a pipeline's, confined."""
        if target.line == 0 or self.sandbox is None:
            return run_command(target.command or "", msg.payload)
        from gitpipe.sandbox import Confine

        key = f"notify-{uuid.uuid4().hex[:12]}"
        box = Confine(key=key, home=self.settings.work_dir / ".notify" / key, network=self.sandbox.network(msg.network))
        return run_command(target.command or "", msg.payload, lambda argv, data: self.sandbox.run(  # type: ignore[union-attr]
            argv, command_env(msg.payload), box, data, TIMEOUT_COMMAND))


def post(url: str, payload: dict[str, Any]) -> None:
    """POST the event as JSON; raises on a non-2xx answer or a timeout."""
    import urllib.request  # ~8 MB (http, email, ssl): loaded by the first webhook

    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": "gitpipe"})
    with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
        if resp.status >= 300:
            raise OSError(f"HTTP {resp.status}")


def shell_safe(value: str) -> str:
    """A placeholder value made inert in any shell quoting context (a branch name is push data)."""
    return re.sub(r"[^A-Za-z0-9._/@+=:,#%-]", "_", value)


TIMEOUT_COMMAND = 60.0


def command_env(payload: dict[str, Any]) -> dict[str, str]:
    """The documented variables of a notify command (and LANG, TZ); nothing else of the daemon's."""
    env = {k: os.environ[k] for k in ("LANG", "TZ") if k in os.environ}
    env.update({"GITPIPE_EVENT": str(payload["event"]), "GITPIPE_RUN": str(payload["run"]),
                "GITPIPE_REPO": payload["repo"], "GITPIPE_PIPELINE": payload["pipeline"],
                "GITPIPE_REF": payload["ref"], "GITPIPE_SHA": payload["sha"],
                "GITPIPE_STATUS": payload["status"], "GITPIPE_ENVIRONMENT": payload.get("environment") or ""})
    return env


Runner = Callable[[list[str], bytes], "subprocess.CompletedProcess[bytes]"]


def run_command(command: str, payload: dict[str, Any], runner: Runner | None = None) -> None:
    """Run the command with the event JSON on stdin; placeholder values are made shell-inert."""
    values = matching.placeholder_values(payload["run"], payload["pipeline"], payload["repo"],
                                             payload["ref"], payload["sha"], payload.get("environment") or "")
    script = matching.expand(command, {k: shell_safe(v) for k, v in values.items()})
    data = json.dumps(payload).encode()
    if runner is not None:
        proc = runner(["bash", "-c", script], data)
    else:
        proc = subprocess.run(["bash", "-c", script], input=data, capture_output=True,
                              timeout=TIMEOUT_COMMAND, check=False)
    if proc.returncode != 0:
        raise OSError(f"exit status {proc.returncode}: {proc.stderr.decode(errors='replace')[-200:]}")
