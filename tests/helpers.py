"""Helpers of the end-to-end tests: a throw-away gitpipe home driven through the real CLI.

Everything here uses real parts: the `gitpipe` command as a subprocess, real bare
repositories, real `git push` (whose hooks queue runs), a real `gitpipe serve`
subprocess stopped with SIGTERM. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GITPIPE = str(Path(sys.executable).parent / "gitpipe")
if not os.access(GITPIPE, os.X_OK):  # not installed beside this interpreter: the one on PATH
    GITPIPE = shutil.which("gitpipe") or GITPIPE

FINISHED = ("succeeded", "failed", "cancelled")
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)$")
STAMP = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")
RUN_ID = re.compile(r"run #(\d+)")


def base_env(**extra: str) -> dict[str, str]:
    """The environment of every subprocess: this one's, minus git's variables, plus a fixed identity."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GIT_", "GITPIPE_")) and k != "NOTIFY_SOCKET"}
    env.update({
        "GIT_AUTHOR_NAME": "Test Author", "GIT_AUTHOR_EMAIL": "author@example.com",
        "GIT_COMMITTER_NAME": "Test Author", "GIT_COMMITTER_EMAIL": "author@example.com",
        "GIT_CONFIG_NOSYSTEM": "1", "LANG": "C.UTF-8", "TZ": "UTC",
    })
    env.update(extra)
    return env


def git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run git with an argument list (never a shell string)."""
    return subprocess.run(["git", "-c", "init.defaultBranch=main", "-c", "advice.detachedHead=false", *args],
                          cwd=cwd, env=base_env(), capture_output=True, text=True, check=check)


def pipeline(text: str) -> str:
    """A .pipeline.toml text written indented inside a test."""
    return textwrap.dedent(text).lstrip("\n")


def one_line_error(proc: subprocess.CompletedProcess[str], *words: str, code: int = 2) -> str:
    """Assert an error a user caused: the exit status, one line on stderr, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def working_copy(path: Path, pipeline_text: str) -> Path:
    """A git working copy at `path` whose one commit holds `pipeline_text` as .pipeline.toml."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q")
    (path / ".pipeline.toml").write_text(pipeline_text)
    git(path, "add", "-A")
    git(path, "commit", "-qm", "init")
    return path


def marker_processes(marker: str, argv0: bool = False) -> list[int]:
    """Live processes (zombies have no cmdline) whose command line contains `marker`.

    With `argv0`, only those whose argv[0] starts with it (`exec -a MARKER-x prog`), not
    the shells whose script text merely mentions it.
    """
    pids = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if cmdline.startswith(needle) if argv0 else needle in cmdline:
            pids.append(int(entry))
    return pids


def kill_marker_processes(marker: str) -> None:
    """Clean up after a failed test: SIGKILL the processes carrying our unique marker, by pid."""
    for pid in marker_processes(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def children(pid: int) -> set[int]:
    """The live children of `pid`, from its threads' /proc children lists (its own world: never
    a scan of every process on the machine)."""
    found: set[int] = set()
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:  # it is gone
        return found
    for task in tasks:
        try:
            found |= {int(p) for p in (task / "children").read_text().split()}
        except OSError:
            continue
    return found


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (its own tree, walked from `children`)."""
    found, todo = set(), [pid]
    while todo:
        kids = children(todo.pop()) - found
        found |= kids
        todo += kids
    return found


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy (bounded); that value."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process `pid` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_kib(pid: int, field_name: str) -> int:
    """A field of /proc/PID/status in KiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


@dataclass
class Push:
    """What one `git push` did: its exit status, output (git's `remote:` lines are on stderr), sha."""

    returncode: int
    stdout: str
    stderr: str
    sha: str

    @property
    def run_ids(self) -> list[int]:
        return [int(m) for m in RUN_ID.findall(self.stderr)]

    @property
    def gitpipe_lines(self) -> list[str]:
        return [line.rstrip() for line in self.stderr.splitlines() if "gitpipe" in line]


@dataclass
class Daemon:
    """A running `gitpipe serve` subprocess."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Home:
    """A temporary gitpipe home with its repos and work clones, driven through the CLI."""

    root: Path
    home: Path = field(init=False)
    clones: Path = field(init=False)
    _locks: dict[str, threading.Lock] = field(default_factory=dict, init=False)
    _guard: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        self.home = self.root / "home"
        self.clones = self.root / "clones"
        self.clones.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ the CLI
    def argv(self, *args: str) -> list[str]:
        """`gitpipe ARGS --home HOME` (the home goes after the subcommand); a subclass may run it
        as another user."""
        return [GITPIPE, *args, "--home", str(self.home)]

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of the CLI and the daemon."""
        return base_env(**(extra or {}))

    def gitpipe(self, *args: str, check: bool = False, cwd: Path | None = None,
                env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`gitpipe ARGS --home HOME` as a subprocess."""
        argv = self.argv(*args)
        proc = subprocess.run(argv, cwd=cwd or self.root, env=env or self.env(), capture_output=True,
                              text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def init(self, config: str = "") -> None:
        """`gitpipe init`, then append `config` (TOML) to gitpipe.toml."""
        self.gitpipe("init", check=True)
        if config:
            self.configure(config)

    def configure(self, config: str) -> None:
        """Add TOML to gitpipe.toml: top-level keys before its first table, tables at the end."""
        path = self.home / "gitpipe.toml"
        text = textwrap.dedent(config)
        m = re.search(r"^\s*\[", text, re.MULTILINE)
        top, tables = (text[:m.start()], text[m.start():]) if m else (text, "")
        current = path.read_text()
        for key in re.findall(r"^(\w+)\s*=", top, re.MULTILINE):  # replace what `init` wrote
            current = re.sub(rf"^{key}\s*=.*$", "", current, flags=re.MULTILINE)
        path.write_text(top + "\n" + current + "\n" + tables)

    def share(self, *dirs: Path) -> None:
        """Open host directories to actions (`[sandbox] read_write`), made and writable by anyone.

        The sandbox shows actions nothing of the host but their worktree; tests that read
        evidence scripts leave outside it open a directory for it, as an admin would.
        Call once per home (it writes the one [sandbox] table).
        """
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o777)  # a root daemon's actions run as the build user
        listed = ", ".join(f'"{d}"' for d in dirs)
        self.configure(f"[sandbox]\nread_write = [{listed}]\n")

    def show(self, run_id: int) -> dict[str, Any]:
        proc = self.gitpipe("show", str(run_id), "--json")
        assert proc.returncode in (0, 1), proc.stderr
        return json.loads(proc.stdout)

    def runs(self, *args: str) -> list[dict[str, Any]]:
        proc = self.gitpipe("runs", "--json", "--limit", "1000", *args, check=True)
        return json.loads(proc.stdout)

    def action(self, run: dict[str, Any], name: str) -> dict[str, Any]:
        """One action of a `show --json` result, by name."""
        hits = [a for s in run["stages"] for a in s["actions"] if a["name"] == name]
        assert len(hits) == 1, f"action {name!r} not found once in {run['stages']}"
        return hits[0]

    def stage(self, run: dict[str, Any], name: str) -> dict[str, Any]:
        return next(s for s in run["stages"] if s["name"] == name)

    def expect(self, run: dict[str, Any], status: str = "succeeded") -> dict[str, Any]:
        """Assert the run's status; on a mismatch the message holds the run and its logs."""
        if run["status"] != status:
            logs = self.gitpipe("logs", str(run["id"]), "--timestamps").stdout
            raise AssertionError(f"run #{run['id']} is {run['status']}, expected {status}:\n"
                                 f"{json.dumps(run, indent=1)}\n--- logs:\n{logs[-5000:]}")
        return run

    def logs(self, run_id: int, *args: str) -> str:
        return self.gitpipe("logs", str(run_id), *args, check=True).stdout

    def log_files(self, run_id: int) -> list[Path]:
        return sorted((self.home / "logs" / str(run_id)).glob("*.log"))

    # ------------------------------------------------------------------ waiting
    def status(self, run_id: int) -> str | None:
        """The run's stored status, read straight from the database (cheap enough to poll).

        Polling `gitpipe show --json` itself costs ~0.4 s of CPU per call (imports), which
        on a 2-core machine would slow the daemon under test; the final answer of
        `wait_run` still comes from `gitpipe show --json`.
        """
        try:
            conn = sqlite3.connect(f"file:{self.home / 'gitpipe.db'}?mode=ro", uri=True, timeout=10)
            try:
                row = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
            finally:
                conn.close()
        except sqlite3.OperationalError:
            return None
        return row[0] if row else None

    def wait_run(self, run_id: int, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the run has a finished status; its `gitpipe show --json`."""
        wait_for(lambda: self.status(run_id) in FINISHED, timeout, 0.1, f"run #{run_id} to finish")
        return self.show(run_id)

    def wait_runs(self, run_ids: list[int], timeout: float = 60.0) -> None:
        """Wait until every run has a finished status (one database read per poll)."""
        def done() -> bool:
            return all(self.status(i) in FINISHED for i in run_ids)

        wait_for(done, timeout, 0.2, f"runs {run_ids} to finish")

    def wait_status(self, run_id: int, *statuses: str, timeout: float = 60.0) -> None:
        wait_for(lambda: self.status(run_id) in statuses, timeout, 0.1, f"run #{run_id} to be {statuses}")

    # ------------------------------------------------------------------ repos and pushes
    def add_repo(self, name: str, *extra: str) -> Path:
        """`gitpipe repo add --create`: a new bare repo registered under `name`; its path."""
        path = self.root / "repos" / f"{name}.git"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.gitpipe("repo", "add", str(path), "--create", *extra, check=True)
        return path

    def clone_of(self, repo: Path) -> Path:
        """The work clone of a repo (made at first use)."""
        clone = self.clones / repo.name.removesuffix(".git")
        if not clone.exists():
            git(self.root, "clone", "--quiet", str(repo), str(clone))
        return clone

    def _lock(self, repo: Path) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(str(repo), threading.Lock())

    def commit(self, repo: Path, files: dict[str, str | None], branch: str = "main",
               message: str | None = None) -> str:
        """Commit `files` (path -> text, None deletes) on `branch` of the work clone; the sha.

        A new branch starts from the clone's current commit (an orphan in an empty clone).
        """
        with self._lock(repo):
            clone = self.clone_of(repo)
            has_branch = git(clone, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}",
                             check=False).returncode == 0
            has_head = git(clone, "rev-parse", "--verify", "--quiet", "HEAD", check=False).returncode == 0
            if has_branch:
                git(clone, "checkout", "--quiet", "--force", branch)
            elif has_head:
                git(clone, "checkout", "--quiet", "--force", "-b", branch)
            else:
                git(clone, "checkout", "--quiet", "--orphan", branch)
            for rel, text in files.items():
                path = clone / rel
                if text is None:
                    git(clone, "rm", "--quiet", "-r", "--", rel)
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                git(clone, "add", "--", rel)
            git(clone, "commit", "--quiet", "--allow-empty", "-m", message or f"change {uuid.uuid4().hex[:8]}")
            return git(clone, "rev-parse", "HEAD").stdout.strip()

    def git_push(self, repo: Path, *refspecs: str, env: dict[str, str] | None = None) -> Push:
        """A real `git push` of refspecs from the work clone to the bare repo (`env`: its environment)."""
        clone = self.clone_of(repo)
        proc = subprocess.run(["git", "push", "--no-verify", str(repo), *refspecs], cwd=clone,
                              env=env or base_env(), capture_output=True, text=True, timeout=120, check=False)
        sha = ""
        if refspecs and ":" in refspecs[0] and not refspecs[0].startswith(":"):
            sha = refspecs[0].split(":", 1)[0]
        return Push(proc.returncode, proc.stdout, proc.stderr, sha)

    def push(self, repo: Path, files: dict[str, str | None], branch: str = "main",
             message: str | None = None, env: dict[str, str] | None = None) -> Push:
        """Commit `files` on `branch` and `git push` that commit to the bare repo's `branch`."""
        sha = self.commit(repo, files, branch, message)
        return self.git_push(repo, f"{sha}:refs/heads/{branch}", env=env)

    def push_tag(self, repo: Path, tag: str, branch: str = "main", annotated: bool = False) -> Push:
        """Tag the head of `branch` in the work clone and push the tag."""
        with self._lock(repo):
            clone = self.clone_of(repo)
            extra = ["-a", "-m", f"tag {tag}"] if annotated else []
            git(clone, "tag", "--force", *extra, tag, f"refs/heads/{branch}")
        push = self.git_push(repo, f"refs/tags/{tag}:refs/tags/{tag}")
        push.sha = git(clone, "rev-parse", f"refs/tags/{tag}^{{commit}}").stdout.strip()
        return push

    def delete_ref(self, repo: Path, ref: str) -> Push:
        return self.git_push(repo, f":{ref}")

    def push_run(self, repo: Path, files: dict[str, str | None], branch: str = "main") -> int:
        """Push and return the id of the one run the push queued."""
        push = self.push(repo, files, branch)
        assert push.returncode == 0, push.stderr
        assert len(push.run_ids) == 1, push.stderr
        return push.run_ids[0]

    # ------------------------------------------------------------------ the daemon
    @contextmanager
    def daemon(self, env: dict[str, str] | None = None, ready_timeout: float = 30.0) -> Iterator[Daemon]:
        """`gitpipe serve` as a subprocess, ready (sd_notify READY=1) when the block starts.

        Stopped with SIGTERM at the end of the block and waited for; it must exit 0.
        """
        address = f"gitpipe-test-{uuid.uuid4().hex}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind("\0" + address)
        sock.settimeout(ready_timeout)
        log_path = self.root / f"daemon-{uuid.uuid4().hex[:6]}.log"
        full_env = self.env({**(env or {}), "NOTIFY_SOCKET": "@" + address})
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(self.argv("serve"), env=full_env,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=self.root)
        daemon = Daemon(proc, log_path)
        try:
            try:
                while b"READY=1" not in sock.recv(4096).split(b"\n"):
                    pass
            except TimeoutError:
                raise AssertionError(f"gitpipe serve did not get ready:\n{daemon.log}") from None
            finally:
                sock.close()
            yield daemon
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError(f"gitpipe serve did not stop on SIGTERM:\n{daemon.log}") from None
        assert code == 0, f"gitpipe serve exited {code}:\n{daemon.log}"
