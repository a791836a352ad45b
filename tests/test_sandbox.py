"""The attack table of issue 8 and the positive side of SPEC section 11, for real.

Every attack row is a real pipeline pushed on an unprotected branch (`feature`) of a repo
with a secret in secrets.toml and a protected `main`, run by a real `gitpipe serve` in
bubblewrap. The tests never trust an action's exit status: they look on the host for the
harm (the secret in what a script could read, a changed file, an approval given, a
process left alive, a connection accepted). Scripts write what they read into `out`
(a directory the host opens to actions by `[sandbox] read_write`), base64-encoded so
that log masking cannot hide a leak.

Every row runs twice: with the daemon as root (actions then run as the build user) and
with the daemon as the unprivileged user `gitpipe-test-daemon` (made here when missing),
except the memory and pids rows, which run with the root daemon only: cgroup hierarchies
are root's on such hosts, so an unprivileged daemon falls back to the token cage, without
limits. When the tests themselves do not run as root, "user" is the tests' own user and
the root rows are skipped.

Everything stays in the test's own world: its own temporary directories, listeners on
127.0.0.1 only, and only processes that carry the test's own marker strings.
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import errno
import functools
import hashlib
import http.server
import json
import os
import pwd
import re
import shutil
import signal
import site
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    GITPIPE,
    Home,
    Push,
    base_env,
    git,
    kill_marker_processes,
    marker_processes,
    pipeline,
    wait_for,
)

import gitpipe
from gitpipe import seccomp

pytestmark = pytest.mark.timeout(120)

SECRET = f"sbx-{uuid.uuid4().hex}"  # this test process's own secret value
DEPLOY_KEY = f"sbxkey-{uuid.uuid4().hex}"  # what the daemon user's deploy key file holds
DAEMON_USER = "gitpipe-test-daemon"
IS_ROOT = os.geteuid() == 0
DAEMON_USERS = ["root", "user"]
TEST_CONFIG = 'max_parallel = 8\nstop_grace = "3s"\n'
GP_PACKAGE = Path(gitpipe.__file__).resolve().parent


@pytest.fixture(autouse=True)
def _bwrap_present() -> None:
    """No bubblewrap: skipped on a developer's machine, a failure under CI (never a silent skip)."""
    if shutil.which("bwrap") is None and not os.path.exists("/usr/bin/bwrap"):
        message = "bwrap (Debian package bubblewrap) is not installed: the sandbox cannot be tested"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: install bubblewrap)")
        pytest.skip(message)


# ---------------------------------------------------------------------------- the two setups


def daemon_account() -> tuple[int, int]:
    """(uid, gid) of the unprivileged daemon user, made now when missing (root only, idempotent)."""
    for _ in range(50):  # xdist workers may race to create it: useradd then fails on the lock
        try:
            entry = pwd.getpwnam(DAEMON_USER)
            return entry.pw_uid, entry.pw_gid
        except KeyError:
            pass
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        subprocess.run([useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", DAEMON_USER], capture_output=True, check=False)
        time.sleep(0.1)
    raise AssertionError(f"could not create the user {DAEMON_USER}")


def as_user(uid: int, gid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups"]


@functools.cache
def user_gitpipe(uid: int, gid: int) -> str:
    """A `gitpipe` command the daemon user can run, hooks included.

    The test's own venv may sit on an interpreter the user cannot reach (a pyenv build under
    root's 0700 HOME): then a venv of the system python3 (same minor version) whose
    site-packages link to the test venv's packages, with a `gitpipe` script of its own.
    """
    probe = subprocess.run([*as_user(uid, gid), "sh", "-c", f'exec "{GITPIPE}" --version'],
                           capture_output=True, check=False, cwd="/")
    if probe.returncode == 0:
        return GITPIPE
    system = "/usr/bin/python3"
    version = subprocess.run([system, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=False).stdout.strip()
    if version != "%d.%d" % sys.version_info[:2]:
        pytest.skip(f"the user {DAEMON_USER} cannot run {GITPIPE}, and {system} is not Python "
                    f"{sys.version_info[0]}.{sys.version_info[1]}")
    root = Path(tempfile.mkdtemp(prefix="gitpipe-sbx-py-"))
    atexit.register(shutil.rmtree, root, True)
    root.chmod(0o755)
    venv = root / "venv"
    subprocess.run([system, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    ours = Path(site.getsitepackages()[0])
    theirs = venv / "lib" / f"python{version}" / "site-packages"
    for entry in ours.iterdir():
        if entry.name != "__pycache__" and not (theirs / entry.name).exists():
            (theirs / entry.name).symlink_to(entry)
    script = root / "gitpipe"
    script.write_text(f"#!{venv}/bin/python3\nimport sys\nfrom gitpipe.cli import entry\nsys.exit(entry())\n")
    script.chmod(0o755)
    return str(script)


class UserHome(Home):
    """A Home whose CLI, pushes (so hooks) and daemon all run as an unprivileged user.

    The test itself stays root: it reads the database and the files it checks directly.
    """

    def __init__(self, root: Path, uid: int, gid: int) -> None:
        super().__init__(root)
        self.uid, self.gid = uid, gid
        self.command = user_gitpipe(uid, gid)
        self.user_home = root / "daemon-home"  # the daemon user's HOME: its dotfiles and keys
        self.user_home.mkdir(exist_ok=True)
        for d in (root, self.clones, self.user_home):
            os.chown(d, uid, gid)
        # The clone is root's, the bare repo the user's: each side's git accepts the other's.
        self.gitconfig = root / "test.gitconfig"
        self.gitconfig.write_text("[safe]\n\tdirectory = *\n")

    @property
    def prefix(self) -> list[str]:
        return as_user(self.uid, self.gid)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return base_env(**(extra or {}), HOME=str(self.user_home))

    def argv(self, *args: str) -> list[str]:
        return [*self.prefix, self.command, *args, "--home", str(self.home)]

    def add_repo(self, name: str, *extra: str) -> Path:
        path = self.root / "repos" / f"{name}.git"
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chown(path.parent, self.uid, self.gid)
        self.gitpipe("repo", "add", str(path), "--create", *extra, check=True)
        return path

    def clone_of(self, repo: Path) -> Path:
        """The work clone is root's (the test commits in it); the bare repo is the user's."""
        clone = self.clones / repo.name.removesuffix(".git")
        if not clone.exists():
            subprocess.run(["git", "clone", "--quiet", str(repo), str(clone)],
                           env=base_env(GIT_CONFIG_GLOBAL=str(self.gitconfig)), capture_output=True, check=True)
        return clone

    def git_push(self, repo: Path, *refspecs: str, env: dict[str, str] | None = None) -> Push:
        """`git push` as the daemon user, so the hooks that queue runs run as that user."""
        clone = self.clone_of(repo)
        proc = subprocess.run([*self.prefix, "git", "-c", "safe.directory=*", "push", "--no-verify", str(repo),
                               *refspecs], cwd=clone, env=env or self.env(), capture_output=True, text=True,
                              timeout=120, check=False)
        sha = refspecs[0].split(":", 1)[0] if refspecs and ":" in refspecs[0] else ""
        return Push(proc.returncode, proc.stdout, proc.stderr, sha)



@dataclass
class World:
    """A home with the repo `shop`, its secret TOKEN, a protected main, and an `out` directory."""

    kind: str  # "root" or "user": who the daemon runs as
    home: Home
    repo: Path
    out: Path

    @property
    def deploy_key(self) -> Path:
        """A deploy key of the daemon user's, outside the gitpipe home (as ssh identities are)."""
        return self.home.root / "keys" / "deploy_key"

    @property
    def target(self) -> Path:
        """A file:// deploy target on this host."""
        return self.home.root / "targets" / "prod"

    @property
    def daemon_home(self) -> Path:
        """The daemon user's own HOME (dotfiles, keys): never inside a sandbox."""
        return self.home.user_home if isinstance(self.home, UserHome) else Path(base_env()["HOME"])

    def env_table(self, **extra: str | int) -> str:
        """The pipeline's [env]: where things are on the host (the script still must not reach them)."""
        values = {"OUT": str(self.out), "GP_HOME": str(self.home.home), "BARE": str(self.repo),
                  "GP_BIN": getattr(self.home, "command", GITPIPE), "GP_SRC": str(GP_PACKAGE.parent),
                  "GP_PKG": str(GP_PACKAGE), "DAEMON_HOME": str(self.daemon_home),
                  "DEPLOY_KEY_PATH": str(self.deploy_key), "TARGET_DIR": str(self.target),
                  **{k: str(v) for k, v in extra.items()}}
        return "[env]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())

    def push(self, body: str, branch: str, head: str = "", files: dict[str, str | None] | None = None,
             **env: str | int) -> int:
        """Push a pipeline (its [env] says where the host's things are) on `branch`; the run id."""
        text = (pipeline(head) + "\n" if head else "") + self.env_table(**env) + "\n" + pipeline(body)
        return self.home.push_run(self.repo, {".pipeline.toml": text, "nonce": uuid.uuid4().hex, **(files or {})},
                                  branch=branch)


@pytest.fixture
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    """The world of one test; `request.param` (indirect) says who the daemon runs as, "root" by default."""
    with make_world(getattr(request, "param", "root"), tmp_path) as w:
        yield w


@contextmanager
def make_world(kind: str, tmp_path: Path, sandbox_extra: str = "") -> Iterator[World]:
    if kind == "root" and not IS_ROOT:
        pytest.skip("the root-daemon setup needs the tests to run as root")
    cleanup: Path | None = None
    if kind == "user" and IS_ROOT:
        uid, gid = daemon_account()
        # tmp_path's parents are root's 0700 directories: the user's world is a directory of its own.
        cleanup = Path(tempfile.mkdtemp(prefix="gitpipe-sbx-"))
        cleanup.chmod(0o711)
        home: Home = UserHome(cleanup, uid, gid)
    else:  # root, or a non-root test run: the daemon is this (unprivileged) user
        home = Home(tmp_path / "w")
    try:
        home.init(TEST_CONFIG)
        out = home.root / "out"
        out.mkdir()
        out.chmod(0o777)  # a root daemon's actions run as the build user
        # main is protected (explicitly; it is also the default), feature branches are not. One
        # [sandbox] table: the evidence directory, and what the test adds (limits).
        home.configure(f'[repos.shop]\nprotected = ["main"]\n\n[sandbox]\nread_write = ["{out}"]\n{sandbox_extra}')
        secrets = home.home / "secrets.toml"
        secrets.write_text(f'[shop]\nTOKEN = "{SECRET}"\n')
        secrets.chmod(0o600)
        if isinstance(home, UserHome):
            os.chown(secrets, home.uid, home.gid)
        repo = home.add_repo("shop")
        world = World(kind, home, repo, out)
        world.deploy_key.parent.mkdir(mode=0o700)
        world.deploy_key.write_text(f"-----BEGIN OPENSSH PRIVATE KEY-----\n{DEPLOY_KEY}\n-----END OPENSSH PRIVATE KEY-----\n")
        world.deploy_key.chmod(0o600)
        (world.target / "releases" / "1-abc").mkdir(parents=True)
        (world.target / "current").symlink_to("releases/1-abc")
        if isinstance(home, UserHome):
            for path in (world.deploy_key.parent, world.deploy_key, world.target.parent, world.target,
                         world.target / "releases", world.target / "releases" / "1-abc"):
                os.chown(path, home.uid, home.gid)
            os.lchown(world.target / "current", home.uid, home.gid)
        yield world
    finally:
        # Any depth a test left (pytest's own cleanup of old temporary directories recurses).
        subprocess.run(["rm", "-rf", "--", str(cleanup or home.home / "work")], check=False)


users = pytest.mark.parametrize("world", DAEMON_USERS, indirect=True)


# ---------------------------------------------------------------------------- evidence


def forms(value: str) -> list[bytes]:
    """The secret as a script could have written it: plain, base64, hex."""
    raw = value.encode()
    return [raw, base64.b64encode(raw), raw.hex().encode()]


def evidence(out: Path) -> dict[str, bytes]:
    """Every file the scripts left in `out`; `*.b64` files decoded (masking never touched them)."""
    found = {}
    for path in sorted(out.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            found[path.name] = base64.b64decode(data) if path.suffix == ".b64" else data
    return found


def assert_secret_absent(files: dict[str, bytes], where: str) -> None:
    for name, data in files.items():
        for form in forms(SECRET):
            assert form not in data, f"the secret is in {where}/{name}"


def files_under(*tops: Path) -> Iterator[Path]:
    for top in tops:
        if top.is_file():
            yield top
        elif top.is_dir():
            for path in top.rglob("*"):
                if path.is_file() and not path.is_symlink() and "__pycache__" not in path.parts:
                    yield path


def fingerprint(*tops: Path, content_only: bool = False) -> dict[str, tuple[object, ...]]:
    """What each file under `tops` is: kind, mode, owner, sha256 and (unless content_only) mtime."""
    prints: dict[str, tuple[object, ...]] = {}
    for top in tops:
        paths = [top, *sorted(top.rglob("*"))] if top.is_dir() and not top.is_symlink() else [top]
        for path in paths:
            if "__pycache__" in path.parts:
                continue
            try:
                st = path.lstat()
            except FileNotFoundError:
                prints[str(path)] = ("missing",)
                continue
            if stat.S_ISLNK(st.st_mode):
                prints[str(path)] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                prints[str(path)] = ("dir", st.st_mode, st.st_uid)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                mtime = () if content_only else (st.st_mtime_ns,)
                prints[str(path)] = ("file", st.st_mode, st.st_uid, digest, *mtime)
    return prints


def changed(before: dict[str, tuple[object, ...]], after: dict[str, tuple[object, ...]]) -> list[str]:
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


@contextmanager
def restored(*paths: Path) -> Iterator[None]:
    """Real host files an attack aims at (the gitpipe package, the daemon's dotfiles): put back
    exactly as they were, should the sandbox ever fail to protect them."""
    saved = {p: p.read_bytes() if p.is_file() else None for p in paths}
    try:
        yield
    finally:
        for path, data in saved.items():
            now = path.read_bytes() if path.is_file() else None
            if now != data:
                if data is None:
                    path.unlink(missing_ok=True)
                else:
                    path.write_bytes(data)


def runs_in_db(home: Home) -> list[tuple[int, str, str]]:
    conn = sqlite3.connect(f"file:{home.home / 'gitpipe.db'}?mode=ro", uri=True, timeout=10)
    try:
        return [tuple(r) for r in conn.execute("SELECT id, ref, status FROM runs ORDER BY id")]
    finally:
        conn.close()


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b"(gone)"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------- attack: reading secrets

HOLDER = """
[[stage]]
name = "hold"
  [[stage.action]]
  name = "holder"
  secrets = ["TOKEN"]
  timeout = "100s"
  run = '''
    printf '%s' "$TOKEN" | sha256sum | cut -c1-64 > "$OUT/holder.sha256"
    touch "$OUT/holder-started"
    for i in $(seq 900); do [ -e "$OUT/scan-done" ] && break; sleep 0.1; done
  '''
"""

READER = r"""
[[stage]]
name = "attack"
  [[stage.action]]
  name = "read"
  timeout = "100s"
  run = '''
    set +e +o pipefail
    for i in $(seq 900); do [ -e "$OUT/holder-started" ] && break; sleep 0.1; done
    grab() { local name=$1; shift; "$@" 2>/dev/null | base64 -w0 > "$OUT/$name.b64"; }
    grab relative sh -c 'for up in "" ../ ../../ ../../../ ../../../../ ../../../../../ ../../../../../../ \
                                   ../../../../../../../; do cat "${up}secrets.toml" "${up}home/secrets.toml"; done'
    grab absolute cat "$GP_HOME/secrets.toml"
    grab via_proc_root sh -c 'cat /proc/$DAEMON_PID/root$GP_HOME/secrets.toml /proc/$DAEMON_PID/cwd/home/secrets.toml'
    grab found sh -c 'timeout 30 find / -path /proc -prune -o -name "secrets*" -type f -print | head -50 | xargs -r cat'
    grab daemon_environ cat "/proc/$DAEMON_PID/environ"
    grab deploy_key sh -c 'cat "$DEPLOY_KEY_PATH" "$DAEMON_HOME"/.ssh/id_*'
    grab all_environ sh -c 'for f in /proc/[0-9]*/environ /proc/[0-9]*/task/*/environ; do cat "$f"; echo; done'
    grab all_cmdline sh -c 'for f in /proc/[0-9]*/cmdline; do cat "$f"; echo; done'
    grab db sh -c 'cat "$GP_HOME/gitpipe.db" "$GP_HOME"/logs/*/*'
    ls /proc > "$OUT/proc-listing.txt"
    touch "$OUT/scan-done"
  '''

  [[stage.action]]
  name = "link"
  run = '''
    mkdir -p leak
    ln -s "$GP_HOME/secrets.toml" leak/absolute
    ln -s ../../../../secrets.toml leak/relative
    ln -s /proc/1/root/etc/hostname leak/proc
  '''
  outputs = { leak = "leak/**" }

# A notify command written in the pushed pipeline runs confined too (placeholders: @PATH@).
[[notify]]
on = ["succeeded", "failed"]
command = '''
  for up in '' ../ ../../ ../../../ ../../../../ ../../../../../; do cat "$up"secrets.toml; done 2>/dev/null | base64 -w0 > @OUT@/notify-relative.b64
  cat @GP_HOME@/secrets.toml /proc/@DAEMON_PID@/environ /proc/[0-9]*/environ 2>/dev/null | base64 -w0 > @OUT@/notify-absolute.b64
  touch @OUT@/notify-done
'''
"""


@users
def test_secret_cannot_be_read_from_a_feature_branch(world: World) -> None:
    home = world.home
    canary = f"canary-{uuid.uuid4().hex}"
    with home.daemon(env={"DAEMON_SECRET": SECRET}) as daemon:  # the daemon's own environment holds it too
        holder = world.push(HOLDER, "main")
        text = (READER.replace("@OUT@", str(world.out)).replace("@GP_HOME@", str(home.home))
                .replace("@DAEMON_PID@", str(daemon.pid)))
        reader = world.push(text, "feature", DAEMON_PID=daemon.pid, CANARY=canary)
        wait_for(lambda: (world.out / "scan-done").exists(), 90, 0.1, "the attack to end")
        assert_secret_absent(evidence(world.out), "out")  # first of all (the rest below)
        reader_run = home.wait_run(reader, timeout=60)
        holder_run = home.expect(home.wait_run(holder, timeout=60))
        wait_for(lambda: (world.out / "notify-done").exists(), 30, what="the pipeline's notify command")
        assert daemon.proc.poll() is None
    found = evidence(world.out)
    # The attack ran while the protected run held the secret in its environment.
    assert "holder-started" in found and "scan-done" in found, sorted(found)
    assert found["holder.sha256"].decode().strip() == sha256_text(SECRET)
    assert holder_run["status"] == "succeeded"
    # It could read /proc at all: its own environment (the canary) is there; the daemon is not.
    assert canary.encode() in found["all_environ.b64"], "the /proc scan found not even its own environment"
    assert b"GITPIPE_EVENT=" in found["notify-absolute.b64"], "the notify command read not even its own environment"
    assert_secret_absent(found, "out")
    assert not [name for name, data in found.items() if DEPLOY_KEY.encode() in data], "the deploy key was read"
    assert str(daemon.pid).encode() not in found["proc-listing.txt"].split(), "the daemon's pid is visible"
    # What the host kept of the feature run: its logs, artifacts, report.
    assert_secret_absent({str(p): p.read_bytes() for p in files_under(home.home / "logs", home.home / "artifacts",
                                                                     home.home / "site")}, "home")
    assert home.action(reader_run, "link")["status"] == "failed"  # links out of the tree are refused


# ---------------------------------------------------------------------------- attack: writing the host

VICTIM = """
[[stage]]
name = "protected"
  [[stage.action]]
  name = "victim"
  secrets = ["TOKEN"]
  timeout = "100s"
  run = '''
    echo original > victim.txt
    touch "$OUT/victim-ready"
    for i in $(seq 900); do [ -e "$OUT/attack-done" ] && break; sleep 0.1; done
    cat victim.txt > "$OUT/victim-after"
  '''
"""

WRITER = r"""
[[stage]]
name = "attack"
  [[stage.action]]
  name = "write"
  timeout = "100s"
  run = '''
    set +e +o pipefail
    P=$(echo "$PWN" | tr a-z A-Z)
    touch .attacker  # its own slot, where it may write what it likes
    for i in $(seq 900); do [ -e "$OUT/victim-ready" ] && break; sleep 0.1; done
    try() { if sh -c "$1" 2>/dev/null; then echo "$1" >> "$OUT/claimed"; fi; }
    for up in ../ ../../ ../../../ ../../../../ ../../../../../ "$GP_HOME/"; do
      try "printf '\n# $P\n[repos.shop]\nprotected = [\"*\"]\n' >> ${up}gitpipe.toml"
      try "printf '$P' >> ${up}gitpipe.db"
      try "printf '$P' >> ${up}site/site.js"
      try "for f in ${up}site/*.js ${up}site/*/*.js; do printf '$P' >> \$f; done"
      try "printf '$P' > ${up}cache/hook-settings"
      try "for f in ${up}cache/pipelines/*; do printf '$P' > \$f; done"
      try "mkdir -p ${up}cache/pipelines && printf '$P' > ${up}cache/pipelines/shop-$MAIN_BLOB"
      try "printf '$P' > ${up}spool/$P.json && touch ${up}wake/$P"
      try "for d in ${up}work/shop/*/tree; do printf '$P' > \$d/victim.txt; done"
      try "printf '$P' > ${up}secrets.toml"
    done
    try "python3 -c \"import sqlite3; c = sqlite3.connect('$GP_HOME/gitpipe.db'); c.execute('create table pwn(x)'); c.execute('update runs set status = ?', ('$P',)); c.commit()\""
    try "for d in ../*/ ../../*/*/; do printf '$P' > \$d/victim.txt; done"
    try "printf '%s\n' $GITPIPE_SHA > $BARE/refs/heads/main"
    try "printf '%s refs/heads/main\n' $GITPIPE_SHA >> $BARE/packed-refs"
    try "printf '#!/bin/sh\n# $P\n' > $BARE/hooks/post-receive.chained && chmod +x $BARE/hooks/post-receive.chained"
    try "printf '# $P\n' >> $BARE/hooks/post-receive"
    try "printf '[core]\n\thooksPath = /tmp/$P\n' >> $BARE/config"
    try "for o in $BARE/objects/??/*; do chmod u+w \$o; printf '$P' > \$o; done"
    try "for o in $BARE/objects/??/*; do rm -f \$o; done"
    try "mkdir -p $BARE/objects/info && printf '/tmp/$P\n' >> $BARE/objects/info/alternates"
    try "git push -q $BARE HEAD:refs/heads/main"
    try "printf '\n# $P\n' >> $GP_PKG/__init__.py"
    try "printf '[core]\n\tfsmonitor = /tmp/$P\n' >> $DAEMON_HOME/.gitconfig"
    try "mkdir -p $DAEMON_HOME/.ssh && printf 'ssh-ed25519 $P\n' >> $DAEMON_HOME/.ssh/authorized_keys"
    try "mkdir -p $TARGET_DIR/releases/$P && ln -sfn releases/$P $TARGET_DIR/current"
    try "printf '$P' > $OUT/control"  # the one write that must work: the way the others were tried
    touch "$OUT/attack-done"
  '''
"""


@users
def test_host_files_cannot_be_written_from_a_feature_branch(world: World) -> None:
    home, repo = world.home, world.repo
    pwn = f"pwn{uuid.uuid4().hex}"  # the pipeline holds it lower-case; the attack writes it upper-case
    mark = pwn.upper().encode()
    with home.daemon():  # a first run of main: slots, site, the hook's cache all exist
        main = home.expect(home.wait_run(world.push('[[stage]]\nname = "s"\n  [[stage.action]]\n'
                                                    '  name = "hello"\n  run = "echo hello"\n', "main")))
    # Queued while no daemon runs, so the host is fingerprinted before either starts: a
    # protected run (its worktree the victim) and the attack, which run side by side.
    victim = world.push(VICTIM, "main")
    main_sha = home.show(victim)["sha"]
    main_blob = git(repo, "-c", "safe.directory=*", "rev-parse", f"{main_sha}:.pipeline.toml").stdout.strip()
    feature = world.push(WRITER, "feature", PWN=pwn, MAIN_BLOB=main_blob)
    targets = [home.home / "gitpipe.toml", home.home / "secrets.toml", home.home / "cache", repo, world.target]
    site = [p for p in (home.home / "site").rglob("*") if p.suffix in (".js", ".css")]
    assert site, "the report site has no script to attack"
    host = [GP_PACKAGE / "__init__.py", world.daemon_home / ".gitconfig",
            world.daemon_home / ".ssh" / "authorized_keys"]
    before, before_site, before_host = fingerprint(*targets), fingerprint(*site, content_only=True), fingerprint(*host)
    with restored(*host):
        with home.daemon() as daemon:
            # Not wait_run: a forged status ("update runs set status = ...") must fail, not hang.
            wait_for(lambda: home.status(feature) not in ("queued", "running", "waiting"), 100, 0.1,
                     f"run #{feature} to leave queued/running")
            run = home.show(feature)
            victim_run = home.wait_run(victim)
            assert daemon.proc.poll() is None
        after, after_site, after_host = fingerprint(*targets), fingerprint(*site, content_only=True), fingerprint(*host)
    found = evidence(world.out)
    assert "attack-done" in found, f"the attack did not run: {json.dumps(run, indent=1)}"
    claimed = found.get("claimed", b"").decode()
    assert found["control"] == mark and claimed.splitlines()[-1].endswith("/control"), claimed
    assert changed(before, after) == [], f"the home or the bare repo changed (the script claimed: {claimed})"
    assert changed(before_site, after_site) == [], "the report site's scripts changed"
    assert changed(before_host, after_host) == [], "the gitpipe package or the daemon user's dotfiles changed"
    assert found["victim-after"] == b"original\n", "the protected run's worktree was written"
    own = [t.parent.parent for t in (home.home / "work").glob("shop/*/tree/.attacker")]
    assert len(own) == 1, own
    marked = [str(p) for p in files_under(home.home, repo, world.target, *host) if not p.is_relative_to(own[0])
              and (mark in p.read_bytes() or mark in p.name.upper().encode())]
    assert marked == [], f"files written by the attack: {marked}"
    assert runs_in_db(home) == [(main["id"], "refs/heads/main", "succeeded"), (victim, "refs/heads/main", "succeeded"),
                                (feature, "refs/heads/feature", run["status"])]
    assert victim_run["status"] == "succeeded"
    assert git(repo, "-c", "safe.directory=*", "rev-parse", "refs/heads/main").stdout.strip() == main_sha
    assert not (repo / "hooks" / "post-receive.chained").exists()


# ---------------------------------------------------------------------------- attack: approving

APPROVAL = """
[[stage]]
name = "gate"
  [[stage.action]]
  name = "sign-off"
  type = "approval"
  message = "Ship {short_sha}?"
  timeout = "1h"
[[stage]]
name = "ship"
  [[stage.action]]
  name = "ship"
  secrets = ["TOKEN"]
  run = "touch $OUT/shipped"
"""

APPROVER = r"""
[[stage]]
name = "attack"
  [[stage.action]]
  name = "approve"
  run = '''
    set +e +o pipefail
    {
      "$GP_BIN" approve "$TARGET" --comment pwned --home "$GP_HOME"
      "$GP_BIN" --home "$GP_HOME" approve "$TARGET"
      GITPIPE_HOME="$GP_HOME" gitpipe approve "$TARGET"
      GITPIPE_HOME="$GP_HOME" python3 -m gitpipe approve "$TARGET"
      PYTHONPATH="$GP_SRC" python3 -c "from gitpipe import api, settings, store; s = settings.load('$GP_HOME'); print(api.decide(s, store.Store(s), $TARGET, True, 'pwned'))"
      python3 -c "import sqlite3; c = sqlite3.connect('$GP_HOME/gitpipe.db'); c.execute(\"update actions set status = 'succeeded' where status = 'waiting'\"); c.commit()"
      "$GP_BIN" cancel "$TARGET" --home "$GP_HOME"
      "$GP_BIN" reject "$TARGET" --home "$GP_HOME"
      "$GP_BIN" run shop --home "$GP_HOME"
    } > "$OUT/approve.txt" 2>&1
    touch "$OUT/approve-done"
    kill -9 "$DAEMON_PID"; kill -9 -1  # and then the daemon (and all it could reach)
  '''
"""


@users
def test_a_feature_branch_cannot_approve_cancel_or_start_runs(world: World) -> None:
    home = world.home
    with home.daemon() as daemon:
        waiting = world.push(APPROVAL, "main")
        home.wait_status(waiting, "waiting")
        attack_id = world.push(APPROVER, "feature", TARGET=waiting, DAEMON_PID=daemon.pid)
        wait_for(lambda: (world.out / "approve-done").exists(), 60, 0.1, "the attack to run")
        time.sleep(0.5)  # a decision (or a kill) would have been picked up by now
        assert daemon.proc.poll() is None, "the daemon was killed"
        run = home.show(waiting)
        assert run["status"] == "waiting"
        assert [a["decision"] for a in run["approvals"]] == [None]  # requested, never decided
        assert home.action(run, "sign-off")["status"] == "waiting"
        assert home.action(run, "ship")["status"] == "pending"
        home.wait_run(attack_id)
        assert [r[0] for r in runs_in_db(home)] == [waiting, attack_id]  # no run started by the script
        assert not (world.out / "shipped").exists()
        # The host's own approval still works: the gate was intact, not broken.
        home.gitpipe("approve", str(waiting), "--comment", "by the host", check=True)
        run = home.expect(home.wait_run(waiting))
    assert run["approvals"][0]["comment"] == "by the host"
    assert (world.out / "shipped").exists()


# ---------------------------------------------------------------------------- attack: the intake socket

INTAKE_FORGER = r"""
[[stage]]
name = "attack"
  [[stage.action]]
  name = "forge"
  run = '''
    set +e +o pipefail
    sha=$(git rev-parse HEAD)
    req=$(printf 'gitpipe-push 1 shop 1 1 %s\n%s %s refs/heads/main\n' 6576696c 0000000000000000000000000000000000000000 "$sha")
    {
      ls -la "$GP_HOME" "$GP_HOME/intake.sock"
      find / -xdev -name intake.sock 2>/dev/null
      for sock in "$GP_HOME/intake.sock" "/proc/$DAEMON_PID/root$GP_HOME/intake.sock" "/proc/$DAEMON_PID/cwd/intake.sock"; do
        python3 -c "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(sys.argv[2].encode() + b'\n'); s.shutdown(1); print('ANSWER', s.recv(4096))" "$sock" "$req"
      done
      # The abstract namespace (the host's when the network is open): the daemon never listens there.
      python3 -c "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect('\0' + sys.argv[1]); print('ANSWER abstract')" "$GP_HOME/intake.sock"
    } > "$OUT/intake.txt" 2>&1
    touch "$OUT/intake-done"
  '''
"""


@users
def test_a_feature_branch_cannot_reach_the_intake_socket(world: World) -> None:
    """A pushed script tries the daemon's intake.sock (by the home's path, through /proc of the daemon,
    in the abstract namespace) with a forged push of main at its own commit: no run is recorded."""
    home = world.home
    with home.daemon() as daemon:
        main_id = world.push('[[stage]]\nname = "s"\n  [[stage.action]]\n  name = "a"\n  run = "true"\n', "main")
        home.wait_run(main_id)
        assert (home.home / "intake.sock").exists(), "the daemon listens on its intake socket"
        attack_id = world.push(INTAKE_FORGER, "feature", DAEMON_PID=daemon.pid)
        wait_for(lambda: (world.out / "intake-done").exists(), 60, 0.1, "the attack to run")
        home.wait_run(attack_id)
        said = (world.out / "intake.txt").read_text()
        assert "ANSWER" not in said, said
        assert [r[0] for r in runs_in_db(home)] == [main_id, attack_id], said  # no forged run of main


# ---------------------------------------------------------------------------- attack: HOME dotfiles

PLANTER = r"""
[[stage]]
name = "plant"
  [[stage.action]]
  name = "plant"
  run = '''
    git config --global core.fsmonitor "touch $OUT/fsmonitor-ran; echo"
    git config --global core.pager "touch $OUT/pager-ran; cat"
    echo "touch $OUT/bashrc-ran" > ~/.bashrc
    echo "touch $OUT/profile-ran" > ~/.profile
    mkdir -p ~/.ssh ~/.config/pip && echo "ssh-ed25519 AAAA planted" > ~/.ssh/authorized_keys
    printf '[global]\nindex-url = http://127.0.0.1:9/planted\n' > ~/.config/pip/pip.conf
    ls -A ~ > "$OUT/plant-home"
    # The worktree's own git dir and files, which the next user of this slot (and the
    # daemon's own git, resetting it) would meet.
    git config core.fsmonitor "touch $OUT/slot-fsmonitor-ran; echo"
    git config filter.x.smudge "touch $OUT/smudge-ran; cat"
    git config core.hooksPath .git/hooks
    mkdir -p .git/info .git/hooks && echo '* filter=x' > .git/info/attributes
    printf '#!/bin/sh\ntouch %s/hook-ran\n' "$OUT" > .git/hooks/post-checkout
    chmod +x .git/hooks/post-checkout
    echo tampered > nonce
    touch untracked
  '''
[[stage]]
name = "later"
  [[stage.action]]
  name = "later"
  run = '''
    ls -A "$HOME" > "$OUT/later-home"
    git status > /dev/null
  '''
"""

LATER_MAIN = """
[[stage]]
name = "main"
  [[stage.action]]
  name = "protected"
  secrets = ["TOKEN"]
  run = '''
    ls -A "$HOME" > "$OUT/main-home"
    git status --porcelain --ignored > "$OUT/main-status"
    git log -1 --format=%H > "$OUT/main-head"
    cat nonce > "$OUT/main-nonce"
  '''
"""


@users
def test_home_dotfiles_do_not_reach_a_later_action(world: World) -> None:
    home = world.home
    host_dotfiles = [world.daemon_home / ".gitconfig", world.daemon_home / ".bashrc", world.daemon_home / ".ssh"]
    before = fingerprint(*host_dotfiles)
    with restored(*[p for p in host_dotfiles if not p.is_dir()]):
        with home.daemon():
            home.expect(home.wait_run(world.push(PLANTER, "feature")))
            main = home.expect(home.wait_run(world.push(LATER_MAIN, "main")))
        after = fingerprint(*host_dotfiles)
    planted = (world.out / "plant-home").read_text().split()
    assert ".gitconfig" in planted and ".bashrc" in planted  # the plant happened, in its own HOME
    assert (world.out / "later-home").read_text() == "", "the next stage's HOME was not empty"
    assert (world.out / "main-home").read_text() == "", "the protected run's HOME was not empty"
    for ran in ("fsmonitor-ran", "pager-ran", "bashrc-ran", "profile-ran", "slot-fsmonitor-ran", "smudge-ran",
                "hook-ran"):
        assert not (world.out / ran).exists(), f"{ran}: something planted ran in a later action or in the daemon"
    # The protected run got exactly its commit: no planted file, no leftover, nothing modified.
    assert (world.out / "main-status").read_text() == "", "the protected run's worktree was not clean"
    assert (world.out / "main-head").read_text().strip() == main["sha"]
    assert (world.out / "main-nonce").read_text() != "tampered\n"
    assert changed(before, after) == [], "the daemon user's own dotfiles changed"


LOCKER = """
[[stage]]
name = "one"
  [[stage.action]]
  name = "lock"
  run = '''
    for d in . "$HOME"; do
      mkdir -p "$d/locked/deep" && touch "$d/locked/deep/f" && chmod 000 "$d/locked/deep" "$d/locked"
    done
  '''
[[stage]]
name = "two"
  [[stage.action]]
  name = "after"
  run = 'ls -A "$HOME" > "$OUT/after-home"; git status --porcelain --ignored > "$OUT/after-status"'
"""


@pytest.mark.parametrize("world", [
    "root", "user",
], indirect=True)
def test_directories_made_unreadable_do_not_break_later_runs(world: World) -> None:
    """A `chmod 000` directory in the worktree and in HOME: the slot still resets for the next
    attempt, of this run and of the protected main run (no branch can put a slot out of use)."""
    home = world.home
    with home.daemon():
        feature = home.wait_run(world.push(LOCKER, "feature"))
        main = home.wait_run(world.push(LATER_MAIN, "main"))
    assert home.action(feature, "after")["status"] == "succeeded", home.action(feature, "after")
    assert (world.out / "after-home").read_text() == "" and (world.out / "after-status").read_text() == ""
    home.expect(main)
    assert (world.out / "main-home").read_text() == "" and (world.out / "main-status").read_text() == ""


# What an outside attacker found after the first table (each fixed, each kept here).
SLOT_BREAKERS = {
    # A tree deeper than Python's stack: rmtree raised RecursionError and the slot was lost for good.
    "deep": "p=deep; for i in $(seq 2500); do p=$p/d; done; mkdir -p \"$p\" \"$HOME/$p\" && touch \"$p/f\"",
    # Modes git does not restore: the next run found lib/ unreadable and the tree read-only.
    "modes": "chmod 000 lib && chmod 555 . && chmod 4777 lib/a.txt 2>/dev/null; chmod 000 lib; true",
}


@pytest.mark.parametrize("world", DAEMON_USERS, indirect=True)
@pytest.mark.parametrize("breaker", sorted(SLOT_BREAKERS))
def test_what_a_branch_does_to_its_slot_never_reaches_the_next_run(world: World, breaker: str) -> None:
    home = world.home
    files = {"lib/a.txt": "library\n"}
    body = f"""
        [[stage]]
        name = "break"
          [[stage.action]]
          name = "break"
          run = '{SLOT_BREAKERS[breaker]}'
        """
    check = LATER_MAIN.replace("cat nonce", 'cat lib/a.txt >> "$OUT/main-lib"; touch made-here; cat nonce')
    with home.daemon():
        home.wait_run(world.push(body, "feature", files=files))
        for _ in range(2):  # the slot serves run after run
            home.expect(home.wait_run(world.push(check, "main", files=files)), "succeeded")
    assert (world.out / "main-lib").read_text() == "library\nlibrary\n"
    assert (world.out / "main-home").read_text() == "" and (world.out / "main-status").read_text() == ""


def large_tree_files() -> dict[str, str | None]:
    """A tree with lib/a.txt and more files than the reset cleans itself (git.CLEAN_IN_PROCESS)."""
    from gitpipe.git import CLEAN_IN_PROCESS

    files: dict[str, str | None] = {"lib/a.txt": "library\n"}
    files.update({f"many/f{i}": "" for i in range(CLEAN_IN_PROCESS + 1)})
    return files


LARGE_TREE_STEPS = """
[[stage]]
name = "break"
  [[stage.action]]
  name = "break"
  run = 'chmod 000 lib && chmod 555 .'
[[stage]]
name = "between"
  [[stage.action]]
  name = "between"
  run = 'true'
[[stage]]
name = "after"
  [[stage.action]]
  name = "after"
  run = 'cat lib/a.txt > "$OUT/large-lib" && echo changed > lib/a.txt && touch made-here'
"""


@pytest.mark.parametrize("world", DAEMON_USERS, indirect=True)
def test_a_large_trees_next_sandbox_made_ahead_finds_it_handed_over(world: World) -> None:
    """Above git.CLEAN_IN_PROCESS files the reset cleans with `git clean`, which leaves a folder
    an action made unreadable (chmod 000) in place, and does not hand the tree over itself. The
    third action (in the first one's slot, its sandbox made ahead while the second one ran)
    failed with the daemon not root: the hand-over's walk could not open that folder (Permission
    denied). It finds what the first one did to the tree's modes undone, for either daemon."""
    with world.home.daemon():
        run = world.home.wait_run(world.push(LARGE_TREE_STEPS, "feature", files=large_tree_files()), timeout=120)
    world.home.expect(run, "succeeded")
    assert (world.out / "large-lib").read_text() == "library\n"


# Tries the kernel's keyrings, which no namespace of bwrap's separates (see gitpipe/seccomp.py):
# a key added to the session or user keyring, then looked for (by a later action, a later run).
KEYRING_PROBE = r"""
my %nr = (x86_64 => [248, 249, 250], aarch64 => [217, 218, 219]);  # add_key, request_key, keyctl
my $m = `uname -m`; chomp $m;
my ($add, $req, $ctl) = @{$nr{$m} or die "no syscall numbers for $m\n"};
my ($type, $desc, $data) = ("user", "gitpipe-left-by-a-run", "a secret");
for my $ring (-3, -4) {  # KEY_SPEC_SESSION_KEYRING, KEY_SPEC_USER_KEYRING
  my $r = syscall($add, $type, $desc, $data, length($data), $ring);
  print "add_key $ring: ", ($r == -1 ? "$!" : "added"), "\n";
}
my $r = syscall($req, $type, $desc, 0, 0);
print "request_key: ", ($r == -1 ? "$!" : "found"), "\n";
$r = syscall($ctl, 0, -3, 0, 0, 0);  # KEYCTL_GET_KEYRING_ID of the session keyring
print "keyctl: ", ($r == -1 ? "$!" : "got"), "\n";
"""
KEYRING_STEPS = """
[[stage]]
name = "one"
  [[stage.action]]
  name = "first"
  run = 'perl keys.pl > "$OUT/keys-$GITPIPE_RUN-first"'
[[stage]]
name = "two"
  [[stage.action]]
  name = "second"
  run = 'perl keys.pl > "$OUT/keys-$GITPIPE_RUN-second"'
"""


@pytest.mark.parametrize("world", DAEMON_USERS, indirect=True)
def test_no_run_reaches_the_kernels_keyrings_to_leave_or_find_anything(world: World) -> None:
    """Found by an outside review: every sandbox had the daemon's one session keyring, and all of
    them run as the one build user, whose user keyring they share, so a key (or only its
    description) one run left was there for the next run of any branch. add_key, request_key and
    keyctl now fail (seccomp, as Docker's default profile has it) in each way a sandbox starts: at
    the attempt (the repo's first push), from the parked launcher (a push's first action) and made
    ahead (a later action)."""
    files = {"keys.pl": KEYRING_PROBE}
    with world.home.daemon():
        runs = [world.home.wait_run(world.push(KEYRING_STEPS, branch, files=files), timeout=120)
                for branch in ("evil", "victim")]
    denied = ["add_key -3: Operation not permitted", "add_key -4: Operation not permitted",
              "request_key: Operation not permitted", "keyctl: Operation not permitted"]
    for run in runs:
        world.home.expect(run)
        for action in ("first", "second"):
            assert (world.out / f"keys-{run['id']}-{action}").read_text().splitlines() == denied, (run["id"], action)


def test_the_seccomp_program_denies_exactly_the_keyring_calls_of_each_architecture() -> None:
    """The filter's branches a test cannot run here (i386 and 32-bit arm processes, x32 numbers):
    the program run by a classic BPF interpreter of its three instructions, for every number."""
    prog = seccomp.program()
    insns = [struct.unpack("=HBBI", prog[at:at + 8]) for at in range(0, len(prog), 8)]
    assert {code for code, *_ in insns} == {0x20, 0x15, 0x06}  # ld [k], jeq #k, ret #k

    def verdict(nr: int, arch: int) -> int:
        pc, acc = 0, 0
        while True:
            code, jt, jf, k = insns[pc]
            if code == 0x06:
                return k
            if code == 0x20:
                acc, pc = (nr if k == 0 else arch), pc + 1
            else:
                pc += 1 + (jt if acc == k else jf)

    denied = 0x00050000 | errno.EPERM
    for arch, calls in seccomp.KEYRING_CALLS.items():
        for nr in [*range(512), *(n | 0x40000000 for n in range(512))]:
            assert (verdict(nr, arch) == denied) == (nr in calls), (hex(arch), nr)
    assert verdict(250, 0xDEAD) == 0x7FFF0000  # an architecture it cannot name: let through


NESTED_GIT_PLANT = """
[[stage]]
name = "plant"
  [[stage.action]]
  name = "plant"
  run = 'git init -q lib && git config -f lib/.git/config core.fsmonitor "echo ran > $OUT/planted; false" && chmod 000 lib'
"""
NESTED_GIT_VICTIM = """
[[stage]]
name = "victim"
  [[stage.action]]
  name = "victim"
  run = 'ls -A lib > "$OUT/victim-lib"; cd lib && git status --short >/dev/null 2>&1; true'
"""


@pytest.mark.parametrize("world", DAEMON_USERS, indirect=True)
def test_a_nested_git_hidden_in_an_unreadable_folder_of_a_large_tree_never_reaches_the_next_run(
        world: World) -> None:
    """`git clean` leaves a `.git` in a tracked folder, and the daemon removes it itself; a daemon
    not root could not open a folder the action made unreadable and skipped it. Had the hand-over
    then opened that folder up, the next run's `git status` there ran the planted core.fsmonitor
    (found by an outside review). A folder the reset cannot read starts the slot afresh."""
    files = large_tree_files()
    with world.home.daemon():
        world.home.expect(world.home.wait_run(world.push(NESTED_GIT_PLANT, "evil", files=files), timeout=120))
        world.home.expect(world.home.wait_run(world.push(NESTED_GIT_VICTIM, "victim", files=files), timeout=120))
    assert (world.out / "victim-lib").read_text().split() == ["a.txt"]
    assert not (world.out / "planted").exists()


SETUID_ARTIFACT = """
[[stage]]
name = "s"
  [[stage.action]]
  name = "suid"
  outputs = { o = "o/sh" }
  run = 'mkdir o && cp /bin/sh o/sh && chmod 6755 o/sh'
"""


def test_an_artifact_never_keeps_a_setuid_bit(world: World) -> None:
    """A stored artifact is the daemon's file (and the site may publish it): never setuid or setgid."""
    home = world.home
    with home.daemon():
        home.expect(home.wait_run(world.push(SETUID_ARTIFACT, "feature")))
    stored = [p for p in (home.home / "artifacts").rglob("sh") if p.is_file()]
    site = home.home / "site"
    published = [p for p in site.rglob("*") if p.is_file() and p.name == "sh"] if site.exists() else []
    assert stored
    for path in stored + published:
        mode = path.stat().st_mode
        assert not mode & (stat.S_ISUID | stat.S_ISGID), (path, oct(mode))
        assert stat.S_IMODE(mode) == 0o755


GLOB_TRAPS = """
[[stage]]
name = "s"
  [[stage.action]]
  name = "loops"
  outputs = { o = "o/**" }
  timeout = "60s"
  run = 'mkdir o && ln -s . o/a && ln -s . o/b && ln -s .. o/up && echo kept > o/f'
  [[stage.action]]
  name = "root"
  outputs = { r = "**" }
  timeout = "60s"
  run = 'ln -s / rootlink && echo x > x'
"""


def test_output_globs_never_follow_links_out_of_the_tree_or_into_loops(world: World) -> None:
    """`ln -s . a; ln -s . b` with `o/**` had the daemon walk 2^40 paths; `ln -s /` with `**`, the host."""
    home = world.home
    with home.daemon():
        run = home.wait_run(world.push(GLOB_TRAPS, "feature"), timeout=60)
    loops, root = home.action(run, "loops"), home.action(run, "root")
    assert loops["status"] == "succeeded", loops
    assert [a["name"] for a in run["artifacts"]] == ["o"] and run["artifacts"][0]["size"] == len("kept\n")
    assert root["status"] == "failed" and "points outside the worktree" in root["message"], root


def add_session_key(description: str) -> None:
    """A key in this process's session keyring (as systemd gives each service a session keyring)."""
    numbers = {"x86_64": (248, 250), "aarch64": (217, 219)}  # add_key, keyctl
    if os.uname().machine not in numbers:
        pytest.skip("add_key's syscall number is not known here")
    add_key, keyctl = numbers[os.uname().machine]
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(keyctl, 1, None) >= 0  # KEYCTL_JOIN_SESSION_KEYRING: a session of our own
    payload = b"daemon-only"
    key = libc.syscall(add_key, b"user", description.encode(), payload, len(payload), -3)  # -3: session
    assert key >= 0, ctypes.get_errno()


KEY_PEEK = """
[[stage]]
name = "s"
  [[stage.action]]
  name = "peek"
  run = 'cat /proc/keys > "$OUT/keys" 2>&1 || true'
"""


def test_the_daemons_session_keyring_is_not_the_actions(world: World) -> None:
    description = f"gp-daemon-key-{uuid.uuid4().hex[:8]}"
    add_session_key(description)  # the daemon inherits this test process's session keyring
    home = world.home
    with home.daemon():
        home.expect(home.wait_run(world.push(KEY_PEEK, "feature")))
    assert description not in (world.out / "keys").read_text()


TMP_PLANT = """
[[stage]]
name = "plant"
  [[stage.action]]
  name = "plant"
  run = '''
    for d in /tmp /var/tmp /dev/shm; do echo planted > "$d/planted-$GITPIPE_RUN"; done
    ls -A /tmp /var/tmp /dev/shm > "$OUT/plant-tmp"
  '''
"""

TMP_USE = """
[[stage]]
name = "use"
  [[stage.action]]
  name = "use"
  secrets = ["TOKEN"]
  run = '''
    ls -A /tmp /var/tmp /dev/shm > "$OUT/use-tmp-before"
    f=$(mktemp) && echo "$f" > "$OUT/use-mktemp"
    touch /var/tmp/a /dev/shm/b
    python3 -c "import tempfile; print(tempfile.gettempdir())" > "$OUT/use-gettempdir"
    cat <<EOF > "$OUT/use-heredoc"
    here
    EOF
  '''
"""


@users
def test_tmp_is_writable_and_private_to_each_attempt(world: World) -> None:
    """Builds need a writable /tmp (mktemp, compilers); nothing one attempt leaves there is seen by the next."""
    home = world.home
    with home.daemon():
        home.expect(home.wait_run(world.push(TMP_PLANT, "feature")))
        home.expect(home.wait_run(world.push(TMP_USE, "main")))
    assert "planted-" in (world.out / "plant-tmp").read_text()
    assert "planted" not in (world.out / "use-tmp-before").read_text(), "a feature run's /tmp reached main"
    assert (world.out / "use-mktemp").read_text().startswith("/tmp/tmp.")
    assert (world.out / "use-gettempdir").read_text() == "/tmp\n"


# ---------------------------------------------------------------------------- attack: leftover processes

LEFTOVER = r"""
[[stage]]
name = "attack"
  [[stage.action]]
  name = "leave"
  timeout = "100s"
  run = '''
    M="$MARKER"
    setsid env -i bash -c 'trap "" TERM HUP INT; exec -a "$0-setsid" sleep 60' "$M" </dev/null >/dev/null 2>&1 &
    ( ( exec -a "$M-dfork" sleep 60 </dev/null >/dev/null 2>&1 & ) & )
    nohup bash -c 'exec -a "$0-nohup" sleep 60' "$M" </dev/null >/dev/null 2>&1 &
    setsid env -i bash -c 'trap "" TERM HUP; for i in $(seq 600); do
        for f in /proc/[0-9]*/environ; do tr "\0" "\n" < "$f"; done 2>/dev/null | grep -a "^TOKEN=" >> "$1/watch"
        sleep 0.1
      done' "$M-watch" "$OUT" </dev/null >/dev/null 2>&1 &
    disown -a
    touch "$OUT/spawned"
    for i in $(seq 900); do [ -e "$OUT/go" ] && break; sleep 0.1; done
  '''
"""


@users
def test_no_process_outlives_its_attempt(world: World) -> None:
    home = world.home
    marker = f"gpsbx-left-{uuid.uuid4().hex}"
    try:
        with home.daemon() as daemon:
            attack = world.push(LEFTOVER, "feature", MARKER=marker)
            wait_for(lambda: (world.out / "spawned").exists(), 60, what="the leftovers to start")
            # They run (seen from the host): three renamed with exec -a, and the watcher's shell.
            wait_for(lambda: len(marker_processes(marker, argv0=True)) >= 3
                     and len(marker_processes(f"{marker}-watch")) >= 1, 20, what="the leftovers to be running")
            (world.out / "go").touch()
            run = home.expect(home.wait_run(attack))
            left = {p: cmdline(p) for p in marker_processes(marker)}
            assert left == {}, f"processes outlived the attempt: {left}"
            # A protected run right after: nothing of the feature run is there to watch it.
            home.expect(home.wait_run(world.push(HOLDER.replace("scan-done", "holder-started"), "main")))
            assert marker_processes(marker) == []
            assert daemon.proc.poll() is None
        assert home.action(run, "leave")["status"] == "succeeded"
        assert_secret_absent(evidence(world.out), "out")
    finally:
        kill_marker_processes(marker)


# ---------------------------------------------------------------------------- attack: limits (root daemon)

BOMB = r"""
[[stage]]
name = "s"
  [[stage.action]]
  name = "bomb"
  timeout = "60s"
  # At most 2**9 = 512 processes should nothing bound it; the first one ends after 3 s.
  run = '''
    python3 -c 'exec("import os, time\nfirst = os.getpid()\nfor _ in range(9):\n    try:\n        os.fork()\n    except OSError:\n        break\ntime.sleep(3 if os.getpid() == first else 30)\n")'
  '''

  [[stage.action]]
  name = "steady"
  run = "sleep 2; echo steady-ok"
"""

HOG = r"""
[[stage]]
name = "s"
  [[stage.action]]
  name = "hog"
  timeout = "60s"
  run = 'python3 -c "b = bytearray(512 * 1024 * 1024); print(len(b))"'

  [[stage.action]]
  name = "steady"
  run = "sleep 2; echo steady-ok"
"""


def assert_concurrent_and_undisturbed(home: Home, run: dict[str, Any], greedy: str) -> None:
    """The other action of the same run_order ran at the same time, and did its work."""
    steady, other = home.action(run, "steady"), home.action(run, greedy)
    assert steady["status"] == "succeeded" and "steady-ok" in home.logs(run["id"], "steady")
    assert steady["started_at"] < other["finished_at"] and other["started_at"] < steady["finished_at"], (steady, other)


def test_fork_bomb_is_bounded_by_pids(tmp_path: Path) -> None:
    with make_world("root", tmp_path, "pids = 64\n") as world, world.home.daemon() as daemon:
        home = world.home
        run = home.expect(home.wait_run(world.push(BOMB, "feature"), timeout=100), "failed")
        assert daemon.proc.poll() is None, "the daemon died"
        home.expect(home.wait_run(world.push(SECRET_USER, "main")))  # and it still serves
        assert "too many processes (limit pids = 64)" in (home.action(run, "bomb")["message"] or "")
        assert_concurrent_and_undisturbed(home, run, "bomb")


def test_allocation_beyond_memory_fails_naming_the_limit(tmp_path: Path) -> None:
    with make_world("root", tmp_path, 'memory = "64M"\n') as world, world.home.daemon() as daemon:
        home = world.home
        run = home.expect(home.wait_run(world.push(HOG, "feature"), timeout=100), "failed")
        assert daemon.proc.poll() is None, "the daemon died"
        assert "out of memory (limit 64M)" in (home.action(run, "hog")["message"] or "")
        assert_concurrent_and_undisturbed(home, run, "hog")


def test_a_held_bwrap_runs_nothing_until_all_of_it_is_in_the_cgroup(tmp_path: Path) -> None:
    """bwrap starts held (--block-fd); the daemon writes its processes into the attempt's group,
    then lets it go: the script is a member from its first instruction. A group that cannot be
    joined (gone here) fails the start, and bwrap is killed before its block is released."""
    if not IS_ROOT:
        pytest.skip("cgroup hierarchies are root's on this host (see the module's docstring)")
    from gitpipe import settings
    from gitpipe.sandbox import Confine, Sandbox

    home = Home(tmp_path / "w")
    home.gitpipe("init", check=True)
    sandbox = Sandbox.for_host(settings.load(home.home))
    assert sandbox.tree is not None, "a root daemon gets a cgroup per attempt"
    slot = tmp_path / "slot"
    (slot / "tree").mkdir(parents=True)
    try:
        box = Confine(key="held", home=slot / "home", tree=slot / "tree", name="r", output=slot / "output")
        launch = sandbox.launch(["bash", "-c", "cat /proc/self/cgroup > own; sleep 0.3"], {}, box)
        assert launch.group is not None and "/bin/sh" not in launch.argv
        proc = launch.popen(stdin=subprocess.DEVNULL, start_new_session=True)
        time.sleep(0.1)
        members = launch.group.members()
        assert proc.wait() == 0
        launch.group.remove()
        assert proc.pid not in members and len(members) >= 2, members  # the sandbox's init, bash (not bwrap)
        assert all(line.endswith("/held") for line in (slot / "tree" / "own").read_text().splitlines()
                   if ":pids:" in line or ":memory:" in line)

        box = Confine(key="gone", home=slot / "home", tree=slot / "tree", name="r", output=slot / "output")
        launch = sandbox.launch(["bash", "-c", "touch ran"], {}, box)
        assert launch.group is not None
        launch.group.remove()
        with pytest.raises(OSError):
            launch.popen(stdin=subprocess.DEVNULL, start_new_session=True)
        time.sleep(0.3)
        assert not (slot / "tree" / "ran").exists()
    finally:
        sandbox.close()


CRASHED_DAEMON = r"""
import json, os, signal, subprocess, sys
from pathlib import Path
from gitpipe import sandbox as sandbox_module, settings

home, slot = sys.argv[1], Path(sys.argv[2])


def crash(group, pid):  # the daemon dies between bwrap's start and the cgroup move
    ppid = [line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("PPid:")]
    (slot / "pids").write_text(json.dumps([pid, int(ppid[0])]))
    os.kill(os.getpid(), signal.SIGKILL)


sandbox_module._admit = crash
sandbox = sandbox_module.Sandbox.for_host(settings.load(home))
box = sandbox_module.Confine(key="crash", home=slot / "home", tree=slot / "tree", name="r", output=slot / "output")
script = "touch ran; setsid sh -c '(sleep 2; touch escaped) &' ; sleep 2; touch waited"
sandbox.launch(["bash", "-c", script], {}, box).popen(stdin=subprocess.DEVNULL)
"""


def test_a_daemon_killed_before_the_cgroup_move_leaves_no_sandbox_running(tmp_path: Path) -> None:
    """The crash window of the held start: the daemon is SIGKILLed after bwrap made its sandbox's
    process and before moving it into the attempt's group. bwrap takes an EOF on its block-fd for a
    go (and outlives its parent here): the script, a setsid'd grandchild with it, then ran to its end
    outside the group. It holds the write end too now, so it stays blocked and runs nothing."""
    if not IS_ROOT:
        pytest.skip("cgroup hierarchies are root's on this host (see the module's docstring)")
    home = Home(tmp_path / "w")
    home.gitpipe("init", check=True)
    slot = tmp_path / "slot"
    (slot / "tree").mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-c", CRASHED_DAEMON, str(home.home), str(slot)], check=False,
                          stdin=subprocess.DEVNULL, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    pids = json.loads((slot / "pids").read_text())
    try:
        time.sleep(3)  # what the script (and its setsid'd grandchild) would have written by now
        assert sorted(p.name for p in (slot / "tree").iterdir()) == []  # it never ran
    finally:
        for pid in pids:  # what the next daemon kills by the attempt's token (executor.kill_tokens)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---------------------------------------------------------------------------- network


@contextmanager
def listener() -> Iterator[socket.socket]:
    """A TCP listener of the test's own on 127.0.0.1 (a random port), never accepting by itself."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def accepted(sock: socket.socket) -> int:
    """How many connections reached the listener (all taken from its backlog now)."""
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


CONNECT = """
  [[stage.action]]
  name = "{name}"
  {network}
  run = '''
    if (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null; then echo connected; else echo refused; fi > "$OUT/{name}"
  '''
"""


@users
def test_network_false_closes_the_network(world: World) -> None:
    home = world.home
    with listener() as closed, listener() as open_:
        cport, oport = closed.getsockname()[1], open_.getsockname()[1]
        by_pipeline = '[[stage]]\nname = "net"\n' + CONNECT.format(name="pipeline-off", network="", port=cport)
        by_action = ('[[stage]]\nname = "net"\n'
                     + CONNECT.format(name="action-off", network="network = false", port=cport)
                     + CONNECT.format(name="default-on", network="", port=oport))
        with home.daemon():
            first = world.push(by_pipeline, "feature", head="[pipeline]\nnetwork = false\n")
            second = world.push(by_action, "feature2")
            home.expect(home.wait_run(first))
            home.expect(home.wait_run(second))
        assert accepted(closed) == 0, "an action with network = false reached the host's 127.0.0.1"
        assert accepted(open_) == 1, "with the network on, the action could not connect"
    assert (world.out / "pipeline-off").read_text() == "refused\n"
    assert (world.out / "action-off").read_text() == "refused\n"
    assert (world.out / "default-on").read_text() == "connected\n"


# ---------------------------------------------------------------------------- the positive side

SECRET_USER = """
[[stage]]
name = "s"
  [[stage.action]]
  name = "use"
  secrets = ["TOKEN"]
  run = 'printf "%s" "$TOKEN" | sha256sum | cut -c1-64 > "$OUT/token.sha256"'
"""


@users
def test_secrets_arrive_on_protected_main(world: World) -> None:
    home = world.home
    with home.daemon():
        run = home.expect(home.wait_run(world.push(SECRET_USER, "main")))
    assert (world.out / "token.sha256").read_text().strip() == sha256_text(SECRET)
    assert SECRET not in home.logs(run["id"])


OUTPUTS = """
[[stage]]
name = "one"
  [[stage.action]]
  name = "produce"
  run = 'echo "GREETING=hello-$GITPIPE_RUN" >> "$GITPIPE_OUTPUT"; echo "$GITPIPE_OUTPUT" > "$OUT/output-path"'
[[stage]]
name = "two"
  [[stage.action]]
  name = "consume"
  run = 'echo "$GITPIPE_OUT_PRODUCE_GREETING" > "$OUT/greeting"'
"""


@users
def test_output_values_reach_a_later_action(world: World) -> None:
    home = world.home
    with home.daemon():
        run = home.expect(home.wait_run(world.push(OUTPUTS, "feature")))
    assert (world.out / "greeting").read_text() == f"hello-{run['id']}\n"
    assert (world.out / "output-path").read_text() == "/run/gitpipe/output\n"
    assert run["outputs"] == [{"action": "produce", "key": "GREETING", "value": f"hello-{run['id']}"}]


def record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}\n"


def make_wheel(directory: Path, name: str, version: str, value: str) -> Path:
    """A minimal pure-Python wheel: one module, METADATA, WHEEL and RECORD."""
    module = name.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": f'VALUE = "{value}"\n'.encode(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test_sandbox\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(record_line(p, d) for p, d in files.items()) + f"{info}/RECORD,,\n"
    path = directory / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for rel, data in files.items():
            zf.writestr(rel, data)
        zf.writestr(f"{info}/RECORD", record)
    return path


@contextmanager
def package_index(root: Path, wheel: Path, project: str) -> Iterator[tuple[str, list[str]]]:
    """A PEP 503 simple index on 127.0.0.1 serving one wheel; (its URL, the paths requested)."""
    (root / "files").mkdir(parents=True)
    shutil.copy(wheel, root / "files" / wheel.name)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (root / "simple" / project).mkdir(parents=True)
    (root / "simple" / "index.html").write_text(f'<html><body><a href="{project}/">{project}</a></body></html>\n')
    (root / "simple" / project / "index.html").write_text(
        f'<html><body><a href="../../files/{wheel.name}#sha256={digest}">{wheel.name}</a></body></html>\n')
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the http.server API
            requested.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/simple/", requested
    finally:
        server.shutdown()
        server.server_close()


VENV = """
[[stage]]
name = "s"
  [[stage.action]]
  name = "venv"
  timeout = "100s"
  env = { PIP_CONFIG_FILE = "/dev/null", PIP_DISABLE_PIP_VERSION_CHECK = "1", PIP_NO_INPUT = "1" }
  run = '''
    python3 -m venv .venv
    .venv/bin/pip install --no-cache-dir --index-url "$INDEX" gpsbx-hello
    .venv/bin/python -c "import gpsbx_hello, sys; print(gpsbx_hello.VALUE, sys.prefix)" > "$OUT/venv"
  '''
"""


@users
def test_venv_and_package_from_a_local_index(world: World, tmp_path: Path) -> None:
    home = world.home
    value = uuid.uuid4().hex
    wheel = make_wheel(tmp_path, "gpsbx-hello", "1.0", value)
    with package_index(tmp_path / "index", wheel, "gpsbx-hello") as (url, requested):
        with home.daemon():
            home.expect(home.wait_run(world.push(VENV, "feature", INDEX=url), timeout=110))
    got_value, prefix = (world.out / "venv").read_text().split()
    assert got_value == value and prefix == "/build/shop/.venv"
    assert any(p.startswith("/simple/gpsbx-hello") for p in requested), requested
    assert any(p.startswith(f"/files/{wheel.name}") for p in requested), requested


BACKEND = '''\
"""An in-tree PEP 517 backend: writes the wheel with zipfile, nothing to install first."""
import base64, hashlib, os, zipfile

NAME, VERSION = "gpsbx_built", "2.0"
INFO = f"{NAME}-{VERSION}.dist-info"


def _line(path, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}\\n"


def get_requires_for_build_wheel(config_settings=None):
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    with open("value.txt", "rb") as f:
        value = f.read().strip()
    files = {
        f"{NAME}/__init__.py": b"VALUE = '" + value + b"'\\n",
        f"{INFO}/METADATA": f"Metadata-Version: 2.1\\nName: gpsbx-built\\nVersion: {VERSION}\\n".encode(),
        f"{INFO}/WHEEL": b"Wheel-Version: 1.0\\nGenerator: backend\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n",
    }
    name = f"{NAME}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
        zf.writestr(f"{INFO}/RECORD", "".join(_line(p, d) for p, d in files.items()) + f"{INFO}/RECORD,,\\n")
    return name
'''

PYPROJECT = """\
[build-system]
requires = []
build-backend = "backend"
backend-path = ["."]
"""

WHEEL_PIPELINE = """
[[stage]]
name = "build"
  [[stage.action]]
  name = "wheel"
  timeout = "100s"
  env = { PIP_CONFIG_FILE = "/dev/null", PIP_DISABLE_PIP_VERSION_CHECK = "1", PIP_NO_INPUT = "1" }
  run = '''
    python3 -m venv .venv
    .venv/bin/pip wheel --no-deps --no-index -w dist .
  '''
  outputs = { wheel = "dist/*.whl" }
[[stage]]
name = "use"
  [[stage.action]]
  name = "install"
  inputs = ["wheel"]
  timeout = "100s"
  env = { PIP_CONFIG_FILE = "/dev/null", PIP_DISABLE_PIP_VERSION_CHECK = "1", PIP_NO_INPUT = "1" }
  run = '''
    python3 -m venv .venv
    .venv/bin/pip install --no-index dist/*.whl
    .venv/bin/python -c "import gpsbx_built; print(gpsbx_built.VALUE)" > "$OUT/built"
  '''
"""


@users
def test_wheel_built_in_the_sandbox_passes_on_as_an_artifact(world: World) -> None:
    home = world.home
    value = uuid.uuid4().hex
    text = pipeline(world.env_table() + "\n" + pipeline(WHEEL_PIPELINE))
    with home.daemon():
        run_id = home.push_run(world.repo, {".pipeline.toml": text, "backend.py": BACKEND,
                                            "pyproject.toml": PYPROJECT, "value.txt": value}, branch="feature")
        run = home.expect(home.wait_run(run_id, timeout=110))
    assert (world.out / "built").read_text() == f"{value}\n"
    stored = list((home.home / "artifacts" / str(run["id"])).rglob("*.whl"))
    assert [p.name for p in stored] == ["gpsbx_built-2.0-py3-none-any.whl"]
    with zipfile.ZipFile(stored[0]) as zf:
        assert zf.read("gpsbx_built/__init__.py") == f"VALUE = '{value}'\n".encode()



@pytest.mark.parametrize("world", DAEMON_USERS, indirect=True)
def test_cleaning_a_slot_never_follows_a_link_to_a_host_file(world: World) -> None:
    """Read-only directories holding links to host files: removing them must not chmod the targets."""
    home = world.home
    victim = home.root / "victim.txt"
    victim.write_text("host file\n")
    victim.chmod(0o644)
    if isinstance(home, UserHome):
        os.chown(victim, home.uid, home.gid)
    body = f"""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "links"
          run = 'for d in "$HOME/a" ./b; do mkdir -p "$d" && ln -s {victim} "$d/l" && chmod 555 "$d"; done'
        """
    with home.daemon():
        home.wait_run(world.push(body, "feature"))
        home.expect(home.wait_run(world.push(LATER_MAIN, "main")))
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644


@users
def test_loader_variables_of_a_pipeline_reach_only_its_script(world: World) -> None:
    """`[env] LD_PRELOAD = "<a .so committed in the worktree>"` once ran that code as the
    daemon's user (root, for a root daemon) outside the sandbox: the sh that joins the cgroup
    and bwrap itself got the pipeline's environment. LD_DEBUG shows every program ld.so starts."""
    body = '''
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "probe"
          env = { LD_DEBUG = "libs", LD_PRELOAD = "", PATH = "/usr/bin:/bin:/custom" }
          run = "echo \\"script sees LD_DEBUG=$LD_DEBUG PATH=$PATH\\""
        '''
    with world.home.daemon():
        run_id = world.push(body, "feature")
        world.home.expect(world.home.wait_run(run_id))
        log = world.home.logs(run_id)
    assert "script sees LD_DEBUG=libs PATH=/usr/bin:/bin:/custom" in log
    started = set(re.findall(r"initialize program: (\S+)", log))
    assert started and all(Path(p).name in ("bash", "echo") for p in started), started


# A feature branch's attempt opens tracked files of its slot, and hands the open files over an
# abstract unix socket (the network namespace is the host's by default) to an attempt of its own
# that keeps running. The slot goes back to the pool; git leaves files whose content did not
# change in place, so a protected run taking that slot next gets the very same inodes, and the
# held descriptor rewrites `build.sh` after the daemon's reset looked at it.
FD_GRAB = r'''
import os, socket, sys, time
fds = [os.open("first.txt", os.O_RDONLY), os.open("build.sh", os.O_RDWR)]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
for _ in range(600):
    try:
        s.connect("\0" + sys.argv[1])
        break
    except OSError:
        time.sleep(0.1)
socket.send_fds(s, [b"x"], fds)
s.recv(1)
'''
FD_HOLD = r'''
import ctypes, os, select, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind("\0" + sys.argv[1])
s.listen(1)
c, _ = s.accept()
_msg, fds, _flags, _addr = socket.recv_fds(c, 1, 2)
c.send(b"k")
libc = ctypes.CDLL(None, use_errno=True)
watch = libc.inotify_init()
libc.inotify_add_watch(watch, f"/proc/self/fd/{fds[0]}".encode(), 0x20)  # IN_OPEN
if select.select([watch], [], [], 30)[0]:  # the next one to open first.txt: who took the slot
    os.ftruncate(fds[1], 0)
    os.pwrite(fds[1], b"echo planted\n", 0)
    open(os.path.join(os.environ["OUT"], "held-wrote"), "w").write("yes")
'''


@users
def test_a_feature_branch_cannot_keep_files_of_a_slot_a_protected_run_gets_next(world: World) -> None:
    home = world.home
    name = f"gp-attack-{uuid.uuid4().hex[:8]}"
    files = {"first.txt": "first\n", "build.sh": "echo built honestly\n", "grab.py": FD_GRAB, "hold.py": FD_HOLD}
    attack = f"""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "grab"
          run = "python3 grab.py {name}"
          [[stage.action]]
          name = "hold"
          timeout = "90s"
          run = "python3 hold.py {name}"
        """
    victim = """
        [[stage]]
        name = "main"
          [[stage.action]]
          name = "build"
          run = 'cat first.txt > /dev/null; sleep 3; sh build.sh >> "$OUT/main-build"'
        """
    with home.daemon():
        feature = world.push(attack, "feature", files=files)
        wait_for(lambda: home.action(home.show(feature), "grab")["status"] in ("succeeded", "failed"),
                 60, 0.5, "the grab action to end")
        main = home.expect(home.wait_run(world.push(victim, "main", files=files)))
        home.wait_run(feature, timeout=90)
    assert main["status"] == "succeeded"
    assert (world.out / "main-build").read_text() == "built honestly\n", (world.out / "held-wrote").exists()


def test_hand_over_settles_the_tree_and_never_reaches_through_a_link(tmp_path: Path) -> None:
    """The reset's chmod/chown walk (as root, for the build user) goes through descriptors: a
    folder or file that is a link to the host is never followed, even one swapped in mid-walk
    by a process holding the tree open (a link here stands for the swap's end state)."""
    from gitpipe.sandbox import hand_over

    host = tmp_path / "host"
    host.mkdir(mode=0o700)
    secret = host / "shadow"
    secret.write_text("root only\n")
    secret.chmod(0o600)
    tree = tmp_path / "tree"
    (tree / "src" / "deep").mkdir(parents=True)
    (tree / "src" / "deep" / "run.sh").write_text("#!/bin/sh\n")
    (tree / "src" / "deep" / "run.sh").chmod(0o700)
    (tree / "README").write_text("r\n")
    (tree / "README").chmod(0o000)
    (tree / "src").chmod(0o555)
    (tree / "etc").symlink_to(host)  # a folder link: a path-based walk would chmod host/
    (tree / "shadow").symlink_to(secret)
    build = pwd.getpwnam("gitpipe-build") if os.getuid() == 0 else None
    uid, gid = (build.pw_uid, build.pw_gid) if build else (None, None)
    hand_over(tree, uid, gid)
    assert stat.S_IMODE((tree / "src").stat().st_mode) == 0o755
    assert stat.S_IMODE(host.stat().st_mode) == 0o700 and stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert (host.stat().st_uid, secret.stat().st_uid) == (os.getuid(), os.getuid())
    if build:
        assert stat.S_IMODE((tree / "README").stat().st_mode) == 0o644
        assert stat.S_IMODE((tree / "src" / "deep" / "run.sh").stat().st_mode) == 0o755
        assert (tree / "src" / "deep" / "run.sh").stat().st_uid == uid
        assert (tree / "shadow").lstat().st_uid == uid  # the link itself, never its target


def _deep_tree(top: Path, depth: int, mode: int = 0o700) -> None:
    """`top` holding one folder `d` in another, `depth` deep, each of `mode`, and a file `f` at
    the bottom, made through descriptors (pathlib and shutil recurse per folder)."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", mode, dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
    finally:
        os.close(fd)


def _modes_down(top: Path) -> list[int]:
    """The mode of each folder `d` below `top`, top first (read through descriptors)."""
    modes, fd = [], os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while True:
            try:
                child = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                return modes
            os.close(fd)
            fd = child
            modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
    finally:
        os.close(fd)


def test_hand_over_walks_a_tree_deeper_than_pythons_stack_with_few_descriptors(tmp_path: Path) -> None:
    """A pushed tree may be ~2,000 folders deep (git's paths stop at PATH_MAX): the walk recursed
    once per folder, and the run of such a push failed with an internal RecursionError. It walks
    any depth now, holding at most HELD_DIRS folders open: here in a process allowed 200
    descriptors (a service's limit is 1,024, and select() takes none above it)."""
    from gitpipe.sandbox import HELD_DIRS

    tree = tmp_path / "tree"
    _deep_tree(tree, 1500)
    assert HELD_DIRS < 150
    code = ("import resource, sys; from pathlib import Path; from gitpipe.sandbox import hand_over\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (200, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
            "hand_over(Path(sys.argv[1]), None, None)\n")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(tree)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        modes = _modes_down(tree)
        assert len(modes) == 1500 and set(modes) == {0o755}, sorted(set(modes))
    finally:  # pytest's own removal of old temporary folders recurses: it must never meet this depth
        subprocess.run(["rm", "-rf", "--", str(tree)], check=False)


def test_hand_over_walks_a_branching_tree_past_the_held_folders(tmp_path: Path) -> None:
    """Deeper than HELD_DIRS the walk lets the folders above it go; going down a second branch
    there let go one let go already and failed with EBADF (an outside review's find: two sibling
    folders at depth 64 were enough). Every folder of a branching tree 200 deep is settled,
    and no descriptor is left open."""
    import random

    from gitpipe.sandbox import HELD_DIRS, hand_over

    tree = tmp_path / "tree"
    below = tree / "/".join(["d"] * (HELD_DIRS - 1))
    (below / "a").mkdir(parents=True)
    (below / "b").mkdir()
    rng = random.Random(11)
    for _ in range(40):  # chains of random depth branching off at random points of the first
        at = tree / "/".join(["d"] * rng.randrange(HELD_DIRS - 10, HELD_DIRS + 60))
        (at / "/".join(rng.choice("xyz") for _ in range(rng.randrange(1, 80)))).mkdir(parents=True, exist_ok=True)
    folders = [Path(top) for top, _, _ in os.walk(tree)]
    for folder in folders:
        folder.chmod(0o700)
    fds = len(os.listdir("/proc/self/fd"))
    hand_over(tree, None, None)
    assert len(os.listdir("/proc/self/fd")) == fds
    wrong = [str(f.relative_to(tree)) for f in folders if stat.S_IMODE(f.stat().st_mode) != 0o755]
    assert len(folders) > 500 and not wrong, wrong[:3]


def test_hand_over_stops_where_a_folder_it_let_go_was_moved(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Deeper than HELD_DIRS the walk lets a folder's descriptor go and opens it again as `..` of
    its child on the way up. A process holding the tree open may move the folder meanwhile; then
    `..` is another folder, which the walk must not settle as if it were the one it left: it
    stops with an error (the slot is then made afresh), and keeps no descriptor open. The move is
    made here at a set point of the walk, as a racing process would."""
    import errno

    from gitpipe import sandbox

    tree = tmp_path / "tree"
    depth = sandbox.HELD_DIRS + 20
    _deep_tree(tree, depth)
    settle, seen = sandbox._settle_dir, [0]

    def racing(fd: int, st: os.stat_result, *rest: Any) -> list[str]:
        seen[0] += 1
        if seen[0] == depth:  # near the bottom, folders 1-19 let go: move the 6th into a new one
            (tree / "x").mkdir()
            os.rename(tree / "d" / "d" / "d" / "d" / "d" / "d", tree / "x" / "d")
        return settle(fd, st, *rest)

    monkeypatch.setattr(sandbox, "_settle_dir", racing)
    fds = len(os.listdir("/proc/self/fd"))
    try:
        with pytest.raises(OSError) as raised:
            sandbox.hand_over(tree, None, None)
        assert raised.value.errno == errno.ESTALE, raised.value
        assert len(os.listdir("/proc/self/fd")) == fds
    finally:
        subprocess.run(["rm", "-rf", "--", str(tree)], check=False)


def test_an_attempts_home_and_output_are_emptied_in_place_unless_an_attempt_changed_what_they_are(
        tmp_path: Path) -> None:
    """fresh_dir and fresh_file keep an empty HOME and output file exactly as they made them (no new
    inode per attempt), and make them anew when an attempt left anything in them or on them: a
    file, content, an extended attribute, another mode, another name for the file."""
    from gitpipe.sandbox import empty, fresh_dir, fresh_file

    home, out = tmp_path / "home", tmp_path / "output"
    fresh_dir(home, None, None)
    fresh_file(out, None, None)
    assert stat.S_IMODE(home.stat().st_mode) == 0o711 and stat.S_IMODE(out.stat().st_mode) == 0o600
    kept = home.stat().st_ino, out.stat().st_ino
    fresh_dir(home, None, None)
    fresh_file(out, None, None)
    assert (home.stat().st_ino, out.stat().st_ino) == kept

    (home / ".bashrc").write_text("planted")
    out.write_text("TOKEN=secret\n")
    empty(out)  # after the attempt read it
    assert out.read_bytes() == b"" and out.stat().st_ino == kept[1]
    fresh_dir(home, None, None)
    assert list(home.iterdir()) == []

    os.setxattr(home, "user.left", b"for the next run")
    os.setxattr(out, "user.left", b"for the next run")
    fresh_dir(home, None, None)
    fresh_file(out, None, None)
    assert os.listxattr(home) == [] and os.listxattr(out) == []

    home.chmod(0o777)
    fresh_dir(home, None, None)
    assert stat.S_IMODE(home.stat().st_mode) == 0o711

    other = tmp_path / "other-name"
    os.link(out, other)
    fresh_file(out, None, None)
    assert out.stat().st_nlink == 1 and other.stat().st_nlink == 1

    subprocess.run(["fallocate", "--keep-size", "--length", "1M", str(out)], check=True)  # empty, yet 1 MiB
    fresh_file(out, None, None)
    assert out.stat().st_size == 0 and out.stat().st_blocks == 0

    for i in range(400):  # a folder grown by many names: each look would read them all again
        (home / f"f{i:0100}").touch()
    for f in home.iterdir():
        f.unlink()
    assert home.stat().st_size > 4096
    fresh_dir(home, None, None)
    assert home.stat().st_size <= 4096


def test_an_attempt_given_secrets_gets_a_home_and_output_no_earlier_attempts_holder_reaches(
        tmp_path: Path) -> None:
    """Within a run, HOME and the output file are emptied in place from one attempt to the next
    (fresh_dir, fresh_file), but an action that asks for secrets gets new ones: a process of an
    earlier action of the run, without secrets, that holds the kept ones open (passed to a
    sandbox of the run still running) must not reach what it writes there (a token a login
    leaves in HOME) nor its outputs."""
    from types import SimpleNamespace

    from gitpipe import git as gitmod
    from gitpipe import pipeline as pipeline_mod
    from gitpipe.sandbox import fresh_dir, fresh_file
    from gitpipe.scheduler import confine

    pipe = pipeline_mod.parse('[[stage]]\nname = "s"\n  [[stage.action]]\n  name = "deps"\n  run = "true"\n'
                              '  [[stage.action]]\n  name = "push"\n  run = "true"\n  secrets = ["TOKEN"]\n')
    deps, push = pipe.stages[0].actions
    slot = gitmod.Slot(tmp_path / "0", -1)
    host = SimpleNamespace(sandbox=SimpleNamespace(network=lambda pipeline, action: False))
    boxes = [confine(host, pipe, spec, "app", (), slot, "k") for spec in (deps, push)]  # type: ignore[arg-type]
    assert [box.fresh for box in boxes] == [False, True]

    slot.tree.mkdir(parents=True)
    fresh_dir(slot.home, None, None, keep=not boxes[0].fresh)
    fresh_file(slot.output, None, None, keep=not boxes[0].fresh)
    held_home = os.open(slot.home, os.O_RDONLY | os.O_DIRECTORY)
    held_output = os.open(slot.output, os.O_RDWR)
    try:
        fresh_dir(slot.home, None, None, keep=not boxes[1].fresh)
        fresh_file(slot.output, None, None, keep=not boxes[1].fresh)
        (slot.home / ".netrc").write_text("machine registry password s3cr3t\n")
        assert os.listdir(held_home) == []
        os.write(held_output, b"DEPLOY_URL=https://evil.example\n")
        assert slot.output.read_bytes() == b""
    finally:
        os.close(held_home)
        os.close(held_output)


def test_removing_a_fifo_where_a_folder_or_file_was_does_not_wait_for_a_writer(tmp_path: Path) -> None:
    """remove_tree (and what calls it: a HOME or output file that is not as made) unlinks
    whatever is not a real folder; shutil.rmtree opened a FIFO and waited for a writer forever."""
    for name in ("home", "output"):
        os.mkfifo(tmp_path / name)
    code = ("import sys; from pathlib import Path; from gitpipe.git import remove_tree; "
            "from gitpipe.sandbox import fresh_file; d = Path(sys.argv[1]); "
            "remove_tree(d / 'home'); fresh_file(d / 'output', None, None)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=30)
    assert not (tmp_path / "home").exists() and stat.S_ISREG((tmp_path / "output").lstat().st_mode)
