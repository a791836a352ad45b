"""Git access: reading commits through pygit2, and the pool of reusable worktrees.

pygit2 is used for every read (files at a commit, commit metadata, refs). Worktrees
are materialised with the `git` command instead: measured on a 20,000-file repo,
libgit2's forced checkout with REMOVE_UNTRACKED|REMOVE_IGNORED takes 100-150 ms and
leaves nested repositories behind, where `git checkout --force` + `git clean -ffdx`
takes ~25 ms and removes them. (The hooks also use `git`, for import-time reasons.)

Isolation: a worktree slot is its own small repository whose objects come from the
bare repo through `objects/info/alternates` (read-only sharing). Nothing in it
points back at the bare repo's refs, config or hooks, so an action cannot change
the bare repository through its worktree. The daemon's own git works on the tree
from a git directory beside it (`Slot.git_dir`, this user's alone, never mounted in a
sandbox): the config, hooks and index that the daemon's git reads are never ones an
action could have written, even one racing the reset from another sandbox. The
tree's `.git` is the action's copy, written anew after each reset.
An action never sees the bare repo itself: its sandbox shows it only the objects,
read-only (see `sandbox`).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import shlex
import shutil
import stat
import subprocess
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gitpipe.errors import UsageError
from gitpipe.fdtree import DIR_FLAGS, open_under, rewrite
from gitpipe.objects import in_push
from gitpipe.refs import short_ref
from gitpipe.switch import index_walk, same_content, switch
from gitpipe.system import SYSTEM_PATH, find, tool

TYPE_CHECKING = False
if TYPE_CHECKING:
    from concurrent.futures import Future

    import pygit2
# pygit2 (~20 MB resident, ~35 ms to import) is imported by the functions that use it: an idle
# daemon, and a run whose worktree is already there, never load it.

log = logging.getLogger("gitpipe")
# No reflog: a checkout would make logs/ each time, for the next reset to remove.
SLOT_CONFIG = ("[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n"
               "\tlogAllRefUpdates = false\n")
# A tree's .git as _action_git_dir leaves it: folder -> its entries.
GIT_DIR_LAYOUT = {"": {"HEAD", "config", "index", "objects", "refs"}, "objects": {"info", "pack"},
                  "objects/info": {"alternates"}, "objects/pack": set(), "refs": {"heads", "tags"},
                  "refs/heads": set(), "refs/tags": set()}
GIT_ENV_KEEP = ("PATH", "HOME", "LANG", "TZ")
# Up to this many tracked files a slot is cleaned in this process (~0.5 ms for 100 files) rather
# than by `git clean` (a process: 3-5 ms however small the tree; ~25 ms for 20,000 files).
CLEAN_IN_PROCESS = 2000
GITLINK = 0o160000  # an index entry's mode for a submodule


def open_bare(path: str | Path) -> pygit2.Repository:
    """Open a bare repository, or say clearly why the path is not one."""
    import pygit2

    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p} does not exist", hint="create it with `gitpipe repo add PATH --create`")
    try:
        repo = pygit2.Repository(str(p))
    except pygit2.GitError:
        raise UsageError(f"{p} is not a git repository",
                         hint="pass a bare repository, or add --create to make one") from None
    if not repo.is_bare:
        raise UsageError(f"{p} is not a bare repository (it has a working tree)",
                         hint="push to a bare clone: git clone --bare SRC DEST.git") from None
    return repo


def open_repo(path: str | Path) -> pygit2.Repository:
    """Open a registered repository (bare, or a working copy's .git for `gitpipe exec`)."""
    import pygit2

    try:
        return pygit2.Repository(str(path))
    except pygit2.GitError:
        raise UsageError(f"{path} is not a git repository any more",
                         hint="unregister it with `gitpipe repo remove`") from None


def snapshot(workdir: Path) -> tuple[Path, str, str]:
    """The working copy as a commit (uncommitted and untracked, not ignored, files included).

    Returns (git dir, ref, sha). A temporary index is used, so the user's own index and
    branches are untouched; the commit is a dangling object that `git gc` collects.
    """
    import pygit2

    found = pygit2.discover_repository(str(workdir))
    if found is None:
        raise UsageError(f"{workdir} is not inside a git working copy", hint="run gitpipe exec in your clone")
    repo = pygit2.Repository(found)
    if repo.is_bare or repo.workdir is None:
        raise UsageError(f"{found} is a bare repository", hint="run gitpipe exec in a working copy")
    top = Path(repo.workdir)
    env = {**os.environ, "GIT_INDEX_FILE": str(Path(repo.path) / f"gitpipe-exec-{os.getpid()}.index")}
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=top, env=env, check=True, capture_output=True,  # noqa: E731
                                        text=True).stdout.strip()
        run("add", "-A")
        tree = run("write-tree")
        parents = [] if repo.head_is_unborn else ["-p", str(repo.head.target)]
        sha = run("commit-tree", tree, *parents, "-m", "gitpipe exec: working copy")
    finally:
        Path(env["GIT_INDEX_FILE"]).unlink(missing_ok=True)
    ref = "refs/heads/" + (repo.head.shorthand if not repo.head_is_unborn and not repo.head_is_detached
                           else "exec")
    return Path(repo.path), ref, sha


def create_bare(path: str | Path) -> pygit2.Repository:
    """Create a bare repository whose HEAD names `main`."""
    import pygit2

    p = Path(path)
    if p.exists() and any(p.iterdir()):
        raise UsageError(f"{p} already exists and is not empty", hint="drop --create to register it")
    return pygit2.init_repository(str(p), bare=True, initial_head="main")


def default_branch(repo: pygit2.Repository) -> str:
    """The branch HEAD names (also when it has no commit yet)."""
    target = repo.references["HEAD"].target
    name = target if isinstance(target, str) else "refs/heads/main"
    return short_ref(name)


def default_branch_of(git_dir: str | Path) -> str:
    """The branch HEAD names, from the repository's files; pygit2 only when they cannot tell."""
    head = branch_head(git_dir)
    return short_ref(head[0]) if head else default_branch(open_repo(str(git_dir)))


def branch_head(git_dir: str | Path) -> tuple[str, str | None] | None:
    """(HEAD's branch as a full ref, its commit or None when it has none yet), read from the
    repository's files without pygit2; None when they say something this does not read (a
    detached HEAD, reftable): ask `resolve` then. What the daemon checks on every wake."""
    try:
        head = Path(git_dir, "HEAD").read_text()
    except (OSError, UnicodeDecodeError):
        return None
    if not head.startswith("ref: refs/heads/"):
        return None
    ref = head[len("ref: "):].strip()
    try:
        return ref, ref_head(git_dir, ref)
    except (OSError, UnicodeDecodeError):
        return None


def ref_head(git_dir: str | Path, ref: str) -> str | None:
    """The commit a full ref names, read from the loose ref file or packed-refs without pygit2;
    None when neither has it. OSError when the files cannot be read (ask `resolve` then)."""
    try:
        return Path(git_dir, ref).read_text().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        pass
    try:
        packed = Path(git_dir, "packed-refs").read_text()
    except FileNotFoundError:
        return None
    for line in packed.splitlines():
        sha, _, name = line.partition(" ")
        if name == ref:
            return sha
    return None


def show(git_dir: str | Path, sha: str, path: str) -> str | None:
    """A file's text at a commit, through `git cat-file` (the daemon's way: no pygit2 loaded)."""
    out = _cat_file(git_dir, "blob", f"{sha}:{path}")
    return None if out is None else out.decode("utf-8", errors="replace")


def commit_of(git_dir: str | Path, sha: str) -> tuple[str, str] | None:
    """(author "Name <email>", message) of a commit through `git cat-file`; None when it is not there."""
    raw = _cat_file(git_dir, "commit", sha)
    if raw is None:
        return None
    head, _, message = raw.decode("utf-8", errors="replace").partition("\n\n")
    author = ""
    for line in head.splitlines():
        if line.startswith("author "):
            author = line[len("author "):].rsplit(" ", 2)[0]  # drop the time and the zone
            break
    return author, message


def _cat_file(git_dir: str | Path, kind: str, name: str) -> bytes | None:
    """An object's body as `git cat-file KIND NAME` prints it (NAME: a sha, or "sha:path").

    A push leaves its few objects loose, and the daemon reads them on every run's start: read
    from the loose files when they are all there (no process: ~0.1 ms against ~5-8 ms),
    else through git, which also knows packs, alternates and odd names."""
    try:
        found = _loose_path(Path(git_dir), name)
    except (OSError, ValueError, zlib.error):
        found = None
    if found is not None and found[0] == "missing":
        return None
    if found is not None and found[0] == kind:
        return found[1]
    env = {k: os.environ[k] for k in GIT_ENV_KEEP if k in os.environ}
    proc = subprocess.run(["git", f"--git-dir={git_dir}", "cat-file", kind, name], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, check=False)
    return proc.stdout if proc.returncode == 0 else None


def show_in_push(git_dir: str | Path, incoming: Path, sha: str, path: str) -> str | None:
    """`show` for a push still in quarantine (`incoming`: see objects.in_push), from loose objects
    only (None when one is packed: a large push, or not there)."""
    try:
        found = _loose_path(Path(git_dir), f"{sha}:{path}", incoming)
    except (OSError, ValueError, zlib.error):
        return None
    if found is None or found[0] != "blob":
        return None
    return found[1].decode("utf-8", errors="replace")


def _loose_path(git_dir: Path, name: str, incoming: Path | None = None) -> tuple[str, bytes] | None:
    """`sha` or `sha:path` through loose objects only (a commit, its trees, the blob)."""
    sha, colon, path = name.partition(":")
    found = in_push(git_dir, incoming, sha)
    if found is None or not colon:
        return found
    kind, body = found
    if kind != "commit" or not body.startswith(b"tree "):
        return None
    tree = body[5:body.index(b"\n")].decode("ascii")
    for part in path.split("/"):
        node = in_push(git_dir, incoming, tree)
        if node is None or node[0] != "tree":
            return None
        entry = _tree_entry(node[1], part.encode(), len(tree) // 2)
        if entry is None:
            return ("missing", b"")  # not in the commit: what `git cat-file` answers with an error
        tree = entry
    return in_push(git_dir, incoming, tree)


def _tree_entry(body: bytes, name: bytes, width: int) -> str | None:
    """The object id of entry `name` of a tree object's body ("mode name\\0id" entries)."""
    at = 0
    while at < len(body):
        space = body.index(b" ", at)
        nul = body.index(b"\0", space)
        if body[space + 1:nul] == name:
            return body[nul + 1:nul + 1 + width].hex()
        at = nul + 1 + width
    return None


def resolve(repo: pygit2.Repository, ref: str) -> tuple[str, str]:
    """A ref or short name -> (full ref, commit sha); UsageError when unknown."""
    import pygit2

    for full in (ref, f"refs/heads/{ref}", f"refs/tags/{ref}"):
        if full.startswith("refs/") and full in repo.references:
            commit = repo.references[full].peel(pygit2.Commit)
            return full, str(commit.id)
    raise UsageError(f'no branch or tag "{ref}" in {repo.path}', hint="push it first, or pass --ref")


def read_file(repo: pygit2.Repository, sha: str, path: str) -> str | None:
    """A file's text at a commit, or None."""
    import pygit2

    try:
        commit = repo.get(sha)
        if commit is None:
            return None
        entry = commit.peel(pygit2.Commit).tree[path]
        blob = repo.get(entry.id)
    except (KeyError, ValueError, pygit2.GitError):
        return None
    return blob.data.decode("utf-8", errors="replace") if isinstance(blob, pygit2.Blob) else None


def commit_info(repo: pygit2.Repository, sha: str) -> tuple[str | None, str | None]:
    """(author "Name <email>", message) of a commit, or Nones when it is missing."""
    import pygit2

    try:
        commit = repo.get(sha)
    except (ValueError, pygit2.GitError):
        return None, None
    if not isinstance(commit, pygit2.Commit):
        return None, None
    return f"{commit.author.name} <{commit.author.email}>", commit.message


def has_commit(repo: pygit2.Repository, sha: str) -> bool:
    import pygit2

    try:
        return isinstance(repo.get(sha), pygit2.Commit)
    except (ValueError, pygit2.GitError):
        return False


@dataclass
class Slot:
    """One reusable worktree; `tree` is where the action runs."""

    root: Path
    lock_fd: int
    # What `prepare_next`'s `then` or `during` made for this slot (a sandbox made ahead): the
    # checkout's holder takes it (sets None), or it is discarded with the slot.
    ahead: Discardable | None = None
    settled: bool = False  # handed over by the pool's `settle` after its last reset
    cleared: bool = False  # what was beside its tree is gone since it was taken (see `heads_up`)

    @property
    def tree(self) -> Path:
        return self.root / "tree"

    @property
    def git_dir(self) -> Path:
        """The daemon's git directory for `tree` (its index: what the tree tracks), beside it."""
        return self.root / "git"

    @property
    def index(self) -> Path:
        return self.git_dir / "index"

    @property
    def home(self) -> Path:
        """The attempt's HOME, beside the tree: made empty before each attempt (sandbox.fresh_dir)."""
        return self.root / ATTEMPT_HOME

    @property
    def output(self) -> Path:
        """The attempt's $GITPIPE_OUTPUT file: made empty before each attempt, emptied after it."""
        return self.root / ATTEMPT_OUTPUT


class WorktreePool:
    """Reusable worktrees of one repo under `work/<repo>/<n>/`, each held by one action at a time;
    protected runs have slots of their own, `work/<repo>/protected/<n>/`.

    Why apart: git leaves a file whose content did not change in place, so the next run in a
    slot gets the inodes the last one had; an attempt of a feature branch can hand its open
    files to another of its attempts that keeps running (over an abstract unix socket: the
    network namespace is the host's by default), which then writes them under that next run
    after its reset looked at them. Slots a feature branch never had cannot be reached so.

    The daemon's git reads only `Slot.git_dir`: an index no action can reach (a tampered one,
    say with a skip-worktree entry, could hide a modified file from the reset) and a config no
    action can reach (one with `core.fsmonitor` or `core.worktree` would run a command, or
    write files, as the daemon's user).
    """

    # slot root -> (commit, stat data of its tracked files when the slot was handed out)
    # (racy: the kernel time the slot was handed out at, when that was within the tick its files
    # were written in: those files are checked by their content as well, see _intact)
    _sealed: dict[str, tuple[str, dict[str, tuple[int, ...]], int | None]] = {}
    _sealed_lock = threading.Lock()
    # slot root -> the objects folder its alternates name, written by this process (see _prepare_git_dir)
    _written: dict[str, Path] = {}
    # slot root -> the mark of the pool (run) that reset it last: its HOME and output file are
    # that run's, kept from one of its attempts to the next (see _clear_beside); a slot taken by
    # another run meanwhile is that one's
    _reset_by: dict[str, object] = {}

    def __init__(self, work_dir: Path, repo_name: str, repo_path: str | Path,
                 settle: Callable[[Path], None] | None = None, protected: bool = False,
                 ahead: int = 0) -> None:
        """`settle`: what the sandbox does to a fresh tree (owner, modes) before anything reads it;
        `protected`: the slots of protected runs, never used by another run; `ahead`: how many
        checkouts may still follow the first (a run's actions), each prepared while the one
        before runs (see `prepare_next`). Call `close` when done."""
        self.dir = work_dir / repo_name / "protected" if protected else work_dir / repo_name
        self.objects = Path(repo_path).absolute() / "objects"
        self.settle = settle
        self.ahead = ahead
        self._next: _Ahead | None = None
        self._next_lock = threading.Lock()
        self._early: Slot | None = None  # taken at a push's heads-up, for `prepare_next` (see heads_up)
        self._run = object()  # this pool's (one run's) mark in _reset_by
        self.first = True  # no checkout was handed out yet: the run's first action (see _seal)

    @contextmanager
    def checkout(self, sha: str) -> Iterator[Slot]:
        """A worktree at exactly `sha`, held until the block ends."""
        slot = self._prepared(sha)
        self.first = False
        if slot is None:
            slot = self._take()
            try:
                self._ready(slot, sha)
            except BaseException:
                os.close(slot.lock_fd)
                raise
        try:
            yield slot
        finally:
            _let_go(slot)

    def _ready(self, slot: Slot, sha: str, wanted: threading.Event | None = None,
               during: Callable[[Slot], Discardable | None] | None = None) -> bool:
        """Reset `slot` to `sha` and seal it; `wanted`: set once an action waits for this slot.
        True when the seal gave way to that action (see `_seal`): the slot goes to it at once.
        `during`: see `prepare_next`."""
        slot.settled = False
        self._reset(slot, sha, during)
        if _tracked_count(slot.index) <= CLEAN_IN_PROCESS:
            # Settled here (the sandbox walks it again at launch, for the inputs restored
            # into it: twice only for a small tree) so that what is remembered is final.
            if self.settle is not None:
                self.settle(slot.tree)
                slot.settled = True
            return self._seal(slot, sha, wanted)
        return False

    def prepare_next(self, sha: str, then: Callable[[Slot], Discardable | None] | None = None,
                     during: Callable[[Slot], Discardable | None] | None = None) -> None:
        """While an action runs, reset another slot to `sha` in the background for the next
        checkout (the next action of the run), so that its reset is off the critical path: the
        run's actions alternate between two slots. `then`: run on the slot once it is reset, in
        the same background job; `during`: the same, but as soon as what was beside its tree is
        removed, while git resets the tree (a slot with a tree already). What either returns is
        the slot's `ahead`. Does nothing once `ahead` is spent; never raises (the next checkout
        then takes a slot itself)."""
        with self._next_lock:
            if self.ahead <= 0 or self._next is not None:
                return
            self.ahead -= 1
            try:
                self._next = _Ahead(self, sha, then, during)
            except OSError as exc:
                log.warning("could not prepare the next worktree ahead (%s): the next action resets one itself", exc)
                return
            self._next.start()

    def heads_up(self, during: Callable[[Slot], Discardable | None]) -> bool:
        """A push is on its way (see headsup.py): take the slot the first `prepare_next` will
        reset, clear what is beside its tree now, and let `during` make its `ahead` (the first
        action's sandbox) a few milliseconds before that reset begins. False when nothing was
        made: the slot is let go again."""
        with self._next_lock:
            if not self._room_early():
                return False
        slot = self._take()
        try:
            _clear_beside(slot, own=False)  # a new run's
            slot.cleared = True
            if slot.tree.is_dir():
                slot.ahead = _made(during, slot)
        except BaseException:
            _let_go(slot)
            raise
        if slot.ahead is None:
            _let_go(slot)
            return False
        with self._next_lock:
            keep = self._room_early()  # looked at again: prepare_next may have come meanwhile
            if keep:
                self._early = slot
        if not keep:
            _let_go(slot)
        return keep

    def made_ahead(self) -> bool:
        """Whether the next checkout's slot has a sandbox made for it ahead (see `prepare_next`):
        a hint (the action checks that it is its own)."""
        with self._next_lock:
            return self._next is not None and self._next.taken.ahead is not None

    def _room_early(self) -> bool:
        """Whether the first `prepare_next` is still to come and no heads-up took its slot
        (the caller holds `_next_lock`)."""
        return self._early is None and self._next is None and self.ahead > 0

    def _taken_early(self) -> Slot:
        """The slot `heads_up` took, else a free one."""
        slot, self._early = self._early, None
        return slot if slot is not None else self._take()

    def ahead_more(self, count: int) -> None:
        """`count` more checkouts may be prepared ahead (known once the run is planned)."""
        with self._next_lock:
            self.ahead += max(0, count)

    def _prepared(self, sha: str) -> Slot | None:
        """The slot `prepare_next` made ready, checked again: held by this pool since its reset, yet
        what was in it when it was reset is checked once more (its tracked files by their seal,
        anything untracked removed); a slot whose tracked files changed is reset again."""
        with self._next_lock:
            ahead, self._next = self._next, None
        if ahead is None:
            return None
        if self.first:  # the run's first action waits for it now: no tick is waited for its seal
            ahead.wanted.set()
        ahead.wait()
        slot = ahead.slot
        if slot is None:  # it failed (a full disk...): the checkout takes a slot as before
            return None
        try:
            # A slot sealed while this checkout waited for it was reset for this very wait: handed
            # over as it is, trusted as a large tree is from its reset on (see _seal).
            if ahead.sha != sha or not (ahead.handed or self._still(slot, sha)):
                _discard(slot)  # made for what the reset below removes (what is beside the tree)
                self._ready(slot, sha)
        except BaseException:
            _let_go(slot)
            raise
        return slot

    def _still(self, slot: Slot, sha: str) -> bool:
        """Whether a prepared slot holds exactly `sha` still (a large tree has no seal: trusted,
        as it is between any reset and its use); what is untracked is cleaned."""
        with self._sealed_lock:
            sealed = self._sealed.get(str(slot.root))
        if sealed is None:
            return _tracked_count(slot.index) > CLEAN_IN_PROCESS
        if sealed[0] != sha or tree_stat(slot.tree, slot.index) != sealed[1]:
            return False
        return clean_untracked(slot.tree, slot.index)

    def close(self) -> None:
        """Let go of a slot prepared for a checkout that did not come."""
        with self._next_lock:
            ahead, self._next = self._next, None
            early, self._early = self._early, None
            self.ahead = 0
        if early is not None:
            _let_go(early)
        if ahead is not None:
            ahead.wait()
            if ahead.slot is not None:
                _let_go(ahead.slot)

    def _take(self) -> Slot:
        self.dir.mkdir(parents=True, exist_ok=True)
        n = 0
        while True:
            fd = os.open(self.dir / f"{n}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                n += 1
                continue
            return Slot(self.dir / str(n), fd)

    def _reset(self, slot: Slot, sha: str, during: Callable[[Slot], Discardable | None] | None = None) -> None:
        if not slot.cleared:
            _clear_beside(slot, own=WorktreePool._reset_by.get(str(slot.root)) is self._run)
        elif during is None:  # what `heads_up` made is for a first action this reset is not for
            _discard(slot)
        slot.cleared = False  # else what `heads_up` made beside the tree (the sandbox's HOME) stays
        WorktreePool._reset_by[str(slot.root)] = self._run  # from now on, what is beside its tree is this run's
        if during is not None and slot.tree.is_dir():  # its sandbox's setup (the longer) beside git's work
            slot.ahead = _made(during, slot)
        try:
            self._prepare_git_dir(slot)
            held = self._intact(slot)
            if held != sha:  # else the files are those of sha: no git process
                # First what the last commit does not track: a tracked folder an action replaced by
                # a link is removed with it, which `git checkout` alone leaves missing; and the
                # checkout reads a `.gitattributes` the commit lacks from the tree (eol, encoding).
                self._clean(slot, before_checkout=True)
                # The files of the commit it held exactly: only what changed is written, in this
                # process (a push's few files), else by git.
                if held is not None and switch(slot.tree, slot.index, self.objects.parent, held, sha):
                    (slot.git_dir / "HEAD").write_text(sha + "\n")
                else:
                    self._git(slot, "checkout", "--quiet", "--force", "--detach", sha)
            self._clean(slot)
            _action_git_dir(slot, self.objects, sha)
        except (OSError, subprocess.CalledProcessError, RecursionError) as exc:
            # A tree the action made unremovable (chmod 000 dirs, ...): start the slot afresh. What
            # `during` made binds the tree, HOME and output file removed here: let go (the new
            # tree may get the old one's inode, which is what the taker checks).
            why: object = exc
            if isinstance(exc, subprocess.CalledProcessError) and exc.stderr:
                why = exc.stderr.decode(errors="replace").strip()
            log.info("worktree %s: could not reset it in place (%s): checked out afresh", slot.root, why)
            _discard(slot)
            remove_tree(slot.root)
            self._prepare_git_dir(slot)
            self._git(slot, "checkout", "--quiet", "--force", "--detach", sha)
            _action_git_dir(slot, self.objects, sha)

    def _clean(self, slot: Slot, before_checkout: bool = False) -> None:
        """Remove what the daemon's index does not track from the tree (but its .git); with no index
        yet (a new slot, one of an earlier layout), everything. `before_checkout`: what `git clean`
        leaves (a .git in a tracked folder, a submodule's files) steers no checkout: removed after."""
        if not slot.index.is_file():
            with os.scandir(slot.tree) as entries:
                for entry in list(entries):
                    if entry.name != ".git":
                        remove_tree(Path(entry.path))
        elif not clean_untracked(slot.tree, slot.index):  # a large tree: git walks it faster than Python
            self._git(slot, "clean", "-qffdx")
            if before_checkout:
                return
            found = index_paths(slot.index, 1 << 31)
            tracked = _ls_files_modes(slot.tree, slot.git_dir) if found is None else found
            empty_gitlinks(slot.tree, slot.git_dir, tracked)
            remove_nested_git(slot.tree, tracked)

    def _seal(self, slot: Slot, sha: str, wanted: threading.Event | None = None) -> bool:
        """Remember the stat data of the tracked files as the slot is handed out: exactly `sha`'s.

        A change by the action changes a file's ctime, which no unprivileged process can set
        back; one made in the same clock tick as this look could keep it, so files changed at or
        after the kernel's time now (read from a file's ctime, `_kernel_now`) are not remembered.
        Where the kernel gives fine times to a file whose times were looked at (multigrain
        timestamps, Linux 6.13), the stamp's is finer than the tick, and any change after it
        gets a later time: only what changes during this look is racy then.

        `wanted`: set when a run's first action already waits for the slot (a push's first
        action, its slot reset at intake time). The tick is then not waited for: the slot is
        sealed racy (its files written in this tick are checked by their content too when it
        is next reset, as git checks a racily clean file), rather than a tick on the path from
        push to exec. Later actions keep waiting the tick: each slot is then sealed once, and
        never runs git again for the same commit. The slot is handed over as it is,
        like one reset by the checkout itself: True; so is one sealed whole while that action
        waited: trusted from its reset to its hand-over, as a large tree is (the daemon runs
        nothing in it meanwhile; the sandbox made in it waits for its order)."""
        now = _kernel_now(slot.root)
        found = tree_stat(slot.tree, slot.index, racy_ns=now)
        whole = tree_stat(slot.tree, slot.index) if found is None else None  # racy files included
        racy: int | None = None
        gave_way = False
        if whole is not None:
            # Only racy: the reset and settle wrote in this clock tick. One tick later every
            # file is older than "now", and the next action in the slot may skip the checkout.
            if wanted is None:
                time.sleep(CLOCK_TICK)
                found = tree_stat(slot.tree, slot.index, racy_ns=_kernel_now(slot.root))
            elif not wanted.wait(CLOCK_TICK):  # no action asked for the slot within the tick
                found = tree_stat(slot.tree, slot.index, racy_ns=_kernel_now(slot.root))
            else:
                gave_way = True
                found, racy = whole, now
        with self._sealed_lock:
            if found is None:
                self._sealed.pop(str(slot.root), None)
            else:
                self._sealed[str(slot.root)] = (sha, found, racy)
        return gave_way or (found is not None and wanted is not None and wanted.is_set())

    def _intact(self, slot: Slot) -> str | None:
        """The commit whose files the slot still holds exactly, as handed out last time (no
        tracked file changed, by its stat data), its index as it was then; None when not known.
        What is untracked is cleaned after."""
        with self._sealed_lock:
            sealed = self._sealed.pop(str(slot.root), None)
        if sealed is None or not slot.index.is_file():
            return None
        sha, found, racy = sealed
        if tree_stat(slot.tree, slot.index) != found:
            return None
        # Files written in the tick the slot was handed out in: a change in that same tick keeps
        # their stat data (but the inode, mode and owner), not their content.
        written = [path for path, st in found.items() if racy is not None and max(st[6], st[7]) >= racy]
        return sha if not written or same_content(slot.tree, slot.index, written) else None

    def _prepare_git_dir(self, slot: Slot) -> None:
        """The daemon's git directory for the slot: made once (this user's alone, outside every
        sandbox: nothing but the daemon writes it), its config and alternates written each time
        (the repo may have moved). A checkout writes its HEAD and index."""
        git_dir = slot.git_dir
        slot.tree.mkdir(parents=True, exist_ok=True)
        if not (git_dir / "HEAD").is_file():
            remove_tree(git_dir)
            for sub in ("objects/info", "objects/pack", "refs/heads", "refs/tags"):
                (git_dir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            git_dir.chmod(0o700)
            (git_dir / "HEAD").write_text("ref: refs/heads/main\n")  # unborn until the first checkout
        elif WorktreePool._written.get(str(slot.root)) == self.objects:
            return  # written by this process since it started: nothing else writes there
        (git_dir / "objects" / "info" / "alternates").write_text(f"{self.objects}\n")
        (git_dir / "config").write_text(SLOT_CONFIG)
        WorktreePool._written[str(slot.root)] = self.objects

    def _git(self, slot: Slot, *args: str) -> None:
        subprocess.run(
            # safe.directory: when the daemon is root, the tree belongs to the sandbox's build user
            [*_no_links_in(slot.tree), "git", "-c", "core.hooksPath=/dev/null", "-c", "advice.detachedHead=false",
             "-c", "safe.directory=*", *args],
            cwd=slot.tree, env=_git_env(slot.git_dir, slot.tree), check=True, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    def remove(self) -> None:
        """Delete every slot of this repo (all must be free)."""
        remove_tree(self.dir)


class _Ahead:
    """A slot being reset in the background for the next checkout (see `WorktreePool.prepare_next`)."""

    def __init__(self, pool: WorktreePool, sha: str, then: Callable[[Slot], Discardable | None] | None = None,
                 during: Callable[[Slot], Discardable | None] | None = None) -> None:
        self.pool, self.sha, self.then, self.during = pool, sha, then, during
        self.taken = pool._taken_early()  # here, while the caller holds its own: another slot
        self.slot: Slot | None = None
        self.wanted = threading.Event()  # an action waits for this slot (see WorktreePool._seal)
        self.handed = False  # reset while that action waited: no seal to check it against
        self.job: Future[None] | None = None

    def start(self) -> None:
        from gitpipe import background  # the daemon's: not loaded by the Python hook

        self.job = background.submit(self._run)

    def wait(self) -> None:
        """Until the reset is over (its failure is kept in `slot` being None)."""
        if self.job is not None:
            self.job.exception()  # waits; _run handles its own errors

    def _run(self) -> None:
        try:
            self.handed = self.pool._ready(self.taken, self.sha, self.wanted, self.during)
        except Exception as exc:  # the checkout that wanted it takes and resets a slot itself
            log.warning("could not prepare the next worktree ahead (%s): the next action resets one itself", exc)
            _let_go(self.taken)
            return
        if self.then is not None and self.taken.ahead is None:
            self.taken.ahead = _made(self.then, self.taken)
        if self.taken.ahead is not None and not self.taken.settled and self.pool.settle is not None:
            # A large tree (see _ready), its sandbox made ahead: handed over here, off the path
            # of the launch, which settles only what no reset did (a plain action restores nothing)
            try:
                self.pool.settle(self.taken.tree)
                self.taken.settled = True
            except Exception as exc:  # (a tree deeper than the stack: RecursionError) its launch tries
                log.warning("could not hand the next worktree over ahead (%r): its action does it", exc)
        self.slot = self.taken


def _clear_beside(slot: Slot, own: bool) -> None:
    """The first step of a reset. An action may have replaced its slot or tree by a symlink (to
    another slot, or to files elsewhere that the reset would then clean): never follow one. What
    an action wrote beside its tree (`../file`) must not reach the next action either.

    `own`: the slot was reset for this run before. Its HOME and output file then stay, to be
    made empty in place before the run's next attempt (Sandbox.prepare: no new inode, see
    fdtree.rewrite). A new run gets new ones: a process of an earlier run may hold them open
    (a descriptor passed to a sandbox still running), and must not reach this run's."""
    for path in (slot.root, slot.tree):
        if path.is_symlink():
            path.unlink()
    kept = BESIDE_KEPT + (ATTEMPT_KEPT if own else ())
    if slot.root.is_dir():
        for entry in slot.root.iterdir():
            if entry.name not in kept:
                remove_tree(entry)


class Discardable(Protocol):
    def discard(self) -> None: ...


def _made(make: Callable[[Slot], Discardable | None], slot: Slot) -> Discardable | None:
    """What `make` makes for `slot`; None when it fails (the action starts as if nothing was)."""
    try:
        return make(slot)
    except Exception as exc:
        log.warning("could not prepare the next action ahead (%s): it starts as usual", exc)
        return None


def _discard(slot: Slot) -> None:
    """Let go of what was made ahead for `slot` and not taken."""
    made, slot.ahead = slot.ahead, None
    if made is not None:
        made.discard()


def _let_go(slot: Slot) -> None:
    """The slot is free again: what was made ahead for it and not taken first goes."""
    try:
        _discard(slot)
    finally:
        os.close(slot.lock_fd)


def _no_links_in(tree: Path) -> list[str]:
    """What runs the daemon's git on `tree` in a mount namespace of its own where the tree is
    mounted `nosymfollow` (Linux 5.10): no link in it is followed. git checks the folders on a
    file's way with lstat and then opens it by path; a process of another sandbox holding a
    folder of the tree open can swap that folder for a link in between, and the checkout
    (as root) wrote the pushed file's content into the host folder the link names (a cron
    job). Here the open fails instead (the reset starts the slot afresh). Empty (git runs as
    it did) where no such namespace can be made: said once in the log."""
    base = _no_links_base()
    if not base:
        return []
    script = f'{shlex.quote(base[-1])} --bind -o nosymfollow "$0" "$0" && cd "$0" && exec "$@"'
    return [*base[:-1], "/bin/sh", "-c", script, str(tree)]


@functools.cache
def _no_links_base() -> tuple[str, ...]:
    unshare = find("unshare")
    if unshare is None:
        log.warning("unshare (util-linux) not found: the daemon's git follows links a racing action puts in a tree")
        return ()
    mount = tool("mount")
    base = (unshare, "--mount") if os.geteuid() == 0 else (unshare, "--user", "--map-root-user", "--mount")
    probe = subprocess.run([*base, "/bin/sh", "-c", f'{shlex.quote(mount)} --bind -o nosymfollow "$0" "$0"', "/usr"],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
                           env={"PATH": SYSTEM_PATH})
    if probe.returncode != 0:
        log.warning("cannot mount a tree nosymfollow for the daemon's git (%s): it follows links a racing "
                    "action puts in a tree", probe.stderr.strip() or probe.returncode)
        return ()
    return (*base, mount)  # the last: what mounts the tree


def _git_env(git_dir: Path, tree: Path | None = None) -> dict[str, str]:
    """The environment of the daemon's git on a slot: `git_dir` alone decides (never the tree's
    .git, whatever `cwd` is), no system or global config (a ~/.gitconfig an action wrote must
    not steer checkouts)."""
    env = {k: os.environ[k] for k in GIT_ENV_KEEP if k in os.environ}
    env.update(GIT_DIR=str(git_dir), GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL="/dev/null")
    if tree is not None:
        env["GIT_WORK_TREE"] = str(tree)
    return env


def _action_git_dir(slot: Slot, objects: Path, sha: str) -> None:
    """The tree's .git, for the action (`git log`, `git status` in a job): our config, HEAD at
    `sha`, the objects by alternates, a copy of the daemon's index; nothing else an action left
    there. Only the action reads it: the daemon's git never does.

    Written through folders opened without following a link, never by path, each file kept only
    when it is a regular file with no other name, else made anew (O_EXCL; see fdtree.rewrite): a
    process of another sandbox holding a folder of this tree open may put a link where a name was
    a moment ago, and a write through it would be the daemon's (root's) anywhere on the host. It
    makes this fail instead (the reset then starts the slot afresh)."""
    tree = os.open(slot.tree, DIR_FLAGS)
    try:
        try:
            if not stat.S_ISDIR(os.stat(".git", dir_fd=tree, follow_symlinks=False).st_mode):
                os.unlink(".git", dir_fd=tree)
        except FileNotFoundError:
            pass
        try:
            os.mkdir(".git", 0o755, dir_fd=tree)
        except FileExistsError:
            pass
        git_dir = os.open(".git", DIR_FLAGS, dir_fd=tree)
    finally:
        os.close(tree)
    try:
        if not _layout_kept(git_dir):  # else (the common case) only the files are written again
            for name in os.listdir(git_dir):
                _remove_at(git_dir, name)
            for sub in ("objects/info", "objects/pack", "refs/heads", "refs/tags"):
                os.close(open_under(git_dir, sub, make=True))
        info = open_under(git_dir, "objects/info")
        try:
            rewrite(info, "alternates", f"{objects}\n".encode())
        finally:
            os.close(info)
        rewrite(git_dir, "config", SLOT_CONFIG.encode())
        rewrite(git_dir, "HEAD", f"{sha}\n".encode())
        rewrite(git_dir, "index", slot.index.read_bytes())
    finally:
        os.close(git_dir)


def _remove_at(dir_fd: int, name: str) -> None:
    """Remove `name` under the folder `dir_fd`, whatever it is (nothing when it is gone), never
    following a link. A folder that even so cannot be removed (an unprivileged daemon, an action's
    `chmod 000`) raises: the reset then starts the slot afresh."""
    try:
        if stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            shutil.rmtree(name, dir_fd=dir_fd)  # by descriptors (shutil.rmtree.avoids_symlink_attacks)
        else:
            os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _layout_kept(git_dir: int) -> bool:
    """Whether a slot's .git (the folder `git_dir`) holds exactly GIT_DIR_LAYOUT: real folders and
    regular files, nothing more (an action may have added hooks, config includes, refs, objects,
    or links anywhere)."""
    try:
        for folder, names in GIT_DIR_LAYOUT.items():
            fd = open_under(git_dir, folder)
            try:
                with os.scandir(fd) as entries:
                    found = {e.name: e for e in entries}
                if set(found) - {"index"} != names - {"index"}:
                    return False
                for name, entry in found.items():
                    want_dir = f"{folder}/{name}".lstrip("/") in GIT_DIR_LAYOUT
                    if entry.is_symlink() or (entry.is_dir(follow_symlinks=False) != want_dir) or (
                            not want_dir and not entry.is_file(follow_symlinks=False)):
                        return False
            finally:
                os.close(fd)
    except OSError:
        return False
    return True


def clean_untracked(tree: Path, index: Path, limit: int = CLEAN_IN_PROCESS) -> bool:
    """`git clean -ffdx` without a process, for a tree of at most `limit` tracked files: remove
    everything under `tree` (but its .git) that `index` does not track, nested repositories
    and ignored files included, never following a link. False (nothing done) for a larger
    index or one this does not read (version 4): run `git clean` then. Run after the checkout.

    It walks folder descriptors and removes under them (never by path): a process of another
    sandbox holding a folder of the tree open may swap a folder for a link to the host at any
    moment, and a path would then be followed, as the daemon's user (root), to what it names."""
    tracked = index_paths(index, limit)
    if tracked is None:
        return False
    empty_gitlinks(tree, index.parent, tracked)
    parents = _folders(tracked)
    pending = [("", os.open(tree, DIR_FLAGS))]
    try:
        while pending:
            prefix, fd = pending.pop()
            try:
                with os.scandir(fd) as entries:
                    listed = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
                for name, is_dir in listed:
                    rel = prefix + name
                    if rel == ".git" or rel in tracked:
                        continue
                    if rel in parents and is_dir:
                        try:
                            pending.append((rel + "/", os.open(name, DIR_FLAGS, dir_fd=fd)))
                            continue
                        except OSError as exc:  # swapped for a link since it was listed: removed
                            if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                                raise
                    _remove_at(fd, name)
            finally:
                os.close(fd)
    finally:
        for _, fd in pending:
            os.close(fd)
    return True


def empty_gitlinks(tree: Path, git_dir: Path, tracked: dict[str, int] | None = None) -> None:
    """Make every submodule's folder (a gitlink, which the daemon never fills) an empty real folder:
    neither `git clean` nor `git checkout` looks inside one, so what an action left there would
    reach the next one. `tracked`: the paths of `git_dir`'s index (read here when not given; a
    version-4 index is read by `git ls-files`). Through folder descriptors, as `clean_untracked`:
    a link on the way is never followed (one where the folder itself is, is replaced)."""
    if tracked is None:
        found = index_paths(git_dir / "index", 1 << 31)
        tracked = _ls_files_modes(tree, git_dir) if found is None else found
    links = [rel for rel, mode in tracked.items() if mode & 0o170000 == GITLINK]
    if not links:
        return
    top = os.open(tree, DIR_FLAGS)
    try:
        for rel in links:
            parent, _, name = rel.rpartition("/")
            try:
                fd = open_under(top, parent)
            except PermissionError:  # made unreadable by an action (a daemon not root): never skipped
                raise
            except OSError:  # a folder on the way is not a real one: the clean removes it
                continue
            try:
                if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    inside = os.open(name, DIR_FLAGS, dir_fd=fd)
                    try:
                        for entry in os.listdir(inside):
                            _remove_at(inside, entry)
                    finally:
                        os.close(inside)
                else:
                    os.unlink(name, dir_fd=fd)
                    os.mkdir(name, 0o755, dir_fd=fd)
            except FileNotFoundError:
                continue
            finally:
                os.close(fd)
    finally:
        os.close(top)


def remove_nested_git(tree: Path, tracked: dict[str, int]) -> None:
    """Remove a `.git` an action left in a tracked folder: `git clean` never removes an entry of that
    name, so the next action's git in that folder would take it for its repository (its config, its
    hooks: commands of the last action run by the next one). Through folder descriptors, as
    `clean_untracked`."""
    top = os.open(tree, DIR_FLAGS)
    try:
        for folder in _folders(tracked):
            try:
                fd = open_under(top, folder)
            except PermissionError:  # made unreadable by an action (a daemon not root): what it
                raise  # hides is not skipped: the reset starts the slot afresh
            except OSError:  # gone, or a link on the way: nothing of it is the tree's
                continue
            try:
                _remove_at(fd, ".git")
            finally:
                os.close(fd)
    finally:
        os.close(top)


def _folders(paths: dict[str, int]) -> set[str]:
    """Every folder on the way to `paths` (not the top)."""
    found: set[str] = set()
    for path in paths:
        folder = path.rpartition("/")[0]
        while folder and folder not in found:
            found.add(folder)
            folder = folder.rpartition("/")[0]
    return found


def _ls_files_modes(tree: Path, git_dir: Path) -> dict[str, int]:
    out = subprocess.run(["git", "-c", "safe.directory=*", "ls-files", "-s", "-z"], cwd=tree, capture_output=True,
                         check=True, stdin=subprocess.DEVNULL, env=_git_env(git_dir, tree))
    found = {}
    for record in out.stdout.split(b"\0"):
        if record:
            head, _, path = record.partition(b"\t")
            found[os.fsdecode(path)] = int(head.split()[0], 8)
    return found


def _tracked_count(index: Path) -> int:
    """How many entries `index` has (its header)."""
    with open(index, "rb") as f:
        return int.from_bytes(f.read(12)[8:12], "big")


def index_paths(index: Path, limit: int) -> dict[str, int] | None:
    """The paths a git index (version 2 or 3, SHA-1) tracks, each with its mode; None when it has
    more than `limit` entries or is another version."""
    data = index.read_bytes()
    if len(data) < 12 or data[:4] != b"DIRC":
        raise OSError(f"{index}: not a git index")
    version, count = int.from_bytes(data[4:8], "big"), int.from_bytes(data[8:12], "big")
    if version not in (2, 3) or count > limit:
        return None
    return {path: int.from_bytes(data[at + 24:at + 28], "big") for path, at, _, _ in index_walk(data)}


STAMP = ".stamp"  # beside a slot's tree: its clock (see _kernel_now)
BESIDE_KEPT = ("tree", "git", STAMP)  # what a reset leaves in a slot (see _clear_beside)
ATTEMPT_HOME, ATTEMPT_OUTPUT = "home", "output"  # beside a slot's tree: an attempt's (Slot.home, Slot.output)
ATTEMPT_KEPT = (ATTEMPT_HOME, ATTEMPT_OUTPUT)  # and what a reset leaves for the run that used the slot last
CLOCK_TICK = 0.005  # the kernel's file timestamps are coarse: one jiffy, 4 ms at HZ=250


def _kernel_now(root: Path) -> int:
    """The kernel's time for file timestamps now, as this filesystem keeps them (its clock tick,
    its granularity; time.time() is finer): the ctime of `root`'s stamp, touched. One file kept
    in the slot's folder, the daemon's alone, rather than a new one each time: see fdtree.rewrite."""
    probe = root / STAMP
    try:
        os.utime(probe, follow_symlinks=False)
    except FileNotFoundError:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    return probe.lstat().st_ctime_ns


def tree_stat(tree: Path, index: Path, racy_ns: int | None = None,
              limit: int = CLEAN_IN_PROCESS) -> dict[str, tuple[int, ...]] | None:
    """The stat data of every file of `tree` that `index` tracks (inode, device, mode, owner, size,
    modification and change times), or None: a larger index, a missing file, a folder on the
    way that is not a real folder, or (with `racy_ns`) a file changed at or after that kernel
    time, which a later change in the same clock tick could not be told apart from."""
    paths = index_paths(index, limit)
    if paths is None:
        return None
    try:
        for folder in _folders(paths):
            if not stat.S_ISDIR(os.lstat(tree / folder).st_mode):
                return None
    except (FileNotFoundError, NotADirectoryError):  # an action removed it: a change like any other
        return None
    found: dict[str, tuple[int, ...]] = {}
    for path in paths:
        try:
            st = os.lstat(tree / path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if racy_ns is not None and max(st.st_ctime_ns, st.st_mtime_ns) >= racy_ns:
            return None
        found[path] = (st.st_ino, st.st_dev, st.st_mode, st.st_uid, st.st_gid, st.st_size,
                       st.st_mtime_ns, st.st_ctime_ns)
    return found


def remove_tree(path: Path) -> None:
    """rmtree that also removes what an action made read-only or too deep; never follows a link.

    Job data decides the shape: a chmod 000 directory, a symlink where a directory was
    (the chmod below must not follow it to a host file), a tree deeper than Python's
    stack. What even `rm -rf` cannot remove is renamed aside, so a slot is never lost.
    """

    def onerror(func, p, exc):  # type: ignore[no-untyped-def]
        # Only a mode an action set (chmod 000) is worth a retry, and only for a daemon a mode can
        # stop: root's rmtree fails only when a process races it (ENOENT, ENOTDIR), and a retry by
        # path would follow the link such a process may have put on the way. What is left is
        # moved aside below.
        if not isinstance(exc[1], PermissionError) or os.geteuid() == 0:
            return
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)  # a real directory: rmtree entered it
            if not os.path.islink(p):
                os.chmod(p, stat.S_IRWXU)
            if func in (os.open, os.scandir, os.lstat):  # a directory it could not enter: enter it now
                shutil.rmtree(p, onerror=onerror)
            else:
                func(p)
        except OSError:
            pass

    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):  # a file, a link, a FIFO (rmtree opened it: no writer, no end)
            path.unlink(missing_ok=True)
            return
    except FileNotFoundError:
        return
    try:
        shutil.rmtree(path, onerror=onerror)
    except RecursionError:  # Python 3.11's rmtree recurses; rm walks any depth
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=False,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if path.exists() or path.is_symlink():
        aside = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
        path.rename(aside)
        log.warning("could not remove %s; moved it to %s (remove it by hand)", path, aside)
