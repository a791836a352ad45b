"""Tests of the `gitpipe` command line: help and docs for every command, and errors a user
can cause printed as one line, no traceback, with the documented exit status."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
from pathlib import Path

import pytest
from helpers import GITPIPE, Home, base_env, git, one_line_error, pipeline

from gitpipe import cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

GOOD = pipeline("""
    [[stage]]
    name = "build"
      [[stage.action]]
      name = "a"
      run = "echo hi"
    """)
BAD = pipeline("""
    [pipeline]
    timeout = "forever"

    [[stage]]
    name = "build"
      [[stage.action]]
      name = "a"
      shell = "echo hi"
    """)


def commands() -> list[tuple[str, ...]]:
    """Every command of the parser, as the words that name it (`repo add` is two)."""
    found: list[tuple[str, ...]] = []

    def walk(parser: argparse.ArgumentParser, prefix: tuple[str, ...]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    subs = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
                    if subs:
                        walk(sub, (*prefix, name))
                    else:
                        found.append((*prefix, name))

    walk(cli.build_parser(), ())
    return found


def bare_gitpipe(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`gitpipe` with no home set anywhere but in `args`."""
    return subprocess.run([GITPIPE, *args], env=base_env(), cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)


# ---------------------------------------------------------------------------- help and docs


def test_the_parser_has_the_core_commands() -> None:
    names = {" ".join(c) for c in commands()}
    core = {"init", "repo add", "repo list", "repo remove", "serve", "run", "runs", "show", "logs", "cancel",
            "retry", "validate"}
    assert core <= names, core - names


@pytest.mark.parametrize("words", commands(), ids=" ".join)
def test_every_command_has_help(words: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main([*words, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: gitpipe {' '.join(words)}")
    description = text.split("\n\n")[1].strip()
    assert len(description) > 10 and not description.startswith(("positional", "options")), text
    assert "--home" in text


def test_gitpipe_help_lists_every_command() -> None:
    proc = bare_gitpipe("--help")
    assert proc.returncode == 0
    for words in commands():
        assert re.search(rf"^\s+{re.escape(words[0])}\b", proc.stdout, re.MULTILINE), words


def test_every_command_appears_in_the_readme() -> None:
    if not README.exists():
        pytest.xfail("README not written yet")
    text = README.read_text()
    missing = [" ".join(w) for w in commands() if f"gitpipe {' '.join(w)}" not in text]
    assert missing == []


def test_no_command_prints_help_and_exits_2() -> None:
    proc = bare_gitpipe()
    assert proc.returncode == 2 and "usage: gitpipe" in proc.stdout


# ---------------------------------------------------------------------------- errors a user can cause


def test_unknown_run_ids(home: Home) -> None:
    for args in (("show", "999"), ("show", "#999", "--json"), ("logs", "999"), ("cancel", "999"),
                 ("retry", "999")):
        one_line_error(home.gitpipe(*args), "unknown run #999", "gitpipe runs")


def test_a_run_id_that_is_not_a_number(home: Home) -> None:
    proc = home.gitpipe("show", "abc")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert '"abc" is not a run id' in proc.stderr


def test_unknown_repos(home: Home) -> None:
    home.add_repo("shop")
    for args in (("runs", "nope"), ("run", "nope"), ("repo", "remove", "nope")):
        one_line_error(home.gitpipe(*args), 'unknown repo "nope"', "shop")


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_home_that_does_not_exist(where: str) -> None:
    for command in (("runs",), ("show", "1"), ("repo", "list"), ("serve",)):
        args = ("--home", "/nonexistent/x", *command) if where == "before" else (*command, "--home", "/nonexistent/x")
        one_line_error(bare_gitpipe(*args), "/nonexistent/x", "does not exist", "gitpipe init")


def test_a_home_that_cannot_be_created() -> None:
    one_line_error(bare_gitpipe("init", "--home", "/dev/null/x"), "/dev/null/x")


def test_repo_add_needs_a_bare_repo(home: Home, tmp_path: Path) -> None:
    git(tmp_path, "init", "--quiet", "work")
    one_line_error(home.gitpipe("repo", "add", str(tmp_path / "work")), "is not a bare repository")
    (tmp_path / "plain").mkdir()
    one_line_error(home.gitpipe("repo", "add", str(tmp_path / "plain")), "is not a git repository", "--create")
    one_line_error(home.gitpipe("repo", "add", str(tmp_path / "missing.git")), "does not exist", "--create")
    assert home.gitpipe("repo", "list", "--json", check=True).stdout.strip() == "[]"


def test_repo_add_refuses_a_bad_name_before_creating_anything(home: Home, tmp_path: Path) -> None:
    one_line_error(home.gitpipe("repo", "add", str(tmp_path / "x.git"), "--create", "--name", "bad name"),
                   '"bad name"')
    assert not (tmp_path / "x.git").exists()
    home.add_repo("shop")
    one_line_error(home.gitpipe("repo", "add", str(tmp_path / "y.git"), "--create", "--name", "shop"),
                   'a repo named "shop" is already registered')
    assert not (tmp_path / "y.git").exists()


def test_a_bad_gitpipe_toml_key_names_key_and_line(home: Home) -> None:
    config = home.home / "gitpipe.toml"
    config.write_text(config.read_text() + "\n[repos.shop]\nreject_invalid = true\nrejectinvalid = true\n")
    line = len(config.read_text().splitlines())
    for args in (("runs",), ("repo", "list"), ("serve",)):
        one_line_error(home.gitpipe(*args), f"gitpipe.toml:{line}:", '"rejectinvalid"', "did you mean")


def test_cancel_of_a_finished_run(home: Home) -> None:
    repo = home.add_repo("shop")
    push = home.push(repo, {".pipeline.toml": GOOD})
    run_id = push.run_ids[0]
    assert home.gitpipe("cancel", str(run_id), check=True).returncode == 0
    one_line_error(home.gitpipe("cancel", str(run_id)), f"run #{run_id}", "already cancelled")


def test_run_by_hand_needs_a_commit_with_a_pipeline(home: Home) -> None:
    repo = home.add_repo("shop")
    one_line_error(home.gitpipe("run", "shop"), "main")  # no commit yet
    home.push(repo, {"README": "no pipeline"})
    one_line_error(home.gitpipe("run", "shop"), ".pipeline.toml")
    home.push(repo, {".pipeline.toml": GOOD})
    proc = home.gitpipe("run", "shop", check=True)
    assert re.match(r"run #\d+ queued for main @ [0-9a-f]{7}", proc.stdout)
    assert home.runs()[0]["trigger"] == "manual"


def test_logs_of_an_unknown_action(home: Home) -> None:
    repo = home.add_repo("shop")
    run_id = home.push(repo, {".pipeline.toml": GOOD}).run_ids[0]
    with home.daemon():
        home.wait_run(run_id)
    one_line_error(home.gitpipe("logs", str(run_id), "nope"), 'no action "nope"', "build/a")


def test_init_keeps_an_existing_configuration(home: Home) -> None:
    config = home.home / "gitpipe.toml"
    config.write_text("keep_runs = 7\n")
    home.gitpipe("init", check=True)
    assert config.read_text() == "keep_runs = 7\n"


# ---------------------------------------------------------------------------- validate


def test_validate_a_good_file(tmp_path: Path) -> None:
    (tmp_path / ".pipeline.toml").write_text(GOOD)
    proc = bare_gitpipe("validate", cwd=tmp_path)  # default: ./.pipeline.toml
    assert proc.returncode == 0 and proc.stderr == ""
    assert "ok" in proc.stdout


def test_validate_reports_every_error_as_file_line_message(tmp_path: Path) -> None:
    path = tmp_path / "ci" / "pipe.toml"
    path.parent.mkdir()
    path.write_text(BAD)
    proc = bare_gitpipe("validate", str(path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) >= 2
    for line in lines:
        assert re.match(rf"^{re.escape(str(path))}:\d+: \S", line), line
    assert any(line.startswith(f"{path}:2: ") for line in lines)  # the bad timeout
    assert any(line.startswith(f"{path}:8: ") and "shell" in line for line in lines)


def test_validate_a_file_that_does_not_exist(tmp_path: Path) -> None:
    one_line_error(bare_gitpipe("validate", cwd=tmp_path), ".pipeline.toml", "does not exist")


# ---------------------------------------------------------------------------- the sandbox at start


def serve_once(home: Home, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GITPIPE, "serve", "--burst", "--home", str(home.home)], env=env or base_env(),
                          capture_output=True, text=True, timeout=60, check=False)


def test_serve_refuses_to_start_without_bwrap_and_names_the_package(home: Home, tmp_path: Path) -> None:
    empty = tmp_path / "no-bwrap-here"
    empty.mkdir()
    proc = serve_once(home, base_env(PATH=str(empty)))
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "bubblewrap" in proc.stderr and "apt-get install -y bubblewrap" in proc.stderr
    assert 'mode = "none"' in proc.stderr and "Traceback" not in proc.stderr and len(lines) <= 3


def test_serve_as_root_refuses_mode_none_and_a_missing_build_user(home: Home) -> None:
    if os.geteuid() != 0:
        assert not os.environ.get("CI"), "CI runs as root, as the README's command does"
        pytest.skip("what a root daemon refuses")
    home.configure('[sandbox]\nmode = "none"\n')
    proc = serve_once(home)
    assert proc.returncode == 2 and "uid 0" in proc.stderr and "Traceback" not in proc.stderr
    (home.home / "gitpipe.toml").write_text('[sandbox]\nuser = "no-such-user-gp"\n')
    proc = serve_once(home)
    assert proc.returncode == 2 and '"no-such-user-gp"' in proc.stderr and "useradd" in proc.stderr


@pytest.mark.parametrize("table, key", [
    ('mode = "docker"', "mode"), ('memory = "lots"', "memory"), ("pids = 3", "pids"),
    ("network = 1", "network"), ('read_write = ["relative/path"]', "read_write"), ("colour = 1", "colour"),
])
def test_a_wrong_sandbox_setting_names_its_key_and_line(home: Home, table: str, key: str) -> None:
    home.configure(f"[sandbox]\n{table}\n")
    proc = home.gitpipe("runs")
    assert proc.returncode == 2 and "gitpipe.toml:" in proc.stderr and key in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_read_write_may_not_open_the_home_to_actions(home: Home) -> None:
    home.configure(f'[sandbox]\nread_write = ["{home.home / "logs"}"]\n')
    proc = home.gitpipe("runs")
    assert proc.returncode == 2 and "gitpipe home" in proc.stderr


def test_init_makes_the_home_private_and_the_build_user(home: Home) -> None:
    assert (home.home.stat().st_mode & 0o777) == 0o700
    if os.geteuid() == 0:
        import pwd

        assert pwd.getpwnam("gitpipe-build").pw_uid != 0


# ---------------------------------------------------------------------------- terminal escapes in pushed data

# OSC 52 (a clipboard write), a title change, clear screen and home, an 8-bit CSI: what issue 14
# saw reach a terminal through `gitpipe show`.
HOSTILE = "\x1b]52;c;cHduZWQ=\x07\x1b]0;PWNED\x07\x1b[2J\x1b[H\x9b2J"
HOSTILE_SH = r"\033]52;c;cHduZWQ=\007\033]0;PWNED\007\033[2J\033[H\302\2332J"  # the same for printf
CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
HOSTILE_PIPELINE = pipeline(r"""
    [[stage]]
    name = "build"
      [[stage.action]]
      name = "out"
      run = '''
        printf 'NOTE=before HOSTILE after\n' >> "$GITPIPE_OUTPUT"
        printf 'a log line HOSTILE end\n'
      '''
    """).replace("HOSTILE", HOSTILE_SH)
# A stage name the validator refuses, and echoes in its message.
INVALID_PIPELINE = pipeline("""
    [[stage]]
    name = "x\\u001b]0;PWNED\\u0007\\u001b[2Jy"
      [[stage.action]]
      name = "a"
      run = "true"
    """)


def controls_in(text: str) -> list[str]:
    """Control characters (ESC, BEL, C1, bidi overrides, ...) in `text`; tab and newline are fine."""
    return CONTROLS.findall(text)


def on_a_terminal(home: Home, *args: str) -> str:
    """What `gitpipe ARGS` writes to a terminal (a pty), stdout and stderr together."""
    import pty

    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(home.argv(*args), env=home.env(), stdin=subprocess.DEVNULL, stdout=slave,
                                stderr=slave, cwd=home.root)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the other side closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        proc.wait(timeout=60)
    finally:
        os.close(master)
    return b"".join(chunks).decode("utf-8", errors="replace")


def test_no_escape_from_pushed_data_reaches_a_terminal(home: Home) -> None:
    repo = home.add_repo("shop")
    home.commit(repo, {".pipeline.toml": HOSTILE_PIPELINE})
    clone = home.clone_of(repo)
    git(clone, "commit", "--quiet", "--amend", "-m", f"fix {HOSTILE} it\n\nbody {HOSTILE}",
        f"--author=Mal{HOSTILE}lory <m@example.org>")
    good = home.git_push(repo, "HEAD:refs/heads/main")
    assert good.returncode == 0, good.stderr
    bad = home.push(repo, {".pipeline.toml": INVALID_PIPELINE})
    assert controls_in(bad.stderr) == [], bad.stderr  # the hook's lines echo the validator's message
    assert "is invalid" in bad.stderr
    with home.daemon():
        run = home.wait_run(good.run_ids[0])
        failed = home.wait_run(bad.run_ids[0])
    assert run["status"] == "succeeded" and failed["status"] == "failed"
    # JSON keeps the data, escaped as JSON escapes: no raw control byte.
    shown = home.gitpipe("show", str(run["id"]), "--json", check=True).stdout
    assert controls_in(shown) == [] and "\\u001b]52;" in shown
    assert run["outputs"][0]["value"] == f"before {HOSTILE} after"
    assert run["commit"]["author"].startswith(f"Mal{HOSTILE}lory")
    for args in (("show", str(run["id"])), ("show", str(failed["id"])), ("runs",), ("runs", "--json"),
                 ("logs", str(run["id"])), ("show", str(failed["id"]), "--json")):
        proc = home.gitpipe(*args)
        assert controls_in(proc.stdout + proc.stderr) == [], (args, proc.stdout, proc.stderr)
    text = home.gitpipe("show", str(run["id"])).stdout
    assert "before 2J after" in text and "Mal2Jlory" in text and "fix 2J it" in text
    assert "x\\x1b]0;PWNED" in home.gitpipe("show", str(failed["id"])).stdout  # the escape shown, not done
    # On a terminal: colours (SGR) are the only escapes left.
    for args in (("show", str(run["id"])), ("show", str(failed["id"])), ("runs",), ("logs", str(run["id"]))):
        out = re.sub(r"\x1b\[[0-9;]*m", "", on_a_terminal(home, *args))
        assert controls_in(out.replace("\r\n", "\n")) == [], (args, out)


def test_no_escape_from_a_deploy_reaches_environments(home: Home) -> None:
    from gitpipe import settings as settings_mod
    from gitpipe.store import Store

    home.add_repo("shop")
    store = Store(settings_mod.load(home.home))
    store.add_release("shop", "prod", f"1-abc{HOSTILE}", "deployed", [f"file:///srv/{HOSTILE}"],
                      by=f"bob{HOSTILE}", message=f"remote said {HOSTILE}")
    store.close()
    proc = home.gitpipe("environments", "shop", check=True)
    assert controls_in(proc.stdout) == [] and "remote said" in proc.stdout
    proc = home.gitpipe("environments", "shop", "--json", check=True)
    assert controls_in(proc.stdout) == [] and "remote said" in proc.stdout
    out = re.sub(r"\x1b\[[0-9;]*m", "", on_a_terminal(home, "environments", "shop"))
    assert controls_in(out.replace("\r\n", "\n")) == [], out


def test_validate_shows_an_escape_in_the_file_without_doing_it(tmp_path: Path) -> None:
    (tmp_path / ".pipeline.toml").write_text(INVALID_PIPELINE)
    proc = bare_gitpipe("validate", cwd=tmp_path)
    assert proc.returncode == 1 and controls_in(proc.stderr) == [], proc.stderr
    assert "x\\x1b]0;PWNED\\x07\\x1b[2Jy" in proc.stderr


def test_a_refused_push_prints_no_escape(home: Home) -> None:
    repo = home.add_repo("shop")
    home.configure("[repos.shop]\nreject_invalid = true\n")
    push = home.push(repo, {".pipeline.toml": INVALID_PIPELINE}, branch="fix\u202e\u009bx")
    assert push.returncode != 0
    ours = "\n".join(line for line in push.stderr.splitlines() if "gitpipe:" in line)
    assert "rejecting fix\\u202e\\x9bx" in ours and "x\\x1b]0;PWNED" in ours
    assert controls_in(ours) == [], ours


def test_exec_prints_no_escape(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.init()
    work = tmp_path / "work"
    work.mkdir()
    git(work, "init", "-q")
    (work / ".pipeline.toml").write_text(HOSTILE_PIPELINE + pipeline(r"""
        [[stage]]
        name = "fail"
          [[stage.action]]
          name = "bad"
          run = '''printf 'FAILING HOSTILE\n''''
          outputs = { x = "none\u001b]0;PWNED\u0007*" }
        """).replace("HOSTILE", HOSTILE_SH))
    git(work, "add", "-A")
    git(work, "commit", "-qm", "init")
    proc = subprocess.run([GITPIPE, "exec"], cwd=work, env=base_env(GITPIPE_HOME=str(home.home)),
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1 and "FAILING" in proc.stdout and "a log line" in proc.stdout, proc.stdout
    assert "PWNED" in proc.stdout  # the glob, quoted by the action's message
    assert controls_in(proc.stdout + proc.stderr) == [], proc.stdout + proc.stderr


def test_the_push_line_shows_a_branch_names_control_characters_escaped(home: Home) -> None:
    """git allows C1 controls and bidi marks in a branch name (not ASCII controls): the push
    output names the run's branch with them escaped, never as the characters."""
    repo = home.add_repo("names")
    branch = "feat\u009b2J\u202eevil"
    push = home.push(repo, {".pipeline.toml": GOOD}, branch=branch)
    assert push.returncode == 0, push.stderr
    line = next(x for x in push.gitpipe_lines if "queued for" in x)
    assert "\u009b" not in line and "\u202e" not in line
    assert "feat\\x9b2J\\u202eevil" in line


def test_every_toml_example_in_the_readme_is_valid(home: Home, tmp_path: Path) -> None:
    """The README's pipeline examples pass `gitpipe validate` (a later one continues the ones
    before it), and its gitpipe.toml examples load (issue 15: an example failed validation)."""
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)
    pipelines = [b for b in blocks if "[[stage]]" in b or "[[notify]]" in b]
    hosts = [b for b in blocks if b not in pipelines]
    assert pipelines and hosts
    text = ""
    for n, block in enumerate(pipelines, 1):
        text += block + "\n"
        path = tmp_path / f"example-{n}.toml"
        path.write_text(text)
        proc = home.gitpipe("validate", str(path))
        assert proc.returncode == 0, f"README pipeline example {n}:\n{proc.stdout}{proc.stderr}"
    for block in hosts:
        (home.home / "gitpipe.toml").write_text(block)
        proc = home.gitpipe("runs")
        assert proc.returncode == 0, f"README gitpipe.toml example:\n{block}\n{proc.stderr}"
