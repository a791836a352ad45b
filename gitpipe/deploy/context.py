"""The records a deploy takes in and hands back; no I/O."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# DeployResult.status values.
DEPLOYED = "deployed"
ROLLED_BACK = "rolled-back"
FAILED = "failed"


@dataclass(frozen=True)
class DeployContext:
    """Who deploys what, and where output and trust come from."""

    run_id: int
    sha: str
    short_sha: str
    environment: str
    known_hosts: Path  # checked strictly: an unknown or changed host key fails the deploy
    identity: Path | None  # private key file; None: paramiko's default keys and the agent
    log: Callable[[str], None]  # one line for the action's log
    connect_timeout: float = 15.0
    holder: str = ""  # written into the lock, e.g. "run #12 on buildhost pid 123 at 2026-..."

    @property
    def release(self) -> str:
        """The release name of this run: `<run>-<short_sha>`."""
        return f"{self.run_id}-{self.short_sha}"


@dataclass(frozen=True)
class TargetOutcome:
    """Where `current` pointed on one target before and after (release names)."""

    url: str
    previous: str | None
    current: str | None
    live_slot: str | None = None  # blue-green: the slot `current` points at after
    idle_release: str | None = None  # blue-green: what the other slot holds after


@dataclass(frozen=True)
class DeployResult:
    """What a deploy or rollback did: "deployed", "rolled-back" or "failed" (no switch anywhere)."""

    status: str
    release: str
    targets: tuple[TargetOutcome, ...]
    message: str
    warning: str = ""  # a rollback that switched but whose after_switch or healthcheck failed


class SerialLog:
    """ctx.log made safe for the upload threads: whole lines, one at a time."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self._log = log
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self._lock:
            self._log(line)


def slots(outcomes: tuple[TargetOutcome, ...]) -> dict[str, str | None]:
    """Blue-green: the live slot and what the idle one holds (per target when they differ)."""
    def one(values: list[str | None]) -> str | None:
        if len(set(values)) == 1:
            return values[0]
        return ", ".join(f"{o.url}: {v or '-'}" for o, v in zip(outcomes, values, strict=True))

    if not any(o.live_slot for o in outcomes):
        return {"live_slot": None, "idle_release": None}
    return {"live_slot": one([o.live_slot for o in outcomes]), "idle_release": one([o.idle_release for o in outcomes])}
