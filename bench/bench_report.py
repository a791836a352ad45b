"""Report site benchmarks (issue: the static report site). Prints comparison tables.

    python bench/bench_report.py            # everything (a few minutes)
    python bench/bench_report.py update     # one part: update | full | biglog

- update: the site's update after one more run finishes (Reporter.on_event of the final
          event: its run page, the repo index, the top index, an archived page when a
          block fills), with 10,000 runs in the history vs 100; median of 20 runs.
          Goal: ratio at most 1.5.
- full:   `gitpipe report` (Reporter.render_all) of a 10,000-run history, per 1,000 runs.
- biglog: the run page of an action whose log has 200,000 lines (about 20 MB): page size
          (goal: under 1 MB) and render time, first and again.

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
from gitpipe.report import Reporter  # noqa: E402
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


def main(argv: list[str]) -> None:
    parts = set(argv or ["update", "full", "biglog"])
    unknown = parts - {"update", "full", "biglog"}
    if unknown:
        sys.exit(f"unknown part(s): {', '.join(sorted(unknown))} (parts: update, full, biglog)")
    if parts & {"update", "full"}:
        bench_update_and_full(parts)
    if "biglog" in parts:
        bench_biglog()


if __name__ == "__main__":
    main(sys.argv[1:])
