"""`gitpipe schema`: the JSON Schema agrees with the validator on every example and on bad files."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest

from gitpipe import actionspec, keys, pipeline, schema
from gitpipe.editor import templates
from gitpipe.errors import PipelineError

ROOT = Path(__file__).resolve().parent.parent
VALIDATOR = jsonschema.Draft202012Validator


def _schema() -> dict:
    proc = subprocess.run([sys.executable, "-m", "gitpipe", "schema"], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def checker() -> jsonschema.Draft202012Validator:
    doc = _schema()
    VALIDATOR.check_schema(doc)
    return VALIDATOR(doc)


def _valid(text: str) -> bool:
    try:
        pipeline.parse(text)
    except PipelineError:
        return False
    return True


def _constants_with_stages() -> list[tuple[str, str]]:
    """Every string in the repo's Python files that holds a pipeline the validator accepts."""
    found = []
    for path in sorted([*ROOT.glob("gitpipe/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "[[stage]]" in node.value:
                if _valid(node.value):
                    found.append((f"{path.relative_to(ROOT)}:{node.lineno}", node.value))
    return found


def _readme_examples() -> list[tuple[str, str]]:
    """The README's pipeline examples, each with the ones before it (as the README reads)."""
    blocks = re.findall(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    out, text = [], ""
    for n, block in enumerate(b for b in blocks if "[[stage]]" in b or "[[notify]]" in b):
        text += block + "\n"
        out.append((f"README example {n + 1}", text))
    return out


def examples() -> list[tuple[str, str]]:
    files = [(str(p.relative_to(ROOT)), p.read_text()) for p in sorted((ROOT / "tests" / "data").glob("*.toml"))]
    editor = [(f"editor template {k}", v) for k, (_, v) in templates.TEMPLATES.items()]
    return _readme_examples() + editor + files + _constants_with_stages()


def test_every_example_pipeline_passes_the_schema(checker: jsonschema.Draft202012Validator) -> None:
    found = examples()
    assert len(found) >= 20, [name for name, _ in found]  # the README, the templates, the tests' pipelines
    failures = []
    for name, text in found:
        assert _valid(text), name
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in checker.iter_errors(tomllib.loads(text))]
        if errors:
            failures.append(f"{name}: {errors}")
    assert failures == []


GOOD = '''
[[stage]]
name = "build"

  [[stage.action]]
  name = "wheel"
  run = "make"
'''

# Each breaks one rule that both the validator and the schema know.
BAD = {
    "unknown top-level table": GOOD + "[stages]\nx = 1\n",
    "unknown pipeline key": "[pipeline]\nnmae = 'x'\n" + GOOD,
    "unknown action key": GOOD + '  shell = "make"\n',
    "retries not an integer": GOOD + '  retries = "2"\n',
    "retries below 0": GOOD + "  retries = -1\n",
    "run_order 0": GOOD + "  run_order = 0\n",
    "duration without unit": GOOD + '  timeout = "10"\n',
    "duration in words": GOOD + '  timeout = "ten minutes"\n',
    "run action without run": GOOD.replace('  run = "make"\n', ""),
    "empty run": GOOD.replace('"make"', '"  "'),
    "approval with run": GOOD.replace('  run = "make"', '  type = "approval"\n  run = "make"'),
    "approval with outputs": GOOD.replace('  run = "make"', '  type = "approval"\n  outputs = { a = "x" }'),
    "deploy without target": GOOD.replace('  run = "make"', '  type = "deploy"\n  environment = "staging"'),
    "deploy without environment": GOOD.replace('  run = "make"', '  type = "deploy"\n  target = "file:///srv/x"'),
    "deploy with a bad target": GOOD.replace(
        '  run = "make"', '  type = "deploy"\n  environment = "s"\n  target = "http://example.com/x"'),
    "deploy with an unknown strategy": GOOD.replace(
        '  run = "make"', '  type = "deploy"\n  environment = "s"\n  target = "file:///x"\n  strategy = "canary"'),
    "network on a deploy": GOOD.replace(
        '  run = "make"', '  type = "deploy"\n  environment = "s"\n  target = "file:///x"\n  network = false'),
    "unknown action type": GOOD.replace('  run = "make"', '  type = "docker"\n  run = "make"'),
    "action name with a slash": GOOD.replace('"wheel"', '"a/b"'),
    "stage without a name": GOOD.replace('name = "build"\n', ""),
    "stage without actions": '[[stage]]\nname = "build"\n',
    "no stages": '[pipeline]\nname = "x"\n',
    "an empty array of stages": "stage = []\n",
    "env with a bad name": GOOD + '  env = { "A-B" = "1" }\n',
    "secret with a bad name": GOOD + '  secrets = ["my secret"]\n',
    "artifact with a bad name": GOOD + '  outputs = { "a b" = "x" }\n',
    "inputs not an array": GOOD + '  inputs = "wheel"\n',
    "unknown when key": GOOD + '  when = { branch = ["main"] }\n',
    "superseded unknown": '[trigger]\nsuperseded = "drop"\n' + GOOD,
    "notify without on": GOOD + '[[notify]]\nwebhook = "https://x.example/h"\n',
    "notify with an unknown event": GOOD + '[[notify]]\non = ["done"]\nwebhook = "https://x.example/h"\n',
    "notify with webhook and command": GOOD + '[[notify]]\non = ["failed"]\nwebhook = "https://x/h"\ncommand = "true"\n',
    "pipeline network not a boolean": '[pipeline]\nnetwork = "no"\n' + GOOD,
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_validator_and_schema_both_reject(name: str, checker: jsonschema.Draft202012Validator) -> None:
    text = BAD[name]
    with pytest.raises(PipelineError):
        pipeline.parse(text)
    assert list(checker.iter_errors(tomllib.loads(text))), f"the schema accepts: {name}"


def test_good_base_passes_both(checker: jsonschema.Draft202012Validator) -> None:
    assert _valid(GOOD)
    assert not list(checker.iter_errors(tomllib.loads(GOOD)))


def test_every_key_of_the_validator_is_in_the_schema_with_help() -> None:
    doc = schema.pipeline_schema()
    action = doc["$defs"]["action"]["properties"]
    assert set(action) == {k.name for k in keys.ACTION} == set(actionspec._COMMON_KEYS).union(
        *actionspec._TYPE_KEYS.values())
    assert set(doc["properties"]) == set(pipeline._TOP_KEYS)
    for key in keys.ACTION:
        assert action[key.name]["description"] == key.help and key.help
    stage = doc["properties"]["stage"]["items"]
    assert set(stage["properties"]) == set(pipeline._STAGE_KEYS)


def test_schema_names_installed_plugin_types() -> None:
    doc = schema.pipeline_schema(("docker",))
    assert "docker" in doc["$defs"]["action"]["properties"]["type"]["enum"]
    text = GOOD.replace('  run = "make"', '  type = "docker"\n  image = "alpine"')
    assert not list(VALIDATOR(doc).iter_errors(tomllib.loads(text)))
