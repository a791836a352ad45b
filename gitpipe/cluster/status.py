"""What `gitpipe workers` shows: the live workers as their heartbeats on the broker say."""

from __future__ import annotations

from typing import Any

import redis

from gitpipe.cluster import channel
from gitpipe.cluster.channel import redact
from gitpipe.cluster.dispatch import live_workers
from gitpipe.errors import UsageError
from gitpipe.settings import Settings


def broker_of(settings: Settings) -> str:
    if settings.cluster is None:
        raise UsageError(f"{settings.config_path} has no [cluster] table",
                         hint='add [cluster] with broker = "redis://HOST:6379/0", or pass --broker URL')
    return settings.cluster.broker


def workers(broker: str) -> list[dict[str, Any]]:
    """One dict per live worker: name, labels, slots, running (a count), attempts, heartbeat, host."""
    try:
        return [w.json() for w in live_workers(channel.connect(broker))]
    except redis.RedisError as exc:
        raise UsageError(f"the broker {redact(broker)} cannot be reached: {exc}",
                         hint="is redis-server running there, and are the URL and password right?") from None


