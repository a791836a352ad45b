"""Notifications: webhooks (JSON POST) and commands (JSON on stdin) for run events.

Sent from a background thread, retried a few times; a failing notification is logged
and never fails or blocks the run.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from gitpipe import pipeline as pipeline_mod
from gitpipe.errors import PipelineError
from gitpipe.models import Event, NotifySpec
from gitpipe.settings import Settings

log = logging.getLogger("gitpipe")
TIMEOUT = 10.0
ATTEMPTS = 3
BACKOFF = 2.0  # seconds before the 2nd attempt, doubled after


@dataclass(frozen=True)
class Message:
    event: str
    payload: dict[str, Any]
    targets: tuple[NotifySpec, ...]


def event_name(ev: Event) -> str | None:
    """The notification event (SPEC section 9) a stored change is, if any."""
    if ev.subject == "run" and ev.status in ("succeeded", "failed", "cancelled"):
        return ev.status
    if ev.subject.startswith("action:") and ev.status == "waiting":
        return "approval"
    if ev.subject.startswith("release:") and ev.status in ("deployed", "rolled-back"):
        return ev.status
    return None


class Notifier:
    """A store listener: turns events into notifications, sent by one worker thread."""

    def __init__(self, settings: Settings, store: Any) -> None:
        self.settings = settings
        self.store = store
        self.queue: queue.Queue[Message | None] = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="notify", daemon=True)
        self.thread.start()

    def on_event(self, ev: Event) -> None:
        name = event_name(ev)
        if name is None or not ev.run_id:
            return
        run = self.store.run(ev.run_id)
        targets = tuple(t for t in self._targets(run.repo, ev.run_id) if name in t.on)
        if not targets:
            return
        url = f"{self.settings.site_url}/{run.repo}/runs/{run.id}.html" if self.settings.site_url else None
        payload = {"event": name, "run": run.id, "repo": run.repo, "pipeline": run.pipeline,
                   "ref": run.ref, "sha": run.sha, "status": run.status.value, "url": url,
                   "detail": ev.detail}
        self.queue.put(Message(name, payload, targets))

    def _targets(self, repo: str, run_id: int) -> list[NotifySpec]:
        found = []
        s = self.settings
        if s.notify_on and (s.notify_webhook or s.notify_command):
            found.append(NotifySpec(on=s.notify_on, line=0, webhook=s.notify_webhook or None,
                                    command=s.notify_command or None))
        try:
            pipe = pipeline_mod.parse(self.store.pipeline_text(run_id) or "", default_name=repo)
            found += list(pipe.notify)
        except PipelineError:
            pass
        return found

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
                if target.webhook:
                    post(target.webhook, msg.payload)
                if target.command:
                    run_command(target.command, msg.payload)
                return
            except Exception as exc:
                where = target.webhook or target.command
                log.warning("notification %s for run #%s to %s failed (attempt %d/%d): %s",
                            msg.event, msg.payload["run"], where, attempt, ATTEMPTS, exc)
                if attempt < ATTEMPTS:
                    time.sleep(delay)
                    delay *= 2


def post(url: str, payload: dict[str, Any]) -> None:
    """POST the event as JSON; raises on a non-2xx answer or a timeout."""
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": "gitpipe"})
    with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
        if resp.status >= 300:
            raise OSError(f"HTTP {resp.status}")


def shell_safe(value: str) -> str:
    """A placeholder value made inert in any shell quoting context (a branch name is push data)."""
    return re.sub(r"[^A-Za-z0-9._/@+=:,#%-]", "_", value)


def run_command(command: str, payload: dict[str, Any]) -> None:
    """Run the command with the event JSON on stdin; placeholder values are made shell-inert."""
    values = pipeline_mod.placeholder_values(payload["run"], payload["pipeline"], payload["repo"],
                                             payload["ref"], payload["sha"])
    script = pipeline_mod.expand(command, {k: shell_safe(v) for k, v in values.items()})
    proc = subprocess.run(["bash", "-c", script], input=json.dumps(payload).encode(), capture_output=True,
                          timeout=60, check=False)
    if proc.returncode != 0:
        raise OSError(f"exit status {proc.returncode}: {proc.stderr.decode(errors='replace')[-200:]}")
