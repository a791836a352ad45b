"""Report site benchmarks (issue: the static report site). Prints comparison tables.

    python bench/bench_report.py            # everything (a few minutes)
    python bench/bench_report.py update     # one part: update | full | biglog | events | child

- update: the site's update after one more run finishes (Reporter.on_event of the final
          event: its run page, the repo index, the top index, an archived page when a
          block fills), with 10,000 runs in the history vs 100; median of 20 runs.
          Goal: ratio at most 1.5.
- full:   `gitpipe report` (Reporter.render_all) of a 10,000-run history, per 1,000 runs.
- biglog: the run page of an action whose log has 200,000 lines (about 20 MB): page size
          (goal: under 1 MB) and render time, first and again.
- events: what the events of one run of 20 one-action stages cost the report (issue 11), each
          event rendered as it comes (no coalescing: the daemon's window only lowers this):
          CPU ms and pages written per action.
- child:  the daemon's rendering process (report.child): from the first event of a quiet
          daemon to its run page on disk, and the child's CPU for that run, median of 5 (each
          a new child); beside it the same run rendered in this process once warm.

The histories are written straight into the database (one transaction, like many runs
of a four-action pipeline had passed), each attempt with a 30-line log file.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import sys
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import median, ms, table, timed  # noqa: E402

from gitpipe import api  # noqa: E402
from gitpipe import settings as settings_mod
from gitpipe.models import ActionSpec, ActionStatus, Event, Pipeline, RunStatus, StageSpec, TriggerSpec  # noqa: E402
from gitpipe.queue import NewRun  # noqa: E402
from gitpipe.report import Reporter, files  # noqa: E402
from gitpipe.store import Store  # noqa: E402

REPEAT = 20
STAGES = (("build", ("wheel",)), ("test", ("unit", "lint")), ("deploy", ("staging",)))
LOG = "".join(f"2026-11-26T10:22:{i % 60:02d}.000Z \x1b[32mok\x1b[0m step {i} of the action\n" for i in range(30))


def iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def home(root: Path) -> tuple[settings_mod.Settings, Store]:
    api.init_home(str(root / "home"))
    conf = settings_mod.load(root / "home")
    store = Store(conf)
    store.conn.execute("PRAGMA synchronous=OFF")  # bench data: speed over durability
    store.add_repo("shop", "/srv/git/shop.git")
    return conf, store


def fill(conf: settings_mod.Settings, store: Store, runs: int) -> None:
    """`runs` finished runs of STAGES in one transaction, a log file per attempt."""
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    conn = store.conn
    conn.execute("BEGIN")
    for n in range(runs):
        start = t0 + dt.timedelta(minutes=10 * n)
        end = start + dt.timedelta(seconds=120 + n % 90)
        status = "failed" if n % 9 == 0 else "succeeded"
        cur = conn.execute(
            "INSERT INTO runs (repo, pipeline, ref, sha, status, trigger, pusher, created_at, started_at,"
            " finished_at, commit_author, commit_message) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            ("shop", "shop", "refs/heads/main", uuid.uuid4().hex, status, "push", "alice", iso(start), iso(start),
             iso(end), "Alice <alice@example.com>", f"Change {n}"))
        _stages(conf, conn, int(cur.lastrowid or 0), iso(start), iso(end))
    conn.execute("COMMIT")


def _stages(conf: settings_mod.Settings, conn: sqlite3.Connection, run_id: int, start: str, end: str) -> None:
    logs = conf.logs_dir / str(run_id)
    logs.mkdir(parents=True, exist_ok=True)
    for s_idx, (stage, actions) in enumerate(STAGES):
        conn.execute("INSERT INTO stages VALUES (?,?,?,?,?,?)", (run_id, s_idx, stage, "succeeded", start, end))
        for a_idx, name in enumerate(actions):
            cur = conn.execute(
                "INSERT INTO actions (run_id, stage_idx, idx, stage, name, type, run_order, status, exit_code,"
                " started_at, finished_at, attempts) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, s_idx, a_idx, stage, name, "run", 1, "succeeded", 0, start, end, 1))
            path = logs / f"{cur.lastrowid}-{name}.1.log"
            path.write_text(LOG)
            conn.execute("INSERT INTO attempts (action_id, number, status, exit_code, started_at, finished_at,"
                         " log_path, token) VALUES (?,?,?,?,?,?,?,?)",
                         (cur.lastrowid, 1, "succeeded", 0, start, end, str(path), "t"))


def one_more_run(conf: settings_mod.Settings, store: Store, big: str | None = None) -> int:
    """A run through the store's own transitions, as the scheduler makes it; returns its id."""
    run_id = store.create_runs([NewRun("shop", "shop", "refs/heads/main", uuid.uuid4().hex, "push", "")])[0]
    pipe = Pipeline("shop", None, TriggerSpec(), (), tuple(
        StageSpec(stage, 1, tuple(ActionSpec(a, 1, run="true") for a in actions)) for stage, actions in STAGES))
    store.start_run(run_id, pipe, None, "Alice <alice@example.com>", "One more change")
    for s_idx, _ in enumerate(STAGES):
        store.set_stage(run_id, s_idx, ActionStatus.RUNNING)
        for act in store.actions_of_stage(run_id, s_idx):
            path = conf.logs_dir / str(run_id) / f"{act.id}-{act.name}.1.log"
            path.parent.mkdir(parents=True, exist_ok=True)
            store.start_attempt(act.id, None, str(path), "t")
            path.write_text(big if big and act.name == "unit" else LOG)
            store.finish_attempt(act.id, 1, ActionStatus.SUCCEEDED, 0)
            store.set_action(act.id, ActionStatus.SUCCEEDED, exit_code=0)
        store.set_stage(run_id, s_idx, ActionStatus.SUCCEEDED)
    store.finish_run(run_id, RunStatus.SUCCEEDED)
    return run_id


class Bench:
    """A home with a history of `runs` runs and a Reporter over it."""

    def __init__(self, root: Path, runs: int) -> None:
        self.conf, self.store = home(root)
        fill(self.conf, self.store, runs)
        self.reporter = Reporter(self.conf, self.store)

    def updates(self) -> list[float]:
        """Seconds of the site's update after each of REPEAT more runs finishes."""
        out = []
        for _ in range(REPEAT):
            event = Event(one_more_run(self.conf, self.store), "run", "succeeded")
            out.append(timed(partial(self.reporter.on_event, event)))
        return out

    def close(self) -> None:
        self.reporter.close()
        self.store.close()


def bench_update_and_full(parts: set[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        big = Bench(Path(tmp) / "big", 10_000)
        first = timed(big.reporter.render_all)  # also what a daemon's site holds before the next run
        again = timed(big.reporter.render_all) if "full" in parts else 0.0
        pages = sum(1 for _ in big.conf.site_dir.rglob("*.html"))
        slow = median(big.updates()) if "update" in parts else 0.0
        big.close()
        if "update" in parts:
            small = Bench(Path(tmp) / "small", 100)
            small.reporter.render_all()
            fast = median(small.updates())
            small.close()
            table(f"site update after one more run finishes (median of {REPEAT})", [
                ("100 runs in the history", ms(fast), "", ""),
                ("10,000 runs in the history", ms(slow), ms(fast), f"{slow / fast:.2f} (goal <= 1.5)"),
            ])
    if "full" in parts:
        table(f"gitpipe report of 10,000 runs ({pages} pages)", [
            ("per 1,000 runs, first time", ms(first / 10), "", ""),
            ("per 1,000 runs, again", ms(again / 10), "", ""),
        ])


def bench_biglog() -> None:
    lines = "".join(f"2026-11-26T10:22:24.123Z compiling unit {i:06d} of the big project with flags -O2 -g\n"
                    for i in range(200_000))
    with tempfile.TemporaryDirectory() as tmp:
        conf, store = home(Path(tmp))
        run_id = one_more_run(conf, store, lines)
        reporter = Reporter(conf, store)
        first = timed(lambda: reporter.render_run(run_id))
        started = time.perf_counter()
        page = reporter.render_run(run_id)
        again = time.perf_counter() - started
        size = page.stat().st_size
        reporter.close()
        store.close()
    table(f"run page of a run whose action \"unit\" logged 200,000 lines ({len(lines) / 1e6:.1f} MB)", [
              ("page size", f"{size / 1024:.0f} KB", "1024 KB (goal)", f"{size / 1024 / 1024:.2f}"),
              ("render, first (plain-text copies written)", ms(first), "", ""),
              ("render, again", ms(again), "", ""),
          ])


ACTIONS = 20


def twenty_actions(conf: settings_mod.Settings, store: Store) -> int:
    """A run of ACTIONS one-action stages through the store's transitions (each sends its events)."""
    run_id = store.create_runs([NewRun("shop", "shop", "refs/heads/main", uuid.uuid4().hex, "push", "")])[0]
    pipe = Pipeline("shop", None, TriggerSpec(), (), tuple(
        StageSpec(f"s{k}", 1, (ActionSpec(f"a{k}", 1, run="true"),)) for k in range(ACTIONS)))
    store.start_run(run_id, pipe, None, "Alice <alice@example.com>", "Twenty actions")
    for s_idx in range(ACTIONS):
        store.set_stage(run_id, s_idx, ActionStatus.RUNNING)
        [act] = store.actions_of_stage(run_id, s_idx)
        path = conf.logs_dir / str(run_id) / f"{act.id}-{act.name}.1.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        store.start_attempt(act.id, None, str(path), "t")
        path.write_text(LOG)
        store.finish_attempt(act.id, 1, ActionStatus.SUCCEEDED, 0)
        store.set_action(act.id, ActionStatus.SUCCEEDED, exit_code=0)
        store.set_stage(run_id, s_idx, ActionStatus.SUCCEEDED)
    store.finish_run(run_id, RunStatus.SUCCEEDED)
    return run_id


def bench_events() -> None:
    """The report's CPU and page writes for a run's events: every page on every event (as before
    issue 11), only the pages an event changes (now), and the store's transitions alone."""
    from gitpipe.report import reporter as reporter_mod

    changes = reporter_mod._changes_listings
    written = [0]
    write = files.write_atomic

    def counted(path: Path, text: str) -> None:
        written[0] += 1
        write(path, text)

    files.write_atomic = counted  # type: ignore[assignment]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, listen, every in (("store alone (no report)", False, False),
                                    ("every page on every event (before)", True, True),
                                    ("the pages an event changes (now)", True, False)):
            conf, store = home(Path(tmp) / name.split()[0])
            fill(conf, store, 100)
            reporter = Reporter(conf, store)
            reporter.render_all()
            reporter_mod._changes_listings = (lambda e: True) if every else changes  # type: ignore[assignment]
            if listen:
                store.listeners.append(reporter.on_event)
            cpu, pages = [], []
            for _ in range(5):
                written[0] = 0
                t = time.thread_time()
                twenty_actions(conf, store)
                cpu.append((time.thread_time() - t) / ACTIONS)
                pages.append(written[0] / ACTIONS)
            rows.append((name, ms(median(cpu)), f"{median(pages):.1f}", ""))
            reporter.close()
            store.close()
    reporter_mod._changes_listings = changes  # type: ignore[assignment]
    files.write_atomic = write  # type: ignore[assignment]
    print(f"\na run of {ACTIONS} one-action stages, each event rendered as it comes (no coalescing), median of 5 runs")
    print("| the report renders | CPU per action | pages written per action |\n| --- | --- | --- |")
    for name, cpu_ms, per, _ in rows:
        print(f"| {name} | {cpu_ms} | {per} |")


def bench_child() -> None:
    import resource

    from gitpipe.report import child

    with tempfile.TemporaryDirectory() as tmp:
        conf, store = home(Path(tmp))
        fill(conf, store, 100)
        Reporter(conf, store).render_all()
        waits, cpus = [], []
        for _ in range(5):
            sender = child.ChildReporter(conf, store)
            store.listeners.append(sender.on_event)
            used = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            run_id = store.create_runs([NewRun("shop", "shop", "refs/heads/main", uuid.uuid4().hex, "push", "")])[0]
            page = conf.site_dir / "shop" / "runs" / f"{run_id}.html"
            while not page.exists():
                time.sleep(0.001)
            waits.append(time.perf_counter() - t)
            sender.close()
            store.listeners.remove(sender.on_event)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus.append(after.ru_utime + after.ru_stime - used.ru_utime - used.ru_stime)
        warm = Reporter(conf, store)
        warm.render_all()
        run_id = store.create_runs([NewRun("shop", "shop", "refs/heads/main", uuid.uuid4().hex, "push", "")])[0]
        inside = timed(lambda: warm.on_event(Event(run_id, "run", "queued")))
        warm.close()
        store.close()
    table("a quiet daemon's first event: the run page on disk (median of 5, a new child each)", [
        ("in a new child (start, imports, compiled templates read)", ms(median(waits)), ms(inside),
         f"{median(waits) / inside:.1f} (baseline: in-process, warm)"),
        ("the child's CPU (its whole life)", ms(median(cpus)), "", ""),
    ])


def main(argv: list[str]) -> None:
    parts = set(argv or ["update", "full", "biglog", "events", "child"])
    unknown = parts - {"update", "full", "biglog", "events", "child"}
    if unknown:
        sys.exit(f"unknown part(s): {', '.join(sorted(unknown))} (parts: update, full, biglog, events, child)")
    if "events" in parts:
        bench_events()
    if "child" in parts:
        bench_child()
    if parts & {"update", "full"}:
        bench_update_and_full(parts)
    if "biglog" in parts:
        bench_biglog()


if __name__ == "__main__":
    main(sys.argv[1:])
