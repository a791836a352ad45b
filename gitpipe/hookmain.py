"""Entry of the installed git hooks. The post-receive path is kept cheap on purpose.

Every push pays for this module's imports, so the common case uses only os, sys,
marshal and sqlite3 (through intake.py): the `.pipeline.toml` of the pushed commit
is looked up by its blob id in a cache (`<home>/cache/`) of what the full validator
said about it (name, trigger globs, errors), and host settings are cached by the
mtime and size of gitpipe.toml. Only when the pipeline file changed (a new blob) or
a `paths` filter must be checked does the hook import the validator (~40 ms more).

A push git accepted is never dropped: hooks/pre-receive reserved room for its runs in
`<home>/spool/pending/` (or refused the push: a full disk). When the database cannot take the
runs, post-receive writes them over that room, into `<home>/spool/`, for the daemon to queue.
"""

from __future__ import annotations

import marshal
import os
import sys
import time

TYPE_CHECKING = False  # not `from typing import ...`: importing typing costs each push ~14 ms
if TYPE_CHECKING:
    from typing import Any

from gitpipe import intake, triggers  # noqa: E402 - after the cheap TYPE_CHECKING guard
from gitpipe.intake import PIPELINE_FILE  # noqa: E402
from gitpipe.refs import short_ref  # noqa: E402 - imports nothing: cheap for every push

CACHE_VERSION = 1
MAX_NOTES = 5  # lines about refs that start no run


def main(name: str, *, home: str, repo: str, daemon: str = "") -> int:
    """Run hook `name` for `repo` with the gitpipe home it was installed from.

    `daemon`: why hooks/post-receive (sh) came here rather than the daemon's answer: "down"
    (nothing listens on its socket), "silent" (it took the push but did not answer), "refused"
    (it answered that it could not record the push, and said why), "" (no client for its socket,
    or a hook installed by an older gitpipe).
    """
    data = sys.stdin.buffer.read()
    git_dir = os.environ.get("GIT_DIR", ".")
    if name == "pre-receive":
        return _pre_receive(home, repo, git_dir, data)
    text = data.decode("utf-8", "replace")
    try:
        # git starts the hook (this process, exec'd by the sh hook) under receive-pack: the
        # key the daemon recorded the push under if it took it (intakeserver.py)
        key = intake.push_key(repo, os.getppid(), os.getpid(), text)
        _print(post_receive(home, repo, git_dir, text, key=key, daemon=daemon))
    except Exception as exc:  # the push is in; never hide why its runs were not queued
        _print([f"gitpipe: ERROR: runs not queued: {exc}",
                f"gitpipe: start them by hand once fixed: gitpipe run {repo} --ref REF"])
    finally:
        _release(home)
    _chained("post-receive", data)
    return 0


def post_receive(home: str, repo: str, git_dir: str, text: str, *, key: str | None = None,
                 daemon: str = "") -> list[str]:
    """Record the runs this push starts; the lines to show the pusher."""
    runs, notes = plan(Reader(home, repo, git_dir), repo, pusher(), text)
    if not runs:
        return notes
    try:
        ids = intake.record(os.path.join(home, "gitpipe.db"), runs, key)
    except Exception as exc:  # database locked past the timeout, disk full, ...
        return _spool(home, runs, exc)
    warning = _wake(home, "push")
    site_url, problem = site_url_of(home)
    lines: list[str] = []
    for run_id, run in zip(ids, runs):
        lines += describe(run_id, run, site_url)
    return lines + notes + warning + problem + daemon_note(daemon, runs)


def site_url_of(home: str) -> tuple[str, list[str]]:
    """The site_url the pusher's lines link to (gitpipe.toml as it is now), and a warning line
    when gitpipe.toml cannot be read: read after recording, a mistake there loses no push."""
    try:
        return host_settings(home)["site_url"], []
    except Exception as exc:
        return "", [f"gitpipe: warning: {exc}"]


def daemon_note(daemon: str, runs: list[dict[str, Any]]) -> list[str]:
    """Why the hook recorded the push itself, when the pusher should know."""
    if all(run.get("error") for run in runs):  # runs that failed at once: nothing to start
        return []
    if daemon == "down":
        return ["gitpipe: the daemon is not running: the run starts when it does (gitpipe serve)"]
    if daemon == "silent":
        return ["gitpipe: warning: the daemon took the push but did not answer (it stopped, or was busy): "
                "recorded here, once all the same"]
    return []


def plan(reader: Reader, repo: str, who: str, text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The runs a push's ref lines start, and why the others start none (where the pusher could not guess it)."""
    runs = []
    notes: list[str] = []
    for parts in updates(text):
        run = _plan(reader, repo, who, *parts, notes=notes)
        if run:
            runs.append(run)
    if len(notes) > MAX_NOTES:  # a mirror push of many branches: not a screenful of the same line
        notes[MAX_NOTES - 1:] = [f"gitpipe: and {len(notes) - MAX_NOTES + 1} more refs without {PIPELINE_FILE}"]
    return runs, notes


def updates(text: str) -> list[tuple[str, str, str]]:
    """git's `old new ref` lines. Split on "\n" and " " only: a ref name may hold other
    whitespace (a no-break space, U+2028) that str.split() and splitlines() would cut at."""
    found = []
    for line in text.split("\n"):
        parts = line.split(" ")
        if len(parts) == 3:
            found.append((parts[0], parts[1], parts[2]))
    return found


class Reader:
    """What planning a push reads from its repository. This one, the hook's, asks `git` and keeps
    what the validator said about a pipeline file in <home>/cache/ by its blob id; the daemon's
    (intakeserver.DaemonReader) reads the pushed objects in its own process."""

    def __init__(self, home: str, repo: str, git_dir: str) -> None:
        self.home, self.repo, self.git_dir = home, repo, git_dir

    def pipeline(self, sha: str) -> dict[str, Any] | None:
        """What the validator says about the pipeline file at commit (or tag) `sha`; None without one."""
        code, out = git(self.git_dir, "rev-parse", "--verify", "-q", f"{sha}:{PIPELINE_FILE}")
        if code != 0:
            return None
        return pipeline_info(self.home, self.repo, self.git_dir, out.decode().strip())

    def peel(self, sha: str) -> str:
        """The commit an annotated tag names (the run's worktree and GITPIPE_SHA need it)."""
        code, out = git(self.git_dir, "rev-parse", "--verify", "-q", f"{sha}^{{commit}}")
        return out.decode().strip() if code == 0 and out.strip() else sha

    def paths_changed(self, patterns: list[str], old: str, new: str) -> bool:
        from gitpipe.matching import paths_match

        _, out = git(self.git_dir, "diff", "--name-only", "-z", "--no-renames", old, new)
        return paths_match(tuple(patterns), [p for p in out.decode("utf-8", "replace").split("\0") if p])

    def commit_info(self, sha: str) -> tuple[str | None, str | None]:
        return commit_info(self.git_dir, sha)


def _plan(reader: Reader, repo: str, who: str, old: str, new: str, ref: str, *,
          notes: list[str]) -> dict | None:
    if not new.strip("0") or not ref.startswith(("refs/heads/", "refs/tags/")):
        return None  # a deletion, or a ref that is neither a branch nor a tag
    info = reader.pipeline(new)
    if info is None:
        notes.append(f"gitpipe: no {PIPELINE_FILE} in {_where(ref, new)}: nothing to run. Add one at the top of "
                     f"the repository (check it with `gitpipe validate`) and push again")
        return None
    branch = ref.startswith("refs/heads/")
    if not triggers.push_starts(info, ref):
        return None
    if not branch:  # an annotated tag names a tag object; the run (worktree, GITPIPE_SHA) needs its commit
        new = reader.peel(new)
    created = not old.strip("0")
    if info["paths"] and not created and not reader.paths_changed(info["paths"], old, new):
        return None
    run = {"repo": repo, "pipeline": info["name"], "ref": ref, "sha": new, "trigger": triggers.PUSH,
           "before_sha": None if created else old, "pusher": who, "error": info["error"],
           "pipeline_text": info["text"]}
    if info["error"]:  # it ends here, never reaching the daemon, which records the commit of the others
        run["commit_author"], run["commit_message"] = reader.commit_info(new)
    return run


def commit_info(git_dir: str, sha: str) -> tuple[str | None, str | None]:
    """(author "Name <email>", message) of a commit, as git.commit_info gives them, through `git`."""
    code, raw = git(git_dir, "cat-file", "commit", sha)
    if code != 0:
        return None, None
    head, _, message = raw.decode("utf-8", "replace").partition("\n\n")
    author = next((line[len("author "):] for line in head.splitlines() if line.startswith("author ")), None)
    return (author.rsplit(" ", 2)[0] if author else None), message


def pipeline_info(home: str, repo: str, git_dir: str, blob: str) -> dict[str, Any]:
    """What the validator says about a pipeline blob, cached by blob id (blobs never change)."""
    path = os.path.join(home, "cache", "pipelines", f"{repo}-{blob}")
    cached = _load(path)
    if cached is not None:
        return cached
    _, raw = git(git_dir, "cat-file", "blob", blob)
    info = validate(raw.decode("utf-8", "replace"), repo)
    if info["error"] is None:  # an error may go away without a new blob (a plugin installed later)
        _save(path, info)
    return info


def validate(text: str, repo: str) -> dict[str, Any]:
    """What the planner needs of a pipeline file: its name, trigger globs, errors (all of them) and text."""
    from gitpipe import pipeline
    from gitpipe.errors import PipelineError
    from gitpipe.models import TriggerSpec

    try:
        pipe = pipeline.parse(text, file=PIPELINE_FILE, default_name=repo)
        trigger, name, error = pipe.trigger, pipe.name, None
    except PipelineError as exc:
        trigger = triggers.read_trigger(text) or TriggerSpec()
        name, error = repo, f"{PIPELINE_FILE} is invalid:\n{exc}"
    return {"name": name, **triggers.hook_fields(trigger), "error": error, "text": text}


def host_settings(home: str) -> dict[str, Any]:
    """The settings the hook needs, cached by gitpipe.toml's mtime and size."""
    try:
        st = os.stat(os.path.join(home, "gitpipe.toml"))
        stamp = [st.st_mtime_ns, st.st_size]
    except FileNotFoundError:
        stamp = None
    path = os.path.join(home, "cache", "hook-settings")
    cached = _load(path)
    if cached is not None and cached["stamp"] == stamp:
        return cached
    from gitpipe import settings

    conf = settings.load(home)
    info = {"stamp": stamp, "site_url": conf.site_url}
    _save(path, info)
    return info


def _load(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            data = marshal.load(f)
    except (OSError, EOFError, ValueError, TypeError):
        return None
    return data[1] if isinstance(data, tuple) and data[0] == CACHE_VERSION else None


def _save(path: str, value: Any) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            marshal.dump((CACHE_VERSION, value), f)
        os.replace(tmp, path)
    except OSError:  # a cache only: the next push computes it again
        try:
            os.unlink(tmp)  # a part written on a full disk would keep its room taken
        except OSError:
            pass


def describe(run_id: int, run: dict[str, Any], site_url: str) -> list[str]:
    """What the pusher reads for one run (git prefixes each line with `remote:`)."""
    where = _where(run["ref"], run["sha"])
    url = f" {site_url}/{run['repo']}/runs/{run_id}.html" if site_url else ""
    if run.get("error"):
        first, *rest = run["error"].splitlines()
        return [f"gitpipe: run #{run_id} for {where} failed: {first}{url}"] + [f"gitpipe:   {x}" for x in rest]
    return [f"gitpipe: run #{run_id} queued for {where}{url}"]


def _where(ref: str, sha: str) -> str:
    """`main @ 1a2b3c4`, as the pusher reads it."""
    # git refuses ASCII controls in ref names, but not C1 controls or bidi marks: shown escaped
    shown = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in short_ref(ref))
    return f"{shown} @ {sha[:7]}"


def git(git_dir: str, *args: str) -> tuple[int, bytes]:
    """Run git and read its output, without importing subprocess (it costs a push ~15 ms)."""
    r, w = os.pipe()
    null = os.open(os.devnull, os.O_RDWR)
    try:
        pid = os.posix_spawnp("git", ["git", f"--git-dir={git_dir}", *args], dict(os.environ),
                              file_actions=[(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, w, 1),
                                            (os.POSIX_SPAWN_DUP2, null, 2)])
    finally:
        os.close(w)
        os.close(null)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks)


def pusher() -> str:
    """Who pushed: what a git front end says (REMOTE_USER, GL_USERNAME), else the Unix user."""
    for key in ("GITPIPE_PUSHER", "REMOTE_USER", "GL_USERNAME", "GITEA_PUSHER_NAME", "USER", "LOGNAME"):
        if os.environ.get(key):
            return os.environ[key]
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _spool(home: str, runs: list[dict[str, Any]], exc: Exception) -> list[str]:
    import json

    # The paths from the home alone: a broken gitpipe.toml must not lose this push either.
    spool_dir = os.path.join(home, "spool")
    path = os.path.join(spool_dir, f"{time.time_ns()}-{os.getpid()}.json")
    # Without the pipeline text (the daemon reads it again at the commit): an entry of a few
    # hundred bytes per run, which fits the room pre-receive reserved whatever the file's size.
    entry = json.dumps([{**run, "pipeline_text": None} for run in runs]).encode()
    try:
        _write_durably(entry, path, _reservation(home))
    except Exception as exc2:
        refs = " ".join(r["ref"] for r in runs)
        return [f"gitpipe: ERROR: could not queue runs for {refs}: {exc}; {exc2}",
                f"gitpipe: start them by hand once fixed: gitpipe run {runs[0]['repo']} --ref REF"]
    return [f"gitpipe: database busy or unwritable ({exc}); push kept in {path}, the daemon will queue it",
            *_wake(home, "spool")]


def _reservation(home: str) -> str:
    """The room pre-receive reserved for this push: named by the receive-pack both hooks run under."""
    return os.path.join(home, "spool", "pending", str(os.getppid()))


def _write_durably(data: bytes, path: str, reserved: str) -> None:
    """Write `data` as the file `path`, synced, whole or not at all.

    Written over the room pre-receive reserved, whose blocks are already the file's: on a
    full disk this needs no new ones (on ext4, xfs and tmpfs; a copy-on-write filesystem
    such as btrfs or ZFS may still refuse it). Without a reservation (hooks installed by an
    older gitpipe): a new file.
    """
    src = reserved
    try:
        fd = os.open(src, os.O_WRONLY)  # no O_TRUNC: the reserved blocks are written over
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        src = path + ".tmp"
        fd = os.open(src, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    except BaseException:
        if src != reserved:  # never a 0-byte .tmp left behind (main() releases a reservation)
            os.unlink(src)
        raise
    finally:
        os.close(fd)
    os.replace(src, path)
    dir_fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def _release(home: str) -> None:
    """Give back the room pre-receive reserved (when the runs went to the database, or none started)."""
    try:
        os.unlink(_reservation(home))
    except OSError:
        pass


def _wake(home: str, name: str) -> list[str]:
    """Wake the daemon; a warning line when that fails (the runs are recorded all the same)."""
    try:
        intake.wake(home, name)
    except OSError as exc:
        return [f"gitpipe: warning: the daemon was not woken ({exc}); the run starts when it next wakes: a push, a command, a restart"]
    return []


def _pre_receive(home: str, repo: str, git_dir: str, data: bytes) -> int:
    from gitpipe import queue, settings
    from gitpipe.errors import GitpipeError

    rc = _chained("pre-receive", data)
    if rc:
        return rc
    try:
        ok, lines = queue.pre_receive(settings.load(home), repo, git_dir, data.decode("utf-8", "replace"))
    except GitpipeError as exc:
        ok, lines = True, [f"gitpipe: ERROR: {exc}"]
    _print(lines)
    return 0 if ok else 1


def _chained(name: str, data: bytes) -> int:
    """Run the hook that was installed before gitpipe's, with the same input; its exit status."""
    path = os.path.join(os.environ.get("GIT_DIR", "."), "hooks", f"{name}.chained")
    if not os.access(path, os.X_OK):
        return 0
    import subprocess

    return subprocess.run([path], input=data, check=False).returncode


def _print(lines: list[str]) -> None:
    if lines:
        sys.stdout.write("".join(line + "\n" for line in lines))
        sys.stdout.flush()
