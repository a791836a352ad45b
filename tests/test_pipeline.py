"""Tests of gitpipe.pipeline: parsing, validation with exact lines, matching helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gitpipe.durations import parse_duration
from gitpipe.errors import PipelineError
from gitpipe.matching import PLACEHOLDERS, expand, input_values, paths_match, when_matches
from gitpipe.models import ScheduleSpec, TriggerSpec, When
from gitpipe.pipeline import parse
from gitpipe.triggers import read_trigger, ref_triggers

ROOT = Path(__file__).resolve().parent.parent

# The example of SPEC section 5, unchanged: it is a valid pipeline.
SPEC_EXAMPLE = """\
[pipeline]
name = "shop"            # default: the repo name
timeout = "1h"           # whole run; durations are "90s", "10m", "2h"

[trigger]
branches = ["main", "release/*"]   # glob patterns; default ["*"] = every branch
tags = ["v*"]                      # default [] = no tag pushes
paths = ["src/**", "pyproject.toml"]  # only when the push changes a matching path; default: any
schedule = ["0 3 * * *"]           # cron lines (UTC); runs the head of the repo's default branch
superseded = "cancel"              # "cancel": a newer push to the same ref cancels an older queued or
                                   #   running run of that ref, but never a deploy in flight, which
                                   #   finishes first; "queue" (default): every run goes on

[env]                              # for every action
PYTHONUNBUFFERED = "1"

[[stage]]
name = "build"

  [[stage.action]]
  name = "wheel"
  run = "python -m build --wheel"   # a bash script, run with `bash -eo pipefail`
  outputs = { wheel = "dist/*.whl" } # artifact name = glob(s) relative to the worktree
  timeout = "10m"                    # default 30m
  retries = 1                        # re-run on failure, default 0

[[stage]]
name = "test"

  [[stage.action]]
  name = "unit"
  inputs = ["wheel"]                 # restored into the worktree at the same relative paths
  run = "pip install dist/*.whl && pytest -q"

  [[stage.action]]
  name = "lint"                      # same stage, same run_order: runs in parallel with "unit"
  run = "ruff check ."

  [[stage.action]]
  name = "package"
  run_order = 2                      # after every run_order-1 action of this stage succeeded
  run = "./package.sh"
  outputs = { site = ["build/site/**"] }
  env = { MODE = "release" }
  secrets = ["SIGNING_KEY"]
  when = { branches = ["main"] }     # skipped (status "skipped") on other branches

[[stage]]
name = "staging"

  [[stage.action]]
  name = "deploy"
  type = "deploy"
  inputs = ["site"]
  environment = "staging"
  target = "ssh://deploy@staging.example.com:22/srv/shop"   # or file:///srv/shop for this host
  source = "build/site"              # what becomes the release (a directory in the worktree)
  keep = 5                           # releases kept on the target
  shared = ["uploads", ".env"]       # linked from <path>/shared into every release
  before_switch = "./bin/migrate"    # run on the target inside the new release, before the switch
  after_switch = "sudo systemctl restart shop"
  healthcheck = "curl -fsS http://localhost:8000/health"  # after the switch; failure => rollback
  healthcheck_retries = 5
  monitor = "2m"                     # keep running the healthcheck (every 10s) this long after the
                                     # switch; any failure in that window => rollback

[[stage]]
name = "production"

  [[stage.action]]
  name = "sign-off"
  type = "approval"
  message = "Ship {short_sha} to production?"
  timeout = "24h"                    # no decision by then = rejected

  [[stage.action]]
  name = "deploy"
  type = "deploy"
  run_order = 2
  inputs = ["site"]
  environment = "production"
  target = ["ssh://deploy@web1.example.com/srv/shop", "ssh://deploy@web2.example.com/srv/shop"]
  source = "build/site"
  strategy = "blue-green"            # default "rolling" (= release directories + symlink switch)

[[notify]]
on = ["failed", "approval", "deployed"]   # also: "succeeded", "cancelled", "rolled-back"
webhook = "https://chat.example.com/hooks/abc"   # JSON POST of the event
[[notify]]
on = ["failed"]
command = "mail -s 'gitpipe: {pipeline} #{run} failed' ops@example.com"  # event JSON on stdin
"""

# A small valid pipeline; tests append to it, so their lines start at 7.
BASE = """\
[[stage]]
name = "build"

  [[stage.action]]
  name = "make"
  run = "make"
"""


def toml(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def problems(text: str) -> list[str]:
    with pytest.raises(PipelineError) as info:
        parse(text)
    return [str(p) for p in info.value.problems]


def only_problem(text: str) -> str:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


def has_problem(text: str, line: int, fragment: str) -> None:
    found = problems(text)
    prefix = f".pipeline.toml:{line}: "
    assert any(p.startswith(prefix) and fragment in p for p in found), found


# --------------------------------------------------------------------------- valid files


def test_spec_example_parses() -> None:
    p = parse(SPEC_EXAMPLE, default_name="repo")
    assert p.name == "shop"
    assert p.timeout == 3600
    assert p.trigger == TriggerSpec(
        branches=("main", "release/*"), tags=("v*",), paths=("src/**", "pyproject.toml"),
        schedule=(ScheduleSpec("0 3 * * *"),), superseded="cancel",
    )
    assert p.env == (("PYTHONUNBUFFERED", "1"),)
    assert [s.name for s in p.stages] == ["build", "test", "staging", "production"]
    assert [s.line for s in p.stages] == [17, 27, 48, 67]
    wheel = p.action("build", "wheel")
    assert (wheel.line, wheel.run, wheel.timeout, wheel.retries) == (20, "python -m build --wheel", 600, 1)
    assert wheel.outputs == (("wheel", ("dist/*.whl",)),)
    assert p.action("test", "unit").inputs == ("wheel",)
    package = p.action("test", "package")
    assert (package.run_order, package.env, package.secrets) == (2, (("MODE", "release"),), ("SIGNING_KEY",))
    assert package.outputs == (("site", ("build/site/**",)),)
    assert package.when == When(branches=("main",), tags=None)
    assert [(o, [a.name for a in g]) for o, g in p.stages[1].groups()] == [(1, ["unit", "lint"]), (2, ["package"])]
    staging = p.action("staging", "deploy")
    assert staging.type == "deploy" and staging.environment == "staging"
    assert staging.targets == ("ssh://deploy@staging.example.com:22/srv/shop",)
    assert (staging.source, staging.keep, staging.shared) == ("build/site", 5, ("uploads", ".env"))
    assert (staging.before_switch, staging.after_switch) == ("./bin/migrate", "sudo systemctl restart shop")
    assert staging.healthcheck == "curl -fsS http://localhost:8000/health"
    assert (staging.healthcheck_retries, staging.monitor, staging.strategy) == (5, 120, "rolling")
    sign_off = p.action("production", "sign-off")
    assert (sign_off.type, sign_off.message, sign_off.timeout) == (
        "approval", "Ship {short_sha} to production?", 86400,
    )
    production = p.action("production", "deploy")
    assert production.targets == (
        "ssh://deploy@web1.example.com/srv/shop", "ssh://deploy@web2.example.com/srv/shop",
    )
    assert production.strategy == "blue-green" and production.run_order == 2
    assert [(n.on, n.line, n.webhook) for n in p.notify] == [
        (("failed", "approval", "deployed"), 86, "https://chat.example.com/hooks/abc"),
        (("failed",), 89, None),
    ]
    assert p.notify[1].command == "mail -s 'gitpipe: {pipeline} #{run} failed' ops@example.com"


def test_defaults() -> None:
    text = BASE + toml("""
        [[stage]]
        name = "ship"
          [[stage.action]]
          name = "ok"
          type = "approval"
          [[stage.action]]
          name = "go"
          type = "deploy"
          run_order = 2
          environment = "prod"
          target = "file:///srv/app"
        """)
    p = parse(text, default_name="myrepo")
    assert (p.name, p.timeout, p.trigger, p.env, p.notify) == ("myrepo", None, TriggerSpec(), (), ())
    make = p.action("build", "make")
    assert (make.type, make.run_order, make.timeout, make.retries, make.when) == ("run", 1, 1800, 0, None)
    assert p.action("ship", "ok").timeout == 24 * 3600
    go = p.action("ship", "go")
    assert (go.source, go.keep, go.healthcheck_retries, go.monitor, go.strategy) == (".", 5, 3, 0, "rolling")
    assert go.targets == ("file:///srv/app",)


def test_env_values_are_converted_to_strings() -> None:
    p = parse(toml("""
        [env]
        A = "x"
        B = 3
        C = 1.5
        D = true
        E = false
        """) + BASE)
    assert p.env == (("A", "x"), ("B", "3"), ("C", "1.5"), ("D", "true"), ("E", "false"))


def test_dotted_keys_subtables_and_quoted_keys() -> None:
    p = parse(BASE + toml("""
          outputs.bin = "out/bin"
          "timeout" = "5m"
        [stage.action.env]
        MODE = "x"
        [stage.action.when]
        tags = ["v*"]
        """))
    make = p.action("build", "make")
    assert make.outputs == (("bin", ("out/bin",)),)
    assert (make.timeout, make.env, make.when) == (300, (("MODE", "x"),), When(tags=("v*",)))


def test_empty_when_is_no_condition() -> None:
    assert parse(BASE + '  when = {}\n').action("build", "make").when is None


def test_plugin_action_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "gitpipe_slack-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gitpipe-slack\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[gitpipe.actions]\nslack = gitpipe_slack:Slack\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    p = parse(BASE + toml("""
          [[stage.action]]
          name = "tell"
          type = "slack"
          channel = "#ops"
          mentions = ["@al"]
          timeout = "1m"
        """))
    tell = p.action("build", "tell")
    assert (tell.type, tell.timeout, tell.extra) == ("slack", 60, (("channel", "#ops"), ("mentions", ["@al"])))


# --------------------------------------------------------------------------- one rule, one line


def test_toml_syntax_error_line() -> None:
    message = only_problem(BASE + "  retries 3\n")
    assert message.startswith(".pipeline.toml:7: invalid TOML: ")
    assert "(column" in message


def test_toml_syntax_error_at_end_of_file() -> None:
    assert only_problem(BASE + "  retries =").startswith(".pipeline.toml:7: invalid TOML: ")


def test_problem_names_the_file() -> None:
    with pytest.raises(PipelineError) as info:
        parse(BASE + "  shel = 1\n", file="repo/.pipeline.toml")
    assert str(info.value).startswith("repo/.pipeline.toml:7: ")


def test_unknown_action_key_did_you_mean() -> None:
    text = toml("""
        [[stage]]
        name = "test"

          [[stage.action]]
          name = "unit"
          shell = "pytest"
        """)
    found = problems(text)
    assert '.pipeline.toml:6: stage "test", action "unit": unknown key "shell" (did you mean "run"?)' in found
    assert '.pipeline.toml:4: stage "test", action "unit": missing required key "run"' in found[0]


def test_unknown_keys_everywhere() -> None:
    text = toml("""
        [pipeline]
        nme = "x"
        [trigger]
        branch = ["main"]
        [[stages]]
        name = "a"
        """) + BASE + toml("""
          tiemout = "1m"
          when = { branch = ["main"] }
        [[notify]]
        on = ["failed"]
        webhok = "https://x"
        """)
    found = problems(text)
    assert '.pipeline.toml:2: [pipeline]: unknown key "nme" (did you mean "name"?)' in found
    assert '.pipeline.toml:4: [trigger]: unknown key "branch" (did you mean "branches"?)' in found
    assert '.pipeline.toml:5: unknown table "stages" (did you mean "stage"?)' in found
    assert '.pipeline.toml:13: stage "build", action "make": unknown key "tiemout" (did you mean "timeout"?)' in found
    assert '.pipeline.toml:14: stage "build", action "make": unknown key "branch" (did you mean "branches"?)' in found
    assert '.pipeline.toml:17: notify #1: unknown key "webhok" (did you mean "webhook"?)' in found


def test_key_of_another_type() -> None:
    assert only_problem(BASE + '  environment = "prod"\n') == (
        '.pipeline.toml:7: stage "build", action "make": "environment" is only for actions of type "deploy", '
        'not "run"'
    )


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('  retries = "2"', '"retries" must be an integer >= 0, not the string "2"'),
        ("  retries = -1", '"retries" must be an integer >= 0, not -1'),
        ("  run_order = 0", '"run_order" must be an integer >= 1, not 0'),
        ("  run_order = true", '"run_order" must be an integer >= 1, not the boolean true'),
        ('  inputs = "wheel"', '"inputs" must be an array of strings, not the string "wheel" (write ["wheel"])'),
        ("  secrets = [1]", '"secrets" must hold strings only, not the number 1'),
        ('  secrets = ["MY-KEY"]', 'secret "MY-KEY" is not a valid environment variable name'),
        ("  env = { A = [1] }", '"A" must be a string (or a number or boolean), not an array'),
        ('  env = { "A B" = "x" }', '"A B" is not a valid environment variable name'),
        ("  timeout = 600", '"timeout" must be a duration string such as "90s", "10m" or "2h", not the number 600'),
        ('  timeout = "10 minutes"', '"timeout": bad duration "10 minutes"'),
        ('  timeout = "0s"', '"timeout" must be longer than 0s'),
        ('  outputs = "dist"', '"outputs" must be a table, not the string "dist"'),
        ('  outputs = { a = "/etc/passwd" }', 'output "a": glob "/etc/passwd" must be relative to the worktree'),
        ('  outputs = { a = "x/../../y" }', 'output "a": glob "x/../../y" must not contain ".."'),
        ("  outputs = { a = [] }", 'output "a" must be a glob or an array of globs, not an array'),
        ('  outputs = { "../a" = "x" }', 'artifact name "../a" may hold only letters'),
        ('  when = { branches = "main" }', '"branches" must be an array of strings'),
    ],
)
def test_action_value_errors(line: str, expected: str) -> None:
    message = only_problem(BASE + line + "\n")
    assert message.startswith('.pipeline.toml:7: stage "build", action "make"'), message
    assert expected in message


@pytest.mark.parametrize(
    ("line", "expected"),
    [('  run = ""', '"run" must not be empty'), ("  run = 3", '"run" must be a string, not the number 3')],
)
def test_run_value_errors(line: str, expected: str) -> None:
    message = only_problem(BASE.replace('  run = "make"', line))
    assert message == f'.pipeline.toml:6: stage "build", action "make": {expected}'


def test_pipeline_table_errors() -> None:
    text = toml("""
        [pipeline]
        name = ""
        timeout = "0s"
        """) + BASE
    assert problems(text) == [
        '.pipeline.toml:2: [pipeline]: "name" must not be empty',
        '.pipeline.toml:3: [pipeline]: "timeout" must be longer than 0s',
    ]


def test_trigger_errors() -> None:
    text = toml("""
        [trigger]
        branches = ["main", 3]
        superseded = "cancle"
        schedule = [
          "0 3 * * *",
          "61 * * * *",
          "every day",
        ]
        """) + BASE
    found = problems(text)
    assert found[0] == '.pipeline.toml:2: [trigger]: "branches" must hold strings only, not the number 3'
    assert found[1].startswith('.pipeline.toml:3: [trigger]: "superseded" must be one of "queue", "cancel", "parallel", not')
    assert found[1].endswith('(did you mean "cancel"?)')
    assert found[2].startswith('.pipeline.toml:6: [trigger]: "schedule": bad cron line "61 * * * *"')
    assert found[3].startswith('.pipeline.toml:7: [trigger]: "schedule": bad cron line "every day"')
    assert len(found) == 4


def test_wrong_table_shapes() -> None:
    assert only_problem('[stage]\nname = "x"\n') == (
        '.pipeline.toml:1: "stage" must be an array of tables (write [[stage]] headers), not a table'
    )
    assert only_problem('pipeline = "x"\n' + BASE) == '.pipeline.toml:1: "pipeline" must be a table, not the string "x"'
    message = only_problem('[[stage]]\nname = "a"\n[stage.action]\nname = "b"\nrun = "c"\n')
    assert message.startswith('.pipeline.toml:3: stage "a": "action" must be an array of tables')


def test_no_stages() -> None:
    assert only_problem('[pipeline]\nname = "x"\n') == (
        ".pipeline.toml: no stages: add at least one [[stage]] with a [[stage.action]] under it"
    )


def test_stage_without_actions_and_name() -> None:
    found = problems(BASE + '[[stage]]\nname = "empty"\n[[stage]]\n  [[stage.action]]\n  name = "x"\n  run = "y"\n')
    assert found == [
        '.pipeline.toml:7: stage "empty": no actions: add a [[stage.action]] under this [[stage]]',
        '.pipeline.toml:9: stage #3: missing required key "name" (every stage needs a name)',
    ]


def test_action_without_name() -> None:
    assert only_problem(BASE + '  [[stage.action]]\n  run = "x"\n') == (
        '.pipeline.toml:7: stage "build", action #2: missing required key "name" (every action needs a name)'
    )


def test_names_must_not_hold_slashes() -> None:
    message = only_problem(BASE.replace('name = "make"', 'name = "a/b"'))
    assert message.startswith('.pipeline.toml:5: stage "build", action "a/b": "name" "a/b" must not contain "/"')


def test_duplicate_stage_name() -> None:
    text = BASE + toml("""
        [[stage]]
        name = "build"
          [[stage.action]]
          name = "other"
          run = "x"
        """)
    assert only_problem(text) == '.pipeline.toml:8: stage "build": duplicate stage name (first at line 1)'


def test_duplicate_action_name() -> None:
    text = BASE + toml("""
          [[stage.action]]
          name = "make"
          run = "again"
        """)
    assert only_problem(text) == '.pipeline.toml:8: stage "build": duplicate action name "make" (first at line 4)'


def test_duplicate_artifact_name() -> None:
    text = BASE + toml("""
          outputs = { bin = "out/*" }
        [[stage]]
        name = "test"
          [[stage.action]]
          name = "again"
          run = "x"
          outputs = { report = "r.xml", bin = ["more/*"] }
        """)
    assert only_problem(text) == (
        '.pipeline.toml:13: stage "test", action "again": artifact "bin" is already an output of '
        'stage "build", action "make"'
    )


INPUTS = toml("""
    [[stage]]
    name = "one"
      [[stage.action]]
      name = "a"
      run = "x"
      inputs = [
        "early",
        "late",
        "parallel",
        "nowhere",
        "erly2",
      ]
      [[stage.action]]
      name = "b"
      run = "x"
      outputs = { parallel = "p", early = "e" }
      [[stage.action]]
      name = "c"
      run_order = 2
      run = "x"
      inputs = ["parallel", "early", "own"]
      outputs = { own = "o" }
    [[stage]]
    name = "two"
      [[stage.action]]
      name = "d"
      run = "x"
      outputs = { late = "l", erly = "e2" }
    """)


def test_inputs_must_come_from_earlier_actions() -> None:
    assert problems(INPUTS) == [
        ('.pipeline.toml:7: stage "one", action "a": input "early" comes from stage "one", action "b", '
         "which runs in parallel with this one (give this action a higher run_order)"),
        ('.pipeline.toml:8: stage "one", action "a": input "late" comes from stage "two", action "d", '
         "which runs later (an input must come from an earlier stage or run_order)"),
        ('.pipeline.toml:9: stage "one", action "a": input "parallel" comes from stage "one", action "b", '
         "which runs in parallel with this one (give this action a higher run_order)"),
        '.pipeline.toml:10: stage "one", action "a": input "nowhere" is not an output of any action',
        ('.pipeline.toml:11: stage "one", action "a": input "erly2" is not an output of any action '
         '(did you mean "erly"?)'),
        '.pipeline.toml:21: stage "one", action "c": input "own" is an output of this same action',
    ]


def test_approval_rules() -> None:
    text = BASE + toml("""
          [[stage.action]]
          name = "ok"
          type = "approval"
          run = "x"
          outputs = { a = "b" }
          message = "Ship {short_sha} of {brnch}? (${HOME} {x,y} {})"
        """)
    assert problems(text) == [
        ('.pipeline.toml:10: stage "build", action "ok": an approval cannot have "run": it waits for a person '
         "and runs nothing (put the script in an action of its own)"),
        '.pipeline.toml:11: stage "build", action "ok": an approval cannot have "outputs": it produces no files',
        ('.pipeline.toml:12: stage "build", action "ok": "message": unknown placeholder "{brnch}" '
         '(did you mean "branch"?); known: {branch}, {environment}, {pipeline}, {ref}, {repo}, {run}, {sha}, '
         "{short_sha}"),
    ]


def test_deploy_needs_target_and_environment() -> None:
    text = BASE + '  [[stage.action]]\n  name = "ship"\n  type = "deploy"\n'
    assert problems(text) == [
        ('.pipeline.toml:7: stage "build", action "ship": missing required key "environment" '
         '(the environment this deploys to, e.g. "staging")'),
        ('.pipeline.toml:7: stage "build", action "ship": missing required key "target" '
         "(ssh://[user@]host[:port]/path or file:///absolute/path, or an array of them)"),
    ]


def test_deploy_rules() -> None:
    text = BASE + toml("""
          [[stage.action]]
          name = "ship"
          type = "deploy"
          environment = "prod"
          run = "make deploy"
          target = [
            "ssh://deploy@{environment}.example.com:2222/srv/app",
            "http://example.com/srv",
            "file://relative/path",
            "ssh://host/srv/{env}",
          ]
          source = "/abs"
          shared = ["ok", "../up"]
          keep = 0
          healthcheck_retries = 0
          monitor = "soon"
          strategy = "bluegreen"
        """)
    where = '.pipeline.toml:{}: stage "build", action "ship": '
    assert problems(text) == [
        where.format(11) + 'a deploy cannot have "run" (use "before_switch"/"after_switch" for commands on '
        "the target, or a separate run action)",
        where.format(14) + 'target "http://example.com/srv" must look like ssh://[user@]host[:port]/path '
        "or file:///absolute/path",
        where.format(15) + 'target "file://relative/path" must look like ssh://[user@]host[:port]/path '
        "or file:///absolute/path",
        where.format(16) + '"target": unknown placeholder "{env}"; known: {branch}, {environment}, {pipeline}, '
        "{ref}, {repo}, {run}, {sha}, {short_sha}",
        where.format(18) + '"source" must be relative to the worktree, not absolute',
        where.format(19) + '"shared" path "../up" must not contain ".." (it would reach outside the worktree)',
        where.format(20) + '"keep" must be an integer >= 1, not 0',
        where.format(21) + '"healthcheck_retries" must be an integer >= 1, not 0',
        where.format(22) + '"monitor": bad duration "soon": write numbers with units d, h, m or s, '
        'e.g. "90s", "10m", "2h" or "1h30m"',
        where.format(23) + '"strategy" must be one of "rolling", "blue-green", not "bluegreen" '
        '(did you mean "blue-green"?)',
    ]


def test_deploy_source_placeholder() -> None:
    text = BASE + toml("""
          [[stage.action]]
          name = "ship"
          type = "deploy"
          environment = "prod"
          target = "file:///srv/app"
          source = "build/{environment}/{nope}"
        """)
    assert only_problem(text).startswith(
        '.pipeline.toml:12: stage "build", action "ship": "source": unknown placeholder "{nope}"'
    )


def test_unknown_action_type() -> None:
    assert only_problem(BASE + '  type = "deploi"\n') == (
        '.pipeline.toml:7: stage "build", action "make": unknown action type "deploi" '
        '(built-in types: run, approval, deploy); did you mean "deploy"?'
    )
    assert only_problem(BASE + '  type = "shellscript"\n') == (
        '.pipeline.toml:7: stage "build", action "make": unknown action type "shellscript" '
        "(built-in types: run, approval, deploy)"
    )


def test_notify_rules() -> None:
    text = BASE + toml("""
        [[notify]]
        on = ["failed", "fail"]
        webhook = "ftp://example.com"
        command = "echo {pipline}"
        [[notify]]
        webhook = "https://example.com"
        [[notify]]
        on = []
        """)
    assert problems(text) == [
        ('.pipeline.toml:8: notify #1: unknown event "fail" (did you mean "failed"?) '
         "(events: succeeded, failed, cancelled, approval, deployed, rolled-back)"),
        '.pipeline.toml:9: notify #1: "webhook" must be an http:// or https:// URL, not "ftp://example.com"',
        ('.pipeline.toml:10: notify #1: "command": unknown placeholder "{pipline}" (did you mean "pipeline"?); '
         "known: {branch}, {environment}, {pipeline}, {ref}, {repo}, {run}, {sha}, {short_sha}"),
        '.pipeline.toml:10: notify #1: needs exactly one of "webhook" or "command"',
        ('.pipeline.toml:11: notify #2: missing required key "on" '
         "(a list of events: succeeded, failed, cancelled, approval, deployed, rolled-back)"),
        '.pipeline.toml:13: notify #3: needs exactly one of "webhook" or "command"',
        ('.pipeline.toml:14: notify #3: "on" must list at least one event '
         "(succeeded, failed, cancelled, approval, deployed, rolled-back)"),
    ]


# --------------------------------------------------------------------------- the line scanner


def test_lines_survive_multiline_strings_and_arrays() -> None:
    lines = (
        "[[stage]]",
        'name = "build"',
        "  [[stage.action]]",
        '  name = "make"',
        '  run = """',
        "[[stage]]",
        'name = "fake \\""" still inside',
        "retries = 'x'",
        '"""',
        "  inputs = [  # a comment with ] and \"",
        "    'nope',",
        "  ]",
        '  env = { A = "}{", B = [1, 2] }',
        "  message = \'\'\'",
        "[[stage]]",
        "\'\'\'",
        "[[stage]]",
        'name = "second"',
        "  [[stage.action]]",
        '  name = "x"',
        '  run = "y"',
        "  retrise = 1",
        "",
    )
    text = "\n".join(lines)
    assert problems(text) == [
        '.pipeline.toml:11: stage "build", action "make": input "nope" is not an output of any action',
        ('.pipeline.toml:13: stage "build", action "make", env: "B" must be a string (or a number or boolean), '
         "not an array"),
        ('.pipeline.toml:14: stage "build", action "make": "message" is only for actions of type "approval", '
         'not "run"'),
        '.pipeline.toml:22: stage "second", action "x": unknown key "retrise" (did you mean "retries"?)',
    ]


def test_lines_of_dotted_subtables() -> None:
    text = BASE + toml("""
        [[stage]]
        name = "two"
          [[stage.action]]
          name = "x"
          run = "y"
        [stage.action.env]
        OK = "1"
        "NOT OK" = "2"
        [stage.action.outputs]
        bad = "/abs"
        """)
    assert problems(text) == [
        ('.pipeline.toml:14: stage "two", action "x", env: "NOT OK" is not a valid environment variable name '
         "(letters, digits, _)"),
        ('.pipeline.toml:16: stage "two", action "x": output "bad": glob "/abs" must be relative to the worktree, '
         "not absolute"),
    ]


def test_every_problem_is_reported_in_line_order() -> None:
    text = toml("""
        [pipeline]
        timeout = "forever"
        [trigger]
        superseded = "never"
        [[stage]]
        name = "build"
          [[stage.action]]
          name = "make"
          shell = "make"
          retries = "many"
          inputs = ["nothing"]
        [[notify]]
        on = ["boom"]
        """)
    found = problems(text)
    assert [int(p.split(":")[1]) for p in found] == [2, 4, 7, 9, 10, 11, 12, 13]
    assert len(found) == 8


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1h30m", 5400), ("1d2h3m4s", 93784),
     ("1h 30m", 5400), (" 5m ", 300), ("1.5h", 5400), ("0s", 0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "90", "10 minutes", "m", "1x", "30m1h", "1h1h", "-5m", "5M"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration(text)


def test_parse_duration_hints_a_unit() -> None:
    with pytest.raises(ValueError, match='did you mean "90s"'):
        parse_duration("90")


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("refs/heads/main", True),
        ("refs/heads/release/1.2", True),
        ("refs/heads/release", False),
        ("refs/heads/feature/x", False),
        ("refs/tags/v1.0", True),
        ("refs/tags/1.0", False),
        ("refs/notes/commits", False),
        ("main", False),
    ],
)
def test_ref_triggers(ref: str, expected: bool) -> None:
    trigger = TriggerSpec(branches=("main", "release/*"), tags=("v*",))
    assert ref_triggers(trigger, ref) is expected


def test_ref_triggers_defaults() -> None:
    assert ref_triggers(TriggerSpec(), "refs/heads/feature/x")
    assert not ref_triggers(TriggerSpec(), "refs/tags/v1")
    assert not ref_triggers(TriggerSpec(), "refs/pull/1/head")


@pytest.mark.parametrize(
    ("patterns", "changed", "expected"),
    [
        ((), [], True),
        ((), ["anything"], True),
        (("src/**",), ["src/a.py"], True),
        (("src/**",), ["src/deep/er/a.py"], True),
        (("src/**",), ["source/a.py"], False),
        (("src/**",), ["lib/src/a.py"], False),
        (("src/",), ["src/a/b"], True),
        (("*.md",), ["README.md"], True),
        (("*.md",), ["docs/README.md"], False),
        (("**/*.md",), ["docs/deep/README.md"], True),
        (("**/*.md",), ["README.md"], True),
        (("docs/*.md",), ["docs/a.md"], True),
        (("docs/*.md",), ["docs/sub/a.md"], False),
        (("docs/**/index.html",), ["docs/index.html"], True),
        (("docs/**/index.html",), ["docs/a/b/index.html"], True),
        (("pyproject.toml",), ["pyproject.toml", "x"], True),
        (("pyproject.toml",), ["sub/pyproject.toml"], False),
        (("/setup.cfg",), ["setup.cfg"], True),
        (("file?.txt",), ["file1.txt"], True),
        (("file?.txt",), ["file/.txt"], False),
        (("[ab].txt",), ["a.txt"], True),
        (("[!ab].txt",), ["a.txt"], False),
        (("a+b(c).txt",), ["a+b(c).txt"], True),
        (("src/**", "*.toml"), ["README.md", "x.toml"], True),
        (("src/**",), [], False),
    ],
)
def test_paths_match(patterns: tuple[str, ...], changed: list[str], expected: bool) -> None:
    assert paths_match(patterns, changed) is expected


@pytest.mark.parametrize(
    ("when", "branch", "tag", "expected"),
    [
        (None, "main", None, True),
        (None, None, "v1", True),
        (When(), "x", None, True),
        (When(branches=("main",)), "main", None, True),
        (When(branches=("main",)), "dev", None, False),
        (When(branches=("main",)), None, "v1", False),
        (When(branches=("release/*",)), "release/1", None, True),
        (When(tags=("v*",)), None, "v1.0", True),
        (When(tags=("v*",)), None, "1.0", False),
        (When(tags=("v*",)), "main", None, False),
        (When(branches=("main",), tags=("v*",)), None, "v2", True),
        (When(branches=("main",), tags=("v*",)), "main", None, True),
        (When(branches=()), "main", None, False),
        (When(branches=("main",)), None, None, False),
    ],
)
def test_when_matches(when: When | None, branch: str | None, tag: str | None, expected: bool) -> None:
    assert when_matches(when, branch, tag) is expected


def test_expand() -> None:
    values = {name: f"<{name}>" for name in PLACEHOLDERS}
    assert expand("{run}-{short_sha}@{branch} in {environment}", values) == (
        "<run>-<short_sha>@<branch> in <environment>"
    )
    other = "awk '{print $1}' ${HOME} {} {0} {sha!r} {unknown} {{run}} %(run)s"
    assert expand(other, values) == "awk '{print $1}' ${HOME} {} {0} {sha!r} {unknown} {<run>} %(run)s"
    assert expand("{ref} {sha}", {"sha": "abc"}) == "{ref} abc"
    assert expand("{sha}", {"sha": "{run}"}) == "{run}"  # values are not expanded again


def test_placeholders() -> None:
    assert frozenset({"run", "pipeline", "repo", "ref", "sha", "short_sha", "branch", "environment"}) == PLACEHOLDERS


# --------------------------------------------------------------------------- read_trigger


def test_read_trigger_of_an_otherwise_invalid_file() -> None:
    text = toml("""
        [trigger]
        branches = ["main"]
        tags = ["v*"]
        superseded = "cancel"
        [[stage]]
        nme = "oops"
        """)
    with pytest.raises(PipelineError):
        parse(text)
    assert read_trigger(text) == TriggerSpec(branches=("main",), tags=("v*",), superseded="cancel")


def test_read_trigger_defaults_and_failures() -> None:
    assert read_trigger("[[stage]]\nwhatever = 1\n") == TriggerSpec()
    assert read_trigger("this is [not toml") is None
    assert read_trigger('[trigger]\nbranches = "main"\n') is None
    assert read_trigger('[trigger]\nschedule = ["61 * * * *"]\n') is None
    assert read_trigger('trigger = "x"\n') is None


# --------------------------------------------------------------------------- import time


def _imported(code: str) -> set[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, env=env,
        capture_output=True, text=True, check=True,
    )
    return {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}


def test_import_stays_light() -> None:
    modules = _imported("import gitpipe.pipeline")
    assert "gitpipe.pipeline" in modules
    baseline = _imported("pass")
    for heavy in ("pygit2", "croniter", "sqlite_utils", "jinja2", "importlib.metadata", "difflib"):
        assert heavy not in modules - baseline, heavy


def test_parsing_a_plain_pipeline_imports_nothing_heavy() -> None:
    code = (
        "import sys; from gitpipe.pipeline import parse; "
        f"parse({SPEC_EXAMPLE.replace('schedule = ', '# ')!r}); "
        "print(sorted(m for m in ('croniter', 'importlib.metadata', 'difflib') if m in sys.modules))"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- allow_failure and matrix


def test_allow_failure_is_a_boolean_and_not_for_approvals() -> None:
    text = toml("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "lint"
          run = "ruff check ."
          allow_failure = true
          [[stage.action]]
          name = "ok"
          type = "approval"
          allow_failure = true
          [[stage.action]]
          name = "bad"
          run = "x"
          allow_failure = "yes"
        """)
    assert problems(text) == [
        ('.pipeline.toml:10: stage "s", action "ok": an approval cannot have "allow_failure": a rejection '
         "would let the run go on (an approval is a gate; leave it out, or drop the approval)"),
        '.pipeline.toml:14: stage "s", action "bad": "allow_failure" must be true or false, not the string "yes"',
    ]
    lint, plain = parse(text.split('  [[stage.action]]\n  name = "ok"')[0] + '  [[stage.action]]\n  name = "u"\n'
                        '  run = "x"\n').stages[0].actions
    assert lint.allow_failure is True and plain.allow_failure is False


MATRIX = toml("""
    [[stage]]
    name = "test"
      [[stage.action]]
      name = "test-{matrix.python}-{matrix.db}"
      matrix = { python = ["3.11", "3.12"], db = ["sqlite", "pg"] }
      run = "pytest"
      outputs = { report = "reports/**" }
      retries = 1
    [[stage]]
    name = "report"
      [[stage.action]]
      name = "sum"
      inputs = ["report", "report-3.12-pg"]
      run = "cat reports/*"
    """)


def test_matrix_expands_one_action_per_combination() -> None:
    pipe = parse(MATRIX)
    copies = pipe.stages[0].actions
    assert [a.name for a in copies] == ["test-3.11-sqlite", "test-3.11-pg", "test-3.12-sqlite", "test-3.12-pg"]
    assert copies[1].matrix == (("python", "3.11"), ("db", "pg"))
    assert {a.group for a in copies} == {"test-{matrix.python}-{matrix.db}"}
    assert {a.retries for a in copies} == {1} and {a.run_order for a in copies} == {1}
    assert [a.outputs[0][0] for a in copies] == ["report-3.11-sqlite", "report-3.11-pg", "report-3.12-sqlite",
                                                 "report-3.12-pg"]
    # the group's artifact name stands for every copy's; a copy's own name for that one
    assert pipe.stages[1].actions[0].inputs == ("report-3.11-sqlite", "report-3.11-pg", "report-3.12-sqlite",
                                                "report-3.12-pg")


def test_a_matrix_name_without_placeholders_gets_the_values_appended() -> None:
    pipe = parse(toml("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "unit"
          matrix = { os = ["debian", "alpine"] }
          run = "make"
        """))
    assert [a.name for a in pipe.stages[0].actions] == ["unit (debian)", "unit (alpine)"]


def _matrix_action(line: str, name: str = "t") -> str:
    return toml(f"""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "{name}"
          run = "make"
          {line}
        """)


@pytest.mark.parametrize(("line", "expected"), [
    ("matrix = {}", '"matrix" is empty: give it at least one key with an array of values, '
                    'e.g. matrix = { python = ["3.11", "3.12"] }'),
    ("matrix = { python = [] }", 'matrix "python" must be a non-empty array of strings, not an empty array'),
    ('matrix = { python = "3.11" }', 'matrix "python" must be a non-empty array of strings, not the string "3.11"'),
    ("matrix = { python = [3.10, 3.11] }", 'matrix "python" must hold strings only, not the number 3.1 (write '
                                           "the values in quotes: unquoted, TOML reads 3.10 as the number 3.1)"),
    ('matrix = { python = ["3.11", "3.11"] }', 'matrix "python": value "3.11" is listed twice'),
    ('matrix = { python = ["a/b"] }', 'matrix "python": value "a/b" must not be empty or hold "/"'),
    ('matrix = { "py-version" = ["3"] }', 'matrix key "py-version" may hold only letters, digits and "_"'),
    ('matrix = "x"', '"matrix" must be a table, not the string "x"'),
])
def test_matrix_value_errors(line: str, expected: str) -> None:
    found = problems(_matrix_action(line))[0]  # [3.10, 3.11]: one problem per value
    assert found.startswith('.pipeline.toml:6: stage "s", action "t": ' + expected), found


def test_matrix_copies_are_capped() -> None:
    axes = ", ".join(f'k{i} = ["a", "b"]' for i in range(7))
    assert only_problem(_matrix_action(f"matrix = {{ {axes} }}")) == (
        '.pipeline.toml:6: stage "s", action "t": "matrix" makes 128 copies of this action (2 x 2 x 2 x 2 x 2 '
        "x 2 x 2); at most 64 are allowed (split it into several actions)")


def test_matrix_names_must_differ_after_expansion() -> None:
    text = _matrix_action('matrix = { python = ["3.11", "3.12"], db = ["sqlite", "pg"] }', "test-{matrix.python}")
    assert only_problem(text) == (
        '.pipeline.toml:4: stage "s", action "test-{matrix.python}": two copies of this matrix action would both '
        'be named "test-3.11": put every matrix key in the name (missing: {matrix.db})')
    clash = toml("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "t-{matrix.v}"
          matrix = { v = ["1", "2"] }
          run = "make"
          [[stage.action]]
          name = "t-2"
          run = "make"
        """)
    assert only_problem(clash) == '.pipeline.toml:8: stage "s": duplicate action name "t-2" (first at line 3)'


def test_matrix_placeholders_in_the_name() -> None:
    assert only_problem(_matrix_action('matrix = { python = ["3"] }', "t-{matrix.pyton}")) == (
        '.pipeline.toml:4: stage "s", action "t-{matrix.pyton}": "name": unknown placeholder "{matrix.pyton}" '
        '(did you mean "python"?); the matrix keys are python')
    assert only_problem(_matrix_action("", "t-{matrix.python}")) == (
        '.pipeline.toml:4: stage "s", action "t-{matrix.python}": "name" uses {matrix.python} but the action '
        'has no "matrix"')


def test_matrix_is_for_run_actions_only() -> None:
    text = toml("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "ok"
          type = "approval"
          matrix = { v = ["1"] }
          [[stage.action]]
          name = "ship"
          type = "deploy"
          environment = "staging"
          target = "file:///srv/x"
          matrix = { v = ["1"] }
        """)
    message = ('"matrix" is for run actions, not "{}" (an approval or a deploy runs once; give each '
               "environment a deploy action of its own)")
    assert problems(text) == [
        f'.pipeline.toml:6: stage "s", action "ok": {message.format("approval")}',
        f'.pipeline.toml:12: stage "s", action "ship": {message.format("deploy")}',
    ]


def test_matrix_artifacts_and_inputs() -> None:
    text = toml("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "build"
          matrix = { arch = ["amd64", "arm64"] }
          run = "make"
          outputs = { bin = "out/*" }
          [[stage.action]]
          name = "other"
          run = "make"
          outputs = { bin = "x", bin-amd64 = "y" }
          [[stage.action]]
          name = "early"
          inputs = ["bin"]
          run = "make"
        """)
    assert problems(text) == [
        '.pipeline.toml:7: stage "s", action "build": artifact "bin" (of every matrix copy) is already an '
        'output of stage "s", action "other"',
        '.pipeline.toml:11: stage "s", action "other": artifact "bin-amd64" is already an output of stage "s", '
        'action "build"',
        '.pipeline.toml:14: stage "s", action "early": input "bin" comes from stage "s", action "other", which '
        "runs in parallel with this one (give this action a higher run_order)",
    ]


# --------------------------------------------------------------------------- inputs and approvers (issue 15)

RUN_INPUTS = """\
[inputs.version]
description = "the version to release"
default = "1.0"
options = ["1.0", "2.0"]

[inputs.note]

[[stage]]
name = "build"

  [[stage.action]]
  name = "gate"
  type = "approval"
  approvers = ["alice", "group:ops"]
"""


def test_inputs_and_approvers_parse() -> None:
    p = parse(RUN_INPUTS)
    assert [(i.name, i.line, i.default, i.options, i.description) for i in p.inputs] == [
        ("version", 1, "1.0", ("1.0", "2.0"), "the version to release"), ("note", 6, None, (), "")]
    assert p.action("build", "gate").approvers == ("alice", "group:ops")
    assert parse(BASE).inputs == () and parse(BASE).stages[0].actions[0].approvers is None


def test_input_values_fill_defaults_and_check_what_is_given() -> None:
    p = parse(RUN_INPUTS)
    assert input_values(p, {"note": "$(rm -rf /)"}, manual=True) == (("version", "1.0"), ("note", "$(rm -rf /)"))
    assert input_values(p, {}, manual=False) == (("version", "1.0"), ("note", ""))  # a push: defaults
    with pytest.raises(ValueError) as info:
        input_values(p, {"versoin": "2.0", "version": "3.0"}, manual=True)
    text = str(info.value)
    assert 'unknown input "versoin" (did you mean "version"?)' in text
    assert '"3.0" is not one of its options: 1.0, 2.0' in text and 'input "note" is required' in text
    with pytest.raises(ValueError, match="longer than 4096"):
        input_values(p, {"note": "x" * 5000}, manual=True)
    with pytest.raises(ValueError, match="none: add"):
        input_values(parse(BASE), {"a": "b"}, manual=True)


def test_bad_inputs_are_reported_at_their_lines() -> None:
    found = problems(toml("""
        [inputs]
        plain = "1.0"
        "bad-name" = { default = "x" }
        version = { default = "3", options = ["1", "2"], descripton = "typo" }
        empty = { options = [] }
        VERSION = { default = "1" }
        """) + BASE)
    assert any(p.startswith(".pipeline.toml:2:") and 'input "plain" must be a table' in p for p in found), found
    assert any(p.startswith(".pipeline.toml:3:") and 'input name "bad-name"' in p for p in found), found
    assert any(p.startswith(".pipeline.toml:4:") and '"default" "3" is not one of its options' in p for p in found)
    assert any(p.startswith(".pipeline.toml:4:") and 'unknown key "descripton" (did you mean "description"?)' in p
               for p in found), found
    assert any(p.startswith(".pipeline.toml:5:") and '"options" must list at least one value' in p for p in found)
    assert any(p.startswith(".pipeline.toml:6:") and "$GITPIPE_INPUT_VERSION" in p for p in found), found


def test_bad_approvers() -> None:
    approval = BASE + '\n  [[stage.action]]\n  name = "gate"\n  type = "approval"\n'
    has_problem(approval + '  approvers = "alice"\n', 11, '"approvers" must be an array of strings')
    has_problem(approval + "  approvers = []\n", 11, '"approvers" must name at least one user')
    has_problem(approval + '  approvers = ["alice", "group:", "bad name"]\n', 11,
                'approver "group:" is not a Unix user name')
    assert len(problems(approval + '  approvers = ["alice", "group:", "bad name"]\n')) == 2
    has_problem(BASE + '  approvers = ["alice"]\n', 7, '"approvers" is only for actions of type "approval"')


# --------------------------------------------------------------------------- issue 15: schedule, monitor_interval


def test_schedule_takes_cron_strings_and_tables_with_a_branch() -> None:
    text = toml("""
        [trigger]
        schedule = ["0 3 * * *", { cron = "30 4 * * 1", branch = "release/2.x" }, { cron = "0 5 * * *" }]
        """) + BASE
    assert parse(text).trigger.schedule == (
        ScheduleSpec("0 3 * * *"), ScheduleSpec("30 4 * * 1", "release/2.x"), ScheduleSpec("0 5 * * *"))


def test_schedule_table_errors_name_the_entry() -> None:
    text = toml("""
        [trigger]
        schedule = [
          { branch = "main" },
          { cron = "61 * * * *", branch = "main" },
          { cron = "0 3 * * *", branch = "" },
          { cron = "0 3 * * *", brnch = "x" },
          3,
        ]
        """) + BASE
    found = problems(text)
    assert found[0] == ('.pipeline.toml:3: [trigger]: "schedule" item 1: missing "cron" '
                        '(write { cron = "0 3 * * *", branch = "main" })')
    assert found[1].startswith('.pipeline.toml:4: [trigger]: "schedule": bad cron line "61 * * * *"')
    assert found[2] == '.pipeline.toml:5: [trigger]: "schedule" item 3: "branch" must not be empty'
    assert found[3] == ('.pipeline.toml:6: [trigger]: "schedule" item 4: unknown key "brnch" '
                        '(did you mean "branch"?)')
    assert found[4] == ('.pipeline.toml:7: [trigger]: "schedule" must hold cron strings or '
                        '{ cron, branch } tables, not the number 3')
    assert len(found) == 5


def test_monitor_interval_is_a_deploy_duration() -> None:
    text = BASE + toml("""
          [[stage.action]]
          name = "ship"
          type = "deploy"
          environment = "prod"
          target = "file:///srv/app"
          monitor = "2m"
          monitor_interval = "30s"
        """)
    assert parse(text).action("build", "ship").monitor_interval == 30
    default = parse(text.replace('monitor_interval = "30s"\n', "")).action("build", "ship")
    assert default.monitor_interval == 10
    assert only_problem(text.replace('"30s"', '"often"')).endswith(
        '"monitor_interval": bad duration "often": write numbers with units d, h, m or s, '
        'e.g. "90s", "10m", "2h" or "1h30m"')
    assert only_problem(text.replace('"30s"', '"0s"')).endswith('"monitor_interval" must be longer than 0s')
    run_action = BASE.replace('run = "make"', 'run = "make"\n  monitor_interval = "5s"')
    assert only_problem(run_action).endswith('"monitor_interval" is only for actions of type "deploy", not "run"')


def test_format_duration_is_the_inverse_of_parse_duration() -> None:
    from gitpipe.durations import format_duration

    for text in ("24h", "1m30s", "2s", "1h30m", "48h1m", "0s"):
        assert format_duration(parse_duration(text)) == text
    assert format_duration(parse_duration("1d")) == "24h"


def test_parsed_shares_a_small_pipeline_and_keeps_no_large_one() -> None:
    """The daemon keeps the pipelines it parsed (a push's, at its heads-up and its run's start),
    but never one longer than KEPT_MAX_BYTES: a pusher's megabyte files would fill its memory."""
    from gitpipe import pipeline as pipeline_mod

    small = '[[stage]]\nname = "s"\n  [[stage.action]]\n  name = "a"\n  run = "true"\n'
    assert pipeline_mod.parsed(small, "r") is pipeline_mod.parsed(small, "r")
    large = small.replace('run = "true"', 'run = "' + "x" * pipeline_mod.KEPT_MAX_BYTES + '"')
    first, again = pipeline_mod.parsed(large, "r"), pipeline_mod.parsed(large, "r")
    assert first == again and first is not again
    with pytest.raises(PipelineError):
        pipeline_mod.parsed("[[stage]]\n", "r")
