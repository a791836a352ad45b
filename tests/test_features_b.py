"""What GitLab CI and GitHub Actions users look for (issue 15), end to end: who may approve,
inputs of manual runs, `gitpipe artifacts`, `gitpipe runs` filters and status badges.

Real pushes, a real `gitpipe serve`, real CLI processes; the approval tests make real Unix
users and a group (the tests run as root), run `gitpipe approve` as them with setpriv, and
remove them afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from browser import browser, open_page, screenshot
from helpers import GITPIPE, Home, base_env, pipeline, wait_for
from test_cli import one_line_error
from test_sandbox import as_user, user_gitpipe

pytestmark = pytest.mark.timeout(180)


# ---------------------------------------------------------------------------- who may approve
@dataclass
class Account:
    name: str
    uid: int
    gid: int


@dataclass
class Accounts:
    alice: Account  # listed by name
    olga: Account  # a member of the listed group
    bob: Account  # listed nowhere
    group: str


def _need_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("the approver tests make Unix users: they must run as root under CI")
        pytest.skip("the approver tests make Unix users (run as root)")


@pytest.fixture
def accounts() -> Iterator[Accounts]:
    """Three real Unix users and a group, with unique names; removed at the end."""
    _need_root()
    tag = uuid.uuid4().hex[:6]
    group, made = f"gpops{tag}", []
    subprocess.run(["groupadd", group], check=True, capture_output=True)
    try:
        found = {}
        for role, extra in (("alice", []), ("olga", ["-G", group]), ("bob", [])):
            name = f"gp{role}{tag}"
            subprocess.run(["useradd", "--no-create-home", "--home-dir", "/nonexistent", "--shell",
                            "/usr/sbin/nologin", *extra, name], check=True, capture_output=True)
            made.append(name)
            out = subprocess.run(["id", "-u", name], capture_output=True, text=True, check=True).stdout
            gid = subprocess.run(["id", "-g", name], capture_output=True, text=True, check=True).stdout
            found[role] = Account(name, int(out), int(gid))
        yield Accounts(found["alice"], found["olga"], found["bob"], group)
    finally:
        for name in made:
            subprocess.run(["userdel", name], capture_output=True, check=False)
        subprocess.run(["groupdel", group], capture_output=True, check=False)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A directory every account can reach (tmp_path is under root's 0700 pytest folder)."""
    d = Path(tempfile.mkdtemp(prefix="gitpipe-ctl-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def approve_as(home: Home, who: Account, verb: str, run_id: int, sock: Path,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`gitpipe approve/reject RUN --socket SOCK` as another Unix user (setpriv)."""
    prefix = as_user(who.uid, who.gid) if who.name else ["setpriv", f"--reuid={who.uid}", f"--regid={who.gid}",
                                                        "--clear-groups"]
    argv = [*prefix, user_gitpipe(who.uid, who.gid), verb, str(run_id),
            "--home", str(home.home), "--socket", str(sock)]
    return subprocess.run(argv, env=env or base_env(HOME="/"), cwd="/", capture_output=True, text=True,
                          timeout=60, check=False)


def approval_pipeline(approvers: str) -> str:
    return pipeline(f"""
        [[stage]]
        name = "ship"
          [[stage.action]]
          name = "sign-off"
          type = "approval"
          {approvers}
          [[stage.action]]
          name = "after"
          run_order = 2
          run = "echo shipped"
        """)


def test_only_listed_users_and_groups_approve_and_every_refusal_is_recorded(
        home: Home, accounts: Accounts, socket_dir: Path) -> None:
    sock = socket_dir / "gitpipe.sock"
    home.configure(f'control_socket = "{sock}"\n')
    repo = home.add_repo("shop")
    listed = f'approvers = ["{accounts.alice.name}", "group:{accounts.group}", "gitpipe-build", "nosuch{uuid.uuid4().hex[:6]}"]'
    with home.daemon() as daemon:
        run_id = home.push_run(repo, {".pipeline.toml": approval_pipeline(listed)})
        home.wait_status(run_id, "waiting")
        assert sock.is_socket() and (sock.stat().st_mode & 0o777) == 0o666
        who = f"{accounts.alice.name}, group:{accounts.group}, gitpipe-build, nosuch"
        assert f"(gitpipe approve {run_id}; approvers: {who}" in home.gitpipe("show", str(run_id)).stdout
        page = home.home / "site" / "shop" / "runs" / f"{run_id}.html"
        wait_for(lambda: page.exists() and f"as one of: {who}" in page.read_text(), what="the waiting page")

        # bob is listed nowhere; $USER and $LOGNAME saying "alice" change nothing: the kernel says bob
        lying = base_env(HOME="/", USER=accounts.alice.name, LOGNAME=accounts.alice.name)
        proc = approve_as(home, accounts.bob, "approve", run_id, sock, lying)
        line = one_line_error(proc, accounts.bob.name, "may not approve", "not one of the approvers",
                              "recorded", code=1)
        assert accounts.alice.name in line  # says who may
        # the build user runs pushed scripts: refused even though the pipeline lists it
        build = subprocess.run(["id", "-u", "gitpipe-build"], capture_output=True, text=True, check=True)
        build_gid = subprocess.run(["id", "-g", "gitpipe-build"], capture_output=True, text=True, check=True)
        proc = approve_as(home, Account("gitpipe-build", int(build.stdout), int(build_gid.stdout)), "approve",
                          run_id, sock)
        one_line_error(proc, "build user", code=1)
        # root is no exception to a list (it opens the home, so it decides directly)
        one_line_error(home.gitpipe("reject", str(run_id)), "root may not reject", code=1)
        # recorded by this CLI process, not the daemon: the daemon still re-renders the page
        wait_for(lambda: "refused reject" in page.read_text(), what="the page to show the refusal")
        # ...and through the socket it is the daemon's own user, which never decides there
        one_line_error(home.gitpipe("approve", str(run_id), "--socket", str(sock)), "daemon's own user", code=1)
        assert home.status(run_id) == "waiting"

        proc = approve_as(home, accounts.alice, "approve", run_id, sock)
        assert proc.returncode == 0, proc.stderr
        assert f'approved "sign-off" as {accounts.alice.name}' in proc.stdout
        run = home.expect(home.wait_run(run_id))

        ap = run["approvals"][0]
        assert (ap["decision"], ap["by"]) == ("approved", accounts.alice.name)
        assert ap["approvers"][:2] == [accounts.alice.name, f"group:{accounts.group}"]
        assert ap["note"] and "nosuch" in ap["note"] and accounts.alice.name not in ap["note"]
        refused = [(r["by"], r["decision"]) for r in ap["refused"]]
        assert refused == [(accounts.bob.name, "approve"), ("gitpipe-build", "approve"), ("root", "reject"),
                           ("root", "approve")]
        assert all(r["at"] and r["reason"] for r in ap["refused"])
        text = home.gitpipe("show", str(run_id)).stdout
        assert f"refused: {accounts.bob.name} tried to approve at " in text
        assert "warning: approvers unknown on this host: nosuch" in text
        html = wait_for(lambda: page.exists() and "refused approve" in page.read_text() and page.read_text(),
                        what="the run page with the refusals")
        assert html.count("refused approve") == 3 and html.count("refused reject") == 1
        assert accounts.bob.name in html

        # a member of the listed group rejects the next run
        run2 = home.push_run(repo, {"x": "2"})
        home.wait_status(run2, "waiting")
        proc = approve_as(home, accounts.olga, "reject", run2, sock)
        assert proc.returncode == 0 and "rejected" in proc.stdout, proc.stderr
        run = home.expect(home.wait_run(run2), "failed")
        assert (run["approvals"][0]["decision"], run["approvals"][0]["by"]) == ("rejected", accounts.olga.name)
        assert "(control socket)" in daemon.log


def test_without_approvers_only_the_home_decides_and_unknown_approvers_fail_at_once(
        home: Home, accounts: Accounts, socket_dir: Path) -> None:
    sock = socket_dir / "gitpipe.sock"
    home.configure(f'control_socket = "{sock}"\n')
    repo = home.add_repo("shop")
    with home.daemon():
        run_id = home.push_run(repo, {".pipeline.toml": approval_pipeline("")})
        home.wait_status(run_id, "waiting")
        proc = approve_as(home, accounts.alice, "approve", run_id, sock)
        one_line_error(proc, "names no approvers", "approvers = [", code=1)
        nameless = Account("", 54321, 54321)  # a uid without an account: never matched by its number
        one_line_error(approve_as(home, nameless, "approve", run_id, sock), "uid 54321 has no account", code=1)
        for raw in (b"nonsense\n", b'{"op": "approve", "run": "1"}\n', b"x" * 20000):  # a line, not JSON
            with socket.socket(socket.AF_UNIX) as conn:
                conn.connect(str(sock))
                conn.sendall(raw)
                answer = json.loads(conn.makefile("rb").readline())
            assert answer["exit"] == 2 and answer["error"].startswith("bad request"), answer
        # not waiting: the refusal is not what answers
        one_line_error(approve_as(home, accounts.alice, "approve", run_id + 7, sock), "unknown run", code=2)
        assert home.gitpipe("approve", str(run_id)).returncode == 0  # root opens the home
        run = home.expect(home.wait_run(run_id))
        assert run["approvals"][0]["by"] == "root" and run["approvals"][0]["approvers"] is None
        assert [r["by"] for r in run["approvals"][0]["refused"]] == [accounts.alice.name, "54321"]

        nobody = 'approvers = ["ghost-a-{0}", "group:ghost-g-{0}"]'.format(uuid.uuid4().hex[:6])
        run2 = home.push_run(repo, {".pipeline.toml": approval_pipeline(nobody)})
        run = home.expect(home.wait_run(run2), "failed")
        sign_off = home.action(run, "sign-off")
        assert sign_off["status"] == "failed" and "no approver exists on this host" in sign_off["message"]
        assert "ghost-a-" in sign_off["message"]
        assert (run["approvals"][0]["decision"], run["approvals"][0]["by"]) == ("rejected", "gitpipe")


SNEAK = """
for i in 1 2 3 4 5 6 7 8; do
  [ -e "{sock}" ] && echo "socket visible" >> "{out}/sneak"
  python3 - >> "{out}/sneak" 2>&1 <<'PY' || true
import socket, os
s = socket.socket(socket.AF_UNIX)
s.connect("{sock}")
s.sendall(('{{"op": "approve", "run": %s, "comment": "self"}}\\n' % os.environ["GITPIPE_RUN"]).encode())
print("answer", s.recv(4096))
PY
  sleep 0.3
done
"""


def test_a_pushed_script_cannot_reach_the_control_socket(home: Home, out: Path, socket_dir: Path) -> None:
    _need_root()
    sock = socket_dir / "gitpipe.sock"
    home.configure(f'control_socket = "{sock}"\n')
    repo = home.add_repo("shop")
    text = approval_pipeline('approvers = ["gitpipe-build", "root"]').replace(
        'run_order = 2\n  run = "echo shipped"',
        "run_order = 1\n  run = '''" + SNEAK.format(sock=sock, out=out) + "'''")
    with home.daemon():
        run_id = home.push_run(repo, {".pipeline.toml": text})
        wait_for(lambda: any(a["name"] == "after" and a["status"] == "succeeded"
                             for st in home.show(run_id)["stages"] for a in st["actions"]), 60,
                 what="the script that tries the socket")
        tries = (out / "sneak").read_text()
        assert "No such file or directory" in tries and "socket visible" not in tries and "answer" not in tries
        assert home.status(run_id) == "waiting"
        assert home.gitpipe("approve", str(run_id)).returncode == 0  # root is listed, and opens the home
        run = home.expect(home.wait_run(run_id))
    assert run["approvals"][0]["by"] == "root" and run["approvals"][0]["refused"] == []


def test_approve_without_a_daemon_says_how_to_reach_one(home: Home, accounts: Accounts,
                                                        socket_dir: Path) -> None:
    proc = approve_as(home, accounts.alice, "approve", 1, socket_dir / "none.sock")
    line = one_line_error(proc, "cannot reach the gitpipe daemon", str(socket_dir / "none.sock"), code=2)
    assert "gitpipe serve" in line


# ---------------------------------------------------------------------------- inputs
INPUTS = pipeline("""
    [inputs.version]
    description = "the version to release"
    default = "1.0"
    [inputs.channel]
    options = ["stable", "beta"]
    default = "stable"
    [inputs.note]
    description = "free text, required by hand"

    [[stage]]
    name = "s"
      [[stage.action]]
      name = "show"
      run = 'printf "%s|%s|%s" "$GITPIPE_INPUT_VERSION" "$GITPIPE_INPUT_CHANNEL" "$GITPIPE_INPUT_NOTE" > "$OUT/inputs-$GITPIPE_RUN"'
    """)


def test_inputs_reach_scripts_only_as_variables(home: Home, out: Path) -> None:
    repo = home.add_repo("shop")
    payload = f'$(touch {out}/pwned) `touch {out}/pwned2`; touch {out}/pwned3 {{run}} <b>"x"</b>'
    with home.daemon():
        pushed = home.push_run(repo, {".pipeline.toml": INPUTS.replace('"$OUT', f'"{out}')})
        run = home.expect(home.wait_run(pushed))
        assert run["inputs"] == {"version": "1.0", "channel": "stable", "note": ""}  # a push: the defaults
        assert (out / f"inputs-{pushed}").read_text() == "1.0|stable|"

        before = len(home.runs())
        for args, words in (
                (["--var", "note=x", "--var", "colour=red"], ['unknown input "colour"', "version, channel, note"]),
                (["--var", "version=2"], ['input "note" is required', "--var note=VALUE"]),
                (["--var", "note=x", "--var", "channel=nightly"], ['"nightly" is not one of its options: stable, beta']),
                (["--var", "note=x", "--var", "note=y"], ["--var note is given twice"]),
                (["--var", "novalue"], ['"novalue" is not KEY=VALUE'])):
            proc = home.gitpipe("run", "shop", *args)
            if "novalue" in args:  # argparse's own usage error
                assert proc.returncode == 2 and '"novalue" is not KEY=VALUE' in proc.stderr
                continue
            one_line_error(proc, *words, "nothing was queued", code=2)
        assert len(home.runs()) == before

        proc = home.gitpipe("run", "shop", "--var", "version=2.0", "--var", f"note={payload}",
                            "--var", "channel=beta", check=True)
        manual = int(re.search(r"run #(\d+)", proc.stdout)[1])
        run = home.expect(home.wait_run(manual))
        assert run["inputs"] == {"version": "2.0", "channel": "beta", "note": payload}
        assert (out / f"inputs-{manual}").read_text() == f"2.0|beta|{payload}"
        assert not any((out / n).exists() for n in ("pwned", "pwned2", "pwned3"))
        assert f"input note = {payload}" in home.gitpipe("show", str(manual)).stdout
        page = home.home / "site" / "shop" / "runs" / f"{manual}.html"
        html = wait_for(lambda: page.exists() and "Inputs" in page.read_text() and page.read_text(),
                        what="the run page with its inputs")
        assert "&lt;b&gt;&#34;x&#34;&lt;/b&gt;" in html and "<b>\"x\"" not in html

        retried = int(re.search(r"run #(\d+)", home.gitpipe("retry", str(manual), check=True).stdout)[1])
        run = home.expect(home.wait_run(retried))
        assert run["inputs"] == {"version": "2.0", "channel": "beta", "note": payload}
        assert (out / f"inputs-{retried}").read_text() == f"2.0|beta|{payload}"


# ---------------------------------------------------------------------------- gitpipe artifacts
ARTIFACTS = pipeline("""
    [[stage]]
    name = "build"
      [[stage.action]]
      name = "make"
      run = "mkdir -p dist site/css && echo wheel-bytes > dist/app.whl && echo '<h1>' > site/index.html && echo body > site/css/a.css"
      outputs = { wheel = "dist/app.whl", site = "site/**" }
    """)


def test_artifacts_lists_downloads_and_refuses_a_corrupted_one(home: Home, tmp_path: Path) -> None:
    repo = home.add_repo("shop")
    with home.daemon():
        run_id = home.push_run(repo, {".pipeline.toml": ARTIFACTS})
        run = home.expect(home.wait_run(run_id))
    listed = json.loads(home.gitpipe("artifacts", str(run_id), "--json", check=True).stdout)
    assert [(a["name"], a["action"], a["size"], a["sha256"]) for a in listed] == \
        [(a["name"], a["action"], a["size"], a["sha256"]) for a in run["artifacts"]]
    assert [a["files"] for a in listed] == [1, 2]
    text = home.gitpipe("artifacts", str(run_id), check=True).stdout
    assert "wheel" in text and listed[0]["sha256"] in text and "from make" in text

    one = tmp_path / "one"
    proc = home.gitpipe("artifacts", str(run_id), "wheel", "--out", str(one), check=True)
    assert "sha256 checked" in proc.stdout
    whl = (one / "dist" / "app.whl").read_bytes()
    assert whl == b"wheel-bytes\n" and hashlib.sha256(whl).hexdigest() == listed[0]["sha256"]
    every = tmp_path / "every"
    home.gitpipe("artifacts", str(run_id), "--out", str(every), check=True)
    assert (every / "wheel" / "dist" / "app.whl").exists()
    assert (every / "site" / "site" / "css" / "a.css").read_text() == "body\n"

    # nothing is overwritten, and nothing is written when one file is in the way
    proc = home.gitpipe("artifacts", str(run_id), "--out", str(every))
    one_line_error(proc, "already exists", "nothing was written", code=2)

    stored = home.home / "artifacts" / str(run_id) / "site" / "site" / "css" / "a.css"
    stored.write_text("tampered\n")
    dest = tmp_path / "bad"
    proc = home.gitpipe("artifacts", str(run_id), "site", "--out", str(dest))
    one_line_error(proc, 'artifact "site"', '"site/css/a.css" does not match its sha256', code=1)
    assert list(dest.iterdir()) == []  # no partial file, no staging folder
    proc = home.gitpipe("artifacts", str(run_id), "wheel", "--out", str(dest), check=True)  # the other one is fine
    assert (dest / "dist" / "app.whl").exists()

    shutil.rmtree(home.home / "artifacts" / str(run_id))  # as keep_runs prunes it
    proc = home.gitpipe("artifacts", str(run_id), "wheel", "--out", str(tmp_path / "gone"))
    one_line_error(proc, 'artifact "wheel"', "is gone", "keep_runs", code=1)
    one_line_error(home.gitpipe("artifacts", str(run_id), "wheels"), 'no artifact "wheels"',
                   "artifacts: wheel, site", code=2)
    one_line_error(home.gitpipe("artifacts", "999"), "unknown run #999", f"runs #1 to #{run_id} exist", code=2)


# ---------------------------------------------------------------------------- gitpipe runs filters
VALID = pipeline("""
    [[stage]]
    name = "s"
      [[stage.action]]
      name = "a"
      run = "true"
    """)


def test_runs_filters_by_status_ref_and_time(home: Home) -> None:
    repo = home.add_repo("shop")  # no daemon: a valid pipeline's run stays queued, an invalid one fails
    queued_main = home.push_run(repo, {".pipeline.toml": VALID})
    failed_main = home.push_run(repo, {".pipeline.toml": "[[stage]]\nname = 1\n"})
    failed_feat = home.push_run(repo, {"y": "1"}, branch="feat/login")
    queued_rel = home.push_run(repo, {".pipeline.toml": VALID}, branch="release/1.x")

    def ids(*args: str) -> list[int]:
        return [r["id"] for r in home.runs(*args)]

    assert ids("--status", "failed") == [failed_feat, failed_main]
    assert ids("--status", "failed", "--ref", "main") == [failed_main]
    assert ids("--status", "queued,failed", "--ref", "release/*") == [queued_rel]
    assert ids("--status", "queued", "--status", "cancelled") == [queued_rel, queued_main]
    assert ids("--ref", "refs/heads/feat/login") == [failed_feat]
    assert ids("--ref", "login") == []  # a name is the whole branch name
    assert ids("--since", "2d") == [queued_rel, failed_feat, failed_main, queued_main]
    assert ids("--since", "2999-01-01") == []
    third = next(r for r in home.runs() if r["id"] == failed_feat)["created_at"]
    assert ids("--since", third) == [queued_rel, failed_feat]
    assert ids("shop", "--status", "failed", "--limit", "1") == [failed_feat]
    text = home.gitpipe("runs", "--status", "failed", "--ref", "main", check=True).stdout
    assert f"#{failed_main}" in text and f"#{failed_feat} " not in text
    assert "no runs match" in home.gitpipe("runs", "--since", "2999-01-01", check=True).stdout

    one_line_error(home.gitpipe("runs", "--status", "broken"), '"broken" is not a run status',
                   "queued, running, waiting, succeeded, failed, cancelled")
    one_line_error(home.gitpipe("runs", "--since", "yesterday"), '"yesterday" is neither a duration nor a date', "2d")
    one_line_error(home.gitpipe("runs", "nope", "--status", "failed"), 'unknown repo "nope"')


# ---------------------------------------------------------------------------- badges
def test_badges_follow_each_branch_and_draw_in_chromium(home: Home) -> None:
    home.configure('site_url = "https://ci.example.com"\n')
    repo = home.add_repo("shop")
    site = home.home / "site" / "shop"
    fail = VALID.replace('run = "true"', 'run = "exit 3"')
    with home.daemon():
        first = home.push_run(repo, {".pipeline.toml": VALID})
        home.expect(home.wait_run(first))
        wait_for(lambda: (site / "badge.svg").exists() and "succeeded" in (site / "badge.svg").read_text(),
                 what="the default branch's badge")
        assert (site / "badge" / "main.svg").read_text() == (site / "badge.svg").read_text()

        rel = home.push_run(repo, {".pipeline.toml": fail}, branch="release/1.x")
        other = home.push_run(repo, {".pipeline.toml": fail}, branch="feat/ünï")
        home.wait_runs([rel, other])
        rel_badge = site / "badge" / "release" / "1.x.svg"
        wait_for(lambda: rel_badge.exists() and "failed" in rel_badge.read_text(), what="the branch's badge")
        odd_badge = site / "badge" / "feat" / "%C3%BCn%C3%AF.svg"
        wait_for(odd_badge.exists, what="the badge of a branch with non-ASCII characters")
        assert "succeeded" in (site / "badge.svg").read_text()  # other branches leave it alone

        broken = home.push_run(repo, {".pipeline.toml": fail})
        home.expect(home.wait_run(broken), "failed")
        wait_for(lambda: "failed" in (site / "badge.svg").read_text(), what="the badge re-rendered")

    index = (site / "index.html").read_text()
    assert ("[![shop](https://ci.example.com/shop/badge.svg)](https://ci.example.com/shop/index.html)"
            in index)
    assert 'aria-label="shop: failed"' in index  # the badge itself, inline
    assert all(p.resolve().is_relative_to(site.resolve()) for p in site.rglob("*.svg"))
    (site / "badge.svg").unlink()
    home.gitpipe("report", check=True)  # rebuilds the badges too
    assert "failed" in (site / "badge.svg").read_text() and "failed" in rel_badge.read_text()

    with browser() as b:
        page, console = open_page(b, (site / "badge.svg").as_uri())
        boxes = page.evaluate("""() => [...document.querySelectorAll('g[clip-path] rect[fill^="#"]')].map(r => r.getBBox().width)
            .concat([...document.querySelectorAll('text:not([fill])')].map(t => t.getBBox().width))""")
        label_rect, status_rect, label_text, status_text = boxes
        assert label_text < label_rect and status_text < status_rect, boxes  # the words fit their halves
        assert page.evaluate("() => document.querySelector('svg').getAttribute('aria-label')") == "shop: failed"
        screenshot(page, "badge-failed", full=False)
        repo_page, console2 = open_page(b, (site / "index.html").as_uri())
        shown = repo_page.evaluate("() => document.querySelector('.badge-svg svg').getBoundingClientRect().width")
        assert shown > 40
        screenshot(repo_page, "badge-repo-page")
        assert not console.problems() and not console2.problems()


def test_approve_with_neither_a_home_nor_a_daemon_names_the_home(tmp_path: Path) -> None:
    proc = subprocess.run([GITPIPE, "approve", "3", "--home", str(tmp_path / "nowhere")], env=base_env(),
                          capture_output=True, text=True, timeout=60, check=False)
    one_line_error(proc, str(tmp_path / "nowhere"), "does not exist", "gitpipe init", code=2)


def test_badge_paths_stay_under_badge_and_never_collide() -> None:
    from gitpipe.report import badge

    names = ["main", "release/1.x", "x", "x.svg/y", "../../etc/passwd", ".hidden/a", "a b", "%41", "A", "fé/ü"]
    paths = {n: badge.href("shop", n) for n in names}
    assert paths["main"] == "shop/badge/main.svg" and paths["release/1.x"] == "shop/badge/release/1.x.svg"
    assert badge.href("shop", None) == "shop/badge.svg"
    assert len(set(paths.values())) == len(names)  # no two branches share a file
    for path in paths.values():
        parts = path.split("/")
        assert parts[:2] == ["shop", "badge"] and not any(p in ("", ".", "..") or p.startswith(".") for p in parts)
    assert paths["x.svg/y"] != paths["x"] and not paths["x.svg/y"].startswith(paths["x"].removesuffix(".svg") + ".svg/")


def test_a_nul_byte_in_an_input_or_env_value_is_a_pipeline_error(home: Home) -> None:
    """A pushed pipeline whose input default or [env] value holds "\\u0000": no variable can hold it
    (execve refuses), so `validate` and the run name the key, never "internal error"."""
    repo = home.add_repo("shop")
    text = pipeline("""
        [inputs.note]
        default = "a\\u0000b"
        [env]
        GREETING = "hi\\u0000there"

        [[stage]]
        name = "s"
          [[stage.action]]
          name = "show"
          run = 'echo "$GITPIPE_INPUT_NOTE"'
        """)
    (home.root / "nul.toml").write_text(text)
    proc = home.gitpipe("validate", str(home.root / "nul.toml"))
    assert proc.returncode != 0
    assert "[inputs.note]: \"default\" holds a NUL" in proc.stderr, proc.stderr
    assert "GREETING" in proc.stderr and "NUL" in proc.stderr, proc.stderr
    with home.daemon():
        run = home.wait_run(home.push_run(repo, {".pipeline.toml": text}))
    assert run["status"] == "failed"
    assert "internal error" not in json.dumps(run) and "NUL" in json.dumps(run), run


def test_connections_that_send_a_byte_at_a_time_do_not_hold_the_control_socket(
        home: Home, socket_dir: Path) -> None:
    """Any local account may connect. Eight connections that each send one byte every few
    seconds (never a whole line) must lose their slot after the 10 s a request may take in
    all, not hold every slot for as long as they keep dripping (16 KiB: hours)."""
    sock = socket_dir / "gitpipe.sock"
    home.configure(f'control_socket = "{sock}"\n')

    def ask() -> dict[str, object]:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(30)
            conn.connect(str(sock))
            try:
                conn.sendall(b'{"op": "approve", "run": 999, "comment": null}\n')
            except BrokenPipeError:
                pass  # "busy" answers at once and closes
            return dict(json.loads(conn.makefile("rb").readline()))

    with home.daemon():
        wait_for(sock.is_socket, what="the control socket")
        drips = []
        for _ in range(8):
            conn = socket.socket(socket.AF_UNIX)
            conn.connect(str(sock))
            drips.append(conn)
        try:
            assert "busy" in str(ask()["error"])  # all eight slots are held
            for second in range(30):  # a byte every 2 s: each recv() returns well within 10 s
                if second % 2 == 0:
                    for conn in drips:
                        try:
                            conn.send(b" ")
                        except OSError:
                            pass  # the daemon dropped it: what should happen
                if second >= 14:
                    answer = ask()
                    if "busy" not in str(answer.get("error")):
                        break
                time.sleep(1)
            assert "busy" not in str(answer.get("error")), answer
        finally:
            for conn in drips:
                conn.close()


def test_a_pushed_input_default_cannot_forge_lines_of_gitpipe_show(home: Home) -> None:
    """`gitpipe show` is how an operator reads who approved what. A pushed pipeline's input default
    (or an approver's comment) with a newline must stay on its own line, not print a fake one."""
    repo = home.add_repo("shop")
    fake = "approval sign-off: approved by alice at 2026-01-01T00:00:00Z"
    text = pipeline(f"""
        [inputs.note]
        default = "x\\n  {fake}"

        [[stage]]
        name = "s"
          [[stage.action]]
          name = "show"
          run = "true"
        """)
    with home.daemon():
        run_id = home.push_run(repo, {".pipeline.toml": text})
        home.expect(home.wait_run(run_id))
    shown = home.gitpipe("show", str(run_id)).stdout
    assert f"  {fake}" not in shown.splitlines(), shown
    assert f"input note = x\\n  {fake}" in shown, shown


def test_artifacts_out_never_writes_through_a_symlink_in_the_destination(home: Home, tmp_path: Path) -> None:
    """--out in a folder another account can write (/tmp/x): a link it put there (site -> a
    folder of the admin's) must not take the download, whose file names the pusher chose."""
    repo = home.add_repo("shop")
    with home.daemon():
        run_id = home.push_run(repo, {".pipeline.toml": ARTIFACTS})
        home.expect(home.wait_run(run_id))
    victim, dest = tmp_path / "victim", tmp_path / "shared"
    victim.mkdir()
    dest.mkdir()
    (dest / "site").symlink_to(victim)
    proc = home.gitpipe("artifacts", str(run_id), "--out", str(dest))
    one_line_error(proc, str(dest / "site"), "symbolic link", "nothing was written", code=2)
    assert list(victim.iterdir()) == []
    assert sorted(p.name for p in dest.iterdir()) == ["site"]
