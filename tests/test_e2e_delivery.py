"""End-to-end delivery: approvals, deploys over a real sshd and file://, rollbacks, secrets,
protected refs and notifications, all through real pushes to a real daemon."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.helpers import GITPIPE, Home, base_env, pipeline, wait_for
from tests.sshd import SshServer, sshd_server  # noqa: F401  (the `sshd` fixture)
from tests.webhook import webhook_server  # noqa: F401  (the `webhook` fixture)

SECRET = "s3cr3t-Value-42x"


def site(name: str = "site") -> str:
    return f"""
        [[stage]]
        name = "build"
          [[stage.action]]
          name = "build"
          run = "mkdir -p out && echo \\"v $GITPIPE_RUN\\" > out/index.html && echo ok > out/health"
          outputs = {{ {name} = "out/**" }}
    """


def deploy_stage(env: str, targets: list[str], extra: str = "") -> str:
    listed = ", ".join(f'"{t}"' for t in targets)
    return f"""
        [[stage]]
        name = "{env}"
          [[stage.action]]
          name = "deploy-{env}"
          type = "deploy"
          environment = "{env}"
          inputs = ["site"]
          source = "out"
          target = [{listed}]
          {extra}
    """


def current(path: Path) -> str:
    return os.readlink(path / "current")


@pytest.fixture
def home(tmp_path: Path) -> Home:
    h = Home(tmp_path)
    h.init()
    return h


def test_deploy_over_ssh_to_two_hosts_and_rollback_command(home: Home, sshd: SshServer, tmp_path: Path) -> None:
    config = home.home / "gitpipe.toml"
    config.write_text(config.read_text().replace('known_hosts = "known_hosts"', f'known_hosts = "{sshd.known_hosts}"')
                      .replace('identity = ""', f'identity = "{sshd.identity}"'))
    repo = home.add_repo("shop")
    web1, web2 = tmp_path / "web1", tmp_path / "web2"
    text = pipeline(site() + deploy_stage("production", [sshd.url(web1), sshd.url(web2)],
                                          'healthcheck = "grep -q ok health"'))
    with home.daemon():
        first = home.expect(home.wait_run(home.push_run(repo, {".pipeline.toml": text})))
        second = home.expect(home.wait_run(home.push_run(repo, {"README": "two"})))
    rel1 = f"releases/{first['id']}-{first['sha'][:7]}"
    rel2 = f"releases/{second['id']}-{second['sha'][:7]}"
    assert current(web1) == current(web2) == rel2
    envs = json.loads(home.gitpipe("environments", "shop", "--json", check=True).stdout)
    assert envs[0]["environment"] == "production"
    assert envs[0]["current"]["run_id"] == second["id"]
    proc = home.gitpipe("rollback", "shop", "production", check=True)
    assert "rolled back" in proc.stdout
    assert current(web1) == current(web2) == rel1
    envs = json.loads(home.gitpipe("environments", "shop", "--json", check=True).stdout)
    latest = envs[0]["history"][0]
    assert latest["status"] == "rolled-back" and latest["by_user"] and latest["by_run"] is None
    assert (latest["run_id"], latest["sha"]) == (first["id"], first["sha"])  # the release's own run and sha
    assert latest["from_release"] == rel2.split("/")[1]
    assert envs[0]["current"]["release"] == rel1.split("/")[1]


def test_failed_healthcheck_rolls_back_every_target_and_notifies(home: Home, tmp_path: Path,
                                                                  webhook: tuple[str, list[dict]]) -> None:
    url, received = webhook
    repo = home.add_repo("shop")
    a, b = tmp_path / "a", tmp_path / "b"
    marks = tmp_path / "after_switch.log"
    notify = f'[[notify]]\non = ["deployed", "rolled-back", "failed"]\nwebhook = "{url}"\n'
    text = pipeline(site() + deploy_stage(
        "staging", [f"file://{a}", f"file://{b}"],
        f'healthcheck = "test -f {tmp_path}/healthy"\n          healthcheck_retries = 1\n'
        f'          after_switch = "echo $GITPIPE_RELEASE >> {marks}"')) + notify
    (tmp_path / "healthy").write_text("yes")
    with home.daemon():
        good = home.expect(home.wait_run(home.push_run(repo, {".pipeline.toml": text})))
        (tmp_path / "healthy").unlink()
        bad = home.expect(home.wait_run(home.push_run(repo, {"README": "broken"})), "failed")
        wait_for(lambda: any(e["event"] == "rolled-back" for e in received), 30, what="the webhook")
    good_rel = f"releases/{good['id']}-{good['sha'][:7]}"
    assert current(a) == current(b) == good_rel
    assert "switched back" in home.action(bad, "deploy-staging")["message"]
    [deploy_log] = [p for p in home.log_files(bad["id"]) if "-deploy." in p.name]
    last = deploy_log.read_text().splitlines()[-1]  # a deploy's log ends with why, as a script's does
    assert "gitpipe: attempt 1 failed: " in last and "switched back" in last, last
    ran = marks.read_text().split()
    assert ran[-1].endswith(good_rel.split("/")[1]), ran  # after_switch ran again for the restored release
    events = [(e["event"], e["run"]) for e in received]
    assert ("deployed", good["id"]) in events and ("rolled-back", bad["id"]) in events
    assert ("failed", bad["id"]) in events
    hist = json.loads(home.gitpipe("environments", "shop", "--json", check=True).stdout)[0]["history"]
    assert [(h["status"], h["run_id"]) for h in hist[:3]] == [
        ("rolled-back", good["id"]), ("failed", bad["id"]), ("deployed", good["id"])]


APPROVAL = """
    [[stage]]
    name = "gate"
      [[stage.action]]
      name = "sign-off"
      type = "approval"
      message = "Ship {short_sha}?"
      timeout = "TIMEOUT"
    [[stage]]
    name = "after"
      [[stage.action]]
      name = "count"
      run = "echo once >> COUNT"
"""


def test_approval_survives_kill_9_and_proceeds_exactly_once(home: Home, tmp_path: Path) -> None:
    repo = home.add_repo("shop")
    home.share(tmp_path / "out")
    count = tmp_path / "out" / "count"
    text = pipeline(APPROVAL.replace("TIMEOUT", "1h").replace("COUNT", str(count)))
    log = open(tmp_path / "d.log", "wb")  # noqa: SIM115 - closed below
    daemon = subprocess.Popen([GITPIPE, "serve", "--home", str(home.home)], env=base_env(), stdout=log,
                              stderr=log)
    run_id = home.push_run(repo, {".pipeline.toml": text})
    home.wait_status(run_id, "waiting")
    early = home.gitpipe("approve", str(run_id + 1))
    assert early.returncode == 2 and "unknown run" in early.stderr
    daemon.send_signal(signal.SIGKILL)
    daemon.wait()
    log.close()
    assert home.status(run_id) == "waiting"
    proc = home.gitpipe("approve", str(run_id), "--comment", "looks good", check=True)
    assert "approved" in proc.stdout
    again = home.gitpipe("approve", str(run_id))
    assert again.returncode == 2 and "not waiting" in again.stderr and "Traceback" not in again.stderr
    with home.daemon():
        run = home.expect(home.wait_run(run_id))
    assert count.read_text().split() == ["once"]
    assert run["approvals"][0]["decision"] == "approved" and run["approvals"][0]["comment"] == "looks good"
    assert run["approvals"][0]["message"] == f"Ship {run['sha'][:7]}?"


def test_reject_and_timeout_fail_the_run_with_the_reason(home: Home, tmp_path: Path) -> None:
    repo = home.add_repo("shop")
    with home.daemon():
        text = pipeline(APPROVAL.replace("TIMEOUT", "1h").replace("COUNT", str(tmp_path / "c")))
        run_id = home.push_run(repo, {".pipeline.toml": text})
        home.wait_status(run_id, "waiting")
        home.gitpipe("reject", str(run_id), "--comment", "not today", check=True)
        run = home.expect(home.wait_run(run_id), "failed")
        assert "rejected by" in home.action(run, "sign-off")["message"]
        assert "not today" in home.action(run, "sign-off")["message"]
        assert home.action(run, "count")["status"] == "skipped"
        text = pipeline(APPROVAL.replace("TIMEOUT", "2s").replace("COUNT", str(tmp_path / "c")))
        timed = home.expect(home.wait_run(home.push_run(repo, {".pipeline.toml": text})), "failed")
        assert home.action(timed, "sign-off")["status"] == "timed-out"
        assert home.action(timed, "sign-off")["message"].startswith("timed out after 2s")
    assert not (tmp_path / "c").exists()
    # A timeout is a decision: not "waiting", in show, its JSON and the run's page.
    ap = timed["approvals"][0]
    assert (ap["decision"], ap["by"], ap["comment"]) == ("timed-out", "gitpipe", "timed out after 2s") and ap["at"]
    shown = home.gitpipe("show", str(timed["id"])).stdout
    assert "approval sign-off: timed out after 2s" in shown and "waiting" not in shown, shown
    page = (home.home / "site" / "shop" / "runs" / f"{timed['id']}.html").read_text()
    approvals = page.split("Approvals", 1)[1]
    assert "timed out after 2s" in approvals and "pending" not in approvals


def write_secrets(home: Home, mode: int = 0o600) -> None:
    path = home.home / "secrets.toml"
    path.write_text(f'[shop]\nTOKEN = "{SECRET}"\n')
    os.chmod(path, mode)


def test_secrets_are_masked_everywhere(home: Home) -> None:
    write_secrets(home)
    repo = home.add_repo("shop")
    text = pipeline(r"""
        [[stage]]
        name = "leak"
          [[stage.action]]
          name = "leak"
          secrets = ["TOKEN"]
          run = '''
            echo "plain $TOKEN"
            printf '%s' "${TOKEN:0:5}"; sleep 0.3; printf '%s\n' "${TOKEN:5}"
            echo "b64 $(printf '%s' "$TOKEN" | base64)"
            echo "url $(python3 -c 'import os,urllib.parse;print(urllib.parse.quote(os.environ["TOKEN"]))')"
            echo "VALUE=$TOKEN" >> "$GITPIPE_OUTPUT"
          '''
        """)
    with home.daemon():
        run = home.expect(home.wait_run(home.push_run(repo, {".pipeline.toml": text})))
    forms = [SECRET.encode(), base64.b64encode(SECRET.encode())]
    for path in [*home.home.rglob("*")]:
        if path.is_file() and path.name != "secrets.toml":
            data = path.read_bytes()
            for form in forms:
                assert form not in data, f"the secret is in {path}"
    logs = home.logs(run["id"])
    assert SECRET not in logs and logs.count("***") >= 4
    assert run["outputs"][0]["value"] == "***"


def test_unprotected_ref_gets_no_secrets_and_cannot_deploy(home: Home, tmp_path: Path) -> None:
    write_secrets(home)
    repo = home.add_repo("shop")
    text = pipeline("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "uses-secret"
          secrets = ["TOKEN"]
          run = "echo $TOKEN"
        """)
    deploy_text = pipeline(site() + deploy_stage("staging", [f"file://{tmp_path}/t"]))
    with home.daemon():
        home.expect(home.wait_run(home.push_run(repo, {".pipeline.toml": text})))  # main: protected
        run = home.expect(home.wait_run(home.push_run(repo, {"x": "1"}, branch="feature/x")), "failed")
        message = home.action(run, "uses-secret")["message"]
        assert 'ref "feature/x" is not protected' in message and "[repos.shop] protected" in message
        run = home.expect(home.wait_run(home.push_run(repo, {".pipeline.toml": deploy_text},
                                                      branch="feature/y")), "failed")
        assert "not protected" in home.action(run, "deploy-staging")["message"]
    assert not (tmp_path / "t").exists()


def test_loose_secrets_file_stops_the_daemon_with_a_clear_message(home: Home) -> None:
    write_secrets(home, 0o644)
    proc = subprocess.run([GITPIPE, "serve", "--home", str(home.home)], env=base_env(), capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "chmod 600" in proc.stderr and "Traceback" not in proc.stderr
    assert SECRET not in proc.stderr


def test_deploys_to_one_environment_never_overlap_oldest_first(home: Home, tmp_path: Path) -> None:
    home.configure('[repos.shop]\nprotected = ["*"]\n')
    repo = home.add_repo("shop")
    journal = tmp_path / "journal"
    text = pipeline(site() + deploy_stage(
        "staging", [f"file://{tmp_path}/target"],
        f'before_switch = "echo start $GITPIPE_RUN >> {journal}; sleep 1; echo end $GITPIPE_RUN >> {journal}"'))
    ids = [home.push_run(repo, {".pipeline.toml": text, "n": str(i)}, branch=f"b{i}") for i in range(3)]
    with home.daemon():
        home.wait_runs(ids, timeout=120)
    for run_id in ids:
        home.expect(home.show(run_id))
    lines = journal.read_text().split()
    pairs = [lines[i:i + 4] for i in range(0, 12, 4)]
    assert all(p[0] == "start" and p[2] == "end" and p[1] == p[3] for p in pairs), lines  # never overlapping
    order = [int(p[1]) for p in pairs]
    assert sorted(order) == ids and order[1:] == sorted(order[1:]), order  # the waiting ones: oldest first


def test_a_run_cancelled_while_waiting_for_the_environment_never_deploys(home: Home, tmp_path: Path) -> None:
    home.configure('[repos.shop]\nprotected = ["*"]\n')
    repo = home.add_repo("shop")
    target = tmp_path / "target"
    text = pipeline(site() + deploy_stage(
        "staging", [f"file://{target}"],
        f'before_switch = "touch {tmp_path}/in-$GITPIPE_RUN; while [ ! -e {tmp_path}/go ]; do sleep 0.1; done"'))
    with home.daemon():
        first = home.push_run(repo, {".pipeline.toml": text}, branch="a")
        wait_for(lambda: (tmp_path / f"in-{first}").exists(), 30, what="the first deploy")
        second = home.push_run(repo, {".pipeline.toml": text, "x": "2"}, branch="b")
        wait_for(lambda: home.action(home.show(second), "deploy-staging")["status"] == "running"
                 or home.action(home.show(second), "build")["status"] == "succeeded", 30, what="run 2 to wait")
        home.gitpipe("cancel", str(second), "--reason", "not this one", check=True)
        (tmp_path / "go").touch()  # the first deploy holds the environment until run 2 is cancelled
        home.expect(home.wait_run(first))
        run = home.wait_run(second)
    assert run["status"] == "cancelled"
    assert not (tmp_path / f"in-{second}").exists()
    assert current(target).startswith(f"releases/{first}-")
    hist = json.loads(home.gitpipe("environments", "shop", "--json", check=True).stdout)[0]["history"]
    assert [h["run_id"] for h in hist] == [first]


def test_cancel_while_the_daemon_is_down_checks_the_deploy_in_flight(home: Home, tmp_path: Path) -> None:
    repo = home.add_repo("shop")
    target = tmp_path / "target"
    text = pipeline(site() + deploy_stage(
        "staging", [f"file://{target}"], f'before_switch = "touch {tmp_path}/deploying; sleep 300"'))
    with open(tmp_path / "d.log", "wb") as log:
        daemon = subprocess.Popen([GITPIPE, "serve", "--home", str(home.home)], env=base_env(), stdout=log,
                                  stderr=log)
    run_id = home.push_run(repo, {".pipeline.toml": text})
    wait_for(lambda: (tmp_path / "deploying").exists(), 30, what="the deploy")
    daemon.send_signal(signal.SIGKILL)
    daemon.wait()
    home.gitpipe("cancel", str(run_id), "--reason", "changed my mind", check=True)
    with home.daemon():
        run = home.wait_run(run_id)
    assert run["status"] == "cancelled" and run["cancel_reason"] == "changed my mind"
    action = home.action(run, "deploy-staging")
    assert action["status"] == "failed" and "not run again" in action["message"]
    assert not (target / "current").exists()
    hist = json.loads(home.gitpipe("environments", "shop", "--json", check=True).stdout)[0]["history"]
    assert hist[0]["status"] == "failed" and hist[0]["run_id"] == run_id


def test_a_broken_gitpipe_toml_does_not_lose_a_push(home: Home) -> None:
    repo = home.add_repo("shop")
    config = home.home / "gitpipe.toml"
    config.write_text(config.read_text() + "\nnot_a_setting = 1\n")
    text = pipeline('[[stage]]\nname = "s"\n  [[stage.action]]\n  name = "a"\n  run = "true"\n')
    push = home.push(repo, {".pipeline.toml": text})
    assert push.returncode == 0 and len(push.run_ids) == 1, push.stderr
    assert 'unknown key "not_a_setting"' in push.stderr
    assert home.status(push.run_ids[0]) == "queued"


def test_a_pipelines_notify_command_runs_confined_with_only_the_documented_variables(
        home: Home, tmp_path: Path) -> None:
    """A [[notify]] command comes from the pushed file: it gets the event, never the host."""
    write_secrets(home)
    out = tmp_path / "out"
    home.share(out)
    repo = home.add_repo("shop")
    text = pipeline(f"""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "a"
          run = "true"
        [[notify]]
        on = ["succeeded"]
        command = '''
          cat > {out}/event.json
          env > {out}/env
          cat {home.home}/secrets.toml > {out}/stolen 2>&1 || true
          ls {home.home} >> {out}/stolen 2>&1 || true
          id -u > {out}/uid
          touch {out}/done
        '''
        """)
    with home.daemon(env={"LEAKME": "1"}):
        run = home.expect(home.wait_run(home.push_run(repo, {".pipeline.toml": text}, branch="feature")))
        wait_for(lambda: (out / "done").exists(), 30, what="the notify command")
    event = json.loads((out / "event.json").read_text())
    assert event["event"] == "succeeded" and event["run"] == run["id"] and event["ref"] == "refs/heads/feature"
    env = dict(line.split("=", 1) for line in (out / "env").read_text().splitlines() if "=" in line)
    documented = {"GITPIPE_EVENT", "GITPIPE_RUN", "GITPIPE_REPO", "GITPIPE_PIPELINE", "GITPIPE_REF",
                  "GITPIPE_SHA", "GITPIPE_STATUS", "GITPIPE_ENVIRONMENT", "LANG", "TZ", "PATH", "HOME", "PWD",
                  "SHLVL", "_"}
    assert set(env) <= documented, set(env) - documented
    assert env["GITPIPE_EVENT"] == "succeeded" and env["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    stolen = (out / "stolen").read_text()
    assert SECRET not in stolen and "gitpipe.db" not in stolen
    if os.geteuid() == 0:
        assert (out / "uid").read_text().strip() != "0"


def test_a_pipelines_webhook_obeys_its_network_off(home: Home, webhook: tuple[str, list[dict]]) -> None:
    """The daemon posts a pipeline's webhooks: with `network = false` it must not reach out for it."""
    url, received = webhook
    received.clear()
    repo = home.add_repo("shop")
    text = pipeline(f"""
        [pipeline]
        network = false
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "a"
          run = "true"
        [[notify]]
        on = ["succeeded"]
        webhook = "{url}"
        """)
    with home.daemon() as daemon:
        home.expect(home.wait_run(home.push_run(repo, {".pipeline.toml": text}, branch="feature")))
        wait_for(lambda: "not sent" in daemon.log, 20, what="the daemon to say the webhook was not sent")
    assert received == []


# ---------------------------------------------------------------------------- issue 15: rollback you can rely on
BLUE_GREEN_SITE = """
    [[stage]]
    name = "build"
      [[stage.action]]
      name = "build"
      run = "mkdir -p out && echo v$GITPIPE_RUN > out/index.html && (cp BROKEN out/ 2>/dev/null || true)"
      outputs = { site = "out/**" }
"""


def healthcheck(tmp: Path) -> str:
    """Passes, except: always once `all-broken` exists; after its first check for a release holding BROKEN."""
    count = f"{tmp}/count-$GITPIPE_RUN"
    return (f"n=$(cat {count} 2>/dev/null || echo 0); echo $((n + 1)) > {count}; "
            f"[ ! -e {tmp}/all-broken ] && {{ [ ! -e BROKEN ] || [ $n -lt 1 ]; }}")


def use_sshd(home: Home, sshd: SshServer) -> None:
    config = home.home / "gitpipe.toml"
    config.write_text(config.read_text().replace('known_hosts = "known_hosts"', f'known_hosts = "{sshd.known_hosts}"')
                      .replace('identity = ""', f'identity = "{sshd.identity}"'))


def release_of(run: dict) -> str:
    return f"{run['id']}-{run['sha'][:7]}"


def test_rollback_goes_to_the_last_good_release_runs_the_scripts_and_updates_the_site(
        home: Home, sshd: SshServer, tmp_path: Path) -> None:
    use_sshd(home, sshd)
    repo = home.add_repo("shop")
    web, after = tmp_path / "web", tmp_path / "after.log"
    extra = (f"strategy = \"blue-green\"\n  healthcheck_retries = 1\n  monitor = \"3s\"\n"
             f"  monitor_interval = \"1s\"\n  healthcheck = '{healthcheck(tmp_path)}'\n"
             f"  after_switch = 'echo \"$GITPIPE_RELEASE $GITPIPE_SLOT $GITPIPE_RUN $GITPIPE_SHA\" >> {after}'")
    text = pipeline(BLUE_GREEN_SITE + deploy_stage("production", [sshd.url(web)], extra))
    with home.daemon():
        good = home.expect(home.wait_run(home.push_run(repo, {".pipeline.toml": text})))
        bad = home.expect(home.wait_run(home.push_run(repo, {"BROKEN": "yes"})), "failed")
    rel1, rel2 = release_of(good), release_of(bad)
    assert "during the monitor window" in home.action(bad, "deploy-production")["message"]

    def live() -> str:
        return os.readlink(web / os.readlink(web / "current")).removeprefix("releases/")

    def history() -> list[dict]:
        return json.loads(home.gitpipe("environments", "shop", "--json", check=True).stdout)[0]["history"]

    assert live() == rel1
    # Every row carries its release's own run and sha; the rollback row names both releases.
    rows = history()
    assert [(r["status"], r["release"], r["run_id"], r["sha"]) for r in rows] == [
        ("rolled-back", rel1, good["id"], good["sha"]), ("failed", rel2, bad["id"], bad["sha"]),
        ("deployed", rel1, good["id"], good["sha"])]
    assert rows[0]["from_release"] == rel2 and rows[0]["by_run"] == bad["id"]
    assert rows[0]["strategy"] == "blue-green" and rows[0]["idle_release"] == rel2
    # Nothing good came before release 1: the broken release 2 is no place to go back to.
    proc = home.gitpipe("rollback", "shop", "production")
    assert proc.returncode == 1, proc
    assert f"no release that was good before {rel1}" in proc.stderr
    assert live() == rel1 and len(history()) == 3

    with home.daemon():
        third = home.expect(home.wait_run(home.push_run(repo, {"BROKEN": None})))
    rel3 = release_of(third)
    assert live() == rel3
    typo = home.gitpipe("rollback", "shop", "production", "--to", "bogus")
    assert typo.returncode == 2 and "Traceback" not in typo.stderr
    assert '"bogus"' in typo.stderr and all(r in typo.stderr for r in (rel1, rel2, rel3)), typo.stderr
    assert len(history()) == 4  # a typo leaves no row

    checks = (tmp_path / f"count-{good['id']}").read_text()
    proc = home.gitpipe("rollback", "shop", "production")
    assert proc.returncode == 0, proc
    assert live() == rel1  # the release live before #3, not the broken #2
    assert f"rolled back from {rel3} to {rel1}" in proc.stdout
    assert "healthcheck passed" in proc.stdout
    assert (tmp_path / f"count-{good['id']}").read_text() != checks  # the healthcheck ran
    ran = after.read_text().splitlines()[-1].split()
    assert ran[0].endswith(f"/releases/{rel1}") and ran[1] in ("blue", "green")
    assert ran[2:] == [str(good["id"]), good["sha"]]
    row = history()[0]
    assert (row["status"], row["release"], row["from_release"], row["run_id"], row["sha"]) == (
        "rolled-back", rel1, rel3, good["id"], good["sha"])
    text_out = home.gitpipe("environments", "shop", check=True).stdout
    assert "None" not in text_out and f"{rel3} -> {rel1}" in text_out, text_out
    assert f"current {rel1} (run #{good['id']}, {good['sha'][:7]}" in text_out
    page = (home.home / "site" / "shop" / "environments.html").read_text()
    current_card = page.split('class="release"', 1)[1].split("</section>", 1)[0]
    assert rel1 in current_card and "blue-green" in current_card
    assert f"{ran[1]}" in current_card and rel3 in current_card  # the live slot, and what the idle one holds

    # A rollback whose healthcheck fails says so, loudly, and exits 1; the switch stays.
    (tmp_path / "all-broken").write_text("")
    proc = home.gitpipe("rollback", "shop", "production", "--to", rel3)
    assert proc.returncode == 1, proc
    assert "HEALTHCHECK FAILED" in proc.stderr and rel3 in proc.stderr
    assert live() == rel3
    assert "healthcheck failed" in history()[0]["message"]


def test_notifications_name_the_environment_the_failing_action_and_the_cancel_reason(
        home: Home, tmp_path: Path, webhook: tuple[str, list[dict]]) -> None:
    url, received = webhook
    out = tmp_path / "out"
    home.share(out)
    repo = home.add_repo("shop")
    notify = (f'[[notify]]\non = ["deployed", "failed", "cancelled"]\nwebhook = "{url}"\n'
              f'[[notify]]\non = ["deployed"]\ncommand = "echo $GITPIPE_EVENT {{environment}} $GITPIPE_ENVIRONMENT >> {out}/notes"\n')
    deploying = pipeline(site() + deploy_stage("staging", [f"file://{tmp_path}/target"])) + notify
    failing = pipeline(site() + '[[stage]]\nname = "test"\n  [[stage.action]]\n  name = "unit"\n  run = "exit 3"\n') + notify
    slow = pipeline('[[stage]]\nname = "s"\n  [[stage.action]]\n  name = "wait"\n  run = "sleep 60"\n') + notify

    def event(name: str, run_id: int) -> dict:
        wait_for(lambda: any((e["event"], e["run"]) == (name, run_id) for e in received), 30, what=f"{name} #{run_id}")
        return next(e for e in received if (e["event"], e["run"]) == (name, run_id))

    with home.daemon():
        deployed = home.expect(home.wait_run(home.push_run(repo, {".pipeline.toml": deploying})))
        failed = home.expect(home.wait_run(home.push_run(repo, {".pipeline.toml": failing})), "failed")
        running = home.push_run(repo, {".pipeline.toml": slow})
        home.wait_status(running, "running")
        home.gitpipe("cancel", str(running), "--reason", "wrong branch", check=True)
        home.wait_run(running)
        home.gitpipe("pause", check=True)
        queued = home.push_run(repo, {"README": "later"}, branch="other")
        home.gitpipe("cancel", str(queued), "--reason", "not needed", check=True)
        cancelled_queued = event("cancelled", queued)  # cancelled by a command, while the daemon runs
        home.gitpipe("resume", check=True)
        shipped, broke, stopped = event("deployed", deployed["id"]), event("failed", failed["id"]), \
            event("cancelled", running)
    assert shipped["environment"] == "staging" and shipped["release"] == f"{deployed['id']}-{deployed['sha'][:7]}"
    assert (out / "notes").read_text().split() == ["deployed", "staging", "staging"]
    assert broke["action"] == "test/unit" and "3" in broke["detail"], broke
    assert (stopped["reason"], stopped["cancelled_by"]) == ("wrong branch", home.show(running)["cancelled_by"])
    assert "wrong branch" in stopped["detail"]
    assert cancelled_queued["reason"] == "not needed" and cancelled_queued["status"] == "cancelled"
