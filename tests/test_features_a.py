"""End-to-end tests of `allow_failure`, `matrix` and `gitpipe retry RUN --failed` (issue 15):
real pushes into real bare repos, a real `gitpipe serve`, real headless Chromium for the page.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from browser import browser, open_page, screenshot
from helpers import Home, pipeline, wait_for
from test_e2e_core import fill

from tests.webhook import webhook_server  # noqa: F401  (the `webhook` fixture)

# ---------------------------------------------------------------------------- allow_failure

ALLOWED = r"""
[[stage]]
name = "check"

  [[stage.action]]
  name = "lint"
  allow_failure = true
  retries = 1
  outputs = { lint-report = "lint.txt" }
  run = '''
  echo "lint $GITPIPE_ATTEMPT" >> "@OUT@/lint"
  echo "LINT_SCORE=3" >> "$GITPIPE_OUTPUT"
  echo "bad style" > lint.txt
  exit 3
  '''

  [[stage.action]]
  name = "slow-check"
  allow_failure = true
  timeout = "1s"
  run = 'sleep 30'

  [[stage.action]]
  name = "unit"
  run = 'echo ok'

  [[stage.action]]
  name = "after"
  run_order = 2
  run = 'touch "@OUT@/after"'

[[stage]]
name = "report"

  [[stage.action]]
  name = "publish-lint"
  inputs = ["lint-report"]
  run = 'cat lint.txt; touch "@OUT@/publish-lint"'

  [[stage.action]]
  name = "package"
  run = 'env | grep ^GITPIPE_OUT_ > "@OUT@/package.env" || true; touch "@OUT@/package"'

[[notify]]
on = ["succeeded", "failed"]
webhook = "@URL@"
"""


@pytest.mark.timeout(120)
def test_allow_failure_is_a_warning_and_the_run_goes_on(home: Home, out: Path,
                                                         webhook: tuple[str, list[dict[str, Any]]],  # noqa: F811
                                                         ) -> None:
    url, received = webhook
    repo = home.add_repo("allowed")
    with home.daemon():
        run = home.wait_run(home.push_run(repo, {".pipeline.toml": fill(ALLOWED, OUT=out, URL=url)}))
        wait_for(lambda: received, 30, what="the succeeded notification")
    home.expect(run, "succeeded")
    assert run["warnings"] == 2
    lint, slow = home.action(run, "lint"), home.action(run, "slow-check")
    # Its retries come first: only the last failure is let pass.
    assert lint["status"] == "failed" and lint["exit_code"] == 3 and lint["attempts"] == 2
    assert (out / "lint").read_text() == "lint 1\nlint 2\n"
    assert lint["allow_failure"] is True and lint["warning"] is True
    # A timeout of an allowed action is a failure, allowed.
    assert slow["status"] == "timed-out" and slow["warning"] is True
    unit = home.action(run, "unit")
    assert unit["warning"] is False and unit["allow_failure"] is False
    assert home.stage(run, "check")["status"] == "succeeded"
    assert (out / "after").exists() and (out / "package").exists()
    # A failed action produces nothing: no artifact, no outputs, and its consumer is skipped.
    assert run["artifacts"] == [] and run["outputs"] == []
    assert (out / "package.env").read_text() == ""
    consumer = home.action(run, "publish-lint")
    assert consumer["status"] == "skipped" and not (out / "publish-lint").exists()
    assert consumer["message"] == 'skipped: input "lint-report" was not produced ("lint" failed, allowed)'

    text = home.gitpipe("show", str(run["id"]))
    assert text.returncode == 0
    assert re.search(r"lint +failed \(allowed to fail: a warning\) +[0-9.]+s exit 3", text.stdout), text.stdout
    assert "2 warnings: allowed failures, the run went on" in text.stdout
    listed = home.gitpipe("runs", check=True).stdout
    assert "succeeded" in listed and "(2 warnings)" in listed
    assert home.runs()[0]["warnings"] == 2
    event = received[0]
    assert event["event"] == "succeeded" and event["status"] == "succeeded"
    assert sorted(w.split(":")[0] for w in event["warnings"]) == ["check/lint", "check/slow-check"]


def test_a_failure_without_allow_failure_still_fails_the_run(home: Home, out: Path) -> None:
    repo = home.add_repo("strict")
    text = fill("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "allowed"
          allow_failure = true
          run = 'exit 1'
          [[stage.action]]
          name = "strict"
          run = 'exit 2'
        [[stage]]
        name = "later"
          [[stage.action]]
          name = "never"
          run = 'touch "@OUT@/never"'
        """, OUT=out)
    with home.daemon():
        run = home.expect(home.wait_run(home.push_run(repo, {".pipeline.toml": text})), "failed")
    assert run["warnings"] == 1 and home.action(run, "strict")["warning"] is False
    assert home.action(run, "never")["status"] == "skipped" and not (out / "never").exists()


def test_a_cancel_is_never_an_allowed_failure(home: Home, out: Path) -> None:
    repo = home.add_repo("cancelled")
    text = fill("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "long"
          allow_failure = true
          run = 'touch "@OUT@/started"; sleep 60'
        [[stage]]
        name = "later"
          [[stage.action]]
          name = "never"
          run = 'touch "@OUT@/never"'
        """, OUT=out)
    with home.daemon():
        run_id = home.push_run(repo, {".pipeline.toml": text})
        wait_for(lambda: (out / "started").exists(), 30, what="the action to start")
        home.gitpipe("cancel", str(run_id), check=True)
        run = home.expect(home.wait_run(run_id), "cancelled")
    long = home.action(run, "long")
    assert long["status"] == "cancelled" and long["warning"] is False and run["warnings"] == 0
    assert home.action(run, "never")["status"] == "cancelled" and not (out / "never").exists()


# ---------------------------------------------------------------------------- matrix

MATRIX = r"""
[[stage]]
name = "test"

  [[stage.action]]
  name = "test-{matrix.python}-{matrix.db}"
  matrix = { python = ["3.11", "3.12"], db = ["sqlite", "pg"] }
  outputs = { report = "reports/**" }
  run = '''
  touch "@OUT@/started-$MATRIX_PYTHON-$MATRIX_DB"
  # every copy waits for the other three: they run at the same time, or this times out
  for i in $(seq 600); do [ "$(ls "@OUT@" | grep -c ^started-)" -ge 4 ] && break; sleep 0.05; done
  [ "$(ls "@OUT@" | grep -c ^started-)" -ge 4 ]
  echo "$GITPIPE_ACTION $MATRIX_PYTHON $MATRIX_DB" > "@OUT@/env-$MATRIX_PYTHON-$MATRIX_DB"
  mkdir -p reports
  echo "python $MATRIX_PYTHON on $MATRIX_DB" > "reports/$MATRIX_PYTHON-$MATRIX_DB.txt"
  echo "SCORE=$MATRIX_PYTHON/$MATRIX_DB" >> "$GITPIPE_OUTPUT"
  '''

[[stage]]
name = "summary"

  [[stage.action]]
  name = "sum"
  inputs = ["report"]
  run = '''
  cat reports/*.txt | sort > "@OUT@/summary"
  env | grep ^GITPIPE_OUT_ | sort > "@OUT@/outputs"
  '''
"""


@pytest.mark.timeout(120)
def test_matrix_copies_run_in_parallel_with_their_values_and_a_consumer_gets_every_copy(
        home: Home, out: Path) -> None:
    repo = home.add_repo("matrix")
    with home.daemon():
        run = home.expect(home.wait_run(home.push_run(repo, {".pipeline.toml": fill(MATRIX, OUT=out)})))
    names = [a["name"] for a in home.stage(run, "test")["actions"]]
    assert names == ["test-3.11-sqlite", "test-3.11-pg", "test-3.12-sqlite", "test-3.12-pg"]
    for name in names:
        act = home.action(run, name)
        _, python, db = name.split("-")
        assert act["matrix"] == {"group": "test-{matrix.python}-{matrix.db}",
                                 "values": {"python": python, "db": db}}
        assert (out / f"env-{python}-{db}").read_text() == f"{name} {python} {db}\n"
    assert sorted(a["name"] for a in run["artifacts"]) == [
        "report-3.11-pg", "report-3.11-sqlite", "report-3.12-pg", "report-3.12-sqlite"]
    assert (out / "summary").read_text().splitlines() == [
        "python 3.11 on pg", "python 3.11 on sqlite", "python 3.12 on pg", "python 3.12 on sqlite"]
    assert (out / "outputs").read_text().splitlines() == [
        "GITPIPE_OUT_TEST_3_11_PG_SCORE=3.11/pg", "GITPIPE_OUT_TEST_3_11_SQLITE_SCORE=3.11/sqlite",
        "GITPIPE_OUT_TEST_3_12_PG_SCORE=3.12/pg", "GITPIPE_OUT_TEST_3_12_SQLITE_SCORE=3.12/sqlite"]


def test_matrix_copies_writing_one_path_differently_fail_their_consumer_clearly(home: Home) -> None:
    repo = home.add_repo("clash")
    text = pipeline("""
        [[stage]]
        name = "build"
          [[stage.action]]
          name = "build"
          matrix = { arch = ["amd64", "arm64"] }
          outputs = { bin = "out.txt" }
          run = 'echo "$MATRIX_ARCH" > out.txt'
        [[stage]]
        name = "ship"
          [[stage.action]]
          name = "ship"
          inputs = ["bin"]
          run = 'cat out.txt'
        """)
    with home.daemon():
        run = home.expect(home.wait_run(home.push_run(repo, {".pipeline.toml": text})), "failed")
    assert [a["name"] for a in home.stage(run, "build")["actions"]] == ["build (amd64)", "build (arm64)"]
    ship = home.action(run, "ship")
    assert ship["status"] == "failed"
    assert ship["message"] == ('inputs "bin-amd64" and "bin-arm64" both hold "out.txt", with different contents '
                               "(let each copy write under a path of its own, e.g. reports/$MATRIX_PYTHON/)")
    assert "reports/$MATRIX_PYTHON/" in home.logs(run["id"], "ship")


# ---------------------------------------------------------------------------- retry --failed

RETRY = r"""
[[stage]]
name = "build"

  [[stage.action]]
  name = "wheel"
  outputs = { wheel = "dist/*" }
  run = '''
  echo built >> "@OUT@/wheel-runs"
  mkdir -p dist && echo "wheel of $GITPIPE_SHA" > dist/app.whl
  echo "VERSION=1.2.3" >> "$GITPIPE_OUTPUT"
  '''

[[stage]]
name = "test"

  [[stage.action]]
  name = "unit"
  inputs = ["wheel"]
  run = 'echo unit >> "@OUT@/unit-runs"'

  [[stage.action]]
  name = "flaky"
  inputs = ["wheel"]
  run = 'echo flaky >> "@OUT@/flaky-runs"; [ ! -e "@OUT@/break" ]'

[[stage]]
name = "ship"

  [[stage.action]]
  name = "ship"
  inputs = ["wheel"]
  run = 'cat dist/app.whl > "@OUT@/shipped"; echo "$GITPIPE_OUT_WHEEL_VERSION" >> "@OUT@/shipped"'
"""


@pytest.mark.timeout(180)
def test_retry_failed_reruns_only_the_failed_and_later_actions_reusing_what_passed(
        home: Home, out: Path) -> None:
    repo = home.add_repo("retry")
    (out / "break").touch()
    with home.daemon():
        first = home.expect(home.wait_run(home.push_run(repo, {".pipeline.toml": fill(RETRY, OUT=out)})), "failed")
        # The branch moves on, with another pipeline: the retry keeps the first run's commit and file.
        moved = RETRY.replace('cat dist/app.whl > "@OUT@/shipped"', 'echo NEW > "@OUT@/shipped"')
        home.wait_runs([home.push_run(repo, {".pipeline.toml": fill(moved, OUT=out)})])
        (out / "break").unlink()
        (out / "shipped").unlink(missing_ok=True)
        proc = home.gitpipe("retry", str(first["id"]), "--failed", check=True)
        new_id = first["id"] + 2
        assert proc.stdout.strip() == (f"run #{new_id} queued (retry of #{first['id']}, failed actions only: "
                                       "2 result(s) reused)")
        again = home.expect(home.wait_run(new_id))
    assert again["sha"] == first["sha"] and again["trigger"] == "retry" and again["retry_of"] == first["id"]
    assert again["reused"] == 2
    wheel, unit = home.action(again, "wheel"), home.action(again, "unit")
    for act, old in ((wheel, home.action(first, "wheel")), (unit, home.action(first, "unit"))):
        assert act["status"] == "succeeded" and act["reused_from"] == first["id"]
        assert act["message"].startswith(f"reused from #{first['id']}") and act["attempts"] == 0
        assert act["finished_at"] == old["finished_at"]
    assert home.action(again, "flaky")["reused_from"] is None and home.action(again, "flaky")["attempts"] == 1
    assert home.stage(again, "build")["status"] == "succeeded"
    # wheel ran twice (the first run and the run of the new head), never in the retry
    assert (out / "wheel-runs").read_text() == "built\nbuilt\n"
    assert (out / "unit-runs").read_text() == "unit\nunit\n"
    assert (out / "flaky-runs").read_text() == "flaky\nflaky\nflaky\n"
    assert (out / "shipped").read_text() == f"wheel of {first['sha']}\n1.2.3\n"
    assert again["artifacts"] == first["artifacts"]
    assert again["outputs"] == [{"action": "wheel", "key": "VERSION", "value": "1.2.3"}]
    # the retry's artifacts are its own: they are in its own folder
    assert (home.home / "artifacts" / str(new_id) / "wheel" / "dist" / "app.whl").is_file()

    shown = home.gitpipe("show", str(new_id), check=True).stdout
    assert f"trigger retry of #{first['id']}" in shown and f"reused from #{first['id']}" in shown
    listed = home.gitpipe("runs", check=True).stdout
    assert f"(retry of #{first['id']}, 2 reused)" in listed
    home.gitpipe("report", check=True)
    page = (home.home / "site" / "retry" / "runs" / f"{new_id}.html").read_text()
    assert page.count(f'<span class="pill">reused from <a href="{first["id"]}.html">#{first["id"]}</a></span>') == 2
    assert "failed actions only: 2 reused" in page

    # A run with nothing failed is refused, saying what to do instead.
    refused = home.gitpipe("retry", str(new_id), "--failed")
    assert refused.returncode == 2
    assert refused.stderr.strip() == (f"gitpipe: error: run #{new_id} has no failed, timed-out or cancelled "
                                      f"action (it succeeded) (`gitpipe retry {new_id}` runs it again whole)")


def test_retry_failed_refuses_a_run_still_running(home: Home, out: Path) -> None:
    repo = home.add_repo("busy")
    text = fill("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "wait"
          run = 'for i in $(seq 600); do [ -e "@OUT@/go" ] && break; sleep 0.05; done'
        """, OUT=out)
    with home.daemon():
        run_id = home.push_run(repo, {".pipeline.toml": text})
        home.wait_status(run_id, "running")
        refused = home.gitpipe("retry", str(run_id), "--failed")
        (out / "go").touch()
        home.expect(home.wait_run(run_id))
    assert refused.returncode == 2
    assert f"run #{run_id} is still running; only a finished run can be retried" in refused.stderr
    assert f"gitpipe cancel {run_id}" in refused.stderr
    assert len(home.runs()) == 1  # nothing was queued


@pytest.mark.timeout(120)
def test_retry_failed_refuses_a_pruned_run(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.init("keep_runs = 1\n")
    repo = home.add_repo("pruned")
    text = pipeline("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "ok"
          run = 'mkdir -p d && echo x > d/x'
          outputs = { d = "d/x" }
          [[stage.action]]
          name = "bad"
          run_order = 2
          run = 'exit 1'
        """)
    with home.daemon():
        first = home.expect(home.wait_run(home.push_run(repo, {".pipeline.toml": text})), "failed")
        home.wait_run(home.push_run(repo, {"n": "1"}))
        wait_for(lambda: not (home.home / "artifacts" / str(first["id"])).exists(), 30, what="pruning")
    refused = home.gitpipe("retry", str(first["id"]), "--failed")
    assert refused.returncode == 2
    assert (f"the logs and artifacts of run #{first['id']} were pruned (keep_runs); there is nothing "
            "to reuse") in refused.stderr


def test_the_retry_of_an_unprotected_run_stays_unprotected(home: Home, out: Path) -> None:
    path = home.home / "secrets.toml"
    path.write_text('[guarded]\nTOKEN = "s3cret-value-long"\n')
    os.chmod(path, 0o600)
    repo = home.add_repo("guarded")
    text = fill("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "build"
          run = 'echo build >> "@OUT@/builds"'
        [[stage]]
        name = "release"
          [[stage.action]]
          name = "sign"
          secrets = ["TOKEN"]
          run = 'echo "$TOKEN" > "@OUT@/leaked"'
        """, OUT=out)
    with home.daemon():
        first = home.expect(home.wait_run(home.push_run(repo, {".pipeline.toml": text}, branch="feature")),
                            "failed")
        home.gitpipe("retry", str(first["id"]), "--failed", check=True)
        again = home.expect(home.wait_run(first["id"] + 1), "failed")
    assert home.action(again, "build")["reused_from"] == first["id"]
    sign = home.action(again, "sign")
    assert sign["status"] == "failed" and 'ref "feature" is not protected' in sign["message"]
    assert not (out / "leaked").exists() and (out / "builds").read_text() == "build\n"


# ---------------------------------------------------------------------------- the run page

PAGE = """
[[stage]]
name = "test"
  [[stage.action]]
  name = "lint"
  allow_failure = true
  run = 'exit 1'
  [[stage.action]]
  name = "py{matrix.python}-{matrix.db}"
  matrix = { python = ["3.11", "3.12"], db = ["sqlite", "pg"] }
  run = 'echo "$MATRIX_PYTHON"'
[[stage]]
name = "ship"
  [[stage.action]]
  name = "package"
  run = 'echo done'
"""


@pytest.mark.timeout(120)
def test_the_run_page_groups_matrix_copies_and_shows_an_allowed_failure_as_a_warning(home: Home) -> None:
    repo = home.add_repo("page")
    with home.daemon():
        run = home.expect(home.wait_run(home.push_run(repo, {".pipeline.toml": pipeline(PAGE)})))
    home.gitpipe("report", check=True)
    html = home.home / "site" / "page" / "runs" / f"{run['id']}.html"
    with browser() as b:
        page, console = open_page(b, html.as_uri())
        frame = page.locator("svg.graph g.matrix")
        assert frame.count() == 1
        assert frame.locator("text.frame-label").text_content() == "py{python}-{db}"
        assert frame.locator("title").text_content() == "matrix py{matrix.python}-{matrix.db}: 4 copies"
        assert frame.locator("text.frame-count").text_content() == "×4"
        assert page.locator("svg.graph a.node.s-warning").count() == 1
        assert page.locator("svg.graph a.node.s-warning title").text_content().startswith(
            "lint: failed, allowed")
        assert "1 warning" in page.locator(".runhead").inner_text()
        assert page.locator("#action-" + str(_action_id(home, run, "lint")) + " .allowed").count() == 1
        shot = screenshot(page, "run-matrix-allowed-failure")
        page.emulate_media(color_scheme="dark")
        screenshot(page, "run-matrix-allowed-failure-dark", full=False)
        assert console.problems() == []
    assert shot.stat().st_size > 0


def _action_id(home: Home, run: dict[str, Any], name: str) -> int:
    import sqlite3

    conn = sqlite3.connect(home.home / "gitpipe.db")
    try:
        return int(conn.execute("SELECT id FROM actions WHERE run_id = ? AND name = ?",
                                (run["id"], name)).fetchone()[0])
    finally:
        conn.close()
