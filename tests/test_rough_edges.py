"""The rough edges a new user hit (issue 13), each as it was met: through the real command,
a real push, a real daemon, a real pipe."""

from __future__ import annotations

import ctypes
import html
import html.parser
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import GITPIPE, Home, base_env, cpu_seconds, one_line_error, pipeline, wait_for, working_copy

GOOD = pipeline("""
    [[stage]]
    name = "build"
      [[stage.action]]
      name = "compile"
      run = "echo compiled"
      [[stage.action]]
      name = "lint"
      run = "echo linted"
    [[stage]]
    name = "test"
      [[stage.action]]
      name = "unit"
      run = "echo tested"
    """)
INVALID = pipeline("""
    [[stage]]
    name = "build"
      [[stage.action]]
      name = "a"
      shell = "echo hi"
    """)


# ---------------------------------------------------------------------------- 1. invalid pipelines and the site


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("href", "src") and value and not value.startswith(("#", "http:", "https:", "data:")):
                self.hrefs.append(value)


def dead_links(page: Path) -> list[str]:
    """The links of a page (href, src) that name no file of the site."""
    parser = _Links()
    parser.feed(page.read_text())
    dead = []
    for href in parser.hrefs:
        target = (page.parent / href.split("#")[0]).resolve()
        if not target.is_file():
            dead.append(href)
    return dead


def test_an_invalid_pipeline_gets_its_page_and_the_index_links_only_to_pages_that_exist(home: Home) -> None:
    repo = home.add_repo("shop")
    site = home.home / "site"
    # pushed while no daemon runs: its page comes when the daemon starts
    early = home.push(repo, {".pipeline.toml": INVALID}, message="Add the pipeline\n\nWith a typo in it")
    early_id = early.run_ids[0]
    with home.daemon():
        wait_for(lambda: (site / "shop" / "runs" / f"{early_id}.html").is_file(), 30, 0.1, "the early run's page")
        late = home.push(repo, {".pipeline.toml": INVALID, "x": "1"}, message="Try again")
        late_id = late.run_ids[0]
        late_page = site / "shop" / "runs" / f"{late_id}.html"
        wait_for(late_page.is_file, 30, 0.1, "the late run's page")
        wait_for(lambda: f"runs/{late_id}.html" in (site / "index.html").read_text(), 30, 0.1, "the index")
        for page in (site / "index.html", site / "shop" / "index.html", late_page):
            assert dead_links(page) == [], page
    run = home.show(late_id)
    assert run["status"] == "failed"
    assert run["commit"] == {"author": "Test Author <author@example.com>", "message": "Try again\n"}
    assert home.show(early_id)["commit"]["message"].startswith("Add the pipeline\n")
    text = html.unescape(late_page.read_text())
    assert "Try again" in text and "Test Author" in text
    assert 'unknown key "shell"' in text  # the errors
    title = re.search(r'<span class="title">(.*?)</span>', text).group(1)
    assert title == "Try again"
    show = home.gitpipe("show", str(late_id))
    assert "commit: Try again (Test Author" in show.stdout


def test_a_listing_renders_the_pages_it_links_to_that_another_process_made(tmp_path: Path) -> None:
    """A run a hook or a command recorded, listed before the daemon heard of it, still has its page."""
    from gitpipe import api
    from gitpipe import settings as settings_mod
    from gitpipe.models import Event
    from gitpipe.queue import NewRun
    from gitpipe.report import Reporter
    from gitpipe.store import Store

    api.init_home(str(tmp_path / "home"))
    conf = settings_mod.load(tmp_path / "home")
    daemons, hooks = Store(conf), Store(conf)  # two connections, as two processes have
    daemons.add_repo("shop", "/srv/git/shop.git")
    new = NewRun(repo="shop", pipeline="shop", ref="refs/heads/main", sha="a" * 40, trigger="push",
                 pipeline_text="", commit_message="Add the pipeline\n")
    [mine] = daemons.create_runs([new])
    [theirs] = hooks.create_runs([NewRun(**{**new.__dict__, "error": ".pipeline.toml is invalid:\nx"})])
    reporter = Reporter(conf, daemons)
    reporter.on_event(Event.of_run(mine, "queued"))  # the daemon renders its own run's pages
    reporter.close()
    site = conf.site_dir
    assert (site / "shop" / "runs" / f"{theirs}.html").is_file()
    for page in (site / "index.html", site / "shop" / "index.html"):
        assert f"runs/{theirs}.html" in page.read_text()
        assert dead_links(page) == [], page
    assert [e.run_id for e in daemons.foreign_events(0)[0]] == [theirs]  # how the daemon hears of it


# ---------------------------------------------------------------------------- 3. logs --follow


def test_logs_follow_waits_on_file_events_instead_of_polling(home: Home) -> None:
    repo = home.add_repo("shop")
    with home.daemon():
        run_id = home.push_run(repo, {".pipeline.toml": pipeline("""
            [[stage]]
            name = "build"
              [[stage.action]]
              name = "slow"
              run = "echo started; sleep 9; echo done"
            """)})
        wait_for(lambda: "started" in home.logs(run_id), 30, 0.2, "the action to start")
        follower = subprocess.Popen(home.argv("logs", str(run_id), "--follow"), env=home.env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert follower.stdout is not None
            assert follower.stdout.readline().startswith("==> build/slow")  # following now
            assert "started" in follower.stdout.readline()
            before = cpu_seconds(follower.pid)
            time.sleep(5)  # a resource bound over this span, not a timing assertion
            used = cpu_seconds(follower.pid) - before
            assert used < 0.5, f"the follower used {used:.2f} s of CPU in 5 s of a sleeping action"
            out, err = follower.communicate(timeout=60)
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.wait()
        assert follower.returncode == 0, err
        assert "done" in out and err == ""


# ---------------------------------------------------------------------------- 4. show prints durations


def test_show_prints_the_durations_of_actions_and_stages(home: Home) -> None:
    repo = home.add_repo("shop")
    with home.daemon():
        run_id = home.push_run(repo, {".pipeline.toml": GOOD})
        home.expect(home.wait_run(run_id))
    out = home.gitpipe("show", str(run_id), check=True).stdout
    duration = r"\d+\.\ds"  # as `runs` writes a run's
    for stage in ("build", "test"):
        assert re.search(rf"^  stage {stage}: succeeded  {duration}$", out, re.MULTILINE), out
    for action in ("compile", "lint", "unit"):
        assert re.search(rf"^    {action}\s+succeeded  {duration}$", out, re.MULTILINE), out
    data = home.show(run_id)
    assert all(s["started_at"] and s["finished_at"] for s in data["stages"])


# ---------------------------------------------------------------------------- 5. broken pipes


def test_a_pipe_closed_early_ends_quietly_as_git_does(home: Home) -> None:
    repo = home.add_repo("shop")
    home.push(repo, {".pipeline.toml": GOOD})  # no daemon: it stays queued
    run_id = home.runs()[0]["id"]
    for args in (("runs",), ("runs", "--json"), ("show", str(run_id)), ("show", str(run_id), "--json"),
                 ("repo", "list"), ("--help",)):
        read, write = os.pipe()
        os.close(read)  # the reader is gone before the first line (`| head -0`, a closed pager)
        try:
            proc = subprocess.run(home.argv(*args), env=home.env(), stdout=write, stderr=subprocess.PIPE,
                                  text=True, timeout=60, check=False)
        finally:
            os.close(write)
        assert proc.stderr == "", (args, proc.stderr)
        # argparse's help ignores a write error itself, and exits 0
        assert proc.returncode == (0 if args == ("--help",) else 128 + signal.SIGPIPE), (args, proc.returncode)


def test_runs_into_head_ends_quietly(home: Home) -> None:
    """`gitpipe runs | head -1` with a real shell pipe."""
    repo = home.add_repo("shop")
    for i in range(3):
        home.push(repo, {".pipeline.toml": GOOD, "n": str(i)})
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", '"$@" | head -1', "sh", *home.argv("runs", "--limit", "1000")],
                          env=home.env(), capture_output=True, text=True, timeout=60, check=False)
    assert proc.stdout.startswith("#3") and proc.stdout.count("\n") == 1, proc.stdout
    assert proc.stderr == ""


# ---------------------------------------------------------------------------- 6. exec never warns


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_exec_prints_nothing_on_stderr_over_many_runs(tmp_path: Path) -> None:
    # Lines coming in while the run's end nears: the follower reads them as the run stops (it was
    # its own reads, queued as events when its observer stopped, that made watchdog complain).
    work = working_copy(tmp_path / "work", pipeline("""
        [[stage]]
        name = "build"
          [[stage.action]]
          name = "a"
          run = "for i in 1 2 3 4 5 6; do echo $i; sleep 0.05; done"
          [[stage.action]]
          name = "b"
          run = "for i in 1 2 3 4 5 6; do echo $i; sleep 0.03; done"
        [[stage]]
        name = "test"
          [[stage.action]]
          name = "c"
          run = "echo c"
        """))
    for i in range(30):  # it came about once in 10 to 15 runs
        proc = subprocess.run([GITPIPE, "exec"], cwd=work, env=base_env(GITPIPE_HOME=str(tmp_path / "none")),
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stderr == "", f"exec #{i}: {proc.stderr}"


# ---------------------------------------------------------------------------- 7. silent places


def test_a_push_without_a_pipeline_file_says_how_to_add_one(home: Home) -> None:
    repo = home.add_repo("shop")
    push = home.push(repo, {"README": "hello"})
    assert push.returncode == 0 and push.run_ids == []
    lines = push.gitpipe_lines
    assert len(lines) == 1, push.stderr
    assert re.search(r"gitpipe: no \.pipeline\.toml in main @ [0-9a-f]{7}: nothing to run", lines[0]), lines
    assert "gitpipe validate" in lines[0]
    deleted = home.delete_ref(repo, "refs/heads/main")  # a deletion runs nothing and says nothing
    assert deleted.gitpipe_lines == []
    many = home.git_push(repo, *(f"{push.sha}:refs/heads/b{i}" for i in range(9)))  # a mirror push
    assert len(many.gitpipe_lines) == 5, many.stderr
    assert many.gitpipe_lines[-1].endswith("gitpipe: and 5 more refs without .pipeline.toml")


def test_serve_says_when_it_is_ready_and_when_it_stops(home: Home) -> None:
    home.add_repo("shop")
    home.add_repo("docs")
    with home.daemon() as daemon:
        wait_for(lambda: "ready" in daemon.log, 10, 0.05, "the ready line")
    lines = [line for line in daemon.log.splitlines() if line.startswith("gitpipe:")]
    ready = [line for line in lines if "ready" in line]
    assert len(ready) == 1, daemon.log
    assert str(home.home) in ready[0] and "2 repos" in ready[0] and str(home.home / "site") in ready[0]
    assert lines[-1].startswith("gitpipe: stopped"), daemon.log


def test_a_sigterm_the_kernel_gives_to_another_thread_stops_the_daemon(home: Home) -> None:
    """The kernel may give a process's SIGTERM to any of its threads (one forking a launcher,
    say). Given to one that is not the main thread, it used not to wake the main thread's wait:
    the daemon went on, and only a second SIGTERM stopped it. Here it is sent to each other
    thread in turn (tgkill) until the daemon stops; the first must do."""
    home.add_repo("shop")
    libc = ctypes.CDLL(None, use_errno=True)
    with home.daemon() as daemon:
        wait_for(lambda: "ready" in daemon.log, 10, 0.05, "the ready line")
        tids = sorted(int(t) for t in os.listdir(f"/proc/{daemon.pid}/task") if int(t) != daemon.pid)
        assert tids, "the daemon has threads besides its main one"
        time.sleep(1)  # the start's own work done: the loop waits for the next event, untimed
        assert libc.tgkill(daemon.pid, tids[0], signal.SIGTERM) == 0, ctypes.get_errno()
        assert daemon.proc.wait(timeout=30) == 0, daemon.log
    assert daemon.log.rstrip().splitlines()[-1].startswith("gitpipe: stopped"), daemon.log



def test_a_sigterm_caught_as_the_daemon_installs_its_handler_stops_it(home: Home,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon hears SIGTERM through the signal wakeup fd (a thread reads it). A SIGTERM that
    arrived after its Python-level handler was set but before the wakeup fd was (a push test's
    SIGTERM right at a start, on the CI host) ran only that handler, which does nothing: the
    daemon went on serving until a second one. Here the signal comes the moment the handler is
    in place."""
    from gitpipe import daemon as daemon_mod
    from gitpipe import settings as settings_mod

    d = daemon_mod.Daemon(settings_mod.load(home.home))
    real = signal.signal

    def then_sigterm(sig, handler):  # type: ignore[no-untyped-def]
        before = real(sig, handler)
        if sig == signal.SIGTERM:
            os.kill(os.getpid(), signal.SIGTERM)
        return before

    monkeypatch.setattr(signal, "signal", then_sigterm)
    try:
        old = d._install_signals()
    finally:
        monkeypatch.undo()
    try:
        assert d.stopping.wait(10), "the SIGTERM was lost"
    finally:
        d._uninstall_signals(old)

# ---------------------------------------------------------------------------- 8. odd inputs


@pytest.mark.parametrize("limit", ["-5", "0", "many"])
def test_limit_must_be_a_positive_number(home: Home, limit: str) -> None:
    proc = home.gitpipe("runs", "--limit", limit)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--limit: {limit!r} is not a positive number" in proc.stderr.replace('"', "'"), proc.stderr


def test_a_home_without_init_is_refused_and_nothing_is_created(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for command in (("runs",), ("show", "1"), ("repo", "list"), ("serve",), ("report",), ("pause",),
                    ("repo", "add", str(tmp_path / "r.git"), "--create")):
        proc = subprocess.run([GITPIPE, *command, "--home", str(empty)], env=base_env(), capture_output=True,
                              text=True, timeout=60, check=False)
        one_line_error(proc, str(empty), "not a gitpipe home", "gitpipe init")
        assert list(empty.iterdir()) == [], command
    init = subprocess.run([GITPIPE, "init", "--home", str(empty)], env=base_env(), capture_output=True,
                          text=True, timeout=60, check=False)
    assert init.returncode == 0, init.stderr
    runs = subprocess.run([GITPIPE, "runs", "--home", str(empty)], env=base_env(), capture_output=True,
                          text=True, timeout=60, check=False)
    assert runs.returncode == 0 and runs.stdout.strip() == "no runs yet"


def test_init_on_a_file_says_it_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "a-file"
    path.write_text("keep me")
    proc = subprocess.run([GITPIPE, "--home", str(path), "init"], env=base_env(), capture_output=True,
                          text=True, timeout=60, check=False)
    one_line_error(proc, str(path), "is a file, not a directory")
    assert path.read_text() == "keep me"
    runs = subprocess.run([GITPIPE, "--home", str(path), "runs"], env=base_env(), capture_output=True,
                          text=True, timeout=60, check=False)
    one_line_error(runs, str(path), "is a file, not a directory")


def test_json_of_runs_is_unchanged_by_a_positive_limit(home: Home) -> None:
    repo = home.add_repo("shop")
    for i in range(3):
        home.push(repo, {".pipeline.toml": GOOD, "n": str(i)})
    proc = home.gitpipe("runs", "--json", "--limit", "2", check=True)
    assert [r["id"] for r in json.loads(proc.stdout)] == [3, 2]
