"""Tests of the push intake: which pushed refs start runs (through the installed hook's
planner), what the pusher reads, the pre-receive check, the spool."""

from __future__ import annotations

import fnmatch
import os
import pwd
import random
import shutil
import socket
import sqlite3
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import RUN_ID, Home, git, pipeline

from gitpipe import hookmain, intake, intakeserver, queue, settings, triggers
from gitpipe.store import Store

ZERO = "0" * 40
PIPE = pipeline("""
    [trigger]
    branches = ["main", "release/*"]
    tags = ["v*"]
    paths = ["src/**"]

    [[stage]]
    name = "s"
      [[stage.action]]
      name = "a"
      run = "true"
    """)
TRUE_PIPE = '[[stage]]\nname = "s"\n  [[stage.action]]\n  name = "a"\n  run = "true"\n'  # every push runs it
INVALID_MAIN_ONLY = '[trigger]\nbranches = ["main"]\n\n[[stage]]\nname = "s"\n  [[stage.action]]\n  name = "a"\n  shell = "x"\n'
BROKEN_TOML = "[trigger\nbranches = [\n"


@dataclass
class Shas:
    a: str  # pipeline + src/a.py
    b: str  # + docs only
    c: str  # + src change
    none: str  # no pipeline
    invalid: str  # invalid pipeline whose [trigger] names main only
    broken: str  # not TOML at all
    tag: str  # annotated tag object on a


@pytest.fixture
def bare(tmp_path: Path) -> tuple[Path, Shas]:
    """An unregistered bare repo holding the commits the planners are asked about."""
    repo = tmp_path / "shop.git"
    git(tmp_path, "init", "--quiet", "--bare", "-b", "main", str(repo))
    work = tmp_path / "work"
    git(tmp_path, "init", "--quiet", "-b", "main", str(work))

    def commit(files: dict[str, str], message: str) -> str:
        for rel, text in files.items():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_text(text)
            git(work, "add", rel)
        git(work, "commit", "--quiet", "--allow-empty", "-m", message)
        return git(work, "rev-parse", "HEAD").stdout.strip()

    a = commit({".pipeline.toml": PIPE, "src/a.py": "a"}, "a")
    b = commit({"docs/x.md": "x"}, "b")
    c = commit({"src/deep/c.py": "c"}, "c")
    git(work, "tag", "-a", "-m", "annotated", "v2", a)
    git(work, "checkout", "--quiet", "--orphan", "other")
    git(work, "rm", "-r", "-f", "--quiet", ".")
    none = commit({"README": "no pipeline"}, "none")
    invalid = commit({".pipeline.toml": INVALID_MAIN_ONLY}, "invalid")
    broken = commit({".pipeline.toml": BROKEN_TOML}, "broken")
    git(work, "push", "--quiet", str(repo), f"{c}:refs/heads/keep", f"{broken}:refs/heads/keep2", "refs/tags/v2")
    tag = git(repo, "rev-parse", "refs/tags/v2").stdout.strip()
    return repo, Shas(a, b, c, none, invalid, broken, tag)


Planned = list[tuple[str, str, bool]]  # (ref, sha, has an error)


def plan_hook(home: Path, repo: Path, updates: list[tuple[str, str, str]]) -> Planned:
    """What the installed post-receive hook records (it writes the runs to the database)."""
    store = Store(settings.load(home))
    try:
        last = max((r.id for r in store.runs(limit=1)), default=0)
        hookmain.post_receive(str(home), "shop", str(repo), "".join(f"{o} {n} {r}\n" for o, n, r in updates))
        runs = [r for r in reversed(store.runs(limit=1000)) if r.id > last]
    finally:
        store.close()
    return [(r.ref, r.sha, r.error is not None) for r in runs]


PLANNERS: dict[str, Callable[[Path, Path, list[tuple[str, str, str]]], Planned]] = {"hook": plan_hook}


@pytest.fixture(params=list(PLANNERS))
def plan(request: pytest.FixtureRequest, tmp_path: Path, bare: tuple[Path, Shas]
         ) -> Callable[[list[tuple[str, str, str]]], Planned]:
    home = tmp_path / "home"
    home.mkdir()
    Store(settings.load(home)).close()
    planner = PLANNERS[request.param]
    return lambda updates: planner(home, bare[0], updates)


def test_a_new_branch_runs_whatever_it_changed(plan: Callable, bare: tuple[Path, Shas]) -> None:
    _, s = bare
    assert plan([(ZERO, s.b, "refs/heads/main")]) == [("refs/heads/main", s.b, False)]


def test_paths_decide_for_an_updated_branch(plan: Callable, bare: tuple[Path, Shas]) -> None:
    _, s = bare
    assert plan([(s.a, s.b, "refs/heads/main")]) == []  # docs only
    assert plan([(s.b, s.c, "refs/heads/main")]) == [("refs/heads/main", s.c, False)]
    assert plan([(s.a, s.c, "refs/heads/main")]) == [("refs/heads/main", s.c, False)]  # several commits


def test_branch_and_tag_globs(plan: Callable, bare: tuple[Path, Shas]) -> None:
    _, s = bare
    assert plan([(ZERO, s.a, "refs/heads/feature")]) == []
    assert plan([(ZERO, s.a, "refs/heads/release/1.0")]) == [("refs/heads/release/1.0", s.a, False)]
    assert plan([(ZERO, s.a, "refs/heads/release")]) == []
    assert plan([(ZERO, s.a, "refs/tags/v1")]) == [("refs/tags/v1", s.a, False)]
    assert plan([(ZERO, s.a, "refs/tags/x1")]) == []


def test_an_annotated_tag_runs_the_commit_it_points_to(plan: Callable, bare: tuple[Path, Shas]) -> None:
    _, s = bare
    assert plan([(ZERO, s.tag, "refs/tags/v2")]) == [("refs/tags/v2", s.a, False)]


def test_deletions_other_refs_and_commits_without_pipeline_start_nothing(
        plan: Callable, bare: tuple[Path, Shas]) -> None:
    _, s = bare
    assert plan([(s.c, ZERO, "refs/heads/main")]) == []
    assert plan([(ZERO, s.a, "refs/notes/commits"), (ZERO, s.a, "refs/pull/1/head")]) == []
    assert plan([(ZERO, s.none, "refs/heads/main")]) == []
    assert plan([(s.a, s.none, "refs/heads/main")]) == []


def test_an_invalid_pipeline_still_obeys_its_trigger(plan: Callable, bare: tuple[Path, Shas]) -> None:
    _, s = bare
    assert plan([(ZERO, s.invalid, "refs/heads/main")]) == [("refs/heads/main", s.invalid, True)]
    assert plan([(ZERO, s.invalid, "refs/heads/feature")]) == []
    # Not even TOML: no trigger can be read, so it fails on every branch (default ["*"]).
    assert plan([(ZERO, s.broken, "refs/heads/feature")]) == [("refs/heads/feature", s.broken, True)]


def test_one_run_per_triggering_ref_of_a_push_in_order(plan: Callable, bare: tuple[Path, Shas]) -> None:
    _, s = bare
    updates = [(ZERO, s.c, "refs/heads/main"), (ZERO, s.c, "refs/heads/feature"),
               (ZERO, s.a, "refs/heads/release/2"), (ZERO, s.a, "refs/tags/v9")]
    assert plan(updates) == [("refs/heads/main", s.c, False), ("refs/heads/release/2", s.a, False),
                             ("refs/tags/v9", s.a, False)]


def test_what_the_pusher_reads(tmp_path: Path, bare: tuple[Path, Shas]) -> None:
    repo, s = bare
    home = tmp_path / "home"
    home.mkdir()
    (home / "gitpipe.toml").write_text('site_url = "https://ci.example.com/"\n')
    Store(settings.load(home)).close()
    lines = hookmain.post_receive(str(home), "shop", str(repo),
                                  f"{ZERO} {s.c} refs/heads/main\n{ZERO} {s.invalid} refs/heads/main\n")
    assert lines[0] == f"gitpipe: run #1 queued for main @ {s.c[:7]} https://ci.example.com/shop/runs/1.html"
    assert lines[1] == (f"gitpipe: run #2 for main @ {s.invalid[:7]} failed: .pipeline.toml is invalid: "
                        "https://ci.example.com/shop/runs/2.html")
    assert len(lines) == 4  # every problem, one line each, in line order
    assert lines[2].startswith("gitpipe:   .pipeline.toml:6: ") and '"run"' in lines[2]
    assert lines[3].startswith("gitpipe:   .pipeline.toml:8: ") and '"shell"' in lines[3]
    assert list((home / "wake").iterdir())  # the daemon is woken
    assert hookmain.post_receive(str(home), "shop", str(repo), f"{s.c} {ZERO} refs/heads/main\n") == []


def test_pre_receive_checks_only_when_the_repo_asks(tmp_path: Path, bare: tuple[Path, Shas]) -> None:
    repo, s = bare
    home = tmp_path / "home"
    home.mkdir()
    text = f"{ZERO} {s.invalid} refs/heads/main\n{s.c} {ZERO} refs/heads/gone\n{ZERO} {s.none} refs/heads/x\n"
    assert queue.pre_receive(settings.load(home), "shop", str(repo), text) == (True, [])
    (home / "gitpipe.toml").write_text("[repos.shop]\nreject_invalid = true\n")
    ok, lines = queue.pre_receive(settings.load(home), "shop", str(repo), text)
    assert not ok
    assert lines[0] == "gitpipe: rejecting main: .pipeline.toml is invalid"
    assert [line.split(": ")[1] for line in lines[1:3]] == ["  .pipeline.toml:6", "  .pipeline.toml:8"]
    assert "gitpipe validate" in lines[-1]
    valid = f"{ZERO} {s.a} refs/heads/main\n"
    assert queue.pre_receive(settings.load(home), "shop", str(repo), valid) == (True, [])


def test_parse_updates() -> None:
    text = f"{ZERO} {'a' * 40} refs/heads/main\n\ngarbage\n{'a' * 40} {ZERO} refs/tags/v1\n"
    ups = queue.parse_updates(text)
    assert [(u.ref, u.created, u.deleted, u.branch, u.tag) for u in ups] == [
        ("refs/heads/main", True, False, "main", None), ("refs/tags/v1", False, True, None, "v1")]


def test_the_hooks_glob_matches_like_fnmatch() -> None:
    """The hook matches branch globs without importing `re`; it must agree with fnmatch."""
    patterns = ["*", "main", "release/*", "v*", "v?.*", "[a-c]*", "[!a-c]*", "*-rc[0-9]", "a*b*c",
                "**", "x[", "[]]x", "*/*", "feature/**/x", "[-a]b", "v[0-9].[0-9]*"]
    names = ["main", "release/1.0", "release/", "v1.2", "v", "bcd", "dcb", "1.0-rc1", "abc", "aXbYc",
             "x[", "]x", "feature/a/b/x", "-b", "ab", "v1.23", "", "a/b", "Main"]
    rnd = random.Random(7)
    alphabet = "ab*?[]!-/"
    patterns += ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 6))) for _ in range(300)]
    names += ["".join(rnd.choice("ab/-]") for _ in range(rnd.randint(0, 6))) for _ in range(100)]
    mismatches = [(p, n) for p in patterns for n in names
                  if triggers.glob_match(p, n) != fnmatch.fnmatchcase(n, p)]
    assert mismatches == []


def test_a_push_the_database_refuses_is_spooled_and_queued_by_the_daemon(home: Home) -> None:
    repo = home.add_repo("spooled")
    db = home.home / "gitpipe.db"
    aside = home.root / "db-aside"
    aside.mkdir()
    for f in home.home.glob("gitpipe.db*"):
        shutil.move(str(f), aside / f.name)
    db.mkdir()  # sqlite cannot open a directory: the hook's insert fails
    push = home.push(repo, {".pipeline.toml": pipeline("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "a"
          run = "echo spooled"
        """)})
    assert push.returncode == 0, push.stderr
    assert "database busy or unwritable" in push.stderr and "the daemon will queue it" in push.stderr
    assert len(list((home.home / "spool").glob("*.json"))) == 1
    assert list((home.home / "spool" / "pending").iterdir()) == []  # the room pre-receive reserved was used
    db.rmdir()
    for f in aside.iterdir():
        shutil.move(str(f), home.home / f.name)
    served = home.gitpipe("serve", "--burst", timeout=60)
    assert served.returncode == 0, served.stderr
    [run] = home.runs()
    assert run["status"] == "succeeded" and run["sha"] == push.sha and run["ref"] == "refs/heads/main"
    assert list((home.home / "spool").glob("*.json")) == []
    assert "spooled" in home.logs(run["id"])
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM runs").fetchone() == (1,)
    conn.close()


# ---------------------------------------------------------------------------- the daemon's socket

def ask(home: Home, request: bytes) -> bytes:
    """One request to the daemon's intake socket (through /proc: a test home's path may be longer
    than a socket address), as the hook's client makes it: send, shut down, read to the end."""
    fd = os.open(home.home, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(60)
            sock.connect(f"/proc/self/fd/{fd}/intake.sock")
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)
    finally:
        os.close(fd)


def test_the_daemon_takes_only_well_formed_pushes_of_registered_repos(home: Home) -> None:
    repo = home.add_repo("shop")
    push = home.push(repo, {".pipeline.toml": pipeline("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "a"
          run = "true"
        """)})
    [pushed] = push.run_ids
    who = "eve".encode().hex()
    line = f"{ZERO} {push.sha} refs/heads/main\n".encode()
    forged = [
        b"GET / HTTP/1.0\r\n\r\n",
        f"gitpipe-push 1 elsewhere 1 2 {who}\n".encode() + line,  # not a registered repo
        f"gitpipe-push 1 shop x 2 {who}\n".encode() + line,  # not a pid
        f"gitpipe-push 1 shop 1 2 {who}\n{ZERO} {'g' * 40} refs/heads/main\n".encode(),  # not an object id
        f"gitpipe-push 1 shop 1 2 {who}\n{ZERO} {push.sha} refs/heads/a\x1bb\n".encode(),  # a control in a ref
        f"gitpipe-push 1 shop 1 2 {who}\n{ZERO} {push.sha} main extra\n".encode(),  # not `old new ref`
    ]
    with home.daemon() as daemon:
        for request in forged:
            answer = ask(home, request)
            assert answer.startswith(b"refused\ngitpipe: the daemon refused the push ("), (request, answer)
        assert [r["id"] for r in home.runs()] == [pushed]  # nothing recorded
        assert daemon.log.count("intake: refused a push") == len(forged)
        # a well-formed one is taken, once however often it is sent (the hook's fallback sends it again)
        good = f"gitpipe-push 1 shop 7 8 {who}\n".encode() + line
        first, again = ask(home, good), ask(home, good)
        assert first == again and first.startswith(b"recorded\ngitpipe: run #"), first
        run_id = int(first.split(b"#")[1].split()[0])
        assert run_id != pushed and home.wait_run(run_id)["pusher"] == "eve"
    assert sorted(r["id"] for r in home.runs()) == [pushed, run_id]


def test_a_push_is_recorded_once_under_its_key(home: Home) -> None:
    """What the hook's fallback and the daemon share: a push key recorded with its runs."""
    repo = home.add_repo("shop")
    sha = home.push(repo, {".pipeline.toml": pipeline("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "a"
          run = "true"
        """)}).sha
    text = f"{ZERO} {sha} refs/heads/main\n"
    key = intake.push_key("shop", 10, 11, text)
    assert key == intake.push_key("shop", 10, 11, text.rstrip("\n") + "\n\n")  # the same lines
    assert key != intake.push_key("shop", 10, 12, text) != intake.push_key("shop", 10, 11, text.replace("main", "dev"))
    run = {"repo": "shop", "pipeline": "shop", "ref": "refs/heads/main", "sha": sha, "trigger": "push",
           "pipeline_text": ""}
    db = str(home.home / "gitpipe.db")
    first = intake.record(db, [run], key)
    assert intake.record(db, [run, run], key) == first
    assert len(home.runs()) == 2  # the push's own run, and this one: once


def test_the_pusher_is_named_alike_by_the_daemon_and_the_python_hook(home: Home) -> None:
    """A push whose environment names nobody (no USER, LOGNAME, REMOTE_USER...): the hook's
    client sends no name and the daemon names the Unix user of the socket's peer, as the Python
    hook names itself when the daemon is down. A front end's name still wins."""
    repo = home.add_repo("shop")
    text = TRUE_PIPE
    names = ("GITPIPE_PUSHER", "REMOTE_USER", "GL_USERNAME", "GITEA_PUSHER_NAME", "USER", "LOGNAME")
    nameless = {k: v for k, v in home.env().items() if k not in names}
    me = pwd.getpwuid(os.geteuid()).pw_name

    def push(env: dict[str, str]) -> int:
        sha = home.commit(repo, {".pipeline.toml": text, "n": str(len(home.runs()))})
        proc = subprocess.run(["git", "push", str(repo), f"{sha}:refs/heads/main"], cwd=home.clone_of(repo),
                              env=env, capture_output=True, text=True, timeout=120, check=True)
        [run_id] = RUN_ID.findall(proc.stderr)
        return int(run_id)

    with home.daemon():
        by_daemon = push(nameless)
        by_front_end = push({**nameless, "REMOTE_USER": "carol"})
        assert home.wait_run(by_daemon)["pusher"] == me
        assert home.wait_run(by_front_end)["pusher"] == "carol"
        # the request with an empty name, as the client sends it (of a commit the repo has)
        sha = home.show(by_daemon)["sha"]
        answer = ask(home, f"gitpipe-push 1 shop 7 8 \n{ZERO} {sha} refs/heads/other\n".encode())
        assert answer.startswith(b"recorded\ngitpipe: run #"), answer
        assert home.wait_run(int(answer.split(b"#")[1].split()[0]))["pusher"] == me
    by_hook = push(nameless)  # the daemon is down: the Python hook records it
    assert home.show(by_hook)["pusher"] == me


def test_idle_connections_to_the_intake_do_not_lose_or_double_a_push(home: Home) -> None:
    """Slowloris on the intake: more idle connections than it serves at once (each says nothing).
    Each is given up after its read timeout; a push meanwhile is recorded once, by the daemon
    or, if the hook gave up waiting, by the Python hook under the same key."""
    repo = home.add_repo("shop")
    text = TRUE_PIPE
    with home.daemon() as daemon:
        fd = os.open(home.home, os.O_RDONLY | os.O_DIRECTORY)
        idle = []
        try:
            for _ in range(intakeserver.CONNECTIONS + 4):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(f"/proc/self/fd/{fd}/intake.sock")
                idle.append(sock)
            push = home.push(repo, {".pipeline.toml": text})
        finally:
            for sock in idle:
                sock.close()
            os.close(fd)
        [run_id] = push.run_ids
        home.wait_run(run_id)
        assert [r["id"] for r in home.runs()] == [run_id]
        assert "no whole request within" in daemon.log


def test_another_local_account_cannot_push_through_the_intake(home: Home) -> None:
    """A local account that is not the daemon's: the home (0700) keeps it from the socket, and were
    the home opened to it, the daemon hears only its own uid or root (SO_PEERCRED): refused."""
    if os.geteuid() != 0:
        pytest.skip("switching to another account needs root")
    repo = home.add_repo("shop")
    push = home.push(repo, {".pipeline.toml": pipeline("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "a"
          run = "true"
        """)})
    [pushed] = push.run_ids
    request = f"gitpipe-push 1 shop 7 8 {b'mallory'.hex()}\n{ZERO} {push.sha} refs/heads/main\n".encode()

    def as_nobody() -> str:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: another account, then the request
            said = b""
            try:
                fd = os.open(home.home, os.O_RDONLY | os.O_DIRECTORY)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(30)
                    sock.connect(f"/proc/self/fd/{fd}/intake.sock")
                    sock.sendall(request)
                    sock.shutdown(socket.SHUT_WR)
                    while chunk := sock.recv(65536):
                        said += chunk
            except OSError as exc:
                said = f"{type(exc).__name__}: {exc}".encode()
            finally:
                os.write(write, said)
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as f:
            said = f.read()
        os.waitpid(pid, 0)
        return said.decode()

    with home.daemon() as daemon:
        assert stat.S_IMODE(home.home.stat().st_mode) & 0o077 == 0, "the home is the daemon's alone"
        assert as_nobody().startswith("PermissionError"), "the home keeps another account from the socket"
        home.home.chmod(0o755)
        (home.home / "intake.sock").chmod(0o777)
        # refused before its request is read: the answer, or a reset or broken pipe when the
        # daemon closed the connection before the request was read or written whole
        said = as_nobody()
        assert said.startswith(("refused\n", "ConnectionResetError", "BrokenPipeError")), said
        assert "a process of uid 65534 is not the daemon's user" in daemon.log
    assert [r["id"] for r in home.runs()] == [pushed]  # nothing recorded for it


def test_a_value_is_written_into_the_perl_hook_as_it_is() -> None:
    """The home, repo, Python and libdir paths are Perl string literals in hooks/post-receive:
    quotes, backslashes, `$` and `@` stay what they are (nothing is interpolated)."""
    from gitpipe import repos

    for value in ("/srv/it's here", "C:\\back\\slash\\", "$HOME @ARGV ${x}", "'", "\\", "\n\t"):
        code = f"print {repos._perl_quote(value)}"
        out = subprocess.run(["perl", "-e", code], capture_output=True, check=True).stdout
        assert out.decode() == value, (value, code)


def test_the_intake_keeps_no_validated_pipeline_too_long_to_keep(home: Home) -> None:
    """The intake keeps the texts that validated, but none longer than pipeline.KEPT_MAX_BYTES:
    64 of a pusher's 4 MB files would hold 256 MB in the daemon."""
    from gitpipe.pipeline import KEPT_MAX_BYTES

    conf = settings.load(home.home)
    store = Store(conf)
    try:
        server = intakeserver.IntakeServer(conf, store, lambda: None)
        small = pipeline('[[stage]]\nname = "s"\n  [[stage.action]]\n  name = "a"\n  run = "true"\n')
        large = small.replace('run = "true"', 'run = "' + "x" * KEPT_MAX_BYTES + '"')
        for text in (small, large):
            assert server.validated("shop", text)["error"] is None
        assert list(server.pipelines) == [("shop", small)]
    finally:
        store.close()
