"""Target URLs, and a session: the targets of one deploy opened, locked and read, then let go."""

from __future__ import annotations

import getpass
import posixpath
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self
from urllib.parse import unquote, urlsplit

from gitpipe.deploy import lock
from gitpipe.deploy.context import DeployContext, TargetOutcome
from gitpipe.deploy.targets import FileTarget, Log, Target, TargetState, other_slot
from gitpipe.errors import DeployError


@dataclass(frozen=True)
class Address:
    """A parsed target URL."""

    url: str
    scheme: str  # "file" or "ssh"
    path: str
    user: str = ""
    host: str = ""
    port: int = 22

    @property
    def key(self) -> tuple[str, str, str, int, str]:
        return (self.scheme, self.user, self.host, self.port, self.path)


def parse(url: str) -> Address:
    """Check and split a target URL: `file:///path` or `ssh://user@host:port/path`."""
    parts = urlsplit(url)
    path = posixpath.normpath(unquote(parts.path)) if parts.path else ""
    if not path.startswith("/") or path == "/":
        raise DeployError(f'target "{url}": the path must be absolute and not "/"',
                          hint="e.g. file:///srv/shop or ssh://deploy@web1:22/srv/shop")
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise DeployError(f'target "{url}": a file:// target is on this host; use ssh:// for {parts.netloc}')
        return Address(url, "file", path)
    if parts.scheme == "ssh":
        if parts.password is not None:
            raise DeployError(f'target "{url}": passwords in target URLs are not supported',
                              hint="use a key: [ssh] identity in gitpipe.toml")
        try:
            port = parts.port or 22
        except ValueError:
            raise DeployError(f'target "{url}": the port is not a number') from None
        if not parts.hostname:
            raise DeployError(f'target "{url}": no host name')
        user = unquote(parts.username) if parts.username else getpass.getuser()
        return Address(url, "ssh", path, user, parts.hostname, port)
    raise DeployError(f'target "{url}": unknown scheme "{parts.scheme}"', hint="use file:// or ssh://")


def open_target(url: str, ctx: DeployContext, log: Log) -> Target:
    """Connect to a target (for ssh://: handshake, host key check and authentication)."""
    a = parse(url)
    if a.scheme == "file":
        return FileTarget(url, a.path)
    from gitpipe.deploy.ssh import SshTarget  # paramiko is only imported when an ssh:// target is used

    return SshTarget(url, a.user, a.host, a.port, a.path, ctx, log)


@dataclass
class Site:
    """One open target and what a deploy knows and did there."""

    target: Target
    state: TargetState  # as found when the session began
    now: str | None  # the release `current` points to now, as far as this deploy knows
    switched: bool = False  # `current` was (or may have been) switched by this deploy
    slot: str | None = None  # blue-green: the slot the new release went into
    links: dict[str, str] = field(default_factory=dict)  # the links as this deploy set them

    def __post_init__(self) -> None:
        self.links = {**self.state.links, **self.links}

    @property
    def url(self) -> str:
        return self.target.url

    def set_link(self, name: str, text: str | None) -> None:
        """Point (or, with None, remove) a link on the target, and remember it."""
        self.target.set_link(name, text)
        if text is None:
            self.links.pop(name, None)
        else:
            self.links[name] = text

    def outcome(self) -> TargetOutcome:
        now = TargetState(self.links)
        live = now.current_slot
        return TargetOutcome(self.url, self.state.current, self.now, live,
                             now.release_of(other_slot(live)) if live else None)


class Session:
    """Open (and lock) every target in order; `with` closes them and releases the locks."""

    def __init__(self, urls: list[str] | tuple[str, ...], ctx: DeployContext, log: Log, *,
                 locked: bool = True, prepare: bool = False) -> None:
        self.urls = list(urls)
        self.ctx, self.log = ctx, log
        self.locked, self.prepare = locked, prepare
        self.targets: list[Target] = []
        self.sites: list[Site] = []
        self.locks: dict[str, str] = {}  # url -> the lock text we wrote
        keys = [parse(u).key for u in self.urls]
        if len(set(keys)) != len(keys):
            raise DeployError("the same target is listed twice", hint="list each target once")

    def __enter__(self) -> Self:
        try:
            self._open()
        except BaseException:
            self._close()
            raise
        return self

    def _open(self) -> None:
        for url in self.urls:
            self.targets.append(open_target(url, self.ctx, self.log))
        if self.prepare:
            for t in self.targets:
                t.prepare()
        if self.locked:
            # A fixed order, so two deploys sharing some targets can never wait on each other.
            for t in sorted(self.targets, key=lambda t: t.url):
                self.locks[t.url] = lock.acquire(t, self.ctx, self.log)
        for t in self.targets:
            state = t.read_state()
            self.sites.append(Site(t, state, state.current))

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._close()

    def _close(self) -> None:
        for t in self.targets:
            text = self.locks.pop(t.url, None)
            if text:
                lock.release(t, text, self.log)
        for t in self.targets:
            t.close()

    def outcomes(self) -> tuple[TargetOutcome, ...]:
        """Per URL: what is known (None where the target could not be read)."""
        known = {s.url: s.outcome() for s in self.sites}
        return tuple(known.get(u, TargetOutcome(u, None, None)) for u in self.urls)
