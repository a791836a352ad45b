"""The trust boundary: the one module that turns (worktree, environment, limits) into a
confined process. Every run and plugin attempt, and every notify command written in a
pushed pipeline, is started through `Sandbox.launch`; nothing else knows bwrap.

What a confined process sees (SPEC section 11): the system read-only (/usr, /etc and the
/bin, /lib links), a private /tmp, a minimal /dev, its own PID, IPC and UTS namespaces
and /proc, its own worktree read-write at /build/<repo>, an empty HOME at /home/build,
$GITPIPE_OUTPUT at /run/gitpipe/output, and the repository's objects read-only (so git
works in the worktree and nothing can change the repo). Never the gitpipe home, the
bare repositories, the daemon's HOME and keys, deploy targets, or another process.

Who it runs as: the daemon's own user when that is not root (bwrap then makes a user
namespace and forbids further ones); when the daemon is root, bwrap runs as root to
build the mounts and `setpriv` drops to `[sandbox] user` with no capabilities and
no_new_privs before anything of the user's runs. An action is never uid 0.

Every process of the sandbox joins the attempt's cgroup (see `cgroup`) before it runs
anything: bwrap is started held (`--block-fd`), says which process is its sandbox
(`--info-fd`), and is let go once the daemon has written that one into the group's
`cgroup.procs` (see `Launch.popen`); the script is forked after that, inside. A run's first
attempt starts from a launcher parked in its group beforehand (see `launcher`), and a later one
from the sandbox made for it while the action before ran (`Sandbox.ready`). Without bwrap (mode "none") a `sh`
prefix writes 0 into `cgroup.procs`, then execs the rest. A daemon killed between bwrap's
start and its admission leaves that bwrap blocked (it holds its block-fd's write end too: the
EOF does not let it go, and it does not die with its parent), having run nothing; the next
daemon ends it by its attempt token (`executor.kill_tokens`), which nothing of the user's
could have taken out of its environment.
Known weak spots, also in the README: the kernel is shared (a kernel bug is a way
out), the network is open unless a pipeline closes it, and in the root setup the
build user may still create user namespaces inside the sandbox.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import pwd
import select
import shlex
import shutil
import signal
import stat
import subprocess
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gitpipe import cgroup, launcher, seccomp
from gitpipe.digest import sha256
from gitpipe.errors import ConfigError, UsageError
from gitpipe.launcher import TOKEN_VAR, Launchers, Parked
from gitpipe.settings import SandboxSettings, Settings
from gitpipe.system import SYSTEM_PATH, tool

log = logging.getLogger("gitpipe")
PACKAGE = "bubblewrap"
INSIDE_BUILD = Path("/build")
INSIDE_HOME = "/home/build"
INSIDE_OUTPUT = "/run/gitpipe/output"
SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Variables that make the loader or a shell run code of the caller's choosing (glibc's list for
# privileged programs, and the shells'): a pipeline's [env] may set them, but they reach only
# the action's own script, never sh, unshare, mount, bwrap or setpriv outside or above it.
UNSECURE_ENV = frozenset({
    "GCONV_PATH", "GETCONF_DIR", "GLIBC_TUNABLES", "HOSTALIASES", "LOCALDOMAIN", "LOCPATH", "MALLOC_TRACE",
    "NIS_PATH", "NLSPATH", "RESOLV_HOST_CONF", "RES_OPTIONS", "TMPDIR", "TZDIR", "BASH_ENV", "ENV",
    "SHELLOPTS", "BASHOPTS", "IFS", "CDPATH",
})


def unsecure(name: str) -> bool:
    return name.startswith("LD_") or name in UNSECURE_ENV


@dataclass(frozen=True)
class Confine:
    """What one confined process may see and use."""

    key: str  # unique per attempt: names its cgroup
    home: Path  # made empty here; the process's HOME
    tree: Path | None = None  # read-write; the working directory (None: HOME is)
    name: str = "work"  # the tree is /build/<name> inside
    output: Path | None = None  # $GITPIPE_OUTPUT, made empty here
    readonly: tuple[Path, ...] = ()  # seen read-only at their own paths
    network: bool = True
    # Overlays (lower, upper, work, mount point on the host) an unprivileged daemon's attempt
    # mounts in a user namespace of its own before bwrap starts (restored build caches).
    overlays: tuple[tuple[Path, Path, Path, Path], ...] = ()
    # (host folder, path on the host under `tree` or `home`): bound there in the sandbox (overlays
    # a root daemon mounted out of every attempt's reach).
    binds: tuple[tuple[Path, Path], ...] = ()
    # HOME and the output file made anew (new inodes), never an earlier attempt's emptied in place
    # (see fresh_dir): an attempt given secrets, which a process of an attempt without them that
    # holds the kept ones open must not reach
    fresh: bool = False


@dataclass
class Launch:
    """Everything `subprocess.Popen` needs to start a confined process."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    group: cgroup.Group | None = None
    spare: bool = False  # the first process is bwrap's monitor: SIGTERM goes to the others
    held: int | None = None  # where bwrap is in argv: started held, let go once in `group`
    parked: Parked | None = None  # a launcher in `group` already: it becomes argv (see launcher.py)
    # A held bwrap holds its block's write end too: only the daemon's byte lets it go (see popen).
    # Not one that runs only a launcher (Sandbox.ready), which runs nothing without the daemon's
    # order: after a crash its EOF lets it go, to end at once (one stuck before that read, the
    # next daemon ends by its token: Sandbox.ahead_token).
    hold: bool = True

    def popen(self, **kw: Any) -> subprocess.Popen[bytes]:
        """Start it (`kw`: Popen's keywords). A held bwrap gets its sandbox's first process (whose
        pid it writes to --info-fd) written into the group, then its --block-fd, and only then
        forks the script: no exec of a `sh` that joins the group first. bwrap's monitor (the
        started process) stays out: it runs nothing of the job and ends with the sandbox, and
        each move costs the kernel an RCU grace period (cgroup v1: ~2-5 ms per hierarchy under
        load). Anything going wrong kills both before the block is let go.

        A parked launcher (taken with `Sandbox.launch(parked=True)`) already is in `group`, with
        the output pipe as stdout and stderr (what executor.start asks for): it execs argv."""
        if self.parked is not None:
            assert kw.get("stdout") == subprocess.PIPE and kw.get("stderr") == subprocess.STDOUT, kw
            return self.parked.exec(self.argv, self.env, self.cwd)
        if self.held is None or self.group is None:
            return _popen(self.argv, self.cwd, self.env, **kw)
        info_r, info_w = os.pipe()
        block_r, block_w = os.pipe()
        at = self.held + 1
        argv = [*self.argv[:at], "--info-fd", str(info_w), "--block-fd", str(block_r), *self.argv[at:]]
        try:
            try:
                # bwrap reads its --block-fd once and goes on at EOF too: a daemon killed before the
                # move would let the sandbox run outside the group. So bwrap holds the write end as
                # well: only the daemon's byte releases it; after a crash it stays blocked until
                # the next daemon kills it by its token, having run nothing.
                held = (info_w, block_r, block_w) if self.hold else (info_w, block_r)
                proc = _popen(argv, self.cwd, self.env, pass_fds=(*held, *kw.pop("pass_fds", ())), **kw)
            finally:
                os.close(info_w)
                os.close(block_r)
            child = None
            try:
                child = _child_pid(info_r)
                if child is not None:  # else bwrap ended before making it (its exit says why)
                    _admit(self.group, child)
            except BaseException:
                for pid in ([] if child is None else [child]) + [proc.pid]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait()
                raise
            os.write(block_w, b"1")
            return proc
        finally:
            os.close(info_r)
            os.close(block_w)

    def abandon(self) -> None:
        """It will not be started (or its start failed): a parked launcher ends having run nothing
        (its order pipe closed, its process waited for); the group is removed with what is in it."""
        if self.parked is not None:
            self.parked.discard()
        elif self.group is not None:
            self.group.remove()


HELD_START = 30.0  # seconds bwrap may take to make its sandbox's process before it is given up


def _popen(argv: list[str], cwd: Path, env: dict[str, str], **kw: Any) -> subprocess.Popen[bytes]:
    """Popen of a bwrap command line, its seccomp program given on the fd it names (see seccomp)."""
    with seccomp.opened(argv) as (argv, fds):
        return subprocess.Popen(argv, cwd=cwd, env=env, pass_fds=(*kw.pop("pass_fds", ()), *fds), **kw)


def _child_pid(fd: int) -> int | None:
    """The sandbox's pid that a held bwrap writes to its --info-fd; None when bwrap ended first
    (it said why on its stderr, and exits non-zero)."""
    data = b""
    while True:
        ready, _, _ = select.select([fd], [], [], HELD_START)
        if not ready:
            raise OSError(errno.ETIMEDOUT, f"bwrap did not start its sandbox within {HELD_START:.0f}s")
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    if not data.strip():
        return None
    return int(json.loads(data)["child-pid"])


def _admit(group: cgroup.Group, pid: int) -> None:
    """Move the process `pid` into every hierarchy of `group`."""
    try:
        group.admit(pid)
    except ProcessLookupError:  # it ended already (bwrap failed making it; its stderr says why)
        return


@dataclass
class Sandbox:
    """Built once per daemon from `[sandbox]`; refuses to exist when it cannot confine."""

    conf: SandboxSettings
    tag: str
    bwrap: str | None = None
    uid: int | None = None  # the build user's, when the daemon is root
    gid: int | None = None
    tree: cgroup.Tree | None = None
    notes: list[str] = field(default_factory=list)
    launchers: Launchers | None = None  # see `park`
    # attempt key -> its group (a parked launcher's is not named by the key)
    groups: weakref.WeakValueDictionary[str, cgroup.Group] = field(default_factory=weakref.WeakValueDictionary)

    @classmethod
    def for_host(cls, settings: Settings) -> Sandbox:
        """Check bwrap, the build user and cgroups now, so `serve` fails at start, not mid-run."""
        conf = settings.sandbox
        box = cls(conf, sha256(str(settings.home).encode()).hexdigest()[:10])
        root = os.geteuid() == 0
        if conf.mode == "none":
            if root:
                raise ConfigError(
                    '[sandbox] mode = "none" with the daemon running as root would run actions as uid 0',
                    file=str(settings.config_path),
                    hint='install bubblewrap and use mode = "bwrap", or run the daemon as an unprivileged user')
            box.notes.append('sandbox: mode = "none": actions are NOT confined; they run as the daemon\'s '
                             "user and can read its home, secrets and repositories")
        else:
            box.bwrap = shutil.which("bwrap")
            if box.bwrap is None:
                raise ConfigError(
                    "bwrap (bubblewrap) is not installed, and [sandbox] mode is \"bwrap\"",
                    file=str(settings.config_path),
                    hint=f"install the Debian package {PACKAGE} (apt-get install -y {PACKAGE}), or write "
                         'mode = "none" under [sandbox] to run actions unconfined')
            if root:
                box.uid, box.gid = build_user(conf.user, str(settings.config_path))
            box._probe(str(settings.config_path))
            if not seccomp.covers(os.uname().machine):
                box.notes.append(f"sandbox: the seccomp filter does not know {os.uname().machine}'s system calls: "
                                 "actions there can use the kernel's keyrings, shared by every run")
        join_new_session_keyring()
        box.tree, why = cgroup.Tree.find(box.tag)
        if box.tree is None:
            box.notes.append(f"sandbox: no cgroup per attempt ({why}): timeouts and cancels find an "
                             "attempt's processes by its token, and memory/pids limits are not enforced")
        elif not box.tree.limits:
            box.notes.append(f"sandbox: memory and pids limits are not enforced ({why})")
        return box

    def _probe(self, where: str) -> None:
        """Start one empty sandbox: a host that forbids namespaces says so here, once."""
        probe = Confine(key="", home=Path("/"), network=self.conf.network)
        with seccomp.opened(self._bwrap(["true"], probe, {}, probing=True)) as (argv, fds):
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False, pass_fds=fds)
        if proc.returncode != 0:
            raise ConfigError(
                f"bwrap cannot create a sandbox on this host: {proc.stderr.strip() or proc.returncode}",
                file=where, hint="allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1), "
                                 "or in a container give it the right to create namespaces")

    def network(self, *switches: bool | None) -> bool:
        """Whether a process gets the network: the host's [sandbox] network, unless a pipeline
        or an action (`switches`, None where unset) turned it off; none may turn it on."""
        return self.conf.network and all(s is not False for s in switches)

    @property
    def ahead_token(self) -> str:
        """What the processes of this home's sandboxes made ahead carry (as an attempt's token)
        until their order: bwrap (0.8-0.11) lets its sandbox's first process go on only after its
        own info is written, and one whose daemon was killed in between (SIGKILL, so its bwrap
        with it) waits forever, outside every group: the next daemon kills it by this token
        (Daemon.recover, after a stop that was not clean)."""
        return f"ahead-{self.tag}"

    def sweep(self) -> int:
        """Kill what a previous daemon's attempts left behind (after a crash)."""
        return self.tree.sweep() if self.tree is not None else 0

    def park(self) -> None:
        """Keep a launcher parked in a group of its own from now on (the daemon calls it once its
        sweep is done): an attempt that takes one moves nothing into a cgroup (see launcher.py)."""
        if self.tree is None or self.bwrap is None:
            return
        if self.launchers is None:
            self.launchers = Launchers(self.tree, self.conf.memory if self.tree.limits else None,
                                       self.conf.pids if self.tree.limits else None)
        self.launchers.park()

    def park_again(self) -> None:
        """Park another launcher if this daemon keeps one and none is parked or being parked."""
        if self.launchers is not None:
            self.launchers.park()

    def warm(self, held: bool = False) -> None:
        """Begin the next cgroup move's wait now (cgroup.Tree.warm), unless a parked launcher
        makes that move unneeded; `held`: the next attempt starts held whatever is parked."""
        if self.tree is not None and (held or not (self.launchers is not None and self.launchers.waiting)):
            self.tree.warm()

    def close(self) -> None:
        """The daemon stops: its parked launcher ends; remove its cgroup bases."""
        if self.launchers is not None:
            self.launchers.close()
        if self.tree is not None:
            self.tree.close()

    def settle(self, tree: Path) -> None:
        """Hand a freshly reset worktree over: plain modes, the build user's (see `hand_over`)."""
        hand_over(tree, self.uid, self.gid)

    # ------------------------------------------------------------------ one process
    def prepare(self, box: Confine, settle: bool = True) -> None:
        """Make the HOME and output file fresh and (`settle`) hand the worktree over (before a
        cache restore)."""
        if box.key:
            self.warm()  # the cgroup move at launch then waits less (see cgroup.Tree.warm)
        self._fresh(box)
        if box.tree is not None and settle:
            hand_over(box.tree, self.uid, self.gid)

    def _fresh(self, box: Confine) -> None:
        """An empty HOME and output file for `box`."""
        fresh_dir(box.home, self.uid, self.gid, keep=not box.fresh)
        if box.output is not None:
            fresh_file(box.output, self.uid, self.gid, keep=not box.fresh)

    def ended(self, box: Confine) -> None:
        """Kill what is left of the attempt `box` and wait until none of its processes is (before a
        cache save reads its tree: its PID namespace ends with its script, but asynchronously)."""
        # Every group launch made is here while anything holds it; one nothing holds any more has
        # been removed (its processes killed) by whoever let it go (executor.wait, Launch.abandon).
        group = self.groups.get(box.key) if box.key else None
        if group is not None:
            group.kill()

    def ready(self, box: Confine, parked: bool = False, settle: bool = True) -> Parked | None:
        """The sandbox of `box` made before its attempt is known to run (the next action's, while
        the one before runs): bwrap started held, moved into the attempt's group, let go, its
        mounts made and its user dropped, then waiting in a launcher (launcher.PERL, run as the
        build user inside) for the command and environment that `launch(ready=...)` writes to it.
        Its output is one pipe, as executor.start has it. None where it cannot be made so (no
        bwrap, no cgroup per attempt, no perl, overlays). HOME and the output file are made fresh
        now: nothing touches them before the order. Discard it (`Parked.discard`) if not taken;
        its fd is the daemon's alone, and it ends with the daemon (bwrap's --die-with-parent,
        and an empty order).

        `parked`: made from the parked launcher, if one waits (None if not), which becomes this
        bwrap in its own group (no cgroup move: a run's first action, see launcher.py), the launcher
        inside reading its order on the stdin they share; made while the tree is being reset, so
        it is not handed over here (`settle` it before the order). `settle=False`: the same for
        one made otherwise, the caller hands the tree over (the reset that follows does)."""
        perl = launcher.find_perl()
        if self.bwrap is None or self.tree is None or not box.key or box.overlays or box.binds or perl is None:
            return None
        # Its processes carry this home's token until the order replaces their environment:
        # what a killed daemon left the next one ends (`ahead_token`).
        env = {"PATH": SYSTEM_PATH, TOKEN_VAR: self.ahead_token}
        if parked:
            # the next one is parked once this attempt has started (RunWorker._execute), not
            # meanwhile: a perl start and a cgroup move beside the push's own on 2 cores
            taken = self.launchers.take(again=False) if self.launchers is not None else None
            if taken is None:
                return None
            try:
                self._fresh(box)
                return taken.hand_on(self._launcher_inside(perl, 0, box), env, Path("/"))
            except BaseException:
                taken.discard()
                raise
        self.prepare(box, settle)
        group = self.tree.group(box.key, self.conf.memory, self.conf.pids)
        return launcher.started(group, lambda fd: Launch(
            self._launcher_inside(perl, fd, box),
            env, Path("/"), group, spare=True, held=0, hold=False,
        ).popen(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                close_fds=True, pass_fds=(fd,)))

    def _launcher_inside(self, perl: str, fd: int, box: Confine) -> list[str]:
        """bwrap running the launcher that waits inside for its order (see `ready`). In a root
        daemon's sandbox that launcher becomes the build user itself where it can (see
        launcher.become), else setpriv does before it starts."""
        user = (self.uid, self.gid) if self.uid is not None and self.gid is not None and launcher.become() else None
        return self._bwrap(launcher.command(perl, fd, bound=False, user=user), box, {},
                           script_path=SYSTEM_PATH, becomes=user is not None, launcher_inside=True)

    def launch(self, argv: list[str], env: dict[str, str], box: Confine, prepared: bool = False,
               parked: bool = False, ready: Parked | None = None) -> Launch:
        """The confined form of `argv`: its cgroup made, its HOME and output file fresh (unless
        `prepared`); `parked`: started by a parked launcher when one is ready (its output on one
        pipe, as executor.start has it), in that launcher's group; `ready`: the sandbox
        `ready(box)` made ahead for this very `box` (it becomes argv)."""
        if ready is not None:
            self.groups[box.key] = ready.group
            return Launch(argv, _inside_env(env, box), _inside_dir(box), ready.group, spare=True, parked=ready)
        if not prepared:
            self.prepare(box)
        taken = self.launchers.take() if parked and self.launchers is not None and box.key else None
        if taken is not None:
            group: cgroup.Group | None = taken.group
        else:
            group = self.tree.group(box.key, self.conf.memory, self.conf.pids) if self.tree and box.key else None
        if group is not None:
            self.groups[box.key] = group
        if self.bwrap is None:  # mode "none": the host's paths; a `sh` joins the group
            full = {**env, "PATH": env.get("PATH") or SYSTEM_PATH, "HOME": str(box.home)}
            if box.output is not None:
                full["GITPIPE_OUTPUT"] = str(box.output)
            return Launch(_join(group) + argv, full, box.tree or box.home, group)
        full = _inside_env(env, box)
        late = {k: v for k, v in full.items() if unsecure(k)}  # set by `env` just before the script
        outer = {k: v for k, v in full.items() if not unsecure(k)}
        outer["PATH"] = SYSTEM_PATH  # what finds setpriv; bwrap sets the script's own (--setenv)
        inner = self._bwrap(argv, box, late, script_path=full["PATH"])
        final = _with_overlays(inner, box.overlays) if box.overlays and self.uid is None else inner
        return Launch(final, outer, Path("/"), group, spare=True,
                      held=len(final) - len(inner) if group is not None else None, parked=taken)

    def run(self, argv: list[str], env: dict[str, str], box: Confine, stdin: bytes,
            timeout: float) -> subprocess.CompletedProcess[bytes]:
        """Run a short confined command to its end (a notify command); killed whole at `timeout`."""
        launch = self.launch(argv, env, box)
        try:
            proc = launch.popen(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        except BaseException:
            if launch.group is not None:
                launch.group.remove()
            raise
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # bwrap's monitor: its sandbox (a PID namespace) dies with it
            out, err = proc.communicate()
            err += f"\nkilled after {timeout:.0f}s".encode()
        finally:
            if launch.group is not None:
                launch.group.remove()
            from gitpipe.git import remove_tree

            remove_tree(box.home)
        return subprocess.CompletedProcess(launch.argv, proc.returncode, out, err)

    def _bwrap(self, argv: list[str], box: Confine, env: dict[str, str], probing: bool = False,
               script_path: str | None = None, becomes: bool = False, launcher_inside: bool = False) -> list[str]:
        """bwrap's argument list; `env`: variables set (by `env`) only for `argv` itself, last;
        `script_path`: the PATH bwrap gives what it starts (setpriv is named by its full path);
        `becomes`: `argv` drops to the build user itself (a launcher, see launcher.become), not setpriv;
        `launcher_inside`: `argv` is a launcher waiting for its order (which says the folder): at /."""
        assert self.bwrap is not None
        root = self.uid is not None  # the daemon is root: for_host found the build user
        out = [self.bwrap, "--die-with-parent", "--new-session", *seccomp.options()]  # no kernel keyrings
        if root:  # no user namespace: setpriv below drops to the build user
            # as root, bwrap gives its child every capability: only the two the drop needs
            out += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                    "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            out += ["--unshare-all", "--unshare-user", "--disable-userns"]
            if box.overlays:  # started as root of the overlays' namespace: the action stays this user
                out += ["--uid", str(os.getuid()), "--gid", str(os.getgid())]
            if box.network:
                out.append("--share-net")
        if root and not box.network:
            out.append("--unshare-net")
        out += ["--hostname", "gitpipe", "--ro-bind", "/usr", "/usr", *_system_links()]
        # /tmp and /dev/shm world-writable and sticky, /var traversable: as root, bwrap makes
        # them root's (0755, /var 0700), which the build user could not use (mktemp failed).
        out += ["--ro-bind", "/etc", "/etc", "--proc", "/proc", "--dev", "/dev",
                "--perms", "1777", "--tmpfs", "/tmp", "--perms", "1777", "--tmpfs", "/dev/shm",
                "--perms", "0755", "--dir", "/var", "--symlink", "../tmp", "/var/tmp"]
        made: set[str] = {"/", "/usr", "/etc", "/proc", "/dev", "/tmp", "/var"}
        if not probing:
            inside = INSIDE_BUILD / box.name
            out += _dirs(Path(INSIDE_HOME).parent, made) + ["--bind", str(box.home), INSIDE_HOME]
            out += _dirs(inside.parent, made)
            if box.tree is not None:
                out += ["--bind", str(box.tree), str(inside)]
            if box.output is not None:
                out += _dirs(Path(INSIDE_OUTPUT).parent, made) + ["--bind", str(box.output), INSIDE_OUTPUT]
            for host, at in box.binds:
                where = (inside / at.relative_to(box.tree) if box.tree is not None and at.is_relative_to(box.tree)
                         else Path(INSIDE_HOME) / at.relative_to(box.home))
                out += ["--bind", str(host), str(where)]
            for path in (*box.readonly, *self.conf.read_only):
                out += _dirs(path.parent, made) + ["--ro-bind", str(path), str(path)]
            for path in self.conf.read_write:
                out += _dirs(path.parent, made) + ["--bind", str(path), str(path)]
            out += ["--chdir", "/" if launcher_inside else str(_inside_dir(box))]
        if script_path is not None:
            out += ["--setenv", "PATH", script_path]
        out.append("--")
        if root and not becomes:
            out += [tool("setpriv"), f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                    "--inh-caps=-all", "--no-new-privs"]
        if env and not probing:
            out += [tool("env"), *(f"{k}={v}" for k, v in env.items())]
        return out + argv


def _inside_env(env: dict[str, str], box: Confine) -> dict[str, str]:
    """`env` as the script gets it inside the sandbox: its PATH (the system's when unset), HOME,
    and $GITPIPE_OUTPUT."""
    full = {**env, "PATH": env.get("PATH") or SYSTEM_PATH, "HOME": INSIDE_HOME}
    if box.output is not None:
        full["GITPIPE_OUTPUT"] = INSIDE_OUTPUT
    return full


def _inside_dir(box: Confine) -> Path:
    """Where the script starts inside the sandbox: its tree at /build/<name>, else its HOME."""
    return INSIDE_BUILD / box.name if box.tree is not None else Path(INSIDE_HOME)


@functools.cache
def _system_links() -> tuple[str, ...]:
    """The /bin, /lib... of the host as the sandbox shows them (links, or read-only binds);
    looked at once per daemon, not per attempt."""
    out: list[str] = []
    for link in SYSTEM_LINKS:
        if os.path.islink(link):
            out += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            out += ["--ro-bind", link, link]
    return tuple(out)


def _dirs(path: Path, made: set[str]) -> list[str]:
    """`--dir` for `path` and its missing parents, each mode 0755 (bwrap's default is 0700 as root)."""
    out: list[str] = []
    for p in [*reversed(path.parents), path]:
        if str(p) not in made:
            made.add(str(p))
            out += ["--perms", "0755", "--dir", str(p)]
    return out


def _with_overlays(argv: list[str], overlays: tuple[tuple[Path, Path, Path, Path], ...]) -> list[str]:
    """`argv` (bwrap) started in a user and mount namespace of its own where the overlays are
    mounted first: an unprivileged daemon cannot mount on the host, and bwrap 0.8 has no overlay
    options. The namespace maps only this user (as its root); it ends with the attempt."""
    from gitpipe.cachefs import mount_option

    mount, unshare = tool("mount"), tool("unshare")  # never the pipeline's PATH
    mounts = " && ".join(
        f"{mount} -t overlay overlay -o " + shlex.quote(
            f"lowerdir={mount_option(lo)},upperdir={mount_option(up)},workdir={mount_option(wk)}")
        + " " + shlex.quote(str(at))
        for lo, up, wk, at in overlays)
    return [unshare, "--user", "--map-root-user", "--mount", "--", "/bin/sh", "-c", f'{mounts} && exec "$@"',
            "gitpipe-overlays", *argv]


def _join(group: cgroup.Group | None) -> list[str]:
    """A `sh` prefix that moves itself into the attempt's cgroup, then execs the rest (mode "none")."""
    if group is None:
        return []
    writes = " && ".join(f"echo 0 > {shlex.quote(str(d / 'cgroup.procs'))}" for d in group.dirs)
    return ["/bin/sh", "-c", f'{writes} && exec "$@"', "gitpipe-join"]


EMPTY_DIR_SIZE = 4096  # bytes: an empty folder's size (one block on ext4; less elsewhere)


def fresh_dir(path: Path, uid: int | None, gid: int | None, keep: bool = True) -> None:
    """An empty directory (mode 0711) owned by the build user when there is one. Others may only
    pass through it: bwrap's child enters it (a command without a tree starts there) as root
    with no capability but the two setpriv needs, before it drops. Its parents are the daemon's
    alone on the host, and only its own sandbox has it. What most attempts leave, an empty one
    exactly as made here, is kept (unless not `keep`): a new inode is the costly part (see
    fdtree.rewrite)."""
    if keep and _as_made(path, stat.S_IFDIR | 0o711, uid, gid):
        return
    try:
        os.rmdir(path)  # never follows a link
    except FileNotFoundError:
        pass
    except OSError:  # not empty, or not a directory
        _remove_any(path)
    path.mkdir(mode=0o711, parents=True)
    _chown(path, uid, gid)


def fresh_file(path: Path, uid: int | None, gid: int | None, keep: bool = True) -> None:
    """An empty file (mode 0600) owned by the build user when there is one, as `fresh_dir`: the
    output file the daemon reads after the attempt. Its folder is the daemon's alone."""
    if keep and _as_made(path, stat.S_IFREG | 0o600, uid, gid):
        return
    _remove_any(path)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    _chown(path, uid, gid)


def empty(path: Path) -> None:
    """Empty an attempt's output file once it was read (it may hold secrets): kept for the next
    attempt (see `fresh_file`), unless it is not a plain file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError:
        _remove_any(path)
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.ftruncate(fd, 0)
            return
    finally:
        os.close(fd)
    _remove_any(path)


def _as_made(path: Path, mode: int, uid: int | None, gid: int | None) -> bool:
    """Whether `path` is, with nothing in it, what fresh_dir or fresh_file makes: its type and
    `mode`, its owner, one link, no extended attribute (nor ACL) an attempt could leave to the
    next one. Its folder is the daemon's alone: nothing swaps it meanwhile. Only a run's own are
    kept so (a new run's were removed by its first reset, git._clear_beside): what an attempt
    set that this does not look at (inode flags, times) reaches only the same run's next one."""
    try:
        st = os.lstat(path)
        if st.st_mode != mode or (not stat.S_ISDIR(mode) and st.st_nlink != 1):
            return False
        if uid is not None and gid is not None and (st.st_uid, st.st_gid) != (uid, gid):
            return False
        if uid is None and st.st_uid != os.geteuid():
            return False
        if stat.S_ISDIR(mode):
            if st.st_size > EMPTY_DIR_SIZE:  # grown by many names once: each look would read them all
                return False
            with os.scandir(path) as entries:
                if next(entries, None) is not None:
                    return False
        elif st.st_size or st.st_blocks:  # blocks: kept allocated past its end (fallocate -n)
            return False
        return not os.listxattr(path, follow_symlinks=False)
    except OSError:  # gone, or its attributes cannot be read: made anew
        return False


def _remove_any(path: Path) -> None:
    from gitpipe.git import remove_tree

    remove_tree(path)  # whatever it is: a file, a link, a FIFO, a folder


def hand_over(tree: Path, uid: int | None, gid: int | None) -> None:
    """Give a freshly reset worktree plain modes (and, for a root daemon, to the build user).

    git restores content and the execute bit only: a `chmod 000 lib` or `chmod 555 .`
    by one attempt would reach the next one in the slot (a protected run too). So every
    directory is made 0755 and, when the daemon is root (it reads anything, so it never
    fails the reset), every file 0644 or 0755 and the build user's. Only what differs is
    changed: a chown or chmod changes a file's ctime, and git would then re-read it.

    The walk goes through directory descriptors opened with O_NOFOLLOW, and each file is
    changed through a descriptor of its own: a process that still holds a folder of the
    tree open (another attempt of the same run) may swap a folder for a link to the host
    at any moment, and a path-based chmod as root would follow it (/etc/shadow 0755).

    Any depth, with at most HELD_DIRS descriptors open: a pushed tree may be ~2,000 folders
    deep (git's paths stop at PATH_MAX), past Python's recursion limit and a service's 1,024
    descriptors. Deeper than HELD_DIRS, a folder's descriptor is let go on the way down and
    opened again through `..` of its child on the way up, kept only when it is the very folder
    (device and inode) that was left: a folder moved meanwhile ends the walk with an error (the
    action that waited for the tree fails; a racing process can fail only its own run so).
    What keeps that `..` inside the tree is the mount: the tree is exactly the folder bound into
    the sandbox, and nothing can be renamed across its edge (EXDEV). The identity check is a
    second line behind it, not a replacement (a folder removed and made anew may reuse its inode).
    """
    root = uid is not None and gid is not None
    walk: list[_Level] = []
    try:
        walk.append(_Level.of(os.open(tree, _DIR_FLAGS), uid, gid, root))
        while walk:
            level = walk[-1]
            if level.below:
                name = level.below.pop()
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=level.fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                        continue  # swapped or gone since it was listed: not the tree's any more
                    raise
                walk.append(_Level.of(child, uid, gid, root))
                if len(walk) > HELD_DIRS:  # the held ones are the last levels: let the one above them go
                    walk[-1 - HELD_DIRS].let_go()
                continue
            walk.pop()
            try:
                if walk and walk[-1].fd < 0:
                    walk[-1].back_from(level.fd)
            finally:
                os.close(level.fd)
    finally:
        for level in walk:
            if level.fd >= 0:
                os.close(level.fd)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
HELD_DIRS = 64  # folder descriptors `hand_over` holds at most (one per level; select() needs fds < 1024)


@dataclass
class _Level:
    """A folder on `hand_over`'s way down: its descriptor (-1 while let go), its identity, and
    the names of the folders below it still to walk."""

    fd: int
    ident: tuple[int, int]
    below: list[str]

    @classmethod
    def of(cls, fd: int, uid: int | None, gid: int | None, root: bool) -> _Level:
        """Settle the folder `fd` and its files (not its folders); closes `fd` if that fails."""
        try:
            st = os.fstat(fd)
            return cls(fd, (st.st_dev, st.st_ino), _settle_dir(fd, st, uid, gid, root))
        except BaseException:
            os.close(fd)
            raise

    def let_go(self) -> None:
        """Close its descriptor, unless let go already (a second way down past this level)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def back_from(self, child: int) -> None:
        """Open this folder again as `..` of `child`, if it is still the folder that was left."""
        fd = os.open("..", _DIR_FLAGS, dir_fd=child)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self.ident:
                raise OSError(errno.ESTALE, "a folder of the worktree was moved while it was handed over")
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd


def _settle_dir(fd: int, st: os.stat_result, uid: int | None, gid: int | None, root: bool) -> list[str]:
    """Settle the folder `fd` (stat `st`) and the files and links in it; the names of the folders in it."""
    if uid is not None and gid is not None and (st.st_uid, st.st_gid) != (uid, gid):
        os.fchown(fd, uid, gid)
    if stat.S_IMODE(st.st_mode) != 0o755:
        os.fchmod(fd, 0o755)
    with os.scandir(fd) as entries:
        names = [(e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False),
                  e.is_symlink()) for e in entries]
    below = []
    for name, is_dir, is_file, is_link in names:
        if is_dir:
            below.append(name)
        elif root and is_file:
            _settle_file(fd, name, uid, gid)
        elif root and is_link:
            try:  # fchownat(AT_SYMLINK_NOFOLLOW) under a held folder: the link itself
                if os.stat(name, dir_fd=fd, follow_symlinks=False).st_uid != uid:
                    os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)  # type: ignore[arg-type]
            except FileNotFoundError:
                continue
    below.reverse()  # popped from the end: walked in the order listed
    return below


def _settle_file(dir_fd: int, name: str, uid: int | None, gid: int | None) -> None:
    """A regular file's owner and plain mode, through an O_PATH descriptor (never a link)."""
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return  # swapped for a link (O_PATH opened the link itself) or something else
        via = f"/proc/self/fd/{fd}"  # the inode the descriptor holds, whatever its path is now
        if uid is not None and gid is not None and (st.st_uid, st.st_gid) != (uid, gid):
            os.chown(via, uid, gid)
        mode = 0o755 if st.st_mode & 0o100 else 0o644
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(via, mode)
    finally:
        os.close(fd)


def _chown(path: Path, uid: int | None, gid: int | None) -> None:
    if uid is not None and gid is not None:
        os.lchown(path, uid, gid)


KEYCTL = {"x86_64": 250, "aarch64": 219}  # the keyctl syscall's number
KEYCTL_JOIN_SESSION_KEYRING = 1


def join_new_session_keyring() -> None:
    """Leave the session keyring the daemon was started with (systemd gives services one):
    attempts inherit the daemon's, and must not find keys of the daemon's there."""
    number = KEYCTL.get(os.uname().machine)
    if number is None:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, KEYCTL_JOIN_SESSION_KEYRING, None) < 0:
        log.debug("could not join a new session keyring (errno %s)", ctypes.get_errno())


def build_user(name: str, where: str) -> tuple[int, int]:
    """(uid, gid) of the account actions run as when the daemon is root; never root itself."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(
            f'the sandbox user "{name}" ([sandbox] user) does not exist',
            file=where, hint="run `gitpipe init` as root to create it, or: useradd --system --user-group "
                             f"--no-create-home --shell /usr/sbin/nologin {name}") from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise ConfigError(f'the sandbox user "{name}" is root (uid or gid 0); actions never run as root',
                          file=where, hint="name an unprivileged account in [sandbox] user")
    return entry.pw_uid, entry.pw_gid


def ensure_build_user(name: str) -> bool:
    """Create the unprivileged account actions run as (root only); True when it was made now."""
    try:
        pwd.getpwnam(name)
        return False
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    proc = subprocess.run([useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                           "--shell", "/usr/sbin/nologin", name], capture_output=True, text=True, check=False)
    if proc.returncode != 0 and proc.returncode != 9:  # 9: made meanwhile by another init
        raise UsageError(f'could not create the sandbox user "{name}": {proc.stderr.strip()}',
                         hint="create it by hand (useradd --system --user-group NAME) and run init again")
    return proc.returncode == 0
