"""Parked launchers: an attempt's first process, started before the attempt is known and already
in a cgroup of its own, so that starting the attempt moves nothing into a cgroup.

Moving a process into a cgroup makes the kernel wait for an RCU grace period when no move
happened within the last one (cgroup_threadgroup_rwsem's rcu_sync): 5-20 ms on a 2-core VM,
measured, holding cgroup_mutex meanwhile, so that even making the attempt's group waited. A
push's first action paid it on the way from push to exec however early the wait was begun.

A parked launcher is a few lines of Perl (perl-base is Essential on Debian, as for the hook's
client): started by the daemon with the attempt's output pipe as its stdout and stderr, in a
session of its own, then moved into a fresh group with the attempt limits set, all while the
daemon has nothing better to do (after start, and in the background after each take). The
attempt that takes it writes its command line, environment and folder down the launcher's order
pipe and closes it; the launcher execs bwrap there, in the group it is already in. What it
reads is the daemon's alone (the pipe's other end never leaves the daemon), and it runs as the
daemon's user, as the bwrap it becomes does anyway.

A launcher is bound to its daemon from its first instruction (prctl PR_SET_PDEATHSIG, then a
look that its parent is still the daemon): a daemon killed with a launcher parked, or the moment
after writing an order, takes the launcher along (bwrap's own windows once it runs: the README's
"What remains"). A daemon that dies also closes the order pipe, and an order cut short is never
followed. The next daemon's sweep removes its group. The parent death signal names the *thread* that forked the process (see
prctl(2)): every launcher is forked by one thread that lives as long as the daemon, never by a
short one whose end would kill the attempt the launcher became. Without perl, or without a
cgroup per attempt, nothing is parked and bwrap starts held as before (sandbox.Launch).

The same launcher also waits *inside* a sandbox made ahead for a run's next action
(sandbox.Sandbox.ready): bwrap runs it as the build user once the mounts are made, unbound (no
death signal of its own, no parent check: bwrap's --die-with-parent binds the sandbox to the
daemon, and the daemon's death empties its order), and the order it reads is the script's.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from pathlib import Path

from gitpipe import cgroup
from gitpipe.system import SYSTEM_PATH, find

log = logging.getLogger("gitpipe")

# Arguments: the order pipe's fd, prctl's syscall number (0: none known), the daemon's pid (0: none,
# in a sandbox made ahead, which bwrap's --die-with-parent binds to the daemon; see sandbox.ready), and
# in a root daemon's sandbox whom to become (see `become`; else empty). Becomes that user, binds
# itself to the daemon, then reads the whole order (its length in bytes, then NUL-separated:
# whether to keep its stdin (1: a bwrap whose launcher inside reads its order there; else
# /dev/null), folder, argc, argv..., then name, value pairs), then becomes argv[0] with exactly
# that environment. An empty order (the daemon let it go, or died) ends it, and so does one shorter
# than its length says (a daemon killed mid-write: never a command or environment cut short).
# Exit 126/127: the order could not be followed (the folder, the exec; said on its output, which
# is the attempt's log: a held start's Popen raises the same error).
PERL = r"""
if ($ARGV[3]) {  # what setpriv --reuid --regid --clear-groups --inh-caps=-all --no-new-privs does
  my ($uid, $gid, @nr) = map { $_ + 0 } split /:/, $ARGV[3];
  my ($head, $caps) = (pack("LL", 0x20080522, 0), pack("L6", (0) x 6));  # (syscall writes may go to these)
  syscall($nr[0], 0, 0) == 0  # setgroups(0, NULL)
    and syscall($nr[1], $gid, $gid, $gid) == 0  # setresgid
    and syscall($nr[2], $uid, $uid, $uid) == 0  # setresuid: no uid 0 left, so no capability left
    and syscall($nr[3], $head, $caps) == 0  # capset: none inheritable
    and syscall($nr[4], 38, 1, 0, 0, 0) == 0  # prctl(PR_SET_NO_NEW_PRIVS)
    or do { print STDERR "gitpipe: could not become the build user: $!\n"; exit 126 };
  open(my $st, "<", "/proc/self/status") or exit 126;  # what the kernel says, whatever a call returned
  my $is = do { local $/; <$st> };
  close $st;
  my @lacks = grep { index($is, $_) < 0 } ("\nUid:\t$uid\t$uid\t$uid\t$uid\n", "\nGid:\t$gid\t$gid\t$gid\t$gid\n",
    "\nGroups:\t \n", (map { "\n$_:\t" . "0" x 16 . "\n" } qw(CapInh CapPrm CapEff CapAmb)), "\nNoNewPrivs:\t1\n");
  @lacks and do { print STDERR "gitpipe: not the build user after the drop: no", map({ s/\s+/ /gr } @lacks), "\n"; exit 126 };
}
if ($ARGV[1]) { syscall($ARGV[1] + 0, 1, 9) == 0 or exit 126; }  # prctl(PR_SET_PDEATHSIG, SIGKILL)
exit 0 if $ARGV[2] && getppid() != $ARGV[2];  # the daemon died before that (0: in a sandbox)
open(my $in, "<&=", $ARGV[0]) or exit 126;
binmode $in;
my $m = do { local $/; <$in> };
close $in;
exit 0 unless defined $m && $m =~ s/\A([0-9]+)\0//s && length($m) == $1;
my @f = split /\0/, $m, -1;
my ($keep, $dir, $argc) = splice(@f, 0, 3);
my @argv = splice(@f, 0, $argc);
unless ($keep) { open(STDIN, "<", "/dev/null") or exit 126; }
%ENV = ();
while (@f >= 2) { my $k = shift @f; $ENV{$k} = shift @f; }
chdir $dir or do { print STDERR "gitpipe: could not enter $dir: $!\n"; exit 126 };
my @kept;  # bwrap's seccomp program (see seccomp.py): in a pipe left open across the exec
for my $i (1 .. $#argv) {  # by the launcher that becomes bwrap (bound), never inside a sandbox; once
  last if !$ARGV[2] || @kept;
  next unless $argv[$i - 1] eq "--seccomp" && $argv[$i] =~ /\Agitpipe-seccomp:([0-9a-f]{2,8192})\z/;
  my $prog = pack("H*", $1);
  local $^F = 1 << 20;
  my ($r, $w);
  pipe($r, $w) and syswrite($w, $prog) == length($prog) and close($w) or exit 126;
  push @kept, $r;
  $argv[$i] = fileno($r);
}
exec { $argv[0] } @argv;
print STDERR "gitpipe: could not start $argv[0]: $!\n";  # E2BIG: a value over 128 KiB
exit 127;
"""
# What every process of an attempt carries in its environment: the attempt's token, by which a
# daemon finds what a killed one left (executor.kill_tokens; a sandbox made ahead: its home's)
TOKEN_VAR = "GITPIPE_ATTEMPT_TOKEN"
PRCTL = {"x86_64": 157, "aarch64": 167}  # the prctl syscall's number (elsewhere: no death signal)
# setgroups, setresgid, setresuid, capset and prctl's numbers (elsewhere: setpriv drops, see `become`)
BECOME = {"x86_64": (116, 119, 117, 126, 157), "aarch64": (159, 149, 147, 91, 167)}


@dataclass
class Parked:
    """One launcher waiting in its group: `proc`'s stdout is the attempt's output."""

    proc: subprocess.Popen[bytes]
    orders: int  # the write end of its order pipe
    group: cgroup.Group
    feed: int = -1  # the write end of its stdin, a parked launcher's (see hand_on); -1: none

    def exec(self, argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
        """Make it `argv` (in `cwd`, with exactly `env`, stdin on /dev/null); the Popen is the
        process it becomes."""
        try:
            self._order(argv, env, cwd, keep=False)
        finally:
            self._close_feed()
        return self.proc

    def hand_on(self, argv: list[str], env: dict[str, str], cwd: Path) -> Parked:
        """Make a parked launcher `argv` keeping its stdin: a bwrap whose own launcher, inside the
        sandbox, reads its order there (see sandbox.Sandbox.ready); that launcher (the same
        process, in the same group), whose orders go down this one's stdin."""
        feed, self.feed = self.feed, -1
        assert feed >= 0, "only a parked launcher has a stdin to hand on"
        try:
            self._order(argv, env, cwd, keep=True)
        except BaseException:
            os.close(feed)
            raise
        return Parked(self.proc, feed, self.group)

    def _order(self, argv: list[str], env: dict[str, str], cwd: Path, keep: bool) -> None:
        try:
            data = order(argv, env, cwd, keep)
        except ValueError:
            self._close()  # the launcher ends on its empty order
            raise
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.orders, view):]
        finally:
            self._close()

    def discard(self) -> None:
        """Let it go unused: its empty order ends it; its group goes with it."""
        try:
            self._close()
            self._close_feed()
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.group.remove()

    def _close(self) -> None:
        """Close the order pipe, once: an exec that failed closed it, and the discard after it must
        not close that number again (another thread may have opened a file under it meanwhile)."""
        fd, self.orders = self.orders, -1
        if fd >= 0:
            os.close(fd)

    def _close_feed(self) -> None:
        fd, self.feed = self.feed, -1
        if fd >= 0:
            os.close(fd)


class Launchers:
    """Keeps one launcher parked for the next attempt (see the module's docstring)."""

    def __init__(self, tree: cgroup.Tree, memory: int | None, pids: int | None) -> None:
        self.tree, self.memory, self.pids = tree, memory, pids
        self.perl = find_perl()
        self.names = count(1)
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.ready: Parked | None = None
        self.wanted = False
        self.parker: threading.Thread | None = None  # forks every launcher (see the module's docstring)
        self.closed = False

    def park(self) -> None:
        """Park one in the background, unless one is parked or being parked."""
        with self.lock:
            if self.perl is None or self.closed:
                return
            self.wanted = True
            if self.parker is None:
                self.parker = threading.Thread(target=self._parker, name="launcher-park", daemon=True)
                self.parker.start()
            self.changed.notify()

    def take(self, again: bool = True) -> Parked | None:
        """The parked launcher, if one is ready; else None. `again`: another is parked meanwhile
        (else the taker calls `park` once its own start no longer needs both cores)."""
        with self.lock:
            parked, self.ready = self.ready, None
        if parked is not None and parked.proc.poll() is not None:  # killed from outside
            parked.discard()
            parked = None
        if again:
            self.park()
        return parked

    @property
    def waiting(self) -> bool:
        """Whether a launcher is parked now (its group's move long done)."""
        return self.ready is not None

    def close(self) -> None:
        """The daemon stops (its attempts have ended): the parked launcher ends, having run nothing."""
        with self.lock:
            self.closed = True
            parked, self.ready = self.ready, None
            parker = self.parker
            self.changed.notify_all()
        if parked is not None:
            parked.discard()
        if parker is not None:
            parker.join(30)

    def _parker(self) -> None:
        """Park a launcher whenever one is wanted, until the daemon stops. This thread forks them
        all and never ends before: a launcher's death signal goes with the thread that forked it."""
        while True:
            with self.lock:
                while not self.closed and not (self.wanted and self.ready is None):
                    self.changed.wait()
                if self.closed:
                    return
                self.wanted = False
            try:
                parked = self._start()
            except Exception as exc:  # never ends the thread: the launchers it forked would die with it
                log.warning("sandbox: could not park a launcher (%s): attempts start bwrap held", exc)
                continue
            with self.lock:
                keep = not self.closed and self.ready is None
                if keep:
                    self.ready = parked
            if not keep:
                parked.discard()

    def _start(self) -> Parked:
        perl = self.perl
        assert perl is not None
        group = self.tree.make(f"parked-{os.getpid()}-{next(self.names)}", self.memory, self.pids)
        feed_r, feed_w = os.pipe()  # its stdin: the order of a launcher inside, if it becomes a sandbox
        try:
            parked = started(group, lambda fd: subprocess.Popen(
                command(perl, fd, bound=True), stdin=feed_r, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True, pass_fds=(fd,), cwd="/",
                env={"PATH": SYSTEM_PATH}))
        except BaseException:
            os.close(feed_w)
            raise
        finally:
            os.close(feed_r)
        parked.feed = feed_w
        try:
            group.admit(parked.proc.pid)  # the move, and the kernel's wait: here, before any attempt needs it
        except BaseException:
            parked.discard()
            raise
        return parked


def order(argv: list[str], env: dict[str, str], cwd: Path, keep: bool) -> bytes:
    """What a launcher reads on its order pipe to become `argv` in `cwd` with exactly `env` (see
    PERL; `keep`: its stdin as it is, else /dev/null). ValueError for what execve cannot take (as
    subprocess refuses it too)."""
    fields = ["1" if keep else "0", str(cwd), str(len(argv)), *argv]
    for key, value in env.items():
        fields += [key, value]
    if any("\0" in f for f in fields) or any(not key or "=" in key for key in env):
        raise ValueError("an argument or environment variable that execve cannot take")
    body = b"\0".join(os.fsencode(f) for f in fields)
    return b"%d\0" % len(body) + body  # the launcher runs it only whole (see PERL)


@functools.cache
def find_perl() -> str | None:
    """The system's perl (never a pipeline's PATH), looked up once per daemon; None without one."""
    return find("perl")


def command(perl: str, fd: int, bound: bool, user: tuple[int, int] | None = None) -> list[str]:
    """A launcher's command line, its order pipe's read end `fd`; `bound`: to this daemon (its death
    signal and parent check), else in a sandbox that bwrap binds to the daemon (Sandbox.ready);
    `user`: the (uid, gid) it becomes first, in a root daemon's sandbox (see `become`)."""
    if bound:
        return [perl, "-e", PERL, str(fd), str(PRCTL.get(os.uname().machine, 0)), str(os.getpid()), ""]
    drop = "" if user is None else ":".join(str(n) for n in (*user, *BECOME[os.uname().machine]))
    return [perl, "-e", PERL, str(fd), "0", "0", drop]


@functools.cache
def become() -> bool:
    """Whether a launcher inside a root daemon's sandbox can drop to the build user itself, as
    setpriv would (this machine's syscall numbers are known): one program less to start per
    sandbox made ahead (~1 ms of CPU, measured with perf stat), before anything of the user's runs.
    The script then finds exactly what setpriv leaves: uid and gid the build user's (real,
    effective, saved), no supplementary group, no capability (inheritable and ambient too), and
    no_new_privs, as /proc/self/status says after the calls; anything short of that and the
    launcher ends (126) without reading its order. The numbers are those of perl's own
    architecture (its ELF header): a 64-bit kernel may run a 32-bit perl, whose table differs."""
    perl = find_perl()
    try:
        with open(perl or "", "rb") as f:
            head = f.read(20)
    except OSError:
        return False
    machine = {0x3E: "x86_64", 0xB7: "aarch64"}.get(int.from_bytes(head[18:20], "little"))
    # an ELF file, 64-bit, little-endian, of an architecture whose numbers are known (and this one)
    return head[:6] == b"\x7fELF\x02\x01" and machine == os.uname().machine and machine in BECOME


def started(group: cgroup.Group, start: Callable[[int], subprocess.Popen[bytes]]) -> Parked:
    """The launcher that `start(fd)` starts with its order pipe's read end `fd` (and its output as
    its Popen's stdout), waiting in `group`. Should `start` fail, nothing is left: the pipe closed,
    the group removed."""
    try:
        read, write = os.pipe()
        try:
            proc = start(read)
        except BaseException:
            os.close(write)
            raise
        finally:
            os.close(read)
    except BaseException:
        group.remove()
        raise
    return Parked(proc, write, group)
