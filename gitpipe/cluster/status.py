"""What `gitpipe workers` shows: the live workers as their heartbeats on the broker say."""

from __future__ import annotations

import json
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




def worker_caches(broker: str, repo: str | None = None) -> list[dict[str, Any]]:
    """The build cache entries the live workers hold (each lists its own in its heartbeat), as
    `gitpipe cache list --json` shows them, `where` = "worker"; least recently used first per worker."""
    fields: dict[str, type | tuple[type, ...]] = {"id": str, "repo": str, "action": str, "key": str, "paths": list, "protected": bool, "host": str,
              "size": int, "files": int, "created_at": str, "last_used_at": str, "run": (int, type(None))}
    try:
        r = channel.connect(broker)
        names = [w.name for w in live_workers(r)]
        raws = r.mget([channel.key("caches", n) for n in names]) if names else []
    except redis.RedisError as exc:
        raise UsageError(f"the broker {redact(broker)} cannot be reached: {exc}",
                         hint="is redis-server running there, and are the URL and password right?") from None
    out = []
    for name, raw in zip(names, raws):
        try:
            listed = json.loads(raw) if raw else []
        except ValueError:
            continue
        for d in listed if isinstance(listed, list) else []:
            if not isinstance(d, dict) or not all(isinstance(d.get(k), t) for k, t in fields.items()):
                continue  # not what a worker writes: left out
            if repo is None or d["repo"] == repo:
                out.append({**{k: d[k] for k in fields}, "host": name, "where": "worker"})
    return out
