"""The report's view of environments: each one's current release and its history.

A releases row records what an environment runs *after* the event (delivery.py's
convention, see models.ReleaseRecord): a 'deployed' row its new release, a 'rolled-back'
row the release it went back to. So the current release is the newest 'deployed' or
'rolled-back' row's. Every row names its release's own run and sha. The rows come from
the store (Store.releases); nothing here runs SQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gitpipe.models import ReleaseRecord

if TYPE_CHECKING:
    from gitpipe.store import Store

HISTORY_LIMIT = 500  # releases per repo read for the environments page


@dataclass(frozen=True)
class Environment:
    """An environment: what it runs now and its history."""

    name: str
    current: ReleaseRecord | None  # the row that deployed the release it runs now
    history: tuple[ReleaseRecord, ...]  # newest first
    switched: ReleaseRecord | None = None  # the row that made it current (a rollback, or `current`)


def environments(store: Store, repo: str) -> list[Environment]:
    """Each environment of a repo with its current release and history, in delivery order."""
    by_env: dict[str, list[ReleaseRecord]] = {}
    for rel in store.releases(repo, limit=HISTORY_LIMIT):
        by_env.setdefault(rel.environment, []).append(rel)
    return [Environment(name, current_release(history), tuple(history), _switched(history))
            for name, history in sorted(by_env.items(), key=_env_order)]


def _switched(history: list[ReleaseRecord]) -> ReleaseRecord | None:
    return next((r for r in history if r.status in ("deployed", "rolled-back")), None)


def current_release(history: list[ReleaseRecord]) -> ReleaseRecord | None:
    """The release an environment runs now (history newest first), with the run that deployed it."""
    now = _switched(history)
    if now is None:
        return None
    # The row of the deploy that put the release there (when, by whom), if it is still listed.
    return next((r for r in history if r.status == "deployed" and r.release == now.release), now)


def _env_order(item: tuple[str, list[ReleaseRecord]]) -> tuple[int, str]:
    """Environments in delivery order: staging-like first, production last, others by name."""
    name = item[0].lower()
    rank = 0 if name.startswith(("dev", "test", "qa")) else 1 if name.startswith(("stag", "pre")) else \
        3 if name.startswith("prod") else 2
    return rank, name

