"""Tests of gitpipe.settings: defaults, gitpipe.toml, and errors that name the key and the line."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from helpers import Home

from gitpipe import settings
from gitpipe.errors import ConfigError, UsageError


def load(tmp_path: Path, text: str) -> settings.Settings:
    (tmp_path / "gitpipe.toml").write_text(textwrap.dedent(text).lstrip("\n"))
    return settings.load(tmp_path)


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    assert err.value.exit_code == 2
    message = str(err.value)
    assert "\n" not in message
    return message


def test_defaults_without_a_config_file(tmp_path: Path) -> None:
    conf = settings.load(tmp_path)
    assert conf.home == tmp_path
    assert conf.max_parallel == (os.cpu_count() or 2)
    assert conf.site_dir == tmp_path / "site" and conf.site_url == ""
    assert conf.keep_runs == 500 and conf.stop_grace == 30.0
    assert conf.known_hosts == tmp_path / "known_hosts" and conf.identity is None
    assert conf.db_path == tmp_path / "gitpipe.db" and conf.logs_dir == tmp_path / "logs"
    assert conf.repo("anything") == settings.RepoSettings()


def test_values_from_gitpipe_toml(tmp_path: Path) -> None:
    conf = load(tmp_path, """
        max_parallel = 3
        site_dir = "/srv/www/ci"
        site_url = "https://ci.example.com/"
        keep_runs = 20
        stop_grace = "1m30s"

        [ssh]
        known_hosts = "hosts/known"
        identity = "keys/deploy"

        [notify]
        on = ["failed", "deployed"]
        command = "logger gitpipe"

        [repos.shop]
        protected = ["main", "v*"]
        reject_invalid = true

        [repos."my.repo"]
        reject_invalid = false
        """)
    assert (conf.max_parallel, conf.keep_runs, conf.stop_grace) == (3, 20, 90.0)
    assert conf.site_dir == Path("/srv/www/ci") and conf.site_url == "https://ci.example.com"
    assert conf.known_hosts == tmp_path / "hosts/known" and conf.identity == tmp_path / "keys/deploy"
    assert conf.notify_on == ("failed", "deployed") and conf.notify_command == "logger gitpipe"
    assert conf.repo("shop") == settings.RepoSettings(protected=("main", "v*"), reject_invalid=True)
    assert conf.repo("my.repo").reject_invalid is False


def test_the_file_gitpipe_init_writes_loads_as_the_defaults(tmp_path: Path) -> None:
    text = settings.default_config_text()
    assert text.count("\n# ") >= 5  # commented
    conf = load(tmp_path, text)
    assert conf.keep_runs == 500 and conf.site_url == "" and conf.stop_grace == 30.0


@pytest.mark.parametrize(("text", "line", "key"), [
    ("max_parallel = 2\nmax_paralel = 4\n", 2, "max_paralel"),
    ("keep_runs = 5\n\n[ssh]\nknown_hosts = 'k'\nidentitty = 'x'\n", 5, "identitty"),
    ("[notify]\non = []\nwebhok = 'https://x'\n", 3, "webhok"),
    ("[repos.a]\nprotected = ['main']\n\n[repos.shop]\nprotekted = ['main']\n", 5, "protekted"),
    # a comment after the table header, spaces inside it, a quoted name with a dot
    ("[repos.shop]   # the shop\nprotekted = []\n", 2, "protekted"),
    ("[ repos.shop ]\nreject_invalid = true\nprotekted = []\n", 3, "protekted"),
    ('[repos."my.repo"]\nprotekted = []\n', 2, "protekted"),
])
def test_an_unknown_key_is_named_with_its_line(tmp_path: Path, text: str, line: int, key: str) -> None:
    message = error(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'gitpipe.toml'}:{line}: "), message
    assert f'unknown key "{key}"' in message
    assert "did you mean" in message


@pytest.mark.parametrize(("text", "line", "words"), [
    ('max_parallel = "4"\n', 1, '"max_parallel" must be a int'),
    ("keep_runs = 0\n", 1, '"keep_runs" must be at least 1'),
    ("max_parallel = true\n", 1, '"max_parallel"'),
    ('stop_grace = "soon"\n', 1, "bad duration"),
    ("site_url = 5\n", 1, '"site_url"'),
    ('[repos.shop]\nreject_invalid = "yes"\n', 2, '"reject_invalid" must be true or false'),
    ('max_log_size = "big"\n', 1, '"max_log_size": bad size "big"'),
    ('keep_runs = 3\nmax_artifact_size = "0"\n', 2, '"max_artifact_size": bad size'),
    ('publish_artifacts = "public"\n', 1, '"publish_artifacts" must be "protected", "all" or "none"'),
    ('control_socket = "gitpipe.sock"\n', 1, '"control_socket" must be an absolute path outside the home'),
    ('control_socket = "/run/gp/gitpipe.sock"\n[sandbox]\nread_write = ["/run"]\n', 1,
     "[sandbox] /run would show actions the control socket /run/gp/gitpipe.sock"),
    ('[repos.shop]\nprotected = "main"\n', 2, '"protected" must be a list'),
    ('[notify]\non = "failed"\n', 2, '"on"'),
    ("[ssh]\nidentity = 5\n", 2, '"identity"'),
    ("keep_runs = 5\nkeep_runs = 6\n", 2, "not valid TOML"),
    ("[ssh\n", 1, "not valid TOML"),
])
def test_a_wrong_value_is_named_with_its_line(tmp_path: Path, text: str, line: int, words: str) -> None:
    message = error(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'gitpipe.toml'}:{line}: "), message
    assert words in message


def test_a_home_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist") as err:
        settings.load(tmp_path / "missing")
    assert "gitpipe init" in str(err.value)
    assert settings.load(tmp_path / "missing", must_exist=False).home == tmp_path / "missing"


def test_where_the_home_is_by_default(tmp_path: Path) -> None:
    assert settings.default_home({"GITPIPE_HOME": "/srv/gp", "XDG_DATA_HOME": "/x"}) == Path("/srv/gp")
    assert settings.default_home({"XDG_DATA_HOME": "/x"}) == Path("/x/gitpipe")
    assert settings.default_home({}) == Path.home() / ".local" / "share" / "gitpipe"
    if os.geteuid() == 0:
        assert settings.default_home({"INVOCATION_ID": "abc"}) == Path("/var/lib/gitpipe")
    assert settings.resolve_home(str(tmp_path / "a" / ".." / "b")).is_absolute()


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("10m", 600), ("2h", 7200), ("1d", 86400),
                                               ("1h30m", 5400), ("0.5s", 0.5)])
def test_durations(text: str, seconds: float) -> None:
    assert settings.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10", "ten minutes", "5x", "1h 2q"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        settings.parse_duration(text)


def test_a_gitpipe_toml_that_is_not_utf8_is_one_error_naming_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "gitpipe.toml").write_bytes(b'site_url = "https://ci.example"\n# caf\xe9 (latin-1)\n')
    with pytest.raises(ConfigError) as err:
        settings.load(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'gitpipe.toml'}:2: "), message
    assert "UTF-8" in message and "\n" not in message


def test_a_gitpipe_toml_that_is_not_utf8_stops_the_cli_and_daemon_with_one_line(home: Home) -> None:
    repo = home.add_repo("shop")
    path = home.home / "gitpipe.toml"
    path.write_bytes(path.read_bytes() + b"[repos.shop]\nreject_invalid = true\n# caf\xe9\n")
    for args in (("runs",), ("serve",)):
        proc = home.gitpipe(*args)
        assert proc.returncode == 2, proc
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert str(path) in proc.stderr and "UTF-8" in proc.stderr
    # The hooks read it too (pre-receive for reject_invalid, post-receive for site_url): the push
    # is kept and queued, and the pusher reads the same one line, no traceback.
    push = home.push(repo, {".pipeline.toml": '[[stage]]\nname = "s"\n  [[stage.action]]\n  name = "a"\n'
                                              '  run = "true"\n'})
    assert push.returncode == 0 and len(push.run_ids) == 1, push.stderr
    assert "Traceback" not in push.stderr
    assert any(str(path) in line and "UTF-8" in line for line in push.gitpipe_lines), push.stderr


def test_sizes_are_written_as_in_gitpipe_toml() -> None:
    assert settings.format_size(4 << 30) == "4G"
    assert settings.format_size(512 << 20) == "512M"
    assert settings.format_size(1000) == "1000 bytes"
    assert settings.parse_size(settings.format_size(3 << 40)) == 3 << 40


THREE_MISTAKES = [  # (line, text): each mistake alone on its line, with what it says
    (1, 'site_ulr = "https://ci.example"', 'unknown key "site_ulr" (did you mean "site_url"?)'),
    (2, "keep_runs = 0", '"keep_runs" must be at least 1'),
    (5, "pids = 4", '"pids" must be at least 16'),
]


def _with_mistakes(mistakes: list[tuple[int, str, str]]) -> str:
    """A gitpipe.toml with each mistake at its line, and blank lines elsewhere."""
    lines = ["", "", "# the sandbox", "[sandbox]", ""]
    for line, text, _ in mistakes:
        lines[line - 1] = text
    return "\n".join(lines) + "\n"


def test_every_mistake_in_gitpipe_toml_is_reported_at_once(tmp_path: Path) -> None:
    """Three mistakes: three problems, in line order, each as it reads when it is the only one."""
    (tmp_path / "gitpipe.toml").write_text(_with_mistakes(THREE_MISTAKES))
    with pytest.raises(ConfigError) as err:
        settings.load(tmp_path)
    path = tmp_path / "gitpipe.toml"
    got = [str(p) for p in err.value.problems]
    assert [line.split(":")[1] for line in (g.removeprefix(str(path)) for g in got)] == ["1", "2", "5"]
    for (line, _, words), text in zip(THREE_MISTAKES, got):
        assert text.startswith(f"{path}:{line}: ") and words in text, text
    alone = []
    for mistake in THREE_MISTAKES:
        (tmp_path / "gitpipe.toml").write_text(_with_mistakes([mistake]))
        with pytest.raises(ConfigError) as one:
            settings.load(tmp_path)
        assert len(one.value.problems) == 1
        alone.append(str(one.value))
    assert got == alone
    assert str(err.value) == "\n".join(got) and err.value.line == 1 and err.value.exit_code == 2


def test_the_cli_prints_every_mistake_in_gitpipe_toml_one_line_each(home: Home) -> None:
    path = home.home / "gitpipe.toml"
    path.write_text(_with_mistakes(THREE_MISTAKES))
    proc = home.gitpipe("runs")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3, proc.stderr
    for (line, _, words), text in zip(THREE_MISTAKES, lines):
        assert text.startswith(f"gitpipe: error: {path}:{line}: ") and words in text, text


def test_problems_in_quoted_and_dotted_tables_get_their_lines(tmp_path: Path) -> None:
    """gitpipe.toml's lines come from the same key locator as .pipeline.toml's (gitpipe.tomllines)."""
    text = ('# x\n[ repos."shop.v2" ]  # a dotted name\nprotected = "main"\n'
            "[repos.plain]\nreject_invalid = 1\nsandbox.pids = 4\n")
    (tmp_path / "gitpipe.toml").write_text(text)
    with pytest.raises(ConfigError) as err:
        settings.load(tmp_path)
    assert [(p.line, p.message.split(": ", 1)[1]) for p in err.value.problems] == [
        (3, '"protected" must be a list of ref globs, e.g. ["main", "v*"]'),
        (5, '"reject_invalid" must be true or false'),
        (6, '[repos.plain] unknown key "sandbox"'),
    ]
