"""Tests of gitpipe.report: chart data, log excerpts, deploy data, paging, the Reporter, and
the generated pages in headless Chromium (no console errors, hostile text inert, ANSI
colours, self-refresh while a run is unfinished, screenshots in tests/screenshots/)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gitpipe import api
from gitpipe import settings as settings_mod
from gitpipe.models import (
    ActionSpec,
    ActionStatus,
    ArtifactRecord,
    Event,
    Pipeline,
    ReleaseRecord,
    RunStatus,
    StageSpec,
    TriggerSpec,
)
from gitpipe.queue import NewRun
from gitpipe.report import Reporter, charts, child, data, files, listing, logview, render, run_url
from gitpipe.settings import Settings
from gitpipe.store import Store
from tests import browser as chromium
from tests.helpers import Home, wait_for

HOSTILE = "<img src=x onerror=\"document.title='PWNED'\"><script>document.title='PWNED'</script>"
HOSTILE_BRANCH = "feature/<svg onload=document.title='PWNED'>"
HOSTILE_ACTION = "<b onmouseover=alert(1)>x"
T0 = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) - dt.timedelta(days=3)


# --------------------------------------------------------------------------- a history to render


@dataclass
class Act:
    """An action of a test run: its final status, attempts' logs and run_order."""

    name: str
    status: str = "succeeded"
    logs: list[str] = field(default_factory=lambda: ["ok"])  # one text per attempt
    run_order: int = 1
    type: str = "run"
    seconds: float = 3.0


def iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


class History:
    """A gitpipe home with runs written through the Store, as the scheduler would."""

    def __init__(self, root: Path) -> None:
        api.init_home(str(root / "home"))
        with open(root / "home" / "gitpipe.toml", "a") as f:  # the repos here are rows, not git repos
            f.write('\n[repos.shop]\nprotected = ["main"]\n')
        self.settings: Settings = settings_mod.load(root / "home")
        self.store = Store(self.settings)
        self.store.conn.execute("PRAGMA synchronous=OFF")  # test data: speed over durability
        self.clock = T0

    def add_repo(self, name: str) -> None:
        self.store.add_repo(name, f"/srv/git/{name}.git")

    def run(self, repo: str, stages: list[tuple[str, list[Act]]], status: str = "succeeded",
            ref: str = "refs/heads/main", message: str = "Fix the checkout flow", seconds: float = 60.0,
            author: str = "Alice <alice@example.com>", error: str | None = None) -> int:
        """Record one run with its stages and actions; returns its id."""
        new = NewRun(repo=repo, pipeline=repo, ref=ref, sha=uuid.uuid4().hex + "abcdefgh", trigger="push",
                     pipeline_text="", pusher="alice", error=error)
        run_id = self.store.create_runs([new])[0]
        if error or status == "queued":
            self._times(run_id, seconds, finished=bool(error), started=False)
            return run_id
        pipe = Pipeline(repo, None, TriggerSpec(), (), tuple(
            StageSpec(s, 1, tuple(ActionSpec(a.name, 1, a.type, run="true", run_order=a.run_order)
                                  for a in acts)) for s, acts in stages))
        self.store.start_run(run_id, pipe, None, author, message)
        records = self.store.actions(run_id)
        for s_idx, (_, acts) in enumerate(stages):
            self._stage(run_id, s_idx, acts, [r for r in records if r.stage_idx == s_idx])
        if status == "waiting":
            if self.store.run(run_id).status is not RunStatus.WAITING:
                self.store.set_run_waiting(run_id, True)
        elif status != "running":
            self.store.finish_run(run_id, RunStatus(status))
        self._times(run_id, seconds, finished=RunStatus(status).finished, started=True)
        return run_id

    def _stage(self, run_id: int, s_idx: int, acts: list[Act], records: list[Any]) -> None:
        if all(a.status == "pending" for a in acts):
            return
        finals = [ActionStatus(a.status) for a in acts]
        if not all(f is ActionStatus.SKIPPED for f in finals):  # one closed after a failure never ran
            self.store.set_stage(run_id, s_idx, ActionStatus.RUNNING)
        for act, rec in zip(acts, records):
            self._action(run_id, act, rec.id)
        if all(f is ActionStatus.SKIPPED for f in finals):
            self.store.set_stage(run_id, s_idx, ActionStatus.SKIPPED)
        elif all(f.finished for f in finals):
            bad = next((f for f in finals if not f.ok), None)
            self.store.set_stage(run_id, s_idx, ActionStatus.FAILED if bad else ActionStatus.SUCCEEDED)

    def _action(self, run_id: int, act: Act, action_id: int) -> None:
        final = ActionStatus(act.status)
        if act.type == "approval" and final is not ActionStatus.PENDING:
            self._approval(run_id, act, action_id, final)
            return
        if final in (ActionStatus.PENDING, ActionStatus.SKIPPED):
            if final is ActionStatus.SKIPPED:
                self.store.set_action(action_id, final, message="skipped: an earlier stage failed")
            return
        for n, text in enumerate(act.logs, 1):
            path = self.settings.logs_dir / str(run_id) / f"{action_id}-{files.segment(act.name)}.{n}.log"
            self.store.start_attempt(action_id, None, str(path), uuid.uuid4().hex)
            write_log(path, text)
            last = n == len(act.logs)
            if final is ActionStatus.RUNNING and last:
                return
            status = final if last else ActionStatus.FAILED
            self.store.finish_attempt(action_id, n, status, 0 if status.ok else 1)
        code = 0 if final.ok else 1
        self.store.set_action(action_id, final, exit_code=code,
                              message=None if final.ok else f"exit status {code}")
        self._action_times(action_id, act.seconds)

    def _approval(self, run_id: int, act: Act, action_id: int, final: ActionStatus) -> None:
        self.store.request_approval(run_id, action_id, act.name, "Ship it to production?", time.time() + 3600)
        if final is ActionStatus.WAITING:
            return
        decision = "approved" if final.ok else "rejected"
        self.store.decide(run_id, decision, "bob", "looks good" if final.ok else "not today")
        self.store.resolve_approval(run_id, action_id, final, f"{decision} by bob")

    def _times(self, run_id: int, seconds: float, finished: bool, started: bool) -> None:
        """Spread the runs over time (the store stamps 'now'; charts want real durations)."""
        self.clock += dt.timedelta(minutes=17)
        start = self.clock + dt.timedelta(seconds=2)
        self.store.conn.execute("UPDATE runs SET created_at = ?, started_at = ?, finished_at = ? WHERE id = ?", (
            iso(self.clock), iso(start) if started else None,
            iso(start + dt.timedelta(seconds=seconds)) if finished else None, run_id))

    def _action_times(self, action_id: int, seconds: float) -> None:
        start = self.clock + dt.timedelta(seconds=5)
        self.store.conn.execute("UPDATE actions SET started_at = ?, finished_at = ? WHERE id = ?",
                                (iso(start), iso(start + dt.timedelta(seconds=seconds)), action_id))

    def artifact(self, run_id: int, name: str, action: str, contents: dict[str, bytes]) -> None:
        """Store an artifact's files as gitpipe.artifacts would and record it."""
        root = self.settings.artifacts_dir / str(run_id) / name
        for rel, blob in contents.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(blob)
        size = sum(len(b) for b in contents.values())
        self.store.add_artifact(ArtifactRecord(run_id, name, action, size, "ab" * 32, str(root), len(contents)))

    def release(self, repo: str, env: str, run_id: int | None, status: str = "deployed",
                release: str | None = None, message: str | None = None) -> None:
        """Record a release row through the store, as a deploy or `gitpipe rollback` does."""
        sha = self.store.run(run_id).sha if run_id else None
        name = release or f"{run_id}-{(sha or '')[:7]}"
        self.store.add_release(repo, env, name, status, [f"ssh://deploy@{env}.example.com/srv/{repo}"],
                               run_id=run_id, sha=sha, by="alice", message=message)


def write_log(path: Path, text: str) -> None:
    """A log file as the executor writes it: a timestamp before every line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, line in enumerate(text.splitlines()):
            f.write(f"2026-11-26T10:{i // 600 % 60:02d}:{i // 10 % 60:02d}.{i % 1000:03d}Z {line}\n")


BUILD_LOG = "\n".join(["\x1b[1mCollecting\x1b[0m build", *[f"compiling module {i}" for i in range(1, 25)],
                       "\x1b[32mBuilt\x1b[0m shop-1.4.0-py3-none-any.whl"])
TEST_LOG = "\n".join([*[f"tests/test_{i}.py::test_case \x1b[32mPASSED\x1b[0m" for i in range(1, 40)],
                      "tests/test_cart.py::test_total \x1b[31mFAILED\x1b[0m",
                      "E   AssertionError: assert 2 == 3",
                      "\x1b[31m\x1b[1m==== 1 failed, 39 passed in 2.31s ====\x1b[0m"])


def full_pipeline(test_status: str = "succeeded", deploy: str = "succeeded") -> list[tuple[str, list[Act]]]:
    """build -> test (unit, lint in parallel, package after them) -> deploy."""
    unit_logs = [TEST_LOG, TEST_LOG] if test_status == "failed" else [BUILD_LOG]
    after = "skipped" if test_status == "failed" else deploy
    return [
        ("build", [Act("wheel", logs=[BUILD_LOG], seconds=41)]),
        ("test", [Act("unit", test_status, unit_logs, seconds=95), Act("lint", seconds=12),
                  Act("package", "skipped" if test_status == "failed" else "succeeded", run_order=2,
                      seconds=8)]),
        ("staging", [Act("deploy", after, run_order=1, type="deploy", seconds=30)]),
    ]


@pytest.fixture
def history(tmp_path: Path) -> Iterator[History]:
    h = History(tmp_path)
    h.add_repo("shop")
    yield h
    h.store.close()


def reporter_for(h: History) -> Reporter:
    return Reporter(h.settings, h.store)


# --------------------------------------------------------------------------- chart data


def pts(*seconds: float | None, status: str = "succeeded") -> list[charts.Point]:
    return [charts.Point(s, status, f"#{i}", f"r{i}.html", f"#{i}") for i, s in enumerate(seconds)]


def test_nice_step_is_a_round_duration() -> None:
    assert charts.nice_step(7) == 2
    assert charts.nice_step(100) == 30
    assert charts.nice_step(250) == 120
    assert charts.nice_step(3 * 3600) == 3600
    assert charts.nice_step(40 * 86400) == 10 * 86400


def test_bar_chart_scales_to_the_grid() -> None:
    chart = charts.bar_chart(pts(30, 60, 120), width=1000, height=150)
    assert [round(b.h, 1) for b in chart.bars] == [33.5, 67.0, 134.0]  # 120 s fills 16..150
    assert all(b.y + b.h == 150 for b in chart.bars)
    assert [g.text for g in chart.grid] == ["0s", "30s", "1m", "1.5m", "2m"]
    assert chart.bars[0].x < chart.bars[1].x < chart.bars[2].x  # oldest left
    assert [c.text for c in chart.captions] == ["#0", "#1", "#2"]


def test_bar_chart_without_durations_draws_stubs() -> None:
    chart = charts.bar_chart(pts(None, None, status="running"))
    assert [b.h for b in chart.bars] == [charts.STUB, charts.STUB]
    assert {b.status for b in chart.bars} == {"running"}
    assert charts.bar_chart([]).bars == ()


def test_bar_chart_captions_stay_few() -> None:
    chart = charts.bar_chart(pts(*range(1, 100)))
    assert 2 <= len(chart.captions) <= 7
    assert chart.captions[0].text == "#0" and chart.captions[-1].text == "#98"
    assert all(0 < c.x < 100 for c in chart.captions)  # percent of the width


def test_sparkline_is_right_aligned_and_shares_a_scale() -> None:
    chart = charts.sparkline(pts(10, 20), slots=30, width=150, height=32)
    assert len(chart.bars) == 2
    assert chart.bars[-1].x + chart.bars[-1].w <= 150 and chart.bars[-1].x > 140
    assert chart.bars[1].h == 30 and chart.bars[0].h == 15


def test_graph_lays_out_stages_groups_and_edges() -> None:
    a = [charts.GraphAction(i, f"action {i}", "succeeded", "1s", f"#a{i}") for i in range(4)]
    graph = charts.pipeline_graph([
        charts.GraphStage("build", "succeeded", ((a[0],),)),
        charts.GraphStage("test", "failed", ((a[1], a[2]), (a[3],))),
    ])
    xs = {n.action.id: n.x for n in graph.nodes}
    ys = {n.action.id: n.y for n in graph.nodes}
    assert xs[0] < xs[1] == xs[2] < xs[3]  # run_order 2 is a column of its own inside "test"
    assert ys[1] < ys[2]
    assert len(graph.edges) == 2 + 2  # build -> unit, lint; unit, lint -> package
    assert [c.name for c in graph.columns] == ["build", "test"]
    assert graph.columns[1].width > charts.BOX_W
    assert graph.width >= xs[3] + charts.BOX_W


def test_fit_cuts_long_labels() -> None:
    assert charts.fit("short", 100) == "short"
    cut = charts.fit("a-very-long-action-name-that-does-not-fit", 100)
    assert cut.endswith("…") and len(cut) == int(100 / charts.CHAR_W)


# --------------------------------------------------------------------------- log excerpts


def test_small_log_is_shown_whole(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    write_log(path, "one\n\x1b[31mtwo\x1b[0m\n<three>")
    ex = logview.LogReader().excerpt(path, failing=False)
    assert (ex.total, ex.shown, ex.truncated) == (3, 3, False)
    lines = ex.segments[0].lines
    assert [ln.number for ln in lines] == [1, 2, 3]
    assert str(lines[1].html) == '<span class="f1">two</span>'
    assert str(lines[2].html) == "&lt;three&gt;"


def big_log(path: Path, lines: int, error_at: int) -> None:
    with open(path, "w") as f:
        for i in range(1, lines + 1):
            text = "\x1b[31mERROR: disk full\x1b[0m" if i == error_at else f"step {i} fine, 0 errors"
            f.write(f"2026-11-26T10:22:24.123Z {text}\n")


def test_big_log_shows_tail_and_first_error(tmp_path: Path) -> None:
    path = tmp_path / "big.log"
    big_log(path, 20_000, error_at=7_000)
    ex = logview.LogReader().excerpt(path, failing=True)
    assert ex.total == 20_000 and ex.truncated
    failing, tail = ex.segments
    assert failing.failing and failing.first == 7_000 - logview.BEFORE and failing.last == 7_000 + logview.AFTER
    assert "disk full" in str(failing.lines[logview.BEFORE].html)
    assert (tail.first, tail.last) == (20_000 - logview.TAIL_LINES + 1, 20_000)
    assert "step 20000 fine" in str(tail.lines[-1].html)
    passing = logview.LogReader().excerpt(path, failing=False)
    assert len(passing.segments) == 1


def test_error_inside_the_tail_is_not_repeated(tmp_path: Path) -> None:
    path = tmp_path / "big.log"
    big_log(path, 2_000, error_at=1_990)
    ex = logview.LogReader().excerpt(path, failing=True)
    assert len(ex.segments) == 1 and ex.shown == logview.TAIL_LINES


def test_scan_resumes_when_the_log_grows(tmp_path: Path) -> None:
    path = tmp_path / "grow.log"
    reader = logview.LogReader()
    big_log(path, 1_000, error_at=0)
    assert reader.excerpt(path, failing=True).total == 1_000
    with open(path, "a") as f:
        f.write("2026-11-26T10:22:24.123Z Traceback (most recent call last):\n" + "x\n" * 999)
    ex = reader.excerpt(path, failing=True)
    assert ex.total == 2_000
    assert ex.segments[0].failing and ex.segments[0].first == 1_001 - logview.BEFORE


def test_long_lines_are_cut_on_the_page(tmp_path: Path) -> None:
    path = tmp_path / "long.log"
    path.write_text("x" * 5_000 + "\n")
    html = str(logview.LogReader().excerpt(path, failing=False).segments[0].lines[0].html)
    assert "4,000" not in html and "4000 more characters" in html
    assert html.count("x") == logview.LINE_CHARS


def test_carriage_returns_show_the_last_state(tmp_path: Path) -> None:
    assert logview.visible_text(b"2026-11-26T10:22:24.123Z 10%\r2026-11-26T10:22:25.123Z 100%\r") == "100%"


def test_missing_log(tmp_path: Path) -> None:
    assert logview.LogReader().excerpt(tmp_path / "gone.log", failing=True).missing


def test_plain_copy_keeps_stamps_and_drops_escapes(tmp_path: Path) -> None:
    src, dest = tmp_path / "a.log", tmp_path / "site" / "a.txt"
    write_log(src, "\x1b[31mred\x1b[0m\n\x1b]0;PWNED\x07title")
    logview.write_plain(src, dest)
    assert dest.read_text() == "2026-11-26T10:00:00.000Z red\n2026-11-26T10:00:00.001Z title\n"


# --------------------------------------------------------------------------- approvals and releases


def rel(release: str, status: str, run_id: int | None = 1) -> ReleaseRecord:
    return ReleaseRecord(0, "shop", "production", release, status, "2026-11-26T10:00:00.000Z", (), run_id, sha="abc",
                         by_user="alice")


def test_current_release_follows_deploys_and_rollbacks() -> None:
    assert data.current_release([]) is None
    latest = data.current_release([rel("r2", "deployed", 2), rel("r1", "deployed", 1)])
    assert latest is not None and latest.release == "r2"
    # A failed deploy rolled back: the row names the release current after it (r1, deployed by run 1).
    history = [rel("r1", "rolled-back", 3), rel("r2", "failed", 3), rel("r1", "deployed", 1)]
    current = data.current_release(history)
    assert current is not None and (current.release, current.run_id) == ("r1", 1)


def test_environments_from_the_store(history: History) -> None:
    one = history.run("shop", full_pipeline())
    two = history.run("shop", full_pipeline())
    history.release("shop", "production", one)
    history.release("shop", "staging", one)
    history.release("shop", "production", two, "rolled-back", release=f"{one}-x", message="healthcheck failed")
    envs = data.environments(history.store, "shop")
    assert [e.name for e in envs] == ["staging", "production"]
    prod = envs[1]
    assert prod.switched is not None and prod.switched.status == "rolled-back"
    assert [r.status for r in prod.history] == ["rolled-back", "deployed"]
    assert prod.history[1].targets == ("ssh://deploy@production.example.com/srv/shop",)


# --------------------------------------------------------------------------- pages and paging


def test_paging_keeps_archived_pages_stable(history: History) -> None:
    p = files.PAGE_SIZE
    assert [listing.archived(n) for n in (0, p - 1, p, 2 * p - 1, 2 * p, 5 * p + 3)] == [0, 0, 0, 0, 1, 4]
    links = listing.pager("shop", 9)
    assert [x.label for x in links] == ["1", "2", "3", "4", "…", "8", "9", "10"]
    assert links[1].href == "shop/page-9.html" and links[-1].href == "shop/page-1.html"


def test_on_event_renders_only_what_changed(history: History) -> None:
    rep = reporter_for(history)
    ids = [history.run("shop", [("build", [Act("wheel")])]) for _ in range(2 * files.PAGE_SIZE + 1)]
    rep.render_all()
    site = history.settings.site_dir
    archived = site / "shop" / "page-1.html"
    assert archived.exists() and not (site / "shop" / "page-2.html").exists()
    before = {p: p.stat().st_mtime_ns for p in site.rglob("*.html")}
    time.sleep(0.01)
    new = history.run("shop", [("build", [Act("wheel")])])
    rep.on_event(Event.of_run(new, "succeeded"))
    changed = {p.relative_to(site).as_posix() for p in site.rglob("*.html") if before.get(p) != p.stat().st_mtime_ns}
    assert changed == {"index.html", "shop/index.html", f"shop/runs/{new}.html"}
    rep.on_event(Event.of_run(ids[0], "succeeded"))  # a run of an archived page: that page too
    assert archived.stat().st_mtime_ns != before[archived]
    assert not list(site.rglob(".*.tmp"))  # atomic writes leave no temporary files
    rep.close()


def test_an_action_changes_its_run_page_and_not_the_listings(history: History) -> None:
    rep = reporter_for(history)
    run_id = history.run("shop", [("build", [Act("wheel"), Act("lint", "failed")])], "running")
    rep.on_event(Event.of_run(run_id, "running"))
    site = history.settings.site_dir
    page, listings = site / "shop" / "runs" / f"{run_id}.html", [site / "index.html", site / "shop" / "index.html"]
    before = {p: p.stat().st_ino for p in [page, *listings]}  # each write renames a new file in
    wheel, lint = history.store.actions(run_id)
    rep.on_event(Event.of_action(run_id, wheel.id, "succeeded"))
    assert page.stat().st_ino != before[page]
    assert [p.stat().st_ino for p in listings] == [before[p] for p in listings]
    rep.on_event(Event.of_action(run_id, lint.id, "failed"))  # the listings count allowed failures
    assert all(p.stat().st_ino != before[p] for p in listings)
    rep.close()


def test_the_daemon_renders_in_a_child_that_ends_when_quiet(history: History,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(child, "QUIET", 0.2)
    sender = child.ChildReporter(history.settings, history.store)
    history.store.listeners.append(sender.on_event)
    first = history.run("shop", [("build", [Act("wheel")])])  # its events go down the pipe
    page = history.settings.site_dir / "shop" / "runs" / f"{first}.html"
    wait_for(page.exists, 60, what="the run page, rendered by the child")
    proc = sender._child or sender._ending
    assert proc is not None and proc.args[1:3] == ["-m", "gitpipe.report.child"]
    own = os.getpriority(os.PRIO_PROCESS, 0)
    try:  # pages are background work: the child renders below the daemon's CPU priority
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == min(own + child.NICENESS, 19)
    except ProcessLookupError:  # ended already (quiet): nothing left to look at
        pass
    wait_for(lambda: proc.poll() is not None, 60, what="the child to end once quiet")
    assert proc.returncode == 0 and sender._child is None
    assert (history.settings.home / child.COMPILED).is_dir()  # the templates, compiled once
    second = history.run("shop", [("build", [Act("wheel", "failed")])], "failed")  # a new child
    index = history.settings.site_dir / "shop" / "index.html"
    wait_for(lambda: f"runs/{second}.html" in index.read_text(), 60, what="the repo page to list the new run")
    sender.close()
    assert sender._child is None and all(p.poll() is not None for p in [proc])


def test_the_rendering_child_yields_to_the_actions_too_not_only_to_the_daemon(history: History) -> None:
    # An action runs in a session of its own (bwrap --new-session); with the kernel's autogroup
    # scheduling each session is weighed as one, so a nice value set inside the daemon's session
    # ranked the child below the daemon's threads only, never below the push's first command.
    sender = child.ChildReporter(history.settings, history.store)
    history.store.listeners.append(sender.on_event)
    run_id = history.run("shop", [("build", [Act("wheel")])])
    page = history.settings.site_dir / "shop" / "runs" / f"{run_id}.html"
    wait_for(page.exists, 60, what="the run page, rendered by the child")
    proc = sender._child
    assert proc is not None and proc.poll() is None  # QUIET is 10 s: still there
    assert os.getsid(proc.pid) == proc.pid != os.getsid(0)
    group = Path(f"/proc/{proc.pid}/autogroup")
    if group.is_file():  # (a daemon not root may wait for the kernel's once-per-0.1 s write: tried again)
        wait_for(lambda: group.read_text().split()[-2:] == ["nice", str(child.NICENESS)], 15,
                 what="the child's session group at the child's niceness")
        # (empty for a process in the kernel's root group, which a session started at boot keeps)
        assert group.read_text().split()[0] != (Path("/proc/self/autogroup").read_text().split() or ["root"])[0]
    sender.close()


def test_the_rendering_child_lowers_its_group_though_the_kernel_says_try_again_later() -> None:
    # Without CAP_SYS_ADMIN the kernel takes one autogroup niceness write per 0.1 s from the
    # whole host (EAGAIN), and an action (in a session of its own) can keep writing its own:
    # a daemon not root writes again in the background until it passes, never staying alone
    # in its group at full weight. As the tests' unprivileged daemon user, right after another
    # session's write.
    if not Path("/proc/self/autogroup").is_file():
        pytest.fail("this kernel has no autogroup scheduling: the test needs it")  # Debian's has
    from test_sandbox import as_user, daemon_account, user_gitpipe

    drop = as_user(*daemon_account()) if os.geteuid() == 0 else []
    python = Path(user_gitpipe(*daemon_account())).read_text().splitlines()[0][2:] if drop else sys.executable
    script = (
        "import os, subprocess, sys, time\n"
        "from gitpipe.report import child\n"
        "arm = \"import os; os.setsid(); open('/proc/self/autogroup', 'w').write('3')\"\n"
        "subprocess.run([sys.executable, '-c', arm], check=True)\n"
        "child._below_the_runs(child.NICENESS)\n"
        "first = open('/proc/self/autogroup').read().split()[-1]\n"
        "deadline = time.monotonic() + 10\n"
        "while open('/proc/self/autogroup').read().split()[-1] != str(child.NICENESS):\n"
        "    if time.monotonic() > deadline:\n"
        "        sys.exit('still at group niceness ' + open('/proc/self/autogroup').read())\n"
        "    time.sleep(0.05)\n"
        "print('first', first, 'session', os.getsid(0) == os.getpid())\n")
    done = subprocess.run([*drop, python, "-c", script], capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "True", done.stdout  # a session (and so a group) of its own


def test_a_killed_rendering_child_is_started_again(history: History) -> None:
    sender = child.ChildReporter(history.settings, history.store)
    history.store.listeners.append(sender.on_event)
    first = history.run("shop", [("build", [Act("wheel")])])
    wait_for((history.settings.site_dir / "shop" / "runs" / f"{first}.html").exists, 60, what="the first run page")
    proc = sender._child
    assert proc is not None
    proc.kill()
    proc.wait()
    second = history.run("shop", [("build", [Act("wheel")])])
    wait_for((history.settings.site_dir / "shop" / "runs" / f"{second}.html").exists, 60, what="the second run page")
    assert sender._child is not None and sender._child.pid != proc.pid
    sender.close()


BURST_DAEMON = """
import json, sys
from gitpipe import settings
from gitpipe.daemon import Daemon
Daemon(settings.load(sys.argv[1]), burst=True).serve()
print(json.dumps(sorted(m for m in ("jinja2", "_hashlib") if m in sys.modules)))
"""


def test_a_daemon_that_ran_a_pipeline_holds_no_jinja2(home: Home) -> None:
    """The pages of the run are there when the daemon stops, rendered by its child process."""
    repo = home.add_repo("app")
    home.push(repo, {".pipeline.toml": '[[stage]]\nname = "s"\n  [[stage.action]]\n  name = "a"\n  run = "true"\n'})
    out = subprocess.run([sys.executable, "-c", BURST_DAEMON, str(home.home)], env=home.env(),
                         capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    [run] = home.runs()
    assert run["status"] == "succeeded"
    page = home.home / "site" / "app" / "runs" / f"{run['id']}.html"
    assert "succeeded" in page.read_text() and f"runs/{run['id']}.html" in (home.home / "site" / "index.html").read_text()


def test_a_filling_block_becomes_an_archived_page(history: History) -> None:
    rep = reporter_for(history)
    for _ in range(2 * files.PAGE_SIZE - 1):
        history.run("shop", [("build", [Act("wheel")])])
    rep.render_all()
    site = history.settings.site_dir / "shop"
    assert not (site / "page-1.html").exists()
    new = history.run("shop", [("build", [Act("wheel")])])
    rep.on_event(Event.of_run(new, "queued"))
    assert (site / "page-1.html").exists()
    html = (site / "index.html").read_text()
    assert html.count('class="id"') == files.PAGE_SIZE
    rep.close()


def test_render_all_counts_pages_and_run_url(history: History) -> None:
    history.run("shop", full_pipeline())
    history.run("shop", full_pipeline("failed"), "failed")
    rep = reporter_for(history)
    assert rep.render_all() == 1 + 1 + 2  # top index, repo index, two runs
    assert run_url(history.settings, "shop", 2) == "shop/runs/2.html"
    assert (history.settings.site_dir / "site.css").exists() and (history.settings.site_dir / "site.js").exists()
    assert not (history.settings.site_dir / "shop" / "environments.html").exists()  # no deploys yet
    rep.close()


def test_environments_page_after_a_deploy_event(history: History) -> None:
    rep = reporter_for(history)
    history.store.listeners.append(rep.on_event)
    run_id = history.run("shop", full_pipeline())
    history.release("shop", "staging", run_id)  # sends a release:staging event
    page = history.settings.site_dir / "shop" / "environments.html"
    assert page.exists() and f"{run_id}-" in page.read_text()
    page.unlink()
    history.release("shop", "staging", None, "rolled-back", release="1-x")  # `gitpipe rollback`: run id 0
    assert page.exists()
    rep.close()


def test_pages_escape_hostile_text(history: History) -> None:
    run_id = hostile_run(history)
    rep = reporter_for(history)
    rep.render_all()
    for rel_path in ("index.html", "shop/index.html", f"shop/runs/{run_id}.html"):
        html = (history.settings.site_dir / rel_path).read_text()
        assert "<script>document" not in html and "<img src=x" not in html and "<svg onload" not in html
        assert "&lt;script&gt;" in html
        assert "\x1b" not in html
    rep.close()


def test_pages_carry_no_raw_escape_from_pushed_data(history: History) -> None:
    """Commit text, outputs, errors, approval messages, deploy messages: escapes never reach a page."""
    bad = "\x1b]52;c;cHduZWQ=\x07\x1b]0;PWNED\x07\x1b[2J\x9b2J\u202e\x01"
    run_id = history.run("shop", [("build", [Act("wheel"), Act("gate", "waiting", type="approval")])], "waiting",
                         message=f"fix {bad} it\n\nbody {bad}", author=f"Mal{bad}lory <m@example.org>")
    history.store.set_outputs(run_id, "wheel", {"NOTE": f"before {bad} after"})
    history.store.conn.execute("UPDATE approvals SET message = ?", (f"ship {bad}?",))
    history.release("shop", "prod", run_id, message=f"remote said {bad}", release=f"1-abc{bad}")
    failed = history.run("shop", [], "failed", error=f".pipeline.toml is invalid:\nname {bad}")
    rep = reporter_for(history)
    rep.render_all()
    rep.render_run(failed)
    pages = sorted(history.settings.site_dir.rglob("*.html"))
    assert len(pages) >= 4
    for page in pages:
        text = page.read_text()
        raw = re.findall(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]", text)
        assert raw == [], (page, raw)
    html = (history.settings.site_dir / "shop" / "runs" / f"{run_id}.html").read_text()
    assert "before 2J after" in html and "Mal2Jlory" in html and "ship 2J?" in html
    rep.close()


def hostile_run(history: History) -> int:
    log = f"{HOSTILE}\n\x1b]0;PWNED\x07title change\n\x1b[31mred text\x1b[0m\n\x1b[2J\x1b[Hcursor"
    return history.run("shop", [("build", [Act(HOSTILE_ACTION, "failed", [log])])], "failed",
                       ref="refs/heads/" + HOSTILE_BRANCH, message=f"{HOSTILE}\n\nbody {HOSTILE}")


def test_run_page_of_a_huge_log_stays_small(history: History) -> None:
    run_id = history.run("shop", [("build", [Act("huge", "failed", ["x"])])], "failed")
    att = history.store.attempts(history.store.actions(run_id)[0].id)[0]
    big_log(Path(att.log_path), 200_000, error_at=120_000)
    assert Path(att.log_path).stat().st_size > 9_000_000
    rep = reporter_for(history)
    started = time.perf_counter()
    page = rep.render_run(run_id)
    took = time.perf_counter() - started
    assert page.stat().st_size < 1_000_000, page.stat().st_size
    assert took < 5, took
    html = page.read_text()
    assert "showing 541 of 200,000 lines" in html and "disk full" in html
    assert list((page.parent / str(run_id) / "logs").glob("*.txt"))
    rep.close()


def test_artifacts_are_published_into_the_site(history: History) -> None:
    run_id = history.run("shop", full_pipeline())
    history.artifact(run_id, "wheel", "wheel", {"dist/shop-1.0.whl": b"wheel bytes"})
    history.artifact(run_id, "site", "package", {"build/site/index.html": b"<h1>", "build/site/a.js": b"js"})
    page = reporter_for(history).render_run(run_id)
    folder = page.parent / str(run_id) / "artifacts"
    assert (folder / "wheel" / "dist" / "shop-1.0.whl").read_bytes() == b"wheel bytes"
    assert (folder / "site.zip").exists()
    html = page.read_text()
    assert f'href="{run_id}/artifacts/wheel/dist/shop-1.0.whl"' in html and f'href="{run_id}/artifacts/site.zip"' in html


def test_artifacts_of_unprotected_refs_are_kept_but_not_published(history: History) -> None:
    """A feature branch's artifact may hold anything (a secret, a setuid file): off the site by default."""
    run_id = history.run("shop", full_pipeline(), ref="refs/heads/feature")
    history.artifact(run_id, "wheel", "wheel", {"dist/shop-1.0.whl": b"wheel bytes"})
    page = reporter_for(history).render_run(run_id)
    assert not (page.parent / str(run_id) / "artifacts").exists()
    html = page.read_text()
    assert "shop-1.0.whl" not in html and "kept, not published: feature is not a protected ref" in html
    for policy, published in (("all", True), ("none", False)):
        rep = Reporter(dataclasses.replace(history.settings, publish_artifacts=policy), history.store)
        page = rep.render_run(run_id)
        assert (page.parent / str(run_id) / "artifacts").exists() == published, policy


def test_pruned_run_drops_its_published_files(history: History) -> None:
    run_id = history.run("shop", full_pipeline())
    history.artifact(run_id, "wheel", "wheel", {"shop.whl": b"wheel"})
    rep = reporter_for(history)
    folder = rep.render_run(run_id).parent / str(run_id)
    assert (folder / "artifacts" / "wheel" / "shop.whl").exists()
    history.store.mark_pruned(run_id)
    rep.render_run(run_id)
    assert not folder.exists()
    assert "were removed" in (folder.parent / f"{run_id}.html").read_text()


def test_a_failing_render_never_breaks_the_caller(history: History, caplog: pytest.LogCaptureFixture) -> None:
    rep = reporter_for(history)
    rep.on_event(Event.of_run(424242, "succeeded"))  # no such run: nothing to render, no exception
    rep.site = Path("/proc/no-such-dir")  # unwritable
    run_id = history.run("shop", full_pipeline())
    rep.on_event(Event.of_run(run_id, "succeeded"))
    assert "could not render" in caplog.text


def test_live_thread_rerenders_growing_logs(history: History, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gitpipe.report.reporter.LIVE_INTERVAL", 0.05)
    run_id = history.run("shop", [("build", [Act("wheel", "running", ["first line"])])], "running")
    rep = reporter_for(history)
    rep.on_event(Event.of_run(run_id, "running"))
    page = history.settings.site_dir / "shop" / "runs" / f"{run_id}.html"
    att = history.store.attempts(history.store.actions(run_id)[0].id)[0]
    with open(att.log_path, "a") as f:
        f.write("2026-11-26T10:22:24.123Z second line\n")
    deadline = time.time() + 5
    while "second line" not in page.read_text() and time.time() < deadline:
        time.sleep(0.02)
    assert "second line" in page.read_text()
    rep.close()


# --------------------------------------------------------------------------- in a real browser


@dataclass
class Site:
    root: Path
    pages: dict[str, str]  # kind -> path relative to the site root
    hostile: int
    failed: int

    def url(self, kind: str, fragment: str = "") -> str:
        return (self.root / self.pages[kind]).as_uri() + fragment


def build_site(h: History) -> Site:
    """A site with every page type: passing, failing, hostile, waiting and running runs, deploys."""
    h.add_repo("docs")
    runs = [h.run("shop", full_pipeline(), seconds=150 + 13 * (i % 7)) for i in range(14)]
    failed = h.run("shop", full_pipeline("failed"), "failed", message="Make the cart total exact\n\nCloses #12")
    h.artifact(runs[-1], "wheel", "wheel", {"dist/shop-1.4.0-py3-none-any.whl": b"PK" * 40_000})
    h.artifact(runs[-1], "site", "package", {"build/site/index.html": b"<h1>shop</h1>", "build/site/app.js": b"1"})
    h.release("shop", "staging", runs[-2])
    h.release("shop", "production", runs[-3])
    h.release("shop", "staging", runs[-1])
    h.release("shop", "production", runs[-1], "rolled-back", release=f"{runs[-3]}-{h.store.run(runs[-3]).sha[:7]}",
              message="healthcheck failed on web2; rolled back")
    hostile = hostile_run(h)
    production = [("production", [Act("sign-off", "waiting", [], type="approval"),
                                  Act("deploy", "pending", [], run_order=2, type="deploy")])]
    waiting = h.run("shop", full_pipeline()[:2] + production, "waiting", message="Release 1.4")
    for i in range(6):
        h.run("docs", [("build", [Act("mkdocs", logs=[BUILD_LOG])])], "failed" if i == 3 else "succeeded",
              seconds=30 + i, message="Docs: explain environments")
    rep = reporter_for(h)
    rep.render_all()
    rep.close()
    pages = {"index": "index.html", "repo": "shop/index.html", "run": f"shop/runs/{runs[-1]}.html",
             "failed": f"shop/runs/{failed}.html", "hostile": f"shop/runs/{hostile}.html",
             "waiting": f"shop/runs/{waiting}.html", "environments": "shop/environments.html"}
    return Site(h.settings.site_dir, pages, hostile, failed)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    h = History(tmp_path_factory.mktemp("site"))
    h.add_repo("shop")
    yield build_site(h)
    h.store.close()


@pytest.fixture(scope="module")
def chrome() -> Iterator[Any]:
    with chromium.browser() as b:
        yield b


KINDS = ["index", "repo", "run", "failed", "hostile", "waiting", "environments"]


@pytest.fixture(scope="module")
def tab(chrome: Any) -> Iterator[chromium.Tab]:
    t = chromium.Tab(chrome)
    yield t
    t.close()


@pytest.mark.parametrize("kind", KINDS)
def test_page_loads_cleanly_everywhere(tab: chromium.Tab, site: Site, kind: str) -> None:
    for view, viewport, dark in (("desktop", chromium.DESKTOP, False), ("phone", chromium.PHONE, False),
                                 ("dark", chromium.DESKTOP, True)):
        page = tab.visit(site.url(kind), viewport, dark)
        assert tab.console.problems() == [], f"{kind} ({view}): {tab.console.problems()}"
        assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"], \
            f"{kind} ({view}) is wider than the screen"
        chromium.screenshot(page, f"{kind}-{view}", full=view == "desktop")


def test_dark_theme_follows_the_browser(chrome: Any, site: Site) -> None:
    colours = []
    for dark in (False, True):
        page, _ = chromium.open_page(chrome, site.url("run"), dark=dark)
        colours.append(page.evaluate("getComputedStyle(document.body).backgroundColor"))
        page.close()
    light, dark_bg = (rgb(c) for c in colours)
    assert sum(light) > 600 and sum(dark_bg) < 100


def rgb(css: str) -> tuple[int, int, int]:
    r, g, b = (int(x) for x in re.findall(r"\d+", css)[:3])
    return r, g, b


@pytest.mark.parametrize("kind", ["hostile", "index", "repo"])
def test_hostile_text_never_runs(chrome: Any, site: Site, kind: str) -> None:
    page, console = chromium.open_page(chrome, site.url(kind))
    page.wait_for_timeout(100)
    assert page.title().endswith(" · gitpipe") and page.title() != "PWNED"
    assert page.evaluate("document.querySelectorAll('script').length") == 1  # site.js only
    injected = page.evaluate("""[...document.querySelectorAll('*')].filter(
        e => [...e.attributes].some(a => a.name.startsWith('on'))).length""")
    assert injected == 0
    assert page.evaluate("document.querySelectorAll('img, main svg[onload], b[onmouseover]').length") == 0
    body = page.inner_text("body")
    assert "<script>document.title='PWNED'</script>" in body  # shown as text
    if kind == "hostile":
        assert HOSTILE_BRANCH in body and HOSTILE_ACTION in body
        assert "title change" in body and "\x1b" not in body
    assert console.problems() == []
    page.close()


def test_ansi_red_renders_red(chrome: Any, site: Site) -> None:
    page, _ = chromium.open_page(chrome, site.url("hostile"))
    span = page.locator(".log span", has_text="red text").first
    r, g, b = rgb(span.evaluate("e => getComputedStyle(e).color"))
    assert r > 200 and g < 150 and b < 150, (r, g, b)
    page.close()


def test_a_linked_log_line_opens_and_shows(chrome: Any, site: Site, history: History) -> None:
    page, _ = chromium.open_page(chrome, site.url("failed"))
    line = page.locator(".job:not([open]) .log > div").first  # a passing action's log is folded
    anchor = line.get_attribute("id")
    page.close()
    page, _ = chromium.open_page(chrome, site.url("failed", f"#{anchor}"))
    assert page.evaluate("document.querySelector(':target').id") == anchor
    assert page.evaluate("document.querySelector(':target').closest('details').open")
    assert rgb(page.evaluate("getComputedStyle(document.querySelector(':target')).backgroundColor")) != (0, 0, 0)
    page.close()


def test_running_page_refreshes_until_the_run_ends(chrome: Any, history: History,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render, "REFRESH", 1)
    run_id = history.run("shop", [("build", [Act("wheel", "running", ["compiling"])])], "running")
    rep = reporter_for(history)
    history.store.listeners.append(rep.on_event)
    rep.on_event(Event.of_run(run_id, "running"))
    url = (history.settings.site_dir / run_url(history.settings, "shop", run_id)).as_uri()
    page, console = chromium.open_page(chrome, url)
    loads: list[float] = []
    page.on("load", lambda: loads.append(time.monotonic()))
    page.wait_for_timeout(1_600)
    assert len(loads) >= 1, "the page of a running run did not reload"
    action = history.store.actions(run_id)[0]
    history.store.finish_attempt(action.id, 1, ActionStatus.SUCCEEDED, 0)
    history.store.set_action(action.id, ActionStatus.SUCCEEDED, exit_code=0)
    history.store.set_stage(run_id, 0, ActionStatus.SUCCEEDED)
    history.store.finish_run(run_id, RunStatus.SUCCEEDED)
    deadline = time.monotonic() + 5
    while "succeeded" not in (page.text_content(".runhead .badge") or "") and time.monotonic() < deadline:
        page.wait_for_timeout(100)  # (wait_for_function would need 'unsafe-eval', which the CSP forbids)
    assert "succeeded" in (page.text_content(".runhead .badge") or "")
    settled = len(loads)
    page.wait_for_timeout(1_600)
    assert len(loads) == settled, "the page of a finished run still reloads"
    assert page.evaluate("document.querySelector('meta[http-equiv=refresh]')") is None
    assert console.problems() == []
    page.close()
    rep.close()


def test_the_duration_axis_labels_never_cover_a_bar(chrome: Any, tmp_path: Path) -> None:
    """Issue 13, rough edge 9: the "2s" label sat on the first bar. Every label of the chart, the
    durations on its axis and the run numbers under it, stays clear of every bar, on a desktop
    and on a phone; screenshots of the chart in tests/screenshots/chart-axis-*.png."""
    h = History(tmp_path)
    h.add_repo("shop")
    for seconds in (7.5, 3.0, 6.0, 8.0, 2.5, 5.0, 7.0):  # axis 0s-8s by 2s; the first bar crosses "2s"
        h.run("shop", [("build", [Act("a", seconds=1.0)])], seconds=seconds)
    rep = reporter_for(h)
    rep.render_all()
    rep.close()
    url = (h.settings.site_dir / "shop" / "index.html").as_uri()
    for view, viewport in (("desktop", chromium.DESKTOP), ("phone", chromium.PHONE)):
        page, console = chromium.open_page(chrome, url, viewport)
        found = page.evaluate("""() => {
            const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
            return {labels: [...document.querySelectorAll('.chart text.axis')].map(e => [e.textContent, box(e)]),
                    bars: [...document.querySelectorAll('.chart rect.bar')].map(box)}; }""")
        page.locator(".chart").screenshot(path=str(chromium.SCREENSHOTS / f"chart-axis-{view}.png"))
        assert console.problems() == []
        texts = [text for text, _ in found["labels"]]
        assert "2s" in texts and "8s" in texts and len(found["bars"]) == 7, texts
        covered = [(text, bar) for text, label in found["labels"] for bar in found["bars"]
                   if label[0] < bar[2] and bar[0] < label[2] and label[1] < bar[3] and bar[1] < label[3]]
        assert covered == [], f"{view}: labels on bars: {covered}"
        page.close()
