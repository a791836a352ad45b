"""The Target interface every strategy is written against, the layout it manages, and FileTarget.

Layout under a target's path (Capistrano's):
    releases/<run>-<short_sha>/   one directory per release; complete once it holds .gitpipe-complete
    shared/                       outlives releases; `shared` paths are symlinked into each release
    current -> releases/NAME      (rolling) or -> blue / green (blue-green); switched by rename(2)
    blue -> releases/NAME         blue-green slots, see strategies.py
    green -> releases/NAME
    .gitpipe.lock                 held during a deploy or rollback, names its holder

Every link gitpipe writes is relative, so a target directory can be moved or mounted elsewhere.
"""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import re
import shutil
import signal
import subprocess
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from gitpipe.deploy.manifest import COMPLETE, MANIFEST, UploadPlan
from gitpipe.errors import DeployError

LOCK = ".gitpipe.lock"
SLOTS = ("blue", "green")
RELEASE_NAME = re.compile(r"^(\d+)-([0-9A-Za-z]+)$")
OUTPUT_GRACE = 1.0  # seconds to keep reading a script's output after it exited

Log = Callable[[str], None]


def other_slot(slot: str | None) -> str:
    """The idle slot when `slot` is live ("blue" when none is)."""
    return "green" if slot == "blue" else "blue"


def release_key(name: str) -> tuple[int, str]:
    """Sort key: by run number, so "9-x" comes before "10-y"."""
    m = RELEASE_NAME.match(name)
    return (int(m.group(1)) if m else -1, name)


@dataclass(frozen=True)
class TargetState:
    """The links and releases found on a target."""

    links: dict[str, str] = field(default_factory=dict)  # "current"/"blue"/"green" -> link text
    complete: tuple[str, ...] = ()  # oldest first
    incomplete: tuple[str, ...] = ()

    def release_of(self, link: str | None) -> str | None:
        """The release a link text names: "releases/N" -> N; "blue" -> what blue points at."""
        if link in SLOTS:
            link = self.links.get(link)
        if link and link.startswith("releases/"):
            return link[len("releases/"):]
        return None

    @property
    def current(self) -> str | None:
        return self.release_of(self.links.get("current"))

    @property
    def current_slot(self) -> str | None:
        link = self.links.get("current")
        return link if link in SLOTS else None

    @property
    def previous(self) -> str | None:
        """What a rollback goes to: blue-green's other slot if complete, else the release before current."""
        if self.current_slot:
            other = self.release_of(other_slot(self.current_slot))
            if other in self.complete and other != self.current:
                return other
        return self.before(self.current)

    def before(self, release: str | None) -> str | None:
        """The newest complete release older than `release`."""
        if release is None:
            return None
        older = [r for r in self.complete if release_key(r) < release_key(release)]
        return older[-1] if older else None


class Target(ABC):
    """One deploy destination: this host (FileTarget) or an SSH server (SshTarget)."""

    url: str
    root: str  # absolute path of the target directory on its host

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def release_dir(self, release: str) -> str:
        return self.path("releases", release)

    def space_hint(self) -> str:
        return f"free space on {self.where()} (df -h {self.root}) and deploy again"

    def where(self) -> str:
        return self.root

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def prepare(self) -> None:
        """Create the target directory, releases/ and shared/ if missing."""

    @abstractmethod
    def read_state(self) -> TargetState: ...

    @abstractmethod
    def read_manifest(self, release: str) -> bytes | None: ...

    @abstractmethod
    def upload(self, release: str, source: Path, plan: UploadPlan, shared: tuple[str, ...], log: Log) -> None:
        """Build releases/<release> from scratch: hard-links from plan.base, then plan.sent, then the
        `shared` links; flush it all to disk, and only then write the completion marker."""

    @abstractmethod
    def remove_releases(self, releases: list[str]) -> None: ...

    @abstractmethod
    def set_link(self, name: str, text: str | None) -> None:
        """Atomically point <root>/<name> at `text` (new symlink renamed over it); None removes it."""

    @abstractmethod
    def run_script(self, script: str, cwd: str, env: dict[str, str], log: Log,
                   timeout: float | None = None) -> int:
        """Run `bash -eo pipefail -c script` there; stream output to `log`; return the exit status."""

    # Lock primitives; the waiting and takeover policy lives in lock.py.
    @abstractmethod
    def lock_create(self, name: str, text: str) -> bool:
        """Create <root>/<name> holding `text` if it does not exist (O_EXCL); False if it does."""

    @abstractmethod
    def lock_read(self, name: str) -> str | None: ...

    @abstractmethod
    def lock_rename(self, name: str, new: str) -> bool:
        """Rename <root>/<name> to <root>/<new>; False if it was gone."""

    @abstractmethod
    def lock_remove(self, name: str) -> None: ...


def shared_link(root: str, release_dir: str, path: str) -> tuple[str, str, str]:
    """(shared entry, link location, relative link text) for one `shared` path."""
    entry = posixpath.join(root, "shared", path)
    link = posixpath.join(release_dir, path)
    return entry, link, posixpath.relpath(entry, posixpath.dirname(link))


def _syncfs(path: str) -> None:
    """Flush the file system holding `path` (one syncfs(2), much cheaper than fsync per file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            os.sync()
    except (AttributeError, OSError):
        os.sync()
    finally:
        os.close(fd)


class FileTarget(Target):
    """A target directory on this host, handled with plain os and shutil calls."""

    def __init__(self, url: str, root: str) -> None:
        self.url = url
        self.root = root

    def close(self) -> None:
        pass

    def prepare(self) -> None:
        try:
            for sub in ("releases", "shared"):
                os.makedirs(self.path(sub), exist_ok=True)
        except OSError as e:
            raise DeployError(f"{self.url}: cannot create {self.root}: {e.strerror}",
                              hint="create it and let the daemon's user write there") from e

    def read_state(self) -> TargetState:
        links = {}
        for name in ("current", *SLOTS):
            try:
                links[name] = os.readlink(self.path(name))
            except OSError:
                pass
        complete, incomplete = [], []
        try:
            names = os.listdir(self.path("releases"))
        except OSError:
            names = []
        for name in sorted(filter(RELEASE_NAME.match, names), key=release_key):
            if os.path.isfile(self.path("releases", name, COMPLETE)):
                complete.append(name)
            elif os.path.isdir(self.path("releases", name)):
                incomplete.append(name)
        return TargetState(links, tuple(complete), tuple(incomplete))

    def read_manifest(self, release: str) -> bytes | None:
        try:
            return Path(self.release_dir(release), MANIFEST).read_bytes()
        except OSError:
            return None

    def upload(self, release: str, source: Path, plan: UploadPlan, shared: tuple[str, ...], log: Log) -> None:
        self._build(release, source, plan)
        self._finish(release, shared, log)

    def _build(self, release: str, source: Path, plan: UploadPlan) -> None:
        dest = Path(self.release_dir(release))
        shutil.rmtree(dest, ignore_errors=True)
        try:
            dest.mkdir(parents=True)
            if plan.base:
                base = Path(self.release_dir(plan.base))
                for rel in plan.linked:
                    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                    os.link(base / rel, dest / rel)
            self._write_entries(source, dest, plan)
            (dest / MANIFEST).write_bytes(plan.manifest)
        except OSError as e:
            raise self._write_error(release, e) from e

    def _write_entries(self, source: Path, dest: Path, plan: UploadPlan) -> None:
        dirs = [e for e in plan.sent if e.kind == "d"]
        for e in dirs:
            (dest / e.path).mkdir(parents=True, exist_ok=True)
        for e in plan.sent:
            target = dest / e.path
            if e.kind == "l":
                os.symlink(e.target, target)
            elif e.kind == "f":
                # Never write through an existing (possibly hard-linked) file: replace it.
                if target.exists() or target.is_symlink():
                    target.unlink()
                shutil.copy2(source / e.path, target, follow_symlinks=False)  # keeps mtime, as tar does
                os.chmod(target, e.mode)
        for e in reversed(dirs):  # modes last: a read-only directory must not block its own content
            os.chmod(dest / e.path, e.mode)

    def _write_error(self, release: str, e: OSError) -> DeployError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return DeployError(f"{self.url}: no space left on device while writing release {release}",
                               hint=self.space_hint())
        return DeployError(f"{self.url}: writing release {release} failed: {e}")

    def _finish(self, release: str, shared: tuple[str, ...], log: Log) -> None:
        dest = self.release_dir(release)
        try:
            for p in shared:
                entry, link, text = shared_link(self.root, dest, p)
                if not os.path.lexists(entry):
                    os.makedirs(entry)
                    log(f"{self.url}: created empty directory {entry} (shared \"{p}\" was missing)")
                os.makedirs(posixpath.dirname(link), exist_ok=True)
                if os.path.isdir(link) and not os.path.islink(link):
                    shutil.rmtree(link)
                elif os.path.lexists(link):
                    os.unlink(link)
                os.symlink(text, link)
            _syncfs(dest)
            marker = posixpath.join(dest, COMPLETE)
            with open(marker + ".tmp", "w") as f:
                f.write(release + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(marker + ".tmp", marker)
            _fsync_dir(dest)
        except OSError as e:
            raise self._write_error(release, e) from e

    def remove_releases(self, releases: list[str]) -> None:
        for name in releases:
            shutil.rmtree(self.release_dir(name), ignore_errors=True)

    def set_link(self, name: str, text: str | None) -> None:
        link = self.path(name)
        try:
            if text is None:
                if os.path.lexists(link):
                    os.unlink(link)
            else:
                tmp = self.path(f"{name}.tmp-{uuid.uuid4().hex[:12]}")
                os.symlink(text, tmp)
                os.replace(tmp, link)
            _fsync_dir(self.root)
        except OSError as e:
            raise DeployError(f"{self.url}: switching {name} failed: {e}") from e

    def run_script(self, script: str, cwd: str, env: dict[str, str], log: Log,
                   timeout: float | None = None) -> int:
        base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TZ")}
        proc = subprocess.Popen(
            ["bash", "-eo", "pipefail", "-c", script], cwd=cwd, env={**base, **env},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a timeout kills its children too
        )
        assert proc.stdout is not None
        pipe = proc.stdout
        reader = threading.Thread(target=self._pump, args=(pipe, log), daemon=True)
        reader.start()
        try:
            status = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            status = proc.wait()
            log(f"{self.url}: script timed out after {timeout:.0f}s and was killed")
            status = 124
        # A service started in the background may keep the pipe open for ever: stop reading soon.
        reader.join(OUTPUT_GRACE)
        return status

    def _pump(self, pipe: IO[bytes], log: Log) -> None:
        with pipe:
            for raw in pipe:
                log(f"[{self.url}] " + raw.decode(errors="replace").rstrip("\r\n"))

    def lock_create(self, name: str, text: str) -> bool:
        try:
            fd = os.open(self.path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise DeployError(f"{self.url}: cannot create the lock {self.path(name)}: {e.strerror}") from e
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return True

    def lock_read(self, name: str) -> str | None:
        try:
            return Path(self.path(name)).read_text(errors="replace")
        except FileNotFoundError:
            return None

    def lock_rename(self, name: str, new: str) -> bool:
        try:
            os.rename(self.path(name), self.path(new))
            return True
        except FileNotFoundError:
            return False

    def lock_remove(self, name: str) -> None:
        try:
            os.unlink(self.path(name))
        except FileNotFoundError:
            pass


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
